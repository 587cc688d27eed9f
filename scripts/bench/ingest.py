"""Ingest benchmark: `tally consume` vs a null-sink consumer on the same topic, one run.

    .venv/bin/python scripts/bench/ingest.py [--events 1000000] [--ids 200000]
        [--partitions 3] [--batch-size 5000] [--bootstrap-servers 127.0.0.1:9092]

Produces ``--events`` native change events (updates of ``--ids`` score rows
across 20 games, 10% deletes) to a fresh topic, then measures, alternating so
both see the same broker and page cache:

  (a) null sink: aiokafka getmany + msgspec JSON decode of every value, nothing else;
  (b) tally: a ConsumerProcess (what `tally consume` runs) applying every event
      to two aggregates (a global leaderboard and a per-game one), committing
      state and offsets per batch, from offset zero until caught up.

Prints events/s of each, the ratio (b)/(a), and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from tally.consumers.runtime.process import ConsumerProcess
from tally.engine import Store, TableAggregate
from tally.schemas.config import ConsumerSettings

ROOT = Path(__file__).resolve().parents[2]

DEFINITIONS = [
    TableAggregate("leaderboard", table="scores", sort_key="score", sum_value="score"),
    TableAggregate(
        "by_game", table="scores", namespace="game", sort_key="score", sum_value="score"
    ),
]


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def produce(bootstrap: str, topic: str, n: int, ids: int, partitions: int) -> float:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1)])
    await admin.close()
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks=1)
    await p.start()
    enc = msgspec.json.Encoder()
    rnd = random.Random(7)
    t = time.perf_counter()
    pending = []
    for _ in range(n):
        rid = rnd.randrange(ids)
        key = enc.encode(rid)
        if rnd.random() < 0.1:
            v = enc.encode({"table": "scores", "op": "delete", "id": rid})
        else:
            row = {
                "id": rid,
                "player": f"p{rid}",
                "game": f"g{rid % 20}",
                "score": int(rnd.paretovariate(1.5) * 100),
            }
            v = enc.encode({"table": "scores", "op": "update", "id": rid, "after": row})
        pending.append(await p.send(topic, v, key=key))
        if len(pending) >= 20000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await p.stop()
    return time.perf_counter() - t


async def null_sink(bootstrap: str, topic: str, n: int, batch: int) -> float:
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await c.start()
    parts = (await c._client.fetch_all_metadata()).partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    c.assign(tps)
    await c.seek_to_beginning(*tps)
    dec = msgspec.json.Decoder()
    got = 0
    t = time.perf_counter()
    while got < n:
        b = await c.getmany(timeout_ms=1000, max_records=batch)
        for recs in b.values():
            for r in recs:
                dec.decode(r.value)
            got += len(recs)
    dt = time.perf_counter() - t
    await c.stop()
    return dt


async def tally(bootstrap: str, topic: str, batch: int) -> tuple[float, int]:
    data = tempfile.mkdtemp(prefix="tally-bench-ingest-")
    store = Store.open(data)
    settings = ConsumerSettings(
        bootstrap_servers=bootstrap,
        data_dir=data,
        topics={"scores": topic},
        batch_size=batch,
        http=None,
        progress_interval=3600,
    )
    proc = ConsumerProcess(settings, DEFINITIONS, store)
    t = time.perf_counter()
    await proc.run(until_caught_up=True, install_signals=False)
    dt = time.perf_counter() - t
    events = proc.stats.events + proc.stats.replayed
    store.close()
    shutil.rmtree(data, ignore_errors=True)
    return dt, events


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--ids", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument(
        "--rounds", type=int, default=1, help="alternate null-sink/tally this many times"
    )
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    args = ap.parse_args()
    if args.bootstrap_servers == "127.0.0.1:9092":
        subprocess.run(
            [str(ROOT / "scripts" / "kafka"), "start"], check=True, stdout=subprocess.DEVNULL
        )
    from tally.consumers.logs import configure_logging

    configure_logging("warning", "console")
    topic = f"bench-ingest-{int(time.time())}"
    dt = asyncio.run(produce(args.bootstrap_servers, topic, args.events, args.ids, args.partitions))
    print(f"produced {args.events:,} events to {topic} ({args.partitions} partitions) in {dt:.1f}s")
    best_null = best_tally = float("inf")
    for _ in range(args.rounds):
        best_null = min(
            best_null,
            asyncio.run(null_sink(args.bootstrap_servers, topic, args.events, args.batch_size)),
        )
        t, n = asyncio.run(tally(args.bootstrap_servers, topic, args.batch_size))
        assert n == args.events, f"tally consumed {n} events, expected {args.events}"
        best_tally = min(best_tally, t)
    a = args.events / best_null
    b = args.events / best_tally
    print(f"{'consumer':<34} {'events/s':>12}")
    print(f"{'(a) null sink (getmany + decode)':<34} {a:>12,.0f}")
    print(f"{'(b) tally, 2 aggregates':<34} {b:>12,.0f}")
    print(f"ratio (b)/(a) = {b / a:.2f}   peak RSS {rss_mib():,.0f} MiB")


if __name__ == "__main__":
    main()
