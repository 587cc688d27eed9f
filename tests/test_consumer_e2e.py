"""`tally consume` end to end: real broker, the CLI as a subprocess, state checked
against an independent oracle (tests/oracle.py)."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from typing import Any

from consumer_util import (
    TABLE,
    Feeder,
    RowStream,
    debezium_records,
    dlq_records,
    id_key,
    log_events,
    native_records,
    offsets_of,
    open_store,
    position,
    random_row,
    run_consume,
    start_consume,
    tail,
    topic_end_offsets,
    wait_exit,
    wait_for,
    write_definitions,
)
from kafka_util import create_topic, produce, read_all, unique_topic
from oracle import Event, assert_store_matches, events_from_records, expected_items, total_items


def _end_offsets_of(
    placed: list[tuple[int, int]], before: dict[int, int] | None = None
) -> dict[int, int]:
    ends = dict(before or {})
    for p, o in placed:
        ends[p] = max(ends.get(p, 0), o + 1)
    return ends


def test_native_stream_three_partitions_then_resume(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique_topic("e2e-native")
    create_topic(kafka_bootstrap, topic, partitions=3)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"

    stream = RowStream(seed=101, n_ids=300)
    first = stream.take(2500)
    placed = produce(kafka_bootstrap, topic, native_records(first, seed=1))
    assert {p for p, _ in placed} == {0, 1, 2}
    res = run_consume(defs_path, topic, data, kafka_bootstrap)
    # A fresh store builds every aggregate by replay, then switches it live.
    assert log_events(res.stderr, "building by replay")
    assert log_events(res.stderr, "replay joined live; generation switched")
    (caught_up,) = log_events(res.stderr, "caught up")
    assert caught_up["events"] + caught_up["replayed"] == len(first)

    want = expected_items(first, defs)
    assert total_items(want) > 300  # a non-trivial state: the comparison can fail
    assert len(want["by_team"]) >= 4 and len(want["by_tag"]) == 3
    ends = topic_end_offsets(kafka_bootstrap, topic)
    with open_store(data) as store:
        assert_store_matches(store, defs, want)
        assert offsets_of(store, topic) == ends == _end_offsets_of(placed)

    # More events: the second run resumes from the stored offsets.
    second = stream.take(1500)
    placed2 = produce(kafka_bootstrap, topic, native_records(second, seed=2))
    res = run_consume(defs_path, topic, data, kafka_bootstrap)
    (consuming,) = log_events(res.stderr, "consuming")
    assert consuming["stream"] == "live" and consuming["partitions"] == 3
    assert not log_events(res.stderr, "building by replay")  # same definitions: no rebuild
    (caught_up,) = log_events(res.stderr, "caught up")
    # read only the new records, none twice
    assert (caught_up["events"], caught_up["replayed"]) == (len(second), 0)
    ends2 = topic_end_offsets(kafka_bootstrap, topic)
    assert ends2 == _end_offsets_of(placed2, ends)
    with open_store(data) as store:
        assert_store_matches(store, defs, expected_items(first + second, defs))
        assert offsets_of(store, topic) == ends2
    assert dlq_records(kafka_bootstrap, topic) == []

    # A new store over the same topic (one replay of everything, in big batches)
    # ends in the same state: a backfill is a replay.
    fresh = tmp_path / "fresh"
    run_consume(defs_path, topic, fresh, kafka_bootstrap)
    with open_store(fresh) as store:
        assert_store_matches(store, defs, expected_items(first + second, defs))
        assert offsets_of(store, topic) == ends2


def test_debezium_stream_with_tombstones_truncate_and_unwrapped_rows(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("e2e-debezium")
    create_topic(kafka_bootstrap, topic, partitions=3)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"

    stream = RowStream(seed=202, n_ids=300)
    snapshot = [Event("upsert", TABLE, i, random_row(stream.rng, i)) for i in range(0, 300, 2)]
    stream.live.update(range(0, 300, 2))
    changes = stream.take(2000)
    records = debezium_records(snapshot, seed=3, snapshot=True) + debezium_records(
        changes, seed=4, first_lsn=10_000 + 8 * len(snapshot)
    )
    # a logical decoding message: belongs to no row, changes nothing
    message = {
        "op": "m",
        "ts_ms": 1,
        "source": {"table": "", "lsn": 5},
        "message": {"prefix": "audit", "content": "aGk="},
    }
    records.append((None, json.dumps(message).encode()))
    assert sum(v is None for _k, v in records) > 50  # tombstones are in the mix
    produce(kafka_bootstrap, topic, records)
    run_consume(defs_path, topic, data, kafka_bootstrap, "--format", "debezium")
    phase1 = snapshot + changes
    want = expected_items(phase1, defs)
    assert total_items(want) > 300
    with open_store(data) as store:
        assert_store_matches(store, defs, want)

    # A truncate, then more changes, all on partition 0 so their order is defined;
    # the earlier records of partitions 1 and 2 were applied before it.
    truncate = Event("truncate", TABLE, None, None)
    stream.live.clear()
    after = stream.take(400)
    records2 = debezium_records(
        [truncate, *after], seed=5, first_lsn=10_000 + 8 * (len(snapshot) + len(changes))
    )
    assert records2[0][0] is None and b'"op":"t"' in (records2[0][1] or b"")
    produce(kafka_bootstrap, topic, records2, partition=0)
    run_consume(defs_path, topic, data, kafka_bootstrap)  # auto-detected format this time
    want2 = expected_items([*phase1, truncate, *after], defs)
    assert want2 != expected_items([*phase1, *after], defs)  # the truncate matters
    with open_store(data) as store:
        assert_store_matches(store, defs, want2)
        assert offsets_of(store, topic) == topic_end_offsets(kafka_bootstrap, topic)
    assert dlq_records(kafka_bootstrap, topic) == []  # every shape was understood


def test_redelivered_and_duplicated_events_change_nothing(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("e2e-redelivery")
    create_topic(kafka_bootstrap, topic, partitions=3)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"

    events = RowStream(seed=303, n_ids=300).take(2000)
    want = expected_items(events, defs)
    assert total_items(want) > 300
    # Duplicates interleaved: some events delivered again later, but before the
    # next event of the same id (how a retrying producer or a replay redelivers).
    rng = random.Random(7)
    next_of_id: dict[Any, int] = {}
    next_index = [len(events)] * len(events)
    for i in range(len(events) - 1, -1, -1):
        next_index[i] = next_of_id.get(events[i].id, len(events))
        next_of_id[events[i].id] = i
    slots: list[list[Event]] = [[e] for e in events]
    dups = 0
    for i, ev in enumerate(events):
        if rng.random() < 0.3:
            j = rng.randrange(i, next_index[i])  # re-sent after slot j, before the id's next event
            slots[j].append(ev)
            dups += 1
    with_dups = [e for slot in slots for e in slot]
    assert len(with_dups) == len(events) + dups and dups > 400
    assert expected_items(with_dups, defs) == want
    records = native_records(with_dups, seed=8)
    produce(kafka_bootstrap, topic, records)
    run_consume(defs_path, topic, data, kafka_bootstrap)
    with open_store(data) as store:
        assert_store_matches(store, defs, want)

    # The whole stream delivered again after it was consumed (a producer replay):
    # intermediate states come back, the final one is the same.
    produce(kafka_bootstrap, topic, native_records(with_dups, seed=9))
    res = run_consume(defs_path, topic, data, kafka_bootstrap)
    (caught_up,) = log_events(res.stderr, "caught up")
    assert caught_up["events"] == len(with_dups)
    with open_store(data) as store:
        assert_store_matches(store, defs, want)
        assert offsets_of(store, topic) == topic_end_offsets(kafka_bootstrap, topic)


def _bad_records() -> list[tuple[str, bytes | None, bytes | None]]:
    """(expected reason, key, value) of records that cannot apply."""
    row = {
        "id": 9001,
        "team": "red",
        "score": 5,
        "level": 1,
        "name": "x",
        "active": True,
        "weight": 1.0,
        "tag": "t",
    }
    j = json.dumps
    return [
        ("decode", b"9001", b'{"table": "players", "op": "insert", "id": 9001, "after": {'),
        ("decode", b"9002", b"\xc1\xc1 not msgpack"),
        (
            "decode",
            b"9003",
            j({"table": "players", "op": "insert", "id": 9003, "after": [1, 2]}).encode(),
        ),
        (
            "decode",
            b'{"id": 9004}',
            j({"op": "c", "after": [1], "source": {"table": "players"}}).encode(),
        ),
        ("decode", b"9005", b"[1, 2, 3]"),
        (
            "unsupported-op",
            b"9006",
            j({"table": "players", "op": "upsert", "id": 9006, "after": row}).encode(),
        ),
        ("missing-after", b"9007", j({"table": "players", "op": "insert", "id": 9007}).encode()),
        (
            "missing-id",
            None,
            j(
                {
                    "table": "players",
                    "op": "insert",
                    "after": {k: v for k, v in row.items() if k != "id"},
                }
            ).encode(),
        ),
        ("missing-id", b"", None),  # a tombstone with an empty key
        (
            "missing-id",
            b"null",
            j({"op": "d", "before": None, "source": {"table": "players"}}).encode(),
        ),
        (
            "unknown-table",
            b"9010",
            j({"table": "nope", "op": "insert", "id": 9010, "after": row}).encode(),
        ),
        (
            "unknown-table",
            b'{"id": 9011}',
            j({"op": "c", "after": row, "source": {"table": "other"}}).encode(),
        ),
        # the user's functions: a sort key that is a dict, a missing field, a tag dict
        (
            "apply",
            b"9012",
            j(
                {
                    "table": "players",
                    "op": "insert",
                    "id": 9012,
                    "after": dict(row, id=9012, score={"x": 1}),
                }
            ).encode(),
        ),
        (
            "apply",
            b"9013",
            j(
                {
                    "table": "players",
                    "op": "insert",
                    "id": 9013,
                    "after": {k: v for k, v in row.items() if k != "team"},
                }
            ).encode(),
        ),
        (
            "apply",
            b"9014",
            j(
                {
                    "table": "players",
                    "op": "update",
                    "id": 9014,
                    "after": dict(row, id=9014, tag={"nested": [1]}),
                }
            ).encode(),
        ),
    ]


def test_bad_records_go_to_the_dead_letter_topic_once(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique_topic("e2e-bad")
    create_topic(kafka_bootstrap, topic, partitions=3)
    create_topic(kafka_bootstrap, f"{topic}.dlq", partitions=1)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"

    stream = RowStream(seed=404, n_ids=300)
    valid = stream.take(1500)
    # A bad update of a live id must leave its previous row in place.
    live_id = next(iter(sorted(stream.live)))
    bad = _bad_records()
    bad.append(
        (
            "apply",
            id_key(live_id),
            json.dumps(
                {
                    "table": "players",
                    "op": "update",
                    "id": live_id,
                    "after": dict(random_row(random.Random(1), live_id), tag={"k": "v"}),
                }
            ).encode(),
        )
    )
    valid_records = native_records(valid, seed=10)
    # Mix: valid records in order, each bad one at a random place.
    rng = random.Random(11)
    mixed: list[tuple[str | None, bytes | None, bytes | None]] = [
        (None, k, v) for k, v in valid_records
    ]
    for reason, k, v in bad:
        mixed.insert(rng.randrange(len(mixed) + 1), (reason, k, v))
    placed = produce(kafka_bootstrap, topic, [(k, v) for _r, k, v in mixed])
    expected_dlq = {(p, o): (r, k, v) for (r, k, v), (p, o) in zip(mixed, placed, strict=True) if r}
    assert len(expected_dlq) == len(bad)

    res = run_consume(defs_path, topic, data, kafka_bootstrap)
    (caught_up,) = log_events(res.stderr, "caught up")
    assert caught_up["dead_letters"] == len(bad)
    want = expected_items(valid, defs)
    with open_store(data) as store:
        assert_store_matches(store, defs, want)
        assert offsets_of(store, topic) == topic_end_offsets(kafka_bootstrap, topic)

    def check_dlq() -> None:
        got = dlq_records(kafka_bootstrap, topic)
        seen: dict[tuple[int, int], Any] = {}
        for _p, _o, k, v, headers in got:
            h = dict(headers)
            assert set(h) >= {
                "tally.reason",
                "tally.error",
                "tally.source.topic",
                "tally.source.partition",
                "tally.source.offset",
            }
            src = (int(h["tally.source.partition"]), int(h["tally.source.offset"]))
            assert src not in seen, f"dead-lettered twice: {src}"
            seen[src] = (h["tally.reason"].decode(), k, v, h)
        assert set(seen) == set(expected_dlq), (sorted(seen), sorted(expected_dlq))
        for src, (reason, k, v) in expected_dlq.items():
            got_reason, got_k, got_v, h = seen[src]
            assert h["tally.source.topic"] == topic.encode()
            # A null value is written as an empty one, its size header saying null.
            want_v = b"" if v is None else v
            assert (got_reason, got_k, got_v) == (reason, k, want_v), (src, h["tally.error"])
            assert h["tally.source.value.size"] == (b"null" if v is None else str(len(v)).encode())
            assert "tally.truncated" not in h, src
            assert h["tally.error"].strip(), src

    check_dlq()
    # Nothing is dead-lettered again by a later run.
    more = stream.take(300)
    produce(kafka_bootstrap, topic, native_records(more, seed=12))
    run_consume(defs_path, topic, data, kafka_bootstrap)
    check_dlq()
    with open_store(data) as store:
        assert_store_matches(store, defs, expected_items(valid + more, defs))


def test_sigterm_stops_promptly_and_a_restart_is_exact(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("e2e-sigterm")
    create_topic(kafka_bootstrap, topic, partitions=3)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"
    log = tmp_path / "consume.log"

    feeder = Feeder(kafka_bootstrap, topic, RowStream(seed=505, n_ids=300))
    feeder.start()
    proc = start_consume(defs_path, topic, data, kafka_bootstrap, "--batch-size", "200", log=log)

    def committed() -> int:
        """Events the consumer has committed so far (0 until its store is open)."""
        assert proc.poll() is None, f"consumer exited early (rc {proc.returncode}):\n{tail(log)}"
        # "consuming" is logged once the store is open (a reader racing the
        # writer's very first open can miss its column families)
        if not log_events(log.read_text(), "consuming"):
            return 0
        with open_store(data) as store:
            return sum(position(store, topic, defs).offsets.values())

    try:
        # Wait until it is really consuming while events keep coming: something committed,
        # then a later commit once over 1000 events were sent (so the SIGTERM lands
        # mid-stream, not on an idle consumer).
        first = wait_for(
            lambda: (n := committed()) > 500 and n,
            lambda: f"the consumer to commit 500 events\n{tail(log)}",
            timeout=30,
            every=0.2,
        )
        wait_for(
            lambda: len(feeder.sent) > 1000 and committed() > first,
            lambda: (
                f"the consumer to commit more than {first} events "
                f"({len(feeder.sent)} sent)\n{tail(log)}"
            ),
            timeout=30,
        )
        proc.send_signal(signal.SIGTERM)
        rc = wait_exit(proc, "tally consume did not stop within 10 s of SIGTERM", 10, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sent = feeder.finish()
    text = log.read_text()
    assert rc == 0, text
    assert log_events(text, "stopping") and log_events(text, "stopped"), text
    assert len(sent) > 1000
    with open_store(data) as store:
        # the state at the stop is exactly the records below the stored offsets
        # (of the replay building the aggregates, or of the live stream)
        _stream, stopped_at, building = position(store, topic, defs)
        assert sum(stopped_at.values()) > 500
        assert_store_matches(
            store,
            defs,
            expected_items(
                events_from_records(read_all(kafka_bootstrap, topic), TABLE, stopped_at), defs
            ),
            partial=building,
        )
    ends = topic_end_offsets(kafka_bootstrap, topic)
    assert sum(stopped_at.values()) <= sum(ends.values())

    run_consume(defs_path, topic, data, kafka_bootstrap)
    with open_store(data) as store:
        assert_store_matches(store, defs, expected_items(sent, defs))
        assert offsets_of(store, topic) == ends
