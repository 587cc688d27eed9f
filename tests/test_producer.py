"""ChangeProducer and `tally produce` against the real broker, read back through EventDecoder."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import msgspec
import pytest
from consumer_util import wait_exit, wait_for
from kafka_util import create_topic, read_all, unique_topic

from tally.consumers.cli import produce as cli_produce
from tally.consumers.producer import (
    BrokerUnavailable,
    ChangeProducer,
    ProduceError,
    SyncChangeProducer,
)
from tally.schemas.decode import EventDecoder
from tally.schemas.errors import InvalidEvent
from tally.schemas.events import ChangeEvent, NativeEvent
from tally.schemas.keys import encode_event, key_for_id, row_id, truncate_key

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def decoded(
    bootstrap: str, topic: str, **decoder_kwargs: Any
) -> list[tuple[int, bytes | None, ChangeEvent]]:
    """(partition, key, ChangeEvent) of every record, by (partition, offset)."""
    dec = EventDecoder(**decoder_kwargs)
    return [(p, k, dec.decode(k, v, topic)) for p, _o, k, v, _h in read_all(bootstrap, topic)]


def by_id(records: list[tuple[int, bytes | None, ChangeEvent]]) -> dict[Any, list[ChangeEvent]]:
    out: dict[Any, list[ChangeEvent]] = defaultdict(list)
    for _p, _k, ev in records:
        out[ev.id].append(ev)
    return out


def assert_one_partition_per_key(records: list[tuple[int, bytes | None, ChangeEvent]]) -> None:
    parts: dict[bytes | None, set[int]] = defaultdict(set)
    for p, k, _ev in records:
        parts[k].add(p)
    assert all(len(ps) == 1 for ps in parts.values()), parts


# ----------------------------------------------------------- key contract


def test_key_contract_matches_the_decoder() -> None:
    assert key_for_id(7) == b"7"
    assert key_for_id("abc") == b'"abc"'
    assert key_for_id((3, "eu")) == b'[3,"eu"]'
    assert key_for_id([3, "eu"]) == b'[3,"eu"]'
    assert key_for_id(2.5) == b"2.5"
    assert key_for_id(2**70) == str(2**70).encode()
    assert truncate_key("scores") == b'{"truncate":"scores"}'
    dec = EventDecoder()
    # A native event without an id in its value takes it from the key: same id back.
    for rid, expect in [
        (7, 7),
        ("abc", "abc"),
        ((3, "eu"), (3, "eu")),
        ("ünï", "ünï"),
        (True, True),
    ]:
        value = msgspec.json.encode(NativeEvent("t", "delete"))
        assert dec.decode(key_for_id(rid), value, "topic").id == expect
    for bad in [None, math.nan, math.inf, b"raw", {"id": 1}, (), (1, None), object()]:
        with pytest.raises(InvalidEvent, match="row id"):
            key_for_id(bad)


def test_row_id_and_encode_event_validation() -> None:
    assert row_id({"id": 5, "x": 1}) == 5
    assert row_id({"a": 1, "b": "x"}, ("a", "b")) == (1, "x")
    assert row_id({"a": 1, "b": "x"}, ["b"]) == "x"
    with pytest.raises(InvalidEvent, match=r"no id field 'id' \(its fields: x\)"):
        row_id({"x": 1})
    with pytest.raises(InvalidEvent, match="no id fields 'a', 'c'"):
        row_id({"b": 1}, ("a", "b", "c"))
    with pytest.raises(InvalidEvent, match="'id' is null"):
        row_id({"id": None})

    key, value = encode_event(NativeEvent("t", "insert", after={"id": 9, "v": 1}))
    assert key == b"9"
    assert msgspec.json.decode(value) == {
        "table": "t",
        "op": "insert",
        "id": 9,
        "after": {"id": 9, "v": 1},
    }
    key, value = encode_event(
        NativeEvent("t", "delete", before={"k": "z"}), id_field="k", format="msgpack"
    )
    assert key == b'"z"' and msgspec.msgpack.decode(value)["id"] == "z"
    with pytest.raises(InvalidEvent, match="no 'after' row image"):
        encode_event(NativeEvent("t", "update", 1))
    with pytest.raises(InvalidEvent, match="no id and no 'before' row"):
        encode_event(NativeEvent("t", "delete"))
    with pytest.raises(InvalidEvent, match="unknown op 'upsert'"):
        encode_event(NativeEvent("t", "upsert", 1, after={}))  # type: ignore[arg-type]
    with pytest.raises(InvalidEvent, match="as msgpack"):
        encode_event(NativeEvent("t", "insert", 1, after={"big": 2**70}), format="msgpack")


# ------------------------------------------------------------ ChangeProducer


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
def test_ops_and_ids_round_trip_on_three_partitions(kafka_bootstrap: str, fmt: str) -> None:
    topic = unique_topic(f"producer-ops-{fmt}")
    create_topic(kafka_bootstrap, topic, partitions=3)

    async def publish() -> None:
        async with ChangeProducer(kafka_bootstrap, format=fmt) as p:  # type: ignore[arg-type]
            acks = []
            for i in range(30):
                acks.append(await p.insert(topic, "scores", {"id": i, "score": i * 10}))
                acks.append(
                    await p.insert(topic, "players", {"name": f"p{i}", "level": i}, id_field="name")
                )
                acks.append(
                    await p.insert(
                        topic,
                        "seasons",
                        {"player": i, "season": "s1", "w": 0},
                        id_field=("player", "season"),
                    )
                )
            for i in range(0, 30, 3):
                acks.append(await p.update(topic, "scores", {"id": i, "score": -i}))
                acks.append(
                    await p.update(
                        topic, "players", {"name": f"p{i}", "level": 99}, id_field="name"
                    )
                )
                acks.append(
                    await p.update(
                        topic, "seasons", {"player": i, "season": "s1", "w": 5}, id=(i, "s1")
                    )
                )
            for i in range(0, 30, 5):
                acks.append(await p.delete(topic, "scores", i))
                acks.append(
                    await p.delete(
                        topic, "players", before={"name": f"p{i}", "level": 1}, id_field="name"
                    )
                )
                acks.append(await p.delete(topic, "seasons", (i, "s1")))
            acks.append(await p.truncate(topic, "other", position=42))
            acks.append(
                await p.send(topic, NativeEvent("scores", "insert", after={"id": 1000, "score": 1}))
            )
            metas = await asyncio.gather(*acks)
            assert all(m.topic == topic and m.offset >= 0 for m in metas)
            await p.flush()

    asyncio.run(publish())
    records = decoded(kafka_bootstrap, topic)
    assert len(records) == 30 * 3 + 10 * 3 + 6 * 3 + 2
    assert {p for p, _k, _e in records} == {0, 1, 2}
    assert_one_partition_per_key(records)
    events = by_id(records)

    for i in range(30):
        # the source op travels too: insert → "c", update → "u", delete → "d"
        expect: list[ChangeEvent] = [
            ChangeEvent("scores", "upsert", i, {"id": i, "score": i * 10}, op="c")
        ]
        if i % 3 == 0:
            expect.append(ChangeEvent("scores", "upsert", i, {"id": i, "score": -i}, op="u"))
        if i % 5 == 0:
            expect.append(ChangeEvent("scores", "delete", i, None, op="d"))
        assert events[i] == expect
        name = f"p{i}"
        assert [(e.table, e.kind, e.row) for e in events[name]] == [
            ("players", "upsert", {"name": name, "level": i}),
            *([("players", "upsert", {"name": name, "level": 99})] if i % 3 == 0 else []),
            *([("players", "delete", None)] if i % 5 == 0 else []),
        ]
        composite = events[(i, "s1")]
        assert composite[0] == ChangeEvent(
            "seasons", "upsert", (i, "s1"), {"player": i, "season": "s1", "w": 0}, op="c"
        )
        assert [e.kind for e in composite] == ["upsert"] + ["upsert"] * (i % 3 == 0) + [
            "delete"
        ] * (i % 5 == 0)
    assert events[None] == [ChangeEvent("other", "truncate", None, None, 42)]
    assert events[1000] == [ChangeEvent("scores", "upsert", 1000, {"id": 1000, "score": 1}, op="c")]
    # The keys are the JSON-encoded ids.
    keys = {ev.id: k for _p, k, ev in records}
    assert keys[7] == b"7" and keys["p7"] == b'"p7"' and keys[(7, "s1")] == b'[7,"s1"]'
    assert keys[None] == b'{"truncate":"other"}'


def test_pipelined_single_sends_keep_order_per_key(kafka_bootstrap: str) -> None:
    topic = unique_topic("producer-pipelined")
    create_topic(kafka_bootstrap, topic, partitions=3)

    async def publish() -> None:
        async with ChangeProducer(kafka_bootstrap) as p:
            for v in range(20):  # 20 versions of 100 rows, no ack awaited in between
                for i in range(100):
                    await p.update(topic, "t", {"id": i, "v": v})
            await p.flush()

    asyncio.run(publish())
    records = decoded(kafka_bootstrap, topic)
    assert len(records) == 2000
    assert_one_partition_per_key(records)
    for i, evs in by_id(records).items():
        assert [e.row["v"] for e in evs if e.row] == list(range(20)), i


def test_bulk_and_single_sends_agree_on_partitions(kafka_bootstrap: str) -> None:
    topic = unique_topic("producer-bulk")
    create_topic(kafka_bootstrap, topic, partitions=3)
    n = 100_000
    rows = [{"id": i, "player": f"player{i}", "score": i % 977} for i in range(n)]

    async def publish() -> float:
        async with ChangeProducer(kafka_bootstrap) as p:
            started = time.perf_counter()
            assert await p.insert_many(topic, "scores", rows) == n
            elapsed = time.perf_counter() - started
            for i in range(0, n, 1000):  # single sends of the same ids after the bulk
                await p.delete(topic, "scores", i)
            await p.flush()
            return elapsed

    elapsed = asyncio.run(publish())
    print(f"\nbulk insert_many: {n:,} events in {elapsed:.2f}s ({n / elapsed:,.0f}/s)")
    got = read_all(kafka_bootstrap, topic, timeout=120)
    assert len(got) == n + n // 1000
    parts: dict[bytes | None, set[int]] = defaultdict(set)
    for p, _o, k, _v, _h in got:
        parts[k].add(p)
    assert all(len(ps) == 1 for ps in parts.values())
    assert {p for p, *_ in got} == {0, 1, 2}
    dec = EventDecoder()
    last = {}
    for _p, _o, k, v, _h in got:
        ev = dec.decode(k, v, topic)
        last[ev.id] = ev.kind
    assert len(last) == n
    assert (
        sum(kind == "delete" for kind in last.values()) == n // 1000
    )  # deletes came after inserts


def test_send_many_publishes_events_before_an_invalid_one(kafka_bootstrap: str) -> None:
    topic = unique_topic("producer-send-many-invalid")
    create_topic(kafka_bootstrap, topic, partitions=2)
    events = [NativeEvent("t", "insert", i, after={"id": i}) for i in range(5)]
    events.append(NativeEvent("t", "insert", after={"no_id": 1}))

    async def publish() -> None:
        async with ChangeProducer(kafka_bootstrap) as p:
            with pytest.raises(InvalidEvent, match="no id field 'id'"):
                await p.send_many(topic, events)

    asyncio.run(publish())
    assert sorted(ev.id for _p, _k, ev in decoded(kafka_bootstrap, topic)) == [0, 1, 2, 3, 4]


def test_delete_with_tombstone(kafka_bootstrap: str) -> None:
    topic = unique_topic("producer-tombstone")
    create_topic(kafka_bootstrap, topic, partitions=3, compacted=True)

    async def publish() -> None:
        async with ChangeProducer(kafka_bootstrap) as p:
            await p.insert(topic, "t", {"id": "a", "v": 1})
            await (await p.delete(topic, "t", "a", tombstone=True))
            await p.truncate(topic, "t")  # a compacted topic needs keys: truncates have one

    asyncio.run(publish())
    got = read_all(kafka_bootstrap, topic)
    assert [(k, v is None) for _p, _o, k, v, _h in got if k == b'"a"'] == [
        (b'"a"', False),
        (b'"a"', False),
        (b'"a"', True),
    ]
    dec = EventDecoder(topic_tables={topic: "t"})
    kinds = [dec.decode(k, v, topic) for _p, _o, k, v, _h in got if k == b'"a"']
    assert [(e.kind, e.id) for e in kinds] == [("upsert", "a"), ("delete", "a"), ("delete", "a")]


def test_delivery_failures_surface_as_produce_error(kafka_bootstrap: str) -> None:
    topic = unique_topic("producer-too-large")
    create_topic(kafka_bootstrap, topic, partitions=1, configs={"max.message.bytes": "2000"})
    big = {"id": 1, "blob": "x" * 5000}

    async def publish() -> None:
        async with ChangeProducer(kafka_bootstrap, linger_ms=0) as p:
            fut = await p.insert(topic, "t", big)
            with pytest.raises(ProduceError, match=r"1 event\(s\) were not delivered") as ei:
                await p.flush()
            # the event's own future holds the very failure the flush reported
            assert fut.exception() is ei.value.__cause__ is not None
            await p.flush()  # reported once
            with pytest.raises(ProduceError, match="did not ack"):
                await p.insert_many(topic, "t", [big])
            await (await p.insert(topic, "t", {"id": 2}))  # the producer still works

    asyncio.run(publish())
    assert [ev.id for _p, _k, ev in decoded(kafka_bootstrap, topic)] == [2]


def test_unreachable_broker_and_misuse() -> None:
    async def go() -> None:
        p = ChangeProducer("127.0.0.1:1", connect_timeout=5)
        with pytest.raises(ProduceError, match="not started"):
            await p.insert("t", "t", {"id": 1})
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=r"127\.0\.0\.1:1.*scripts/kafka start"):
            await p.start()
        assert time.monotonic() - started < 10
        assert not p.started

    asyncio.run(go())
    from tally.schemas.errors import ConfigError

    with pytest.raises(ConfigError, match="idempotent"):
        ChangeProducer(enable_idempotence=False)
    with pytest.raises(ConfigError, match="acks"):
        ChangeProducer(acks=1)
    with pytest.raises(ConfigError, match="format"):
        ChangeProducer(format="xml")  # type: ignore[arg-type]


def test_sync_facade(kafka_bootstrap: str) -> None:
    topic = unique_topic("producer-sync")
    create_topic(kafka_bootstrap, topic, partitions=3)
    with SyncChangeProducer(kafka_bootstrap) as p:
        meta = p.insert(topic, "t", {"id": 1, "v": "a"}).result(timeout=30)
        assert meta.topic == topic
        p.update(topic, "t", {"id": 1, "v": "b"})
        assert p.insert_many(topic, "t", ({"id": i} for i in range(2, 50))) == 48
        p.delete(topic, "t", 1)
        p.truncate(topic, "t")
        p.flush()
    records = decoded(kafka_bootstrap, topic)
    assert len(records) == 52
    assert [(e.kind, e.row) for e in by_id(records)[1]] == [
        ("upsert", {"id": 1, "v": "a"}),
        ("upsert", {"id": 1, "v": "b"}),
        ("delete", None),
    ]
    with pytest.raises(BrokerUnavailable), SyncChangeProducer("127.0.0.1:1", connect_timeout=5):
        pass


# ------------------------------------------------------------ tally produce


def produce_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `tally produce ARGV` in-process through the `tally` entry point (its parser and its
    one error reporter); returns (exit code, stdout, stderr)."""
    from tally.consumers.cli import main

    code = main(["produce", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_jsonl_rows_and_events(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unique_topic("cli-jsonl")
    create_topic(kafka_bootstrap, topic, partitions=3)
    lines = [json.dumps({"id": i, "name": f"n{i}", "score": i / 2}) for i in range(50)]
    lines.insert(10, "")  # blank lines are skipped
    lines.append(
        json.dumps(
            {"table": "scores", "op": "update", "after": {"id": 3, "name": "n3", "score": 99}}
        )
    )
    lines.append(json.dumps({"table": "scores", "op": "delete", "id": 4}))
    lines.append(json.dumps({"table": "other", "op": "delete", "before": {"id": "x"}}))
    lines.append(json.dumps({"table": "other", "op": "truncate"}))
    path = tmp_path / "scores.jsonl"
    path.write_text("\r\n".join(lines) + "\r\n")

    code, out, err = produce_cli(
        capsys,
        "--table",
        "scores",
        "--topic",
        topic,
        "--bootstrap-servers",
        kafka_bootstrap,
        str(path),
    )
    assert (code, err) == (0, "")
    assert out.startswith(f"produced 54 events to {topic} in ") and out.endswith("/s)\n")
    records = decoded(kafka_bootstrap, topic)
    assert len(records) == 54
    assert_one_partition_per_key(records)
    events = by_id(records)
    assert events[0] == [
        ChangeEvent("scores", "upsert", 0, {"id": 0, "name": "n0", "score": 0.0}, op="c")
    ]
    assert [e.row for e in events[3]] == [
        {"id": 3, "name": "n3", "score": 1.5},
        {"id": 3, "name": "n3", "score": 99},
    ]
    assert [e.kind for e in events[4]] == ["upsert", "delete"]
    assert events["x"] == [ChangeEvent("other", "delete", "x", None, op="d")]
    assert events[None] == [ChangeEvent("other", "truncate", None, None)]


def test_cli_csv_composite_ids_and_inference(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unique_topic("cli-csv")
    create_topic(kafka_bootstrap, topic, partitions=3)
    path = tmp_path / "seasons.csv"
    path.write_text(
        "\ufeffplayer,season,score,zip,note,ratio\n"
        "1,2024,10,02134,plain,0.5\n"
        '2,2024,-7,10001,"multi\nline, quoted",1e3\n'
        "\n"
        "3,s1,,007,true,+1\n"
        "12345678901234567890123,2024,1.0,0,NaN,-0\n",
        encoding="utf-8",
    )
    code, out, err = produce_cli(
        capsys,
        *("--table", "seasons", "--topic", topic, "--id-field", "player", "--id-field", "season"),
        *("--bootstrap-servers", kafka_bootstrap, str(path)),
    )
    assert (code, err) == (0, ""), err
    assert out.startswith(f"produced 4 events to {topic}")
    rows = {ev.id: ev.row for _p, _k, ev in decoded(kafka_bootstrap, topic)}
    assert rows[(1, 2024)] == {
        "player": 1,
        "season": 2024,
        "score": 10,
        "zip": "02134",
        "note": "plain",
        "ratio": 0.5,
    }
    assert rows[(2, 2024)] == {
        "player": 2,
        "season": 2024,
        "score": -7,
        "zip": 10001,
        "note": "multi\nline, quoted",
        "ratio": 1000.0,
    }
    assert rows[(3, "s1")] == {
        "player": 3,
        "season": "s1",
        "score": None,
        "zip": "007",
        "note": "true",
        "ratio": "+1",
    }
    big = rows[(12345678901234567890123, 2024)]
    assert big is not None and big["score"] == 1.0


def test_cli_csv_no_infer_and_stdin(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topic = unique_topic("cli-csv-strings")
    path = tmp_path / "rows.txt"
    path.write_text("id,v\n1,2\n2,\n")
    code, _out, err = produce_cli(
        capsys,
        *("--table", "t", "--topic", topic, "--bootstrap-servers", kafka_bootstrap),
        *("--input-format", "csv", "--no-infer", "--format", "msgpack", str(path)),
    )
    assert (code, err) == (0, "")
    assert {ev.id: ev.row for _p, _k, ev in decoded(kafka_bootstrap, topic)} == {
        "1": {"id": "1", "v": "2"},
        "2": {"id": "2", "v": ""},
    }

    # stdin (JSONL), through `python -m tally.consumers.cli.produce`, with the broker from the environment.
    topic2 = unique_topic("cli-stdin")
    env = {**os.environ, "TALLY_BOOTSTRAP_SERVERS": kafka_bootstrap}
    res = subprocess.run(
        [
            PYTHON,
            "-m",
            "tally.consumers.cli.produce",
            "--table",
            "t",
            "--topic",
            topic2,
            "--op",
            "delete",
            "-",
        ],
        input='{"id": 1}\n{"id": 2}',  # no final newline
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.startswith(f"produced 2 events to {topic2}")
    assert [(ev.kind, ev.id) for _p, _k, ev in decoded(kafka_bootstrap, topic2)] == [
        ("delete", 1),
        ("delete", 2),
    ]


def test_cli_publishes_a_slow_pipe_as_lines_arrive(kafka_bootstrap: str) -> None:
    topic = unique_topic("cli-trickle")
    create_topic(kafka_bootstrap, topic, partitions=1)
    proc = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "tally.consumers.cli.produce",
            "--table",
            "t",
            "--topic",
            topic,
            *("--bootstrap-servers", kafka_bootstrap, "-"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None
    try:
        for i in range(2):
            proc.stdin.write(f'{{"id": {i}}}\n'.encode())
            proc.stdin.flush()

            def published(n: int = i + 1) -> bool:
                return len(read_all(kafka_bootstrap, topic)) >= n

            wait_for(  # published while stdin stays open
                published,
                f"event {i} to be published while the pipe is open",
                timeout=20,
                every=0.1,
            )
        proc.stdin.close()  # end of input
        rc = wait_exit(proc, "tally produce did not exit at the end of its input", 30)
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (rc, err) == (0, b"")
    assert out.startswith(f"produced 2 events to {topic}".encode())


def test_cli_input_errors(
    kafka_bootstrap: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ("--table", "t", "--bootstrap-servers", kafka_bootstrap)

    def run(path: Path, *extra: str, topic: str | None = None) -> tuple[int, str, str]:
        return produce_cli(
            capsys, *base, "--topic", topic or unique_topic("cli-err"), *extra, str(path)
        )

    # Bad JSON on line 3: exit 2 naming the line; the two events before it are published.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{"id": 2}\n{"id": 3,\n{"id": 4}\n')
    topic = unique_topic("cli-bad-json")
    code, out, err = run(bad, topic=topic)
    assert code == 2 and out == ""
    assert err.startswith(f"tally produce: error: {bad} line 3: invalid JSON: ")
    assert "the 2 events before it were published" in err and err.count("\n") == 1
    assert sorted(ev.id for _p, _k, ev in decoded(kafka_bootstrap, topic)) == [1, 2]

    cases: list[tuple[str, str | None, tuple[str, ...], str]] = [
        (
            "noid.jsonl",
            '{"id": 1}\n{"name": "x"}\n',
            (),
            r"line 2: the row has no id field 'id' \(its fields: name\); choose",
        ),
        ("nullid.jsonl", '{"id": null}\n', (), "line 1: the row's id field 'id' is null"),
        ("badid.jsonl", '{"id": {"a": 1}}\n', (), "line 1: the row id is an object"),
        ("array.jsonl", "[\n", (), r"line 1: invalid JSON.*jq -c"),
        ("scalar.jsonl", '{"id": 1}\n\n42\n', (), "line 3: expected a JSON object"),
        (
            "op.jsonl",
            '{"table": "t", "op": "upsert", "id": 1}\n',
            (),
            r"line 1: not a valid change event: .*\$\.op",
        ),
        (
            "noafter.jsonl",
            '{"table": "t", "op": "insert", "id": 1}\n',
            (),
            "line 1: insert event for table 't' has no 'after'",
        ),
        (
            "utf.jsonl",
            '{"id": 1}\n"\udcff"\n',
            (),
            r"line 2: not UTF-8 text \(invalid start byte 0xff at byte 2 of the line\); convert",
        ),
        (  # the usual real case: a Latin-1 é inside a JSON string
            "latin1.jsonl",
            '{"id": 1, "name": "caf\xe9"}\n',
            (),
            r"line 1: not UTF-8 text \(invalid continuation byte 0xe9 at byte 23 of the line\)",
        ),
        (
            "noidcol.csv",
            "name,score\nx,1\n",
            (),
            r"line 1: the CSV header has no id column \['id'\]",
        ),
        (
            "composite.csv",
            "a,b\n1,2\n",
            ("--id-field", "a", "--id-field", "c"),
            r"line 1: .*no id column \['c'\]",
        ),
        ("ragged.csv", "id,v\n1,2\n2,3,4\n", (), "line 3: 3 fields, but the header has 2 columns"),
        ("dupe.csv", "id,id\n1,2\n", (), "repeats column"),
        ("empty.csv", "", (), "line 1: empty CSV file"),
        (
            "latin1.csv",
            "id,v\n1,caf\xe9\n",
            (),
            r"line 2: not UTF-8 text \(invalid continuation byte 0xe9 at byte 6 of the line\)",
        ),
        ("rows.unknown", '{"id": 1}\n', (), "cannot tell the format.*--input-format"),
        ("missing.jsonl", None, (), r"cannot read .*missing\.jsonl: No such file"),
    ]
    for name, text, extra, pattern in cases:
        path = tmp_path / name
        if text is not None:
            if name.startswith("latin1"):
                path.write_bytes(text.encode("latin-1"))
            else:
                path.write_bytes(text.encode("utf-8", "surrogateescape"))
        code, out, err = run(path, *extra)
        assert code == 2, (name, code, err)
        assert err.count("\n") == 1 and err.startswith("tally produce: error: "), (name, err)
        assert re.search(pattern, err), (name, err)
        assert "Traceback" not in err

    # A row without --table; a bad topic name; dry run reports without publishing.
    rows = tmp_path / "ok.jsonl"
    rows.write_text('{"id": 1}\n{"id": 2}\n')
    code, _out, err = produce_cli(
        capsys, "--topic", "x", "--bootstrap-servers", kafka_bootstrap, str(rows)
    )
    assert code == 2 and "line 1: a row, but no --table was given" in err
    code, _out, err = produce_cli(capsys, *base, "--topic", "bad topic!", str(rows))
    assert code == 2 and "invalid topic name" in err
    code, out, err = produce_cli(capsys, *base, "--topic", "never-created", "--dry-run", str(rows))
    assert (
        (code, err) == (0, "")
        and out.startswith("checked 2 events from")
        and "nothing published" in out
    )
    code, _out, err = produce_cli(capsys, *base, "--topic", "never-created", "--dry-run", str(bad))
    assert code == 2 and "line 3" in err and "dry run" in err


def test_cli_unreachable_broker(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1}\n')
    env = {**os.environ, "TALLY_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    started = time.monotonic()
    res = subprocess.run(
        [
            PYTHON,
            "-m",
            "tally.consumers.cli.produce",
            "--table",
            "t",
            "--topic",
            "t",
            "--timeout",
            "10",
            str(rows),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert time.monotonic() - started < 20
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("tally produce: error: cannot connect to Kafka at 127.0.0.1:1")
    assert "scripts/kafka start" in res.stderr and "Traceback" not in res.stderr


def test_cli_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_produce.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "tally produce --table scores --topic scores scores.jsonl" in out


def test_csv_inference_rule() -> None:
    infer = cli_produce.infer_value
    assert [infer(s) for s in ["0", "-0", "42", "-7", "2.5", "1e3", "-1.5E-2", ""]] == [
        0,
        0,
        42,
        -7,
        2.5,
        1000.0,
        -0.015,
        None,
    ]
    for keep in [
        "007",
        "+1",
        "1.",
        ".5",
        "1_000",
        " 1",
        "1 ",
        "0x10",
        "NaN",
        "inf",
        "1e999",
        "true",
        "1,5",
        "--1",
    ]:
        assert infer(keep) == keep
