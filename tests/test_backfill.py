"""Backfill = replay (DESIGN.md): generations built by a replay stream while live serves.

Real broker, `tally consume` as a subprocess, a read-only `Store` polling the
catalog and the answers while the consumer works, and the end state checked
against the independent oracle (tests/oracle.py) computed from the topic itself.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from consumer_util import (
    TABLE,
    TALLY,
    Feeder,
    RowStream,
    child_env,
    log_events,
    native_records,
    offsets_of,
    open_store,
    run_consume,
    start_consume,
    tail,
    topic_end_offsets,
    wait_exit,
    wait_for,
)
from kafka_util import create_topic, produce, read_all, unique_topic
from oracle import (
    assert_store_matches,
    canon,
    cut,
    events_from_records,
    expected_items,
    interpret_all,
    total_items,
)

from tally.consumers import load_definitions, stored_offsets
from tally.consumers.runtime.process import ConsumerProcess
from tally.engine import AggregateNotReady, Store
from tally.schemas.config import ConsumerSettings

# ---------------------------------------------------------------- definitions

_AGGS = {
    # A: the aggregate a deployment already runs (v1), and its changed definitions.
    "A": 'A = TableAggregate("A", table="players", sort_key="score", sum_value="score")\n',
    "A_team": 'A = TableAggregate("A", table="players", sort_key=("team", "score"), sum_value="score")\n',
    "A_level": 'A = TableAggregate("A", table="players", sort_key=("level", "score"), sum_value="level")\n',
    # B: a new aggregate added to a running deployment (namespaced, filtered, tuple key).
    "B": (
        'B = TableAggregate("B", table="players", namespace="team", sort_key=("level", "score"),\n'
        '                   sum_value="level", filter=lambda row: row["active"])\n'
    ),
}


def write_defs(directory: Path, name: str, *aggs: str) -> tuple[str, list[Any]]:
    """A definitions file holding ``aggs`` (keys of _AGGS); (path, loaded definitions)."""
    path = directory / f"{name}.py"
    path.write_text("from tally.engine import TableAggregate\n\n" + "".join(_AGGS[a] for a in aggs))
    return str(path), load_definitions(str(path))


# ---------------------------------------------------------------- helpers


def deployment(
    bootstrap: str,
    tmp_path: Path,
    prefix: str,
    *aggs: str,
    events: int = 20_000,
    n_ids: int = 2000,
    seed: int = 1,
) -> tuple[str, Path, RowStream]:
    """A 3-partition topic holding ``events`` native events (with deletes) over ``n_ids``
    ids, and a store built from it by ``tally consume --until-caught-up`` with ``aggs``."""
    topic = unique_topic(prefix)
    create_topic(bootstrap, topic, partitions=3)
    stream = RowStream(seed=seed, n_ids=n_ids)
    placed = produce(bootstrap, topic, native_records(stream.take(events), seed=seed))
    assert {p for p, _ in placed} == {0, 1, 2}
    data = tmp_path / "data"
    defs_path, _ = write_defs(tmp_path, "v1", *aggs)
    run_consume(defs_path, topic, data, bootstrap)
    return topic, data, stream


def oracle(bootstrap: str, topic: str, defs: list[Any]) -> dict[str, Any]:
    """What every definition must hold after applying the whole topic."""
    want = expected_items(events_from_records(read_all(bootstrap, topic), TABLE), defs)
    assert total_items(want) > 500  # a non-trivial state: comparisons can fail
    return want


def snapshot(agg: Any) -> dict[Any, list[tuple[Any, Any, Any]]]:
    """Every item of an aggregate handle, per namespace, in canonical (type-aware) form."""
    return {
        canon(ns): [(canon(i.key), canon(i.id), i.sum_value) for i in agg.iter(namespace=ns)]
        for ns in agg.namespaces()
    }


def expected_snapshot(want: dict[Any, list[Any]]) -> dict[Any, list[tuple[Any, Any, Any]]]:
    """An oracle aggregate (``expected_items(...)[name]``) in `snapshot` form."""
    return {
        canon(ns): [(canon(i.key), canon(i.id), i.sum_value) for i in items]
        for ns, items in want.items()
    }


def small_batches(n: int) -> dict[str, Any]:
    """Keyword arguments for `start_consume`/`run_consume` (next to ``--batch-size N``) that
    cap replay batches and replay chunks (commits) at ``n`` records too
    (TALLY_REPLAY_BATCH_SIZE, TALLY_REPLAY_CHUNK)."""
    return {"env": child_env(TALLY_REPLAY_BATCH_SIZE=str(n), TALLY_REPLAY_CHUNK=str(n))}


@contextmanager
def running(proc: subprocess.Popen[bytes], *feeders: Feeder) -> Iterator[subprocess.Popen[bytes]]:
    """Never leave a consumer or a producer thread behind, whatever fails."""
    try:
        yield proc
    finally:
        for f in feeders:
            f.stop_flag.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_live_at_end(
    store: Store, bootstrap: str, topic: str, proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Until the live stream's stored offsets reach the topic's end offsets."""
    ends = topic_end_offsets(bootstrap, topic)

    def at_end() -> bool:
        assert proc.poll() is None, f"consumer exited ({proc.returncode}):\n{tail(log)}"
        store.refresh()
        return offsets_of(store, topic) == ends

    wait_for(at_end, f"live offsets to reach {ends}", timeout=60)


