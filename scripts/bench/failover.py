"""Failover timeline of a deployment: how long until every read is exact again, one run.

    .venv/bin/python scripts/bench/failover.py [--rows 300000] [--partitions 6] [--members 3]
        [--session-timeout-ms 6000] [--port-base 8760] [--bootstrap-servers 127.0.0.1:9092]

A fresh topic gets ``--rows`` rows (one per id); ``--members`` real `tally consume --group-id`
processes start on it, each with its own data dir. Then, in turn: a cold start, a kill -9 of
the second member, its restart, a clean stop (SIGTERM) of the last one. After each step the
first member's ``count`` is polled every 50 ms; the figure is the time from the step until
its first 200 answer, which must equal ``--rows`` (a 503 while partitions move is waited out;
any other answer fails the run). Between steps the group is left 2-3 s to settle.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from live import create_topic, produce

DEFS = """
from tally.engine import TableAggregate
everything = TableAggregate("everything", table="scores", sort_key="score")
"""


class Members:
    def __init__(self, args: argparse.Namespace, topic: str, root: Path) -> None:
        self.args, self.topic, self.root = args, topic, root
        self.defs = root / "defs.py"
        self.defs.write_text(DEFS)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def url(self, k: int) -> str:
        return f"http://127.0.0.1:{self.args.port_base + k}"

    def start(self, k: int) -> None:
        a = self.args
        tally = str(Path(sys.executable).parent / "tally")
        with open(self.root / f"m{k}.log", "ab") as log:
            self.procs[k] = subprocess.Popen(
                [
                    *(tally, "consume", str(self.defs), "--topic", f"scores={self.topic}"),
                    *("--group-id", f"{self.topic}-g", "--data-dir", str(self.root / f"m{k}")),
                    *("--http", f"127.0.0.1:{a.port_base + k}"),
                    *("--session-timeout-ms", str(a.session_timeout_ms)),
                    *("--bootstrap-servers", a.bootstrap_servers, "--log-format", "json"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


async def until_exact(session: aiohttp.ClientSession, url: str, want: int, t0: float) -> float:
    """Seconds from ``t0`` to the first 200 ``count`` at ``url``; it must be ``want``."""
    while True:
        try:
            async with session.post(url + "/v1/aggregates/everything/count", data="{}") as r:
                body = await r.json()
                if r.status == 200:
                    if body["result"] != want:
                        raise SystemExit(f"wrong answer from {url}: {body} (want {want})")
                    return time.monotonic() - t0
                if r.status != 503:
                    raise SystemExit(f"unexpected answer from {url}: {r.status} {body}")
        except aiohttp.ClientConnectionError:
            pass  # not listening yet
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace, m: Members) -> list[tuple[str, float]]:
    rows, last = args.rows, args.members - 1
    out = []
    async with aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        for k in range(args.members):
            m.start(k)
        out.append(
            (f"cold start of {args.members} members", await until_exact(s, m.url(0), rows, t0))
        )
        await asyncio.sleep(3)
        m.procs[1].kill()
        t0 = time.monotonic()
        await asyncio.sleep(0.3)  # reads go on answering until the kill is noticed
        out.append(("kill -9 of a member", await until_exact(s, m.url(0), rows, t0)))
        await asyncio.sleep(2)
        t0 = time.monotonic()
        m.start(1)
        await asyncio.sleep(1.0)
        out.append(("the killed member restarts", await until_exact(s, m.url(0), rows, t0)))
        await asyncio.sleep(2)
        m.procs[last].send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        await asyncio.sleep(0.3)
        out.append(("a clean stop (SIGTERM)", await until_exact(s, m.url(0), rows, t0)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--partitions", type=int, default=6)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--session-timeout-ms", type=int, default=6000)
    ap.add_argument("--port-base", type=int, default=8760)
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    args = ap.parse_args()
    if args.members < 3:
        ap.error("--members must be at least 3 (one is killed, one stopped, one read)")
    topic = f"bench-failover-{int(time.time())}"
    root = Path(tempfile.mkdtemp(prefix="tally-bench-failover-"))
    m = Members(args, topic, root)
    try:
        asyncio.run(create_topic(args.bootstrap_servers, topic, args.partitions))
        asyncio.run(produce(args.bootstrap_servers, topic, list(range(args.rows)), seed=1))
        steps = asyncio.run(run(args, m))
    finally:
        m.stop_all()
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{args.members} members, {args.partitions} partitions, {args.rows:,} rows, "
        f"session timeout {args.session_timeout_ms} ms"
    )
    for what, seconds in steps:
        print(f"{what:<40} exact again after {seconds:6.2f} s")


if __name__ == "__main__":
    main()
