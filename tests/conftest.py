"""Shared pytest fixtures. One section per concern; add new ones below."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import budget
import pytest
from hypothesis import settings
from kafka_util import kafka_script

# The Hypothesis side of tests/budget.py: tests that set no example count of their own get a
# tenth of Hypothesis' default under TALLY_TEST_BUDGET=dev (scripts/test-fast).
settings.register_profile("dev", max_examples=10)
if budget.DEV:
    settings.load_profile("dev")

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
        pytest.fail(
            f"scripts/kafka start --port {port} took over {e.timeout:.0f}s (fetching Kafka from "
            "Maven Central on first use?); run it once by hand to see where it stops",
            pytrace=False,
        )
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
        res = subprocess.run(
            [*script, "start", "--port", port], capture_output=True, text=True, timeout=600
        )
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
        subprocess.run(
            [*script, "stop", "--port", port], capture_output=True, text=True, timeout=120
        )


# ============================================================== Kafka Connect + Debezium
# A real Kafka Connect worker (standalone) with the Debezium PostgreSQL connector,
# run by scripts/connect (jars from Maven Central on first use, cached in
# $TALLY_CACHE_DIR), against the broker and the Postgres above. Started if nothing
# answers on the port, stopped at the end only if started here.
# Port: $TALLY_TEST_CONNECT_PORT (default 8083). Helpers: tests/debezium_util.py.
# Without java/mvn the tests skip on a developer machine and FAIL under CI.


@pytest.fixture(scope="session")
def connect_url(kafka_bootstrap: str, pg_url: str) -> Iterator[str]:
    """REST URL of a Connect worker that offers the Debezium Postgres connector."""
    import shutil

    from debezium_util import connect_script

    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        unavailable("Kafka Connect needs a JDK 17+ (`java`); install one or set JAVA_HOME")
    port = os.environ.get("TALLY_TEST_CONNECT_PORT") or "8083"
    t0 = time.monotonic()
    try:
        res = connect_script("start", "--port", port, "--kafka", kafka_bootstrap)
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"scripts/connect start --port {port} took over {e.timeout:.0f}s (fetching "
            "the jars from Maven Central?); run it by hand to see where it stops",
            pytrace=False,
        )
    if res.returncode != 0:
        msg = f"{res.stdout}{res.stderr}".strip()
        if "no `mvn` found" in msg or "no `java` found" in msg:
            unavailable(f"Kafka Connect unavailable: {msg}")
        pytest.fail(
            f"scripts/connect start --port {port} failed (exit {res.returncode}):\n{msg}",
            pytrace=False,
        )
    print(f"\n{res.stdout.strip()} [{time.monotonic() - t0:.1f}s]", file=sys.stderr)
    started_here = "reusing" not in res.stdout
    _require_logical_decoding(pg_url)
    yield f"http://127.0.0.1:{port}"
    if started_here:
        connect_script("stop", "--port", port, timeout=120)


def _require_logical_decoding(pg_url: str) -> None:
    psycopg = pytest.importorskip("psycopg", reason="psycopg is needed for the Debezium tests")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute("select current_setting('wal_level')").fetchone()
    if row is None or row[0] != "logical":
        pytest.fail(
            f"Postgres at {pg_url} has wal_level={row and row[0]}: Debezium needs "
            "logical; restart it with scripts/postgres (stop, then start)",
            pytrace=False,
        )


@pytest.fixture
def debezium(
    connect_url: str, kafka_bootstrap: str, pg_url: str, request: pytest.FixtureRequest
) -> Iterator[Any]:
    """A tests/debezium_util.Debezium factory; removes its connectors, slots, topics, tables."""
    from debezium_util import debezium_factory

    with debezium_factory(connect_url, kafka_bootstrap, pg_url, tag=request.node.name[:12]) as dbz:
        yield dbz


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Markers follow the fixtures a test uses, so they cannot drift from what it needs:
    # the broker → `kafka`, PostgreSQL → `postgres`, Kafka Connect → `debezium` (and the
    # other two). `pytest -m "not kafka and not postgres"` is the no-services loop.
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "kafka_bootstrap" in names:
            item.add_marker(pytest.mark.kafka)
        if "pg_url" in names:
            item.add_marker(pytest.mark.postgres)
        if "connect_url" in names:
            item.add_marker(pytest.mark.debezium)
