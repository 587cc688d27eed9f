"""The key layout of a store: column families, metadata keys, key builders.

Column families (rocksdict, raw mode):

* ``nodes``: ``node_key(gid)`` (13 bytes: tree id << 40 | local id) → a msgpack `Node`.
  A tree's nodes share its id as prefix, so a whole tree drops with one range delete.
* ``ids``: ``agg_id(4) + encode_key(id)`` → msgpack `IdEntry`: the id index.
* ``log``: ``seq_key(seq)`` → the item changes of one committed batch since the last
  checkpoint.
* ``meta``: the counters and registries below, and callers' metadata (``P_USER``).

Metadata keys are one prefix byte plus a name; counters are 8-byte big-endian ints.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CF_IDS",
    "CF_LOG",
    "CF_META",
    "CF_NODES",
    "COLUMN_FAMILIES",
    "FORMAT_VERSION",
    "K_CKPT",
    "K_NEXT_AGG",
    "K_NEXT_TREE",
    "K_SEQ",
    "K_VERSION",
    "NODE_KEY_BYTES",
    "P_AGG",
    "P_GEN",
    "P_TREE",
    "P_USER",
    "P_WATERMARK",
    "UPGRADES_FROM",
    "agg_key",
    "counter",
    "gen_key",
    "node_key",
    "node_range",
    "prefix_end",
    "seq_key",
    "tree_key",
    "user_key",
    "watermark_key",
]

CF_NODES: Final = "nodes"
CF_IDS: Final = "ids"
CF_LOG: Final = "log"
CF_META: Final = "meta"
COLUMN_FAMILIES: Final = (CF_NODES, CF_IDS, CF_LOG, CF_META)

FORMAT_VERSION: Final = b"3"
"""On-disk format; a store of another format is refused with a hint to rebuild it.

3: id-index entries are written at checkpoints; a commit only logs them, and opening a store
redoes the log after the last checkpoint into the id index too (`tally.engine.state.ids`).
A tally that reads format 2 would take such a store's ids column family for complete."""
UPGRADES_FROM: Final = (b"2",)
"""Formats a writer opens and marks as `FORMAT_VERSION` in place. Format 2 always wrote its
id-index entries at commit, so its ids column family is complete: format 3 reads it as a
store whose log holds nothing the id index lacks."""

K_VERSION: Final = b"Vformat"
K_NEXT_TREE: Final = b"Ctree"
"""Next tree id (allocated in memory, persisted at checkpoints)."""
K_NEXT_AGG: Final = b"Cagg"
"""Next aggregate id (persisted with the batch that allocates one)."""
K_SEQ: Final = b"Cseq"
"""Sequence number of the last committed batch."""
K_CKPT: Final = b"Cckpt"
"""Sequence number covered by the last checkpoint: log records after it are replayed on open."""

P_AGG: Final = b"A"
"""``A + name`` → the aggregate's 4-byte id (the prefix of its id-index keys)."""
P_TREE: Final = b"T"
"""``T + agg_id + encoded namespace`` → msgpack `TreeMeta` (written at checkpoints)."""
P_USER: Final = b"U"
"""``U + key`` → callers' metadata (`Batch.put_meta`: the consumers' source offsets)."""
P_GEN: Final = b"G"
"""``G + logical name`` → msgpack `Generation` (the catalog)."""
P_WATERMARK: Final = b"W"
"""``W + agg_id`` → the encoded source position of the aggregate's last positioned truncate."""

NODE_KEY_BYTES: Final = 13


def agg_key(name: str) -> bytes:
    return P_AGG + name.encode()


def tree_key(agg_id: bytes, ens: bytes) -> bytes:
    """Registry key of the tree of one namespace (encoded) of an aggregate."""
    return P_TREE + agg_id + ens


def watermark_key(agg_id: bytes) -> bytes:
    return P_WATERMARK + agg_id


def gen_key(name: str) -> bytes:
    return P_GEN + name.encode()


def user_key(key: bytes) -> bytes:
    return P_USER + bytes(key)


def node_key(gid: int) -> bytes:
    return gid.to_bytes(NODE_KEY_BYTES, "big")


def node_range(tid: int, nid_bits: int) -> tuple[bytes, bytes]:
    """[start, end) of the node keys of tree ``tid``."""
    return node_key(tid << nid_bits), node_key((tid + 1) << nid_bits)


def seq_key(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


def counter(value: int) -> bytes:
    return value.to_bytes(8, "big")


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\xff" * (len(prefix) + 1)
    p[-1] += 1
    return bytes(p)
