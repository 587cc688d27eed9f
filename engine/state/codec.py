"""How state is encoded in RocksDB: id-index entries, nodes, tree metas, log records."""

from __future__ import annotations

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
]


class IdEntry(msgspec.Struct, array_like=True, gc=False, omit_defaults=True):
    """Where an id's item lives: encoded namespace and key, and its sum value."""

    ns: bytes
    key: bytes
    sum: int | float
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
        sums = [
            msgspec.msgpack.Ext(
                _EXT_BIGINT, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True)
            )
            if type(v) is int and not -(1 << 63) <= v < (1 << 63)
            else v
            for v in node.sums
        ]
        return _enc.encode(Node(node.keys, sums, node.children, node.counts))


decode_node: Final = msgspec.msgpack.Decoder(Node, ext_hook=_bigint_ext).decode
decode_tree: Final = msgspec.msgpack.Decoder(TreeMeta).decode
decode_id: Final = msgspec.msgpack.Decoder(IdEntry).decode
decode_gen: Final = msgspec.msgpack.Decoder(Generation).decode
decode_log: Final = msgspec.msgpack.Decoder(list[tuple[bytes, IdEntry | None, IdEntry | None]]).decode
