"""RocksDB-backed state: node cache, id index, change log, checkpoints, batches.

Layout (rocksdict, raw mode, four column families):

* ``nodes``: ``tid(8) + local id(5)`` → msgpack `Node`. The tree-id prefix
  lets a whole tree be dropped with one range delete.
* ``ids``: ``agg_id(4) + encode_key(id)`` → msgpack `IdEntry` (namespace, key,
  sum): the id index that makes ids unique within an aggregate and lets every
  write address an item by id alone.
* ``log``: ``seq(8)`` → the item changes of one committed batch since the last
  checkpoint (see below).
* ``meta``: counters, the aggregate registry, one `TreeMeta` per
  (aggregate, namespace), and caller metadata (`Batch.put_meta`; consumers
  keep their source offsets there).

**Commits and checkpoints.** Every change goes through a *batch*. Committing
a batch writes, in ONE RocksDB WriteBatch: the id index entries it changed, a
log record of its item changes (id, old item, new item), and the caller's
metadata. Tree nodes are mutated in memory and stay dirty across commits; a
*checkpoint* writes every dirty node and tree root in one WriteBatch and drops
the log records it covers. A checkpoint happens when the dirty set reaches
``checkpoint_nodes``, the log reaches ``checkpoint_changes`` item changes,
on structural changes (clear, drop, an emptied namespace) and on `close()`.
Opening a store (or `refresh()` in a reader) replays the log records after
the last checkpoint onto the checkpointed trees, so the state seen is exactly
the last committed batch — a kill -9 at any instant loses nothing and applies
nothing twice. Random writes cost one node write per checkpoint instead of a
node write per commit, which is most of the engine's write throughput.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import msgspec
from rocksdict import AccessType, BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from .btree import NID_BITS, Node, Tree, TreeMeta
from .catalog import GEN_SEP, Generation
from .errors import InvalidArgument, ReadOnlyStore, StoreCorrupted, StoreLocked, TallyError

if TYPE_CHECKING:
    from .aggregate import Aggregate

__all__ = [
    "DEFAULT_CACHE_NODES",
    "DEFAULT_CHECKPOINT_CHANGES",
    "DEFAULT_MAX_NODE_SIZE",
    "Batch",
    "IdEntry",
    "Store",
]

DEFAULT_MAX_NODE_SIZE = 64
"""Max items per leaf; internal nodes hold up to 8× as many children for sizes >= 16 (`btree.internal_max`). See README "Tunables"."""

DEFAULT_CACHE_NODES = 32_768
"""Decoded nodes kept in memory (LRU). A checkpoint is taken when half of this many nodes are dirty."""

DEFAULT_CHECKPOINT_CHANGES = 100_000
"""Item changes logged since the last checkpoint that force a new one (bounds replay on open)."""

BLOCK_CACHE_BYTES = 64 << 20
"""RocksDB block cache shared by the column families (compressed on-disk blocks)."""

FORMAT_VERSION = b"2"
_CFS = ("nodes", "ids", "log", "meta")
_NID_MASK = (1 << NID_BITS) - 1


class IdEntry(msgspec.Struct, array_like=True, gc=False):
    """Where an id's item lives: encoded namespace and key, and its sum value."""

    ns: bytes
    key: bytes
    sum: int | float


Change = tuple[bytes, IdEntry | None, IdEntry | None]
"""One logged item change: (agg_id + encoded id, old entry, new entry)."""

_enc = msgspec.msgpack.Encoder()
_EXT_BIGINT = 1


def _bigint_ext(code: int, data: memoryview) -> Any:
    if code == _EXT_BIGINT:
        return int.from_bytes(data, "big", signed=True)
    raise StoreCorrupted(f"unknown msgpack extension type {code} in a stored node")


def _encode_node(node: Node) -> bytes:
    """msgpack of a node; sums beyond 64 bits (sums of many items) become an ext type."""
    try:
        return _enc.encode(node)
    except OverflowError:
        sums = [
            msgspec.msgpack.Ext(_EXT_BIGINT, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True))
            if type(v) is int and not -(1 << 63) <= v < (1 << 63)
            else v
            for v in node.sums
        ]
        return _enc.encode(Node(node.keys, sums, node.children, node.counts))


