"""The real pipeline end to end: Postgres → Debezium → Kafka → `tally consume` → HTTP = SQL.

One SQL workload runs once, against tables that every configuration's connector captures
(each connector has its own replication slot, publication and topic prefix, so each gets
its own copy of every change), and one real `tally consume` subprocess per configuration
follows that connector's topics (`--topic-pattern '<prefix>.public.{table}'`). At three
points — after the initial snapshot, after live changes, after a TRUNCATE made while the
consumers were stopped — every consumer's answers over the HTTP API are captured next to
SQL's answers on the same database, and `tally reconcile` runs against the tables. The
tests below compare them; `CONFIGS` x `CASES` is the matrix.

Definitions are written plainly (`DEFINITIONS`): ``sort_key="amount", sum_value="amount"``,
``sort_key="created_at"``, ``sort_key="ship_date"``, a namespace from a jsonb column. The
schemaless and double configurations declare ``columns=`` (nothing else on the wire says
that base64 text is a decimal, and a double must become the column's exact decimal).

Writing order: the fence. Each connector also captures `fence_<run>`; after a phase's SQL a
row goes into it, and once that row is on every connector's fence topic, every earlier
change is on the broker too (Connect's producer: one request in flight, one broker). The
consumers are then waited for until they have read up to those end offsets.

Run alone: ``scripts/test tests/test_debezium_e2e.py`` (marker ``debezium``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import random
import signal
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from consumer_util import TALLY, child_env, free_port, json_logs, tail, wait_exit, wait_for
from debezium_util import Connector, Debezium, debezium_factory
from kafka_util import read_all

pytestmark = pytest.mark.debezium

TOKEN = "e2e-token"
PLACEHOLDER_REASON = "unavailable-value"

# ---------------------------------------------------------------- connector configurations

JSON_CONVERTER = "org.apache.kafka.connect.json.JsonConverter"
# A connector's converter settings apply only when it names the converter too.
SCHEMAS_OFF = {
    "key.converter": JSON_CONVERTER,
    "key.converter.schemas.enable": "false",
    "value.converter": JSON_CONVERTER,
    "value.converter.schemas.enable": "false",
}
TRUNCATES = {"skipped.operations": "none"}
"""Debezium's default (``t``) drops truncates: no truncate record at all."""
UNWRAP = {
    "transforms": "unwrap",
    "transforms.unwrap.type": "io.debezium.transforms.ExtractNewRecordState",
}
UNWRAP_REWRITE = {
    **UNWRAP,
    "transforms.unwrap.delete.tombstone.handling.mode": "rewrite",
    "transforms.unwrap.add.fields": "op,table,lsn,source.ts_ms",
}
RESELECT = {
    "post.processors": "reselector",
    "reselector.type": "io.debezium.processors.reselect.ReselectColumnsPostProcessor",
    "reselector.reselect.unavailable.values": "true",
    "reselector.reselect.null.values": "false",
}
TOPIC_CONFIGS = {"retention.ms": "-1"}
"""Not compacted (Debezium's task dies at a truncate on a compacted topic), nothing expires."""


@dataclass(frozen=True)
class Cfg:
    """One connector configuration and how its consumer runs."""

    name: str
    config: dict[str, str]
    partitions: int = 1
    declared: bool = False
    """The definitions declare ``columns=`` (records without a schema, or double decimals)."""
    flags: tuple[str, ...] = ()
    unwrap: bool = False
    has_op: bool = True


CONFIGS = [
    Cfg("envelope_1p", {**TRUNCATES}),
    Cfg("envelope_3p", {**TRUNCATES}, partitions=3),
    Cfg("schemaless_1p", {**SCHEMAS_OFF, **TRUNCATES}, declared=True),
    Cfg(
        "double_1p",
        {"decimal.handling.mode": "double", **TRUNCATES},
        declared=True,
        flags=("--decimal-handling", "double"),
    ),
    Cfg(
        "unwrap_3p",
        {**UNWRAP_REWRITE, **SCHEMAS_OFF, **TRUNCATES},
        partitions=3,
        declared=True,
        unwrap=True,
    ),
    Cfg("unwrap_no_op", {**UNWRAP, **TRUNCATES}, unwrap=True, has_op=False),
]
BY_NAME = {c.name: c for c in CONFIGS}

# ---------------------------------------------------------------- tables and definitions

TABLES = {
    "orders": """id int primary key, amount numeric(12,2) not null,
        created_at timestamptz not null, ship_date date not null, attrs jsonb,
        uid uuid not null, label text not null""",
    "pk1": "id int primary key, v int not null",
    "pk2": "region text, n int, v int not null, primary key (region, n)",
    "toast_d": "id int primary key, n int not null, note text not null",
    "toast_f": "id int primary key, n int not null, note text not null",
    "trunc": "id int primary key, v int not null",
    "fence": "n int primary key",
}
REPLICA_IDENTITY = {"toast_f": "full"}

