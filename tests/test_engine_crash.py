"""Crash atomicity: SIGKILL a writer at random moments; every reopen shows exactly a batch prefix.

A child process (tests/crash_child.py) applies a deterministic sequence of
batches (~50 upserts/deletes over 2000 ids in 2 namespaces, plus the meta
counter ``batch``) to a store with tiny nodes, so splits, merges and
checkpoints happen all the time. The parent kills it at random moments, then
reopens the store, runs ``validate()``, reads the counter N and checks the
aggregate equals an oracle replaying batches 0..N-1 exactly, and that N is at
least the last batch the child reported committed (nothing lost). Then it
restarts the child, which resumes from N. The test ends with a run to
completion.

``TALLY_STRESS=1`` (or a larger integer) multiplies the number of kills.
"""

from __future__ import annotations

import importlib.util
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine import Store, encode_key

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CHILD = HERE / "crash_child.py"

_spec = importlib.util.spec_from_file_location("tally_crash_child", CHILD)
assert _spec is not None and _spec.loader is not None
crash_child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crash_child)

STRESS = int(os.environ.get("TALLY_STRESS", "0") or 0)
FACTOR = 1 if STRESS <= 0 else (10 if STRESS == 1 else STRESS)
KILLS = 40 * FACTOR
TOTAL_BATCHES = 8000 * FACTOR
MAX_NODE_SIZE = 6
SEED = 20240611


class Oracle:
    """The deterministic sequence replayed up to some batch count."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.applied = 0
        self.state: dict[Any, tuple[Any, Any, Any]] = {}

    def advance_to(self, n: int) -> None:
        assert n >= self.applied, f"batch counter went backwards: {n} < {self.applied}"
        while self.applied < n:
            crash_child.apply_to_oracle(self.state, crash_child.batch_ops(self.seed, self.applied))
            self.applied += 1

    def expected(self, ns: Any) -> list[tuple[bytes, bytes, Any]]:
        out = [(encode_key(k), encode_key(i), s) for i, (n, k, s) in self.state.items() if n == ns]
        return sorted(out)


def check_store(path: Path, oracle: Oracle, at_least: int, read_only: bool = False) -> int:
    """Reopen, validate, and compare with the oracle at the stored batch counter."""
    with Store.open(path, read_only=read_only, max_node_size=MAX_NODE_SIZE) as store:
        if not read_only:
            store.validate()
        else:
            store.aggregate(crash_child.AGGREGATE).validate()
        raw = store.get_meta(crash_child.META_KEY)
        n = int(raw) if raw is not None else 0
        assert n >= at_least, f"lost committed batches: store has {n}, child reported {at_least}"
        assert n <= TOTAL_BATCHES
        oracle.advance_to(n)
        agg = store.aggregate(crash_child.AGGREGATE)
        total = 0
        for ns in crash_child.NAMESPACES:
            expect = oracle.expected(ns)
            got = [
                (encode_key(i.key), encode_key(i.id), i.sum_value) for i in agg.iter(namespace=ns)
            ]
            assert len(got) == len(expect), (n, ns, len(got), len(expect))
            for g, e in zip(got, expect, strict=True):
                assert g[:2] == e[:2], (n, ns, g, e)
                assert type(g[2]) is type(e[2]) and g[2] == e[2], (n, ns, g, e)
            assert agg.count(namespace=ns) == len(expect)
            sums = [e[2] for e in expect]
            got_sum = agg.sum(namespace=ns)
            if all(type(s) is int for s in sums):
                assert got_sum == sum(sums)
            else:
                assert abs(got_sum - sum(sums)) <= 1e-9 * max(1.0, sum(abs(s) for s in sums))
            total += len(expect)
        for id_ in range(0, crash_child.N_IDS, 97):
            item = agg.get(id_)
            if id_ in oracle.state:
                ns, key, s = oracle.state[id_]
                assert item is not None
                assert encode_key(item.key) == encode_key(key) and item.sum_value == s
                assert encode_key(item.namespace) == encode_key(ns)
            else:
                assert item is None
        assert total == len(oracle.state)
    return n


def start_child(path: Path, cache_nodes: int) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        sys.executable,
        str(CHILD),
        str(path),
        str(SEED),
        str(TOTAL_BATCHES),
        str(MAX_NODE_SIZE),
        str(cache_nodes),
    ]
    return subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO),
        bufsize=1,
    )


def read_lines_until(proc: subprocess.Popen[str], prefix: str, timeout: float) -> list[str]:
    """Read the child's stdout until a line starting with ``prefix`` (or EOF/timeout)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.strip())
        if line.startswith(prefix):
            break
    return lines


