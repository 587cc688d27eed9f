"""`StateStore`: a store directory's state — the facade over the state layers.

Layers, bottom up (one module each):

* `tally.engine.state.db` — the RocksDB database and its column families (bytes only);
* `tally.engine.state.cache` — decoded tree nodes, and the nodes changed since the last
  checkpoint;
* `tally.engine.state.transaction` — the open batch: id-index and metadata overlays, the
  change log, commit/abort.

This module ties them together: the registries (aggregate ids, tree metas, the
generations catalog), checkpoints and recovery.

**Commits and checkpoints.** Every change goes through a transaction. Committing one
writes, in ONE RocksDB WriteBatch, a log record of its item changes (id, old entry, new
entry) and its metadata (consumers keep their source offsets there). Tree nodes and
id-index entries are changed in memory and stay dirty across commits; a *checkpoint* writes
every dirty node, id-index entry and tree root in that same WriteBatch and drops the log
records it covers. A checkpoint
happens when the dirty set reaches ``checkpoint_nodes``, the log reaches
``checkpoint_changes`` item changes, on structural changes (clear, drop, rebuild, an
emptied namespace) and on `close()`. Opening a store (or `refresh()` in a reader) replays
the log records after the last checkpoint onto the checkpointed trees, so the state seen
is exactly the last committed batch — a kill -9 at any instant loses nothing and applies
nothing twice. Random writes cost one node write per checkpoint instead of one per commit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, Self

from rocksdict import WriteBatch

from ..btree import Node, Tree, TreeMeta
from ..catalog import GEN_SEP, Generation
from ..errors import InvalidArgument, ReadOnlyStore, StoreCorrupted, TallyError
from .cache import NodeCache
from .codec import IdEntry, decode_gen, decode_log, decode_tree, encode, same_item
from .db import Database
from .ids import DEFAULT_CACHE_IDS, IdIndex
from .metadata import (
    FORMAT_VERSION,
    K_CKPT,
    K_NEXT_AGG,
    K_NEXT_TREE,
    K_VERSION,
    P_AGG,
    P_GEN,
    P_TREE,
    P_USER,
    UPGRADES_FROM,
    agg_key,
    counter,
    gen_key,
    seq_key,
    tree_key,
    user_key,
)
from .transaction import Batch, Transaction

__all__ = [
    "DEFAULT_CACHE_NODES",
    "DEFAULT_CHECKPOINT_CHANGES",
    "DEFAULT_MAX_NODE_SIZE",
    "StateStore",
    "check_node_size",
]

DEFAULT_MAX_NODE_SIZE = 64
"""Max items per leaf; internal nodes hold up to 8× as many children for sizes >= 16
(`btree.internal_max`). See README "Tunables"."""

DEFAULT_CACHE_NODES = 32_768
"""Decoded nodes kept in memory (LRU). A checkpoint is taken when half of this many nodes
are dirty."""

DEFAULT_CHECKPOINT_CHANGES = 100_000
"""Item changes logged since the last checkpoint that force a new one (bounds replay on
open)."""


def check_node_size(m: Any) -> int:
    """``m`` if it is a valid max node size, else `InvalidArgument`."""
    if not isinstance(m, int) or isinstance(m, bool) or m < 4 or m > 4096:
        raise InvalidArgument(f"max_node_size must be an int in [4, 4096], got {m!r}")
    return m


def _meta_int(raw: bytes | None, default: int = 0) -> int:
    return int.from_bytes(raw, "big") if raw else default


class StateStore:
    """The state of a store directory: layers, registries, batches, checkpoints, recovery.

    `engine.Store` adds the aggregate handles on top. One writer process; any number of
    readers. Not thread-safe: use it from one thread, or guard it with a lock.
    """

    def __init__(
        self,
        path: str,
        *,
        read_only: bool = False,
        max_node_size: int | None = None,
        cache_nodes: int | None = None,
        checkpoint_changes: int | None = None,
        sync: bool = False,
        max_open_files: int | None = None,
        cache_ids: int | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        if max_open_files is not None and (
            not isinstance(max_open_files, int)
            or isinstance(max_open_files, bool)
            or not (max_open_files == -1 or max_open_files >= 20)
        ):
            raise InvalidArgument(
                f"max_open_files must be -1 (unbounded) or an int >= 20, got {max_open_files!r}"
            )
        self.max_node_size = check_node_size(max_node_size or DEFAULT_MAX_NODE_SIZE)
        cache_nodes = DEFAULT_CACHE_NODES if cache_nodes is None else cache_nodes
        if not isinstance(cache_nodes, int) or cache_nodes < 16:
            raise InvalidArgument(f"cache_nodes must be an int >= 16, got {cache_nodes!r}")
        self.cache_nodes = cache_nodes
        self.checkpoint_nodes = max(8, cache_nodes // 2)
        cc = DEFAULT_CHECKPOINT_CHANGES if checkpoint_changes is None else checkpoint_changes
        if not isinstance(cc, int) or cc < 1:
            raise InvalidArgument(f"checkpoint_changes must be a positive int, got {cc!r}")
        self.checkpoint_changes = cc
        self.db = Database(
            self.path,
            read_only=read_only,
            sync=sync,
            max_open_files=-1 if max_open_files is None else max_open_files,
        )
        self.nodes = NodeCache(self.db, cache_nodes)
        """The node layer: trees read and write their nodes here (`Tree(store.nodes, meta)`)."""
        cache_ids = DEFAULT_CACHE_IDS if cache_ids is None else cache_ids
        if not isinstance(cache_ids, int) or isinstance(cache_ids, bool) or cache_ids < 0:
            raise InvalidArgument(f"cache_ids must be an int >= 0, got {cache_ids!r}")
        self.id_index = IdIndex(self.db, cache_ids)
        """The id layer: committed id-index entries (dirty until a checkpoint, and cached)."""
        self._trees: dict[bytes, TreeMeta | None] = {}
        self._trees_dirty: set[bytes] = set()
        self._agg_ids: dict[str, bytes] = {}
        self._gens: dict[str, Generation | None] = {}
        self.epoch = 0
        """Bumped whenever tree metas or the catalog may have changed: handles re-resolve."""
        self._closed = False
        self.seq = 0
        """Sequence number of the last committed batch."""
        self._ckpt = 0
        self._logged = 0
        self.next_agg = self.saved_agg = 1
        self._next_tree = self._saved_tree = 1
        self.tx = Transaction(self)
        """The open transaction (empty between batches). Engine-internal."""
        version = self.db.meta.get(K_VERSION)
        known = version is None or version == FORMAT_VERSION or version in UPGRADES_FROM
        if not known:  # readers too: a format this code does not know would read wrong
            self.db.close()
            raise TallyError(
                f"store at {self.path!r} has format {version!r}, this tally reads "
                f"{FORMAT_VERSION!r} (and upgrades {b', '.join(UPGRADES_FROM)!r}): open it with "
                "the tally that wrote it, or rebuild it by replaying the topics into a new "
                "--data-dir"
            )
        if not read_only and version != FORMAT_VERSION:
            self.db.meta[K_VERSION] = FORMAT_VERSION
        self.recover()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        read_only: bool = False,
        *,
        max_node_size: int | None = None,
        cache_nodes: int | None = None,
        checkpoint_changes: int | None = None,
        sync: bool = False,
        max_open_files: int | None = None,
        cache_ids: int | None = None,
    ) -> Self:
        """Open (or create) a store directory.

        ``read_only=True`` opens a RocksDB secondary instance: safe while a
        writer runs; call `refresh()` to see the writer's latest commits.
        ``sync=True`` fsyncs every commit (survives power loss, not just
        process crashes) at a large cost in write throughput.
        ``max_open_files`` bounds the RocksDB table files a writer keeps open
        (default -1: all, RocksDB's default; at least 20): a bound makes the
        process's file use predictable (the consumer derives it from its
        open-file limit) at the cost of reopening files when the store has more.
        Readers (secondary instances) always keep all open, as RocksDB requires.
        ``cache_ids`` bounds the clean id-index entries kept in memory (default 131,072).
        """
        return cls(
            os.fspath(path),
            read_only=read_only,
            max_node_size=max_node_size,
            cache_nodes=cache_nodes,
            checkpoint_changes=checkpoint_changes,
            sync=sync,
            max_open_files=max_open_files,
            cache_ids=cache_ids,
        )

    # ---- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint (writers) and close. An open batch's writes are dropped."""
        if self._closed:
            return
        if not self.read_only and self.tx.depth == 0:
            self.checkpoint()
        self._closed = True
        self._drop_caches()
        self.db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Read-only stores: catch up with the writer's committed state.

        Cheap when the writer has not checkpointed since the last refresh
        (only new log records are replayed); otherwise reloads.
        """
        if not self.read_only:
            return
        if not self.db.catch_up():
            self.db.reopen()  # the writer restarted (new MANIFEST): a secondary cannot follow
            self.recover()
            return
        if _meta_int(self.db.meta.get(K_CKPT)) != self._ckpt:
            self.recover()
            return
        self.next_agg = _meta_int(self.db.meta.get(K_NEXT_AGG), 1)
        self._gens.clear()
        self._agg_ids.clear()
        self.epoch += 1
        self._replay_log(self.seq + 1)

    def _drop_caches(self) -> None:
        self.epoch += 1
        self._gens.clear()
        self.nodes.clear()
        self.id_index.clear()
        self._trees.clear()
        self._trees_dirty.clear()
        self._agg_ids.clear()

    def recover(self) -> None:
        """Load the last checkpoint and replay the log after it (drops uncommitted state)."""
        self._drop_caches()
        self.tx = Transaction(self)
        self._logged = 0
        meta = self.db.meta
        self._next_tree = self._saved_tree = _meta_int(meta.get(K_NEXT_TREE), 1)
        self.next_agg = self.saved_agg = _meta_int(meta.get(K_NEXT_AGG), 1)
        self._ckpt = _meta_int(meta.get(K_CKPT))
        self.seq = self._ckpt
        self._replay_log(self._ckpt + 1)

    def _replay_log(self, start: int) -> None:
        db = self.db
        for k, raw in db.scan(db.log, b"", seq_key(start)):
            seq = int.from_bytes(k, "big")
            changes = decode_log(raw)
            for idk, old, new in changes:
                self._redo(idk, old, new)
            self._logged += len(changes)
            self.seq = seq
        # Redone changes are not new work: the next checkpoint writes their nodes, and a
        # transaction that aborts must not take them for its own mutations.
        self.tx = Transaction(self)

    def _redo(self, idk: bytes, old: IdEntry | None, new: IdEntry | None) -> None:
        """Redo one logged change on the id index (in memory, dirty until the next
        checkpoint writes it) and on the trees."""
        self.id_index.dirty[idk] = new
        aid, eid = idk[:4], idk[4:]
        if old is not None and new is not None and same_item(old, new.ns, new.key, new.sum):
            return  # only the source position moved: the trees hold the same item
        if old is not None:
            tk = tree_key(aid, old.ns)
            meta = self.tree_meta(tk)
            if meta is None:
                raise StoreCorrupted(f"log replay: no tree for a logged change in {self.path!r}")
            Tree(self.nodes, meta).delete(old.key + eid)
            self._trees_dirty.add(tk)
        if new is not None:
            tk = tree_key(aid, new.ns)
            meta = self.tree_meta(tk) or self.new_tree(tk, self.max_node_size)
            Tree(self.nodes, meta).insert(new.key + eid, new.sum)
            self._trees_dirty.add(tk)

    # ---- aggregates ------------------------------------------------------------

    def aggregates(self) -> list[str]:
        """Logical names of the aggregates in this store. O(number of aggregates)."""
        names = {n for n in self.physical_names() if GEN_SEP not in n}
        names.update(self.generations())
        return sorted(names)

    def physical_names(self) -> set[str]:
        """Names of every physical aggregate (generations included), committed or in memory."""
        names = {k[len(P_AGG) :].decode() for k, _ in self.db.scan(self.db.meta, P_AGG)}
        names.update(self._agg_ids)
        return names

    def agg_id(self, name: str, create: bool) -> bytes | None:
        """The 4-byte id of a physical aggregate (allocated in the open batch if ``create``)."""
        aid = self._agg_ids.get(name)
        if aid is not None:
            return aid
        key = agg_key(name)
        aid = self.tx.get_meta(key)
        if aid is None:
            if not create:
                return None
            self._check_writable()
            aid = self.next_agg.to_bytes(4, "big")
            self.next_agg += 1
            self.tx.put_meta(key, aid)
        self._agg_ids[name] = aid
        return aid

    def id_scan(self, agg_id: bytes) -> Iterator[tuple[bytes, IdEntry]]:
        """Id-index entries (full key, entry) of an aggregate in id order. See
        `Transaction.scan_ids`: streamed, constant memory, outside a batch."""
        return self.tx.scan_ids(agg_id)

    # ---- generations ---------------------------------------------------------------

    def generation(self, name: str) -> Generation | None:
        """The catalog entry of ``name`` (sees the open batch), or None. O(1)."""
        try:
            return self._gens[name]
        except KeyError:
            pass
        raw = self.tx.get_meta(gen_key(name))
        g = None if raw is None else decode_gen(raw)
        self._gens[name] = g
        return g

    def put_generation(self, name: str, gen: Generation | None) -> None:
        """Write a catalog entry (inside a batch, atomically with its other writes)."""
        self._check_writable()
        self.tx.put_meta(gen_key(name), None if gen is None else encode(gen))
        self._gens[name] = gen
        self.epoch += 1

    def generations(self) -> dict[str, Generation]:
        """Every catalog entry, by logical name."""
        n = len(P_GEN)
        return {k[n:].decode(): decode_gen(v) for k, v in sorted(self.tx.scan_meta(P_GEN).items())}

    # ---- batches ---------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """Group writes: all commit atomically in one RocksDB WriteBatch on exit.

        Reads inside see the batch's own writes. An exception inside discards
        every write of the batch. Nested batches join the outermost one.
        """
        with self.transaction() as tx:
            yield Batch(tx)

    def transaction(self) -> Transaction:
        """The open transaction, to use as a context manager (nested ones join it).
        Engine-internal: callers use `batch()`."""
        self._check_writable()
        return self.tx

    @property
    def in_batch(self) -> bool:
        """A batch is open (its writes are not committed yet)."""
        return self.tx.depth > 0

    def checkpoint(self) -> None:
        """Write every dirty node now (normally automatic). O(dirty nodes)."""
        self._check_writable()
        if self.tx.depth:
            raise InvalidArgument("checkpoint() cannot run inside a batch")
        self.tx.force_checkpoint = True
        self.tx.commit()

    def get_meta(self, key: bytes) -> bytes | None:
        """Caller metadata stored with `Batch.put_meta` (sees the open batch). O(1)."""
        return self.tx.get_meta(user_key(key))

    def scan_meta(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Caller metadata whose key starts with ``prefix`` (sees the open batch)."""
        n = len(P_USER)
        return sorted((k[n:], v) for k, v in self.tx.scan_meta(user_key(prefix)).items())

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStore(
                f"store at {self.path!r} is open read-only; writes go through the one writer "
                "process (the consumer). Open without read_only=True to write."
            )

    # ---- what transactions ask of the store --------------------------------------------

    def checkpoint_due(self, changes: int) -> bool:
        """A commit adding ``changes`` log entries should checkpoint."""
        return (
            len(self.nodes.dirty) >= self.checkpoint_nodes
            or self._logged + changes >= self.checkpoint_changes
        )

    def checkpoint_pending(self) -> bool:
        """A checkpoint would write anything."""
        return self.nodes.pending or bool(self._trees_dirty) or bool(self.id_index.dirty)

    def write_checkpoint(self, wb: WriteBatch, seq: int) -> None:
        """Put every dirty node and tree meta, the counters, and the log trim into ``wb``."""
        db = self.db
        h_meta = db.h_meta
        self.nodes.write_checkpoint(wb)
        for tk in self._trees_dirty:
            meta = self._trees.get(tk)
            if meta is None:
                wb.delete(tk, h_meta)
            else:
                wb.put(tk, encode(meta), h_meta)
        if self._next_tree != self._saved_tree:
            wb.put(K_NEXT_TREE, counter(self._next_tree), h_meta)
        wb.put(K_CKPT, counter(seq), h_meta)
        wb.delete_range(b"", seq_key(seq + 1), db.h_log)

    def committed(self, seq: int, checkpoint: bool, changes: int) -> None:
        """A transaction's WriteBatch is durable: advance the counters."""
        self.seq = seq
        self.saved_agg = self.next_agg
        if checkpoint:
            self._ckpt = seq
            self._saved_tree = self._next_tree
            self.nodes.reset_checkpoint()
            self._trees_dirty.clear()
            self._logged = 0
        else:
            self._logged += changes

    def end_transaction(
        self, tx: Transaction, *, committed: bool, touched_meta: bool = False
    ) -> None:
        """Start a fresh transaction after ``tx`` ended; an aborted one that touched
        metadata invalidates the registries it may have filled."""
        if not committed and touched_meta:
            self._agg_ids.clear()
            self._gens.clear()
            self.epoch += 1
            self.next_agg = self.saved_agg
        self.tx = Transaction(self)

    # ---- trees -------------------------------------------------------------------

    def tree_meta(self, tk: bytes) -> TreeMeta | None:
        """The meta (root, height, node size) of the tree registered under ``tk``. O(1)."""
        try:
            return self._trees[tk]
        except KeyError:
            pass
        raw = self.tx.get_meta(tk)
        meta = None if raw is None else decode_tree(raw)
        self._trees[tk] = meta
        return meta

    def new_tree(self, tk: bytes, max_node_size: int) -> TreeMeta:
        """Register an empty tree under ``tk`` (written at the next checkpoint)."""
        tid = self._next_tree
        self._next_tree += 1
        meta = TreeMeta(tid, 0, 1, max_node_size)
        meta.root = Tree(self.nodes, meta).new_node(Node([], []))
        self.epoch += 1
        self._trees[tk] = meta
        self._trees_dirty.add(tk)
        return meta

    def touch_tree(self, tk: bytes) -> None:
        """The tree under ``tk`` changed: write its meta at the next checkpoint."""
        self._trees_dirty.add(tk)

    def drop_tree(self, tk: bytes) -> None:
        """Unregister a tree in O(1): the checkpoint deletes its node range (structural)."""
        meta = self.tree_meta(tk)
        if meta is None:
            return
        self.nodes.drop_tree(meta.tid)
        self.epoch += 1
        self._trees[tk] = None
        self._trees_dirty.add(tk)
        self.tx.structural = True

    def tree_keys(self, agg_id: bytes) -> list[bytes]:
        """Tree registry keys of an aggregate, committed or in memory."""
        prefix = P_TREE + agg_id
        keys = {k for k, _ in self.db.scan(self.db.meta, prefix)}
        for tk, meta in self._trees.items():
            if tk.startswith(prefix):
                if meta is None:
                    keys.discard(tk)
                else:
                    keys.add(tk)
        return sorted(keys)

    # ---- checks ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Cache, checkpoint and RocksDB figures for operators."""
        return {
            "cached_nodes": len(self.nodes),
            "cache_nodes": self.cache_nodes,
            "dirty_nodes": len(self.nodes.dirty),
            "dirty_ids": len(self.id_index.dirty),
            "cached_ids": len(self.id_index.clean),
            "logged_changes": self._logged,
            "seq": self.seq,
            "checkpoint_seq": self._ckpt,
            "rocksdb_estimate_live_data_size": self.db.live_data_size(),
        }