DEFINITIONS = '''
"""Written by tests/test_debezium_e2e.py: the aggregates every configuration's consumer runs."""
from tally.engine import TableAggregate

T = {tables!r}
COLUMNS = {columns!r}

by_amount = TableAggregate("by_amount", table=T["orders"], sort_key="amount",
                           sum_value="amount", columns=COLUMNS)
by_created = TableAggregate("by_created", table=T["orders"], sort_key="created_at",
                            columns=COLUMNS)
by_ship = TableAggregate("by_ship", table=T["orders"], sort_key="ship_date", columns=COLUMNS)
by_tier = TableAggregate("by_tier", table=T["orders"],
                         namespace=lambda r: (r["attrs"] or {{}}).get("tier"),
                         sort_key="label", sum_value="amount", columns=COLUMNS)
by_uid = TableAggregate("by_uid", table=T["orders"], sort_key="uid", columns=COLUMNS)
pk_single = TableAggregate("pk_single", table=T["pk1"], sort_key="v", sum_value="v")
pk_composite = TableAggregate("pk_composite", table=T["pk2"], id_field=("region", "n"),
                              sort_key="v", sum_value="v")
toast_default = TableAggregate("toast_default", table=T["toast_d"], sort_key="n", sum_value="n")
toast_full = TableAggregate("toast_full", table=T["toast_f"],
                            sort_key=lambda r: len(r["note"]), sum_value="n")
trunc = TableAggregate("trunc", table=T["trunc"], sort_key="v", sum_value="v")
'''

READER = '''
"""Written by tests/test_debezium_e2e.py: a definition that reads a TOASTed column."""
from tally.engine import TableAggregate

toast_note = TableAggregate("toast_note", table={table!r},
                            sort_key=lambda r: len(r["note"]), sum_value="n")
'''

ORDERS_COLUMNS = {
    "amount": "numeric(12,2)",
    "created_at": "timestamptz",
    "ship_date": "date",
    "attrs": "jsonb",
    "uid": "uuid",
}


@dataclass(frozen=True)
class Spec:
    """An aggregate and the SQL that computes its items: key, sum, namespace, id."""

    name: str
    table: str
    key: str
    kind: str  # how its keys read back over HTTP: decimal, datetime, date, uuid, text, int
    sum: str = "0"
    ns: str = "null"
    ids: tuple[str, ...] = ("id",)


SPECS = [
    Spec("by_amount", "orders", "amount", "decimal", sum="amount"),
    Spec("by_created", "orders", "created_at", "datetime"),
    Spec("by_ship", "orders", "ship_date", "date"),
    Spec("by_tier", "orders", "label", "text", sum="amount", ns="attrs->>'tier'"),
    Spec("by_uid", "orders", "uid", "uuid"),
    Spec("pk_single", "pk1", "v", "int", sum="v"),
    Spec("pk_composite", "pk2", "v", "int", sum="v", ids=("region", "n")),
    Spec("toast_default", "toast_d", "n", "int", sum="n"),
    Spec("toast_full", "toast_f", "length(note)", "int", sum="n"),
    Spec("trunc", "trunc", "v", "int", sum="v"),
]
SPEC = {s.name: s for s in SPECS}
READER_SPEC = Spec("toast_note", "toast_d", "length(note)", "int", sum="n")

# case → (phase at which it is observed, the aggregates it covers)
CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "snapshot": ("snapshot", ("by_amount", "by_created", "by_ship", "by_tier", "by_uid")),
    "live": ("live", ("by_amount", "by_created", "by_ship", "by_tier", "by_uid")),
    "pk_single": ("live", ("pk_single",)),
    "pk_composite": ("live", ("pk_composite",)),
    "toast_default": ("live", ("toast_default",)),
    "toast_full": ("live", ("toast_full",)),
    "truncate": ("truncate", ("trunc",)),
}


def _matrix() -> list[Any]:
    out = []
    for cfg in CONFIGS:
        for case in CASES:
            if case == "truncate" and cfg.unwrap:
                continue  # no truncate arrives: test_truncate_cannot_arrive_through_unwrap
            out.append(pytest.param(cfg.name, case, id=f"{cfg.name}-{case}"))
    return out


# ---------------------------------------------------------------- the workload


def noise(n: int, seed: str) -> str:
    """n hex characters pglz cannot compress: a value this long is TOASTed out of line."""
    out: list[str] = []
    h = seed.encode()
    while sum(map(len, out)) < n:
        h = hashlib.sha256(h).digest()
        out.append(h.hex())
    return "".join(out)[:n]


LABELS = ["a", "ab", "b", "Z", "é", "zz", "\u00ff", "✓ done", "", "A b"]
TIERS: list[Any] = [
    None,
    "{}",
    '{"tier": "gold"}',
    '{"tier": "silver", "n": 1}',
    '{"tier": null}',
    '{"tier": "bronze", "nested": {"a": [1, 2.5]}}',
    "null",
]


def order_row(rng: random.Random, rid: int) -> tuple[Any, ...]:
    from psycopg.types.json import Jsonb

    attrs = rng.choice(TIERS)
    amount = Decimal(rng.choice([rng.randint(-100_000_000, 99_999_999_999), 1999, -1, 0]))
    tz = timezone(timedelta(minutes=rng.choice([0, 120, -330, 345])))
    created = datetime(2024, 1, 1, tzinfo=UTC) + timedelta(
        seconds=rng.choice([rng.randint(0, 86400 * 400), 3600]), microseconds=rng.randint(0, 999999)
    )
    ship = date(2020, 1, 1) + timedelta(days=rng.randint(0, 2500))
    return (
        rid,
        amount.scaleb(-2),
        created.astimezone(tz),
        ship,
        None if attrs is None else Jsonb(json.loads(attrs)),
        UUID(int=rng.getrandbits(128)),
        rng.choice(LABELS),
    )


