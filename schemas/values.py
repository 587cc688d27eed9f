"""Typed values over JSON: how keys and sums of types JSON lacks cross the HTTP API and CLI.

Answers (`RESPONSE_ENCODER`): a Decimal is a JSON number with its exact digits
(``12.10``, ``99999999999.99``); ``datetime``/``date``/``time`` are RFC 3339 / ISO 8601
strings (an aware datetime key reads back in UTC: ``"2024-01-01T00:00:00Z"``), a
``timedelta`` an ISO 8601 duration (``"P1DT7200S"``), a UUID its canonical string.
JSON cannot tell a Decimal from a float, nor an ISO string from a str: a reader that needs
the type back decodes numbers as Decimal (`TallyClient(decimals=True)`; msgspec's
``float_hook=Decimal``) and parses the strings it knows to be dates.

Requests (`REQUEST_DECODER` then `from_json`): a plain JSON number means what it always
meant — an int, or else a float (``12.1`` is the float 12.1, which is not the Decimal
12.1). Values of other types are written as one-key objects, anywhere a key, id,
namespace or bound may go::

    {"$decimal": "12.10"}   or {"$decimal": 12.10}  (the digits as written)
    {"$datetime": "2024-01-01T00:00:00Z"}            (no offset: a naive datetime)
    {"$date": "2024-01-01"}   {"$time": "12:30:00"}   {"$timedelta": "PT90S"}
    {"$uuid": "12345678-1234-5678-1234-567812345678"}

No key can be a JSON object, so these never collide with a value. `to_json` writes
Python values in this form (the client's requests).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Final

import msgspec

__all__ = ["REQUEST_DECODER", "RESPONSE_ENCODER", "TAGS", "TypedValueError", "from_json", "to_json"]

TAGS: Final[dict[str, type]] = {
    "$decimal": Decimal,
    "$datetime": dt.datetime,
    "$date": dt.date,
    "$time": dt.time,
    "$timedelta": dt.timedelta,
    "$uuid": uuid.UUID,
}
"""The one-key objects `from_json` reads, and the type each stands for."""

_EXAMPLES: Final = {
    "$decimal": '{"$decimal": "12.10"}',
    "$datetime": '{"$datetime": "2024-01-01T00:00:00Z"}',
    "$date": '{"$date": "2024-01-01"}',
    "$time": '{"$time": "12:30:00"}',
    "$timedelta": '{"$timedelta": "PT90S"}',
    "$uuid": '{"$uuid": "12345678-1234-5678-1234-567812345678"}',
}


def _enc_hook(obj: Any) -> Any:
    # Values msgspec cannot encode natively (e.g. a progress object): their str().
    return str(obj)


RESPONSE_ENCODER: Final = msgspec.json.Encoder(enc_hook=_enc_hook, decimal_format="number")
"""Encodes answers: Decimals as exact JSON numbers, dates and times as ISO strings."""

REQUEST_DECODER: Final = msgspec.json.Decoder(float_hook=Decimal)
"""Decodes requests keeping each number's digits; `from_json` then makes plain numbers
floats again and keeps the digits inside ``{"$decimal": ...}``."""


class TypedValueError(ValueError):
    """A ``{"$type": ...}`` object whose value is not one of that type."""


def _typed(tag: str, value: Any) -> Any:
    t = TAGS[tag]
    if t is Decimal:
        if type(value) is Decimal or type(value) is int:
            return Decimal(value)
        if isinstance(value, str):
            try:
                return Decimal(value.strip())
            except InvalidOperation:
                pass
    elif isinstance(value, str):
        try:
            return msgspec.convert(value, t)
        except msgspec.ValidationError:
            pass
    got = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise TypedValueError(
        f"{{{tag!r}: {got}}} is not a valid {t.__name__}: write e.g. {_EXAMPLES[tag]}"
    )


def from_json(value: Any) -> Any:
    """A request value decoded by `REQUEST_DECODER` as the engine takes it: typed objects
    become their values, other numbers with a fraction or exponent floats.
    Raises `TypedValueError` for a typed object that does not parse."""
    t = type(value)
    if t is Decimal:
        return float(value)
    if t is list:
        return [from_json(v) for v in value]
    if t is dict:
        if len(value) == 1:
            ((k, v),) = value.items()
            if k in TAGS:
                return _typed(k, v)
        return {k: from_json(v) for k, v in value.items()}
    return value


def _to_json_typed(value: Any) -> Any:
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, dt.datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"$time": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$timedelta": msgspec.json.encode(value).decode()[1:-1]}
    if isinstance(value, uuid.UUID):
        return {"$uuid": str(value)}
    return value


def to_json(value: Any) -> Any:
    """``value`` with every Decimal, date, time, timedelta and UUID in it written as its
    ``{"$type": ...}`` object (structs and mappings become dicts; UNSET fields are left out)."""
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, msgspec.Struct):
        return {
            f: to_json(v)
            for f in value.__struct_fields__
            if (v := getattr(value, f)) is not msgspec.UNSET
        }
    return _to_json_typed(value)
