"""Typed values: Debezium's logical types and declared column types → the Python values a
user expects, and the ones psycopg gives the reconciler for the same columns.

| column (Postgres)          | on the wire (Debezium, JSON converter)               | value           |
|----------------------------|------------------------------------------------------|-----------------|
| numeric(p,s), money        | `Decimal` bytes (base64 unscaled, ``scale``) ·        | `Decimal`       |
|                            | double · string (``decimal.handling.mode``)          |                 |
| numeric (no scale)         | `VariableScaleDecimal` ``{scale, value}``            | `Decimal`       |
| timestamptz                | `ZonedTimestamp` ISO string                          | aware datetime  |
| timestamp(p)               | `Timestamp` ms / `MicroTimestamp` µs / `NanoTimestamp`| naive datetime  |
| date                       | `Date` days since 1970-01-01                         | `date`          |
| time(p), timetz            | `Time` ms / `MicroTime` µs / `NanoTime`, `ZonedTime` | `time`          |
| interval                   | `MicroDuration` µs                                   | `timedelta`     |
| json, jsonb                | `Json` string                                        | dict/list/...   |
| uuid                       | `Uuid` string                                        | `UUID`          |
| bytea                      | bytes (base64)                                       | `bytes`         |
| arrays                     | JSON arrays of the element type                      | `list`          |
| everything else            | as is (int, float, bool, str; enums as str)          |                 |

When the record carries its Connect schema (the JSON converter's ``schemas.enable=true``),
the schema says which columns need what (`RowTyping.from_connect_schema`). Without one,
the definitions declare the column types once per table (``TableAggregate(...,
columns={"amount": "numeric(12,2)"})``, parsed by `parse_column_type`) and `RowTyping`
reads the wire forms the connector settings imply (`WireFormat`). Declared types also
apply on top of a schema, so ``decimal.handling.mode=double`` with ``numeric(12,2)``
declared still gives exact `Decimal`s (the double is rounded back to the column's scale).

**Unavailable values.** With ``REPLICA IDENTITY DEFAULT``, an update that leaves a TOASTed
column unchanged carries Debezium's placeholder instead of the value (the string
``__debezium_unavailable_value``, its bytes in base64 for bytea, the bytes as an int array
for arrays). Such a value becomes `UNAVAILABLE`, which refuses every use (comparison,
``len``, arithmetic, ``str`` …) with `UnavailableValue`: a definition that does not read the
column is unaffected; one that does cannot silently compute from the placeholder.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import re
from collections.abc import Callable, Mapping
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final, Literal, NoReturn
from uuid import UUID

import msgspec

from .errors import BadRecord, ConfigError, TallyError

__all__ = [
    "DEFAULT_PLACEHOLDER",
    "UNAVAILABLE",
    "ColumnType",
    "RowTyping",
    "UnavailableValue",
    "WireFormat",
    "contains_unavailable",
    "parse_column_type",
    "placeholder_markers",
]

DEFAULT_PLACEHOLDER: Final = "__debezium_unavailable_value"
"""Debezium's ``unavailable.value.placeholder`` default (TOASTed values it was not sent)."""

_EXACT: Final = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation],
)
_EPOCH: Final = datetime(1970, 1, 1)
_EPOCH_DATE: Final = date(1970, 1, 1)
_MIDNIGHT: Final = datetime(1970, 1, 1)
_JSON: Final = msgspec.json.Decoder()

Converter = Callable[[Any], Any]


class UnavailableValue(TallyError, TypeError):
    """A definition used a value the source did not send (Debezium's TOAST placeholder)."""