_node_dec = msgspec.msgpack.Decoder(Node, ext_hook=_bigint_ext)
_tree_dec = msgspec.msgpack.Decoder(TreeMeta)
_id_dec = msgspec.msgpack.Decoder(IdEntry)
_gen_dec = msgspec.msgpack.Decoder(Generation)
_log_dec = msgspec.msgpack.Decoder(list[tuple[bytes, IdEntry | None, IdEntry | None]])

_K_VERSION = b"Vformat"
_K_NEXT_TREE = b"Ctree"
_K_NEXT_AGG = b"Cagg"
_K_SEQ = b"Cseq"
_K_CKPT = b"Cckpt"
_P_AGG = b"A"
_P_TREE = b"T"
_P_USER = b"U"
_P_GEN = b"G"


def _cf_options(cache: Cache) -> Options:
    # Bloom filters make the id index's "is this id new?" probe cheap: most
    # inserts look up an id that is not there.
    t = BlockBasedOptions()
    t.set_bloom_filter(10, False)
    t.set_block_cache(cache)
    t.set_cache_index_and_filter_blocks(True)
    t.set_pin_l0_filter_and_index_blocks_in_cache(True)
    o = Options(raw_mode=True)
    o.set_block_based_table_factory(t)
    o.set_memtable_whole_key_filtering(True)
    o.set_memtable_prefix_bloom_ratio(0.1)
    return o


def _db_options(cache: Cache, max_open_files: int) -> Options:
    o = _cf_options(cache)
    o.create_if_missing(True)
    o.create_missing_column_families(True)
    o.increase_parallelism(2)
    o.set_max_background_jobs(2)
    o.set_max_open_files(max_open_files)
    return o


class Batch:
    """Handle given by `Store.batch()`: caller metadata committed with the state."""

    __slots__ = ("_store",)

    def __init__(self, store: Store) -> None:
        self._store = store

    def put_meta(self, key: bytes, value: bytes) -> None:
        """Store ``value`` under ``key``, atomically with the batch's writes."""
        self._store._meta_over[_P_USER + bytes(key)] = bytes(value)

    def delete_meta(self, key: bytes) -> None:
        self._store._meta_over[_P_USER + bytes(key)] = None


