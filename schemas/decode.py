"""Turn Kafka records ``(key, value, topic)`` into normalized `ChangeEvent`s.

`EventDecoder.decode` accepts every shape described in `tally.schemas.events`
(native JSON/msgpack, the Debezium envelope with or without the JSON
converter's ``schema``/``payload`` wrapper, tombstones, ExtractNewRecordState
rows) and raises `BadRecord` — never anything else — for a record it cannot
use. Consumers send those to the dead-letter topic and keep going.

Reason codes (`BadRecord.reason`):

``decode``
    The value is not JSON / msgpack, is not an object, or a field has the
    wrong type. The message carries msgspec's error text with the JSON path
    (``Expected `str`, got `int` - at `$.source.table```). Also used for a
    msgpack value given to a Debezium-only decoder, and for nesting too deep.
``unsupported-op``
    ``op`` is not one this shape knows (native: insert/update/delete/truncate;
    Debezium: c/u/d/r/t/m; unwrapped ``__op``: c/u/r/d/t/m).
``missing-after``
    An insert/update/create/read without an ``after`` image.
``missing-id``
    No usable row id: no ``id``, no key and no id field in the row image, a
    tombstone without a key, a key struct missing the configured id fields, or
    an id that is null, an object, NaN or an empty array.
``missing-table``
    The record names no table and its topic is not mapped (``--topic TABLE=TOPIC``).
``unknown-table``
    The table is not one of ``known_tables``.

Detection (``format="auto"``) costs one shallow probe decode per record (only
``op`` is materialized; other probed fields stay raw bytes) followed by the
typed decode of the detected shape:

* msgpack (first byte >= 0x80; JSON text always starts with ASCII) → native;
* ``op`` in insert/update/delete/truncate → native;
* ``op`` present and any of ``source``/``after``/``before`` present → Debezium envelope;
* ``op`` present and ``table`` present → native (with an unsupported op);
* exactly the ``schema`` and ``payload`` keys of interest → the JSON converter
  wrapper; its payload is detected again (envelope, row, or null);
* anything else that is a JSON object → an unwrapped (ExtractNewRecordState) row;
* JSON ``null`` (and a wrapper whose payload is null) → treated like a tombstone.

An unwrapped row that happens to have an ``op`` column holding a native op
name, or an ``op`` column next to ``source``/``after``/``before`` columns, is
read as the other shape: use ``format="debezium"`` for such topics. Explicit
formats skip the native check (``"debezium"``) or all detection (``"native"``:
the value must be a native event, JSON or msgpack; JSON ``null`` is a decode
error there, while a Kafka null value is still a tombstone).

Where each `ChangeEvent` field comes from:

* ``table`` — native ``table``; envelope ``source.table`` (or
  ``schema.table`` / ``db.table`` when only that qualified name is known);
  unwrapped ``__table``. When the record names none (or ``""``):
  ``topic_tables[topic]``, else the single known table whose name the topic
  ends with (``pg.public.scores`` → ``scores``), else ``missing-table``.
* ``id`` — native ``id``, else the key, else the row's id fields; Debezium
  (envelope, unwrapped, tombstone): the key, else the row's id fields (the
  ``before`` image for deletes). See `EventDecoder`.
* ``position`` — native ``position``; envelope ``source.lsn`` /
  ``change_lsn`` / ``commit_lsn`` / ``scn``, or ``(file, pos, row)`` for
  MySQL; unwrapped ``__lsn`` or ``(__file, __pos)``.
* ``ts_ms`` — native ``ts_ms``; envelope ``source.ts_ms`` (when the change
  happened), else the envelope's ``ts_ms``; unwrapped ``__source_ts_ms``,
  else ``__ts_ms``. Tombstones carry neither position nor time.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import msgspec
from msgspec import UNSET, Raw, UnsetType

from tally.schemas.errors import BadRecord, ConfigError
from tally.schemas.events import (
    NATIVE_JSON_DECODER,
    NATIVE_MSGPACK_DECODER,
    NATIVE_OPS,
    ChangeEvent,
    DebeziumEnvelope,
    DebeziumSource,
    NativeEvent,
)
from tally.schemas.typed import (
    DEFAULT_PLACEHOLDER,
    ColumnType,
    DecimalHandling,
    RowTyping,
    TimePrecision,
    WireFormat,
    parse_column_type,
    placeholder_markers,
)

__all__ = ["DEFAULT_ID_FIELDS", "DecodeFormat", "EventDecoder"]

DecodeFormat: TypeAlias = Literal["auto", "native", "debezium"]

DEFAULT_ID_FIELDS: Final[tuple[str, ...]] = ("id",)
"""Row fields that hold the id when a record has neither an id nor a key."""


class _Probe(msgspec.Struct):
    """Just enough of a JSON object to tell the shapes apart; nested values stay raw."""

    op: Any = UNSET
    table: Raw | UnsetType = UNSET
    source: Raw | UnsetType = UNSET
    after: Raw | UnsetType = UNSET
    before: Raw | UnsetType = UNSET
    payload: Raw | UnsetType = UNSET
    schema: Raw | UnsetType = UNSET
    # ExtractNewRecordState metadata (``delete.tombstone.handling.mode=rewrite``, ``add.fields``);
    # typed, so a bad value is reported with its path.
    meta_deleted: Literal["true", "false"] | bool | UnsetType | None = msgspec.field(
        default=UNSET, name="__deleted"
    )
    meta_op: Literal["c", "u", "d", "r", "t", "m"] | UnsetType | None = msgspec.field(
        default=UNSET, name="__op"
    )
    meta_table: str | UnsetType | None = msgspec.field(default=UNSET, name="__table")
    meta_source_ts_ms: int | UnsetType | None = msgspec.field(default=UNSET, name="__source_ts_ms")
    meta_ts_ms: int | UnsetType | None = msgspec.field(default=UNSET, name="__ts_ms")
    meta_lsn: Any = msgspec.field(default=UNSET, name="__lsn")


# One typed decoder per shape, built once. Native decoders live in tally.schemas.events.
_PROBE_JSON: Final = msgspec.json.Decoder(_Probe | None)
_ENVELOPE_JSON: Final = msgspec.json.Decoder(DebeziumEnvelope)
_ROW_JSON: Final = msgspec.json.Decoder(dict[str, Any])
_KEY_JSON: Final = msgspec.json.Decoder()  # keys are any JSON value
_SCHEMA_JSON: Final = msgspec.json.Decoder()
_MAX_SCHEMAS: Final = 1024
"""Distinct Connect schemas kept parsed (a table has one per version of its columns)."""

_NO_ID: Final = object()  # "this source gave no id; try the next one"
_MISSING: Final = object()
_NON_UPSERT_UNWRAPPED_OPS: Final = frozenset(("d", "t", "m"))
_UPSERT_OPS: Final = frozenset(("c", "u", "r"))
_OP_PATHS: Final = ("`$.op`", "`$.payload.op`", "`$.__op`", "`$.payload.__op`")
_MAX_LISTED_TABLES: Final = 20
_AFTER: Final = "the 'after' image"
_BEFORE: Final = "the 'before' image"
_ROW: Final = "the row"


class EventDecoder:
    """Decodes Kafka records into `ChangeEvent`s; one instance per consumer, reused.

    * ``format`` — ``"auto"`` detects the shape per record; ``"native"`` and
      ``"debezium"`` skip detection (see the module docstring).
    * ``id_fields`` — per table, the row fields that make up the id, in order
      (default ``("id",)``). Used when a record carries no id and no key, and to
      pick and order the values of a key struct.

    Ids from the Kafka key: a JSON key struct (``{"id": 1}``, also inside the
    converter's ``schema``/``payload`` wrapper) gives its single value, or a
    tuple of its values in ``id_fields[table]`` order when configured (else in
    the struct's order); another JSON value gives itself; a key that is not
    JSON is used as UTF-8 text, else as raw bytes. A null, empty or ``{}`` key
    counts as no key. JSON arrays become tuples, so every id is hashable.
    * ``topic_tables`` — topic → table, for records that do not name their
      table (tombstones, unwrapped rows without ``__table``).
    * ``known_tables`` — when given, records for any other table are rejected
      with ``unknown-table``.
    """

    __slots__ = (
        "_auto",
        "_debezium_only",
        "_decimal_handling",
        "_declared",
        "_format",
        "_id_fields",
        "_known",
        "_markers",
        "_native_only",
        "_placeholder",
        "_qualified",
        "_scan",
        "_schemas",
        "_time_precision",
        "_topic_guess",
        "_topic_tables",
        "_typings",
        "_unwrapped_topics",
    )

    def __init__(
        self,
        *,
        format: DecodeFormat = "auto",
        id_fields: Mapping[str, Sequence[str]] | None = None,
        topic_tables: Mapping[str, str] | None = None,
        known_tables: Collection[str] | None = None,
        column_types: Mapping[str, Mapping[str, str | ColumnType]] | None = None,
        decimal_handling: DecimalHandling = "precise",
        time_precision: TimePrecision = "adaptive",
        placeholder: str = DEFAULT_PLACEHOLDER,
    ) -> None:
        if format not in ("auto", "native", "debezium"):
            raise ConfigError(
                f"unknown event format {format!r}; use 'auto', 'native' or 'debezium'"
            )
        self._format: DecodeFormat = format
        self._auto = format == "auto"
        self._debezium_only = format == "debezium"
        self._native_only = format == "native"
        self._id_fields = _check_id_fields(id_fields or {})
        self._topic_tables: dict[str, str] = dict(topic_tables or {})
        for topic, table in self._topic_tables.items():
            if not isinstance(topic, str) or not isinstance(table, str) or not topic or not table:
                raise ConfigError(
                    f"topic mapping {topic!r} -> {table!r} is invalid; "
                    "both the topic and the table must be non-empty strings (--topic TABLE=TOPIC)"
                )
        self._known: frozenset[str] | None = (
            None if known_tables is None else frozenset(known_tables)
        )
        self._topic_guess: dict[str, str | None] = {}
        # (table, schema, db) of a record → the schema- or db-qualified known table it names
        self._qualified: dict[tuple[str, str | None, str | None], str] = {}
        self._declared: dict[str, dict[str, ColumnType]] = {
            table: {
                c: t if isinstance(t, ColumnType) else parse_column_type(t) for c, t in cols.items()
            }
            for table, cols in (column_types or {}).items()
        }
        if decimal_handling not in ("precise", "double", "string"):
            raise ConfigError(
                f"decimal handling {decimal_handling!r}: use precise, double or string (Debezium's decimal.handling.mode)"
            )
        if time_precision not in ("adaptive", "adaptive_time_microseconds", "connect"):
            raise ConfigError(
                f"time precision {time_precision!r}: use adaptive, adaptive_time_microseconds or connect (Debezium's time.precision.mode)"
            )
        if not isinstance(placeholder, str) or not placeholder:
            raise ConfigError("the unavailable-value placeholder must be a non-empty string")
        self._decimal_handling: DecimalHandling = decimal_handling
        self._time_precision: TimePrecision = time_precision
        self._placeholder = placeholder
        self._markers = placeholder_markers(placeholder)
        self._scan = False
        # Parsed Connect schemas by their raw bytes, and row typings by (table, fields, shape).
        self._schemas: dict[bytes, Any] = {}
        self._typings: dict[tuple[str, int, str, str], RowTyping] = {}
        self._unwrapped_topics: dict[str, bool] = {}

    @property
    def format(self) -> DecodeFormat:
        """The configured input format."""
        return self._format

    @property
    def unwrapped_topics(self) -> Mapping[str, bool]:
        """Topics on which rows without an envelope arrived (ExtractNewRecordState output), in
        the order first seen, each with whether its first such row carried ``__op``. No
        truncate can arrive on such a topic: the SMT drops truncate events (the consumer warns)."""
        return self._unwrapped_topics

    # ------------------------------------------------------------------ entry

    def decode(self, key: bytes | None, value: bytes | None, topic: str) -> ChangeEvent:
        """Decode one Kafka record; raise `BadRecord` if it cannot be applied."""
        try:
            if value is None:
                return self._tombstone(key, topic)
            if value.__class__ is not bytes:
                value = bytes(value)  # bytearray / memoryview
            if not value:
                raise BadRecord(
                    "decode", f"empty value on topic {topic!r}; expected a change event"
                )
            m = self._markers
            self._scan = m[0] in value or m[1] in value or m[2] in value or m[3] in value
            if value[0] < 0x80:  # JSON text starts with ASCII; a msgpack map never does
                if self._native_only:
                    return self._native(NATIVE_JSON_DECODER.decode(value), key, topic)
                # Fast paths for the usual field order: msgspec writes a NativeEvent's
                # `table` first, Kafka Connect writes an envelope's `before` first. If the
                # typed decode disagrees, detection below decides (and reports) instead.
                if self._auto and value.startswith(b'{"table":'):
                    try:
                        event = NATIVE_JSON_DECODER.decode(value)
                    except msgspec.ValidationError:
                        pass
                    else:
                        return self._native(event, key, topic)
                elif value.startswith(b'{"before":'):
                    try:
                        envelope = _ENVELOPE_JSON.decode(value)
                    except msgspec.ValidationError:
                        pass
                    else:
                        return self._envelope(envelope, key, topic)
                return self._detect(value, key, topic, wrapped=False)
            if self._debezium_only:
                raise BadRecord(
                    "decode",
                    f"value on topic {topic!r} is not JSON (first byte 0x{value[0]:02x}); "
                    "Debezium records must use the JSON converter, or decode with format='auto'",
                )
            return self._native(NATIVE_MSGPACK_DECODER.decode(value), key, topic)
        except BadRecord:
            raise
        except msgspec.DecodeError as exc:
            raise _decode_error(exc, topic, "") from None
        except UnicodeDecodeError as exc:  # msgspec's error for invalid UTF-8 inside a JSON string
            raise BadRecord(
                "decode",
                f"cannot decode the record on topic {topic!r}: a string is not valid UTF-8 ({exc.reason})",
            ) from None
        except RecursionError:
            raise BadRecord(
                "decode", f"the record on topic {topic!r} is nested too deeply to decode"
            ) from None
        except Exception as exc:  # the contract: a bad record never escapes as anything else
            raise BadRecord(
                "decode", f"cannot decode record on topic {topic!r}: {type(exc).__name__}: {exc}"
            ) from exc

    # ----------------------------------------------------------------- shapes

    def _detect(
        self,
        data: bytes | Raw,
        key: bytes | None,
        topic: str,
        *,
        wrapped: bool,
        schema: Raw | None = None,
    ) -> ChangeEvent:
        """Tell the JSON shapes apart (see the module docstring), then decode with the typed decoder."""
        probe = _PROBE_JSON.decode(data)
        if probe is None:
            return self._tombstone(key, topic)
        op = probe.op
        if op is not UNSET:
            if self._auto and op.__class__ is str and op in NATIVE_OPS:
                return self._native(NATIVE_JSON_DECODER.decode(data), key, topic)
            if probe.source is not UNSET or probe.after is not UNSET or probe.before is not UNSET:
                return self._envelope(_ENVELOPE_JSON.decode(data), key, topic, schema)
            if self._auto and probe.table is not UNSET:
                # Shaped like a native event whose op is wrong: let the typed decoder say so.
                return self._native(NATIVE_JSON_DECODER.decode(data), key, topic)
        elif (
            not wrapped
            and isinstance(probe.payload, Raw)
            and probe.schema is not UNSET
            and probe.table is UNSET
            and probe.source is UNSET
            and probe.after is UNSET
            and probe.before is UNSET
        ):
            return self._wrapped(probe.payload, probe.schema, key, topic)
        return self._unwrapped(_ROW_JSON.decode(data), probe, data, key, topic, schema)

    def _wrapped(
        self, payload: Raw, schema: Raw | UnsetType, key: bytes | None, topic: str
    ) -> ChangeEvent:
        """The JSON converter's ``{"schema": ..., "payload": ...}``: the payload, typed by the schema."""
        try:
            return self._detect(
                payload,
                key,
                topic,
                wrapped=True,
                schema=schema if isinstance(schema, Raw) else None,
            )
        except msgspec.DecodeError as exc:
            raise _decode_error(exc, topic, "payload") from None

    def _native(self, event: NativeEvent, key: bytes | None, topic: str) -> ChangeEvent:
        table = event.table
        known = self._known
        if not table or (known is not None and table not in known):
            table = self._table(table, topic, None)
        op = event.op
        if op == "update" or op == "insert":
            after = event.after
            if after is None:
                raise BadRecord(
                    "missing-after",
                    f"native {op} for table {table!r} (topic {topic!r}) has no 'after' row image; "
                    "an upsert needs the new row",
                )
            if table in self._declared:
                self._type_row(after, table, None, "row", "native")
            rid = event.id
            if rid.__class__ is not int and rid.__class__ is not str:
                rid = self._native_id(rid, key, after, table, topic, _AFTER)
            return ChangeEvent(
                table,
                "upsert",
                rid,
                after,
                event.position,
                event.ts_ms,
                "c" if op == "insert" else "u",
            )
        if op == "delete":
            rid = event.id
            if rid.__class__ is not int and rid.__class__ is not str:
                image = event.before if event.before is not None else event.after
                rid = self._native_id(rid, key, image, table, topic, _BEFORE)
            return ChangeEvent(table, "delete", rid, None, event.position, event.ts_ms, "d")
        return ChangeEvent(table, "truncate", None, None, event.position, event.ts_ms)

    def _native_id(
        self,
        rid: Any,
        key: bytes | None,
        image: dict[str, Any] | None,
        table: str,
        topic: str,
        image_name: str,
    ) -> Any:
        """A native event's id: its `id` field, else the key, else the row image's id fields."""
        if rid is not None:
            return _check_id(rid, table, topic, "the event's 'id'")
        rid = self._key_id(key, table, topic)
        if rid is _NO_ID:
            return self._row_id(image, table, topic, image_name)
        return rid

    def _envelope(
        self, env: DebeziumEnvelope, key: bytes | None, topic: str, schema: Raw | None = None
    ) -> ChangeEvent:
        op = env.op
        src = env.source
        if src is None:
            position: Any = None
            ts_ms = env.ts_ms
            named = None
        else:
            position = _source_position(src)
            ts_ms = src.ts_ms if src.ts_ms is not None else env.ts_ms
            named = src.table
        if op == "m":
            # A logical decoding message belongs to no table; never an error.
            table = named or self._topic_table(topic) or ""
            return ChangeEvent(table, "ignore", None, None, position, ts_ms)
        known = self._known
        if named and (known is None or named in known):
            table = named
        else:
            table = self._table(named, topic, src)
        if op == "t":
            return ChangeEvent(table, "truncate", None, None, position, ts_ms)
        if op == "d":
            rid = self._key_id(key, table, topic)
            if rid is _NO_ID:
                image = env.before if env.before is not None else env.after
                if image is not None:
                    self._type_row(
                        image,
                        table,
                        schema,
                        "before" if image is env.before else "after",
                        "debezium",
                    )
                rid = self._row_id(image, table, topic, _BEFORE)
            return ChangeEvent(table, "delete", rid, None, position, ts_ms, "d")
        after = env.after
        if after is None:
            raise BadRecord(
                "missing-after",
                f"Debezium op {op!r} for table {table!r} (topic {topic!r}) has no 'after' row image; "
                "an upsert needs the new row",
            )
        self._type_row(after, table, schema, "after", "debezium")
        rid = self._key_id(key, table, topic)
        if rid is _NO_ID:
            rid = self._row_id(after, table, topic, _AFTER)
        return ChangeEvent(table, "upsert", rid, after, position, ts_ms, op)

    def _unwrapped(
        self,
        row: dict[str, Any],
        probe: _Probe,
        data: bytes | Raw,
        key: bytes | None,
        topic: str,
        schema: Raw | None = None,
    ) -> ChangeEvent:
        """An ExtractNewRecordState row: strip the ``__`` metadata fields, read the known ones."""
        if topic not in self._unwrapped_topics:
            self._unwrapped_topics[topic] = probe.meta_op is not UNSET
        seen = 0
        deleted = probe.meta_deleted
        if deleted is not UNSET:
            del row["__deleted"]
            seen += 1
        op = probe.meta_op
        if op is not UNSET:
            del row["__op"]
            seen += 1
        named = probe.meta_table
        if named is not UNSET:
            del row["__table"]
            seen += 1
        else:
            named = None
        ts_ms = probe.meta_source_ts_ms
        if ts_ms is not UNSET:
            del row["__source_ts_ms"]
            seen += 1
        if probe.meta_ts_ms is not UNSET:
            del row["__ts_ms"]
            seen += 1
            if ts_ms is UNSET or ts_ms is None:
                ts_ms = probe.meta_ts_ms
        elif ts_ms is UNSET:
            ts_ms = None
        position = probe.meta_lsn
        if position is not UNSET:
            del row["__lsn"]
            seen += 1
        else:
            position = None
        # Other `add.fields` (``__db``, ``__name`` …): counting `"__` in the raw bytes
        # (C speed) says whether any can remain, so the columns are rarely scanned.
        if data.__class__ is not bytes or data.count(b'"__') > seen:
            extra = {name: row.pop(name) for name in [n for n in row if n[:2] == "__"]}
            if position is None and "__file" in extra:
                position = (extra["__file"], extra.get("__pos"))  # MySQL binlog coordinates
        if op is not UNSET and op is not None and op in _NON_UPSERT_UNWRAPPED_OPS:
            if op == "m":
                table = named or self._topic_table(topic) or ""
                return ChangeEvent(table, "ignore", None, None, position, ts_ms)
            if op == "t":
                return ChangeEvent(
                    self._table(named, topic, None), "truncate", None, None, position, ts_ms
                )
            deleted = True  # "d"
        known = self._known
        if named and (known is None or named in known):
            table = named
        else:
            table = self._table(named, topic, None)
        if deleted is True or deleted == "true":
            # A delete needs only the id. Its row is not data: under REPLICA IDENTITY DEFAULT
            # the rewrite mode sends the key columns and, for NOT NULL columns, Connect's
            # defaults ("" for a uuid), which typing would refuse.
            rid = self._key_id(key, table, topic)
            if rid is _NO_ID:
                self._type_row(row, table, schema, "row", "debezium")
                rid = self._row_id(row, table, topic, _ROW)
            return ChangeEvent(table, "delete", rid, None, position, ts_ms, "d")
        self._type_row(row, table, schema, "row", "debezium")
        rid = self._key_id(key, table, topic)
        if rid is _NO_ID:
            rid = self._row_id(row, table, topic, _ROW)
        return ChangeEvent(
            table, "upsert", rid, row, position, ts_ms, op if op in _UPSERT_OPS else None
        )

    def _tombstone(self, key: bytes | None, topic: str) -> ChangeEvent:
        """A null value after a delete: the key is the id, the topic gives the table."""
        if not key:
            raise BadRecord(
                "missing-id",
                f"tombstone (null value) on topic {topic!r} has no key, so there is no row to delete",
            )
        table = self._table(None, topic, None)
        rid = self._key_id(key, table, topic)
        if rid is _NO_ID:
            raise BadRecord(
                "missing-id",
                f"tombstone (null value) on topic {topic!r} has a null or empty key, so there is no row to delete",
            )
        return ChangeEvent(table, "delete", rid, None)

    # ------------------------------------------------------------------ typing

    def _type_row(
        self, row: dict[str, Any], table: str, schema: Raw | None, shape: str, wire: WireFormat
    ) -> None:
        """Convert ``row`` in place: the schema's logical types, the declared column types,
        and placeholders of values the source did not send (`tally.schemas.typed`)."""
        declared = self._declared.get(table)
        if schema is None and declared is None and not self._scan:
            return
        parsed: Any = None
        token = 0
        if schema is not None:
            raw = bytes(schema)
            hit = self._schemas.get(raw)
            if hit is None:
                if len(self._schemas) >= _MAX_SCHEMAS:
                    self._schemas.clear()
                    self._typings.clear()
                hit = self._schemas[raw] = (_SCHEMA_JSON.decode(raw), len(self._schemas) + 1)
            parsed, token = hit
        typing = self._typings.get((table, token, shape, wire))
        if typing is None:
            typing = self._typings[(table, token, shape, wire)] = RowTyping.build(
                _struct_fields(parsed, shape),
                declared,
                wire=wire,
                decimal_handling=self._decimal_handling,
                time_precision=self._time_precision,
                placeholder=self._placeholder,
            )
        if self._scan or not typing.empty:
            typing.convert(row, scan_placeholders=self._scan)

    # ------------------------------------------------------------------ table

    def _table(self, named: str | None, topic: str, src: DebeziumSource | None) -> str:
        """The record's own table name, else the topic's; checked against known tables."""
        known = self._known
        if named:
            if known is None or named in known:
                return named
            if src is not None:
                key = (named, src.schema, src.db)
                hit = self._qualified.get(key)
                if hit is not None:
                    return hit
                for qualifier in (src.schema, src.db):
                    if qualifier and f"{qualifier}.{named}" in known:
                        self._qualified[key] = hit = f"{qualifier}.{named}"
                        return hit
            raise self._unknown_table(named, topic)
        table = self._topic_table(topic)
        if table is None:
            raise BadRecord(
                "missing-table",
                f"cannot tell which table the record on topic {topic!r} belongs to: it names none "
                f"and the topic is not mapped; map the topic with --topic TABLE={topic}",
            )
        if known is not None and table not in known:
            raise self._unknown_table(table, topic)
        return table

    def _topic_table(self, topic: str) -> str | None:
        """``topic_tables[topic]``, else the one known table the topic name ends with."""
        table = self._topic_tables.get(topic)
        if table is not None:
            return table
        try:
            return self._topic_guess[topic]
        except KeyError:
            pass
        guess = None
        if self._known:
            matches = [t for t in self._known if topic == t or topic.endswith("." + t)]
            if len(matches) == 1:
                guess = matches[0]
        self._topic_guess[topic] = guess
        return guess

    def _unknown_table(self, table: str, topic: str) -> BadRecord:
        known = sorted(self._known or ())
        listed = ", ".join(known[:_MAX_LISTED_TABLES])
        if len(known) > _MAX_LISTED_TABLES:
            listed += f", … ({len(known)} in all)"
        return BadRecord(
            "unknown-table",
            f"table {table!r} (topic {topic!r}) is not one of the known tables ({listed or 'none'}); "
            "define an aggregate on it, or stop consuming this topic",
        )

    # --------------------------------------------------------------------- id

    def _key_id(self, key: bytes | None, table: str, topic: str) -> Any:
        """The row id carried by the Kafka key, or `_NO_ID` when the key gives none."""
        if not key:
            return _NO_ID
        try:
            value = _KEY_JSON.decode(key)
        except (msgspec.DecodeError, UnicodeDecodeError):  # not JSON: raw text or bytes
            try:
                return bytes(key).decode("utf-8")
            except UnicodeDecodeError:
                return bytes(key)
        if value.__class__ is dict:
            if len(value) == 2 and "schema" in value and "payload" in value:
                value = value["payload"]  # the JSON converter's wrapper
                if value.__class__ is not dict:
                    return _NO_ID if value is None else _check_id(value, table, topic, "the key")
            if not value:
                return _NO_ID
            fields = self._id_fields.get(table)
            if fields is None:
                value = next(iter(value.values())) if len(value) == 1 else tuple(value.values())
            else:
                absent = [f for f in fields if f not in value]
                if absent:
                    raise BadRecord(
                        "missing-id",
                        f"the key struct on topic {topic!r} has fields {list(value)} but the id fields "
                        f"of table {table!r} are {list(fields)} ({absent} absent); fix the id fields "
                        "configured for the table",
                    )
                value = value[fields[0]] if len(fields) == 1 else tuple(value[f] for f in fields)
        elif value is None:
            return _NO_ID
        return _check_id(value, table, topic, "the key")

    def _row_id(self, row: dict[str, Any] | None, table: str, topic: str, image: str) -> Any:
        """The id read from the row image's id fields."""
        fields = self._id_fields.get(table, DEFAULT_ID_FIELDS)
        if row is None:
            raise BadRecord(
                "missing-id",
                f"no row id for table {table!r} (topic {topic!r}): the record has no key and "
                f"no row image to read it from ({image} is missing); give records a key (the row id)",
            )
        if len(fields) == 1:
            value = row.get(fields[0], _MISSING)
        else:
            value = tuple(row.get(f, _MISSING) for f in fields)
        if value is _MISSING or (value.__class__ is tuple and _MISSING in value):
            absent = [f for f in fields if f not in row]
            raise BadRecord(
                "missing-id",
                f"no row id for table {table!r} (topic {topic!r}): no key, and {image} lacks the "
                f"id field(s) {absent}; give records a key or configure the id fields of {table!r}",
            )
        return _check_id(value, table, topic, image)


# ---------------------------------------------------------------- helpers


def _check_id(value: Any, table: str, topic: str, where: str) -> Any:
    """Validate an id and make it hashable (JSON arrays become tuples)."""
    cls = value.__class__
    if cls is int or cls is str:
        return value
    if cls is list or cls is tuple:
        if not value:
            raise BadRecord(
                "missing-id",
                f"the row id from {where} (table {table!r}, topic {topic!r}) is an empty array",
            )
        return tuple(_check_id(v, table, topic, where) for v in value)
    if cls is float:
        if value != value:
            raise BadRecord(
                "missing-id", f"the row id from {where} (table {table!r}, topic {topic!r}) is NaN"
            )
        return value
    if cls is bool or cls is bytes:
        return value
    kind = "null" if value is None else "an object" if cls is dict else f"a {cls.__name__}"
    raise BadRecord(
        "missing-id",
        f"the row id from {where} (table {table!r}, topic {topic!r}) is {kind}; an id must be a "
        "string, number, bool, bytes, or an array of those",
    )


def _struct_fields(schema: Any, shape: str) -> list[Any] | None:
    """The column fields of a Connect schema: the row's own (``row``), or those of the
    envelope's ``before``/``after`` struct. A schema kept as-is: ``{"fields": [...]}``."""
    if not isinstance(schema, dict):
        return None
    fields = schema.get("fields")
    if not isinstance(fields, list):
        return None
    if shape in ("after", "before"):
        for f in fields:
            if isinstance(f, dict) and f.get("field") == shape:
                inner = f.get("fields")
                return inner if isinstance(inner, list) else None
        return None
    return fields


def _source_position(src: DebeziumSource) -> Any:
    """The most precise source position a connector reports (LSN, SCN or binlog coordinates)."""
    if src.lsn is not None:
        return src.lsn
    if src.change_lsn is not None:
        return src.change_lsn
    if src.commit_lsn is not None:
        return src.commit_lsn
    if src.scn is not None:
        return src.scn
    if src.file is not None and src.pos is not None:
        return (src.file, src.pos, src.row or 0)
    return None


def _decode_error(exc: msgspec.DecodeError, topic: str, prefix: str) -> BadRecord:
    text = str(exc)
    if prefix:
        text = text.replace("`$", f"`$.{prefix}")
    if isinstance(exc, msgspec.ValidationError) and text.endswith(_OP_PATHS):
        return BadRecord(
            "unsupported-op",
            f"unsupported op in the record on topic {topic!r}: {text} (native events use insert, "
            "update, delete, truncate; Debezium uses c, u, d, r, t, m; check the decoder's format)",
        )
    return BadRecord("decode", f"cannot decode the record on topic {topic!r}: {text}")


def _check_id_fields(id_fields: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
    checked: dict[str, tuple[str, ...]] = {}
    for table, fields in id_fields.items():
        names = (fields,) if isinstance(fields, str) else tuple(fields)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"id fields of table {table!r} must be a non-empty list of field names, got {fields!r}"
            )
        checked[table] = names
    return checked