class Workload:
    """The SQL every configuration sees: seed (snapshot), live changes, truncate."""

    def __init__(self, dbz: Debezium) -> None:
        self.dbz = dbz
        self.rng = random.Random(1212)
        self.t = {
            stem: dbz.create_table(stem, cols, replica_identity=REPLICA_IDENTITY.get(stem))
            for stem, cols in TABLES.items()
        }
        self.fences = 0
        self.placeholder_ids: set[int] = set()
        """toast_d ids whose last update left the TOASTed note out (a placeholder)."""
        self.placeholder_events = 0
        self.truncated: set[int] = set()
        """trunc ids the TRUNCATE removed and nothing after it wrote again."""

    def many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """One statement for each row of parameters, all in one transaction."""
        with self.dbz.db.transaction(), self.dbz.db.cursor() as cur:
            cur.executemany(sql.format(**self.t), rows)

    def run(self, *statements: str) -> None:
        for s in statements:
            self.dbz.sql(s.format(**self.t))

    def seed(self) -> None:
        rng = self.rng
        self.many(
            "insert into {orders} values (%s, %s, %s, %s, %s, %s, %s)",
            [order_row(rng, i) for i in range(1, 301)],
        )
        self.run(
            "insert into {pk1} select g, g * 7 % 50 from generate_series(1, 50) g",
            "insert into {pk2} select (array['eu','us','ap'])[g % 3 + 1], g, g % 11 "
            "from generate_series(1, 50) g",
            "insert into {trunc} select g, g % 13 from generate_series(1, 60) g",
        )
        for stem in ("toast_d", "toast_f"):
            rows = [(i, i % 9, noise(2100 + i, f"{stem}{i}")) for i in range(1, 31)]
            self.many(f"insert into {{{stem}}} values (%s, %s, %s)", rows)

    def live(self) -> None:
        rng = self.rng
        self.many(
            "insert into {orders} values (%s, %s, %s, %s, %s, %s, %s)",
            [order_row(rng, i) for i in range(1001, 1101)],
        )
        self.run(
            "update {orders} set amount = amount + 0.01 * (id % 7) - 3.5 where id % 5 = 1",
            "update {orders} set created_at = created_at - interval '1 day 3 microseconds', "
            "ship_date = ship_date + 1 where id % 6 = 2",
            'update {orders} set attrs = \'{{"tier": "platinum"}}\' where id % 9 = 3',
            "update {orders} set label = label || 'x' where id % 8 = 5",
            "delete from {orders} where id % 10 = 7",
            # primary-key changes: a delete under the old key, a create under the new one
            "update {orders} set id = id + 100000 where id in (4, 14, 24, 1004)",
            "update {orders} set id = 24, amount = 1.23 where id = 100024",
            # pk1: single-column primary key changes, one row moved twice and back
            "update {pk1} set id = id + 1000 where id between 1 and 8",
            "update {pk1} set id = 1 where id = 1001",  # and back
            "update {pk1} set id = 2005, v = 99 where id = 1005",
            "update {pk1} set v = v + 1 where id between 20 and 30",
            "delete from {pk1} where id in (40, 41, 1002)",
            # pk2: composite primary key changes, each column
            "update {pk2} set region = 'sa' where n between 1 and 6",
            "update {pk2} set n = n + 100 where region = 'us' and n < 20",
            "update {pk2} set v = v * 3 where n between 30 and 40",
            "delete from {pk2} where n in (44, 45)",
            "insert into {pk2} values ('eu', 1, 5)",
        )
        # TOAST: updates that leave the long note alone (DEFAULT: a placeholder), ones that
        # change it, deletes, inserts, and a note change followed by an update without it
        for stem in ("toast_d", "toast_f"):
            self.run(f"update {{{stem}}} set n = n + 100 where id between 1 and 15")
            self.many(
                f"update {{{stem}}} set note = %s where id = %s",
                [(noise(2300 + i, f"{stem}-upd{i}"), i) for i in range(16, 21)],
            )
            self.run(
                f"update {{{stem}}} set n = n + 1 where id = 16",
                f"delete from {{{stem}}} where id between 21 and 23",
            )
            rows = [(i, i % 5, noise(2500 + i, f"{stem}-new{i}")) for i in range(31, 36)]
            self.many(f"insert into {{{stem}}} values (%s, %s, %s)", rows)
        self.placeholder_ids = set(range(1, 16)) | {16}
        self.placeholder_events = 16
        self.run(
            "update {trunc} set v = v + 100 where id % 4 = 0", "delete from {trunc} where id = 3"
        )

    def truncate(self) -> None:
        """Inserts, TRUNCATE, inserts (some reusing truncated ids), updates, a delete."""
        before = {r[0] for r in self.dbz.sql(f"select id from {self.t['trunc']}")}
        self.run(
            "insert into {trunc} select g, g % 17 from generate_series(61, 120) g",
            "truncate {trunc}",
            "insert into {trunc} select g, 1000 + g from generate_series(1, 20) g",
            "insert into {trunc} select g, 2000 + g from generate_series(121, 180) g",
            "update {trunc} set v = v + 5 where id % 3 = 0",
            "delete from {trunc} where id in (2, 150)",
        )
        rewritten = set(range(1, 21)) | set(range(121, 181))  # written after the truncate
        self.truncated = (before | set(range(61, 121))) - rewritten

    def fence(self) -> int:
        self.fences += 1
        self.dbz.sql(f"insert into {self.t['fence']} values ({self.fences})")
        return self.fences


