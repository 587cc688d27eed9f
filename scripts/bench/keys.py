"""Micro-benchmark of key encoding and of sums: ns per call, best of several repeats.

    .venv/bin/python scripts/bench/keys.py [--n 20000] [--repeat 7] [--items 50000]

Times ``encode_key`` / ``decode_key`` on ints (small, 40-bit, 70-bit, negative), floats,
short strs, tuples and — where the engine supports them — Decimals, datetimes, dates and
UUIDs; then inserts ``--items`` items with int, float and Decimal sums (one namespace,
batches of 1000) and times ``sum`` over random ranges. Run it from two checkouts to compare
them: it imports the engine of the checkout it lives in.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import shutil
import tempfile
import time
import timeit
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from tally.engine import Store, decode_key, encode_key


def samples(n: int) -> dict[str, list[Any]]:
    rnd = random.Random(7)
    utc = dt.UTC
    epoch = dt.datetime(2020, 1, 1, tzinfo=utc)
    return {
        "int <1024": [rnd.randrange(1024) for _ in range(n)],
        "int 40-bit": [rnd.randrange(1 << 40) for _ in range(n)],
        "int 70-bit": [rnd.randrange(1 << 70) for _ in range(n)],
        "int negative": [-rnd.randrange(1, 1 << 40) for _ in range(n)],
        "float": [rnd.uniform(-1e6, 1e6) for _ in range(n)],
        "str 8": ["".join(rnd.choices("abcdefghij", k=8)) for _ in range(n)],
        "tuple (int, str)": [(rnd.randrange(1000), f"p{rnd.randrange(10**6)}") for _ in range(n)],
        "Decimal 12,2": [Decimal(rnd.randrange(10**12)).scaleb(-2) for _ in range(n)],
        "datetime aware": [
            epoch + dt.timedelta(microseconds=rnd.randrange(10**14)) for _ in range(n)
        ],
        "date": [dt.date(2000, 1, 1) + dt.timedelta(days=rnd.randrange(10**4)) for _ in range(n)],
        "UUID": [uuid.UUID(int=rnd.getrandbits(128)) for _ in range(n)],
    }


def best_ns(fn: Callable[[], object], calls: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=1, repeat=repeat)) / calls * 1e9


def bench_keys(n: int, repeat: int) -> None:
    print(f"{'value':<18} {'encode ns':>10} {'decode ns':>10}")
    for name, values in samples(n).items():
        try:
            encs = [encode_key(v) for v in values]
        except Exception as e:  # an engine without this type
            print(f"{name:<18} {'-':>10} {'-':>10}   ({type(e).__name__})")
            continue
        enc = best_ns(lambda values=values: [encode_key(v) for v in values], n, repeat)
        dec = best_ns(lambda encs=encs: [decode_key(b) for b in encs], n, repeat)
        print(f"{name:<18} {enc:>10.0f} {dec:>10.0f}")


def bench_sums(items: int, reads: int) -> None:
    rnd = random.Random(3)
    keys = [rnd.randrange(10**9) for _ in range(items)]
    kinds: dict[str, Callable[[int], Any]] = {
        "int": lambda i: rnd.randrange(10**6),
        "float": lambda i: rnd.uniform(0, 1e6),
        "Decimal": lambda i: Decimal(rnd.randrange(10**8)).scaleb(-2),
    }
    bounds = [sorted((rnd.randrange(10**9), rnd.randrange(10**9))) for _ in range(reads)]
    print(f"\n{'sum type':<10} {'insert us':>10} {'sum(range) us':>14}")
    for name, make in kinds.items():
        path = tempfile.mkdtemp(prefix="tally-bench-")
        try:
            store = Store.open(path)
            agg = store.aggregate("bench")
            vals = [make(i) for i in range(items)]
            try:
                t = time.perf_counter()
                for start in range(0, items, 1000):
                    with store.batch():
                        for i in range(start, min(items, start + 1000)):
                            agg.insert(keys[i], i, vals[i])
                ins = (time.perf_counter() - t) / items * 1e6
            except Exception as e:
                print(f"{name:<10} {'-':>10} {'-':>14}   ({type(e).__name__})")
                store.close()
                continue
            t = time.perf_counter()
            for a, b in bounds:
                agg.sum(bounds={"lower": {"key": a}, "upper": {"key": b}})
            rs = (time.perf_counter() - t) / reads * 1e6
            print(f"{name:<10} {ins:>10.2f} {rs:>14.2f}")
            store.close()
        finally:
            shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=20_000, help="values per key timing")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--items", type=int, default=50_000, help="items per sum-type store (0: skip)")
    ap.add_argument("--reads", type=int, default=20_000)
    args = ap.parse_args()
    bench_keys(args.n, args.repeat)
    if args.items:
        bench_sums(args.items, args.reads)


if __name__ == "__main__":
    main()