class _Unavailable:
    """The value of a column the event did not carry. Any use raises `UnavailableValue`."""

    __slots__ = ()
    _instance: _Unavailable | None = None

    def __new__(cls) -> _Unavailable:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<unavailable>"

    def _refuse(self, *_: object) -> NoReturn:
        raise UnavailableValue(
            "the row's value is unavailable: the source sent Debezium's placeholder for an "
            "unchanged TOASTed column"
        )

    __str__ = __bytes__ = __len__ = __iter__ = __bool__ = __hash__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __truediv__ = __floordiv__ = __mod__ = __neg__ = __int__ = __float__ = __index__ = _refuse
    __getitem__ = __contains__ = __getattr__ = _refuse
    __abs__ = __pos__ = __invert__ = __round__ = __pow__ = __rpow__ = __format__ = _refuse
    __rtruediv__ = __rfloordiv__ = __rmod__ = __reversed__ = __complex__ = __divmod__ = _refuse


UNAVAILABLE: Final = _Unavailable()


def contains_unavailable(value: Any) -> bool:
    """``value`` is `UNAVAILABLE` or a tuple/list holding it (an extracted key)."""
    if value is UNAVAILABLE:
        return True
    if value.__class__ is tuple or value.__class__ is list:
        return any(contains_unavailable(v) for v in value)
    return False


# ---------------------------------------------------------------- wire forms → values


def _bad(what: str, value: Any) -> NoReturn:
    r = repr(value)
    raise BadRecord("decode", f"{what}: cannot read {r[:60]}{'...' if len(r) > 60 else ''}")


def _unscaled(raw: Any, what: str) -> int:
    try:
        data = base64.b64decode(raw, validate=True) if isinstance(raw, str) else bytes(raw)
    except (binascii.Error, TypeError, ValueError):
        _bad(f"{what} (base64 unscaled decimal)", raw)
    return int.from_bytes(data, "big", signed=True)


def _decimal_bytes(scale: int) -> Converter:
    def conv(v: Any) -> Decimal:
        if v.__class__ is Decimal:
            return v
        return Decimal(_unscaled(v, "Decimal")).scaleb(-scale, _EXACT)

    return conv


def _variable_decimal(v: Any) -> Any:
    if isinstance(v, Mapping) and "value" in v and "scale" in v:
        scale = v["scale"]
        if not isinstance(scale, int):
            _bad("VariableScaleDecimal scale", scale)
        return Decimal(_unscaled(v["value"], "VariableScaleDecimal")).scaleb(-scale, _EXACT)
    return v


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _int(v: Any, what: str) -> int:
    if v.__class__ is not int:
        _bad(what, v)
    return v


def _ts_ms(v: Any) -> Any:
    return (
        v if isinstance(v, datetime) else _EPOCH + timedelta(milliseconds=_int(v, "Timestamp (ms)"))
    )


def _ts_us(v: Any) -> Any:
    return v if isinstance(v, datetime) else _from_us(_int(v, "MicroTimestamp (µs)"))


def _ts_ns(v: Any) -> Any:
    # Python datetimes hold microseconds: nanoseconds are truncated (documented).
    return v if isinstance(v, datetime) else _from_us(_int(v, "NanoTimestamp (ns)") // 1000)


def _iso_datetime(v: Any) -> Any:
    if isinstance(v, datetime):
        return v
    if not isinstance(v, str):
        _bad("ZonedTimestamp (ISO-8601 text)", v)
    try:
        return datetime.fromisoformat(v)
    except ValueError:
        _bad("ZonedTimestamp (ISO-8601 text)", v)


def _naive_datetime_text(v: Any) -> Any:
    if isinstance(v, datetime):
        return v
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v)
        except ValueError:
            pass
    _bad("timestamp (ISO-8601 text)", v)


def _date(v: Any) -> Any:
    if isinstance(v, date) and not isinstance(v, datetime):
        return v
    if v.__class__ is int:
        return _EPOCH_DATE + timedelta(days=v)
    if isinstance(v, str):
        try:
            return date.fromisoformat(v)
        except ValueError:
            pass
    _bad("Date (days since 1970-01-01)", v)


def _time_us(us: int) -> time:
    return (_MIDNIGHT + timedelta(microseconds=us)).time()


def _time_ms(v: Any) -> Any:
    return v if isinstance(v, time) else _time_us(_int(v, "Time (ms)") * 1000)


