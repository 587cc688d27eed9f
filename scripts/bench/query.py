"""Query benchmark: in-process tally vs a Redis sorted set on loopback, one run.

    .venv/bin/python scripts/bench/query.py [--items 1000000] [--ops 20000]

Loads the same ``--items`` (score, id) pairs into a tally aggregate and a Redis
sorted set (redis-server from Debian's packages, started here on a free
loopback port and stopped at the end), then asks both the same questions:

  count     tally count(lower..upper)          vs ZCOUNT key lo hi
  index_of  tally index_of(score, id)          vs ZRANK key member
  at        tally at(i)                        vs ZRANGE key i i

Redis is asked over a single connection, no pipelining (a service asking one
question at a time). Prints ops/s of each and the ratio tally/Redis.
"""

from __future__ import annotations

import argparse
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from tally.engine import Store

KEY_SPACE = 10**9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, workdir: str) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        sys.exit(
            "redis-server not found: install it with `apt-get install -y redis-server` (Debian)"
        )
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("redis-server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--ops", type=int, default=20_000)
    args = ap.parse_args()
    import redis

    rnd = random.Random(3)
    n = args.items
    scores = [rnd.randrange(KEY_SPACE) for _ in range(n)]
    work = tempfile.mkdtemp(prefix="tally-bench-query-")
    port = free_port()
    rproc = start_redis(port, work)
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.zadd("z", {str(i): scores[i]})
            if i % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()

        store = Store.open(f"{work}/tally")
        agg = store.aggregate("bench")
        for start in range(0, n, 5000):
            with store.batch():
                for i in range(start, min(n, start + 5000)):
                    agg.insert(scores[i], str(i))
        store.checkpoint()

        ops = args.ops
        ranges = [sorted((rnd.randrange(KEY_SPACE), rnd.randrange(KEY_SPACE))) for _ in range(ops)]
        members = [rnd.randrange(n) for _ in range(ops)]
        offsets = [rnd.randrange(n) for _ in range(ops)]
        results: dict[str, tuple[float, float]] = {}

        def timed(fn) -> float:  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            fn()
            return ops / (time.perf_counter() - t)

        def t_count() -> None:
            for a, b in ranges:
                agg.count(bounds={"lower": {"key": a}, "upper": {"key": b}})

        def r_count() -> None:
            for a, b in ranges:
                r.zcount("z", a, b)

        def t_rank() -> None:
            for m in members:
                agg.index_of(scores[m], id=str(m))

        def r_rank() -> None:
            for m in members:
                r.zrank("z", str(m))

        def t_at() -> None:
            for i in offsets:
                agg.at(i)

        def r_at() -> None:
            for i in offsets:
                r.zrange("z", i, i, withscores=True)

        # sanity: both answer the same
        a, b = ranges[0]
        assert agg.count(bounds={"lower": {"key": a}, "upper": {"key": b}}) == r.zcount("z", a, b)
        m = members[0]
        assert agg.index_of(scores[m], id=str(m)) == r.zrank("z", str(m))

        results["count"] = (timed(t_count), timed(r_count))
        results["index_of"] = (timed(t_rank), timed(r_rank))
        results["at"] = (timed(t_at), timed(r_at))
        print(f"items={n:,} ops={ops:,} (Redis: one connection, no pipelining)")
        print(f"{'op':<10} {'tally ops/s':>12} {'Redis ops/s':>12} {'ratio':>7}")
        for op, (t, rr) in results.items():
            print(f"{op:<10} {t:>12,.0f} {rr:>12,.0f} {t / rr:>7.2f}")
        store.close()
    finally:
        rproc.terminate()
        rproc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
