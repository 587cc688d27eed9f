"""The id layer: committed id-index entries in memory, over the ``ids`` column family.

Like tree nodes, id-index entries are written to RocksDB at *checkpoints* only: a commit
logs its item changes (id, old entry, new entry), which is all a crash needs, and the
entries it changed stay *dirty* here until the next checkpoint writes them (opening a
store rebuilds the dirty set from the log after the last checkpoint). That takes most of
the bytes and operations out of every commit's WriteBatch, and an id changed many times
between two checkpoints is written once.

Clean entries read from RocksDB (and entries a checkpoint wrote) are kept in a bounded
cache, absent ids included, so a stream of updates to the same ids does not read them
again. When full, the cache keeps its newest half (insertion order): O(1) amortized.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice
from typing import Any, Final

from rocksdict import WriteBatch

from .codec import IdEntry, decode_id, encode
from .db import Database

__all__ = ["DEFAULT_CACHE_IDS", "IdIndex"]

DEFAULT_CACHE_IDS: Final = 131_072
"""Clean id-index entries kept in memory (about 250 bytes each)."""

_ABSENT: Final = object()


class IdIndex:
    """Committed id-index entries: dirty ones (logged, not checkpointed) and a clean cache."""

    __slots__ = ("capacity", "clean", "db", "dirty")

    def __init__(self, db: Database, capacity: int) -> None:
        self.db = db
        self.capacity = capacity
        self.dirty: dict[bytes, IdEntry | None] = {}
        """Full id key → entry (None: deleted) committed since the last checkpoint."""
        self.clean: dict[bytes, IdEntry | None] = {}
        """Full id key → entry as the ids column family holds it (None: absent)."""

    def clear(self) -> None:
        """Forget everything (the store reloads from the last checkpoint)."""
        self.dirty = {}
        self.clean = {}

    def get(self, idk: bytes) -> IdEntry | None:
        """The committed entry of ``idk``. O(1), plus one point read on a cache miss."""
        e = self.dirty.get(idk, _ABSENT)
        if e is _ABSENT:
            e = self.clean.get(idk, _ABSENT)
            if e is _ABSENT:
                raw = self.db.ids.get(idk)
                e = None if raw is None else decode_id(raw)
                self._remember(idk, e)
        return e  # type: ignore[return-value]

    def get_many(self, idks: list[bytes]) -> list[IdEntry | None]:
        """`get` of many keys; the misses are read in one RocksDB multi-get."""
        dirty, clean = self.dirty, self.clean
        out: list[IdEntry | object | None] = []
        miss: list[int] = []
        for i, idk in enumerate(idks):
            e = dirty.get(idk, _ABSENT)
            if e is _ABSENT:
                e = clean.get(idk, _ABSENT)
                if e is _ABSENT:
                    miss.append(i)
            out.append(e)
        if miss:
            keys: list[Any] = [idks[i] for i in miss]
            raws: Any = self.db.ids.get(keys)  # a multi-get: one value (or None) per key
            for i, k, raw in zip(miss, keys, raws, strict=True):
                e = None if raw is None else decode_id(raw)
                out[i] = e
                clean[k] = e
            self._trim()
        return out  # type: ignore[return-value]

    def _remember(self, idk: bytes, e: IdEntry | None) -> None:
        self.clean[idk] = e
        self._trim()

    def _trim(self) -> None:
        clean = self.clean
        if len(clean) > self.capacity:  # keep the newest half of the capacity
            self.clean = dict(islice(clean.items(), len(clean) - self.capacity // 2, None))

    def committed(self, ids: dict[bytes, IdEntry | None]) -> None:
        """A commit without a checkpoint made these entries durable (in its log record)."""
        self.dirty.update(ids)

    def forget_prefixes(self, prefixes: Iterable[bytes]) -> None:
        """Whole id ranges dropped (`Transaction.clear_ids`): not dirty, not cached."""
        ps = tuple(prefixes)
        if ps:
            self.dirty = {k: v for k, v in self.dirty.items() if not k.startswith(ps)}
            self.clean = {}

    def write_checkpoint(self, wb: WriteBatch, ids: dict[bytes, IdEntry | None]) -> None:
        """Put every dirty entry, then ``ids`` (the checkpointing commit's own), into ``wb``."""
        h_ids = self.db.h_ids
        for source in (self.dirty, ids):
            for k, e in source.items():
                if e is None:
                    wb.delete(k, h_ids)
                else:
                    wb.put(k, encode(e), h_ids)

    def checkpointed(self, ids: dict[bytes, IdEntry | None]) -> None:
        """The checkpoint is durable: the dirty entries are clean now (and stay cached)."""
        clean = self.clean
        clean.update(self.dirty)
        clean.update(ids)
        self.dirty = {}
        self._trim()
