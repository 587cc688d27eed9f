"""Replay benchmark: building a new aggregate by replay vs a null-sink consumer, one run.

    .venv/bin/python scripts/bench/replay.py [--events 1000000] [--ids 200000]

(a) null sink: aiokafka getmany + msgspec decode of every event;
(b) replay: a ConsumerProcess building ONE new aggregate (a leaderboard) from
    offset zero until it joins live (what `tally consume` does for an aggregate
    added to an existing topic);
(c) build time of the same final items two ways: bulk (`apply_many` into an
    empty aggregate: sort + bottom-up build) vs incremental upserts in batches
    of 5,000 — the difference the replay path avoids.

Prints events/s, the ratio (b)/(a), and the bulk vs incremental times.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ingest import null_sink, produce, rss_mib

from tally.consumers.runtime.process import ConsumerProcess
from tally.engine import Store, TableAggregate, encode_key
from tally.engine.aggregate import prepare_encoded_id
from tally.schemas.config import ConsumerSettings

ROOT = Path(__file__).resolve().parents[2]

LEADERBOARD = TableAggregate("leaderboard", table="scores", sort_key="score", sum_value="score")


async def replay(bootstrap: str, topic: str) -> tuple[float, int]:
    data = tempfile.mkdtemp(prefix="tally-bench-replay-")
    store = Store.open(data)
    settings = ConsumerSettings(
        bootstrap_servers=bootstrap,
        data_dir=data,
        topics={"scores": topic},
        http=None,
        progress_interval=3600,
    )
    proc = ConsumerProcess(settings, [LEADERBOARD], store)
    t = time.perf_counter()
    await proc.run(until_caught_up=True, install_signals=False)
    dt = time.perf_counter() - t
    n = proc.stats.events + proc.stats.replayed
    store.close()
    shutil.rmtree(data, ignore_errors=True)
    return dt, n


def build_compare(n_ids: int) -> tuple[float, float]:
    rnd = random.Random(5)
    items = {i: rnd.randrange(10**6) for i in range(n_ids)}
    out = []
    for mode in ("bulk", "incremental"):
        path = tempfile.mkdtemp(prefix="tally-bench-build-")
        store = Store.open(path)
        agg = store.aggregate("x")
        t = time.perf_counter()
        if mode == "bulk":
            with store.batch():
                agg.apply_many(
                    {
                        encode_key(i): prepare_encoded_id(k, encode_key(i), k, None)
                        for i, k in items.items()
                    }
                )
        else:
            keys = list(items)
            for start in range(0, len(keys), 5000):
                with store.batch():
                    for i in keys[start : start + 5000]:
                        agg.upsert(items[i], i, items[i])
        store.checkpoint()
        out.append(time.perf_counter() - t)
        assert agg.count() == n_ids
        store.close()
        shutil.rmtree(path, ignore_errors=True)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--ids", type=int, default=200_000)
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    args = ap.parse_args()
    if args.bootstrap_servers == "127.0.0.1:9092":
        subprocess.run(
            [str(ROOT / "scripts" / "kafka"), "start"], check=True, stdout=subprocess.DEVNULL
        )
    from tally.consumers.logs import configure_logging

    configure_logging("error", "console")
    topic = f"bench-replay-{int(time.time())}"
    asyncio.run(produce(args.bootstrap_servers, topic, args.events, args.ids, 3))
    t_null = asyncio.run(null_sink(args.bootstrap_servers, topic, args.events, 5000))
    t_replay, n = asyncio.run(replay(args.bootstrap_servers, topic))
    assert n == args.events, f"replayed {n} events, expected {args.events}"
    a, b = args.events / t_null, args.events / t_replay
    print(f"events={args.events:,} ids={args.ids:,}")
    print(f"{'(a) null sink':<28} {a:>12,.0f} events/s")
    print(f"{'(b) replay of a new aggregate':<28} {b:>12,.0f} events/s")
    print(f"ratio (b)/(a) = {b / a:.2f}   peak RSS {rss_mib():,.0f} MiB")
    bulk, inc = build_compare(args.ids)
    print(
        f"build {args.ids:,} items: bulk {bulk:.2f}s, incremental {inc:.2f}s ({inc / bulk:.1f}x slower)"
    )


if __name__ == "__main__":
    main()
