"""A real Debezium pipeline for tests: Postgres (logical decoding) → Kafka Connect → the broker.

The session fixture ``connect_url`` (tests/conftest.py) runs a Kafka Connect worker with
the Debezium PostgreSQL connector (scripts/connect). The function fixture ``debezium``
gives a :class:`Debezium` factory: it creates tables with unique names, registers
connectors (unique connector name, replication slot, publication and topic prefix, so
tests never see each other's changes), waits until each connector's initial snapshot is
on its topics and its replication stream is open, and at the end removes every
connector, drops its slot (a slot left behind makes Postgres keep WAL forever) and
publication, deletes its topics and drops the tables.

    def test_x(debezium: Debezium) -> None:
        t = debezium.create_table("orders", "id int primary key, amount numeric(12,2)")
        debezium.sql(f"insert into {t} values (1, 9.99)")
        conn = debezium.connector([t], {"decimal.handling.mode": "string"})
        assert [r.op for r in conn.read(t)] == ["r"]  # the snapshot is there already
        debezium.sql(f"update {t} set amount = 1 where id = 1")
        recs = conn.wait_records(t, 2)

Every change made after :meth:`Debezium.connector` returns is streamed (op c/u/d/t),
never part of the snapshot (op r). Records are the raw Kafka bytes; :class:`DbzRecord`
parses them for convenience (``envelope`` strips the ``schema``/``payload`` wrapper).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from kafka_util import create_topic, read_all

CONNECT_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "connect"
POSTGRES_CONNECTOR = "io.debezium.connector.postgresql.PostgresConnector"


def connect_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run scripts/connect (start/stop/status/logs/fetch) with this interpreter."""
    return subprocess.run(
        [sys.executable, str(CONNECT_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# ---------------------------------------------------------------- REST


class ConnectError(RuntimeError):
    """The Connect REST API refused a request, or a connector did not get where asked."""


def rest(url: str, method: str = "GET", body: Any = None, timeout: float = 30.0) -> Any:
    """One Connect REST call; the decoded JSON answer (None for 204/404 on DELETE)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    req.add_header("Accept", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise ConnectError(f"{method} {url} → HTTP {exc.code}: {detail}") from None
    return json.loads(raw) if raw else None


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class DbzRecord:
    """One record as the connector wrote it (raw bytes), with parsing helpers."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @property
    def key_json(self) -> Any:
        return None if self.key is None else json.loads(self.key)

    @property
    def value_json(self) -> Any:
        return None if self.value is None else json.loads(self.value)

    @property
    def envelope(self) -> Any:
        """The value without the converter's {"schema", "payload"} wrapper (None: tombstone)."""
        return unwrap(self.value_json)

    @property
    def key_payload(self) -> Any:
        return unwrap(self.key_json)

    @property
    def op(self) -> str | None:
        """The envelope's op (c/r/u/d/t); "tombstone" for a null value and for a value
        that is JSON null or a null payload (the unwrap SMT's default delete); None if
        absent (ExtractNewRecordState output without add.fields=op)."""
        env = self.envelope
        if env is None:
            return "tombstone"
        op: str | None = env.get("op", env.get("__op"))
        return op

    def header(self, name: str) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


def unwrap(doc: Any) -> Any:
    """Strip the JsonConverter's schemas.enable=true wrapper when present."""
    if isinstance(doc, dict) and set(doc) == {"schema", "payload"}:
        return doc["payload"]
    return doc


# ---------------------------------------------------------------- connectors


@dataclass
class Connector:
    """A registered Debezium connector and the topics of its tables."""

    name: str
    prefix: str
    slot: str
    publication: str
    tables: list[str]
    config: dict[str, str]
    owner: Debezium = field(repr=False)

    def topic(self, table: str) -> str:
        """Debezium's topic for a table: <topic.prefix>.<schema>.<table>."""
        return f"{self.prefix}.public.{table}"

    def read(self, table: str) -> list[DbzRecord]:
        """Every record on the table's topic now, by (partition, offset)."""
        return [DbzRecord(*r) for r in read_all(self.owner.bootstrap, self.topic(table))]

    def wait_records(
        self,
        table: str,
        count: int,
        timeout: float = 60.0,
        until: Callable[[list[DbzRecord]], bool] | None = None,
    ) -> list[DbzRecord]:
        """Poll the table's topic until it holds at least ``count`` records (and ``until``
        holds); fails with the connector's status if the task died meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            recs = self.read(table) if self.owner.topic_exists(self.topic(table)) else []
            if len(recs) >= count and (until is None or until(recs)):
                return recs
            st = self.status()
            failed = [t for t in st.get("tasks", []) if t.get("state") == "FAILED"]
            if failed or time.monotonic() > deadline:
                why = "its task FAILED" if failed else f"not there after {timeout:.0f}s"
                raise ConnectError(
                    f"{self.topic(table)}: wanted {count} records, have {len(recs)}; {why}:\n"
                    f"{json.dumps(st, indent=1)[:4000]}"
                )
            time.sleep(0.2)

    def status(self) -> dict[str, Any]:
        return rest(f"{self.owner.connect_url}/connectors/{self.name}/status") or {}

    def task_state(self) -> str | None:
        tasks = self.status().get("tasks") or []
        return tasks[0].get("state") if tasks else None

    def wait_task_state(self, state: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll until task 0 is in ``state`` (e.g. "FAILED"); its status (with "trace")."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            tasks = st.get("tasks") or []
            if tasks and tasks[0].get("state") == state:
                task: dict[str, Any] = tasks[0]
                return task
            if time.monotonic() > deadline:
                raise ConnectError(f"{self.name}: task not {state} after {timeout:.0f}s: {st}")
            time.sleep(0.2)


class Debezium:
    """Creates tables and connectors for one test, and removes all of them on close()."""

    def __init__(
        self, connect_url: str, bootstrap: str, pg_url: str, pg_port: int, tag: str = "t"
    ) -> None:
        import psycopg  # test dependency; imported here so kafka-only runs need not have it

        self.connect_url = connect_url.rstrip("/")
        self.bootstrap = bootstrap
        self.pg_url = pg_url
        self.pg_port = pg_port
        clean = re.sub(r"[^a-z0-9_]+", "_", tag.lower()).strip("_")[:12] or "t"
        self.run = f"{clean}_{uuid.uuid4().hex[:8]}"  # a valid SQL identifier, slot and topic part
        self.db = psycopg.connect(pg_url, autocommit=True)
        self.tables: list[str] = []
        self.connectors: list[Connector] = []
        self.topics: list[str] = []
        self.cleanup_sql: list[str] = []  # run by close() after the tables are dropped

    # -------------------------------------------------------- SQL

    def sql(self, statement: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run one statement in its own transaction (autocommit); the rows it returned."""
        with self.db.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def transaction(self, statements: Iterable[str]) -> None:
        """Run statements in ONE transaction (they share a txId and commit LSN)."""
        with self.db.transaction(), self.db.cursor() as cur:
            for s in statements:
                cur.execute(s)

    def create_table(
        self, stem: str, columns: str, replica_identity: str | None = None, exact: bool = False
    ) -> str:
        """CREATE TABLE <stem>_<run> (columns) (just <stem> if ``exact``, replacing a table of
        that name); its name. Dropped on close()."""
        name = stem if exact else f"{stem}_{self.run}".lower()
        if exact:
            self.sql(f"drop table if exists {name}")
        self.sql(f"create table {name} ({columns})")
        self.tables.append(name)
        if replica_identity:
            self.sql(f"alter table {name} replica identity {replica_identity}")
        return name

    # -------------------------------------------------------- connectors

    def base_config(
        self, prefix: str, slot: str, publication: str, tables: Sequence[str]
    ) -> dict[str, str]:
        """The settings every test connector needs (pgoutput, our slot/publication/tables)."""
        return {
            "connector.class": POSTGRES_CONNECTOR,
            "tasks.max": "1",
            "database.hostname": "127.0.0.1",
            "database.port": str(self.pg_port),
            "database.user": "postgres",
            "database.password": "",
            "database.dbname": "tally",
            "topic.prefix": prefix,
            "plugin.name": "pgoutput",
            "slot.name": slot,
            "publication.name": publication,
            "publication.autocreate.mode": "filtered",
            "table.include.list": ",".join(f"public.{t}" for t in tables),
        }

    def connector(
        self,
        tables: Sequence[str],
        config: dict[str, str] | None = None,
        *,
        partitions: int = 1,
        compacted: bool = False,
        topic_configs: dict[str, str] | None = None,
        prefix: str | None = None,
        timeout: float = 90.0,
    ) -> Connector:
        """Register a connector for ``tables`` with ``config`` on top of the base settings.

        Each table's topic is created first (``partitions``, ``cleanup.policy=compact`` if
        ``compacted``, ``topic_configs`` e.g. ``{"retention.ms": "-1"}``; an existing topic of
        that name is deleted first). Returns once every
        row the tables held is on its topic (the initial snapshot) and the connector's
        replication stream is open, so every later change is streamed.
        """
        n = len(self.connectors) + 1
        prefix = prefix or f"dbz_{self.run}_{n}"
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"  # standalone keeps offsets by name: never reuse
        slot = f"slot_{self.run}_{n}"
        publication = f"pub_{self.run}_{n}"
        full = self.base_config(prefix, slot, publication, tables)
        full.update(config or {})
        conn = Connector(name, prefix, slot, publication, list(tables), full, self)
        rows = {t: self.sql(f"select count(*) from {t}")[0][0] for t in tables}
        for t in tables:
            topic = conn.topic(t)
            if self.topic_exists(topic):
                self.delete_topics([topic])
            create_topic(
                self.bootstrap,
                topic,
                partitions=partitions,
                compacted=compacted,
                configs=topic_configs,
            )
            self.topics.append(topic)
        rest(f"{self.connect_url}/connectors", "POST", {"name": name, "config": full})
        self.connectors.append(conn)
        deadline = time.monotonic() + timeout
        for t in tables:
            conn.wait_records(t, rows[t], timeout=max(1.0, deadline - time.monotonic()))
        self._wait_streaming(conn, deadline)
        return conn

    def _wait_streaming(self, conn: Connector, deadline: float) -> None:
        """The slot is active only once the snapshot is over and the stream started."""
        while True:
            got = self.sql(
                "select active from pg_replication_slots where slot_name = %s", [conn.slot]
            )
            if got and got[0][0]:
                return
            st = conn.status()
            if any(t.get("state") == "FAILED" for t in st.get("tasks", [])):
                raise ConnectError(f"{conn.name} failed before streaming: {json.dumps(st)[:4000]}")
            if time.monotonic() > deadline:
                raise ConnectError(
                    f"{conn.name}: replication slot {conn.slot} not streaming in time: {st}"
                )
            time.sleep(0.1)

    def remove(self, conn: Connector, timeout: float = 30.0) -> None:
        """Delete the connector, then drop its slot and publication (slot first inactive)."""
        with contextlib.suppress(ConnectError):
            rest(f"{self.connect_url}/connectors/{conn.name}", "DELETE")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                rest(f"{self.connect_url}/connectors/{conn.name}/status")
            except ConnectError:
                break  # 404: gone
            time.sleep(0.1)
        self.drop_slot(conn.slot, timeout=max(1.0, deadline - time.monotonic()))
        self.sql(f"drop publication if exists {conn.publication}")
        if conn in self.connectors:
            self.connectors.remove(conn)

    def drop_slot(self, slot: str, timeout: float = 30.0) -> None:
        """Drop a replication slot once its walsender let go (terminated after ``timeout``)."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            got = self.sql(
                "select active, active_pid from pg_replication_slots where slot_name = %s", [slot]
            )
            if not got:
                return
            active, pid = got[0]
            if not active:
                try:
                    self.sql("select pg_drop_replication_slot(%s)", [slot])
                    return
                except Exception as exc:  # taken again meanwhile: look once more
                    last = exc
            elif time.monotonic() > deadline and pid is not None:
                self.sql("select pg_terminate_backend(%s)", [pid])
            if time.monotonic() > deadline + 15:
                raise ConnectError(f"cannot drop replication slot {slot}: {got} {last!r}")
            time.sleep(0.1)

    # -------------------------------------------------------- topics

    def topic_exists(self, topic: str) -> bool:
        async def go() -> bool:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                return topic in await admin.list_topics()
            finally:
                await admin.close()

        return asyncio.run(go())

    def delete_topics(self, topics: Sequence[str]) -> None:
        async def go() -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            try:
                existing = set(await admin.list_topics())
                doomed = [t for t in topics if t in existing]
                if doomed:
                    await admin.delete_topics(doomed)
                for _ in range(100):  # deletion is asynchronous on the broker
                    if not set(doomed) & set(await admin.list_topics()):
                        return
                    await asyncio.sleep(0.1)
            finally:
                await admin.close()

        asyncio.run(go())

    # -------------------------------------------------------- teardown

    def close(self) -> None:
        """Remove every connector, slot, publication, topic and table this factory made."""
        errors: list[str] = []
        for conn in list(self.connectors):
            try:
                self.remove(conn)
            except Exception as exc:
                errors.append(f"removing {conn.name}: {exc}")
        with contextlib.suppress(Exception):
            self.delete_topics(self.topics)
        for t in self.tables:
            try:
                self.sql(f"drop table if exists {t}")
            except Exception as exc:
                errors.append(f"dropping {t}: {exc}")
        for statement in self.cleanup_sql:
            try:
                self.sql(statement)
            except Exception as exc:
                errors.append(f"{statement}: {exc}")
        self.db.close()
        if errors:
            raise ConnectError("; ".join(errors))

    def __enter__(self) -> Debezium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def debezium_factory(
    connect_url: str, bootstrap: str, pg_url: str, tag: str = "t"
) -> Iterator[Debezium]:
    port = int(pg_url.rsplit(":", 1)[1].split("/", 1)[0])
    with Debezium(connect_url, bootstrap, pg_url, port, tag) as dbz:
        yield dbz


__all__ = [
    "ConnectError",
    "Connector",
    "DbzRecord",
    "Debezium",
    "connect_script",
    "debezium_factory",
    "rest",
    "unwrap",
]
