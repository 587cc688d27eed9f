"""How state is encoded in RocksDB: id-index entries, nodes, tree metas, log records.

Sums are msgpack ints and floats as before; a Decimal sum is a msgpack string of its
exact digits (``'12.10'``: the exponent is kept), read back as a Decimal because every
decoder of a sum is typed ``int | float | Decimal``. Ints beyond 64 bits (sums of many
items) are an ext type in nodes.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Final

import msgspec

from ..btree import Node, TreeMeta
from ..catalog import Generation
from ..errors import StoreCorrupted

__all__ = [
    "Change",
    "IdEntry",
    "decode_gen",
    "decode_id",
    "decode_log",
    "decode_node",
    "decode_tree",
    "encode",
    "encode_node",
    "same_item",
]


class IdEntry(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    """Where an id's item lives: encoded namespace and key, and its sum value."""

    ns: bytes
    key: bytes
    sum: int | float | Decimal
    pos: bytes | None = None
    """Encoded source position of the item's last change (see `Aggregate.truncate`)."""


Change = tuple[bytes, IdEntry | None, IdEntry | None]
"""One logged item change: (agg_id + encoded id, old entry, new entry)."""

_enc: Final = msgspec.msgpack.Encoder()
encode: Final = _enc.encode
"""msgpack of any Struct or plain value (no bigints: see `encode_node`)."""

_EXT_BIGINT: Final = 1


def _bigint_ext(code: int, data: memoryview) -> Any:
    if code == _EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise StoreCorrupted(f"unknown msgpack extension type {code} in a stored node")


def encode_node(node: Node) -> bytes:
    """msgpack of a node; sums beyond 64 bits (sums of many items) become an ext type."""
    try:
        return _enc.encode(node)
    except OverflowError:
        sums: list[Any] = [
            msgspec.msgpack.Ext(
                _EXT_BIGINT, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True)
            )
            if type(v) is int and not -(1 << 63) <= v < (1 << 63)
            else v
            for v in node.sums
        ]
        return _enc.encode(_AnyNode(node.keys, sums, node.children, node.counts))


class _AnyNode(msgspec.Struct, array_like=True, gc=False):
    """`Node` with untyped sums: what reads a node holding a bigint ext."""

    keys: list[bytes]
    sums: list[Any]
    children: list[int] = msgspec.field(default_factory=list)
    counts: list[int] = msgspec.field(default_factory=list)


_decode_node: Final = msgspec.msgpack.Decoder(Node).decode
_decode_any_node: Final = msgspec.msgpack.Decoder(_AnyNode, ext_hook=_bigint_ext).decode


def decode_node(raw: bytes) -> Node:
    """A stored node. Typed sums (strings are Decimals); a bigint ext takes the slow path."""
    try:
        return _decode_node(raw)
    except msgspec.ValidationError:
        n = _decode_any_node(raw)
        sums = [Decimal(v) if type(v) is str else v for v in n.sums]
        return Node(n.keys, sums, n.children, n.counts)


decode_tree: Final = msgspec.msgpack.Decoder(TreeMeta).decode
decode_id: Final = msgspec.msgpack.Decoder(IdEntry).decode
decode_gen: Final = msgspec.msgpack.Decoder(Generation).decode
decode_log: Final = msgspec.msgpack.Decoder(
    list[tuple[bytes, IdEntry | None, IdEntry | None]]
).decode


def same_item(a: IdEntry, ns: bytes, key: bytes, s: int | float | Decimal) -> bool:
    """``a`` holds exactly this item: namespace, key, and a sum of the same type and value
    (5 vs 5.0 vs Decimal(5), or Decimal 1.0 vs 1.00, are different sums)."""
    return (
        a.ns == ns
        and a.key == key
        and type(a.sum) is type(s)  # first: comparing a Decimal with a float flags the context
        and a.sum == s
        and (not isinstance(s, Decimal) or s.same_quantum(a.sum))  # type: ignore[arg-type]
    )
