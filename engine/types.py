"""Bounds normalization and cursors (the value types live in `tally.schemas.reads`).

The value types of the public API (`Item`, `Page`, `Bound`, `Bounds`, `Query`) are
declared with the rest of the read API in `tally.schemas.reads` and re-exported here. Every
read takes ``namespace=`` and ``bounds=``; bounds are normalized once into a half-open
interval of encoded item keys ``[lo, hi)`` (``None`` for an open end), which is all the
tree ever compares.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from tally.schemas.reads import Bound, Bounds, Item, Order, Page, Query

from .btree import Sum
from .errors import InvalidArgument, InvalidKey, OffsetOutOfRange
from .keys import decode_keys, encode_key, key_repr

__all__ = [
    "Bound",
    "Bounds",
    "Item",
    "Order",
    "Page",
    "Query",
    "as_queries",
    "decode_cursor",
    "decode_item",
    "encode_cursor",
    "normalize_bounds",
    "offset_out_of_range",
    "parse_order",
]

_MAX = b"\xff"


def _bound(value: Any, what: str) -> Bound | None:
    if value is None or isinstance(value, Bound):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"key", "inclusive", "id"}
        if unknown:
            raise InvalidArgument(
                f"{what} bound has unknown field(s) {sorted(unknown)}; "
                "a bound is {'key': ..., 'inclusive': true|false, 'id': ...}"
            )
        if "key" not in value:
            raise InvalidArgument(
                f"{what} bound needs a 'key': e.g. {{'key': 10, 'inclusive': False}}"
            )
        inclusive = value.get("inclusive", True)
        if not isinstance(inclusive, bool):
            raise InvalidArgument(
                f"{what}.inclusive must be true or false, got {key_repr(inclusive)}"
            )
        return Bound(value["key"], inclusive, value.get("id"))
    raise InvalidArgument(
        f"{what} bound must be a Bound or a dict like {{'key': 10, 'inclusive': True}}, got {key_repr(value)}"
    )


def _as_bounds(bounds: Any) -> Bounds:
    if isinstance(bounds, Bounds):
        return bounds
    if isinstance(bounds, Mapping):
        unknown = set(bounds) - {"lower", "upper", "eq", "prefix"}
        if unknown:
            raise InvalidArgument(
                f"bounds have unknown field(s) {sorted(unknown)}; use lower, upper, eq or prefix"
            )
        prefix = bounds.get("prefix")
        if prefix is not None and not isinstance(prefix, (tuple, list)):
            raise InvalidArgument(
                f"bounds.prefix must be a list/tuple of key elements, got {key_repr(prefix)}"
            )
        return Bounds(
            _bound(bounds.get("lower"), "lower"),
            _bound(bounds.get("upper"), "upper"),
            bounds.get("eq", msgspec.UNSET),
            None if prefix is None else tuple(prefix),
        )
    raise InvalidArgument(
        f"bounds must be a Bounds or a dict (lower/upper/eq/prefix), got {key_repr(bounds)}"
    )


def normalize_bounds(bounds: Any) -> tuple[bytes | None, bytes | None]:
    """Turn bounds into an encoded half-open interval ``[lo, hi)``. O(size of the keys)."""
    if bounds is None:
        return None, None
    b = _as_bounds(bounds)
    lows: list[bytes] = []
    highs: list[bytes] = []
    try:
        if b.lower is not None:
            k = encode_key(b.lower.key)
            if b.lower.id is None:
                lows.append(k if b.lower.inclusive else k + _MAX)
            else:
                ki = k + encode_key(b.lower.id)
                lows.append(ki if b.lower.inclusive else ki + b"\x00")
        if b.upper is not None:
            k = encode_key(b.upper.key)
            if b.upper.id is None:
                highs.append(k + _MAX if b.upper.inclusive else k)
            else:
                ki = k + encode_key(b.upper.id)
                highs.append(ki + b"\x00" if b.upper.inclusive else ki)
        if b.eq is not msgspec.UNSET:
            k = encode_key(b.eq)
            lows.append(k)
            highs.append(k + _MAX)
        if b.prefix is not None:
            p = encode_key(tuple(b.prefix))[:-1]  # drop the tuple terminator
            lows.append(p)
            highs.append(p + _MAX)
    except InvalidKey as e:
        raise InvalidKey(f"invalid bounds: {e}") from None
    return (max(lows) if lows else None), (min(highs) if highs else None)


def encode_cursor(item_key: bytes) -> str:
    """The opaque cursor for a position just after/before an item."""
    return base64.urlsafe_b64encode(item_key).decode("ascii")


def decode_cursor(cursor: Any) -> bytes:
    """Validate and decode a cursor produced by `encode_cursor`."""
    if not isinstance(cursor, str):
        raise InvalidArgument(
            f"cursor must be a string from a previous page, got {key_repr(cursor)}"
        )
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii"))
        _, j = decode_keys(raw, 0)
        _, j = decode_keys(raw, j)
        if j != len(raw):
            raise ValueError("trailing bytes")
    except (binascii.Error, ValueError, IndexError, InvalidKey, UnicodeError):
        raise InvalidArgument(
            f"malformed cursor {key_repr(cursor)}: pass the cursor of a previous page, or None to start"
        ) from None
    return raw


def decode_item(item_key: bytes, sum_value: Sum, namespace: Any) -> Item:
    """The `Item` of an encoded item key (``encode_key(key) + encode_key(id)``), as reads
    return it: ``namespace`` is passed through as the caller gave it. O(size of the key)."""
    key, j = decode_keys(item_key, 0)
    id_, _ = decode_keys(item_key, j)
    return Item(key, id_, sum_value, namespace)


def parse_order(order: Any) -> bool:
    """``order`` as a reverse flag: False for "asc", True for "desc"; else `InvalidArgument`."""
    if order == "asc":
        return False
    if order == "desc":
        return True
    raise InvalidArgument(f"order must be 'asc' or 'desc', got {key_repr(order)}")


def offset_out_of_range(offset: int, n: int) -> OffsetOutOfRange:
    """The error of `at(offset)` on a range holding ``n`` items (the message names the count
    and the valid offsets)."""
    return OffsetOutOfRange(
        f"offset {offset} is out of range: the range holds {n} items "
        f"(valid offsets are {-n}..{n - 1})"
        if n
        else f"offset {offset} is out of range: the range holds 0 items"
    )


def as_queries(queries: Iterable[Any]) -> list[Query]:
    """Batch queries (`Query` or dicts with namespace/bounds/offset) as `Query` values;
    `InvalidArgument` for anything else or a wrong offset."""
    out = []
    for q in queries:
        if isinstance(q, Query):
            out.append(q)
        elif isinstance(q, Mapping):
            unknown = set(q) - {"namespace", "bounds", "offset"}
            if unknown:
                raise InvalidArgument(
                    f"query has unknown field(s) {sorted(unknown)}; use namespace, bounds, offset"
                )
            offset = q.get("offset", 0)
            if not isinstance(offset, int) or isinstance(offset, bool):
                # count_batch/sum_batch do not use it, but a wrong one is a mistake to report
                raise InvalidArgument(f"a query's offset must be an int, got {key_repr(offset)}")
            out.append(Query(q.get("namespace"), q.get("bounds"), offset))
        else:
            raise InvalidArgument(f"each query must be a Query or a dict, got {key_repr(q)}")
    return out