def sigterm(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    rc = wait_exit(proc, "tally consume did not stop within 30 s of SIGTERM", 30, log)
    assert rc == 0, f"SIGTERM: exit {rc}:\n{tail(log)}"
    assert log_events(log.read_text(), "stopped"), tail(log)


@contextmanager
def paused(proc: subprocess.Popen[bytes], pause: bool) -> Iterator[None]:
    """The consumer stopped (SIGSTOP) for the duration when ``pause``: what a reader looks
    at cannot move on while it looks, and between two looks the consumer runs only for the
    poll interval, so a reader sees a state that lasts that long however fast the machine."""
    if pause:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if pause:
            os.kill(proc.pid, signal.SIGCONT)


class PartialView:
    """A store whose aggregates read with ``partial=True`` (for `assert_store_matches`)."""

    def __init__(self, store: Store, names: list[str]) -> None:
        self.store, self.names = store, names

    def aggregate(self, name: str) -> Any:
        return self.store.aggregate(name, partial=True)

    def validate(self) -> None:
        for name in self.names:
            self.store.aggregate(name, partial=True).validate()


# ---------------------------------------------------------------- 1. new aggregate


def test_new_aggregate_is_built_by_replay_while_the_others_serve(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic, data, stream = deployment(kafka_bootstrap, tmp_path, "backfill-new", "A", seed=11)
    with open_store(data) as store:
        assert store.generation("A") is not None and store.generation("A").state == "ready"
        assert store.generation("B") is None

    v2, defs = write_defs(tmp_path, "v2", "A", "B")
    log = tmp_path / "v2.log"
    feeder = Feeder(kafka_bootstrap, topic, stream, rate=1000)
    feeder.start()
    proc = start_consume(
        v2, topic, data, kafka_bootstrap, "--batch-size", "200", log=log, **small_batches(200)
    )
    with running(proc, feeder), open_store(data) as store:
        a_counts: list[int] = []
        percents: list[float] = []
        partial_counts: list[int] = []
        not_ready = 0

        def b_ready() -> Any:
            """One look at A and B; B's generation once it is ready."""
            nonlocal not_ready
            assert proc.poll() is None, f"consumer exited ({proc.returncode}):\n{tail(log)}"
            # Until B was seen building 3 times, at 2 progress points, with items, every
            # look pauses the consumer; after that it reads beside a running writer.
            pace = not_ready < 3 or len(set(percents)) < 2 or not any(partial_counts)
            with paused(proc, pace):
                store.refresh()
                # A answers throughout: never AggregateNotReady, always its ready generation.
                ga = store.generation("A")
                assert ga is not None and ga.state == "ready" and ga.active == "A#1", ga
                a_counts.append(store.aggregate("A").count())
                g = store.generation("B")
                if g is not None and g.state == "ready":
                    return g
                if g is not None:  # the consumer has planned B: it is building
                    assert g.state == "building" and g.active is None and g.building == "B#1", g
                    with pytest.raises(AggregateNotReady) as ei:
                        store.aggregate("B").count(namespace="red")
                    not_ready += 1
                    progress = ei.value.progress
                    assert isinstance(progress, dict)
                    assert progress.get("stream") == g.progress["stream"]
                    if isinstance(progress.get("percent"), (int, float)):
                        percents.append(progress["percent"])
                    part = store.aggregate("B", partial=True)
                    partial_counts.append(sum(part.count(namespace=ns) for ns in part.namespaces()))
            return None

        g = wait_for(b_ready, lambda: f"B to become ready\n{tail(log)}", timeout=60, every=0.01)
        assert g.active == "B#1" and g.building is None, g
        assert store.aggregate("B").count(namespace="red") > 0  # reads work once ready
        feeder_sent = feeder.finish()
        assert len(feeder_sent) > 0  # live events flowed during the replay
        wait_live_at_end(store, kafka_bootstrap, topic, proc, log)
        sigterm(proc, log)

    assert not_ready >= 3, (
        f"saw B not ready only {not_ready} times; the replay was too quick to observe"
    )
    assert min(a_counts) > 0
    assert len(set(percents)) >= 2 and percents == sorted(percents) and min(percents) < 100, (
        percents
    )
    assert max(partial_counts) > 0, partial_counts
    text = log.read_text()
    (building,) = log_events(text, "building by replay")
    assert building["aggregates"] == ["B"] and building["stale"] == []
    (joined,) = log_events(text, "replay joined live; generation switched")
    assert joined["aggregates"] == ["B"] and joined["stream"] == building["stream"]

    want = oracle(kafka_bootstrap, topic, defs)
    with open_store(data) as store:
        assert_store_matches(store, defs, want)
        assert offsets_of(store, topic) == topic_end_offsets(kafka_bootstrap, topic)
        assert stored_offsets(store, building["stream"]) == {}  # the replay's offsets are gone


# ---------------------------------------------------------------- 2. changed definition


def test_changed_definition_serves_old_answers_until_the_switch_then_new(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic, data, _ = deployment(kafka_bootstrap, tmp_path, "backfill-change", "A", seed=22)
    _, v1_defs = write_defs(tmp_path, "v1", "A")
    v3, v3_defs = write_defs(tmp_path, "v3", "A_team")
    old = expected_snapshot(oracle(kafka_bootstrap, topic, v1_defs)["A"])
    want3 = oracle(kafka_bootstrap, topic, v3_defs)
    with open_store(data) as store:
        assert store.generation("A").active == "A#1"
        assert snapshot(store.aggregate("A")) == old

    log = tmp_path / "v3.log"
    proc = start_consume(
        v3,
        topic,
        data,
        kafka_bootstrap,
        "--batch-size",
        "200",
        log=log,
        **small_batches(200),
        until_caught_up=True,
    )
    stale_reads = 0
    with running(proc), open_store(data) as store:

        def switched() -> bool:
            """One look at A: True once it switched from A#1 (or the consumer exited)."""
            nonlocal stale_reads
            exited = proc.poll() is not None
            # The first two looks at the stale state pause the consumer (see `paused`).
            with paused(proc, stale_reads < 2 and not exited):
                store.refresh()
                g = store.generation("A")
                assert g is not None
                if g.active != "A#1":
                    return True
                got = snapshot(store.aggregate("A"))  # never raises with --stale serve
                assert got == old, "a stale read is not exactly the old generation's answers"
                if g.building is not None:
                    assert g.state == "stale" and g.building == "A#2", g
                    stale_reads += 1
            return exited

        wait_for(switched, lambda: f"A to switch\n{tail(log)}", timeout=60, every=0.01)
        rc = wait_exit(proc, "tally consume --until-caught-up did not exit", 60, log)
        assert rc == 0, tail(log)
    assert stale_reads >= 2, f"saw the stale state only {stale_reads} times"
    (building,) = log_events(log.read_text(), "building by replay")
    assert building["aggregates"] == ["A"] and building["stale"] == ["A"]

    with open_store(data) as store:
        g = store.generation("A")
        assert g.state == "ready" and g.active == "A#2", g
        assert_store_matches(store, v3_defs, want3)
        first = store.aggregate("A").at(0)
        assert isinstance(first.key, (tuple, list)) and len(first.key) == 2  # the new sort key
        gone = store.aggregate("A#1")
        assert gone.count() == 0 and gone.namespaces() == []  # the old generation is dropped

    # --stale drop: the old generation stops answering at once.
    v4, v4_defs = write_defs(tmp_path, "v4", "A_level")
    want4 = oracle(kafka_bootstrap, topic, v4_defs)
    log4 = tmp_path / "v4.log"
    proc = start_consume(
        v4,
        topic,
        data,
        kafka_bootstrap,
        "--batch-size",
        "200",
        "--stale",
        "drop",
        log=log4,
        **small_batches(200),
        until_caught_up=True,
    )
    dropped_reads = 0
    with running(proc), open_store(data) as store:

        def ready_again() -> bool:
            """One look at A: True once A#3 is active."""
            nonlocal dropped_reads
            exited = proc.poll() is not None
            with paused(proc, dropped_reads < 2 and not exited):
                store.refresh()
                g = store.generation("A")
                if g.active == "A#3":
                    return True
                assert not exited, f"exited before A#3 was active ({g}):\n{tail(log4)}"
                if g.building is not None:
                    assert g.active is None and g.state == "building", g  # not served stale
                    with pytest.raises(AggregateNotReady):
                        store.aggregate("A").count()
                    dropped_reads += 1
                else:  # not planned yet: the previous generation still answers
                    assert g.active == "A#2" and store.aggregate("A").count() > 0
            return False

        wait_for(
            ready_again, lambda: f"A to become ready again\n{tail(log4)}", timeout=60, every=0.01
        )
        rc = wait_exit(proc, "tally consume --until-caught-up did not exit", 60, log4)
        assert rc == 0, tail(log4)
    assert dropped_reads >= 2, f"saw A not ready only {dropped_reads} times"
    with open_store(data) as store:
        assert store.generation("A").state == "ready"
        assert_store_matches(store, v4_defs, want4)
        assert store.aggregate("A#2").count() == 0


# ---------------------------------------------------------------- 3. SIGKILL mid-replay


def test_sigkill_during_replay_resumes_from_the_replay_offsets(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic, data, _ = deployment(
        kafka_bootstrap, tmp_path, "backfill-kill", "A", events=40_000, n_ids=4000, seed=33
    )
    v2, defs = write_defs(tmp_path, "v2", "A", "B")
    records = read_all(kafka_bootstrap, topic)
    parsed = interpret_all(records, TABLE)
    ends = topic_end_offsets(kafka_bootstrap, topic)
    total = sum(ends.values())
    assert total == 40_000
    want = expected_items(cut(parsed, None), defs)
    seed = int(os.environ.get("TALLY_CRASH_SEED") or int.from_bytes(os.urandom(4), "big"))
    rng = random.Random(seed)
    note = f"(TALLY_CRASH_SEED={seed})"
    kills = rng.randint(3, 5)
    # Kill points as fractions of the whole replay, spread so each run does some work.
    targets = sorted(rng.uniform(0.05, 0.8) for _ in range(kills))

    stream_key: str | None = None
    previous = 0
    for i, target in enumerate(targets):
        log = tmp_path / f"kill-{i}.log"
        proc = start_consume(
            v2, topic, data, kafka_bootstrap, "--batch-size", "25", log=log, **small_batches(25)
        )
        with running(proc), open_store(data) as store:

            def far_enough(
                proc: subprocess.Popen[bytes] = proc,
                store: Store = store,
                log: Path = log,
                previous: int = previous,
                target: float = target,
            ) -> bool:
                assert proc.poll() is None, (
                    f"consumer exited ({proc.returncode}) {note}:\n{tail(log)}"
                )
                store.refresh()
                g = store.generation("B")
                if g is None or not isinstance(g.progress.get("stream"), str):
                    return False
                done = sum(stored_offsets(store, g.progress["stream"]).values())
                return done > previous and done >= target * total

            # Step the consumer in short slices (SIGSTOP/SIGCONT) so the kill lands mid-replay
            # however fast the machine is: a reader poll cannot lag behind a running replay.
            def stopped_far_enough(far_enough: Any = far_enough, pid: int = proc.pid) -> bool:
                os.kill(pid, signal.SIGSTOP)
                if far_enough():
                    return True  # left stopped: the kill lands here
                os.kill(pid, signal.SIGCONT)
                return False

            def passed(log: Path = log, target: float = target) -> str:
                return f"the replay to pass {target:.0%} {note}\n{tail(log)}"

            wait_for(
                stopped_far_enough,
                passed,
                timeout=60,
                every=0.01,
            )
            proc.kill()  # SIGKILL: no cleanup, no final commit
            proc.wait()
        what = f"kill {i} at {target:.0%} {note}"
        with open_store(data) as store:
            g = store.generation("B")
            assert g is not None and g.active is None and g.building == "B#1", (what, g)
            key = g.progress["stream"]
            stream_key = stream_key or key
            assert key == stream_key, (
                f"{what}: a new replay stream {key!r} instead of resuming {stream_key!r}"
            )
            at = stored_offsets(store, key)
            done = sum(at.values())
            assert previous < done < total, (what, at, ends)
            assert all(0 <= at[tp] <= ends[tp.partition] for tp in at), (what, at, ends)
            part = {tp.partition: off for tp, off in at.items() if tp.topic == topic}
            # The half-built generation holds exactly the records below the replay's offsets.
            assert_store_matches(
                PartialView(store, ["B"]),
                [d for d in defs if d.name == "B"],
                expected_items(cut(parsed, part), defs),
            )
            with pytest.raises(AggregateNotReady):
                store.aggregate("B").count()
            assert_store_matches(store, [d for d in defs if d.name == "A"], want)  # A untouched
            previous = done

    res = run_consume(v2, topic, data, kafka_bootstrap, "--batch-size", "100", **small_batches(100))
    (building,) = log_events(res.stderr, "building by replay")
    assert building["stream"] == stream_key and building["aggregates"] == ["B"]
    (caught_up,) = log_events(res.stderr, "caught up")
    # It resumed where the last kill left it: only the rest was replayed.
    assert caught_up["replayed"] == total - previous < total, (caught_up, previous, total)
    with open_store(data) as store:
        assert store.generation("B").active == "B#1" and store.generation("B").state == "ready"
        assert_store_matches(store, defs, want)
        assert offsets_of(store, topic) == ends
        assert stream_key is not None
        assert stored_offsets(store, stream_key) == {}


def test_replay_progress_does_not_go_back_after_a_restart(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("backfill-progress")
    create_topic(kafka_bootstrap, topic, partitions=3)
    produce(
        kafka_bootstrap, topic, native_records(RowStream(seed=77, n_ids=2000).take(20_000), seed=77)
    )
    defs_path, _ = write_defs(tmp_path, "v1", "A")
    data = tmp_path / "data"
    seen: list[dict[str, Any]] = []  # the second run's progress
    killed_at = 0
    for run in range(2):
        log = tmp_path / f"run-{run}.log"
        proc = start_consume(
            defs_path,
            topic,
            data,
            kafka_bootstrap,
            "--batch-size",
            "25",
            log=log,
            # Progress lines every 10 ms too, so a fast second run still shows its progress.
            env=child_env(
                TALLY_REPLAY_BATCH_SIZE="25",
                TALLY_REPLAY_CHUNK="25",
                TALLY_PROGRESS_INTERVAL="0.01",
            ),
        )
        with running(proc):

            def consuming(log: Path = log) -> bool:
                return bool(log_events(log.read_text(), "consuming"))

            wait_for(consuming, "the consumer to start")
            with open_store(data) as store:

                def look(
                    proc: subprocess.Popen[bytes] = proc,
                    store: Store = store,
                    log: Path = log,
                    run: int = run,
                ) -> bool:
                    """One look at A's progress: True to stop looking. The first run is
                    stepped (the kill lands where we look); the second is paused while we
                    look until it showed progress (so a fast run cannot finish unseen)."""
                    assert proc.poll() is None, tail(log)
                    pause = run == 0 or not seen
                    if pause:
                        os.kill(proc.pid, signal.SIGSTOP)
                    store.refresh()
                    g = store.generation("A")
                    if g is not None and g.state == "ready":
                        stop = True
                    elif g is not None and "percent" in g.progress:
                        if run == 1:
                            seen.append(dict(g.progress))
                        elif g.progress["percent"] >= 60:
                            return True  # left stopped: SIGKILL (leaving `running`), mid-replay
                        stop = False
                    else:
                        stop = False
                    if pause:
                        os.kill(proc.pid, signal.SIGCONT)
                    return stop

                def replay_of_run(log: Path = log, run: int = run) -> str:
                    return f"the replay of run {run}\n{tail(log)}"

                wait_for(
                    look,
                    replay_of_run,
                    timeout=60,
                    every=0.01,
                )
        if run == 1:
            for line in log_events(log.read_text(), "progress"):
                seen.extend(p for p in (line.get("replays") or {}).values() if "percent" in p)
        if run == 0:
            with open_store(data) as store:
                stream = store.generation("A").progress["stream"]
                killed_at = sum(stored_offsets(store, stream).values())
            assert 12_000 <= killed_at < 20_000
    # At least 12000 of 20000 were replayed before the kill: a count of this run's
    # share alone (at most 8000) cannot pass.
    assert seen, "the second run finished before its progress could be read"
    assert all(p["replayed"] >= killed_at and p["total"] == 20_000 for p in seen), (
        killed_at,
        seen[-3:],
    )


# ---------------------------------------------------------------- 4. rebuild


def test_rebuild_while_live_events_flow_serves_stale_then_switches(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic, data, stream = deployment(
        kafka_bootstrap, tmp_path, "backfill-rebuild", "A", "B", seed=44
    )
    v2 = str(tmp_path / "v1.py")  # A and B
    defs = load_definitions(v2)
    with open_store(data) as store:
        before = store.generation("A")
        assert before.active == "A#1" and before.state == "ready"
        b_active = store.generation("B").active

    res = subprocess.run(
        [TALLY, "rebuild", "A", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "rebuild of 'A' requested" in res.stdout
    bad = subprocess.run(
        [TALLY, "rebuild", "nope", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "no aggregate named 'nope'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    with open_store(data) as store:
        g = store.generation("A")
        assert g.rebuild_requested and g.active == "A#1" and g.state == "ready", g

    log = tmp_path / "rebuild.log"
    feeder = Feeder(kafka_bootstrap, topic, stream, rate=1000)
    feeder.start()
    proc = start_consume(
        v2, topic, data, kafka_bootstrap, "--batch-size", "200", log=log, **small_batches(200)
    )
    stale_reads = 0
    with running(proc, feeder), open_store(data) as store:

        def switched() -> Any:
            """One look at A and B; A's generation once it switched from A#1."""
            nonlocal stale_reads
            assert proc.poll() is None, f"consumer exited ({proc.returncode}):\n{tail(log)}"
            with paused(proc, stale_reads < 2):  # see `paused`
                store.refresh()
                g = store.generation("A")
                assert store.aggregate("A").count() > 0  # answers throughout, never raises
                assert store.aggregate("B").count(namespace="red") > 0  # B serves live meanwhile
                if g.active != "A#1":
                    return g
                if g.building is not None:
                    assert g.state == "stale" and g.building == "A#2" and not g.rebuild_requested, g
                    stale_reads += 1
            return None

        g = wait_for(switched, lambda: f"A to switch\n{tail(log)}", timeout=60, every=0.01)
        assert g.active == "A#2" and g.state == "ready", g  # a fresh generation number
        sent = feeder.finish()
        assert len(sent) > 0
        wait_live_at_end(store, kafka_bootstrap, topic, proc, log)
        sigterm(proc, log)
    assert stale_reads >= 2, f"saw A stale only {stale_reads} times"
    (started,) = log_events(log.read_text(), "building by replay")
    assert started["aggregates"] == ["A"] and started["stale"] == ["A"]

    want = oracle(kafka_bootstrap, topic, defs)
    with open_store(data) as store:
        assert_store_matches(store, defs, want)
        assert store.aggregate("A#1").count() == 0
        assert store.generation("B").active == b_active  # B was not rebuilt
        assert offsets_of(store, topic) == topic_end_offsets(kafka_bootstrap, topic)


# ---------------------------------------------------------------- 5. honest history


async def _delete_records(bootstrap: str, topic: str, partition: int, before: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_records(
            {TopicPartition(topic, partition): RecordsToDelete(before)}, timeout_ms=30_000
        )
    finally:
        await admin.close()


def _history(bootstrap: str, tmp_path: Path, name: str, topic: str) -> list[str]:
    """Build A from ``topic`` in a fresh store (a replay); the "history" warnings logged."""
    defs_path, _ = write_defs(tmp_path, f"defs_{name}", "A")
    res = run_consume(defs_path, topic, tmp_path / f"data-{name}", bootstrap)
    return [d["message"] for d in log_events(res.stderr, "history") if d.get("level") == "warning"]


def test_history_warnings_name_the_topic_the_partition_and_the_fix(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    rows = native_records(RowStream(seed=55, n_ids=100).take(300), seed=55)

    plain = unique_topic("backfill-hist-delete")
    create_topic(kafka_bootstrap, plain, partitions=1)  # cleanup.policy=delete, the default
    produce(kafka_bootstrap, plain, rows)
    (msg,) = _history(kafka_bootstrap, tmp_path, "plain", plain)
    assert repr(plain) in msg and "cleanup.policy=delete" in msg
    assert "cleanup.policy=compact" in msg and "reconcile" in msg  # the fix
    # ... and its catch: compaction is no place for truncates (Debezium's task fails on one)
    assert "retention.ms=-1" in msg and "TRUNCATE" in msg and "compacted topic" in msg

    compacted = unique_topic("backfill-hist-compact")
    create_topic(kafka_bootstrap, compacted, partitions=1, compacted=True)
    produce(kafka_bootstrap, compacted, rows)
    assert _history(kafka_bootstrap, tmp_path, "compacted", compacted) == []

    truncated = unique_topic("backfill-hist-truncated")
    # retention.ms=-1 keeps every event: the only thing wrong is the deleted beginning
    create_topic(kafka_bootstrap, truncated, partitions=2, configs={"retention.ms": "-1"})
    produce(kafka_bootstrap, truncated, rows, partition=0)
    produce(kafka_bootstrap, truncated, rows[:50], partition=1)
    asyncio.run(_delete_records(kafka_bootstrap, truncated, 0, 120))
    (msg,) = _history(kafka_bootstrap, tmp_path, "truncated", truncated)
    assert repr(truncated) in msg and "partition 0 starts at offset 120" in msg
    assert "cleanup.policy=compact" in msg and "reconcile" in msg
    assert "partition 1" not in msg

    # The same warnings are on the process object (what /status reports).
    defs_path, defs = write_defs(tmp_path, "defs_inproc", "A")
    for topic, expect in ((truncated, "partition 0 starts at offset 120"), (compacted, None)):
        settings = ConsumerSettings(
            definitions=defs_path,
            bootstrap_servers=kafka_bootstrap,
            data_dir=str(tmp_path / f"inproc-{topic}"),
            topics={TABLE: topic},
            http=None,
        )
        store = Store.open(settings.data_dir)
        try:
            proc = ConsumerProcess(settings, defs, store)
            assert asyncio.run(proc.run(until_caught_up=True, install_signals=False)) == 0
        finally:
            store.close()
        if expect is None:
            assert proc.warnings == []
        else:
            assert len(proc.warnings) == 1 and expect in proc.warnings[0]


# ---------------------------------------------------------------- 6. replay equivalence


def test_rebuild_gives_exactly_the_same_items_duplicates_included(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic, data, _ = deployment(kafka_bootstrap, tmp_path, "backfill-same", "A", "B", seed=66)
    v2 = str(tmp_path / "v1.py")
    defs = load_definitions(v2)
    with open_store(data) as store:
        first = {d.name: snapshot(store.aggregate(d.name)) for d in defs}
    # Duplicates, as a producer retrying after a timeout sends them: per partition its
    # last 700 records again, in order (every id's last row image stays its last).
    records = read_all(kafka_bootstrap, topic)
    for p in range(3):
        dupes = [(k, v) for part, _, k, v, _h in records if part == p][-700:]
        produce(kafka_bootstrap, topic, dupes, partition=p)
    run_consume(v2, topic, data, kafka_bootstrap)

    want = oracle(kafka_bootstrap, topic, defs)
    with open_store(data) as store:
        assert_store_matches(store, defs, want)  # duplicates were harmless
        before = {d.name: snapshot(store.aggregate(d.name)) for d in defs}
        gens = {d.name: store.generation(d.name).active for d in defs}
    assert before == first  # the duplicates changed nothing
    assert before == {d.name: expected_snapshot(want[d.name]) for d in defs}

    for name in ("A", "B"):
        res = subprocess.run(
            [TALLY, "rebuild", name, "--data-dir", str(data)],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
            check=False,
        )
        assert res.returncode == 0, res.stderr
    res = run_consume(v2, topic, data, kafka_bootstrap)
    (caught_up,) = log_events(res.stderr, "caught up")
    assert caught_up["replayed"] == sum(topic_end_offsets(kafka_bootstrap, topic).values())
    with open_store(data) as store:
        after = {d.name: snapshot(store.aggregate(d.name)) for d in defs}
        for d in defs:
            g = store.generation(d.name)
            assert g.state == "ready" and g.active != gens[d.name], g
            assert store.aggregate(gens[d.name]).count() == 0
        assert_store_matches(store, defs, want)
    for name in before:
        assert after[name] == before[name], f"rebuilding {name} changed its items"


# ---------------------------------------------------------------- 7. rebuild over HTTP


def test_rebuild_over_http_needs_the_token_and_switches_generation(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    import json
    import socket

    from tally.consumers.client import ClientError, TallyClient

    topic = unique_topic("backfill-http-rebuild")
    create_topic(kafka_bootstrap, topic, partitions=2)
    rows = [
        {"id": i, "player": f"p{i}", "game": "g", "score": (i * 37) % 1000} for i in range(2000)
    ]
    produce(
        kafka_bootstrap,
        topic,
        [
            (
                json.dumps(r["id"]).encode(),
                json.dumps({"table": "scores", "op": "insert", "id": r["id"], "after": r}).encode(),
            )
            for r in rows
        ],
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path / "data"
    log = tmp_path / "consume.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [
                TALLY,
                "consume",
                "consumers/demo/leaderboard.py",
                "--topic",
                f"scores={topic}",
                "--data-dir",
                str(data),
                "--http",
                f"127.0.0.1:{port}",
                "--token",
                "sekret",
                "--log-format",
                "json",
                "--bootstrap-servers",
                kafka_bootstrap,
            ],
            stderr=err,
            cwd=Path(__file__).resolve().parents[1],
        )
    try:
        url = f"http://127.0.0.1:{port}"

        def states() -> dict[str, str]:
            try:
                return {a["name"]: a["state"] for a in TallyClient(url).status()["aggregates"]}
            except ClientError:
                return {}

        wait_for(lambda: set(states().values()) == {"ready"}, "the consumer to be ready")
        assert TallyClient(url).count("leaderboard") == len(rows)
        with pytest.raises(ClientError) as e:
            TallyClient(url).rebuild("leaderboard")
        assert e.value.status == 401
        with pytest.raises(ClientError) as e:
            TallyClient(url, token="wrong").rebuild("leaderboard")
        assert e.value.status == 401
        assert (
            TallyClient(url, token="sekret").rebuild("leaderboard")["status"] == "rebuild requested"
        )

        def switched() -> bool:
            with open_store(data) as store:
                g = store.generation("leaderboard")
                return g is not None and g.active == "leaderboard#2" and g.building is None

        wait_for(switched, "the rebuilt generation to switch in")
        assert TallyClient(url).count("leaderboard") == len(rows)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, "tally consume did not stop within 30 s of SIGTERM", 30, log) == 0, (
            tail(log)
        )
    with open_store(data) as store:
        assert store.generation("leaderboard").active == "leaderboard#2"
        assert store.aggregate("leaderboard#1").count() == 0


# ---------------------------------------------------------------- 8. dead letters of a replay


def test_replay_dead_letters_rows_its_new_definition_cannot_apply(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Live never planned a new aggregate, so the replay must report the rows it cannot apply."""
    from consumer_util import dlq_records

    from tally.schemas import BadRecord, EventDecoder

    topic, data, _ = deployment(
        kafka_bootstrap, tmp_path, "backfill-dlq", "A", events=3000, n_ids=300
    )
    assert dlq_records(kafka_bootstrap, topic) == []  # A applies every row
    path = tmp_path / "v2.py"
    path.write_text(
        "from tally.engine import TableAggregate\n\n"
        + _AGGS["A"]
        + 'C = TableAggregate("C", table="players", sort_key=lambda r: 1 // (r["level"] - 3))\n'
    )
    run_consume(str(path), topic, data, kafka_bootstrap)
    dec = EventDecoder(topic_tables={topic: TABLE})
    failing = set()
    for p, off, key, value, _h in read_all(kafka_bootstrap, topic):
        try:
            ev = dec.decode(key, value, topic)
        except BadRecord:
            continue
        if ev.kind == "upsert" and ev.row is not None and ev.row["level"] == 3:
            failing.add((p, off))
    assert len(failing) > 50
    dead = dlq_records(kafka_bootstrap, topic)
    got = {
        (int(h["tally.source.partition"]), int(h["tally.source.offset"]))
        for h in ({k: v.decode() for k, v in r[4]} for r in dead)
    }
    assert got == failing and len(dead) == len(failing)
    for r in dead:
        error = dict(r[4])["tally.error"].decode()
        assert "aggregate 'C'" in error and "ZeroDivisionError" in error, error
