"""Reconcile benchmark: diff (and patch) N rows of a real Postgres table against an aggregate.

    .venv/bin/python scripts/bench/reconcile.py [--rows 1000000] [--drift 0.01] [--port 25432]

Starts Postgres with scripts/postgres, fills a table ``bench_reconcile`` with
N rows (id bigint, game text, score int), builds the aggregate through the
consumer's write path (`apply_many`, 50k ids per commit), then injects
``--drift`` of the rows as drift (half updated in Postgres without events, a
quarter deleted in Postgres, a quarter deleted from the aggregate). The dry
run and the patch each run in a fresh child process, so the peak RSS printed
is that of reconciling alone, not of building.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TABLE = "bench_reconcile"


def definition():
    from tally.engine import TableAggregate

    return TableAggregate(
        "scores", table=TABLE, sort_key="score", sum_value="score", namespace="game"
    )


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process. Not ru_maxrss: a child started by subprocess inherits
    the parent's peak there (the parent has just built the whole aggregate)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def child(url: str, data: str, apply: bool) -> None:
    from tally.consumers.reconcile.sources import postgres_source
    from tally.engine import Store
    from tally.engine.reconcile import reconcile

    store = Store.open(data, read_only=not apply)
    rss_open = _status_mib("VmRSS")
    t0 = time.perf_counter()
    rep = reconcile(
        store.aggregate("scores"), definition(), postgres_source(url, TABLE, ["id"]), apply=apply
    )
    dt = time.perf_counter() - t0
    store.close()
    print(
        json.dumps(
            {
                "rows": rep.rows_scanned,
                "items": rep.items_scanned,
                "missing": rep.missing,
                "extra": rep.extra,
                "wrong": rep.wrong,
                "patched": rep.patched,
                "seconds": round(dt, 2),
                "rows_per_s": round(rep.rows_scanned / dt),
                "rss_after_open_mib": round(rss_open, 1),
                "peak_rss_mib": round(_status_mib("VmHWM"), 1),
            }
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--drift", type=float, default=0.01)
    ap.add_argument("--port", type=int, default=25432)
    ap.add_argument("--child", choices=["diff", "patch"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args()
    url = f"postgresql://postgres@127.0.0.1:{a.port}/tally"
    if a.child:
        child(url, a.data, a.child == "patch")
        return 0
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "postgres"), "start", "--port", str(a.port)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        sys.exit(f"scripts/postgres start failed: {r.stderr or r.stdout}")
    import psycopg

    from tally.engine import Store, encode_key
    from tally.engine.aggregate import prepare_encoded_id

    n = a.rows
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {TABLE}")
        c.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, game text NOT NULL, score integer NOT NULL)"
        )
        c.execute(
            f"INSERT INTO {TABLE} SELECT g, 'g' || (g %% 10), (g::bigint * 7919) %% 1000003 FROM generate_series(1, %s) g",
            (n,),
        )
        c.execute(f"VACUUM ANALYZE {TABLE}")
    print(f"postgres table: {n} rows in {time.perf_counter() - t0:.1f}s", flush=True)
    tmp = tempfile.mkdtemp(prefix="tally-bench-reconcile-")
    data = str(Path(tmp) / "data")
    try:
        t0 = time.perf_counter()
        store = Store.open(data)
        agg = store.aggregate("scores")
        B = 50_000
        for lo in range(1, n + 1, B):
            ch = {}
            for i in range(lo, min(n, lo + B - 1) + 1):
                e = encode_key(i)
                s = (i * 7919) % 1000003
                ch[e] = prepare_encoded_id(s, e, s, f"g{i % 10}")
            with store.batch():
                agg.apply_many(ch)
        k = max(4, int(n * a.drift))
        step = max(1, n // k)
        drift_ids = list(range(1, n + 1, step))[:k]
        upd, pgdel, aggdel = drift_ids[0::2], drift_ids[1::4], drift_ids[3::4]
        with store.batch():
            agg.apply_many({encode_key(i): None for i in aggdel})
        store.close()
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"UPDATE {TABLE} SET score = score + 1 WHERE id = ANY(%s)", (upd,))
            c.execute(f"DELETE FROM {TABLE} WHERE id = ANY(%s)", (pgdel,))
        print(
            f"aggregate built + drift injected ({len(upd)} wrong, {len(pgdel)} extra, {len(aggdel)} missing) "
            f"in {time.perf_counter() - t0:.1f}s",
            flush=True,
        )
        for phase in ("diff", "patch", "diff"):
            r = subprocess.run(
                [sys.executable, __file__, "--child", phase, "--data", data, "--port", str(a.port)],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                sys.exit(f"{phase} failed: {r.stderr}")
            print(f"{phase:>5}: {r.stdout.strip()}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        with psycopg.connect(url, autocommit=True) as c:
            c.execute(f"DROP TABLE IF EXISTS {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
