"""The local broker (scripts/kafka) and the test helpers, against a real Kafka."""

from __future__ import annotations

import asyncio
from collections import defaultdict

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from kafka_util import Record, create_topic, kafka_script, produce, read_all, unique_topic


def test_produce_and_read_back_keyed_records_on_three_partitions(kafka_bootstrap: str) -> None:
    topic = unique_topic("broker-roundtrip")
    create_topic(kafka_bootstrap, topic, partitions=3)
    create_topic(kafka_bootstrap, topic, partitions=3)  # already exists: ignored

    records: list[Record] = [(f"row-{i % 12}".encode(), f"v{i}".encode()) for i in range(60)]
    records.append((b"row-0", None))  # a tombstone
    records.append((None, b"keyless"))
    records.append((b"row-1", b"with-headers", [("source", b"test"), ("n", b"\x00\x01")]))
    placed = produce(kafka_bootstrap, topic, records)
    assert len(placed) == len(records)

    got = read_all(kafka_bootstrap, topic)
    assert len(got) == len(records)
    # What the producer was told is exactly what is stored.
    assert sorted(placed) == [(p, o) for p, o, *_ in got]
    by_pos = {(p, o): (k, v, h) for p, o, k, v, h in got}
    for rec, pos in zip(records, placed, strict=True):
        key, value, headers = by_pos[pos]
        assert (key, value) == (rec[0], rec[1])
        assert headers == (list(rec[2]) if len(rec) > 2 else [])

    # Keys spread over all 3 partitions, one partition per key, produce order kept.
    partitions_of_key: dict[bytes, set[int]] = defaultdict(set)
    for p, _o, k, _v, _h in got:
        if k is not None:
            partitions_of_key[k].add(p)
    assert all(len(ps) == 1 for ps in partitions_of_key.values())
    assert {p for p, *_ in got} == {0, 1, 2}
    for key in partitions_of_key:
        expected = [r[1] for r in records if r[0] == key]
        assert [v for _p, _o, k, v, _h in got if k == key] == expected


def test_explicit_partition_and_compacted_topic(kafka_bootstrap: str) -> None:
    topic = unique_topic("broker-compacted")
    create_topic(kafka_bootstrap, topic, partitions=2, compacted=True)
    placed = produce(kafka_bootstrap, topic, [(b"a", b"1"), (b"b", b"2")], partition=1)
    assert [p for p, _ in placed] == [1, 1]
    got = read_all(kafka_bootstrap, topic)
    assert [(p, o, k, v) for p, o, k, v, _h in got] == [(1, 0, b"a", b"1"), (1, 1, b"b", b"2")]

    async def cleanup_policy() -> str:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            (resp,) = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, topic)]
            )
            entries = resp.resources[0][4]
            policy: str = {e[0]: e[1] for e in entries}["cleanup.policy"]
            return policy
        finally:
            await admin.close()

    assert asyncio.run(cleanup_policy()) == "compact"


def test_read_all_of_an_empty_topic(kafka_bootstrap: str) -> None:
    topic = unique_topic("broker-empty")
    create_topic(kafka_bootstrap, topic, partitions=3)
    assert read_all(kafka_bootstrap, topic, timeout=5) == []


def test_script_status_and_start_reuses_running_broker(
    kafka_bootstrap: str, kafka_port: int
) -> None:
    status = kafka_script("status", "--port", str(kafka_port))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "running on" in status.stdout

    again = kafka_script("start", "--port", str(kafka_port))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "reusing" in again.stdout
