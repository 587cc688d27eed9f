"""Regenerate tests/data/debezium/: what the real Debezium connector writes, per configuration.

    TALLY_TEST_KAFKA_PORT=9592 TALLY_TEST_PG_PORT=25932 TALLY_TEST_CONNECT_PORT=8593 \\
        .venv/bin/python tests/debezium_catalog.py [--out DIR] [--only NAME ...]

Starts (or reuses) the broker, Postgres and Kafka Connect through scripts/, then for
each configuration in CONFIGS: creates the tables, seeds them, registers one connector
(prefix "dbz", so schema names read "dbz.public.<table>.Value"), waits for the
snapshot, runs the SQL steps one at a time and files every record the step produced
under that step's name. Each configuration becomes <name>.jsonl, one record a line:

    {"table", "step", "partition", "offset", "key", "value", "headers"}

key/value are the record's bytes as UTF-8 text (null for a null key or a tombstone),
headers a list of [name, text]. index.json holds, per configuration, the connector
config, the partitions, the steps with their SQL and record counts, and the final
task state (with the start of the trace when the task died).

A step's records are told apart by a fence: after the step, a row goes into a
`fence` table captured by the same connector; once it is on its topic, every record
of the step is on the broker too (one task, one producer, max.in.flight=1, one
broker), and the reader takes each partition up to its end offset.
Not a test: this is run by hand when Debezium's version or the cases change.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaConsumer, TopicPartition
from debezium_util import Connector, DbzRecord, Debezium, connect_script

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "debezium"
PREFIX = "dbz"

# ---------------------------------------------------------------- tables

TYPES_COLUMNS = """
    id int primary key,
    c_smallint smallint, c_int int, c_bigint bigint,
    c_numeric numeric(12,2), c_numeric_var numeric, c_money money,
    c_real real, c_double double precision,
    c_bool boolean, c_text text, c_varchar varchar(20), c_char char(3),
    c_timestamptz timestamptz, c_timestamp timestamp, c_date date, c_time time,
    c_timetz timetz, c_interval interval,
    c_jsonb jsonb, c_json json, c_uuid uuid, c_bytea bytea, c_enum mood,
    c_int_array int[], c_text_array text[]
