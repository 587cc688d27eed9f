"""The node layer: decoded tree nodes over the database, and the nodes changed since the
last checkpoint.

Trees (`tally.engine.btree.Tree`) read and write nodes through this cache (it is their
`NodeStore`). A changed node stays *dirty* in memory across commits until a checkpoint
writes it (`write_checkpoint`); the change log covers it until then. Clean nodes are
kept in an LRU of ``capacity`` entries.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import accumulate

from rocksdict import WriteBatch

from ..btree import NID_BITS, Node
from ..errors import StoreCorrupted
from .codec import decode_node, encode_node
from .db import Database
from .metadata import node_key, node_range

__all__ = ["NodeCache"]

_NID_MASK = (1 << NID_BITS) - 1


class NodeCache:
    """Decoded nodes by global id (LRU), dirty nodes, freed nodes and dropped trees."""

    __slots__ = ("_cums", "_lru", "capacity", "db", "dirty", "dropped", "freed", "mutations")

    def __init__(self, db: Database, capacity: int) -> None:
        self.db = db
        self.capacity = capacity
        self._lru: OrderedDict[int, Node] = OrderedDict()
        self._cums: dict[int, list[int]] = {}
        self.mutations = 0
        """Bumped by every node change: a transaction that saw it move cannot just drop its
        overlays on abort (nodes changed in place), the store must recover."""
        self.reset_checkpoint()

    def reset_checkpoint(self) -> None:
        """Forget what the last checkpoint wrote (or what a recovery discards)."""
        self.dirty: dict[int, Node] = {}
        self.freed: set[int] = set()
        self.dropped: set[int] = set()
        """Trees dropped since the last checkpoint: their node ranges are deleted there."""

    def clear(self) -> None:
        """Drop every cached node (the store reloads from the last checkpoint)."""
        self._lru.clear()
        self._cums.clear()
        self.reset_checkpoint()

    def __len__(self) -> int:
        return len(self._lru)

    # ---- the btree.NodeStore protocol ------------------------------------------------

    def get_node(self, gid: int) -> Node:
        """The node ``gid``: cached, dirty, or read and decoded. O(1) (+ one point read)."""
        lru = self._lru
        n = lru.get(gid)
        if n is not None:
            lru.move_to_end(gid)
            return n
        n = self.dirty.get(gid)
        if n is None:
            raw = self.db.nodes.get(node_key(gid))
            if raw is None:
                raise StoreCorrupted(
                    f"node {gid & _NID_MASK} of tree {gid >> NID_BITS} is missing from "
                    f"{self.db.path!r}; run validate() and rebuild the aggregate"
                )
            n = decode_node(raw)
        lru[gid] = n
        if len(lru) > self.capacity:
            lru.popitem(last=False)
        return n

    def get_cum(self, gid: int, node: Node) -> list[int]:
        """Prefix sums of an internal node's child counts, cached until it changes."""
        c = self._cums.get(gid)
        if c is None:
            if len(self._cums) >= self.capacity:
                self._cums.clear()
            c = self._cums[gid] = list(accumulate(node.counts))
        return c

    def put_node(self, gid: int, node: Node) -> None:
        self.dirty[gid] = node
        self._cums.pop(gid, None)
        self.mutations += 1

    def add_node(self, gid: int, node: Node) -> None:
        self.dirty[gid] = node
        self._lru[gid] = node
        self.mutations += 1

    def free_node(self, gid: int) -> None:
        self.mutations += 1
        self.dirty.pop(gid, None)
        self._cums.pop(gid, None)
        self._lru.pop(gid, None)
        self.freed.add(gid)

    # ---- trees and checkpoints ----------------------------------------------------------

    def drop_tree(self, tid: int) -> None:
        """Forget a whole tree in O(1): the checkpoint deletes its node range."""
        self.dropped.add(tid)
        self.mutations += 1

    @property
    def pending(self) -> bool:
        """Anything for a checkpoint to write."""
        return bool(self.dirty or self.freed or self.dropped)

    def write_checkpoint(self, wb: WriteBatch) -> None:
        """Put every dirty node, and delete freed nodes and dropped trees, into ``wb``."""
        h_nodes = self.db.h_nodes
        dropped = self.dropped
        for tid in sorted(dropped):
            start, end = node_range(tid, NID_BITS)
            wb.delete_range(start, end, h_nodes)
        for gid, node in self.dirty.items():
            if not dropped or gid >> NID_BITS not in dropped:  # a dropped tree's nodes stay deleted
                wb.put(node_key(gid), encode_node(node), h_nodes)
        for gid in self.freed:
            wb.delete(node_key(gid), h_nodes)