# ---------------------------------------------------------------- Kafka helpers

TP = tuple[str, int]


async def _end_offsets(bootstrap: str, topics: list[str]) -> dict[TP, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        metas = await admin.describe_topics(topics)
    finally:
        await admin.close()
    tps = [TopicPartition(m["topic"], p["partition"]) for m in metas for p in m["partitions"]]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): off for tp, off in ends.items()}


def end_offsets(bootstrap: str, topics: list[str]) -> dict[TP, int]:
    """End offset of every partition of ``topics``, in one round of requests."""
    return asyncio.run(_end_offsets(bootstrap, topics))


def topic_exists(bootstrap: str, topic: str) -> bool:
    async def go() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            return topic in await admin.list_topics()
        finally:
            await admin.close()

    return asyncio.run(go())


def dead_letters(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    """The records of a dead-letter topic ([] if it does not exist), headers decoded."""
    if not topic_exists(bootstrap, topic):
        return []
    out = []
    for _p, _o, _k, _v, headers in read_all(bootstrap, topic):
        out.append({k: v.decode(errors="replace") for k, v in headers})
    return out


# ---------------------------------------------------------------- a tally consume process


class HttpError(RuntimeError):
    pass


class Tally:
    """One `tally consume` subprocess with its HTTP API; stoppable and restartable."""

    def __init__(
        self,
        name: str,
        defs: Path,
        pattern: str,
        data_dir: Path,
        bootstrap: str,
        log: Path,
        flags: tuple[str, ...] = (),
    ) -> None:
        self.name, self.defs, self.pattern, self.data_dir = name, defs, pattern, data_dir
        self.bootstrap, self.log, self.flags = bootstrap, log, flags
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            TALLY,
            "consume",
            str(self.defs),
            "--topic-pattern",
            self.pattern,
            "--data-dir",
            str(self.data_dir),
            "--bootstrap-servers",
            self.bootstrap,
            "--http",
            f"127.0.0.1:{self.port}",
            "--log-format",
            "json",
            *self.flags,
        ]
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                args,
                stdout=subprocess.DEVNULL,
                stderr=f,
                env=child_env(TALLY_TOKEN=TOKEN),
                cwd=str(self.data_dir.parent),
            )

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        rc = wait_exit(self.proc, f"{self.name}: tally consume after SIGTERM", 60, self.log)
        assert rc == 0, f"{self.name}: tally consume exited {rc}:\n{tail(self.log)}"

    def alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            rc = None if self.proc is None else self.proc.returncode
            raise AssertionError(
                f"{self.name}: tally consume is not running (exit {rc}):\n{tail(self.log)}"
            )

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raise HttpError(f"{method} {path} {body!r}: {e.code} {e.read()[:500]!r}") from None
        # floats as Decimal, exactly as written: a sum that drifted shows as it is
        return json.loads(raw, parse_float=Decimal)

    def read(self, aggregate: str, op: str, **args: Any) -> Any:
        return self.request("POST", f"/v1/aggregates/{aggregate}/{op}", args)["result"]

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/status")  # type: ignore[no-any-return]

    def wait_caught_up(self, ends: dict[TP, int], timeout: float = 120.0) -> None:
        """Until every aggregate is ready and every partition of ``ends`` is read to its end."""

        def done() -> bool:
            self.alive()
            st = self.status()
            at = {(p["topic"], p["partition"]): p["offset"] for p in st["partitions"]}
            ready = all(a["state"] == "ready" for a in st["aggregates"])
            return ready and all((at.get(tp) or 0) >= end for tp, end in ends.items())

        wait_for(
            done,
            lambda: f"{self.name} to read up to {ends}:\n{tail(self.log)}",
            timeout=timeout,
            every=0.2,
            swallow=(OSError, HttpError),
        )

    def logs(self) -> list[dict[str, Any]]:
        return json_logs(self.log.read_text()) if self.log.exists() else []


# ---------------------------------------------------------------- answers: tally vs SQL


def _parse_key(kind: str, v: Any) -> Any:
    if v is None:
        return None
    if kind == "decimal":
        return Decimal(v) if isinstance(v, str | int) else v
    if kind == "datetime":
        return datetime.fromisoformat(v)
    if kind == "date":
        return date.fromisoformat(v)
    if kind == "uuid":
        return UUID(v)
    return v


