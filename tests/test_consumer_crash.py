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
    topic_end_offsets,
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

from engine import AggregateNotReady

STRESS = os.environ.get("TALLY_STRESS") == "1"


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
    budget = 600.0 if STRESS else 120.0
    t_start = time.monotonic()
    previous: dict[int, int] = {}
    mid_stream = {True: 0, False: 0}  # kills that left the store mid-stream: building / live
    building = True
    for i in range(kills):
        if time.monotonic() - t_start > budget:
            break
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
        env = child_env(**{k: v for k, v in (("TALLY_CACHE_NODES", cache),
                                             ("TALLY_REPLAY_BATCH_SIZE", replay_batch),
                                             ("TALLY_REPLAY_CHUNK", replay_batch)) if v})
        # Most kills: a random instant after the consumer starts consuming; some: a
        # random instant after the spawn (so also during start-up and recovery).
        after_start = i == 0 or rng.random() < 0.75
        delay = rng.uniform(0.2, 1.0) if i == 0 else rng.uniform(0.2, 2.0)
        started = len(log_events(log.read_text(), "consuming")) if log.exists() else 0
        proc = start_consume(defs_path, topic, data, kafka_bootstrap, "--batch-size", batch,
                             log=log, env=env)
        try:
            deadline = time.monotonic() + 20
            while after_start and len(log_events(log.read_text(), "consuming")) <= started:
                assert proc.poll() is None, f"consumer exited (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"consumer did not start in 20 s:\n{log.read_text()[-3000:]}"
                time.sleep(0.02)
            if after_start:
                # Step the consumer in short slices (SIGSTOP/SIGCONT) until its stored position
                # passes a random point of what is left, so the kill lands mid-stream however
                # fast this machine consumes.
                goal = sum(previous.values()) + rng.uniform(0.05, 0.9) * (
                    sum(ends.values()) - sum(previous.values())
                )
                deadline = time.monotonic() + 30
                with open_store(data) as watcher:
                    while time.monotonic() < deadline:
                        os.kill(proc.pid, signal.SIGSTOP)
                        watcher.refresh()
                        done = sum(position(watcher, topic, defs).offsets.values())
                        if done >= goal:
                            break
                        os.kill(proc.pid, signal.SIGCONT)
                        time.sleep(0.01)
            else:
                time.sleep(delay)
            assert proc.poll() is None, f"consumer exited by itself (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
        finally:
            proc.kill()  # SIGKILL: no cleanup, no final commit
            proc.wait()
        what = (f"kill {i} {delay:.2f}s after {'consuming' if after_start else 'spawn'} (batch {batch}, "
                f"replay batch {replay_batch}, cache {cache}) {seed_note}")
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
                raise AssertionError(f"{what}: state != records below the stored offsets {pos}: {e}") from e
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
    stop_s: float
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
        deadline = time.monotonic() + 30
        while not log_events(log.read_text(), "consuming"):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"consumer did not start:\n{log.read_text()}"
            time.sleep(0.1)
        time.sleep(1.5)
        sent += feeder.finish()
        assert proc.poll() is None, log.read_text()

        t0 = time.monotonic()
        port = bootstrap.rsplit(":", 1)[1]
        res = kafka_script("stop", "--port", port)
        assert res.returncode == 0, f"broker stop failed: {res.stdout}{res.stderr}"
        time.sleep(4)  # an outage long enough to be noticed, however fast the restart
        res = kafka_script("start", "--port", port)
        restart_s = time.monotonic() - t0
        assert res.returncode == 0, f"broker start failed: {res.stdout}{res.stderr}"
        assert proc.poll() is None, f"consumer died with the broker:\n{log.read_text()}"

        feeder = Feeder(bootstrap, topic, stream, rate=1000)
        feeder.start()
        time.sleep(3)
        sent += feeder.finish()
        ends = topic_end_offsets(bootstrap, topic)
        assert sum(ends.values()) == len(sent)

        # Wait for the consumer to reach the end offsets (a reader polls with refresh()).
        deadline = time.monotonic() + 90
        with open_store(data) as store:
            while True:
                store.refresh()
                stored = position(store, topic, defs)
                if stored == ("live", ends, False):
                    break
                assert proc.poll() is None, f"consumer exited:\n{log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, (
                    f"consumer stuck at {stored}, end {ends} after the broker restart "
                    f"({restart_s:.1f}s):\n{log.read_text()[-3000:]}"
                )
                time.sleep(0.25)
        t_stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
        stop_s = time.monotonic() - t_stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return RestartRun(topic, data, defs, sent, ends, restart_s, stop_s, rc, log.read_text())


def test_broker_restart_mid_stream_resumes_exactly(broker_restart_run: RestartRun) -> None:
    run = broker_restart_run
    assert run.rc == 0, run.log
    assert run.stop_s < 10
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
    assert down, f"no log line says the broker was unreachable (restart took {run.restart_s:.1f}s):\n{run.log}"
    assert back, f"no log line says the broker is back:\n{run.log}"
    assert down[0] < back[0]
