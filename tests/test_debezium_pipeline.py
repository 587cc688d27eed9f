"""The real Debezium pipeline end to end, without tally: SQL → Debezium → Kafka records.

Postgres (logical decoding, scripts/postgres) → Kafka Connect with the Debezium
PostgreSQL connector (scripts/connect) → the local broker. These tests prove the
fixture (tests/debezium_util.py) gives what later tests rely on: the snapshot is on
the topic when `connector()` returns, every later change arrives as its envelope in
commit order, and teardown leaves no replication slot behind.
"""

from __future__ import annotations

from typing import Any

import pytest
from debezium_util import DbzRecord, Debezium, debezium_factory

pytestmark = pytest.mark.debezium


def ids(recs: list[DbzRecord]) -> list[tuple[str | None, int]]:
    """(op, id) per record; the id from the key (tombstones have no value)."""
    return [(r.op, r.key_payload["id"]) for r in recs]


def test_snapshot_then_live_changes_arrive_as_sql_made_them(debezium: Debezium) -> None:
    t = debezium.create_table("items", "id int primary key, v text not null, n int not null")
    debezium.sql(f"insert into {t} select g, 'v' || g, g from generate_series(1, 100) g")
    conn = debezium.connector([t])

    snap = conn.read(t)  # no waiting: connector() returned once the snapshot was there
    assert sorted(ids(snap)) == [("r", i) for i in range(1, 101)]
    assert {r.envelope["source"]["snapshot"] for r in snap} <= {"first", "true", "last"}

    expected: list[tuple[str | None, int]] = []
    for i in range(1, 21):  # one transaction per statement: commit order == topic order
        debezium.sql(f"update {t} set n = n + 1000 where id = {i}")
        expected.append(("u", i))
    for i in range(81, 101):
        debezium.sql(f"delete from {t} where id = {i}")
        expected += [("d", i), ("tombstone", i)]
    for i in range(101, 111):
        debezium.sql(f"insert into {t} values ({i}, 'new', {i})")
        expected.append(("c", i))

    recs = conn.wait_records(t, len(snap) + len(expected))
    live = recs[len(snap) :]
    assert ids(live) == expected
    assert all(r.envelope["source"]["snapshot"] == "false" for r in live if r.value)
    lsns = [r.envelope["source"]["lsn"] for r in live if r.value]
    assert lsns == sorted(lsns)  # sequential transactions: positions only move forward

    # Folding the envelopes' row images gives exactly the table.
    state: dict[int, dict[str, Any]] = {}
    for r in recs:
        env = r.envelope
        if env is None:
            continue
        if env["op"] == "d":
            state.pop(env["before"]["id"])
        else:
            state[env["after"]["id"]] = env["after"]
    table = debezium.sql(f"select id, v, n from {t} order by id")
    assert sorted((a["id"], a["v"], a["n"]) for a in state.values()) == table


def test_teardown_drops_slot_publication_and_topics(
    connect_url: str, kafka_bootstrap: str, pg_url: str
) -> None:
    with debezium_factory(connect_url, kafka_bootstrap, pg_url, tag="teardown") as dbz:
        t = dbz.create_table("gone", "id int primary key")
        dbz.sql(f"insert into {t} values (1)")
        conn = dbz.connector([t])
        assert dbz.sql(
            "select active from pg_replication_slots where slot_name = %s", [conn.slot]
        ) == [(True,)]
        topic = conn.topic(t)
        assert dbz.topic_exists(topic)
    with debezium_factory(connect_url, kafka_bootstrap, pg_url, tag="check") as check:
        slots = "select 1 from pg_replication_slots where slot_name = %s"
        assert check.sql(slots, [conn.slot]) == []
        pubs = "select 1 from pg_publication where pubname = %s"
        assert check.sql(pubs, [conn.publication]) == []
        assert check.sql("select to_regclass(%s)", [t]) == [(None,)]
        assert not check.topic_exists(topic)
