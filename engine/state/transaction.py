"""The open batch of writes: overlays of the id index and metadata, the change log,
commit and abort.

Every write to a store happens inside a `Transaction` (`Store.transaction()`; the
public `Store.batch()` hands out its `Batch` view). Reads go through the overlays, so a
transaction sees its own writes. `commit` writes, in ONE RocksDB WriteBatch: the id-index
entries it changed, a log record of its item changes (id, old item, new item), its
metadata, and — when a checkpoint is due — every dirty tree node (`tally.engine.state.cache`).
`abort` discards the overlays; if tree nodes were already changed in place, the store
recovers its last committed state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from rocksdict import WriteBatch

from .cache import NodeCache
from .codec import Change, IdEntry, decode_id, encode
from .db import Database
from .ids import IdIndex
from .metadata import K_NEXT_AGG, K_SEQ, counter, prefix_end, seq_key, user_key


class TransactionOwner(Protocol):
    """What a transaction needs of its store (`tally.engine.state.store.StateStore` is one)."""

    db: Database
    nodes: NodeCache
    id_index: IdIndex
    seq: int
    next_agg: int
    saved_agg: int

    def checkpoint_due(self, changes: int) -> bool: ...
    def checkpoint_pending(self) -> bool: ...
    def write_checkpoint(self, wb: WriteBatch, seq: int) -> None: ...
    def committed(self, seq: int, checkpoint: bool, changes: int) -> None: ...
    def end_transaction(
        self, tx: Transaction, *, committed: bool, touched_meta: bool = False
    ) -> None: ...
    def recover(self) -> None: ...


__all__ = ["Batch", "Transaction", "TransactionOwner"]

_ABSENT = object()


class Transaction:
    """Writes of one batch, not yet committed. Engine-internal: use `Store.batch()`."""

    __slots__ = (
        "_mutations",
        "changes",
        "depth",
        "force_checkpoint",
        "ids",
        "ids_cleared",
        "meta",
        "store",
        "structural",
    )

    def __init__(self, store: TransactionOwner) -> None:
        self.store = store
        self.depth = 0
        """Nesting of `Store.transaction()` blocks; the outermost one commits or aborts."""
        self.ids: dict[bytes, IdEntry | None] = {}
        """Id-index overlay: full id key → new entry (None: deleted)."""
        self.ids_cleared: list[bytes] = []
        """Aggregate ids whose whole id index is dropped (`Aggregate.clear_all`)."""
        self.meta: dict[bytes, bytes | None] = {}
        """Metadata overlay: key → value (None: deleted)."""
        self.changes: list[Change] = []
        """The change log of this batch: item changes in order."""
        self.structural = False
        """A tree was created, dropped or rebuilt: force a checkpoint at commit."""
        self.force_checkpoint = False
        self._mutations = store.nodes.mutations

    def __enter__(self) -> Transaction:
        self.depth += 1
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            if exc_type is None:
                self.commit()
            else:
                self.abort()

    # ---- reads through the overlays ------------------------------------------------

    def get_id(self, idk: bytes) -> IdEntry | None:
        """The id-index entry of ``agg_id + encoded id`` as this batch sees it. O(1)."""
        e = self.ids.get(idk, _ABSENT)
        if e is not _ABSENT:
            return e  # type: ignore[return-value]
        if self.ids_cleared and any(idk.startswith(p) for p in self.ids_cleared):
            return None
        return self.store.id_index.get(idk)

    def get_ids(self, idks: list[bytes]) -> list[IdEntry | None]:
        """`get_id` of many keys (the committed ones read in one RocksDB multi-get)."""
        ids = self.ids
        if self.ids_cleared or any(k in ids for k in idks):
            return [self.get_id(k) for k in idks]
        return self.store.id_index.get_many(idks)

    def get_meta(self, key: bytes) -> bytes | None:
        try:
            return self.meta[key]
        except KeyError:
            return self.store.db.meta.get(key)

    def scan_meta(self, prefix: bytes) -> dict[bytes, bytes]:
        """Metadata under ``prefix`` (full keys), committed and overlaid."""
        found = dict(self.store.db.scan(self.store.db.meta, prefix))
        for k, v in self.meta.items():
            if k.startswith(prefix):
                if v is None:
                    found.pop(k, None)
                else:
                    found[k] = v
        return found

    def scan_ids(self, agg_id: bytes) -> Iterator[tuple[bytes, IdEntry]]:
        """Id-index entries of an aggregate in id order, overlaid with this batch.

        Without pending id changes (the normal case outside a batch) the column family
        is streamed: constant memory. With some, the aggregate's index is merged in
        memory. A RocksDB iterator reads the state as of its creation, so batches
        committed while a scan runs do not disturb it.
        """
        db = self.store.db
        cleared = any(agg_id.startswith(p) for p in self.ids_cleared)
        over: dict[bytes, IdEntry | None] = {}
        if not cleared:
            over.update(kv for kv in self.store.id_index.dirty.items() if kv[0].startswith(agg_id))
        over.update(kv for kv in self.ids.items() if kv[0].startswith(agg_id))
        keys = sorted(over)
        i, n = 0, len(keys)
        if not cleared:
            # A merge of the column family's stream with the entries it does not hold yet.
            for k, raw in db.scan(db.ids, agg_id):
                while i < n and keys[i] < k:
                    v = over[keys[i]]
                    if v is not None:
                        yield keys[i], v
                    i += 1
                if i < n and keys[i] == k:
                    v = over[k]
                    i += 1
                    if v is not None:
                        yield k, v
                    continue
                yield k, decode_id(raw)
        for k in keys[i:]:
            v = over[k]
            if v is not None:
                yield k, v

    # ---- writes ----------------------------------------------------------------------

    def set_id(self, idk: bytes, old: IdEntry | None, new: IdEntry | None) -> None:
        """Record an item change: the id index takes ``new``, the log (old, new)."""
        self.ids[idk] = new
        self.changes.append((idk, old, new))

    def forget_id(self, idk: bytes) -> None:
        """Drop an id from the index without logging (its tree is dropped whole): the
        commit checkpoints, since the log would not redo it."""
        self.ids[idk] = None
        self.structural = True

    def clear_ids(self, agg_id: bytes) -> None:
        """Drop the whole id index of an aggregate (its trees are dropped whole)."""
        for k in [k for k in self.ids if k.startswith(agg_id)]:
            del self.ids[k]
        self.ids_cleared.append(agg_id)
        self.structural = True  # not logged: the commit checkpoints

    def put_meta(self, key: bytes, value: bytes | None) -> None:
        """Set (or, with None, delete) a metadata key at commit."""
        self.meta[key] = value

    @property
    def empty(self) -> bool:
        return not (self.changes or self.meta or self.ids or self.ids_cleared)

    # ---- end ---------------------------------------------------------------------------

    def commit(self) -> None:
        """Write this batch (and a checkpoint when due) in one WriteBatch; then start afresh."""
        store = self.store
        checkpoint = (
            self.structural or self.force_checkpoint or store.checkpoint_due(len(self.changes))
        )
        if self.empty and not (checkpoint and store.checkpoint_pending()):
            store.end_transaction(self, committed=False)
            return
        db = store.db
        wb = WriteBatch(raw_mode=True)
        h_ids, h_meta = db.h_ids, db.h_meta
        index = store.id_index
        if checkpoint:
            # The id index is written at checkpoints only (`tally.engine.state.ids`): the
            # entries committed since the last one, then this batch's own. A commit without
            # a checkpoint logs its changes, which is all a recovery needs to redo them.
            index.forget_prefixes(self.ids_cleared)
            for prefix in self.ids_cleared:
                wb.delete_range(prefix, prefix_end(prefix), h_ids)
            index.write_checkpoint(wb, self.ids)
        for k, v in self.meta.items():
            if v is None:
                wb.delete(k, h_meta)
            else:
                wb.put(k, v, h_meta)
        if store.next_agg != store.saved_agg:
            wb.put(K_NEXT_AGG, counter(store.next_agg), h_meta)
        seq = store.seq
        if self.changes or self.ids or self.ids_cleared:
            seq += 1
            wb.put(K_SEQ, counter(seq), h_meta)
            if not checkpoint:
                wb.put(seq_key(seq), encode(self.changes), db.h_log)
        if checkpoint:
            store.write_checkpoint(wb, seq)
        try:
            db.write(wb)
        except Exception:
            store.recover()
            raise
        if checkpoint:
            index.checkpointed(self.ids)
        else:
            index.committed(self.ids)
        store.committed(seq, checkpoint, len(self.changes))
        store.end_transaction(self, committed=True)

    def abort(self) -> None:
        """Discard this batch's writes (recovering the store if nodes changed in place)."""
        store = self.store
        if store.nodes.mutations != self._mutations or self.structural or self.changes:
            store.recover()  # nodes were mutated in place: rebuild the last committed state
            return
        store.end_transaction(self, committed=False, touched_meta=bool(self.meta or self.ids))


class Batch:
    """Handle given by `Store.batch()`: caller metadata committed with the state."""

    __slots__ = ("_tx",)

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    def put_meta(self, key: bytes, value: bytes) -> None:
        """Store ``value`` under ``key``, atomically with the batch's writes."""
        self._tx.put_meta(user_key(key), bytes(value))

    def delete_meta(self, key: bytes) -> None:
        self._tx.put_meta(user_key(key), None)