def _time_micro(v: Any) -> Any:
    return v if isinstance(v, time) else _time_us(_int(v, "MicroTime (µs)"))


def _time_nano(v: Any) -> Any:
    return v if isinstance(v, time) else _time_us(_int(v, "NanoTime (ns)") // 1000)


def _time_text(v: Any) -> Any:
    if isinstance(v, time):
        return v
    if isinstance(v, str):
        try:
            return time.fromisoformat(v)
        except ValueError:
            pass
    _bad("ZonedTime (ISO-8601 text)", v)


def _duration_us(v: Any) -> Any:
    return v if isinstance(v, timedelta) else timedelta(microseconds=_int(v, "MicroDuration (µs)"))


def _json(v: Any) -> Any:
    if isinstance(v, str):
        try:
            return _JSON.decode(v)
        except msgspec.DecodeError as e:
            _bad(f"Json ({e})", v)
    return v


def _uuid(v: Any) -> Any:
    if isinstance(v, UUID):
        return v
    try:
        return UUID(v)
    except (TypeError, ValueError, AttributeError):
        _bad("Uuid", v)


def _b64_bytes(v: Any) -> Any:
    if isinstance(v, bytes):
        return v
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, TypeError, ValueError):
        _bad("bytes (base64)", v)


def _array(item: Converter) -> Converter:
    def conv(v: Any) -> Any:
        if v.__class__ is not list:
            return v
        return [None if x is None else item(x) for x in v]

    return conv


_LOGICAL: Final[dict[str, Converter]] = {
    "io.debezium.data.VariableScaleDecimal": _variable_decimal,
    "io.debezium.time.Date": _date,
    "org.apache.kafka.connect.data.Date": _date,
    "io.debezium.time.Timestamp": _ts_ms,
    "org.apache.kafka.connect.data.Timestamp": _ts_ms,
    "io.debezium.time.MicroTimestamp": _ts_us,
    "io.debezium.time.NanoTimestamp": _ts_ns,
    "io.debezium.time.ZonedTimestamp": _iso_datetime,
    "io.debezium.time.Time": _time_ms,
    "org.apache.kafka.connect.data.Time": _time_ms,
    "io.debezium.time.MicroTime": _time_micro,
    "io.debezium.time.NanoTime": _time_nano,
    "io.debezium.time.ZonedTime": _time_text,
    "io.debezium.time.MicroDuration": _duration_us,
    "io.debezium.data.Json": _json,
    "io.debezium.data.Uuid": _uuid,
}
"""Connect/Debezium logical type name → converter (Decimal needs its scale: see below)."""


def _field_converter(field: Mapping[str, Any]) -> Converter | None:
    """The converter a Connect field schema needs, or None (the value is right as it is)."""
    name = field.get("name")
    kind = field.get("type")
    if name == "org.apache.kafka.connect.data.Decimal":
        params = field.get("parameters") or {}
        try:
            scale = int(params.get("scale", 0))
        except (TypeError, ValueError):
            raise BadRecord(
                "decode", f"Decimal schema with a bad scale {params.get('scale')!r}"
            ) from None
        return _decimal_bytes(scale)
    if isinstance(name, str):
        conv = _LOGICAL.get(name)
        if conv is not None:
            return conv
    if kind == "bytes":
        return _b64_bytes
    if kind == "array":
        items = field.get("items")
        if isinstance(items, Mapping):
            inner = _field_converter(items)
            if inner is not None:
                return _array(inner)
    return None


# ---------------------------------------------------------------- declared column types


WireFormat = Literal["debezium", "native"]
"""Who wrote the value: Debezium's connector (its wire forms, per its settings) or tally's
native events (plain JSON: numbers or decimal text, ISO-8601 text, JSON values)."""

DecimalHandling = Literal["precise", "double", "string"]
TimePrecision = Literal["adaptive", "adaptive_time_microseconds", "connect"]


class ColumnType(msgspec.Struct, frozen=True):
    """A declared column type: a Postgres type name with its precision/scale."""

    name: str
    precision: int | None = None
    scale: int | None = None
    array: bool = False


