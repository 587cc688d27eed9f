"""Shared pytest fixtures. One section per concern; add new ones below."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kafka_util import kafka_script

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
    res = kafka_script("start", "--port", port)
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that use the broker get the `kafka` marker: `pytest -m "not kafka"`
    # skips them. (If another section needs this hook too, merge it here.)
    for item in items:
        if "kafka_bootstrap" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kafka)