class Store:
    """A directory of named aggregates. One writer process; any number of readers.

    Open with `Store.open`. Not thread-safe: use it from one thread (the
    consumer's event loop thread), or guard it with a lock.
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
    ) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        if max_open_files is not None and (
            not isinstance(max_open_files, int) or isinstance(max_open_files, bool)
            or not (max_open_files == -1 or max_open_files >= 20)
        ):
            raise InvalidArgument(f"max_open_files must be -1 (unbounded) or an int >= 20, got {max_open_files!r}")
        # RocksDB table files kept open (-1: all of them, RocksDB's default and a reader's must).
        self.max_open_files = -1 if max_open_files is None or read_only else max_open_files
        self.max_node_size = _check_node_size(max_node_size or DEFAULT_MAX_NODE_SIZE)
        cache_nodes = DEFAULT_CACHE_NODES if cache_nodes is None else cache_nodes
        if not isinstance(cache_nodes, int) or cache_nodes < 16:
            raise InvalidArgument(f"cache_nodes must be an int >= 16, got {cache_nodes!r}")
        self.cache_nodes = cache_nodes
        self.checkpoint_nodes = max(8, cache_nodes // 2)
        cc = DEFAULT_CHECKPOINT_CHANGES if checkpoint_changes is None else checkpoint_changes
        if not isinstance(cc, int) or cc < 1:
            raise InvalidArgument(f"checkpoint_changes must be a positive int, got {cc!r}")
        self.checkpoint_changes = cc
        self._secondary_dir: str | None = None
        self._open_db()
        self._wopt = WriteOptions()
        self._wopt.sync = sync
        self._cache: OrderedDict[int, Node] = OrderedDict()
        self._cums: dict[int, list[int]] = {}
        self._trees: dict[bytes, TreeMeta | None] = {}
        self._agg_ids: dict[str, bytes] = {}
        self._handles: dict[tuple[str, bool], Aggregate] = {}
        self._gens: dict[str, Generation | None] = {}
        self._depth = 0
        self._epoch = 0
        self._closed = False
        self._ckpt = 0
        self._seq = 0
        if not read_only:
            version = self._meta.get(_K_VERSION)
            if version is None:
                self._meta[_K_VERSION] = FORMAT_VERSION
            elif version != FORMAT_VERSION:
                raise TallyError(
                    f"store at {self.path!r} has format {version!r}, this tally reads "
                    f"{FORMAT_VERSION!r}: rebuild it by replaying the topics into a new --data-dir"
                )
        self._recover()

    def _open_db(self) -> None:
        block_cache = Cache(BLOCK_CACHE_BYTES)
        cfs = {name: _cf_options(block_cache) for name in _CFS}
        try:
            if self.read_only:
                if not os.path.exists(os.path.join(self.path, "CURRENT")):
                    raise TallyError(
                        f"no tally store at {self.path!r}: check --data-dir, or start a consumer "
                        "there first (read-only opens never create a store)"
                    )
                self._manifest = _read_current(self.path)
                if self._secondary_dir is None:
                    self._secondary_dir = tempfile.mkdtemp(prefix="tally-reader-")
                for attempt in range(50):
                    try:
                        self._db = Rdict(
                            self.path,
                            _cf_options(block_cache),
                            column_families=cfs,
                            access_type=AccessType.secondary(self._secondary_dir),
                        )
                        break
                    except Exception as e:
                        # The writer is still creating a brand-new store: give it a moment.
                        if "Column family not found" not in str(e) or attempt == 49:
                            raise
                        time.sleep(0.1)
            else:
                os.makedirs(self.path, exist_ok=True)
                self._db = Rdict(self.path, _db_options(block_cache, self.max_open_files), column_families=cfs)
        except TallyError:
            raise
        except Exception as e:
            msg = str(e)
            if "lock" in msg.lower():
                raise StoreLocked(
                    f"cannot open store at {self.path!r}: {msg} — another process is writing this store; "
                    "open it with read_only=True (or `tally query --data-dir`), or stop the other writer"
                ) from e
            raise TallyError(f"cannot open store at {self.path!r}: {msg}") from e
        self._nodes = self._db.get_column_family("nodes")
        self._ids = self._db.get_column_family("ids")
        self._log = self._db.get_column_family("log")
        self._meta = self._db.get_column_family("meta")
        self._h_nodes = self._db.get_column_family_handle("nodes")
        self._h_ids = self._db.get_column_family_handle("ids")
        self._h_log = self._db.get_column_family_handle("log")
        self._h_meta = self._db.get_column_family_handle("meta")

    def _close_db(self) -> None:
        # Column-family views keep the DB (and its LOCK) alive: drop them first.
        del self._nodes, self._ids, self._log, self._meta
        del self._h_nodes, self._h_ids, self._h_log, self._h_meta
        self._db.close()
        del self._db
        gc.collect()

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
    ) -> Store:
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
        """
        return cls(
            os.fspath(path),
            read_only=read_only,
            max_node_size=max_node_size,
            cache_nodes=cache_nodes,
            checkpoint_changes=checkpoint_changes,
            sync=sync,
            max_open_files=max_open_files,
        )

    # ---- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Checkpoint (writers) and close. An open batch's writes are dropped."""
        if self._closed:
            return
        if not self.read_only and self._depth == 0:
            self.checkpoint()
        self._closed = True
        self._drop_caches()
        self._reset_batch_state()
        self._reset_checkpoint_state()
        self._close_db()
        if self._secondary_dir:
            shutil.rmtree(self._secondary_dir, ignore_errors=True)

    def __enter__(self) -> Store:
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
        if _read_current(self.path) != self._manifest:
            # The writer restarted (new MANIFEST): a secondary cannot follow that; reopen.
            self._close_db()
            self._open_db()
            self._recover()
            return
        self._db.try_catch_up_with_primary()
        if self._meta_int(_K_CKPT) != self._ckpt:
            self._recover()
            return
        self._next_agg = self._meta_int(_K_NEXT_AGG, 1)
        self._gens.clear()
        self._agg_ids.clear()
        self._epoch += 1
        self._replay_log(self._seq + 1)

    def _drop_caches(self) -> None:
        self._epoch += 1
        self._gens.clear()
        self._cache.clear()
        self._cums.clear()
        self._trees.clear()
        self._agg_ids.clear()

    def _meta_int(self, key: bytes, default: int = 0) -> int:
        v = self._meta.get(key)
        return int.from_bytes(v, "big") if v else default

    def _recover(self) -> None:
        """Load the last checkpoint and replay the log after it."""
        self._drop_caches()
        self._reset_batch_state()
        self._reset_checkpoint_state()
        self._next_tree = self._saved_tree = self._meta_int(_K_NEXT_TREE, 1)
        self._next_agg = self._saved_agg = self._meta_int(_K_NEXT_AGG, 1)
        self._ckpt = self._meta_int(_K_CKPT)
        self._seq = self._ckpt
        self._replay_log(self._ckpt + 1)

    def _replay_log(self, start: int) -> None:
        for k, raw in self._scan(self._log, b"", start.to_bytes(8, "big")):
            seq = int.from_bytes(k, "big")
            changes = _log_dec.decode(raw)
            for idk, old, new in changes:
                self._apply_change(idk, old, new)
            self._logged += len(changes)
            self._seq = seq

    def _apply_change(self, idk: bytes, old: IdEntry | None, new: IdEntry | None) -> None:
        """Redo one logged change on the trees (the id index already has it)."""
        aid, eid = idk[:4], idk[4:]
        if old is not None:
            tk = tree_key(aid, old.ns)
            meta = self._tree_meta(tk)
            if meta is None:
                raise StoreCorrupted(f"log replay: no tree for a logged change in {self.path!r}")
            Tree(self, meta).delete(old.key + eid)
            self._trees_dirty.add(tk)
        if new is not None:
            tk = tree_key(aid, new.ns)
            meta = self._tree_meta(tk) or self._new_tree(tk, self.max_node_size)
            Tree(self, meta).insert(new.key + eid, new.sum)
            self._trees_dirty.add(tk)

    # ---- aggregates ------------------------------------------------------------

    def aggregate(self, name: str, *, partial: bool = False) -> Aggregate:
        """The handle of a named aggregate (created on its first write). O(1).

        For an aggregate with generations (see `engine.catalog`), the handle
        follows the active generation; with none ready its reads raise
        `AggregateNotReady`, unless ``partial=True`` (read the one being built).
        """
        from .aggregate import Aggregate

        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"aggregate name must be a non-empty string, got {name!r}")
        h = self._handles.get((name, partial))
        if h is None:
            h = self._handles[(name, partial)] = Aggregate(self, name, partial=partial)
        return h

    def aggregates(self) -> list[str]:
        """Logical names of the aggregates in this store. O(number of aggregates)."""
        names = {k[1:].decode() for k, _ in self._scan(self._meta, _P_AGG)}
        names.update(n for n in self._agg_ids)
        names = {n for n in names if GEN_SEP not in n}
        names.update(self.generations())
        return sorted(names)

    # ---- generations ---------------------------------------------------------------

    def generation(self, name: str) -> Generation | None:
        """The catalog entry of ``name`` (sees the open batch), or None. O(1)."""
        try:
            return self._gens[name]
        except KeyError:
            pass
        raw = self._meta_get(_P_GEN + name.encode())
        g = None if raw is None else _gen_dec.decode(raw)
        self._gens[name] = g
        return g

    def put_generation(self, name: str, gen: Generation | None) -> None:
        """Write a catalog entry (inside a batch, atomically with its other writes)."""
        self._check_writable()
        key = _P_GEN + name.encode()
        self._meta_over[key] = None if gen is None else _enc.encode(gen)
        self._gens[name] = gen
        self._epoch += 1

    def generations(self) -> dict[str, Generation]:
        """Every catalog entry, by logical name."""
        out = {}
        for k, raw in self._scan(self._meta, _P_GEN):
            out[k[len(_P_GEN) :].decode()] = _gen_dec.decode(raw)
        for k, v in self._meta_over.items():
            if k.startswith(_P_GEN):
                name = k[len(_P_GEN) :].decode()
                if v is None:
                    out.pop(name, None)
                else:
                    out[name] = _gen_dec.decode(v)
        return out

    def _agg_id(self, name: str, create: bool) -> bytes | None:
        aid = self._agg_ids.get(name)
        if aid is not None:
            return aid
        key = _P_AGG + name.encode()
        aid = self._meta_get(key)
        if aid is None:
            if not create:
                return None
            self._check_writable()
            aid = self._next_agg.to_bytes(4, "big")
            self._next_agg += 1
            self._meta_over[key] = aid
        self._agg_ids[name] = aid
        return aid

    # ---- batches ---------------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[Batch]:
        """Group writes: all commit atomically in one RocksDB WriteBatch on exit.

        Reads inside see the batch's own writes. An exception inside discards
        every write of the batch. Nested batches join the outermost one.
        """
        self._check_writable()
        self._depth += 1
        ok = False
        try:
            yield Batch(self)
            ok = True
        finally:
            self._depth -= 1
            if self._depth == 0:
                if ok:
                    self._commit()
                else:
                    self._abort()

    def _begin(self) -> None:
        if self.read_only:
            self._check_writable()
        self._depth += 1

    def _end(self, ok: bool) -> None:
        self._depth -= 1
        if self._depth == 0:
            if ok:
                self._commit()
            else:
                self._abort()

    def checkpoint(self) -> None:
        """Write every dirty node now (normally automatic). O(dirty nodes)."""
        self._check_writable()
        if self._depth:
            raise InvalidArgument("checkpoint() cannot run inside a batch")
        self._force_ckpt = True
        self._commit()

    def get_meta(self, key: bytes) -> bytes | None:
        """Caller metadata stored with `Batch.put_meta` (sees the open batch). O(1)."""
        return self._meta_get(_P_USER + bytes(key))

    def scan_meta(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Caller metadata whose key starts with ``prefix`` (sees the open batch)."""
        full = _P_USER + bytes(prefix)
        found = dict(self._scan(self._meta, full))
        for k, v in self._meta_over.items():
            if k.startswith(full):
                if v is None:
                    found.pop(k, None)
                else:
                    found[k] = v
        n = len(_P_USER)
        return sorted((k[n:], v) for k, v in found.items())

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStore(
                f"store at {self.path!r} is open read-only; writes go through the one writer "
                "process (the consumer). Open without read_only=True to write."
            )

    def _reset_batch_state(self) -> None:
        """State of the open batch: committed (or dropped) at its end."""
        self._id_over: dict[bytes, IdEntry | None] = {}
        self._ids_cleared: list[bytes] = []
        self._meta_over: dict[bytes, bytes | None] = {}
        self._changes: list[Change] = []
        self._structural = False
        self._mutated = False
        self._force_ckpt = False

    def _reset_checkpoint_state(self) -> None:
        """State carried across commits until the next checkpoint writes it."""
        self._dirty: dict[int, Node] = {}
        self._freed: set[int] = set()
        self._dropped_tids: set[int] = set()
        """Trees dropped since the last checkpoint: their node ranges are deleted there."""
        self._trees_dirty: set[bytes] = set()
        self._logged = 0

    def _set_id(self, idk: bytes, old: IdEntry | None, new: IdEntry | None) -> None:
        """Record an item change of the open batch (id index + log)."""
        self._id_over[idk] = new
        self._changes.append((idk, old, new))
        self._mutated = True

    def _commit(self) -> None:
        checkpoint = (
            self._structural
            or self._force_ckpt
            or len(self._dirty) >= self.checkpoint_nodes
            or self._logged + len(self._changes) >= self.checkpoint_changes
        )
        if not checkpoint and not (self._changes or self._meta_over or self._id_over):
            self._reset_batch_state()
            return
        if checkpoint and not (
            self._dirty
            or self._freed
            or self._trees_dirty
            or self._dropped_tids
            or self._changes
            or self._meta_over
            or self._id_over
            or self._ids_cleared
        ):
            self._reset_batch_state()
            return
        wb = WriteBatch(raw_mode=True)
        h_ids, h_meta = self._h_ids, self._h_meta
        enc = _enc.encode
        for prefix in self._ids_cleared:
            wb.delete_range(prefix, _prefix_end(prefix), h_ids)
        for k, e in self._id_over.items():
            if e is None:
                wb.delete(k, h_ids)
            else:
                wb.put(k, enc(e), h_ids)
        for k, v in self._meta_over.items():
            if v is None:
                wb.delete(k, h_meta)
            else:
                wb.put(k, v, h_meta)
        if self._next_agg != self._saved_agg:
            wb.put(_K_NEXT_AGG, self._next_agg.to_bytes(8, "big"), h_meta)
        seq = self._seq
        if self._changes or self._id_over or self._ids_cleared:
            seq += 1
            wb.put(_K_SEQ, seq.to_bytes(8, "big"), h_meta)
            if not checkpoint:
                wb.put(seq.to_bytes(8, "big"), enc(self._changes), self._h_log)
        if checkpoint:
            self._write_checkpoint(wb, seq)
        try:
            self._db.write(wb, self._wopt)
        except Exception:
            self._recover()
            raise
        self._seq = seq
        self._saved_agg = self._next_agg
        if checkpoint:
            self._ckpt = seq
            self._saved_tree = self._next_tree
            self._reset_checkpoint_state()
        else:
            self._logged += len(self._changes)
        self._reset_batch_state()

    def _write_checkpoint(self, wb: WriteBatch, seq: int) -> None:
        h_nodes, h_meta = self._h_nodes, self._h_meta
        enc = _enc.encode
        dropped = self._dropped_tids
        for tid in sorted(dropped):
            wb.delete_range((tid << NID_BITS).to_bytes(13, "big"), ((tid + 1) << NID_BITS).to_bytes(13, "big"), h_nodes)
        for gid, node in self._dirty.items():
            if not dropped or gid >> NID_BITS not in dropped:  # a dropped tree's nodes stay deleted
                wb.put(gid.to_bytes(13, "big"), _encode_node(node), h_nodes)
        for gid in self._freed:
            wb.delete(gid.to_bytes(13, "big"), h_nodes)
        for tk in self._trees_dirty:
            meta = self._trees.get(tk)
            if meta is None:
                wb.delete(tk, h_meta)
            else:
                wb.put(tk, enc(meta), h_meta)
        if self._next_tree != self._saved_tree:
            wb.put(_K_NEXT_TREE, self._next_tree.to_bytes(8, "big"), h_meta)
        wb.put(_K_CKPT, seq.to_bytes(8, "big"), h_meta)
        wb.delete_range(b"", (seq + 1).to_bytes(8, "big"), self._h_log)

    def _abort(self) -> None:
        if not (self._mutated or self._structural):
            # Nothing touched the trees (e.g. a strict write that raised first).
            if self._meta_over or self._id_over:
                self._agg_ids.clear()
                self._gens.clear()
                self._epoch += 1
                self._next_agg = self._saved_agg
            self._reset_batch_state()
            return
        # Nodes were mutated in place: rebuild the last committed state.
        self._recover()

    # ---- node store (the btree.NodeStore protocol) -------------------------------

    def get_node(self, gid: int) -> Node:
        cache = self._cache
        n = cache.get(gid)
        if n is not None:
            cache.move_to_end(gid)
            return n
        n = self._dirty.get(gid)
        if n is None:
            raw = self._nodes.get(gid.to_bytes(13, "big"))
            if raw is None:
                raise StoreCorrupted(
                    f"node {gid & _NID_MASK} of tree {gid >> NID_BITS} is missing from "
                    f"{self.path!r}; run validate() and rebuild the aggregate"
                )
            n = _node_dec.decode(raw)
        cache[gid] = n
        if len(cache) > self.cache_nodes:
            cache.popitem(last=False)
        return n

    def get_cum(self, gid: int, node: Node) -> list[int]:
        """Prefix sums of an internal node's child counts, cached until it changes."""
        c = self._cums.get(gid)
        if c is None:
            if len(self._cums) >= self.cache_nodes:
                self._cums.clear()
            c = self._cums[gid] = list(accumulate(node.counts))
        return c

    def put_node(self, gid: int, node: Node) -> None:
        self._dirty[gid] = node
        self._cums.pop(gid, None)
        self._mutated = True

    def add_node(self, gid: int, node: Node) -> None:
        self._dirty[gid] = node
        self._cache[gid] = node
        self._mutated = True

    def free_node(self, gid: int) -> None:
        self._mutated = True
        self._dirty.pop(gid, None)
        self._cums.pop(gid, None)
        self._cache.pop(gid, None)
        self._freed.add(gid)

    # ---- trees -------------------------------------------------------------------

    def _tree_meta(self, tk: bytes) -> TreeMeta | None:
        try:
            return self._trees[tk]
        except KeyError:
            pass
        raw = self._meta.get(tk)
        meta = None if raw is None else _tree_dec.decode(raw)
        self._trees[tk] = meta
        return meta

    def _new_tree(self, tk: bytes, max_node_size: int) -> TreeMeta:
        tid = self._next_tree
        self._next_tree += 1
        meta = TreeMeta(tid, 0, 1, max_node_size)
        meta.root = Tree(self, meta)._new(Node([], []))
        self._epoch += 1
        self._trees[tk] = meta
        self._trees_dirty.add(tk)
        return meta

    def _drop_tree(self, tk: bytes) -> None:
        meta = self._tree_meta(tk)
        if meta is None:
            return
        # O(1): the checkpoint deletes the tree's node range and skips its dirty nodes
        self._dropped_tids.add(meta.tid)
        self._epoch += 1
        self._trees[tk] = None
        self._trees_dirty.add(tk)
        self._structural = True

    def _tree_keys(self, agg_id: bytes) -> list[bytes]:
        """Tree registry keys of an aggregate, committed or in memory."""
        prefix = _P_TREE + agg_id
        keys = {k for k, _ in self._scan(self._meta, prefix)}
        for tk, meta in self._trees.items():
            if tk.startswith(prefix):
                if meta is None:
                    keys.discard(tk)
                else:
                    keys.add(tk)
        return sorted(keys)

    # ---- id index ------------------------------------------------------------------

    def _id_get(self, k: bytes) -> IdEntry | None:
        try:
            return self._id_over[k]
        except KeyError:
            pass
        if self._ids_cleared and any(k.startswith(p) for p in self._ids_cleared):
            return None
        raw = self._ids.get(k)
        return None if raw is None else _id_dec.decode(raw)

    def _id_scan(self, agg_id: bytes) -> Iterator[tuple[bytes, IdEntry]]:
        """Id index entries of an aggregate in id order, overlaid with the open batch.

        Without pending id changes (the normal case outside a batch) the column
        family is streamed: constant memory. With some, the aggregate's index is
        merged in memory. A RocksDB iterator reads the state as of its creation,
        so batches committed while a scan runs do not disturb it.
        """
        if not self._id_over and not self._ids_cleared:
            dec = _id_dec.decode
            for k, raw in self._scan(self._ids, agg_id):
                yield k, dec(raw)
            return
        over = {k: v for k, v in self._id_over.items() if k.startswith(agg_id)}
        cleared = any(agg_id.startswith(p) for p in self._ids_cleared)
        merged: dict[bytes, IdEntry | None] = {}
        if not cleared:
            for k, raw in self._scan(self._ids, agg_id):
                merged[k] = _id_dec.decode(raw)
        merged.update(over)
        for k in sorted(merged):
            v = merged[k]
            if v is not None:
                yield k, v

    # ---- helpers ---------------------------------------------------------------------

    def _meta_get(self, key: bytes) -> bytes | None:
        try:
            return self._meta_over[key]
        except KeyError:
            return self._meta.get(key)

    @staticmethod
    def _scan(cf: Rdict, prefix: bytes, start: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        it = cf.iter()
        it.seek(prefix if start is None else start)
        while it.valid():
            k = it.key()
            if not k.startswith(prefix):
                break
            yield k, it.value()
            it.next()

    def validate(self) -> None:
        """Check every stored aggregate and generation (see `Aggregate.validate`). O(n)."""
        names = {k[1:].decode() for k, _ in self._scan(self._meta, _P_AGG)}
        names.update(self._agg_ids)
        gens = self.generations()
        for name in sorted(names):
            if name in gens:
                continue  # a logical name resolves to one of the physical generations below
            self.aggregate(name).validate()

    def stats(self) -> dict[str, Any]:
        """Cache, checkpoint and RocksDB figures for operators."""
        return {
            "cached_nodes": len(self._cache),
            "cache_nodes": self.cache_nodes,
            "dirty_nodes": len(self._dirty),
            "logged_changes": self._logged,
            "seq": self._seq,
            "checkpoint_seq": self._ckpt,
            "rocksdb_estimate_live_data_size": self._db.property_int_value(
                "rocksdb.estimate-live-data-size"
            ),
        }


def _read_current(path: str) -> bytes:
    try:
        with open(os.path.join(path, "CURRENT"), "rb") as f:
            return f.read()
    except OSError:
        return b""


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    p = bytearray(prefix)
    while p and p[-1] == 0xFF:
        p.pop()
    if not p:
        return b"\xff" * (len(prefix) + 1)
    p[-1] += 1
    return bytes(p)


def _check_node_size(m: Any) -> int:
    if not isinstance(m, int) or isinstance(m, bool) or m < 4 or m > 4096:
        raise InvalidArgument(f"max_node_size must be an int in [4, 4096], got {m!r}")
    return m


def tree_key(agg_id: bytes, ens: bytes) -> bytes:
    return _P_TREE + agg_id + ens

