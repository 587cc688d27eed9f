"""HTTP API throughput: ``count`` requests/s with concurrent aiohttp clients.

    .venv/bin/python scripts/bench/http_api.py [--items 100000] [--clients 8]
        [--seconds 5] [--inprocess]

Builds a store of ``--items`` random items, serves it with
`tally.consumers.http.create_app` (a `ConsumerProcess` that is not consuming, so
nothing competes with the reads) in a server subprocess, and runs
``--clients`` concurrent aiohttp client tasks for ``--seconds`` each on:

* ``POST /v1/aggregates/bench/count`` with a random ``{"bounds": {"lower":
  ..., "upper": ...}}`` body (a real O(log n) range count per request);
* ``GET /healthz``: the same server with no work, the framework's floor;

and, side by side, the same range counts called directly on the engine in
one process (no HTTP). It prints requests/s and the ratios. ``--inprocess``
runs the server in the client's event loop instead (one core for both).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tally.consumers.http.app import create_app
from tally.consumers.runtime.process import ConsumerProcess
from tally.engine import Store, TableAggregate
from tally.schemas.config import ConsumerSettings

KEY_SPACE = 10**9
BENCH = TableAggregate("bench", table="bench", sort_key="k", sum_value="v")


def build(path: str, n: int, seed: int = 1) -> None:
    rnd = random.Random(seed)
    with Store.open(path) as store:
        agg = store.aggregate("bench")
        for start in range(0, n, 5000):
            with store.batch():
                for i in range(start, min(n, start + 5000)):
                    agg.insert(rnd.randrange(KEY_SPACE), i, 1)


def process(store: Store) -> ConsumerProcess:
    return ConsumerProcess(ConsumerSettings(http=None), [BENCH], store)


def bodies(count: int, seed: int = 2) -> list[bytes]:
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = sorted((rnd.randrange(KEY_SPACE), rnd.randrange(KEY_SPACE)))
        out.append(f'{{"bounds": {{"lower": {{"key": {a}}}, "upper": {{"key": {b}}}}}}}'.encode())
    return out


async def load(
    url: str, clients: int, seconds: float, post: list[bytes] | None
) -> tuple[float, int]:
    """Requests/s over ``clients`` concurrent tasks for ``seconds``; (rate, errors)."""
    done = 0
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        stop = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            nonlocal done, errors
            i = w
            headers = {"Content-Type": "application/json"}
            while time.perf_counter() < stop:
                if post is None:
                    resp = await session.get(url)
                else:
                    resp = await session.post(url, data=post[i % len(post)], headers=headers)
                    i += clients
                async with resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
                done += 1

        t = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        elapsed = time.perf_counter() - t
    return done / elapsed, errors


def engine_rate(path: str, post: list[bytes], seconds: float) -> float:
    import msgspec

    decoded = [msgspec.json.decode(b)["bounds"] for b in post]
    with Store.open(path) as store:
        agg = store.aggregate("bench")
        n = 0
        for b in decoded:  # warm the node cache, like the server's warm-up
            agg.count(bounds=b)
        stop = time.perf_counter() + seconds
        t = time.perf_counter()
        while time.perf_counter() < stop:
            for b in decoded[n % len(decoded) : n % len(decoded) + 1000]:
                agg.count(bounds=b)
            n += 1000
        return n / (time.perf_counter() - t)


def serve(path: str, port: int) -> None:
    async def main() -> None:
        store = Store.open(path)
        runner = web.AppRunner(create_app(process(store), None), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print("ready", flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()
        store.close()

    asyncio.run(main())


async def wait_up(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url + "/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"server at {url} did not come up in {timeout}s")
            await asyncio.sleep(0.05)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_inprocess(path: str, args: argparse.Namespace, post: list[bytes]) -> dict[str, Any]:
    store = Store.open(path)
    runner = web.AppRunner(create_app(process(store), None), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        await load(
            url + "/v1/aggregates/bench/count", args.clients, 1.0, post
        )  # warm the node cache
        count = await load(url + "/v1/aggregates/bench/count", args.clients, args.seconds, post)
        health = await load(url + "/healthz", args.clients, args.seconds, None)
    finally:
        await runner.cleanup()
        store.close()
    return {"count": count, "healthz": health}


async def run_subprocess(path: str, args: argparse.Namespace, post: list[bytes]) -> dict[str, Any]:
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", path, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_up(url)
        await load(
            url + "/v1/aggregates/bench/count", args.clients, 1.0, post
        )  # warm the node cache
        count = await load(url + "/v1/aggregates/bench/count", args.clients, args.seconds, post)
        health = await load(url + "/healthz", args.clients, args.seconds, None)
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(30)
    return {"count": count, "healthz": health}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=8, help="concurrent client tasks")
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    ap.add_argument("--inprocess", action="store_true", help="server in the client's event loop")
    ap.add_argument("--serve", metavar="DATA_DIR", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.port)
        return

    path = tempfile.mkdtemp(prefix="tally-bench-http-")
    try:
        t = time.perf_counter()
        build(path, args.items)
        print(
            f"store: {args.items:,} items built in {time.perf_counter() - t:.1f}s ({os.cpu_count()} CPUs)"
        )
        post = bodies(10_000)
        where = "same process" if args.inprocess else "server subprocess"
        runner = run_inprocess if args.inprocess else run_subprocess
        res = asyncio.run(runner(path, args, post))
        (count, count_err), (health, health_err) = res["count"], res["healthz"]
        direct = engine_rate(path, post, min(args.seconds, 3.0))
        print(f"{args.clients} concurrent aiohttp clients, {args.seconds:g}s each, {where}:")
        print(f"  POST count (random range)   {count:10,.0f} requests/s   errors {count_err}")
        print(f"  GET /healthz (no work)      {health:10,.0f} requests/s   errors {health_err}")
        print(f"  engine count, no HTTP       {direct:10,.0f} calls/s")
        print(f"  count / healthz             {count / health:10.2f}")
        print(f"  count over HTTP / engine    {count / direct:10.3f}")
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
