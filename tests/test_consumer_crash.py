"""`tally consume` under SIGKILL and under a broker restart: exactly-once state.

After every kill the store must hold exactly the records below its stored
offsets (per partition), computed by the oracle from the topic itself.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from consumer_util import (
    TABLE,
    Feeder,
    RowStream,
    child_env,
    json_logs,
    log_events,
    native_records,
    open_store,
    position,
    run_consume,
    start_consume,
    tail,
    topic_end_offsets,
    wait_exit,
    wait_for,
    write_definitions,
)
from kafka_util import create_topic, kafka_script, produce, read_all, unique_topic
from oracle import (
    Event,
    assert_store_matches,
    cut,
    events_from_records,
    expected_items,
    interpret_all,
    total_items,
)

from tally.engine import AggregateNotReady

STRESS = os.environ.get("TALLY_STRESS") == "1"


def wait_consuming(proc: subprocess.Popen[bytes], log: Path, started: int) -> None:
    """Wait for the consumer's next "consuming" log line (past the ``started`` earlier
    runs wrote): its store is open and it reads."""

    def consuming() -> bool:
        assert proc.poll() is None, f"consumer exited (rc {proc.returncode}):\n{tail(log)}"
        return len(log_events(log.read_text(), "consuming")) > started

    wait_for(consuming, lambda: f"the consumer to start\n{tail(log)}", timeout=20, every=0.02)


def step_until(
    proc: subprocess.Popen[bytes],
    log: Path,
    data: Path,
    topic: str,
    defs: list[Any],
    goal: float,
    note: str,
) -> int:
    """Run the consumer in short slices (SIGSTOP, look at its stored position, SIGCONT)
    until that position passes ``goal`` events; it is left stopped there."""
    with open_store(data) as watcher:

        def stopped_past_goal() -> int:
            os.kill(proc.pid, signal.SIGSTOP)
            watcher.refresh()
            done = sum(position(watcher, topic, defs).offsets.values())
            if done >= goal:
                return done
            os.kill(proc.pid, signal.SIGCONT)
            return 0

        return int(
            wait_for(
                stopped_past_goal,
                lambda: f"the consumer's stored position to pass {goal:.0f} {note}\n{tail(log)}",
                timeout=30,
                every=0.01,
            )
        )


def test_sigkill_at_random_instants_keeps_state_and_offsets_together(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("crash-kill")
    create_topic(kafka_bootstrap, topic, partitions=3)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"
    log = tmp_path / "consume.log"
    stream = RowStream(seed=606, n_ids=3000)
    produce(kafka_bootstrap, topic, native_records(stream.take(40_000), seed=13))
    records = read_all(kafka_bootstrap, topic)
    parsed = interpret_all(records, TABLE)
    seed = int(os.environ.get("TALLY_CRASH_SEED") or int.from_bytes(os.urandom(4), "big"))
    rng = random.Random(seed)
    seed_note = f"(TALLY_CRASH_SEED={seed})"

    kills = 40 if STRESS else 12
    startup_s = 1.0  # spawn to "consuming", as the last run measured it
    previous: dict[int, int] = {}
    mid_stream = {True: 0, False: 0}  # kills that left the store mid-stream: building / live
    building = True
    for i in range(kills):
        ends = {p: o + 1 for p, o, *_ in records}
        if i == kills // 2 and (not previous or building):
            # Make sure the second half of the kills hits the live stream: finish the
            # first build (a replay on a fresh store) now if it is still going.
            run_consume(defs_path, topic, data, kafka_bootstrap)
            with open_store(data) as store:
                pos = position(store, topic, defs)
                assert not pos.building and pos.offsets == ends
                assert_store_matches(store, defs, expected_items(cut(parsed, None), defs))
            previous = pos.offsets
        if sum(ends.values()) - sum(previous.values()) < 5000:
            # Keep the consumer busy: more events, so every kill lands mid-stream.
            produce(kafka_bootstrap, topic, native_records(stream.take(10_000), seed=100 + i))
            records = read_all(kafka_bootstrap, topic)
            parsed += interpret_all([r for r in records if r[1] >= ends.get(r[0], 0)], TABLE)
            parsed.sort(key=lambda r: (r[0], r[1]))
            ends = {p: o + 1 for p, o, *_ in records}
            assert len(parsed) == len(records)
        batch = rng.choice(("20", "50", "200"))
        cache = rng.choice((None, "16", "64"))
        # Replays commit per chunk (bulk tree rebuilds when big): small ones
        # so kills land inside the build, now and then the default (one commit).
        replay_batch = "500" if i == 0 else rng.choice(("500", "5000", None))
        env = child_env(
            **{
                k: v
                for k, v in (
                    ("TALLY_CACHE_NODES", cache),
                    ("TALLY_REPLAY_BATCH_SIZE", replay_batch),
                    ("TALLY_REPLAY_CHUNK", replay_batch),
                )
                if v
            }
        )
        # Most kills: mid-stream, once the consumer is consuming; some: a random instant
        # of its start-up and recovery (as long as the last start-up took, not a fixed time).
        after_start = i == 0 or rng.random() < 0.75
        delay = rng.uniform(0.0, startup_s)
        started = len(log_events(log.read_text(), "consuming")) if log.exists() else 0
        spawned = time.monotonic()
        proc = start_consume(
            defs_path, topic, data, kafka_bootstrap, "--batch-size", batch, log=log, env=env
        )
        try:
            if after_start:
                wait_consuming(proc, log, started)
                startup_s = time.monotonic() - spawned
                # Step the consumer in short slices (SIGSTOP/SIGCONT) until its stored position
                # passes a random point of what is left, so the kill lands mid-stream however
                # fast this machine consumes.
                goal = sum(previous.values()) + rng.uniform(0.05, 0.9) * (
                    sum(ends.values()) - sum(previous.values())
                )
                step_until(proc, log, data, topic, defs, goal, seed_note)
            else:
                time.sleep(delay)
            assert proc.poll() is None, (
                f"consumer exited by itself (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        finally:
            proc.kill()  # SIGKILL: no cleanup, no final commit
            proc.wait()
        at = "mid-stream" if after_start else f"{delay:.2f}s after spawn"
        if not after_start and len(log_events(log.read_text(), "consuming")) == started:
            at += " (in start-up)"
        what = (
            f"kill {i} {at} (batch {batch}, replay batch {replay_batch}, cache {cache}) {seed_note}"
        )
        with open_store(data) as store:
            pos = position(store, topic, defs)
            stored = pos.offsets
            assert all(stored.get(p, 0) >= o for p, o in previous.items()), (what, previous, pos)
            assert all(0 <= stored[p] <= ends.get(p, 0) for p in stored), (what, pos, ends)
            if pos.building:
                with pytest.raises(AggregateNotReady):
                    store.aggregate(defs[0].name).count()
            want = expected_items(cut(parsed, stored), defs)
            try:
                assert_store_matches(store, defs, want, partial=pos.building)
            except AssertionError as e:
                raise AssertionError(
                    f"{what}: state != records below the stored offsets {pos}: {e}"
                ) from e
        if sum(previous.values()) < sum(stored.values()) < sum(ends.values()):
            mid_stream[pos.building] += 1
        previous, building = stored, pos.building
    assert mid_stream[True] >= 1 and mid_stream[False] >= 3, (
        f"kills mid-stream (building, live): {mid_stream}; the test proves little {seed_note}"
    )

    res = run_consume(defs_path, topic, data, kafka_bootstrap)
    assert [d["stream"] for d in log_events(res.stderr, "consuming")] == ["live"]
    ends = topic_end_offsets(kafka_bootstrap, topic)
    everything = events_from_records(read_all(kafka_bootstrap, topic), TABLE)
    want = expected_items(everything, defs)
    assert total_items(want) > 5_000
    with open_store(data) as store:
        assert_store_matches(store, defs, want)
        assert position(store, topic, defs) == ("live", ends, False)


# ---------------------------------------------------------------- broker restart


def _free_port() -> int:
    """A port (and its default controller port, +1000) nothing listens on."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 29000)
        if all(_port_free(p) for p in (port, port + 1000)):
            return port
    raise RuntimeError("no free port pair found for a private broker")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def private_broker(kafka_bootstrap: str) -> Iterator[str]:
    """A broker of this module's own (scripts/kafka on a free port, fresh data), so
    restarting it disturbs no other test or engineer using the shared one, and two
    runs of this module never share it. Depends on ``kafka_bootstrap`` for the jars
    (and the ``kafka`` marker). Its data dir is removed afterwards."""
    port = str(int(os.environ.get("TALLY_TEST_KAFKA_RESTART_PORT") or _free_port()))
    res = kafka_script("start", "--port", port, "--fresh")
    assert res.returncode == 0, f"private broker on {port}: {res.stdout}{res.stderr}"
    try:
        yield f"127.0.0.1:{port}"
    finally:
        kafka_script("stop", "--port", port)
        cache = os.environ.get("TALLY_CACHE_DIR")
        root = Path(cache).expanduser() if cache else Path.home() / ".cache" / "tally"
        shutil.rmtree(root / f"kafka-data-{port}", ignore_errors=True)
        with contextlib.suppress(OSError):
            (root / f"kafka-{port}.lock").unlink()


