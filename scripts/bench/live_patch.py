"""Live patch benchmark: `tally reconcile --patch --url` (inside a running consumer) vs offline `--patch`.

    .venv/bin/python scripts/bench/live_patch.py [--rows 200000] [--drift 0.01]
        [--pg-port 25432] [--bootstrap-servers 127.0.0.1:9092]

Starts Postgres (scripts/postgres) and Kafka (scripts/kafka) if they are not
running, fills a table with ``--rows`` rows and a topic with one insert event
per row, and runs `tally consume` (HTTP API with a token) until it holds them
all. Then, twice, ``--drift`` of the rows are changed in Postgres without
events and the aggregate is repaired with the CLI: first live through the
running consumer, then — consumer stopped — offline. Prints rows/s of each
whole `tally reconcile` run (process start, source read, diff, patch) and the
ratio live/offline; checks after each that a dry run is in sync.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parents[2]
TALLY = str(Path(sys.executable).with_name("tally"))
TABLE = "bench_live_patch"
TOKEN = "bench"
DEFS = f"""
from tally.engine import TableAggregate
scores = TableAggregate("scores", table={TABLE!r}, sort_key="score", sum_value="score", namespace="game")
"""


def run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed: {r.stderr or r.stdout}")


async def produce(bootstrap: str, topic: str, n: int) -> None:
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 2, 1)])
    await admin.close()
    p = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=1 << 20, acks=1)
    await p.start()
    enc = msgspec.json.Encoder()
    pending = []
    for i in range(1, n + 1):
        row = {"id": i, "game": f"g{i % 10}", "score": (i * 7919) % 1000003}
        ev = {"table": TABLE, "op": "insert", "id": i, "after": row}
        pending.append(await p.send(topic, enc.encode(ev), key=enc.encode(i)))
        if len(pending) >= 20000:
            await asyncio.gather(*pending)
            pending.clear()
    await asyncio.gather(*pending)
    await p.stop()


def status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=5) as r:
        return json.loads(r.read())


def drift(pg: str, n: int, share: float, round_: int) -> int:
    import psycopg

    k = max(1, int(n * share))
    step = max(1, n // k)
    ids = list(range(1 + round_, n + 1, step))[:k]
    with psycopg.connect(pg, autocommit=True) as c:
        c.execute(f"UPDATE {TABLE} SET score = score + 1 WHERE id = ANY(%s)", (ids,))
    return len(ids)


def reconcile(tmp: Path, pg: str, *extra: str) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run(
        [
            TALLY,
            "reconcile",
            "scores",
            "--source",
            pg,
            "--definitions",
            str(tmp / "defs.py"),
            "--data-dir",
            str(tmp / "data"),
            "--json",
            "--progress",
            "none",
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"tally reconcile failed: {r.stderr}")
    return dt, json.loads(r.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--drift", type=float, default=0.01)
    ap.add_argument("--pg-port", type=int, default=25432)
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    a = ap.parse_args()
    pg = f"postgresql://postgres@127.0.0.1:{a.pg_port}/tally"
    run(sys.executable, str(ROOT / "scripts" / "postgres"), "start", "--port", str(a.pg_port))
    run(str(ROOT / "scripts" / "kafka"), "start", "--port", a.bootstrap_servers.rsplit(":", 1)[1])
    import psycopg

    n = a.rows
    with psycopg.connect(pg, autocommit=True) as c:
        c.execute(f"DROP TABLE IF EXISTS {TABLE}")
        c.execute(
            f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, game text NOT NULL, score integer NOT NULL)"
        )
        c.execute(
            f"INSERT INTO {TABLE} SELECT g, 'g' || (g %% 10), (g::bigint * 7919) %% 1000003 "
            "FROM generate_series(1, %s) g",
            (n,),
        )
        c.execute(f"VACUUM ANALYZE {TABLE}")
    topic = f"bench-live-patch-{int(time.time())}"
    asyncio.run(produce(a.bootstrap_servers, topic, n))
    tmp = Path(tempfile.mkdtemp(prefix="tally-bench-live-patch-"))
    (tmp / "defs.py").write_text(DEFS)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with open(tmp / "consume.log", "wb") as log:
        proc = subprocess.Popen(
            [
                TALLY,
                "consume",
                str(tmp / "defs.py"),
                "--topic",
                f"{TABLE}={topic}",
                "--data-dir",
                str(tmp / "data"),
                "--http",
                f"127.0.0.1:{port}",
                "--token",
                TOKEN,
                "--bootstrap-servers",
                a.bootstrap_servers,
                "--log-format",
                "json",
            ],
            stderr=log,
            stdout=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 600
            while True:
                try:
                    st = status(url)
                    agg = st["aggregates"][0]
                    if agg["state"] == "ready" and agg["items"] == n and st["lag"] == 0:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit(f"the consumer did not catch up; log in {tmp / 'consume.log'}")
                time.sleep(0.2)
            print(f"{n} rows in Postgres and in the consumer; {a.drift:.1%} drift per run")
            k = drift(pg, n, a.drift, 0)
            t_live, rep = reconcile(tmp, pg, "--patch", "--url", url, "--token", TOKEN)
            assert rep["patched"] == k, rep
            print(
                f"live    (--patch --url): {k} fixes, {t_live:.2f} s, {rep['rows_scanned'] / t_live:,.0f} rows/s"
            )
            _, check = reconcile(tmp, pg)
            assert check["missing"] + check["extra"] + check["wrong"] == 0, check
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    try:
        k = drift(pg, n, a.drift, 1)
        t_off, rep = reconcile(tmp, pg, "--patch")
        assert rep["patched"] == k, rep
        print(
            f"offline (--patch):       {k} fixes, {t_off:.2f} s, {rep['rows_scanned'] / t_off:,.0f} rows/s"
        )
        _, check = reconcile(tmp, pg)
        assert check["missing"] + check["extra"] + check["wrong"] == 0, check
        print(f"ratio live/offline (rows/s): {t_off / t_live:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
