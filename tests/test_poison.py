"""Poison records: no single record, of any size or shape, stops or crash-loops a consumer.

Each poison record goes on a real topic between valid records; `tally consume` (a
subprocess) must apply the valid ones (checked against the oracle), dead-letter the
poison one exactly once (the dead-letter topic read to its end) with headers saying
what it was, and not dead-letter it again after a restart. A dead-letter topic the
broker refuses to write must show in /status, /readyz and the log, and recover.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from consumer_util import (
    RowStream,
    child_env,
    consume_args,
    free_port,
    log_events,
    native_records,
    open_store,
    run_consume,
    tail,
    wait_for,
    write_definitions,
)
from kafka_util import create_topic, produce, read_all, unique_topic
from oracle import assert_store_matches, expected_items

from tally.consumers.client import ClientError, TallyClient
from tally.consumers.runtime.deadletters import Limit, build_dead_letter

DEFAULT_LIMIT = (
    1_048_588  # the broker's message.max.bytes (Kafka's default; scripts/kafka keeps it)
)


def dead_letters(
    bootstrap: str, dlq: str
) -> dict[int, tuple[bytes | None, bytes | None, dict[str, bytes]]]:
    """The dead-letter topic read to its end: source offset → (key, value, headers).
    Asserts each source record is there at most once."""
    out: dict[int, tuple[bytes | None, bytes | None, dict[str, bytes]]] = {}
    for _p, _o, k, v, headers in read_all(bootstrap, dlq):
        h = dict(headers)
        src = int(h["tally.source.offset"])
        assert src not in out, f"source offset {src} dead-lettered twice"
        out[src] = (k, v, h)
    return out


def record_size(key: bytes | None, value: bytes | None, headers: dict[str, bytes]) -> int:
    """aiokafka's upper bound of a one-record batch holding this record."""
    return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, list(headers.items())))


def assert_headers(h: dict[str, bytes], topic: str, offset: int, reason: str) -> None:
    assert h["tally.source.topic"] == topic.encode()
    assert h["tally.source.partition"] == b"0"
    assert h["tally.source.offset"] == str(offset).encode()
    assert h["tally.reason"] == reason.encode(), h
    assert h["tally.error"].decode("utf-8").strip()


def test_every_dead_letter_fits_its_limit_and_says_what_it_lost() -> None:
    """`build_dead_letter` alone, over many sizes and limits (aiokafka's own estimate of
    the record batch is the measure): never null/null, prefixes only, headers right."""
    rng = random.Random(3)
    cases = [(None, None), (b"k", None), (None, b"v"), (b"", b"")]
    cases += [
        (
            rng.randbytes(rng.choice([0, 5, 300, 5000, 70_000])) if rng.random() < 0.9 else None,
            rng.randbytes(rng.choice([0, 40, 3000, 200_000, 2_000_000])),
        )
        for _ in range(60)
    ]
    for key, value in cases:
        for max_bytes in (700, 1500, 4096, 20_000, DEFAULT_LIMIT, 4 << 20):
            for keep in (True, False):
                limit = Limit(max_bytes)
                error = "é" * rng.choice([5, 3000])
                k, v, headers = build_dead_letter(
                    "t", 2, 99, key, value, "decode", error, limit, keep_payload=keep
                )
                h = dict(headers)
                assert v is not None and (k is None) == (key is None)
                assert record_size(k, v, h) <= max_bytes, (len(key or b""), len(value or b""))
                assert (key or b"").startswith(k or b"") and (value or b"").startswith(v)
                assert h["tally.source.key.size"] == (
                    b"null" if key is None else str(len(key)).encode()
                )
                assert h["tally.source.value.size"] == (
                    b"null" if value is None else str(len(value)).encode()
                )
                cut = [
                    n
                    for n, full, got in (("key", key, k), ("value", value, v))
                    if len(got or b"") < len(full or b"")
                ]
                assert h.get("tally.truncated") == (",".join(cut).encode() if cut else None)
                h["tally.error"].decode("utf-8")  # whole characters only
                if keep and max_bytes >= 20_000 and len(key or b"") + len(value or b"") < 10_000:
                    assert (k, v) == (key, value or b"")


