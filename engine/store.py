"""RocksDB-backed state: node cache, id index, tree registry, atomic batches.

Layout (rocksdict, raw mode, three column families):

* ``nodes``: ``tid(8) + nid(8)`` → msgpack `Node`. Node ids are unique across
  trees (children point by id); the tree-id prefix lets a whole tree be
  dropped with one range delete.
* ``ids``: ``agg_id(4) + encode_key(id)`` → msgpack `IdEntry` (namespace, key,
  sum): the id index that makes ids unique within an aggregate and lets every
  write address an item by id alone.
* ``meta``: counters, the aggregate registry, one `TreeMeta` per
  (aggregate, namespace), and caller metadata (`Batch.put_meta`; consumers
  keep their source offsets there).

Every change goes through a *batch*: nodes are mutated in memory, marked
dirty, and written once, with everything else the batch touched, in a single
RocksDB WriteBatch when the outermost batch exits. A batch that raises writes
nothing. Writes outside an explicit `Store.batch()` are one-write batches.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

import msgspec
from rocksdict import AccessType, BlockBasedOptions, Cache, Options, Rdict, WriteBatch, WriteOptions

from .btree import Node, Tree, TreeMeta
from .errors import InvalidArgument, ReadOnlyStore, StoreCorrupted, TallyError
from .keys import decode_key, encode_key

if TYPE_CHECKING:
    from .aggregate import Aggregate

__all__ = ["DEFAULT_CACHE_NODES", "DEFAULT_MAX_NODE_SIZE", "Batch", "IdEntry", "Store"]

DEFAULT_MAX_NODE_SIZE = 64
"""Max items per leaf / children per internal node. See README "Tunables"."""

DEFAULT_CACHE_NODES = 20_000
"""Decoded nodes kept in memory (LRU). Roughly 4 KiB each at the default node size."""

BLOCK_CACHE_BYTES = 64 << 20
"""RocksDB block cache shared by the column families (compressed on-disk blocks)."""

FORMAT_VERSION = b"1"
_CFS = ("nodes", "ids", "meta")


class IdEntry(msgspec.Struct, array_like=True, gc=False):
    """Where an id's item lives: encoded namespace and key, and its sum value."""

    ns: bytes
    key: bytes
    sum: int | float


_node_enc = msgspec.msgpack.Encoder()
_node_dec = msgspec.msgpack.Decoder(Node)
_tree_dec = msgspec.msgpack.Decoder(TreeMeta)
_id_dec = msgspec.msgpack.Decoder(IdEntry)

_K_VERSION = b"Vformat"
_K_NEXT_NODE = b"Cnode"
_K_NEXT_TREE = b"Ctree"
_K_NEXT_AGG = b"Cagg"
_P_AGG = b"A"
_P_TREE = b"T"
_P_USER = b"U"


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
    return o


