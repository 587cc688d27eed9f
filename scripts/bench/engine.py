"""Engine benchmark: tally on RocksDB vs sortedcontainers.SortedList, side by side.

    .venv/bin/python scripts/bench/engine.py [--items 1000000] [--reads 100000]
        [--batch 1000] [--node-size N] [--cache-nodes N] [--scale 100000,1000000]
        [--scale-build insert|bulk]

Inserts ``--items`` random (key, id) items committed in batches, then times
``count`` (random bounds), ``at`` and ``index_of`` on both, and prints ops/s
and the tally/SortedList ratio. ``--scale`` repeats the read timings at each
size to show how per-op cost grows with n. Peak RSS is reported at the end.
``--scale-build bulk`` builds each size with `Aggregate.apply_many` in
growing chunks (bottom-up merge rebuilds) instead of ``--batch``-sized random
inserts: the same items, built in minutes instead of hours at 10M; the RSS
column then shows the RSS after the build (the build's own peak is larger).
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from sortedcontainers import SortedList

from tally.engine import Store

KEY_SPACE = 10**9


def rss_now_mib() -> float:
    """Current RSS of this process (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mib() -> float:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(n: int, batch: int, node_size: int | None, cache: int | None, seed: int = 1):
    rnd = random.Random(seed)
    keys = [rnd.randrange(KEY_SPACE) for _ in range(n)]
    ids = list(range(n))
    rnd.shuffle(ids)
    path = tempfile.mkdtemp(prefix="tally-bench-")
    store = Store.open(path, max_node_size=node_size, cache_nodes=cache)
    agg = store.aggregate("bench")
    t = time.perf_counter()
    for start in range(0, n, batch):
        with store.batch():
            for i in range(start, min(n, start + batch)):
                agg.insert(keys[i], ids[i], 1)
    t_tally = time.perf_counter() - t

    t = time.perf_counter()
    sl: SortedList = SortedList()
    for i in range(n):
        sl.add((keys[i], ids[i]))
    t_sl = time.perf_counter() - t
    return store, agg, sl, path, t_tally, t_sl


def time_reads(
    agg, sl: SortedList, n: int, reads: int, seed: int = 2
) -> dict[str, tuple[float, float]]:
    rnd = random.Random(seed)
    bounds = []
    for _ in range(reads):
        a, b = sorted((rnd.randrange(KEY_SPACE), rnd.randrange(KEY_SPACE)))
        bounds.append((a, b))
    offsets = [rnd.randrange(n) for _ in range(reads)]
    probe = [rnd.randrange(KEY_SPACE) for _ in range(reads)]
    out: dict[str, tuple[float, float]] = {}

    t = time.perf_counter()
    for a, b in bounds:
        agg.count(bounds={"lower": {"key": a}, "upper": {"key": b}})
    tt = time.perf_counter() - t
    t = time.perf_counter()
    for a, b in bounds:
        # keys between a and b inclusive: (a,) <= item < (b, +inf)
        sl.bisect_right((b, float("inf"))) - sl.bisect_left((a,))
    ts = time.perf_counter() - t
    out["count"] = (reads / tt, reads / ts)

    t = time.perf_counter()
    for k in offsets:
        agg.at(k)
    tt = time.perf_counter() - t
    t = time.perf_counter()
    for k in offsets:
        sl[k]
    ts = time.perf_counter() - t
    out["at"] = (reads / tt, reads / ts)

    t = time.perf_counter()
    for k in probe:
        agg.index_of(k)
    tt = time.perf_counter() - t
    t = time.perf_counter()
    for k in probe:
        sl.bisect_left((k,))
    ts = time.perf_counter() - t
    out["index_of"] = (reads / tt, reads / ts)
    return out


def scale_child(args: argparse.Namespace) -> None:
    """Build ``n`` items and time reads, tally only (no SortedList in this process's RSS)."""
    n = args.scale_child
    rnd = random.Random(1)
    path = tempfile.mkdtemp(prefix="tally-bench-")
    store = Store.open(path, max_node_size=args.node_size, cache_nodes=args.cache_nodes)
    agg = store.aggregate("bench")
    if args.scale_build == "bulk":
        from tally.engine import encode_key
        from tally.engine.aggregate import prepare_encoded_id

        start = 0
        while start < n:
            end = min(
                n, start + max(100_000, start)
            )  # each chunk >= 25% of the tree: a merge rebuild
            changes = {}
            for i in range(start, end):
                eid = encode_key(i * 1_000_003 % n)
                changes[eid] = prepare_encoded_id(rnd.randrange(KEY_SPACE), eid, 1, None)
            with store.batch():
                agg.apply_many(changes)
            del changes
            start = end
    else:
        for start in range(0, n, args.batch):
            with store.batch():
                for i in range(start, min(n, start + args.batch)):
                    # i * prime mod n: a permutation of ids without holding a list of n ints
                    agg.insert(rnd.randrange(KEY_SPACE), i * 1_000_003 % n, 1)
    store.checkpoint()
    reads = args.reads
    qb = [sorted((rnd.randrange(KEY_SPACE), rnd.randrange(KEY_SPACE))) for _ in range(reads)]
    offs = [rnd.randrange(n) for _ in range(reads)]
    probes = [rnd.randrange(KEY_SPACE) for _ in range(reads)]
    # Warm up with a different sample: time the steady state, not the first cache fills.
    for k in [rnd.randrange(n) for _ in range(reads)]:
        agg.at(k)
    t = time.perf_counter()
    for a, b in qb:
        agg.count(bounds={"lower": {"key": a}, "upper": {"key": b}})
    c = (time.perf_counter() - t) / reads * 1e6
    t = time.perf_counter()
    for k in offs:
        agg.at(k)
    at = (time.perf_counter() - t) / reads * 1e6
    t = time.perf_counter()
    for k in probes:
        agg.index_of(k)
    io = (time.perf_counter() - t) / reads * 1e6
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    rss = rss_now_mib() if args.scale_build == "bulk" else rss_mib()
    print(f"{n:>12,} {c:>8.2f} {at:>8.2f} {io:>9.2f} {rss:>13,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--reads", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--node-size", type=int, default=None)
    ap.add_argument("--cache-nodes", type=int, default=None)
    ap.add_argument(
        "--scale", default="", help="comma-separated extra sizes for the read-cost scaling table"
    )
    ap.add_argument("--scale-child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument(
        "--scale-build",
        choices=["insert", "bulk"],
        default="insert",
        help="how --scale builds each size: random inserts in --batch commits, or bulk merge rebuilds",
    )
    args = ap.parse_args()
    if args.scale_child:
        scale_child(args)
        return

    store, agg, sl, path, t_tally, t_sl = build(
        args.items, args.batch, args.node_size, args.cache_nodes
    )
    n = args.items
    print(
        f"items={n:,} batch={args.batch} node_size={store.max_node_size} cache_nodes={store.cache_nodes}"
    )
    print(f"{'op':<10} {'tally ops/s':>14} {'SortedList ops/s':>18} {'ratio':>7}")
    print(f"{'insert':<10} {n / t_tally:>14,.0f} {n / t_sl:>18,.0f} {t_sl / t_tally:>7.2f}")
    for op, (a, b) in time_reads(agg, sl, n, args.reads).items():
        print(f"{op:<10} {a:>14,.0f} {b:>18,.0f} {a / b:>7.2f}")
    agg.validate() if n <= 200_000 else None
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    del sl

    if args.scale:
        print("\nread cost vs size (microseconds per op, tally only; each size in its own process)")
        rss_label = "RSS MiB" if args.scale_build == "bulk" else "peak RSS MiB"
        print(f"{'items':>12} {'count':>8} {'at':>8} {'index_of':>9} {rss_label:>13}")
        for size in [int(x) for x in args.scale.split(",")]:
            cmd = [
                sys.executable,
                __file__,
                "--scale-child",
                str(size),
                "--reads",
                str(args.reads),
                "--batch",
                str(args.batch),
                "--scale-build",
                args.scale_build,
            ]
            if args.node_size:
                cmd += ["--node-size", str(args.node_size)]
            if args.cache_nodes:
                cmd += ["--cache-nodes", str(args.cache_nodes)]
            print(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip(),
                flush=True,
            )
    print(f"\npeak RSS {rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
