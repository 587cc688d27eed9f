"""Shapes of the change events that cross the Kafka boundary.

Three families of record arrive on a topic, and all of them are normalized
into one `ChangeEvent` (what consumers apply) by `tally.schemas.decode.EventDecoder`:

* `NativeEvent` — tally's own change event, JSON or msgpack, produced by an
  application that writes its changes to Kafka itself.
* Debezium — the change-event *envelope* (`DebeziumEnvelope`: ``before``,
  ``after``, ``source``, ``op`` in c/u/d/r/t/m, ``ts_ms``; ``message`` for
  op m), either bare or inside the ``{"schema": ..., "payload": ...}``
  wrapper that Kafka Connect's JSON converter adds when schemas are enabled;
  the *tombstone* (Kafka value ``None``, same key) that follows a delete; and
  the *unwrapped* row produced by the ExtractNewRecordState SMT: the row
  itself, with ``"__deleted": "true"`` for deletes and optional ``__op``,
  ``__table``, ``__lsn``, ``__source_ts_ms`` … metadata fields.

The unwrapped shape has no Struct: it is whatever columns the table has, so it
is decoded as ``dict[str, Any]``.

Structs here are plain data; the typed decoders that read them live at module
level (one per shape) so no decoder is built per call.
"""

from __future__ import annotations

from typing import Any, Final, Literal, TypeAlias

import msgspec

__all__ = [
    "DEBEZIUM_OPS",
    "NATIVE_OPS",
    "ChangeEvent",
    "ChangeKind",
    "DebeziumEnvelope",
    "DebeziumMessage",
    "DebeziumOp",
    "DebeziumSource",
    "NativeEvent",
    "NativeOp",
    "decode_native",
    "encode_native",
]

NativeOp: TypeAlias = Literal["insert", "update", "delete", "truncate"]
DebeziumOp: TypeAlias = Literal["c", "u", "d", "r", "t", "m"]
ChangeKind: TypeAlias = Literal["upsert", "delete", "truncate", "ignore"]

NATIVE_OPS: Final[frozenset[str]] = frozenset(("insert", "update", "delete", "truncate"))
"""Values of `NativeEvent.op`."""

DEBEZIUM_OPS: Final[frozenset[str]] = frozenset(("c", "u", "d", "r", "t", "m"))
"""Values of `DebeziumEnvelope.op`: create, update, delete, read (snapshot), truncate, message."""


class NativeEvent(msgspec.Struct, omit_defaults=True):
    """tally's own change event for one row (or a whole table, for truncate).

    `id` is the row id: a scalar, or an array for a composite id (it becomes a
    tuple once decoded into a `ChangeEvent`). When `id` is absent the Kafka
    key, then the row's id fields, are used. `after` is the new row image for
    insert/update; `before` is optional and only consulted for a delete's id.
    `position` is the source position (an LSN, a sequence number …), kept for
    diagnostics. An empty `table` means "take it from the topic mapping".
    """

    table: str
    op: NativeOp
    id: Any = None
    after: dict[str, Any] | None = None
    before: dict[str, Any] | None = None
    position: str | int | None = None
    ts_ms: int | None = None


class DebeziumSource(msgspec.Struct):
    """The ``source`` block of a Debezium envelope: where and when the change happened.

    Only the fields tally reads are declared; every other field (``version``,
    ``connector``, ``snapshot`` — a bool or a string depending on the Debezium
    version —, ``txId`` …) is ignored so connector differences cannot break
    decoding. Postgres sets ``lsn`` (an int); MySQL sets ``file``/``pos``/``row``;
    SQL Server sets ``change_lsn``/``commit_lsn`` (strings); Oracle sets ``scn``.
    """

    table: str | None = None
    schema: str | None = None
    db: str | None = None
    lsn: int | str | None = None
    ts_ms: int | None = None
    file: str | None = None
    pos: int | None = None
    row: int | None = None
    change_lsn: str | None = None
    commit_lsn: str | None = None
    scn: str | None = None


class DebeziumMessage(msgspec.Struct):
    """The ``message`` block of an op ``m`` event (a Postgres logical decoding message)."""

    prefix: str | None = None
    content: Any = None


class DebeziumEnvelope(msgspec.Struct):
    """A Debezium change-event value (the ``payload`` when schemas are enabled).

    ``op``: c = create, u = update, d = delete, r = read (snapshot),
    t = truncate (no before/after), m = logical decoding message (``message``
    set, ``source.table`` empty). ``ts_ms`` is when the connector processed the
    event; ``source.ts_ms`` is when the change happened in the database.
    """

    op: DebeziumOp
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    source: DebeziumSource | None = None
    ts_ms: int | None = None
    message: DebeziumMessage | None = None


class ChangeEvent(msgspec.Struct, frozen=True):
    """A change normalized from any accepted shape: what consumers apply.

    * ``upsert`` — `row` is the new row image, `id` its row id.
    * ``delete`` — `id` is the deleted row's id; `row` is None.
    * ``truncate`` — every row of `table` is gone; `id` and `row` are None.
    * ``ignore`` — nothing to apply (e.g. a Debezium logical decoding message);
      `id` and `row` are None and `table` may be ``""``.

    `id` is hashable: composite ids are tuples. `position` is the source
    position when the record carries one (an LSN, ``(binlog file, pos, row)``
    for MySQL …); `ts_ms` is when the change happened, when known.

    `op` is what happened at the source, when the record says so: ``"c"``
    (insert), ``"u"`` (update), ``"d"`` (delete), ``"r"`` (snapshot read), or
    None (a tombstone, a truncate, an unwrapped row without ``__op``). The
    trigger does not depend on it (an upsert converges either way); the
    consumer uses it for drift signals (an update of an id it never saw).
    """

    table: str
    kind: ChangeKind
    id: Any
    row: dict[str, Any] | None
    position: Any = None
    ts_ms: int | None = None
    op: str | None = None


_NATIVE_JSON_ENCODER: Final = msgspec.json.Encoder()
_NATIVE_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
NATIVE_JSON_DECODER: Final = msgspec.json.Decoder(NativeEvent)
"""Typed JSON decoder for `NativeEvent` (shared: build decoders once, not per call)."""
NATIVE_MSGPACK_DECODER: Final = msgspec.msgpack.Decoder(NativeEvent)
"""Typed msgpack decoder for `NativeEvent`."""


def encode_native(event: NativeEvent, format: Literal["json", "msgpack"] = "json") -> bytes:
    """Encode a native event for producing to Kafka (JSON or msgpack)."""
    if format == "json":
        return _NATIVE_JSON_ENCODER.encode(event)
    if format == "msgpack":
        return _NATIVE_MSGPACK_ENCODER.encode(event)
    raise ValueError(f"unknown native event format {format!r}; use 'json' or 'msgpack'")


def decode_native(data: bytes) -> NativeEvent:
    """Decode one native event, JSON or msgpack (sniffed from the first byte).

    Raises `msgspec.DecodeError` / `msgspec.ValidationError` on a bad value; use
    `tally.schemas.decode.EventDecoder` to turn Kafka records into `ChangeEvent`s with
    `BadRecord` errors instead.
    """
    if data and data[0] < 0x80:  # JSON text starts with ASCII; a msgpack map never does
        return NATIVE_JSON_DECODER.decode(data)
    return NATIVE_MSGPACK_DECODER.decode(data)