_ALIASES: Final = {
    "decimal": "numeric",
    "timestamp with time zone": "timestamptz",
    "timestamp without time zone": "timestamp",
    "time with time zone": "timetz",
    "time without time zone": "time",
    "int": "integer",
    "int4": "integer",
    "int8": "bigint",
    "int2": "smallint",
    "float8": "double precision",
    "double": "double precision",
    "float4": "real",
    "bool": "boolean",
    "character varying": "varchar",
}
_PASSTHROUGH: Final = frozenset(
    (
        "integer",
        "bigint",
        "smallint",
        "real",
        "double precision",
        "float",
        "boolean",
        "text",
        "varchar",
        "char",
        "character",
        "enum",
        "xml",
    )
)
_TYPED: Final = frozenset(
    (
        "numeric",
        "money",
        "timestamptz",
        "timestamp",
        "date",
        "time",
        "timetz",
        "interval",
        "json",
        "jsonb",
        "uuid",
        "bytea",
    )
)
_TYPE_RE: Final = re.compile(
    r"^\s*([a-z][a-z0-9 _]*?)\s*(?:\(\s*(\d+)\s*(?:,\s*(-?\d+)\s*)?\))?\s*(\[\])?\s*$"
)


def parse_column_type(spec: str) -> ColumnType:
    """``"numeric(12,2)"``, ``"timestamptz"``, ``"timestamp(3)"``, ``"jsonb"``, ``"int[]"`` …"""
    m = _TYPE_RE.match(spec.lower()) if isinstance(spec, str) else None
    if m is None:
        raise ConfigError(
            f"column type {spec!r} is not a type name like 'numeric(12,2)', 'timestamptz' or 'jsonb'"
        )
    name = _ALIASES.get(m.group(1).strip(), m.group(1).strip())
    if name not in _TYPED and name not in _PASSTHROUGH:
        known = ", ".join(sorted(_TYPED | _PASSTHROUGH))
        raise ConfigError(f"column type {spec!r}: unknown type {name!r}; known: {known}")
    p = int(m.group(2)) if m.group(2) else None
    s = int(m.group(3)) if m.group(3) else None
    if name == "money" and s is None:
        s = 2
    return ColumnType(name, p, s, bool(m.group(4)))


def _decimal_declared(t: ColumnType, wire: WireFormat, mode: DecimalHandling) -> Converter:
    scale = t.scale
    quantum = None if scale is None else Decimal(1).scaleb(-scale)

    def conv(v: Any) -> Any:
        c = v.__class__
        if c is Decimal:
            return v
        if c is int:
            return Decimal(v)
        if c is float:
            d = Decimal(repr(v))  # the shortest decimal that reads back as this double
            return d if quantum is None else d.quantize(quantum, context=_EXACT)
        if c is str:
            if wire == "debezium" and mode == "precise":
                if scale is None:
                    _bad("numeric without a declared scale (declare numeric(p,s))", v)
                return Decimal(_unscaled(v, "Decimal")).scaleb(-scale, _EXACT)
            try:
                return Decimal(v)
            except decimal.InvalidOperation:
                _bad("numeric (decimal text)", v)
        if isinstance(v, Mapping):
            return _variable_decimal(v)
        _bad("numeric", v)

    return conv


def _declared_converter(
    t: ColumnType, wire: WireFormat, mode: DecimalHandling, precision: TimePrecision
) -> Converter | None:
    name = t.name
    conv: Converter | None
    if name in ("numeric", "money"):
        conv = _decimal_declared(t, wire, mode)
    elif name == "timestamptz":
        conv = _iso_datetime
    elif name == "timestamp":
        p = 6 if t.precision is None else t.precision
        if wire == "native":
            conv = _naive_datetime_text
        elif precision == "connect" or p <= 3:
            conv = _ts_ms_or_text
        else:
            conv = _ts_us_or_text
    elif name == "date":
        conv = _date
    elif name == "time":
        p = 6 if t.precision is None else t.precision
        if wire == "native":
            conv = _time_text
        elif precision == "connect" or (precision == "adaptive" and p <= 3):
            conv = _time_ms_or_text
        else:
            conv = _time_us_or_text
    elif name == "timetz":
        conv = _time_text
    elif name == "interval":
        conv = _duration_us
    elif name in ("json", "jsonb"):
        conv = _json
    elif name == "uuid":
        conv = _uuid
    elif name == "bytea":
        conv = _b64_bytes
    else:
        conv = None
    if conv is not None and t.array:
        return _array(conv)
    return conv


