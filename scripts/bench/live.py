"""Live-path benchmark: `tally consume` on a ready aggregate vs a null-sink consumer, one run.

    .venv/bin/python scripts/bench/live.py [--events 1000000] [--ids 200000] [--partitions 3]
        [--batch-size 5000] [--rounds 1] [--engine-events 300000]
        [--bootstrap-servers 127.0.0.1:9092]

The job: one table aggregate (per-game count and sum of scores, the latest row per id wins)
over ``--ids`` rows. Steps:

1. a fresh topic gets one row per id, and a ConsumerProcess builds the aggregate from it and
   stops caught up: the aggregate is *ready* (its generation is live) before the measured
   events arrive; that store is kept as a template;
2. ``--events`` random updates of those ids are produced after it (the consumer is stopped
   meanwhile, so producing does not share the 2 cores with the measurement);
3. alternating ``--rounds`` times: (a) a null sink — aiokafka getmany + msgspec decode of
   every value, nothing else — reads exactly those events; (b) a ConsumerProcess (what
   `tally consume` runs) on a copy of the template store applies them through its live
   stream (batches of ``--batch-size``, one commit with the offsets each) until caught up.
   Both clocks start when the first batch is in hand and stop after the last one, so
   neither counts connecting;
4. the drift benchmark's "tracking off" case on the same job, in process and without Kafka:
   ``--engine-events`` ChangeEvents planned, applied and committed in batches by an
   `Applier(drift=False)` over a store holding the same ids (engine only: no fetch, no decode).

Prints events/s of (a), (b) and (4) — (4) also per CPU second of this process — and the ratio
(b)/(a).
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
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from ingest import rss_mib

from tally.consumers.runtime.process import ConsumerProcess
from tally.engine import Store, TableAggregate
from tally.engine.triggers import Applier
from tally.schemas import ChangeEvent
from tally.schemas.config import ConsumerSettings

ROOT = Path(__file__).resolve().parents[2]

BY_GAME = TableAggregate(
    "by_game", table="scores", namespace="game", sort_key="score", sum_value="score"
)
GAMES = 20


def row(rid: int, rnd: random.Random) -> dict[str, Any]:
    return {
        "id": rid,
        "player": f"p{rid}",
        "game": f"g{rid % GAMES}",
        "score": int(rnd.paretovariate(1.5) * 100),
    }


async def produce(bootstrap: str, topic: str, rids: list[int], seed: int) -> float:
    """One native update event per id in ``rids``, keyed by id; returns seconds taken."""
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks=1)
    await p.start()
    enc = msgspec.json.Encoder()
    rnd = random.Random(seed)
    t = time.perf_counter()
    pending = []
    for rid in rids:
        v = enc.encode({"table": "scores", "op": "update", "id": rid, "after": row(rid, rnd)})
        pending.append(await p.send(topic, v, key=enc.encode(rid)))
        if len(pending) >= 20000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await p.stop()
    return time.perf_counter() - t


async def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, partitions, 1)])
    await admin.close()


async def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await c.start()
    parts = (await c._client.fetch_all_metadata()).partitions_for_topic(topic) or set()
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    ends = await c.end_offsets(tps)
    await c.stop()
    return dict(ends)


async def null_sink(bootstrap: str, start: dict[TopicPartition, int], n: int, batch: int) -> float:
    """Seconds to getmany + decode ``n`` records from ``start``, from the first batch on."""
    c = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=8 << 20,
        fetch_max_bytes=64 << 20,
    )
    await c.start()
    c.assign(list(start))
    for tp, off in start.items():
        c.seek(tp, off)
    dec = msgspec.json.Decoder()
    got = 0
    t: float | None = None
    while got < n:
        b = await c.getmany(timeout_ms=1000, max_records=batch)
        if b and t is None:
            t = time.perf_counter()
        for recs in b.values():
            for r in recs:
                dec.decode(r.value)
            got += len(recs)
    assert t is not None
    dt = time.perf_counter() - t
    await c.stop()
    return dt


class TimedProcess(ConsumerProcess):
    """A ConsumerProcess noting when its first live batch is in hand."""

    first: float | None = None

    async def _process(self, stream: Any, batch: Any, reached: Any = None) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        await super()._process(stream, batch, reached)


def settings(bootstrap: str, data: str, topic: str, batch: int) -> ConsumerSettings:
    return ConsumerSettings(
        bootstrap_servers=bootstrap,
        data_dir=data,
        topics={"scores": topic},
        batch_size=batch,
        http=None,
        progress_interval=3600,
    )


async def consume(bootstrap: str, data: str, topic: str, batch: int) -> tuple[float, int, int]:
    """Run a consumer on ``data`` until caught up: (seconds from its first batch, live
    events, replayed events)."""
    store = Store.open(data)
    proc = TimedProcess(settings(bootstrap, data, topic, batch), [BY_GAME], store)
    await proc.run(until_caught_up=True, install_signals=False)
    end = time.perf_counter()
    store.close()
    first = proc.first if proc.first is not None else end
    return end - first, proc.stats.events, proc.stats.replayed


def engine_only(ids: int, n: int, batch: int) -> tuple[float, float]:
    """Events/s of plan + apply + commit with drift tracking off, no Kafka (drift.py's
    'off' case on this job): by the wall clock, and by this process's CPU time (what a
    shared, loaded machine does not move much)."""
    tmp = tempfile.mkdtemp(prefix="tally-bench-live-engine-")
    try:
        rnd = random.Random(1)
        store = Store.open(tmp)
        app = Applier(store, [BY_GAME], drift=False)
        seed = [
            ChangeEvent("scores", "upsert", i, row(i, rnd), None, None, "c") for i in range(ids)
        ]
        for i in range(0, len(seed), 50_000):
            app.apply_events(seed[i : i + 50_000])
        evs = []
        for _ in range(n):
            rid = rnd.randrange(ids)
            evs.append(ChangeEvent("scores", "upsert", rid, row(rid, rnd), None, None, "u"))
        t, c = time.perf_counter(), time.process_time()
        for i in range(0, n, batch):
            app.apply_events(evs[i : i + batch])
        dt, dc = time.perf_counter() - t, time.process_time() - c
        store.close()
        return n / dt, n / dc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--ids", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=1, help="alternate null sink/tally this often")
    ap.add_argument("--engine-events", type=int, default=300_000, help="0 skips step 4")
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    args = ap.parse_args()
    boot = args.bootstrap_servers
    if boot == "127.0.0.1:9092":
        subprocess.run(
            [str(ROOT / "scripts" / "kafka"), "start"], check=True, stdout=subprocess.DEVNULL
        )
    from tally.consumers.logs import configure_logging

    configure_logging("error", "console")
    topic = f"bench-live-{int(time.time())}"
    work = Path(tempfile.mkdtemp(prefix="tally-bench-live-"))
    try:
        asyncio.run(create_topic(boot, topic, args.partitions))
        asyncio.run(produce(boot, topic, list(range(args.ids)), seed=1))
        template = str(work / "template")
        _, live, replayed = asyncio.run(consume(boot, template, topic, args.batch_size))
        assert live + replayed == args.ids, (live, replayed)
        start = asyncio.run(end_offsets(boot, topic))
        rnd = random.Random(2)
        rids = [rnd.randrange(args.ids) for _ in range(args.events)]
        dt = asyncio.run(produce(boot, topic, rids, seed=3))
        print(
            f"aggregate ready with {args.ids:,} ids; produced {args.events:,} updates to {topic} "
            f"({args.partitions} partitions) in {dt:.1f}s"
        )
        best_null = best_tally = float("inf")
        for r in range(args.rounds):
            best_null = min(best_null, asyncio.run(null_sink(boot, start, args.events, 5000)))
            data = str(work / f"round{r}")
            shutil.copytree(template, data)
            t, live, replayed = asyncio.run(consume(boot, data, topic, args.batch_size))
            assert (live, replayed) == (args.events, 0), (
                f"expected {args.events} live events and no replay, got {live} and {replayed}"
            )
            best_tally = min(best_tally, t)
            shutil.rmtree(data, ignore_errors=True)
        a, b = args.events / best_null, args.events / best_tally
        print(f"{'consumer':<44} {'events/s':>12}")
        print(f"{'(a) null sink (getmany + decode)':<44} {a:>12,.0f}")
        print(f"{'(b) tally live, 1 aggregate (ready)':<44} {b:>12,.0f}")
        print(f"ratio (b)/(a) = {b / a:.3f}   peak RSS {rss_mib():,.0f} MiB")
        if args.engine_events:
            wall, cpu = engine_only(args.ids, args.engine_events, args.batch_size)
            print(f"{'(c) engine only, drift tracking off':<44} {wall:>12,.0f}")
            print(f"{'    the same, per CPU second':<44} {cpu:>12,.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