@dataclass
class RestartRun:
    """What happened around one `scripts/kafka restart` under a running consumer."""

    topic: str
    data: Path
    defs: list[Any]
    sent: list[Event]
    ends: dict[int, int]
    restart_s: float
    rc: int
    log: str


@pytest.fixture(scope="module")
def broker_restart_run(private_broker: str, tmp_path_factory: pytest.TempPathFactory) -> RestartRun:
    """A consumer (no --until-caught-up) runs while a producer feeds events; the
    broker restarts (data kept); the producer feeds more once it is back; once the
    store's offsets reach the end offsets the consumer gets SIGTERM. Two tests
    check the outcome: the state, and the log."""
    bootstrap = private_broker
    tmp_path = tmp_path_factory.mktemp("broker-restart")
    topic = unique_topic("crash-broker-restart")
    create_topic(bootstrap, topic, partitions=3)
    defs_path, defs = write_definitions(tmp_path)
    data = tmp_path / "data"
    log = tmp_path / "consume.log"
    stream = RowStream(seed=707, n_ids=1000)
    sent = stream.take(3000)
    produce(bootstrap, topic, native_records(sent, seed=14))

    proc = start_consume(defs_path, topic, data, bootstrap, "--batch-size", "200", log=log)
    try:
        feeder = Feeder(bootstrap, topic, stream, rate=1000)
        feeder.start()

        def alive() -> None:
            assert proc.poll() is None, f"consumer exited (rc {proc.returncode}):\n{tail(log)}"

        def applied() -> int:
            """Events the consumer has committed (0 before its store exists)."""
            alive()
            if not log_events(log.read_text(), "consuming"):
                return 0
            with open_store(data) as store:
                return sum(position(store, topic, defs).offsets.values())

        # The broker goes down mid-stream: once the consumer has applied the first 3000
        # events and some of the live feed, with the feeder still producing.
        wait_for(
            lambda: len(feeder.sent) >= 500 and applied() > len(sent) + 200,
            lambda: f"the consumer to apply the live feed ({len(feeder.sent)} sent)\n{tail(log)}",
            timeout=60,
            every=0.1,
        )
        sent += feeder.finish()
        alive()

        t0 = time.monotonic()
        port = bootstrap.rsplit(":", 1)[1]
        res = kafka_script("stop", "--port", port)
        assert res.returncode == 0, f"broker stop failed: {res.stdout}{res.stderr}"

        # The outage lasts until the consumer has noticed it, however fast the restart.
        def noticed() -> bool:
            alive()
            return "unreachable" in log.read_text()

        wait_for(
            noticed,
            lambda: f"the consumer to log that the broker is unreachable\n{tail(log)}",
            timeout=60,
            every=0.1,
        )
        res = kafka_script("start", "--port", port)
        restart_s = time.monotonic() - t0
        assert res.returncode == 0, f"broker start failed: {res.stdout}{res.stderr}"
        assert proc.poll() is None, f"consumer died with the broker:\n{tail(log)}"

        feeder = Feeder(bootstrap, topic, stream, rate=1000)
        feeder.start()
        wait_for(
            lambda: len(feeder.sent) >= 2000,
            "the feeder to send 2000 events after the restart",
            timeout=60,
            every=0.1,
        )
        sent += feeder.finish()
        ends = topic_end_offsets(bootstrap, topic)
        assert sum(ends.values()) == len(sent)

        # Wait for the consumer to reach the end offsets (a reader polls with refresh()).
        with open_store(data) as store:

            def at_end() -> Any:
                alive()
                store.refresh()
                return (stored := position(store, topic, defs)) == ("live", ends, False) or stored

            wait_for(
                at_end,
                lambda: (
                    f"the consumer to reach the end offsets {ends} after the broker restart "
                    f"({restart_s:.1f}s)\n{tail(log)}"
                ),
                timeout=90,
                every=0.25,
            )
        proc.send_signal(signal.SIGTERM)
        rc = wait_exit(proc, "tally consume did not stop within 10 s of SIGTERM", 10, log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return RestartRun(topic, data, defs, sent, ends, restart_s, rc, log.read_text())


def test_broker_restart_mid_stream_resumes_exactly(broker_restart_run: RestartRun) -> None:
    run = broker_restart_run
    assert run.rc == 0, run.log
    with open_store(run.data) as store:
        assert_store_matches(store, run.defs, expected_items(run.sent, run.defs))
        assert position(store, run.topic, run.defs) == ("live", run.ends, False)
    (stopped,) = log_events(run.log, "stopped")
    assert stopped["events"] + stopped["replayed"] == len(run.sent)  # none read twice


def test_broker_restart_is_logged_as_unreachable_then_back(broker_restart_run: RestartRun) -> None:
    run = broker_restart_run
    lines = json_logs(run.log)
    down = [i for i, d in enumerate(lines) if "unreachable" in str(d.get("event"))]
    back = [i for i, d in enumerate(lines) if "reachable again" in str(d.get("event"))]
    assert down, (
        f"no log line says the broker was unreachable (restart took {run.restart_s:.1f}s):\n{run.log}"
    )
    assert back, f"no log line says the broker is back:\n{run.log}"
    assert down[0] < back[0]