def _either(number: Converter, text: Converter) -> Converter:
    def conv(v: Any) -> Any:
        return text(v) if isinstance(v, str) else number(v)

    return conv


_ts_ms_or_text: Final = _either(_ts_ms, _naive_datetime_text)
_ts_us_or_text: Final = _either(_ts_us, _naive_datetime_text)
_time_ms_or_text: Final = _either(_time_ms, _time_text)
_time_us_or_text: Final = _either(_time_micro, _time_text)


# ---------------------------------------------------------------- rows


class RowTyping:
    """Converts row images in place: logical types from a schema, then declared types.

    One instance per (table, schema) is cached by the decoder; `convert` is the hot path
    (only the columns that need it are touched).
    """

    __slots__ = ("_convs", "_markers", "_placeholders", "placeholder")

    def __init__(
        self, convs: Mapping[str, Converter], placeholder: str = DEFAULT_PLACEHOLDER
    ) -> None:
        self._convs = tuple(convs.items())
        self.placeholder = placeholder
        raw = placeholder.encode()
        self._placeholders: tuple[Any, ...] = (
            placeholder,
            base64.b64encode(raw).decode(),
            list(raw),
            [placeholder],
        )
        self._markers = placeholder_markers(placeholder)

    @property
    def empty(self) -> bool:
        return not self._convs

    @classmethod
    def build(
        cls,
        schema_fields: list[Any] | None,
        declared: Mapping[str, ColumnType] | None,
        *,
        wire: WireFormat,
        decimal_handling: DecimalHandling = "precise",
        time_precision: TimePrecision = "adaptive",
        placeholder: str = DEFAULT_PLACEHOLDER,
    ) -> RowTyping:
        """From a Connect struct's ``fields`` (if the record has a schema) and declared types."""
        convs: dict[str, Converter] = {}
        for f in schema_fields or ():
            if isinstance(f, Mapping) and isinstance(f.get("field"), str):
                conv = _field_converter(f)
                if conv is not None:
                    convs[f["field"]] = conv
        for col, t in (declared or {}).items():
            conv = _declared_converter(t, wire, decimal_handling, time_precision)
            if conv is None:
                continue
            first = convs.get(col)
            convs[col] = conv if first is None else _chain(first, conv)
        return cls(convs, placeholder)

    def convert(self, row: dict[str, Any], *, scan_placeholders: bool = False) -> dict[str, Any]:
        """Convert ``row``'s typed columns in place (and mark placeholders when asked)."""
        if scan_placeholders:
            ph = self._placeholders
            for col, v in row.items():
                if v.__class__ in (str, list) and v in ph:
                    row[col] = UNAVAILABLE
        for col, conv in self._convs:
            v = row.get(col)
            if v is not None and v is not UNAVAILABLE:
                row[col] = conv(v)
        return row


def placeholder_markers(placeholder: str) -> tuple[bytes, ...]:
    """Byte strings one of which a raw record holds if it carries the placeholder in any
    wire form (text, base64 bytes, an int array): a C-speed test before scanning a row."""
    raw = placeholder.encode()
    ints = ",".join(str(b) for b in raw[:6]).encode()
    return raw, base64.b64encode(raw), ints, ints.replace(b",", b", ")


def _chain(first: Converter, second: Converter) -> Converter:
    def conv(v: Any) -> Any:
        return second(first(v))

    return conv