def _parse_id(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _num(v: Any) -> Decimal:
    return v if isinstance(v, Decimal) else Decimal(str(v))


def _item(spec: Spec, it: Any) -> tuple[Any, Any, Decimal] | None:
    if it is None:
        return None
    return (_parse_key(spec.kind, it["key"]), _parse_id(it["id"]), _num(it["sum_value"]))


def _offsets(n: int) -> list[int]:
    return sorted({o for o in (0, 1, n // 3, n // 2, n - 2, n - 1, -1, -n) if -n <= o < n})


def _ns_order(ns: Any) -> tuple[bool, str]:
    return (ns is not None, str(ns))


def _probes(spec: Spec, keys: list[Any]) -> list[Any]:
    """Keys to ask index_of and bounded count/sum about: SQL's keys at a few quantiles (and
    a key of their type that no row may have)."""
    if not keys:
        return []
    picks = {keys[len(keys) // 4], keys[len(keys) // 2], keys[-1]}
    if spec.kind in ("decimal", "int"):
        picks.add(Decimal("0.005") if spec.kind == "decimal" else 0)
    elif spec.kind == "text":
        picks.add("m")
    return sorted(picks)


def wire(kind: str, v: Any) -> Any:
    """A key as an HTTP request carries it: typed values in their ``{"$type": text}`` form
    (a plain JSON number is a float: ``12.1`` is not the Decimal 12.1)."""
    if v is None:
        return None
    if kind == "decimal":
        return {"$decimal": str(v)}
    if kind in ("datetime", "date"):
        return {f"${kind}": v.isoformat()}
    if kind == "uuid":
        return {"$uuid": str(v)}
    return v


def sql_answers(dbz: Debezium, t: dict[str, str], spec: Spec) -> dict[str, Any]:
    """What SQL says: per namespace count, sum(), the ordered items, and what follows."""
    table = t[spec.table]
    coll = ' collate "C"' if spec.kind == "text" else ""
    id_order = ", ".join(f'{c} collate "C"' if c == "region" else c for c in spec.ids)
    sub = (
        f"select {spec.ns} as ns, {spec.key} as k, {spec.sum} as s, "
        f"{', '.join(spec.ids)} from {table}"
    )
    out: dict[str, Any] = {}
    namespaces = sorted(
        {r[0] for r in dbz.sql(f"select distinct ns from ({sub}) q")}, key=_ns_order
    )
    out["namespaces"] = namespaces
    for ns in namespaces or [None]:
        where = "ns is not distinct from %s"
        count, total = dbz.sql(
            f"select count(*), coalesce(sum(s), 0) from ({sub}) q where {where}", [ns]
        )[0]
        rows = dbz.sql(
            f"select k, s, {', '.join(spec.ids)} from ({sub}) q where {where} "
            f"order by k{coll}, {id_order}",
            [ns],
        )
        items = [(k, ids[0] if len(ids) == 1 else tuple(ids), _num(s)) for k, s, *ids in rows]
        n = len(items)
        keys = [it[0] for it in items]
        probes = _probes(spec, keys)
        index = {}
        for p in probes:
            lt = dbz.sql(
                f"select count(*) from ({sub}) q where {where} and k{coll} < %s{coll}", [ns, p]
            )[0][0]
            gt = dbz.sql(
                f"select count(*) from ({sub}) q where {where} and k{coll} > %s{coll}", [ns, p]
            )[0][0]
            ge_sum = dbz.sql(
                f"select count(*), coalesce(sum(s), 0) from ({sub}) q where {where} "
                f"and k{coll} >= %s{coll}",
                [ns, p],
            )[0]
            index[repr(p)] = {
                "asc": lt,
                "desc": gt,
                "count_ge": ge_sum[0],
                "sum_ge": _num(ge_sum[1]),
            }
        out[repr(ns)] = {
            "count": count,
            "sum": _num(total),
            "min": items[0] if items else None,
            "max": items[-1] if items else None,
            "at": {o: items[o] for o in _offsets(n)},
            "items": items,
            "index_of": index,
            "index_of_item": {o: (o if o >= 0 else n + o) for o in _offsets(n)},
        }
    out["_ns"] = namespaces or [None]
    out["_probes"] = {
        repr(ns): _probes(spec, [it[0] for it in out[repr(ns)]["items"]]) for ns in out["_ns"]
    }
    return out


def tally_answers(tally: Tally, spec: Spec, want: dict[str, Any]) -> dict[str, Any]:
    """The same questions (`sql_answers`' probes) to the consumer's HTTP API."""
    probes: dict[str, list[Any]] = want["_probes"]
    name, kind = spec.name, spec.kind
    out: dict[str, Any] = {}
    try:
        namespaces = sorted(tally.read(name, "namespaces"), key=_ns_order)
        out["namespaces"] = namespaces
        for ns in sorted(set(namespaces) | set(want["_ns"]), key=_ns_order):
            items: list[Any] = []
            cursor = None
            while True:
                page = tally.read(name, "paginate", namespace=ns, page_size=97, cursor=cursor)
                items += [_item(spec, it) for it in page["items"]]
                if page["is_done"]:
                    break
                cursor = page["cursor"]
            n = tally.read(name, "count", namespace=ns)
            index = {}
            for p in probes.get(repr(ns), []):
                k = wire(kind, p)
                bounds = {"lower": {"key": k}}
                index[repr(p)] = {
                    "asc": tally.read(name, "index_of", key=k, namespace=ns),
                    "desc": tally.read(name, "index_of", key=k, order="desc", namespace=ns),
                    "count_ge": tally.read(name, "count", namespace=ns, bounds=bounds),
                    "sum_ge": _num(tally.read(name, "sum", namespace=ns, bounds=bounds)),
                }
            by_item = {}
            for o in _offsets(n):
                it = items[o] if -len(items) <= o < len(items) else None
                if it is not None:  # the item's own (key, id): its index
                    rid = list(it[1]) if isinstance(it[1], tuple) else it[1]
                    by_item[o] = tally.read(
                        name, "index_of", key=wire(kind, it[0]), id=rid, namespace=ns
                    )
            out[repr(ns)] = {
                "count": n,
                "sum": _num(tally.read(name, "sum", namespace=ns)),
                "min": _item(spec, tally.read(name, "min", namespace=ns)),
                "max": _item(spec, tally.read(name, "max", namespace=ns)),
                "at": {
                    o: _item(spec, tally.read(name, "at", offset=o, namespace=ns))
                    for o in _offsets(n)
                },
                "items": items,
                "index_of": index,
                "index_of_item": by_item,
            }
    except Exception as e:  # captured: the test that looks at it fails, the others run
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def differences(got: dict[str, Any], want: dict[str, Any], limit: int = 12) -> list[str]:
    """Where two answer documents differ (empty: equal), readably."""
    if "error" in got:
        return [f"reading the consumer failed: {got['error']}"]
    out = []
    for key in sorted(set(got) | set(want), key=str):
        if key.startswith("_"):
            continue
        a, b = got.get(key), want.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                if a.get(k) != b.get(k):
                    x, y = a.get(k), b.get(k)
                    if isinstance(x, list) and isinstance(y, list):
                        i = next(
                            (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                            min(len(x), len(y)),
                        )
                        out.append(
                            f"{key}.{k}: {len(x)} vs {len(y)} items; first difference at "
                            f"{i}: tally {x[i] if i < len(x) else '-'} vs SQL "
                            f"{y[i] if i < len(y) else '-'}"
                        )
                    else:
                        out.append(f"{key}.{k}: tally {x!r} vs SQL {y!r}")
        else:
            out.append(f"{key}: tally {a!r} vs SQL {b!r}")
    return out[:limit]


def reconcile(tally: Tally, spec: Spec, table: str, pg_url: str, *extra: str) -> dict[str, Any]:
    """`tally reconcile` (the CLI's code, in this process) against the Postgres table."""
    from tally.consumers.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    args = [
        "reconcile",
        spec.name,
        "--source",
        pg_url,
        "--table",
        table,
        "--definitions",
        str(tally.defs),
        "--data-dir",
        str(tally.data_dir),
        "--json",
        "--progress",
        "none",
        "--examples",
        "1000",
        *extra,
    ]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    if rc != 0:
        return {"error": f"exit {rc}: {err.getvalue().strip()[-2000:]}"}
    return json.loads(out.getvalue())  # type: ignore[no-any-return]


def reconcile_problems(report: dict[str, Any]) -> list[str]:
    if "error" in report:
        return [f"reconcile failed: {report['error']}"]
    n = report["missing"] + report["extra"] + report["wrong"]
    if n == 0:
        return []
    ex = {c: report["examples"][c][:3] for c in ("missing", "extra", "wrong")}
    return [
        f"reconcile: {report['missing']} missing, {report['extra']} extra, "
        f"{report['wrong']} wrong; e.g. {ex}"
    ]


# ---------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    work: Workload
    pg_url: str
    connectors: dict[str, Connector]
    tallies: dict[str, Tally]
    readers: dict[str, Tally]
    """Consumers of a definition that reads the TOASTed note: of envelope_1p, of reselect."""
    answers: dict[tuple[str, str, str], tuple[dict[str, Any], dict[str, Any]]] = field(
        default_factory=dict
    )
    """(config, phase, aggregate) → (tally's answers, SQL's answers)."""
    reconciled: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def topic(self, cfg: str, stem: str) -> str:
        return self.connectors[cfg].topic(self.work.t[stem])


def _observe(p: Pipeline, phase: str, names: list[str], bootstrap: str) -> None:
    t0 = time.monotonic()
    for name in names:
        spec = SPEC[name]
        want = sql_answers(p.work.dbz, p.work.t, spec)
        for cfg in CONFIGS:
            tally = p.tallies[cfg.name]
            p.answers[(cfg.name, phase, name)] = (tally_answers(tally, spec, want), want)
            p.reconciled[(cfg.name, phase, name)] = reconcile(
                tally, spec, p.work.t[spec.table], p.pg_url
            )
    p.timings[f"observe {phase}"] = round(time.monotonic() - t0, 1)


def _fence_and_wait(p: Pipeline, bootstrap: str, tallies: list[Tally]) -> None:
    """Every change so far is on the broker, and every consumer has read it."""
    n = p.work.fence()
    fences = [conn.topic(p.work.t["fence"]) for conn in p.connectors.values()]

    def fenced() -> bool:
        ends = end_offsets(bootstrap, fences)
        return all(sum(v for (t, _), v in ends.items() if t == f) >= n for f in fences)

    wait_for(fenced, f"fence {n} on {fences}", timeout=90, every=0.1)
    for tally in tallies:
        conn = p.connectors[tally.name.split("/")[0]]
        topics = [t for t in conn_topics(conn, p.work) if t != conn.topic(p.work.t["fence"])]
        mine = [t for t in topics if consumes(tally, t, p.work)]
        tally.wait_caught_up(end_offsets(bootstrap, mine))


def conn_topics(conn: Connector, work: Workload) -> list[str]:
    return [conn.topic(t) for t in conn.tables]


def consumes(tally: Tally, topic: str, work: Workload) -> bool:
    if "reader" in tally.name:
        return topic.endswith("." + work.t["toast_d"])
    return True


@pytest.fixture(scope="module")
def pipeline(
    connect_url: str, kafka_bootstrap: str, pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Pipeline]:
    root = tmp_path_factory.mktemp("dbz-e2e")
    t_start = time.monotonic()
    with (
        debezium_factory(connect_url, kafka_bootstrap, pg_url, tag="e2e") as dbz,
        contextlib.ExitStack() as stack,
    ):
        work = Workload(dbz)
        work.seed()
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        connectors: dict[str, Connector] = {}
        stems = [s for s in TABLES]
        for cfg in CONFIGS:
            connectors[cfg.name] = dbz.connector(
                [work.t[s] for s in stems],
                cfg.config,
                partitions=cfg.partitions,
                topic_configs=TOPIC_CONFIGS,
            )
        # The reselect post-processor: re-reads TOASTed values the change did not carry.
        toast_d = work.t["toast_d"]
        connectors["reselect"] = dbz.connector(
            [toast_d, work.t["fence"]],
            {
                **TRUNCATES,
                **RESELECT,
                "reselector.reselect.columns.include.list": f"public.{toast_d}:note",
            },
            topic_configs=TOPIC_CONFIGS,
        )
        timings["connectors (snapshots)"] = round(time.monotonic() - t0, 1)
        tallies: dict[str, Tally] = {}
        for cfg in CONFIGS:
            d = root / cfg.name
            d.mkdir()
            defs = d / f"defs_{cfg.name}.py"
            defs.write_text(
                textwrap.dedent(
                    DEFINITIONS.format(
                        tables=work.t, columns=ORDERS_COLUMNS if cfg.declared else None
                    )
                )
            )
            conn = connectors[cfg.name]
            tallies[cfg.name] = Tally(
                cfg.name,
                defs,
                f"{conn.prefix}.public.{{table}}",
                d / "data",
                kafka_bootstrap,
                d / "consume.log",
                cfg.flags,
            )
        readers = {}
        for base in ("envelope_1p", "reselect"):
            d = root / f"reader-{base}"
            d.mkdir()
            defs = d / f"defs_reader_{base}.py"
            defs.write_text(textwrap.dedent(READER.format(table=toast_d)))
            conn = connectors[base]
            readers[base] = Tally(
                f"{base}/reader",
                defs,
                f"{conn.prefix}.public.{{table}}",
                d / "data",
                kafka_bootstrap,
                d / "consume.log",
                ("--dlq-topic", "{topic}.dlq-reader"),
            )
        everyone = [*tallies.values(), *readers.values()]
        for tally in everyone:
            stack.callback(tally.stop)
        for conn in connectors.values():  # dead-letter topics go with the connector's topics
            dbz.topics += [f"{t}.dlq" for t in conn_topics(conn, work)]
            dbz.topics += [f"{t}.dlq-reader" for t in conn_topics(conn, work)]
        p = Pipeline(work, pg_url, connectors, tallies, readers, timings=timings)

        t0 = time.monotonic()
        for tally in everyone:
            tally.start()
        _fence_and_wait(p, kafka_bootstrap, everyone)
        timings["consumers built from the snapshot"] = round(time.monotonic() - t0, 1)
        _observe(p, "snapshot", list(CASES["snapshot"][1]), kafka_bootstrap)

        t0 = time.monotonic()
        work.live()
        _fence_and_wait(p, kafka_bootstrap, everyone)
        timings["live changes applied"] = round(time.monotonic() - t0, 1)
        _observe(
            p,
            "live",
            [n for c, (ph, ns) in CASES.items() if ph == "live" for n in ns],
            kafka_bootstrap,
        )

        # TRUNCATE while the consumers are down: on restart the truncate and the rows written
        # before and after it arrive in one batch, on whichever partitions they landed.
        t0 = time.monotonic()
        for tally in everyone:
            tally.stop()
        work.truncate()
        for tally in everyone:
            tally.start()
        _fence_and_wait(p, kafka_bootstrap, everyone)
        timings["truncate, restart, caught up"] = round(time.monotonic() - t0, 1)
        _observe(p, "truncate", ["trunc"], kafka_bootstrap)
        timings["pipeline total"] = round(time.monotonic() - t_start, 1)
        print(f"\ndebezium e2e timings (s): {timings}")
        yield p


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize(("config", "case"), _matrix())
def test_answers_equal_sql(
    pipeline: Pipeline, kafka_bootstrap: str, config: str, case: str
) -> None:
    """Every answer over HTTP equals SQL's, `tally reconcile` finds nothing, and nothing of
    the case's table was dead-lettered."""
    phase, names = CASES[case]
    problems = []
    for name in names:
        got, want = pipeline.answers[(config, phase, name)]
        problems += [f"{name}: {d}" for d in differences(got, want)]
        problems += [
            f"{name}: {d}" for d in reconcile_problems(pipeline.reconciled[(config, phase, name)])
        ]
    for stem in {SPEC[n].table for n in names}:
        dlq = dead_letters(kafka_bootstrap, pipeline.topic(config, stem) + ".dlq")
        if dlq:
            problems.append(
                f"{len(dlq)} dead letters of {stem}, e.g. "
                f"{[(d.get('tally.reason'), d.get('tally.error')) for d in dlq[:3]]}"
            )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config", [c.name for c in CONFIGS if c.unwrap])
def test_truncate_cannot_arrive_through_unwrap(
    pipeline: Pipeline, kafka_bootstrap: str, config: str
) -> None:
    """ExtractNewRecordState drops truncate events: tally says so (log, /status), the
    aggregate keeps exactly the truncated rows, and `tally reconcile --patch` repairs it."""
    tally = pipeline.tallies[config]
    topic = pipeline.topic(config, "trunc")
    assert dead_letters(kafka_bootstrap, topic + ".dlq") == []
    lines = [d for d in tally.logs() if d.get("event") == "truncates cannot arrive"]
    # once per process, at the topic's first record: both runs read rows of this table
    assert [d["topic"] for d in lines if d["topic"] == topic] == [topic, topic]
    (warning,) = [w for w in tally.status()["warnings"] if repr(topic) in w]
    assert "TRUNCATE" in warning and "skipped.operations" in warning and "reconcile" in warning
    assert ("__op" in warning) is (not BY_NAME[config].has_op)
    report = pipeline.reconciled[(config, "truncate", "trunc")]
    assert "error" not in report, report
    assert (report["missing"], report["wrong"]) == (0, 0), report
    assert {e["id"] for e in report["examples"]["extra"]} == pipeline.work.truncated
    assert report["extra"] == len(pipeline.work.truncated) > 0
    spec = SPEC["trunc"]
    table = pipeline.work.t["trunc"]
    patched = reconcile(
        tally, spec, table, pipeline.pg_url, "--patch", "--url", tally.url, "--token", TOKEN
    )
    assert patched.get("patched") == len(pipeline.work.truncated), patched
    assert reconcile_problems(reconcile(tally, spec, table, pipeline.pg_url)) == []


@pytest.mark.parametrize("config", [c.name for c in CONFIGS])
def test_warnings(pipeline: Pipeline, config: str) -> None:
    """The recommended setup (non-compacted topics, retention.ms=-1) draws no warning; an
    unwrapped topic draws one truncate warning per process, at its first record."""
    tally = pipeline.tallies[config]
    warnings = tally.status()["warnings"]
    logged = [d["topic"] for d in tally.logs() if d.get("event") == "truncates cannot arrive"]
    history = [d for d in tally.logs() if d.get("event") == "history"]
    assert history == []
    if not BY_NAME[config].unwrap:
        assert warnings == [] and logged == []
        return
    topics = [pipeline.topic(config, s) for s in TABLES if s != "fence"]
    # the first run read every table's topic; the second (after the truncate) only trunc's
    trunc = pipeline.topic(config, "trunc")
    assert sorted(logged) == sorted([*topics, trunc]), logged
    assert [w.split("'")[1] for w in warnings] == [trunc], warnings


def test_toasted_values_a_definition_reads_dead_letter_under_replica_identity_default(
    pipeline: Pipeline, kafka_bootstrap: str
) -> None:
    """A definition that reads the TOASTed note (under REPLICA IDENTITY DEFAULT, no reselect):
    exactly the updates that left the note out are dead-lettered, with a reason naming the
    fixes, and reconcile finds exactly those rows (their n changed) and nothing else."""
    reader = pipeline.readers["envelope_1p"]
    topic = pipeline.topic("envelope_1p", "toast_d")
    dlq = dead_letters(kafka_bootstrap, topic + ".dlq-reader")
    want = [PLACEHOLDER_REASON] * pipeline.work.placeholder_events
    assert [d["tally.reason"] for d in dlq] == want
    assert all(
        "'note'" in d["tally.error"]
        and "REPLICA IDENTITY FULL" in d["tally.error"]
        and "ReselectColumnsPostProcessor" in d["tally.error"]
        for d in dlq
    )
    report = reconcile(reader, READER_SPEC, pipeline.work.t["toast_d"], pipeline.pg_url)
    assert "error" not in report, report
    assert (report["missing"], report["extra"]) == (0, 0)
    assert {e["id"] for e in report["examples"]["wrong"]} == pipeline.work.placeholder_ids


def test_reselect_post_processor_fills_in_toasted_values(
    pipeline: Pipeline, kafka_bootstrap: str
) -> None:
    """With Debezium's ReselectColumnsPostProcessor the same definition gets every value:
    nothing dead-lettered, answers equal SQL, reconcile finds nothing."""
    reader = pipeline.readers["reselect"]
    topic = pipeline.topic("reselect", "toast_d")
    dlq = dead_letters(kafka_bootstrap, topic + ".dlq-reader")
    assert dlq == [], [(d.get("tally.reason"), d.get("tally.error")) for d in dlq[:3]]
    want = sql_answers(pipeline.work.dbz, pipeline.work.t, READER_SPEC)
    assert differences(tally_answers(reader, READER_SPEC, want), want) == []
    table = pipeline.work.t["toast_d"]
    assert reconcile_problems(reconcile(reader, READER_SPEC, table, pipeline.pg_url)) == []