"""
TYPES_ROW_FULL = """(
    {id}, 7, 123456, 9007199254740993,
    1234567890.12, 3.14159265358979323846264338327950288, 12.34,
    1.5, 0.1,
    true, 'héllo "quoted" ✓', 'abc', 'ab',
    '2024-03-10 01:30:00.123456+02', '2024-03-10 01:30:00.123456', '2024-02-29',
    '13:45:56.789012', '13:45:56.5+05:30', '1 year 2 mons 3 days 04:05:06.789',
    '{{"tier": "gold", "n": 1, "nested": {{"a": [1, 2.5, null]}}}}', '{{"b": 2,  "a": 1}}',
    'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\\x00ff10', 'happy',
    '{{1,2,3}}', '{{a,"b c"}}'
)"""
TYPES_ROW_EDGE = """(
    3, -32768, -2147483648, -9223372036854775808,
    -0.01, 0.00000000000000000001, -0.5,
    'NaN', '-Infinity',
    false, '', '', '',
    '1969-12-31 23:59:59.999999+00', '1900-01-01 00:00:00', '1900-01-01',
    '00:00:00', '00:00:00+00', '-1 days -00:00:01',
    '[]', 'null',
    '00000000-0000-0000-0000-000000000000', '\\x', 'sad',
    '{}', '{NULL}'
)"""


def noise(n: int, seed: str) -> str:
    """n hex characters that pglz cannot compress (so the value is TOASTed out of line)."""
    out: list[str] = []
    h = seed.encode()
    while sum(map(len, out)) < n:
        h = hashlib.sha256(h).digest()
        out.append(h.hex())
    return "".join(out)[:n]


def toast_values(seed: str) -> str:
    """(note, blob, doc, arr) SQL literals. note: 2,100 incompressible characters, so the
    row passes Postgres's 2 KB TOAST threshold with its default storage; the other three
    are small but STORAGE EXTERNAL with toast_tuple_target=128 (see TOAST_SETUP), so the
    toaster moves them out of line too, and the records show each type's placeholder
    without kilobytes of data."""
    rng = random.Random(seed)
    note = noise(2100, seed + "note")
    blob = noise(240, seed + "blob")  # 120 bytes
    doc = json.dumps({"k": noise(100, seed + "doc"), "n": [1, 2]})
    arr = "{" + ",".join(str(rng.randint(-(2**31), 2**31 - 1)) for _ in range(30)) + "}"
    return f"'{note}', '\\x{blob}', '{doc}', '{arr}'"


TOAST_SETUP = [
    "alter table {t} set (toast_tuple_target = 128)",
    "alter table {t} alter column blob set storage external",
    "alter table {t} alter column doc set storage external",
    "alter table {t} alter column arr set storage external",
]


@dataclass
class Table:
    name: str
    columns: str
    seed: list[str] = field(default_factory=list)
    steps: list[tuple[str, list[str]]] = field(default_factory=list)
    replica_identity: str | None = None


def tables() -> dict[str, Table]:
    t = {}
    t["types"] = Table(
        "types",
        TYPES_COLUMNS,
        seed=[
            "insert into types values " + TYPES_ROW_FULL.format(id=1),
            "insert into types (id) values (2)",
            "insert into types values " + TYPES_ROW_EDGE,
        ],
        steps=[
            ("insert", ["insert into types values " + TYPES_ROW_FULL.format(id=4)]),
            (
                "update",
                [
                    "update types set c_numeric = 0.05, c_numeric_var = 12345678901234567890.5,"
                    " c_jsonb = '{\"tier\": \"silver\"}', c_timestamptz = '2025-01-01T00:00:00Z'"
                    " where id = 4"
                ],
            ),
            ("delete", ["delete from types where id = 4"]),
        ],
    )
    t["specials"] = Table(  # values the logical types cannot carry: what arrives instead
        "specials",
        "id int primary key, nv numeric, n2 numeric(12,2), ts timestamptz, tsn timestamp, d date",
        seed=[
            "insert into specials values (1, 'NaN', 'NaN', 'infinity', '-infinity', 'infinity')",
            "insert into specials values (2, NULL, NULL, '-infinity', 'infinity', '-infinity')",
        ],
        steps=[("update_streamed", ["update specials set id = id"])],
    )
    t["interleave"] = Table(  # two sessions: B commits first, A's changes have lower LSNs
        "interleave",
        "id int primary key, v text",
        steps=[
            (
                "two_sessions",
                [
                    "A: begin",
                    "A: insert into interleave values (1, 'a1')",
                    "B: begin",
                    "B: insert into interleave values (2, 'b1')",
                    "A: insert into interleave values (3, 'a2')",
                    "B: insert into interleave values (4, 'b2')",
                    "B: commit",
                    "A: commit",
                ],
            )
        ],
    )
    t["pk_single"] = Table(
        "pk_single",
        "id int primary key, v text",
        seed=["insert into pk_single values (1, 'one')"],
        steps=[
            ("update_value", ["update pk_single set v = 'uno' where id = 1"]),
            ("update_pk", ["update pk_single set id = 2 where id = 1"]),
            ("delete", ["delete from pk_single where id = 2"]),
        ],
    )
    t["pk_composite"] = Table(
        "pk_composite",
        "a int, b text, v int, primary key (a, b)",
        seed=["insert into pk_composite values (1, 'x', 10)"],
        steps=[
            ("update_value", ["update pk_composite set v = 11 where a = 1 and b = 'x'"]),
            ("update_pk", ["update pk_composite set b = 'y' where a = 1 and b = 'x'"]),
            ("delete", ["delete from pk_composite where a = 1 and b = 'y'"]),
        ],
    )
    for ident in ("default", "full"):
        name = f"toast_{ident}"
        t[name] = Table(
            name,
            "id int primary key, n int, note text, blob bytea, doc jsonb, arr int[]",
            replica_identity=ident,
            seed=[x.format(t=name) for x in TOAST_SETUP],
            steps=[
                ("insert", [f"insert into {name} values (1, 0, {toast_values('a')})"]),
                ("update_other_column", [f"update {name} set n = 1 where id = 1"]),
                (
                    "update_note",
                    [f"update {name} set note = '{noise(2100, 'b')}' where id = 1"],
                ),
                ("delete", [f"delete from {name} where id = 1"]),
            ],
        )
    t["trunc"] = Table(
        "trunc",
        "id int primary key, v text",
        seed=[f"insert into trunc values ({i}, 'old{i}')" for i in range(1, 5)],
        steps=[
            ("update", ["update trunc set v = 'changed' where id = 1"]),
            ("truncate", ["truncate trunc"]),
            ("insert_after", [f"insert into trunc values ({i}, 'new{i}')" for i in range(5, 9)]),
            (
                "one_transaction",
                [
                    "begin",
                    "insert into trunc values (100, 'before')",
                    "truncate trunc",
                    "insert into trunc values (101, 'after')",
                    "commit",
                ],
            ),
        ],
    )
    return t


# ---------------------------------------------------------------- configurations

ALL = [
    "types",
    "specials",
    "pk_single",
    "pk_composite",
    "toast_default",
    "toast_full",
    "trunc",
    "interleave",
]
UNWRAP = {
    "transforms": "unwrap",
    "transforms.unwrap.type": "io.debezium.transforms.ExtractNewRecordState",
    "transforms.unwrap.add.fields": "op,table,lsn,source.ts_ms",
}
# A connector's converter settings apply only when the connector names the converter too:
# "value.converter.schemas.enable" alone is ignored (the worker's converter is used).
JSON = "org.apache.kafka.connect.json.JsonConverter"
NO_SCHEMAS = {
    "key.converter": JSON,
    "key.converter.schemas.enable": "false",
    "value.converter": JSON,
    "value.converter.schemas.enable": "false",
}
TRUNCATE = {"skipped.operations": "none"}


@dataclass
class Config:
    name: str
    about: str
    config: dict[str, str]
    tables: list[str]
    partitions: int = 1
    compacted: bool = False
    snapshot_only: tuple[str, ...] = ()  # tables whose live steps are not run here
    dies_at: str | None = None  # the step that kills the task: wait for FAILED after it


CONFIGS = [
    Config(
        "defaults",
        "nothing set beyond the required: JsonConverter with schemas, "
        "decimal.handling.mode=precise, skipped.operations=t (truncates dropped)",
        {},
        ALL,
    ),
    Config(
        "schemas_off",
        "schemas.enable=false for key and value; truncates kept",
        {**NO_SCHEMAS, **TRUNCATE},
        ALL,
    ),
    Config(
        "decimal_double",
        "decimal.handling.mode=double",
        {"decimal.handling.mode": "double"},
        ["types", "specials"],
        snapshot_only=("types",),
    ),
    Config(
        "decimal_string",
        "decimal.handling.mode=string",
        {"decimal.handling.mode": "string"},
        ["types", "specials"],
        snapshot_only=("types",),
    ),
    Config(
        "truncate_1p", "skipped.operations=none, one partition", TRUNCATE, ["trunc", "interleave"]
    ),
    Config(
        "truncate_3p",
        "skipped.operations=none, three partitions",
        TRUNCATE,
        ["trunc"],
        partitions=3,
    ),
    Config(
        "unwrap_rewrite",
        "ExtractNewRecordState, add.fields=op,table,lsn,source.ts_ms, "
        "delete.tombstone.handling.mode=rewrite, skipped.operations=none",
        {**UNWRAP, "transforms.unwrap.delete.tombstone.handling.mode": "rewrite", **TRUNCATE},
        ["types", "pk_single", "toast_default", "trunc"],
    ),
    Config(
        "unwrap_rewrite_schemas_off",
        "unwrap_rewrite with schemas.enable=false",
        {
            **UNWRAP,
            "transforms.unwrap.delete.tombstone.handling.mode": "rewrite",
            **TRUNCATE,
            **NO_SCHEMAS,
        },
        ["types", "pk_single", "trunc"],
    ),
    Config(
        "unwrap_tombstone",
        "ExtractNewRecordState with its default "
        "delete.tombstone.handling.mode (tombstone), schemas off",
        {**UNWRAP, **TRUNCATE, **NO_SCHEMAS},
        ["pk_single", "trunc"],
    ),
    Config(
        "unwrap_tombstone_schemas_on",
        "unwrap_tombstone with schemas on: the SMT's "
        "tombstone keeps its schema, so its bytes are not null",
        {**UNWRAP, **TRUNCATE},
        ["pk_single"],
    ),
    Config(
        "unwrap_removed_option",
        "ExtractNewRecordState with delete.handling.mode=rewrite, "
        "the option Debezium 3.x removed: accepted, ignored (default tombstone mode)",
        {**UNWRAP, "transforms.unwrap.delete.handling.mode": "rewrite", **TRUNCATE, **NO_SCHEMAS},
        ["pk_single"],
    ),
    Config(
        "unwrap_drop",
        "ExtractNewRecordState, delete.tombstone.handling.mode=drop, schemas off",
        {
            **UNWRAP,
            "transforms.unwrap.delete.tombstone.handling.mode": "drop",
            **TRUNCATE,
            **NO_SCHEMAS,
        },
        ["pk_single", "trunc"],
    ),
    Config(
        "unwrap_rewrite_with_tombstone",
        "ExtractNewRecordState, delete.tombstone.handling.mode=rewrite-with-tombstone, schemas off",
        {
            **UNWRAP,
            "transforms.unwrap.delete.tombstone.handling.mode": "rewrite-with-tombstone",
            **TRUNCATE,
            **NO_SCHEMAS,
        },
        ["pk_single", "trunc"],
    ),
    Config(
        "unwrap_delete_to_tombstone",
        "ExtractNewRecordState, delete.tombstone.handling.mode=delete-to-tombstone, schemas off",
        {
            **UNWRAP,
            "transforms.unwrap.delete.tombstone.handling.mode": "delete-to-tombstone",
            **TRUNCATE,
            **NO_SCHEMAS,
        },
        ["pk_single", "trunc"],
    ),
    Config(
        "compacted",
        "cleanup.policy=compact topics, skipped.operations=none: the task "
        "dies at the first TRUNCATE",
        TRUNCATE,
        ["trunc"],
        compacted=True,
        dies_at="truncate",
    ),
]


# ---------------------------------------------------------------- running


def text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8")


class Reader:
    """One consumer over every partition of the connector's topics, read step by step."""

    def __init__(self, bootstrap: str, conn: Connector, tables: list[str], partitions: int):
        self.bootstrap, self.conn = bootstrap, conn
        self.tps = [
            TopicPartition(conn.topic(t), p) for t in [*tables, "fence"] for p in range(partitions)
        ]
        self.fence_tps = [TopicPartition(conn.topic("fence"), p) for p in range(partitions)]
        self.table_of = {conn.topic(t): t for t in tables}
        self.consumer: AIOKafkaConsumer | None = None
        self.ahead: list[tuple[TopicPartition, Any]] = []  # fetched past the last drain's end

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=None, enable_auto_commit=False
        )
        await self.consumer.start()
        self.consumer.assign(self.tps)
        await self.consumer.seek_to_beginning(*self.tps)

    async def stop(self) -> None:
        if self.consumer is not None:
            await self.consumer.stop()

    async def drain(
        self, fence_count: int | None, timeout: float = 60.0
    ) -> list[tuple[str, DbzRecord]]:
        """Records up to every partition's end, once the fence has ``fence_count`` records
        (None: no fence expected, e.g. the task died)."""
        assert self.consumer is not None
        deadline = time.monotonic() + timeout
        if fence_count is not None:
            while sum((await self.consumer.end_offsets(self.fence_tps)).values()) < fence_count:
                if self.conn.task_state() == "FAILED":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"fence {fence_count} not on {self.fence_tps} in time")
                await asyncio.sleep(0.05)
        ends = await self.consumer.end_offsets(self.tps)
        got, self.ahead = self.ahead, []
        while True:
            pending = [tp for tp in self.tps if await self.consumer.position(tp) < ends[tp]]
            if not pending:
                break
            batch = await self.consumer.getmany(*pending, timeout_ms=1000)
            got += [(tp, m) for tp, msgs in batch.items() for m in msgs]
            if time.monotonic() > deadline:
                raise TimeoutError("reading the step's records took too long")
        out: list[tuple[str, DbzRecord]] = []
        for tp, m in got:
            if m.offset >= ends[tp]:
                self.ahead.append((tp, m))  # a later step's record: keep it for that step
            elif tp.topic in self.table_of:
                rec = DbzRecord(tp.partition, m.offset, m.key, m.value, list(m.headers))
                out.append((self.table_of[tp.topic], rec))
        out.sort(key=lambda tr: (tr[0], tr[1].partition, tr[1].offset))
        return out


