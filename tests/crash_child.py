"""Child process of tests/test_engine_crash.py: applies deterministic batches until killed.

Usage: python crash_child.py PATH SEED TOTAL_BATCHES MAX_NODE_SIZE CACHE_NODES

Batch ``n`` is a pure function of (SEED, n), so any process can replay the
sequence up to any batch. The child resumes from the meta counter ``batch``
(the number of batches applied) and writes it in the same batch as the
writes. After each commit it prints ``committed N`` so the parent knows a
lower bound of what must have survived a kill.
"""

from __future__ import annotations

import random
import sys
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
    path, seed, total, max_node_size, cache_nodes = sys.argv[1:6]
    from engine import Store

    store = Store.open(path, max_node_size=int(max_node_size), cache_nodes=int(cache_nodes))
    agg = store.aggregate(AGGREGATE)
    raw = store.get_meta(META_KEY)
    start = int(raw) if raw is not None else 0
    print(f"ready {start}", flush=True)
    for n in range(start, int(total)):
        with store.batch() as b:
            for op in batch_ops(int(seed), n):
                if op[0] == "delete":
                    agg.delete_if_exists(op[1])
                else:
                    _, key, id_, s, ns = op
                    agg.upsert(key, id_, s, namespace=ns)
            b.put_meta(META_KEY, str(n + 1).encode())
        print(f"committed {n + 1}", flush=True)
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