def last_committed(lines: list[str]) -> int:
    n = 0
    for line in lines:
        if line.startswith("committed "):
            n = max(n, int(line.split()[1]))
    return n


def test_sigkill_at_random_moments_keeps_batches_atomic(tmp_path: Path) -> None:
    path = tmp_path / "store"
    rng = random.Random(SEED)
    oracle = Oracle(SEED)
    at_least = 0
    progress = []
    started = time.monotonic()
    for kill in range(KILLS):
        cache_nodes = rng.choice((16, 64, 64, 1000))
        child = start_child(path, cache_nodes)
        try:
            if kill % 5 == 4:
                # Sometimes kill while it opens (log replay, recovery).
                time.sleep(rng.uniform(0.0, 0.25))
                lines: list[str] = []
            else:
                lines = read_lines_until(child, "ready", timeout=30)
                assert lines and lines[-1].startswith("ready"), (lines, child.poll())
                time.sleep(rng.uniform(0.0, 0.35))
            child.send_signal(signal.SIGKILL)
            assert child.stdout is not None and child.stderr is not None
            rest = child.stdout.read()
            err = child.stderr.read()
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        lines += rest.splitlines()
        assert child.returncode in (-signal.SIGKILL, 0), (child.returncode, err)
        if child.returncode == 0:
            assert "done" in lines
        assert "Traceback" not in err, err
        at_least = max(at_least, last_committed(lines))
        if kill % 2:
            # A reader opening the crashed store (before any writer recovers it) sees the same.
            check_store(path, oracle, at_least, read_only=True)
        n = check_store(path, oracle, at_least)
        progress.append(n)
        at_least = n
    # Finish the sequence without interruption.
    child = start_child(path, 64)
    try:
        out, err = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, err
    assert "done" in out.splitlines()
    n = check_store(path, oracle, TOTAL_BATCHES)
    assert n == TOTAL_BATCHES
    # The kills really interrupted work in progress at many different points.
    assert len(set(progress)) >= KILLS // 2, progress
    assert progress[-1] < TOTAL_BATCHES, (
        "the child finished before the kills ended; raise TOTAL_BATCHES"
    )
    assert time.monotonic() - started < 300 * FACTOR


METADATA_ONLY_CHILD = """
import os, sys
from engine import Store
s = Store.open(sys.argv[1])
agg = s.aggregate("agg")
for i in range(20):
    agg.upsert(i, i, i)                # committed one by one
with s.batch() as b:                   # a batch whose only change is metadata
    b.put_meta(b"offset", b"20")
    agg.upsert(0, 0, 0)                # a no-op write
print("committed", flush=True)
os.kill(os.getpid(), 9)                # crash: no close()
"""


def test_metadata_only_batch_after_writes_survives_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", METADATA_ONLY_CHILD, str(path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO),
        timeout=60,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert r.stdout.strip() == "committed"
    with Store.open(path) as store:
        agg = store.aggregate("agg")
        assert store.get_meta(b"offset") == b"20"
        assert agg.count() == 20
        assert [i.id for i in agg.iter()] == list(range(20))
        assert agg.sum() == sum(range(20))
        agg.validate()