def run_sql(dbz: Debezium, statements: list[str]) -> None:
    """One transaction ("begin" ... "commit"), or one per statement; statements tagged
    "A: " / "B: " run on two sessions of their own (interleaved transactions)."""
    if statements and statements[0] == "begin":
        dbz.transaction(statements[1:-1])
        return
    import psycopg

    sessions: dict[str, Any] = {}
    try:
        for s in statements:
            tag, sep, rest = s.partition(": ")
            if sep and tag in ("A", "B"):
                if tag not in sessions:
                    sessions[tag] = psycopg.connect(dbz.pg_url, autocommit=True)
                sessions[tag].execute(rest)
            else:
                dbz.sql(s)
    finally:
        for conn in sessions.values():
            conn.close()


async def run_config(dbz: Debezium, cfg: Config) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    defs = tables()
    for name in cfg.tables:
        tbl = defs[name]
        dbz.create_table(tbl.name, tbl.columns, replica_identity=tbl.replica_identity, exact=True)
        for s in tbl.seed:
            dbz.sql(s)
    dbz.create_table("fence", "n int primary key", exact=True)
    t0 = time.monotonic()
    conn = await asyncio.to_thread(  # the helper runs its own event loops
        dbz.connector,
        [*cfg.tables, "fence"],
        cfg.config,
        partitions=cfg.partitions,
        compacted=cfg.compacted,
        prefix=PREFIX,
    )
    snapshot_s = time.monotonic() - t0
    reader = Reader(dbz.bootstrap, conn, cfg.tables, cfg.partitions)
    await reader.start()
    lines: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    fences = 0

    def file(step: str, recs: list[tuple[str, DbzRecord]]) -> int:
        for table, r in recs:
            lines.append(
                {
                    "table": table,
                    "step": step,
                    "partition": r.partition,
                    "offset": r.offset,
                    "key": text(r.key),
                    "value": text(r.value),
                    "headers": [[k, text(v)] for k, v in r.headers],
                }
            )
        return len(recs)

    try:
        n = file("snapshot", await reader.drain(None))
        steps.append(
            {
                "table": "*",
                "step": "snapshot",
                "sql": [abbreviate(s) for t in cfg.tables for s in defs[t].seed],
                "records": n,
            }
        )
        dead = False
        for name in cfg.tables:
            for step, sql in [] if name in cfg.snapshot_only else defs[name].steps:
                if dead:
                    steps.append(
                        {
                            "table": name,
                            "step": step,
                            "sql": [abbreviate(x) for x in sql],
                            "records": None,
                            "note": "not run: the task had died",
                        }
                    )
                    continue
                run_sql(dbz, sql)
                fences += 1
                dbz.sql(f"insert into fence values ({fences})")
                recs = await reader.drain(fences)
                steps.append(
                    {
                        "table": name,
                        "step": step,
                        "sql": [abbreviate(x) for x in sql],
                        "records": file(step, recs),
                    }
                )
                # records of a step belong to its table (the fence is not filed)
                for line in lines[len(lines) - len(recs) :]:
                    if line["table"] != name:
                        raise RuntimeError(
                            f"{step} of {name} wrote to {line['table']}: "
                            f"{[(x['table'], x['offset']) for x in lines[-10:]]}"
                        )
                if step == cfg.dies_at:
                    # the producer fails asynchronously: later records (the fence, on
                    # another topic) can still be written before the task is marked FAILED
                    await asyncio.to_thread(conn.wait_task_state, "FAILED", 30.0)
                if conn.task_state() == "FAILED":
                    dead = True
    finally:
        await reader.stop()
    status = conn.status()
    task = (status.get("tasks") or [{}])[0]
    info = {
        "about": cfg.about,
        "config": {
            k: v
            for k, v in conn.config.items()
            if k not in dbz.base_config(PREFIX, conn.slot, conn.publication, [*cfg.tables, "fence"])
        },
        "tables": cfg.tables,
        "partitions": cfg.partitions,
        "compacted": cfg.compacted,
        "steps": steps,
        "task_state": task.get("state"),
        "snapshot_seconds": round(snapshot_s, 1),
    }
    if task.get("trace"):
        info["trace"] = trace_summary(task["trace"])
    if task.get("state") == "FAILED":
        info["after_restart"] = restart_outcome(conn)
    return lines, info


