"""Shared pytest fixtures. One section per concern; add new ones below."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka_util import kafka_script

ROOT = Path(__file__).resolve().parents[1]

# ============================================================== Kafka broker
# A real single-node broker run by scripts/kafka (no Docker). The session
# fixture starts it if nothing answers on the port, and stops it at the end
# only if it started it: a broker that was already running is left alone.
# Port: $TALLY_TEST_KAFKA_PORT (default 9092). Helpers: tests/kafka_util.py.


@pytest.fixture(scope="session")
def kafka_port() -> int:
    return int(os.environ.get("TALLY_TEST_KAFKA_PORT") or 9092)


@pytest.fixture(scope="session")
def kafka_bootstrap(kafka_port: int) -> Iterator[str]:
    """Bootstrap address ("127.0.0.1:PORT") of a running broker, started if needed."""
    port = str(kafka_port)
    try:
        res = kafka_script("start", "--port", port)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"scripts/kafka start --port {port} took over {e.timeout:.0f}s (fetching Kafka from "
                    "Maven Central on first use?); run it once by hand to see where it stops", pytrace=False)
    if res.returncode != 0:
        pytest.fail(
            f"scripts/kafka start --port {port} failed (exit {res.returncode}):\n"
            f"{res.stdout}{res.stderr}",
            pytrace=False,
        )
    # `start` prints "kafka: reusing ..." when a broker already answered.
    started_here = "reusing" not in res.stdout
    yield f"127.0.0.1:{port}"
    if started_here:
        kafka_script("stop", "--port", port)


# ============================================================== PostgreSQL
# A real server run by scripts/postgres (Debian's packages, installed with
# apt-get if missing; a throwaway cluster under $TALLY_CACHE_DIR/pg-PORT).
# Tests skip with the reason when it cannot be installed or started.
# Port: $TALLY_TEST_PG_PORT (default 25432).


def unavailable(reason: str) -> None:
    """Skip on a developer machine without Postgres; fail under CI, where skipping would hide tests."""
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A running server's URL; stopped at the end only if started here (like the Kafka fixture)."""
    port = os.environ.get("TALLY_TEST_PG_PORT") or "25432"
    script = [sys.executable, str(ROOT / "scripts" / "postgres")]
    try:
        res = subprocess.run([*script, "start", "--port", port], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        unavailable("scripts/postgres start timed out (apt-get or initdb too slow?)")
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip()
        if "apt-get" in msg or "not installed" in msg:
            unavailable(f"PostgreSQL unavailable (cannot install it here): {msg}")
        pytest.fail(f"scripts/postgres start failed (exit {res.returncode}): {msg}", pytrace=False)
    started_here = "reusing" not in res.stdout
    yield f"postgresql://postgres@127.0.0.1:{port}/tally"
    if started_here:
        subprocess.run([*script, "stop", "--port", port], capture_output=True, text=True, timeout=120)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that use the broker get the `kafka` marker: `pytest -m "not kafka"`
    # skips them. (If another section needs this hook too, merge it here.)
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