def test_null_key_and_value_is_dead_lettered_once_across_restarts(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """It used to crash the consumer at the same offset on every start."""
    topic = unique_topic("poison-null")
    create_topic(kafka_bootstrap, topic)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"
    stream = RowStream(seed=1, n_ids=200)
    first, second = stream.take(400), stream.take(400)
    placed = produce(
        kafka_bootstrap,
        topic,
        [*native_records(first, seed=1), (None, None), *native_records(second, seed=2)],
    )
    null_at = placed[400][1]

    # A fresh store: the replay building the aggregates meets it.
    res = run_consume(defs_path, topic, data, kafka_bootstrap)
    (caught_up,) = log_events(res.stderr, "caught up")
    assert caught_up["dead_letters"] == 1
    with open_store(data) as store:
        assert_store_matches(store, defs, expected_items(first + second, defs))
    got = dead_letters(kafka_bootstrap, f"{topic}.dlq")
    assert set(got) == {null_at}
    key, value, h = got[null_at]
    assert (key, value) == (None, b"")  # a null value becomes an empty one, said so below
    assert_headers(h, topic, null_at, "missing-id")
    assert (h["tally.source.key.size"], h["tally.source.value.size"]) == (b"null", b"null")
    assert "tally.truncated" not in h

    # The restart reads past it; the live stream meets a second one.
    third = stream.take(300)
    placed = produce(kafka_bootstrap, topic, [(None, None), *native_records(third, seed=3)])
    second_null_at = placed[0][1]
    for _ in range(2):  # and one more restart with nothing new
        res = run_consume(defs_path, topic, data, kafka_bootstrap)
        got = dead_letters(kafka_bootstrap, f"{topic}.dlq")
        assert set(got) == {null_at, second_null_at}, res.stderr[-3000:]
        with open_store(data) as store:
            assert_store_matches(store, defs, expected_items(first + second + third, defs))
    assert got[second_null_at][:2] == (None, b"")
    assert_headers(got[second_null_at][2], topic, second_null_at, "missing-id")


def test_a_dead_letter_over_the_limit_is_truncated_with_its_sizes(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A malformed record the topic accepted at default limits: its dead letter (the
    same bytes plus headers) would be over the limit, so it carries a prefix."""
    topic = unique_topic("poison-big")
    create_topic(kafka_bootstrap, topic)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"
    rng = random.Random(7)
    big_key = b"big-1"
    big = b"{" + rng.randbytes(1_048_455)  # not JSON; 1,048,456 bytes
    # An error text over the 4,000-byte header cap, in two-byte characters.
    ghost = json.dumps({"table": "é" * 3000, "op": "insert", "id": 1, "after": {"id": 1}}).encode()
    stream = RowStream(seed=2, n_ids=200)
    before, after = stream.take(300), stream.take(300)
    placed = produce(
        kafka_bootstrap,
        topic,
        [
            *native_records(before, seed=1),
            (big_key, big),
            (b"1", ghost),
            *native_records(after, seed=2),
        ],
    )
    big_at, ghost_at = placed[300][1], placed[301][1]

    for run in range(2):  # the second run must not dead-letter them again
        try:
            run_consume(defs_path, topic, data, kafka_bootstrap, timeout=120)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"run {run}: the consumer never caught up (stalled on the dead letter?)\n"
                f"{(e.stderr or b'')[-3000:]!r}"
            ) from None
        with open_store(data) as store:
            assert_store_matches(store, defs, expected_items(before + after, defs))
        got = dead_letters(kafka_bootstrap, f"{topic}.dlq")
        assert set(got) == {big_at, ghost_at}

    key, value, h = got[big_at]
    assert_headers(h, topic, big_at, "decode")
    assert h["tally.truncated"] == b"value"
    assert (h["tally.source.key.size"], h["tally.source.value.size"]) == (b"5", b"1048456")
    assert key == big_key and value is not None
    assert big.startswith(value) and 1_040_000 < len(value) < len(big)
    assert record_size(key, value, h) <= DEFAULT_LIMIT

    key, value, h = got[ghost_at]
    assert_headers(h, topic, ghost_at, "unknown-table")
    assert (key, value) == (b"1", ghost) and "tally.truncated" not in h
    error = h["tally.error"]
    assert (
        3900 < len(error) <= 4000 and error.decode("utf-8").count("é") > 1000
    )  # cut between characters


def test_records_over_a_mebibyte_keep_what_the_dead_letter_topic_allows(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """3 MiB records on topics that allow 4 MiB: with a dead-letter topic at the broker's
    default limit (auto-created) key and value are cut; with one that allows 8 MiB (read
    from the broker) the dead letter is the whole record."""
    defs_path, defs = write_definitions(tmp_path)
    rng = random.Random(9)
    stream = RowStream(seed=3, n_ids=100)
    for case, dlq_limit in (("default", None), ("roomy", 8 << 20)):
        topic = unique_topic(f"poison-huge-{case}")
        create_topic(kafka_bootstrap, topic, configs={"max.message.bytes": str(4 << 20)})
        if dlq_limit is not None:
            create_topic(
                kafka_bootstrap, f"{topic}.dlq", configs={"max.message.bytes": str(dlq_limit)}
            )
        key, value = (
            b"[" + rng.randbytes(1 << 20),
            b"{" + rng.randbytes(2 << 20),
        )  # the key is no id either
        events = stream.take(200)
        placed = produce(
            kafka_bootstrap,
            topic,
            [(key, value), *native_records(events, seed=4)],
            max_request_size=5 << 20,
        )
        at = placed[0][1]
        data = tmp_path / f"data-{case}"
        for _ in range(2):
            run_consume(defs_path, topic, data, kafka_bootstrap, timeout=120)
            got = dead_letters(kafka_bootstrap, f"{topic}.dlq")
            assert set(got) == {at}
        with open_store(data) as store:
            assert_store_matches(store, defs, expected_items(events, defs))
        k, v, h = got[at]
        assert_headers(h, topic, at, "decode")
        sizes = (h["tally.source.key.size"], h["tally.source.value.size"])
        assert sizes == (str(len(key)).encode(), str(len(value)).encode())
        assert k is not None and v is not None and key.startswith(k) and value.startswith(v)
        if dlq_limit is None:
            assert h["tally.truncated"] == b"key,value"
            assert record_size(k, v, h) <= DEFAULT_LIMIT
            assert len(k) + len(v) > DEFAULT_LIMIT - 8192
        else:
            assert "tally.truncated" not in h and (k, v) == (key, value)


def test_a_dead_letter_topic_with_a_tiny_limit_gets_each_record_once(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """max.message.bytes=4096 on the dead-letter topic: small dead letters in a row must
    not share a batch over it, and bigger ones are cut to fit."""
    topic = unique_topic("poison-tiny")
    create_topic(kafka_bootstrap, topic)
    create_topic(kafka_bootstrap, f"{topic}.dlq", configs={"max.message.bytes": "4096"})
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"
    # Four of ~1.5 kB in a row would be over 4096 bytes in one producer batch.
    sizes = [1500, 1400, 1600, 1500, 50, 4500, 6000, 1200, 900]
    bad = [(f"b{i}".encode(), b"~" + bytes(n - 1)) for i, n in enumerate(sizes)]
    events = RowStream(seed=4, n_ids=100).take(300)
    placed = produce(kafka_bootstrap, topic, [*bad, *native_records(events, seed=5)])
    run_consume(defs_path, topic, data, kafka_bootstrap)
    run_consume(defs_path, topic, data, kafka_bootstrap)
    with open_store(data) as store:
        assert_store_matches(store, defs, expected_items(events, defs))
    got = dead_letters(kafka_bootstrap, f"{topic}.dlq")
    assert set(got) == {o for _p, o in placed[: len(bad)]}
    for (key, value), (_p, at) in zip(bad, placed, strict=False):
        k, v, h = got[at]
        assert_headers(h, topic, at, "decode")
        assert k == key and v is not None and value.startswith(v)
        assert h["tally.source.value.size"] == str(len(value)).encode()
        assert record_size(k, v, h) <= 4096
        if len(value) <= 2000:  # room enough next to the headers: whole
            assert v == value and "tally.truncated" not in h, (len(value), len(v))
        else:
            assert h["tally.truncated"] == b"value" and len(v) > 2000, (len(value), len(v))


def _delete_topic(bootstrap: str, topic: str) -> None:
    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            resp = await admin.delete_topics([topic])
            assert all(t[1] == 0 for t in resp.topic_error_codes), resp
        finally:
            await admin.close()

    asyncio.run(run())


def _not_ready_body(url: str, aggregate: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{url}/v1/aggregates/{aggregate}/count",
        data=b"{}",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raise AssertionError(f"{aggregate} answered {r.status}: {r.read()!r}")
    except urllib.error.HTTPError as e:
        assert e.code == 503, e.read()
        doc: dict[str, Any] = json.loads(e.read())
        return doc


def test_an_unwritable_dead_letter_topic_is_reported_and_recovers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The broker refuses to create the dead-letter topic ``T.dlq`` (auto-creation is on,
    but ``T_dlq`` exists and Kafka refuses names that differ only in '.' and '_'). The
    replay building the aggregates holds at the bad record; /status, /readyz and the log
    say why; the replay's first chunk, gathered but not committed, shows as progress in
    /status and in the 503 of a read alike. Once the clashing topic is gone, the dead
    letter is written once and everything applies."""
    topic = unique_topic("poison-unwritable")
    dlq, clash = f"{topic}.dlq", f"{topic}_dlq"
    create_topic(kafka_bootstrap, topic)
    create_topic(kafka_bootstrap, clash)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"
    stream = RowStream(seed=5, n_ids=300)
    before, after = stream.take(2000), stream.take(500)
    placed = produce(
        kafka_bootstrap,
        topic,
        [*native_records(before, seed=1), (b"x", b"not an event"), *native_records(after, seed=2)],
    )
    bad_at, total = placed[2000][1], len(placed)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "consume.log"
    args = [
        a
        for a in consume_args(defs_path, topic, data, kafka_bootstrap, until_caught_up=False)
        if a != "--no-http"
    ]
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            [*args, "--http", f"127.0.0.1:{port}", "--replay-batch-size", "200"],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=child_env(),
            cwd=str(tmp_path),
        )
    client = TallyClient(url, timeout=10)
    try:

        def failing() -> dict[str, Any] | None:
            assert proc.poll() is None, f"consumer exited {proc.returncode}:\n{tail(log)}"
            dl = client.status()["dead_letter"]
            return dl if dl["state"] == "failing" and dl["attempts"] >= 2 else None

        dl = wait_for(
            failing,
            "/status to report the dead-letter topic failing twice",
            120,
            swallow=(ClientError,),
        )
        assert dl["topic"] == dlq and dl["records"] == 1 and dl["since"], dl
        assert (
            "did not create it" in dl["reason"]
            and f"collides with the existing topic {clash!r}" in dl["reason"]
        ), dl
        ready = client.readyz()
        assert ready["status"] == "not_ready", ready
        assert (
            f"dead-letter topic {dlq!r} unwritable" in ready["reason"] and clash in ready["reason"]
        ), ready

        # Held at the bad record: nothing committed, the batches before it gathered in memory
        # (the replay retries the batch after a 2 s pause, its fetch long done by then, so it
        # does not find "nothing more to read" and commit the gathered chunk).
        status = client.status()
        progress = {a["name"]: a["progress"] for a in status["aggregates"]}
        assert all(a["state"] == "building" for a in status["aggregates"]), status["aggregates"]
        p = progress["scores"]
        assert p["replayed"] == 0 and 0 < p["read"] <= bad_at and p["total"] == total, p
        assert p["pending"] == p["read"] and p["percent"] > 0, p  # one partition from offset 0
        err = _not_ready_body(url, "scores")["error"]
        assert err["code"] == "not_ready"
        same = ("stream", "read", "pending", "replayed", "total", "percent")
        assert {k: err["progress"][k] for k in same} == {k: p[k] for k in same}, (err, p)
        assert f"{p['read']:,} of {total:,} events read" in err["message"], err

        text = log.read_text()
        started = log_events(
            text,
            "dead-letter topic unwritable; holding the batch (nothing after it "
            "commits) until the write succeeds",
        )
        assert len(started) == 1 and clash in started[0]["reason"], tail(log)

        _delete_topic(kafka_bootstrap, clash)

        def recovered() -> bool:
            assert proc.poll() is None, f"consumer exited {proc.returncode}:\n{tail(log)}"
            s = client.status()
            return (
                s["dead_letter"]["state"] == "ok"
                and s["caught_up"]
                and all(a["state"] == "ready" for a in s["aggregates"])
            )

        wait_for(
            recovered,
            "the dead letter written and the aggregates ready",
            120,
            swallow=(ClientError,),
        )
        assert client.readyz()["status"] == "ready"
        want = expected_items(before + after, defs)
        assert client.count("scores") == sum(len(items) for items in want["scores"].values())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(
                f"the consumer did not stop within 30 s of SIGTERM:\n{tail(log)}"
            ) from None
    assert proc.returncode == 0, tail(log)
    with open_store(data) as store:
        assert_store_matches(store, defs, expected_items(before + after, defs))
    got = dead_letters(kafka_bootstrap, dlq)
    assert set(got) == {bad_at}
    assert got[bad_at][:2] == (b"x", b"not an event")
    text = log.read_text()
    assert len(log_events(text, "dead-letter writes recovered; the held batch commits")) == 1, tail(
        log
    )
    assert (
        len(
            log_events(
                text,
                "dead-letter topic unwritable; holding the batch (nothing after it "
                "commits) until the write succeeds",
            )
        )
        == 1
    ), tail(log)


def test_a_dead_letter_topic_kafka_cannot_have_is_refused_at_start(tmp_path: Path) -> None:
    defs_path, _ = write_definitions(tmp_path)
    for pattern, says in (
        ("dead letters/{topic}", "which Kafka cannot have"),
        ("x" * 250, "249"),
        ("{topic}", "a topic this consumer reads"),
    ):
        args = consume_args(
            defs_path, "orders", tmp_path / "data", "127.0.0.1:1", "--dlq-topic", pattern
        )
        res = subprocess.run(
            args, capture_output=True, text=True, timeout=60, env=child_env(), check=False
        )
        assert res.returncode == 2, (pattern, res.stdout, res.stderr)
        assert says in res.stderr and "--dlq-topic" in res.stderr, (pattern, res.stderr)
