"""Cost of drift signals on the live apply path: `Applier(drift=True)` vs `Applier(drift=False)`.

    .venv/bin/python scripts/bench/drift.py [--ids 200000] [--events 500000] [--batch 5000] [--rounds 3]

Two stores get the same ``--ids`` rows, then the same ``--events`` change events
(inserts, updates, deletes; 1% of them drift: updates of unknown ids) in batches
of ``--batch``, each batch planned, applied and committed the way the live
stream does it. Rounds alternate between the two so both see the same machine
state. Prints events/s of each and the ratio (on/off).
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path

from tally.engine import Store, TableAggregate
from tally.engine.triggers import Applier
from tally.schemas import ChangeEvent

ROOT = Path(__file__).resolve().parents[2]

DEFINITIONS = [
    TableAggregate("leaderboard", table="scores", sort_key="score", sum_value="score"),
    TableAggregate(
        "by_game", table="scores", namespace="game", sort_key="score", sum_value="score"
    ),
]


def row(rid: int, rnd: random.Random) -> dict[str, object]:
    return {"id": rid, "game": f"g{rid % 20}", "score": int(rnd.paretovariate(1.5) * 100)}


def events(ids: int, n: int, seed: int, held: set[int]) -> list[ChangeEvent]:
    """``n`` events consistent with ``held`` (updated in place), plus 1% drift."""
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        x = rnd.random()
        if x < 0.01:  # drift: an update of an id nobody inserted
            rid = ids + 1 + seed * n + len(out)  # unique: never held before
            out.append(ChangeEvent("scores", "upsert", rid, row(rid, rnd), None, None, "u"))
        elif x < 0.1 and (rid := rnd.randrange(ids)) in held:
            held.discard(rid)
            out.append(ChangeEvent("scores", "delete", rid, None, None, None, "d"))
        else:
            rid = rnd.randrange(ids)
            op = "u" if rid in held else "c"
            held.add(rid)
            out.append(ChangeEvent("scores", "upsert", rid, row(rid, rnd), None, None, op))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ids", type=int, default=200_000)
    ap.add_argument("--events", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tally-bench-drift-"))
    try:
        rnd = random.Random(1)
        seed_rows = [
            ChangeEvent("scores", "upsert", i, row(i, rnd), None, None, "c") for i in range(a.ids)
        ]
        appliers = {}
        for mode in ("off", "on"):
            store = Store.open(tmp / mode)
            app = Applier(store, DEFINITIONS, drift=mode == "on")
            app.apply_events(seed_rows)
            appliers[mode] = app
        times = {"off": 0.0, "on": 0.0}
        total = drift = expected = 0
        held = set(range(a.ids))
        for r in range(a.rounds):
            evs = events(a.ids, a.events, 100 + r, held)
            total += len(evs)
            expected += 2 * sum(
                1 for e in evs if e.op == "u" and isinstance(e.id, int) and e.id >= a.ids
            )
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                app = appliers[mode]
                t = time.perf_counter()
                for i in range(0, len(evs), a.batch):
                    res, _ = app.apply_events(evs[i : i + a.batch])
                    if mode == "on":
                        drift += sum(res.drift.values())
                times[mode] += time.perf_counter() - t
        off, on = total / times["off"], total / times["on"]
        print(f"{total} events in batches of {a.batch}, {a.ids} ids, 2 aggregates")
        print(f"drift off: {off:,.0f} events/s")
        print(
            f"drift on:  {on:,.0f} events/s   ({drift} drift signals counted, {expected} injected)"
        )
        assert drift == expected, "the drift path counted something that was not injected"
        print(f"ratio on/off: {on / off:.3f}")
        for app in appliers.values():
            app.store.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
