"""The event key contract: row id → Kafka key → partition, and native events → records.

What producers (ours, or any other service) and consumers agree on:

* The Kafka **key** of a row's event is the JSON encoding of its row id
  (`key_for_id`): int ``7`` → ``b"7"``, str ``"abc"`` → ``b'"abc"'``, a
  composite id ``(3, "eu")`` → ``b'[3,"eu"]'``. `tally.schemas.decode.EventDecoder`
  reads the same id back from such a key. Keys are byte-identical for equal
  ids, so **all changes of one row land in one partition, in order**
  (partitioning is aiokafka's default murmur2 partitioner, the same as the
  Java client's, over the sorted partition list). Use one type per id
  column: ``1`` and ``1.0`` or ``"1"`` are different keys.
* The **value** is a `NativeEvent` (JSON by default, or msgpack) that always
  carries its ``id`` too, so it stands alone even if re-keyed.
* A **truncate** has no row id; its key is ``{"truncate": TABLE}`` (a JSON
  object, never a valid id, so on a compacted topic it never replaces a
  row's record). It lands in one partition: on a multi-partition topic it is
  ordered only relative to the changes of that partition.
* A delete may be followed by a **tombstone** (``tombstone=True``: same key,
  null value) so a compacted topic can eventually forget the row. Consumers
  read a tombstone as a delete of the key's id, but they must know the
  topic's table (``--topic TABLE=TOPIC``), since a tombstone names none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeAlias

import msgspec

from .errors import ConfigError, InvalidEvent
from .events import NATIVE_OPS, NativeEvent, encode_native

__all__ = [
    "IdField",
    "KeyShape",
    "ProduceFormat",
    "encode_event",
    "id_fields",
    "key_for_id",
    "learn_key_shape",
    "murmur2",
    "partition_for_id",
    "row_id",
    "truncate_key",
]

ProduceFormat: TypeAlias = Literal["json", "msgpack"]
IdField: TypeAlias = str | Sequence[str]
"""The row field holding the id, or several fields for a composite id (a tuple, encoded as a JSON array)."""

_MAX_LISTED_FIELDS: Final = 12

_KEY_ENCODER: Final = msgspec.json.Encoder()


def _id_problem(value: Any) -> str | None:
    """Why `value` is not a usable row id, or None when it is."""
    cls = value.__class__
    if cls is int or cls is str or cls is bool:
        return None
    if cls is float:
        return None if math.isfinite(value) else f"{value!r}, not a finite number"
    if cls is tuple or cls is list:
        if not value:
            return "an empty array"
        for item in value:
            problem = _id_problem(item)
            if problem is not None:
                return f"{problem} (inside the composite id {value!r})"
        return None
    if isinstance(value, (int, str)):  # enums and other subclasses encode as their value
        return None
    if value is None:
        return "null"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "bytes (the key is JSON text: use a str)"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {cls.__name__}"


def key_for_id(id: Any) -> bytes:
    """The Kafka key of a row's events: the JSON encoding of its row id.

    An id is a str, int, finite float, bool, or a non-empty tuple/list of those
    (a composite id, encoded as a JSON array). Raises `InvalidEvent` otherwise.
    """
    problem = _id_problem(id)
    if problem is not None:
        raise InvalidEvent(
            f"the row id is {problem}; an id must be a string, number, bool, or an array of those"
        )
    return _KEY_ENCODER.encode(id)


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash of ``data`` (the default partitioner's), as an unsigned 32-bit
    int. O(len(data)). The Java client and aiokafka hash keys with it."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    n = len(data)
    h = (0x9747B28C ^ n) & mask
    end = n - n % 4
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    extra = n % 4
    if extra == 3:
        h ^= data[end + 2] << 16
    if extra >= 2:
        h ^= data[end + 1] << 8
    if extra >= 1:
        h ^= data[end]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def partition_for_id(id: Any, partitions: int) -> int:
    """The partition tally's producer puts a row's events in, on a topic of ``partitions``
    partitions: the default partitioner (aiokafka's and the Java client's) over the key
    `key_for_id` makes — murmur2, made positive, modulo the count. O(size of the id).

    Debezium keys records with its own key struct, so there the partition is
    ``(murmur2(record_key) & 0x7FFFFFFF) % partitions`` of the key bytes as written."""
    if not isinstance(partitions, int) or isinstance(partitions, bool) or partitions < 1:
        raise ValueError(f"partitions must be a positive int, got {partitions!r}")
    return (murmur2(key_for_id(id)) & 0x7FFFFFFF) % partitions


class KeyShape:
    """How a topic's records are keyed, learned from one record: the key bytes any row id
    gets, so the partition of a row no event has brought yet is known (a reconcile's fix for a
    missing row must land in the partition its future events will).

    ``kind``: ``"tally"`` (`key_for_id`, tally's producer), ``"fields"`` (a JSON object of the
    id fields: Debezium's key with ``schemas.enable=false``) or ``"schema"`` (Debezium's key
    with its schema: the learned key's bytes around its ``payload``).
    """

    def __init__(
        self, kind: str, fields: tuple[str, ...] = (), prefix: bytes = b"", suffix: bytes = b""
    ) -> None:
        self.kind = kind
        self.fields = fields
        self.prefix = prefix
        self.suffix = suffix

    def __repr__(self) -> str:
        return f"KeyShape({self.kind!r}, fields={self.fields!r})"

    def key(self, id: Any, id_fields: Sequence[str]) -> bytes:
        """The record key of the row ``id`` (its fields named by ``id_fields``). O(size)."""
        if self.kind == "tally":
            return key_for_id(id)
        values = id if isinstance(id, tuple) else (id,)
        if len(values) != len(id_fields):
            raise ValueError(f"id {id!r} does not have the {len(id_fields)} fields {id_fields}")
        by_name = dict(zip(id_fields, values, strict=True))
        return self.prefix + _KEY_ENCODER.encode({f: by_name[f] for f in self.fields}) + self.suffix

    def partition(self, id: Any, id_fields: Sequence[str], partitions: int) -> int:
        """The partition Kafka's default partitioner gives the row's key. O(size)."""
        return (murmur2(self.key(id, id_fields)) & 0x7FFFFFFF) % partitions


_PAYLOAD = b'"payload":'


def learn_key_shape(key: bytes | None, id: Any, id_fields: Sequence[str]) -> KeyShape | None:
    """The `KeyShape` that gives the record key ``key`` to the row ``id``, or None when none
    of the known shapes reproduces it byte for byte (then tally cannot place a row no event
    has brought: it says so rather than guess). O(len(key))."""
    if key is None or id is None:
        return None
    fields = tuple(id_fields)
    try:
        if key_for_id(id) == key:
            return KeyShape("tally")
    except InvalidEvent:
        pass
    try:
        doc = msgspec.json.decode(key)
    except msgspec.DecodeError:
        return None
    if not isinstance(doc, dict):
        return None
    prefix = suffix = b""
    if (
        set(doc) == {"schema", "payload"}
        and isinstance(doc["payload"], dict)
        and key.endswith(b"}")
    ):
        at = key.rfind(_PAYLOAD)
        if at < 0:
            return None
        prefix, suffix, doc = key[: at + len(_PAYLOAD)], b"}", doc["payload"]
    if set(doc) != set(fields):
        return None
    shape = KeyShape("fields" if not prefix else "schema", tuple(doc), prefix, suffix)
    try:
        return shape if shape.key(id, fields) == key else None
    except (ValueError, TypeError, msgspec.EncodeError):
        return None


def truncate_key(table: str) -> bytes:
    """The Kafka key of a truncate event: ``{"truncate": TABLE}`` (never a row's key)."""
    return _KEY_ENCODER.encode({"truncate": table})


def id_fields(id_field: IdField) -> tuple[str, ...]:
    fields = (id_field,) if isinstance(id_field, str) else tuple(id_field)
    if not fields or not all(isinstance(f, str) and f for f in fields):
        raise ConfigError(
            f"id_field must be a field name or a non-empty list of names, got {id_field!r}"
        )
    return fields


def _listed(names: Iterable[Any]) -> str:
    names = [str(n) for n in names]
    text = ", ".join(names[:_MAX_LISTED_FIELDS])
    if len(names) > _MAX_LISTED_FIELDS:
        text += f", … ({len(names)} in all)"
    return text or "none"


def row_id(row: Mapping[str, Any], id_field: IdField = "id") -> Any:
    """The id of `row`: ``row[id_field]``, or a tuple of the fields' values for several fields.

    Raises `InvalidEvent` when the row lacks an id field or an id value is null.
    The value's type is checked by `key_for_id`.
    """
    fields = id_field if id_field.__class__ is tuple and id_field else id_fields(id_field)
    if not isinstance(row, Mapping):
        raise InvalidEvent(
            f"a row must be an object (a mapping of field to value), got {type(row).__name__}"
        )
    try:
        if len(fields) == 1:
            value = row[fields[0]]
            if value is None:
                raise InvalidEvent(f"the row's id field {fields[0]!r} is null")
            return value
        values = tuple(row[f] for f in fields)
    except KeyError:
        absent = [f for f in fields if f not in row]
        noun = "field" if len(absent) == 1 else "fields"
        raise InvalidEvent(
            f"the row has no id {noun} {_listed(repr(f) for f in absent)} "
            f"(its fields: {_listed(row)})"
        ) from None
    nulls = [f for f, v in zip(fields, values, strict=True) if v is None]
    if nulls:
        raise InvalidEvent(f"the row's id field(s) {_listed(repr(f) for f in nulls)} are null")
    return values


def encode_event(
    event: NativeEvent, *, format: ProduceFormat = "json", id_field: IdField = "id"
) -> tuple[bytes, bytes]:
    """The Kafka ``(key, value)`` of a native event, following the key contract.

    When the event has no ``id``, it is read from the row image (``after`` for
    insert/update, ``before`` else ``after`` for delete) through `id_field`, and
    written into the value. Raises `InvalidEvent` for an event that consumers
    could not apply (unknown op, insert/update without ``after``, no id …).
    """
    op = event.op
    rid = event.id
    if op == "insert" or op == "update":
        after = event.after
        if after is None:
            raise InvalidEvent(
                f"{op} event for table {event.table!r} has no 'after' row image; an {op} needs the new row"
            )
        if not isinstance(after, dict):
            raise InvalidEvent(
                f"{op} event for table {event.table!r}: 'after' must be a dict (the row), "
                f"got {type(after).__name__}"
            )
        if rid is None:
            rid = row_id(after, id_field)
            event = msgspec.structs.replace(event, id=rid)
        key = key_for_id(rid)
    elif op == "delete":
        if rid is None:
            image = event.before if event.before is not None else event.after
            if image is None:
                raise InvalidEvent(
                    f"delete event for table {event.table!r} has no id and no 'before' row to read it "
                    "from; give the row id"
                )
            rid = row_id(image, id_field)
            event = msgspec.structs.replace(event, id=rid)
        key = key_for_id(rid)
    elif op == "truncate":
        key = truncate_key(event.table)
    else:
        raise InvalidEvent(
            f"unknown op {op!r} for table {event.table!r}; native events use "
            f"{', '.join(sorted(NATIVE_OPS))}"
        )
    try:
        value = encode_native(event, format)
    except (msgspec.EncodeError, TypeError, OverflowError) as exc:
        raise InvalidEvent(
            f"cannot encode the {op} event for table {event.table!r} as {format}: {exc}"
        ) from None
    return key, value
