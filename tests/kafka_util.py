"""Small aiokafka helpers for integration tests against the real broker.

Each helper comes twice: an async one (``acreate_topic``, ``aproduce``,
``aread_all``) for async code, and a sync wrapper (``create_topic``,
``produce``, ``read_all``) that runs it with ``asyncio.run`` for ordinary sync
tests (don't call the sync ones from inside a running event loop).

``bootstrap`` is the ``kafka_bootstrap`` fixture's value, e.g. "127.0.0.1:9092".
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tally.consumers.topics import read_to_end

TOPIC_ALREADY_EXISTS = 36
KAFKA_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "kafka"

# (key, value) or (key, value, headers); headers: [(str, bytes), ...]
Record = (
    tuple[bytes | None, bytes | None]
    | tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes]]]
)
# (partition, offset, key, value, headers)
ReadRecord = tuple[int, int, bytes | None, bytes | None, list[tuple[str, bytes]]]


def kafka_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run scripts/kafka (start/stop/restart/status/logs) with this interpreter."""
    return subprocess.run(
        [sys.executable, str(KAFKA_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def unique_topic(prefix: str = "test") -> str:
    """A fresh, valid topic name: tests never see each other's records."""
    clean = re.sub(r"[^a-zA-Z0-9._-]+", "-", prefix).strip("-.") or "test"
    return f"{clean[:180]}-{uuid.uuid4().hex[:12]}"


async def acreate_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    compacted: bool = False,
    configs: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> None:
    """Create a topic (an existing one is left as it is) and wait until the
    broker's metadata shows all its partitions with a leader."""
    topic_configs = dict(configs or {})
    if compacted:
        topic_configs.setdefault("cleanup.policy", "compact")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        resp = await admin.create_topics(
            [NewTopic(name, partitions, 1, topic_configs=topic_configs or None)],
            timeout_ms=int(timeout * 1000),
        )
        for err in resp.topic_errors:
            topic, code = err[0], err[1]
            if code not in (0, TOPIC_ALREADY_EXISTS):
                msg = err[2] if len(err) > 2 else ""
                raise RuntimeError(f"creating topic {topic!r} failed: error {code} {msg}")
        deadline = time.monotonic() + timeout
        while True:
            # The topic exists now, so this metadata request cannot auto-create it.
            (meta,) = await admin.describe_topics([name])
            parts = meta.get("partitions") or []
            if (
                meta.get("error_code") == 0
                and len(parts) >= partitions
                and all(p.get("leader", -1) >= 0 for p in parts)
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name!r} not ready after {timeout}s: {meta!r}")
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


async def aproduce(
    bootstrap: str,
    topic: str,
    records: Sequence[Record],
    partition: int | None = None,
    max_request_size: int = 1048576,
) -> list[tuple[int, int]]:
    """Produce records (acks=all) in order; returns [(partition, offset), ...].

    With ``partition=None`` the default partitioner picks the partition by key
    (murmur2, like the Java client), so equal keys land in the same partition.
    A record with key and value both None (which ``send`` refuses, but Kafka
    holds) goes in a batch of its own, to ``partition`` or partition 0.
    ``max_request_size``: raise it to produce records over 1 MiB.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", max_request_size=max_request_size
    )
    await producer.start()
    try:
        futures = []
        for rec in records:
            key, value = rec[0], rec[1]
            headers = list(rec[2]) if len(rec) > 2 else None
            if key is None and value is None:
                batch = producer.create_batch()
                assert batch.append(key=None, value=None, timestamp=None, headers=headers or [])
                futures.append(await producer.send_batch(batch, topic, partition=partition or 0))
                continue
            futures.append(
                await producer.send(
                    topic, value=value, key=key, partition=partition, headers=headers
                )
            )
        metas = await asyncio.gather(*futures)
        return [(m.partition, m.offset) for m in metas]
    finally:
        await producer.stop()


async def aread_all(bootstrap: str, topic: str, timeout: float = 30.0) -> list[ReadRecord]:
    """Every record of every partition, from the beginning to the end offsets
    as of the call, sorted by (partition, offset). No consumer group is used."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if topic not in await admin.list_topics():
            raise LookupError(f"topic {topic!r} does not exist")
        (meta,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    tps = [TopicPartition(topic, p["partition"]) for p in meta["partitions"]]

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    out: list[ReadRecord] = []
    try:
        async for tp, msgs in read_to_end(consumer, tps, timeout):
            out.extend(
                (tp.partition, m.offset, m.key, m.value, list(m.headers or ())) for m in msgs
            )
    finally:
        await consumer.stop()
    out.sort(key=lambda r: (r[0], r[1]))
    return out


def create_topic(
    bootstrap: str,
    name: str,
    partitions: int = 1,
    compacted: bool = False,
    configs: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> None:
    asyncio.run(acreate_topic(bootstrap, name, partitions, compacted, configs, timeout))


def produce(
    bootstrap: str,
    topic: str,
    records: Sequence[Record],
    partition: int | None = None,
    max_request_size: int = 1048576,
) -> list[tuple[int, int]]:
    return asyncio.run(aproduce(bootstrap, topic, records, partition, max_request_size))


def read_all(bootstrap: str, topic: str, timeout: float = 30.0) -> list[ReadRecord]:
    return asyncio.run(aread_all(bootstrap, topic, timeout))


__all__ = [
    "ReadRecord",
    "Record",
    "acreate_topic",
    "aproduce",
    "aread_all",
    "create_topic",
    "kafka_script",
    "produce",
    "read_all",
    "unique_topic",
]