def trace_summary(trace: str) -> list[str]:
    """The first line of a Java trace and its "Caused by" lines."""
    lines = trace.splitlines()
    return lines[:1] + [x for x in lines[1:] if x.startswith("Caused by")]


def restart_outcome(conn: Connector) -> dict[str, Any]:
    """Restart the failed task once: does it get past the record that killed it?"""
    from debezium_util import rest

    rest(f"{conn.owner.connect_url}/connectors/{conn.name}/restart?includeTasks=true", "POST")
    deadline = time.monotonic() + 30
    seen: list[str | None] = []
    while time.monotonic() < deadline:
        state = conn.task_state()
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "FAILED" and len(seen) > 1:
            break
        time.sleep(0.2)
    task = (conn.status().get("tasks") or [{}])[0]
    return {"states": seen, "trace": trace_summary(task.get("trace") or "")}


def abbreviate(sql: str) -> str:
    """Long literals (the TOAST values) shortened for index.json."""
    return re.sub(r"([0-9a-f]{24})[0-9a-f]{40,}", lambda m: f"{m.group(1)}…", sql)


def ensure_services() -> tuple[str, str, int, str]:
    """Start or reuse the three services on the ports the environment names (no defaults:
    this drops and recreates tables and topics of fixed names, so never on shared ones)."""
    names = ("TALLY_TEST_KAFKA_PORT", "TALLY_TEST_PG_PORT", "TALLY_TEST_CONNECT_PORT")
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        sys.exit(f"debezium_catalog: set {', '.join(missing)} (your own ports; see the docstring)")
    kport, pport, cport = (os.environ[n] for n in names)
    for cmd in (
        [sys.executable, str(ROOT / "scripts" / "kafka"), "start", "--port", kport],
        [sys.executable, str(ROOT / "scripts" / "postgres"), "start", "--port", pport],
    ):
        subprocess.run(cmd, check=True)
    res = connect_script("start", "--port", cport, "--kafka", f"127.0.0.1:{kport}")
    print(res.stdout + res.stderr, end="")
    if res.returncode:
        sys.exit(res.returncode)
    return (
        f"127.0.0.1:{kport}",
        f"postgresql://postgres@127.0.0.1:{pport}/tally",
        int(pport),
        f"http://127.0.0.1:{cport}",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", nargs="*", help="configuration names (default: all)")
    args = ap.parse_args()
    bootstrap, pg_url, pg_port, connect_url = ensure_services()
    args.out.mkdir(parents=True, exist_ok=True)
    index_path = args.out / "index.json"
    index: dict[str, Any] = json.loads(index_path.read_text()) if index_path.exists() else {}
    index["debezium"] = {
        "connector": "3.6.1.Final",
        "connect_runtime": "4.3.0",
        "postgres": None,
        "plugin": "pgoutput",
        "topic_prefix": PREFIX,
    }
    chosen = [c for c in CONFIGS if not args.only or c.name in args.only]
    for cfg in chosen:
        t0 = time.monotonic()
        with Debezium(connect_url, bootstrap, pg_url, pg_port, tag="catalog") as dbz:
            index["debezium"]["postgres"] = dbz.sql("show server_version")[0][0]
            dbz.sql("drop type if exists mood cascade")
            dbz.sql("create type mood as enum ('sad', 'ok', 'happy')")
            dbz.cleanup_sql.append("drop type if exists mood")  # after the tables
            lines, info = asyncio.run(run_config(dbz, cfg))
        with open(args.out / f"{cfg.name}.jsonl", "w") as fh:
            for line in lines:
                fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        index.setdefault("configs", {})[cfg.name] = info
        size = (args.out / f"{cfg.name}.jsonl").stat().st_size
        print(
            f"{cfg.name}: {len(lines)} records, {size / 1024:.0f} KiB, task "
            f"{info['task_state']}, snapshot {info['snapshot_seconds']}s, "
            f"{time.monotonic() - t0:.1f}s in all",
            flush=True,
        )
    order = {c.name: i for i, c in enumerate(CONFIGS)}
    index["configs"] = dict(
        sorted(index.get("configs", {}).items(), key=lambda kv: order.get(kv[0], 99))
    )
    index_path.write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
