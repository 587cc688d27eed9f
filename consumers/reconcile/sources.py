"""Sources of truth for `tally.engine.reconcile`: iterators of ``(encoded id, row)`` in encoded-id order.

* `postgres_source` — a PostgreSQL table through a server-side cursor,
  ``ORDER BY`` the id column(s). Ordering assumption: PostgreSQL's order
  equals `tally.engine.encode_key` order for integer columns (smallint, integer,
  bigint: numerically) and for text columns compared with ``COLLATE "C"``
  (UTF-8 byte order = code point order, which is encode_key's string order);
  composite ids sort column by column like encoded tuples. Other id types
  (uuid, numeric, timestamps...) are refused with a clear error rather than
  trusted. The merge in `tally.engine.reconcile.diff` also checks the order and
  stops with `SourceOrderError` if it is ever violated.
* `snapshot_source` — a JSON Lines (one object per line) or CSV file (header
  row), read by `tally.consumers.rows`, the reader `tally produce` uses, with its
  strict rules (no NaN, no ragged rows, UTF-8, the line in every error; a CSV
  cell that is a JSON number is that number, an empty cell None, anything
  else the string). Files need not be sorted: they are
  sorted by encoded id with an external merge sort (sorted runs of
  ``run_rows`` rows spilled to temporary files), so memory stays bounded.
* `topic_source` — a compacted change topic read to its end offsets, the
  latest row per id (decoded like the consumer decodes), spilled to a
  temporary SQLite file and read back ordered by encoded id.

Errors are `SourceError` (a `UsageError`: exit 2) with a one-line message,
`SourceUnreachable` (exit 1) when Postgres or Kafka does not answer, and
`tally.consumers.rows.RowError` (exit 2) for a bad line of a snapshot file.
"""

from __future__ import annotations

import heapq
import os
import pickle
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from tally.consumers.rows import Lines, RowError, format_of, read_rows
from tally.engine import TallyError, decode_key, encode_key
from tally.engine.keys import key_repr
from tally.schemas import DecodeFormat, InvalidEvent, row_id
from tally.schemas.errors import EXIT_RUNTIME, Unreachable, UsageError

__all__ = [
    "SourceError",
    "SourceUnreachable",
    "postgres_row_estimate",
    "postgres_source",
    "snapshot_source",
    "topic_source",
]

Keyed = Iterator[tuple[bytes, Mapping[str, Any]]]

# PostgreSQL type oids
_INT_OIDS = {20, 21, 23}  # int8, int2, int4
_TEXT_OIDS = {25, 1043, 1042, 19}  # text, varchar, bpchar, name


class SourceError(UsageError):
    """A source that cannot be read as given (malformed, unsupported, missing): exit 2."""


class SourceUnreachable(SourceError, Unreachable):
    """Postgres or Kafka did not answer, or the connection failed while reading: exit 1."""

    exit_code = EXIT_RUNTIME


def _ident(name: str) -> str:
    """A quoted SQL identifier; ``schema.table`` is split on the dot."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def postgres_source(
    url: str,
    table: str,
    id_columns: Sequence[str],
    *,
    fetch_size: int = 10_000,
    connect_timeout: float = 10.0,
) -> Keyed:
    """Rows of ``table`` ordered by ``id_columns``, streamed by a server-side cursor.

    Values are psycopg's (`Decimal` for numeric, aware `datetime`, `date`, `dict`/`list` for
    JSON, `UUID`): the types the consumer's decoder gives the same definitions from Debezium's
    records (`tally.schemas.typed`), so one definition computes the same item from both. Runs in one
    read-only REPEATABLE READ transaction: a consistent snapshot of the table.
    """
    try:
        import psycopg
        from psycopg.rows import dict_row
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SourceError(
            "reading a Postgres source needs psycopg: pip install 'psycopg[binary]'"
        ) from e
    if not id_columns:
        raise SourceError("a Postgres source needs at least one id column")
    try:
        conn = psycopg.connect(url, connect_timeout=int(max(1, connect_timeout)), autocommit=False)
    except psycopg.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceUnreachable(f"cannot connect to Postgres at {_redact(url)}: {msg}") from None
    return _pg_rows(conn, table, list(id_columns), fetch_size, dict_row, psycopg)


def postgres_row_estimate(url: str, table: str, connect_timeout: float = 5.0) -> int | None:
    """The planner's row estimate of ``table`` (``pg_class.reltuples``), for a progress bar; None if unknown."""
    try:
        import psycopg

        with psycopg.connect(url, connect_timeout=int(max(1, connect_timeout))) as conn:
            row = conn.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(%s)",
                (_ident(table),),
            ).fetchone()
    except Exception:
        return None
    n = None if row is None else row[0]
    return int(n) if n is not None and n > 0 else None


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return url


