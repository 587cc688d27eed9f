"""Demo benchmark: wall time of `tally demo --short`, end to end, a few runs.

    .venv/bin/python scripts/bench/demo.py [--runs 3] [--bootstrap-servers 127.0.0.1:9092]

Each run is a new process on a new topic and a new data dir: Python start-up and
imports, topic creation, producing the short demo's 2,000 change events (paced
over about 2 s), the consumer building and applying them, and the check of every
answer against the in-memory oracle, until the process exits. Then the same data
dir resumed with 300 more events (what a second `tally demo` run does).

Prints each run's seconds and the median of both. (This figure used to be a
`took < 60` assertion in tests/test_cli.py; a functional test on a shared CI
machine is no place for a wall-clock bound.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TALLY = Path(sys.executable).parent / "tally"


def run_demo(bootstrap: str, topic: str, data_dir: Path, *extra: str) -> float:
    """Seconds one `tally demo --short` took; fails loudly if it did not verify."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    args = [
        str(TALLY),
        "demo",
        "--short",
        "--no-http",
        "--plain",
        "--bootstrap-servers",
        bootstrap,
        "--topic",
        topic,
        "--seed",
        "7",
        "--data-dir",
        str(data_dir),
        *extra,
    ]
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, check=False)
    took = time.perf_counter() - t0
    if res.returncode != 0 or "verified against an in-memory oracle: ✓" not in res.stdout:
        raise SystemExit(f"tally demo failed (exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    args = ap.parse_args()
    host, _, port = args.bootstrap_servers.rpartition(":")
    if host in ("127.0.0.1", "localhost"):  # a local broker: start it if nothing answers
        subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "kafka"), "start", "--port", port],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    first: list[float] = []
    again: list[float] = []
    with tempfile.TemporaryDirectory(prefix="tally-bench-demo-") as tmp:
        for i in range(args.runs):
            topic = f"bench-demo-{uuid.uuid4().hex[:8]}"
            data_dir = Path(tmp) / f"run{i}"
            first.append(run_demo(args.bootstrap_servers, topic, data_dir))
            again.append(run_demo(args.bootstrap_servers, topic, data_dir, "--events", "300"))
            print(
                f"run {i + 1}: demo --short {first[-1]:.2f}s, resumed with 300 more {again[-1]:.2f}s",
                flush=True,
            )
    print(
        f"median of {args.runs}: demo --short {statistics.median(first):.2f}s, "
        f"resumed {statistics.median(again):.2f}s"
    )


if __name__ == "__main__":
    main()
