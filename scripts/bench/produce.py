"""Produce benchmark: `tally produce --dry-run` over a big JSON Lines and CSV file.

    .venv/bin/python scripts/bench/produce.py [--rows 1000000] [--runs 3] [--baseline DIR]

The dry run reads, checks and encodes every row exactly as a real run does (the row
reader of `tally.consumers.rows`, the change events, the Kafka keys and values) and publishes
nothing, so it measures the input side a real run feeds the producer from. Each run is a
new process (`python -m tally.consumers.cli.produce`), timed from the outside: wall seconds, and
the CPU seconds (user + system) the process used, which load from other jobs on a shared
machine moves much less.

``--baseline DIR``: a source tree of another revision (``git archive REV consumers engine
schemas | tar -x -C DIR``), put first on ``PYTHONPATH``; its runs alternate with the
current tree's, so load on a shared machine falls on both alike. Prints the median wall
and CPU seconds and rows/s of each, and the CPU-time ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GAMES = ("chess", "go", "poker", "tetris")


def write_files(directory: Path, rows: int) -> dict[str, Path]:
    """The same ``rows`` rows as JSON Lines and as CSV (seeded: every run reads the same)."""
    rng = random.Random(1)
    jsonl, csv = directory / "rows.jsonl", directory / "rows.csv"
    with open(jsonl, "w") as j, open(csv, "w") as c:
        c.write("id,player,game,score,ratio\n")
        for i in range(rows):
            player, game = f"p{rng.randrange(50_000)}", rng.choice(GAMES)
            score, ratio = rng.randrange(3000), rng.random()
            j.write(
                json.dumps(
                    {"id": i, "player": player, "game": game, "score": score, "ratio": ratio}
                )
            )
            j.write("\n")
            c.write(f"{i},{player},{game},{score},{ratio}\n")
    return {"jsonl": jsonl, "csv": csv}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(path: Path, rows: int, pythonpath: str | None) -> tuple[float, float]:
    """(wall, CPU) seconds of one dry run; fails loudly unless it checked every row."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    args = [
        sys.executable,
        "-m",
        "tally.consumers.cli.produce",
        "--table",
        "scores",
        "--topic",
        "t",
        "--dry-run",
        str(path),
    ]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    took, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if res.returncode != 0 or f"checked {rows:,} events" not in res.stdout:
        raise SystemExit(f"dry run failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return took, cpu


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", metavar="DIR", help="source tree of the revision to compare with")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tally-bench-produce-") as tmp:
        files = write_files(Path(tmp), args.rows)
        variants: dict[str, str | None] = {"current": None}
        if args.baseline:
            variants = {"baseline": str(Path(args.baseline).resolve()), **variants}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.runs):
            for fmt, path in files.items():
                for name, pythonpath in variants.items():
                    times.setdefault((fmt, name), []).append(run_once(path, args.rows, pythonpath))
        for fmt, path in files.items():
            size = path.stat().st_size / 2**20
            print(f"{fmt} ({args.rows:,} rows, {size:.0f} MiB), {args.runs} runs each:")
            cpus = {}
            for name in variants:
                wall = statistics.median(w for w, _ in times[(fmt, name)])
                cpu = cpus[name] = statistics.median(c for _, c in times[(fmt, name)])
                print(
                    f"  {name:8} wall {wall:.2f} s, CPU {cpu:.2f} s "
                    f"({args.rows / cpu:,.0f} rows per CPU second)"
                )
            if "baseline" in cpus:
                print(f"  CPU time current/baseline {cpus['current'] / cpus['baseline']:.2f}")


if __name__ == "__main__":
    main()