def _options() -> Options:
    o = Options(raw_mode=True)
    o.create_if_missing(True)
    o.create_missing_column_families(True)
    o.increase_parallelism(2)
    o.set_max_background_jobs(2)
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
        sync: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.max_node_size = _check_node_size(max_node_size or DEFAULT_MAX_NODE_SIZE)
        cache_nodes = DEFAULT_CACHE_NODES if cache_nodes is None else cache_nodes
        if not isinstance(cache_nodes, int) or cache_nodes < 16:
            raise InvalidArgument(f"cache_nodes must be an int >= 16, got {cache_nodes!r}")
        self.cache_nodes = cache_nodes
        self._secondary_dir: str | None = None
        block_cache = Cache(BLOCK_CACHE_BYTES)
        cfs = {name: _cf_options(block_cache) for name in _CFS}
        try:
            if read_only:
                if not os.path.exists(os.path.join(self.path, "CURRENT")):
                    raise TallyError(
                        f"no tally store at {self.path!r}: check --data-dir, or start a consumer "
                        "there first (read-only opens never create a store)"
                    )
                self._secondary_dir = tempfile.mkdtemp(prefix="tally-reader-")
                self._db = Rdict(
                    self.path,
                    _cf_options(block_cache),
                    column_families=cfs,
                    access_type=AccessType.secondary(self._secondary_dir),
                )
            else:
                os.makedirs(self.path, exist_ok=True)
                self._db = Rdict(self.path, _options(), column_families=cfs)
        except TallyError:
            raise
        except Exception as e:
            msg = str(e)
            hint = ""
            if "lock" in msg.lower():
                hint = (
                    " — another process is writing this store; open it with read_only=True "
                    "(or `tally query --data-dir`), or stop the other writer"
                )
            raise TallyError(f"cannot open store at {self.path!r}: {msg}{hint}") from e
        self._nodes = self._db.get_column_family("nodes")
        self._ids = self._db.get_column_family("ids")
        self._meta = self._db.get_column_family("meta")
        self._h_nodes = self._db.get_column_family_handle("nodes")
        self._h_ids = self._db.get_column_family_handle("ids")
        self._h_meta = self._db.get_column_family_handle("meta")
        self._wopt = WriteOptions()
        self._wopt.sync = sync
        self._cache: OrderedDict[int, Node] = OrderedDict()
        self._cums: dict[int, list[int]] = {}
        self._trees: dict[bytes, TreeMeta | None] = {}
        self._agg_ids: dict[str, bytes] = {}
        self._handles: dict[str, Aggregate] = {}
        self._reset_batch_state()
        self._depth = 0
        self._epoch = 0
        self._closed = False
        if not read_only:
            version = self._meta.get(_K_VERSION)
            if version is None:
                self._meta[_K_VERSION] = FORMAT_VERSION
            elif version != FORMAT_VERSION:
                raise TallyError(
                    f"store at {self.path!r} has format {version!r}, this tally reads {FORMAT_VERSION!r}"
                )
        self._load_counters()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        read_only: bool = False,
        *,
        max_node_size: int | None = None,
        cache_nodes: int | None = None,
        sync: bool = False,
    ) -> Store:
        """Open (or create) a store directory.

        ``read_only=True`` opens a RocksDB secondary instance: safe while a
        writer runs; call `refresh()` to see the writer's latest commits.
        ``sync=True`` fsyncs every commit (survives power loss, not just
        process crashes) at a large cost in write throughput.
        """
        return cls(
            os.fspath(path),
            read_only=read_only,
            max_node_size=max_node_size,
            cache_nodes=cache_nodes,
            sync=sync,
        )

    # ---- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the store. Uncommitted batch state (if any) is dropped."""
        if self._closed:
            return
        self._closed = True
        # Column-family views keep the DB (and its LOCK) alive: drop them first.
        self._drop_caches()
        self._reset_batch_state()
        del self._nodes, self._ids, self._meta, self._h_nodes, self._h_ids, self._h_meta
        self._db.close()
        del self._db
        gc.collect()
        if self._secondary_dir:
            shutil.rmtree(self._secondary_dir, ignore_errors=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def refresh(self) -> None:
        """Read-only stores: catch up with the writer's committed state. O(WAL since last refresh)."""
        if self.read_only:
            self._db.try_catch_up_with_primary()
            self._drop_caches()
            self._load_counters()

    def _drop_caches(self) -> None:
        self._epoch += 1
        self._cache.clear()
        self._cums.clear()
        self._trees.clear()
        self._agg_ids.clear()

    # ---- aggregates ------------------------------------------------------------

    def aggregate(self, name: str) -> Aggregate:
        """The handle of a named aggregate (created on its first write). O(1)."""
        from .aggregate import Aggregate

        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"aggregate name must be a non-empty string, got {name!r}")
        h = self._handles.get(name)
        if h is None:
            h = self._handles[name] = Aggregate(self, name)
        return h

    def aggregates(self) -> list[str]:
        """Names of the aggregates that have ever been written. O(number of aggregates)."""
        names = {k[1:].decode() for k, _ in self._scan(self._meta, _P_AGG)}
        names.update(n for n in self._agg_ids)
        return sorted(names)

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

    def get_meta(self, key: bytes) -> bytes | None:
        """Caller metadata stored with `Batch.put_meta` (sees the open batch). O(1)."""
        v = self._meta_get(_P_USER + bytes(key))
        return v

    def scan_meta(self, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Committed caller metadata whose key starts with ``prefix``, plus the open batch's."""
        full = _P_USER + bytes(prefix)
        found = {k: v for k, v in self._scan(self._meta, full)}
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
        self._dirty: dict[int, tuple[int, Node]] = {}
        self._freed: set[bytes] = set()
        self._node_range_dels: list[tuple[bytes, bytes]] = []
        self._id_over: dict[bytes, IdEntry | None] = {}
        self._ids_cleared: list[bytes] = []
        self._meta_over: dict[bytes, bytes | None] = {}
        self._trees_dirty: set[bytes] = set()

    def _load_counters(self) -> None:
        def load(k: bytes) -> int:
            v = self._meta.get(k)
            return int.from_bytes(v, "big") if v else 1

        self._next_node = self._saved_node = load(_K_NEXT_NODE)
        self._next_tree = self._saved_tree = load(_K_NEXT_TREE)
        self._next_agg = self._saved_agg = load(_K_NEXT_AGG)

    def _commit(self) -> None:
        if not (
            self._dirty
            or self._freed
            or self._id_over
            or self._meta_over
            or self._trees_dirty
            or self._node_range_dels
            or self._ids_cleared
        ):
            return
        wb = WriteBatch(raw_mode=True)
        h_nodes, h_ids, h_meta = self._h_nodes, self._h_ids, self._h_meta
        for prefix in self._ids_cleared:
            wb.delete_range(prefix, _prefix_end(prefix), h_ids)
        for k, e in self._id_over.items():
            if e is None:
                wb.delete(k, h_ids)
            else:
                wb.put(k, _node_enc.encode(e), h_ids)
        for b, e2 in self._node_range_dels:
            wb.delete_range(b, e2, h_nodes)
        enc = _node_enc.encode
        for nid, (tid, node) in self._dirty.items():
            wb.put(_node_key(tid, nid), enc(node), h_nodes)
        for ref in self._freed:
            wb.delete(ref, h_nodes)
        for tk in self._trees_dirty:
            meta = self._trees.get(tk)
            if meta is None:
                wb.delete(tk, h_meta)
            else:
                wb.put(tk, enc(meta), h_meta)
        for k, v in self._meta_over.items():
            if v is None:
                wb.delete(k, h_meta)
            else:
                wb.put(k, v, h_meta)
        if self._next_node != self._saved_node:
            wb.put(_K_NEXT_NODE, self._next_node.to_bytes(8, "big"), h_meta)
        if self._next_tree != self._saved_tree:
            wb.put(_K_NEXT_TREE, self._next_tree.to_bytes(8, "big"), h_meta)
        if self._next_agg != self._saved_agg:
            wb.put(_K_NEXT_AGG, self._next_agg.to_bytes(8, "big"), h_meta)
        try:
            self._db.write(wb, self._wopt)
        except Exception:
            self._abort()
            raise
        self._saved_node, self._saved_tree, self._saved_agg = (
            self._next_node,
            self._next_tree,
            self._next_agg,
        )
        self._reset_batch_state()

    def _abort(self) -> None:
        # Nodes are mutated in place; the only safe undo is to forget them all.
        self._drop_caches()
        self._reset_batch_state()
        self._load_counters()

    # ---- node store (the btree.NodeStore protocol) -------------------------------

    def get_node(self, tid: int, nid: int) -> Node:
        cache = self._cache
        n = cache.get(nid)
        if n is not None:
            cache.move_to_end(nid)
            return n
        d = self._dirty.get(nid)
        if d is None:
            raw = self._nodes.get(_node_key(tid, nid))
            if raw is None:
                raise StoreCorrupted(
                    f"node {nid} of tree {tid} is missing from {self.path!r}; "
                    "run validate() and rebuild the aggregate"
                )
            n = _node_dec.decode(raw)
        else:
            n = d[1]
        cache[nid] = n
        if len(cache) > self.cache_nodes:
            cache.popitem(last=False)
        return n

    def get_cum(self, nid: int, node: Node) -> list[int]:
        """Prefix sums of an internal node's child counts, cached until it changes."""
        c = self._cums.get(nid)
        if c is None:
            if len(self._cums) >= self.cache_nodes:
                self._cums.clear()
            c = self._cums[nid] = list(accumulate(node.counts))
        return c

    def put_node(self, tid: int, nid: int, node: Node) -> None:
        self._dirty[nid] = (tid, node)
        self._cums.pop(nid, None)

    def new_node(self, tid: int, node: Node) -> int:
        nid = self._next_node
        self._next_node += 1
        self._dirty[nid] = (tid, node)
        self._cache[nid] = node
        return nid

    def free_node(self, tid: int, nid: int) -> None:
        self._dirty.pop(nid, None)
        self._cums.pop(nid, None)
        self._cache.pop(nid, None)
        self._freed.add(_node_key(tid, nid))

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
        root = self.new_node(tid, Node([], []))
        meta = TreeMeta(tid, root, 1, max_node_size)
        self._epoch += 1
        self._trees[tk] = meta
        self._trees_dirty.add(tk)
        return meta

    def _drop_tree(self, tk: bytes) -> None:
        meta = self._tree_meta(tk)
        if meta is None:
            return
        begin = meta.tid.to_bytes(8, "big")
        end = (meta.tid + 1).to_bytes(8, "big")
        for nid in [n for n, (t, _) in self._dirty.items() if t == meta.tid]:
            del self._dirty[nid]
        self._freed = {r for r in self._freed if not r.startswith(begin)}
        self._node_range_dels.append((begin, end))
        self._epoch += 1
        self._trees[tk] = None
        self._trees_dirty.add(tk)

    def _tree_keys(self, agg_id: bytes) -> list[bytes]:
        """Tree registry keys of an aggregate, committed or in the open batch."""
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
        """Committed id index entries of an aggregate in id order, overlaid with the batch."""
        over = {k: v for k, v in self._id_over.items() if k.startswith(agg_id)}
        cleared = any(agg_id.startswith(p) or p.startswith(agg_id) for p in self._ids_cleared)
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
    def _scan(cf: Rdict, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = cf.iter()
        it.seek(prefix)
        while it.valid():
            k = it.key()
            if not k.startswith(prefix):
                break
            yield k, it.value()
            it.next()

    def validate(self) -> None:
        """Check every aggregate's invariants (see `Aggregate.validate`). O(n)."""
        for name in self.aggregates():
            self.aggregate(name).validate()

    def stats(self) -> dict[str, Any]:
        """Cache and RocksDB figures for operators."""
        return {
            "cached_nodes": len(self._cache),
            "cache_nodes": self.cache_nodes,
            "dirty_nodes": len(self._dirty),
            "rocksdb_estimate_live_data_size": self._db.property_int_value(
                "rocksdb.estimate-live-data-size"
            ),
        }


def _node_key(tid: int, nid: int) -> bytes:
    return tid.to_bytes(8, "big") + nid.to_bytes(8, "big")


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


def tree_namespace(agg_id: bytes, tk: bytes) -> Any:
    return decode_key(tk[len(_P_TREE) + len(agg_id) :])