def _pg_rows(
    conn: Any, table: str, ids: list[str], fetch_size: int, dict_row: Any, psycopg: Any
) -> Keyed:
    try:
        with conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            try:
                probe = conn.execute(
                    f"SELECT {', '.join(_ident(c) for c in ids)} FROM {_ident(table)} LIMIT 0"
                )
            except psycopg.Error as e:
                raise SourceError(
                    f"cannot read table {table!r}: {str(e).strip().splitlines()[0]}"
                ) from None
            order = []
            for col, d in zip(ids, probe.description or (), strict=True):
                if d.type_code in _INT_OIDS:
                    order.append(_ident(col))
                elif d.type_code in _TEXT_OIDS:
                    order.append(f'{_ident(col)} COLLATE "C"')
                else:
                    raise SourceError(
                        f"id column {col!r} of {table!r} has a type (oid {d.type_code}) whose Postgres order is "
                        "not known to match tally's id order: only integer and text id columns are supported"
                    )
            sql = f"SELECT * FROM {_ident(table)} ORDER BY {', '.join(order)}"
            with conn.cursor(name="tally_reconcile", row_factory=dict_row) as cur:
                cur.itersize = fetch_size
                cur.execute(sql)
                single = ids[0] if len(ids) == 1 else None
                while True:
                    batch = cur.fetchmany(fetch_size)
                    if not batch:
                        break
                    for row in batch:
                        rid = row[single] if single is not None else tuple(row[c] for c in ids)
                        try:
                            eid = encode_key(rid)
                        except TallyError as e:
                            raise SourceError(
                                f"row of {table!r} has an invalid id {rid!r}: {e}"
                            ) from None
                        yield eid, row
    except psycopg.OperationalError as e:
        raise SourceUnreachable(
            f"Postgres connection failed while reading {table!r}: {str(e).strip()}"
        ) from None
    finally:
        conn.close()


# ------------------------------------------------------------------ snapshot files


