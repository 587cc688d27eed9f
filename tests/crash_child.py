"""Child process of tests/test_engine_crash.py: applies deterministic batches until killed.

Usage: python crash_child.py PATH SEED LIMIT MAX_NODE_SIZE CACHE_NODES {park,finish}

Batch ``n`` is a pure function of (SEED, n), so any process can replay the
sequence up to any batch. The child resumes from the meta counter ``batch``
(the number of batches applied), which each batch writes first, before its item
writes, so a counter that reached the store without the rest of its batch is
caught by the parent. It applies batches until the counter reaches LIMIT, then
either parks (waits to be killed: the parent bounds how far one run can go, so
no machine is fast enough to finish the sequence before the kills end) or, with
``finish``, closes the store and prints ``done``.

Every step is a line on stdout (flushed, so the lines the parent reads after a
SIGKILL say exactly where the child was):

* ``opening`` — before `Store.open` (recovery); ``ready START OPEN_US`` after it;
* ``begin N`` — batch N (the counter it commits) starts its writes;
* ``commit N`` — its writes are done, the commit (one WriteBatch) starts;
* ``committed N OPS_US COMMIT_US`` — committed, with how long each phase took
  (the parent aims its kills inside a phase with these);
* ``parked N`` / ``done``.
"""

from __future__ import annotations

import random
import sys
import time
from typing import Any

N_IDS = 2000
WRITES_PER_BATCH = 50
NAMESPACES: tuple[Any, ...] = (None, "b")
AGGREGATE = "crash"
META_KEY = b"batch"

Op = tuple[Any, ...]


def batch_ops(seed: int, n: int) -> list[Op]:
    """The writes of batch ``n``: ("upsert", key, id, sum, ns) or ("delete", id).

    Every 7th batch replays the final write of each id of the previous batch:
    all its writes are no-ops (a duplicate delivery), so that batch commits
    only its metadata.
    """
    if n % 7 == 6:
        last: dict[Any, Op] = {}
        for op in batch_ops(seed, n - 1):
            last.pop(op[1] if op[0] == "delete" else op[2], None)
            last[op[1] if op[0] == "delete" else op[2]] = op
        return list(last.values())
    rng = random.Random(seed * 1_000_003 + n)
    ops: list[Op] = []
    hot = rng.randrange(N_IDS)
    for _ in range(WRITES_PER_BATCH):
        # Half the writes cluster around a hot spot, so nodes split and merge locally.
        id_ = (hot + rng.randrange(64)) % N_IDS if rng.random() < 0.5 else rng.randrange(N_IDS)
        if rng.random() < 0.3:
            ops.append(("delete", id_))
        else:
            key: Any = rng.choice(
                (rng.randrange(40), rng.randrange(40) + 0.5, ("t", rng.randrange(5)))
            )
            s = rng.choice((rng.randrange(-50, 100), rng.randrange(1000) / 4))
            ops.append(("upsert", key, id_, s, rng.choice(NAMESPACES)))
    return ops


def apply_to_oracle(state: dict[Any, tuple[Any, Any, Any]], ops: list[Op]) -> None:
    """id -> (namespace, key, sum) after the ops."""
    for op in ops:
        if op[0] == "delete":
            state.pop(op[1], None)
        else:
            _, key, id_, s, ns = op
            state[id_] = (ns, key, s)


def main() -> None:
    path, seed, limit, max_node_size, cache_nodes, at_limit = sys.argv[1:7]
    assert at_limit in ("park", "finish"), at_limit
    from tally.engine import Store

    print("opening", flush=True)
    t0 = time.perf_counter()
    store = Store.open(path, max_node_size=int(max_node_size), cache_nodes=int(cache_nodes))
    open_us = int((time.perf_counter() - t0) * 1e6)
    agg = store.aggregate(AGGREGATE)
    raw = store.get_meta(META_KEY)
    start = int(raw) if raw is not None else 0
    print(f"ready {start} {open_us}", flush=True)
    for n in range(start, int(limit)):
        print(f"begin {n + 1}", flush=True)
        t0 = time.perf_counter()
        with store.batch() as b:
            b.put_meta(META_KEY, str(n + 1).encode())
            for op in batch_ops(int(seed), n):
                if op[0] == "delete":
                    agg.delete_if_exists(op[1])
                else:
                    _, key, id_, s, ns = op
                    agg.upsert(key, id_, s, namespace=ns)
            print(f"commit {n + 1}", flush=True)
            t1 = time.perf_counter()
        t2 = time.perf_counter()
        print(f"committed {n + 1} {int((t1 - t0) * 1e6)} {int((t2 - t1) * 1e6)}", flush=True)
    if at_limit == "park":
        print(f"parked {limit}", flush=True)
        while True:
            time.sleep(3600)
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