def _file_rows(
    path: str, fmt: str, id_fields: Sequence[str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows of a snapshot file, by the reader `tally produce` uses (`tally.consumers.rows`)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise SourceError(f"cannot open snapshot file {path!r}: {e.strerror}") from None
    with f:
        yield from read_rows(
            Lines(f),
            "csv" if fmt == "csv" else "jsonl",
            where=path,
            required_columns=id_fields,
            column_hint="choose the id column(s) with --id-column",
        )


def snapshot_source(
    path: str,
    id_fields: Sequence[str],
    *,
    fmt: str | None = None,
    run_rows: int = 200_000,
) -> Keyed:
    """Rows of a JSON Lines or CSV snapshot, sorted by encoded id (external sort; bounded memory).

    ``fmt``: ``jsonl`` or ``csv`` (default: from the extension — ``.jsonl``, ``.ndjson``,
    ``.json`` or ``.csv``). A duplicated id is an error, like a missing or null one.
    """
    fmt = format_of(path, fmt, flag="--format")
    if not os.path.isfile(path):
        raise SourceError(f"snapshot file {path!r} does not exist")
    fields = list(id_fields)
    return _sorted(path, fmt, fields, run_rows)


def _sorted(path: str, fmt: str, fields: list[str], run_rows: int) -> Keyed:
    single = fields[0] if len(fields) == 1 else None
    runs: list[str] = []
    buf: list[tuple[bytes, int, Mapping[str, Any]]] = []
    tmpdir = tempfile.mkdtemp(prefix="tally-reconcile-")

    def spill() -> None:
        buf.sort(key=lambda t: t[0])
        fd, name = tempfile.mkstemp(dir=tmpdir)
        with os.fdopen(fd, "wb") as out:
            p = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
            for t in buf:
                p.dump(t)
        runs.append(name)
        buf.clear()

    def read_run(name: str) -> Iterator[tuple[bytes, int, Mapping[str, Any]]]:
        with open(name, "rb") as f:
            u = pickle.Unpickler(f)
            while True:
                try:
                    yield u.load()
                except EOFError:
                    return

    try:
        id_field = single if single is not None else tuple(fields)
        for line, row in _file_rows(path, fmt, fields):
            try:
                rid = row_id(row, id_field)
            except InvalidEvent as e:
                raise RowError(
                    path, line, f"{e}; choose the id column(s) with --id-column"
                ) from None
            try:
                eid = encode_key(rid)
            except TallyError as e:
                raise RowError(path, line, f"invalid id {rid!r}: {e}") from None
            buf.append((eid, line, row))
            if len(buf) >= run_rows:
                spill()
        if runs:
            if buf:
                spill()
            merged: Iterator[tuple[bytes, int, Mapping[str, Any]]] = heapq.merge(
                *(read_run(r) for r in runs), key=lambda t: t[0]
            )
        else:
            buf.sort(key=lambda t: t[0])
            merged = iter(buf)
        prev: tuple[bytes, int] | None = None
        for eid, line, found in merged:
            if prev is not None and prev[0] == eid:
                first, second = sorted((prev[1], line))
                raise RowError(
                    path,
                    second,
                    f"id {key_repr(decode_key(eid))} appears twice (also on line {first}): a "
                    "snapshot holds one row per id",
                )
            prev = (eid, line)
            yield eid, found
    finally:
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)


# ------------------------------------------------------------------ compacted topic


def topic_source(
    bootstrap: str,
    topic: str,
    table: str,
    id_fields: Sequence[str],
    *,
    format: DecodeFormat = "auto",
    timeout: float = 60.0,
    column_types: Mapping[str, Any] | None = None,
) -> Keyed:
    """The latest row per id of a (compacted) change topic, read to its end offsets as of the call.

    Records are decoded exactly like the consumer decodes them (`EventDecoder`):
    an upsert sets the id's row, a delete or tombstone removes it, a truncate
    removes every row; records of other tables and undecodable records are
    skipped (the consumer dead-letters those). The latest state per id is
    spilled to a temporary SQLite file keyed by encoded id (a BLOB: SQLite
    compares BLOBs with memcmp, i.e. encoded-id order), so memory stays
    bounded however many ids the topic holds. The topic is read completely
    when the iterator is first advanced.
    """
    import asyncio

    from tally.schemas import BadRecord, EventDecoder

    decoder = EventDecoder(
        format=format,
        id_fields={table: tuple(id_fields)},
        topic_tables={topic: table},
        column_types={table: dict(column_types)} if column_types else None,
    )
    return _topic_rows(bootstrap, topic, table, decoder, timeout, asyncio, BadRecord)


def _topic_rows(
    bootstrap: str, topic: str, table: str, decoder: Any, timeout: float, asyncio: Any, bad: Any
) -> Keyed:
    import sqlite3

    import msgspec

    from tally.consumers.topics import read_to_end

    tmpdir = tempfile.mkdtemp(prefix="tally-reconcile-topic-")
    db = sqlite3.connect(os.path.join(tmpdir, "latest.sqlite"))
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE latest (eid BLOB PRIMARY KEY, row BLOB) WITHOUT ROWID")
    enc = msgspec.msgpack.Encoder()
    dec = msgspec.msgpack.Decoder()

    async def read() -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition
        from aiokafka.errors import KafkaError

        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=int(timeout * 1000),
        )
        try:
            await asyncio.wait_for(consumer.start(), timeout)
        except (KafkaError, OSError, asyncio.TimeoutError) as e:
            await consumer.stop()
            raise SourceUnreachable(
                f"cannot reach Kafka at {bootstrap}: {e or type(e).__name__}",
                hint="check --bootstrap-servers (or $TALLY_BOOTSTRAP_SERVERS) and that the "
                "broker is running",
            ) from None
        try:
            parts = await _partitions(bootstrap, topic, timeout)
            if not parts:
                raise SourceError(f"topic {topic!r} does not exist on {bootstrap}")
            tps = [TopicPartition(topic, p) for p in sorted(parts)]
            ups: list[tuple[bytes, bytes | None]] = []
            try:
                async for _tp, msgs in read_to_end(consumer, tps, timeout):
                    for m in msgs:
                        try:
                            ev = decoder.decode(m.key, m.value, topic)
                        except bad:
                            continue
                        if ev.table != table:
                            continue
                        if ev.kind == "truncate":
                            _write(ups)
                            ups = []
                            db.execute("DELETE FROM latest")
                        elif ev.kind == "upsert":
                            ups.append((encode_key(ev.id), enc.encode(ev.row)))
                        elif ev.kind == "delete":
                            ups.append((encode_key(ev.id), None))
                    _write(ups)
                    ups = []
            except TimeoutError:
                raise SourceUnreachable(
                    f"reading topic {topic!r} to its end took more than {timeout:.0f}s"
                ) from None
        finally:
            await consumer.stop()

    async def _partitions(bootstrap: str, topic: str, timeout: float) -> list[int]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000)
        )
        await admin.start()
        try:
            if topic not in await admin.list_topics():
                return []
            (meta,) = await admin.describe_topics([topic])
            return [p["partition"] for p in meta["partitions"]]
        finally:
            await admin.close()

    def _write(ups: list[tuple[bytes, bytes | None]]) -> None:
        # in order: a later record for the same id wins
        for eid, row in ups:
            if row is None:
                db.execute("DELETE FROM latest WHERE eid = ?", (eid,))
            else:
                db.execute("INSERT OR REPLACE INTO latest VALUES (?, ?)", (eid, row))

    try:
        asyncio.run(read())
        db.commit()
        cur = db.execute("SELECT eid, row FROM latest ORDER BY eid")
        while True:
            chunk = cur.fetchmany(10_000)
            if not chunk:
                break
            for eid, row in chunk:
                yield bytes(eid), dec.decode(row)
    finally:
        db.close()
        import shutil

        shutil.rmtree(tmpdir, ignore_errors=True)
