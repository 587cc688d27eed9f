"""`Aggregate`: the read/write handle of one named aggregate in a `Store`.

An aggregate holds items ``(key, id, sum_value)`` in namespaces, one counted
B-tree per namespace, plus an id index so any write can address an item by
id alone. ``n`` below is the number of items in the namespace read.

Sum values are ints (64-bit), floats or Decimals (finite, within PostgreSQL
numeric's range); bools count as ints. Decimal sums are exact (`tally.engine.btree`).
A namespace holds float or Decimal sums, never both (ints mix with either):
a write that would mix them raises `InvalidArgument` before changing anything.
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from .btree import DELETE, INSERT, REPLACE, Sum, Tree, mixed_sums
from .decimals import check_decimal
from .errors import (
    InvalidArgument,
    InvalidKey,
    ItemExists,
    ItemNotFound,
    StoreCorrupted,
)
from .keys import decode_key, decode_keys, encode_key, key_repr
from .state import IdEntry, check_node_size
from .state.codec import same_item
from .state.metadata import P_TREE, tree_key, watermark_key
from .types import (
    Bounds,
    Item,
    Order,
    Page,
    Query,
    as_queries,
    decode_cursor,
    decode_item,
    encode_cursor,
    normalize_bounds,
    offset_out_of_range,
    parse_order,
)

if TYPE_CHECKING:
    from .state import StateStore

_MISSING = object()


class Prepared(NamedTuple):
    """An item validated and encoded by `Aggregate.prepare`."""

    key: bytes
    id: bytes
    namespace: bytes
    sum_value: Sum
    pos: bytes | None = None
    """The source position of the change (encoded, e.g. a Postgres LSN), when known: kept with
    the item so a truncate at a position spares the items changed after it (`Aggregate.truncate`)."""


__all__ = ["Aggregate", "Prepared"]

_INT64 = 1 << 63


def _check_sum(v: Any) -> Sum:
    t = type(v)
    if t is int:
        if -_INT64 <= v < _INT64:
            return cast(int, v)
    elif t is float:
        if math.isfinite(v):
            return cast(float, v)
    elif t is Decimal:
        if v.is_finite():
            return check_decimal(v, "sum_value")
    elif isinstance(v, bool):
        return int(v)
    elif isinstance(v, (int, float)):
        return _check_sum(int(v) if isinstance(v, int) else float(v))
    elif isinstance(v, Decimal):
        return _check_sum(Decimal(v))
    raise InvalidArgument(
        f"sum_value must be a finite int (64-bit), float or Decimal, got {key_repr(v)}"
    )


_NONE_KEY = encode_key(None)
_new_prepared = tuple.__new__  # skips NamedTuple's Python-level __new__ on the hot path


def prepare_encoded_id(
    key: Any, eid: bytes, sum_value: Any, namespace: Any, pos: bytes | None = None
) -> Prepared:
    """An item validated and encoded, for an id already encoded (one encoding per event, not
    per aggregate); ``pos`` is the change's encoded source position, if known."""
    s = (
        sum_value
        if type(sum_value) is int and -_INT64 <= sum_value < _INT64
        else _check_sum(sum_value)
    )
    return _new_prepared(
        Prepared,
        (encode_key(key), eid, _NONE_KEY if namespace is None else encode_key(namespace), s, pos),
    )


def _encode_id(id: Any) -> bytes:
    if id is None:
        raise InvalidKey(
            "id must not be None: every item needs an id (an int, str, or tuple for composite ids)"
        )
    return encode_key(id)


def _first(entry: tuple[bytes, Sum]) -> bytes:
    return entry[0]


def _unchanged(old: IdEntry, ens: bytes, ek: bytes, s: Sum) -> bool:
    """The id already holds exactly this item (see `same_item`)."""
    return same_item(old, ens, ek, s)


def _drops_when_empty(store: StateStore, max_node_size: int) -> bool:
    """An emptied namespace disappears, unless it carries its own node size (`Aggregate.clear`)."""
    return max_node_size == store.max_node_size


class Aggregate:
    """Handle of one aggregate. Get it with `Store.aggregate(name)`."""

    def __init__(self, store: StateStore, name: str, *, partial: bool = False) -> None:
        self.store = store
        self.name = name
        self.partial = partial
        self._phys = name
        self._rng = _random.Random()
        self._trees: dict[bytes, Tree | None] = {}
        self._epoch = -1

    def __repr__(self) -> str:
        return f"<Aggregate {self.name!r} in {self.store.path!r}>"

    # ---- plumbing -------------------------------------------------------------

    @property
    def physical(self) -> str:
        """The physical aggregate (generation) this handle reads and writes (`tally.engine.catalog`).

        Raises `AggregateNotReady` while no generation is ready (unless ``partial``).
        """
        store = self.store
        if self._epoch != store.epoch:
            self._trees.clear()
            gen = store.generation(self.name)
            # Not cached while not ready: the next call asks the catalog again.
            self._phys = self.name if gen is None else gen.resolve(self.name, self.partial)
            self._epoch = store.epoch
        return self._phys

    def _tree(self, namespace: Any) -> Tree | None:
        return self._tree_enc(encode_key(namespace))

    def _tree_enc(self, ens: bytes) -> Tree | None:
        store = self.store
        phys = self.physical
        tree = self._trees.get(ens, _MISSING)
        if tree is _MISSING:
            aid = store.agg_id(phys, False)
            meta = None if aid is None else store.tree_meta(tree_key(aid, ens))
            tree = None if meta is None else Tree(store.nodes, meta)
            self._trees[ens] = tree
        return tree  # type: ignore[return-value]

    def _range(self, namespace: Any, bounds: Any) -> tuple[Tree | None, bytes | None, bytes | None]:
        if bounds is None:
            return self._tree(namespace), None, None
        lo, hi = normalize_bounds(bounds)
        tree = self._tree(namespace)
        if tree is not None and lo is not None and hi is not None and lo >= hi:
            tree = None
        return tree, lo, hi

    def _tree_at(self, tk: bytes, max_node_size: int | None = None) -> Tree:
        """The tree registered under ``tk``, created (empty) if there is none."""
        store = self.store
        meta = store.tree_meta(tk)
        if meta is None:
            meta = store.new_tree(
                tk, store.max_node_size if max_node_size is None else max_node_size
            )
        return Tree(store.nodes, meta)

    # ---- writes ---------------------------------------------------------------

    def _write(self, key: Any, id: Any, sum_value: Any, namespace: Any, mode: str) -> bool:
        return self._write_enc(
            encode_key(key), _encode_id(id), encode_key(namespace), _check_sum(sum_value), mode, id
        )

    def _write_enc(self, ek: bytes, eid: bytes, ens: bytes, s: Sum, mode: str, id: Any) -> bool:
        """mode: 'insert' (strict), 'replace' (strict), 'upsert'."""
        store = self.store
        with store.transaction() as tx:
            aid = store.agg_id(self.physical, True)
            assert aid is not None
            idk = aid + eid
            old = tx.get_id(idk)
            if old is None:
                if mode == "replace":
                    raise ItemNotFound(
                        f"aggregate {self.name!r} has no item with id {key_repr(id)} to replace"
                    )
            else:
                if mode == "insert":
                    raise ItemExists(
                        f"aggregate {self.name!r} already has an item with id {key_repr(id)}; "
                        "use replace() or upsert() to change it"
                    )
                if _unchanged(old, ens, ek, s):
                    return False
                if type(s) is not int:  # before the old item comes out (a new id: insert checks)
                    self._check_sum_type(aid, ens, s)
                otk, otree = self._take_out(aid, eid, old, id)
                if ens == old.ns:
                    otree.insert(ek + eid, s)
                    tx.set_id(idk, old, IdEntry(ens, ek, s))
                    return True
                self._maybe_drop(otk, otree)
            tk = tree_key(aid, ens)
            try:
                self._tree_at(tk).insert(ek + eid, s)  # refuses mixed sums before any change
            except InvalidArgument as e:
                raise InvalidArgument(
                    f"aggregate {self.name!r}, namespace {key_repr(decode_key(ens))}: "
                    f"sum_value {key_repr(s)}: {e}"
                ) from None
            store.touch_tree(tk)
            tx.set_id(idk, old, IdEntry(ens, ek, s))
            return True

    def apply_many(
        self,
        changes: Mapping[bytes, Prepared | None],
        rebuild_ratio: float = 0.25,
        *,
        before: dict[bytes, IdEntry | None] | None = None,
    ) -> int:
        """Converge many ids at once: encoded id → its final `Prepared` item, or None (absent).

        Per namespace, small change sets are applied as sorted incremental
        writes; when the changes reach ``rebuild_ratio`` of the namespace's
        size, its tree is rebuilt bottom-up from a merge of the old items and
        the new ones (O(n + k log k) instead of k random writes). This is how
        replays and large batches load fast. Returns the number of ids changed.
        ``before`` (if given) receives each id's entry as it was (None: absent).
        Changes that would mix float and Decimal sums in a namespace (with each other or
        with what it holds) raise `InvalidArgument` before anything changes.
        """
        store = self.store
        with store.transaction() as tx:
            aid = store.agg_id(self.physical, True)
            assert aid is not None
            self._check_sum_types(aid, changes)
            set_id = tx.set_id
            dels: dict[bytes, list[bytes]] = {}
            ins: dict[bytes, list[tuple[bytes, Sum]]] = {}
            changed = 0
            idks = [aid + eid for eid in changes]
            olds = tx.get_ids(idks)  # one multi-get for the ids not in memory
            for idk, (eid, new), old in zip(idks, changes.items(), olds, strict=True):
                if before is not None:
                    before[eid] = old
                if new is None:
                    if old is None:
                        continue
                    dels.setdefault(old.ns, []).append(old.key + eid)
                    set_id(idk, old, None)
                else:
                    nkey, _, nns, nsum, npos = new
                    if old is not None:
                        if _unchanged(old, nns, nkey, nsum):
                            if npos is not None and npos != old.pos:
                                # Same item, newer source position: the index learns it (a later
                                # truncate must spare this id), the trees do not change.
                                set_id(idk, old, IdEntry(nns, nkey, nsum, npos))
                            continue
                        dels.setdefault(old.ns, []).append(old.key + eid)
                    ins.setdefault(nns, []).append((nkey + eid, nsum))
                    set_id(idk, old, IdEntry(nns, nkey, nsum, npos))
                changed += 1
            for ens in sorted(set(dels) | set(ins)):
                self._apply_tree(aid, ens, dels.get(ens, []), ins.get(ens, []), rebuild_ratio)
            return changed

    def _check_sum_types(self, aid: bytes, changes: Mapping[bytes, Prepared | None]) -> None:
        """`apply_many`'s check that no namespace would mix float and Decimal sums."""
        kinds: dict[bytes, tuple[type, Sum]] = {}
        for new in changes.values():
            if new is not None and type(new[3]) is not int:
                t = type(new[3])
                seen = kinds.get(new[2])
                if seen is None:
                    kinds[new[2]] = (t, new[3])
                elif seen[0] is not t:
                    raise InvalidArgument(
                        f"aggregate {self.name!r}, namespace {key_repr(decode_key(new[2]))}: "
                        f"sum values {key_repr(seen[1])} and {key_repr(new[3])} in one batch: "
                        + mixed_sums(t, seen[0])
                    )
        for ens, (_, v) in kinds.items():
            self._check_sum_type(aid, ens, v)

    def _apply_tree(
        self,
        aid: bytes,
        ens: bytes,
        dels: list[bytes],
        ins: list[tuple[bytes, Sum]],
        rebuild_ratio: float,
    ) -> None:
        store = self.store
        tk = tree_key(aid, ens)
        meta = store.tree_meta(tk)
        n = 0 if meta is None else Tree(store.nodes, meta).count()
        k = len(dels) + len(ins)
        m = store.max_node_size if meta is None else meta.max_node_size
        if (meta is not None and k < rebuild_ratio * n) or n + k <= m:
            # Incremental: few changes, or a namespace that fits one leaf (a new or tiny one).
            # A rebuild is structural and forces a checkpoint; this only logs the changes.
            tree = self._tree_at(tk, m)
            # One merge pass over the tree: each touched node is visited and fixed up once.
            merged: dict[bytes, tuple[bytes, int, Sum]] = {ek: (ek, DELETE, 0) for ek in dels}
            for ek, v in ins:
                merged[ek] = (ek, REPLACE if ek in merged else INSERT, v)
            tree.apply_sorted(sorted(merged.values(), key=itemgetter(0)))
            store.touch_tree(tk)
            self._maybe_drop(tk, tree)
            return
        # Rebuild: merge the surviving old items with the new ones, build bottom-up.
        if meta is not None:
            gone = set(dels)
            entries = [e for e in Tree(store.nodes, meta).items(None, None) if e[0] not in gone]
            store.drop_tree(tk)
        else:
            entries = []
        entries.extend(ins)
        entries.sort(key=_first)
        store.tx.structural = True  # a rebuilt tree is written whole at this commit's checkpoint
        if not entries and _drops_when_empty(store, m):
            return
        Tree(store.nodes, store.new_tree(tk, m)).build(entries)

    def _take_out(self, aid: bytes, eid: bytes, old: IdEntry, id: Any) -> tuple[bytes, Tree]:
        """Remove an id's current item from its namespace's tree; return that tree."""
        store = self.store
        tk = tree_key(aid, old.ns)
        meta = store.tree_meta(tk)
        if meta is None:
            raise StoreCorrupted(f"id index names a missing namespace for id {key_repr(id)}")
        tree = Tree(store.nodes, meta)
        tree.delete(old.key + eid)
        store.touch_tree(tk)
        return tk, tree

    def sum_conflict(self, ens: bytes, value: Sum) -> str | None:
        """Why ``value`` cannot be a sum in the namespace ``ens`` (encoded) as it is now —
        it holds sums of the other of float/Decimal — or None. O(1) when the namespace
        already has the value's type (its tree's flag), else O(B)."""
        t = type(value)
        if t is int:
            return None
        tree = self._tree_enc(ens)
        held = None if tree is None else tree.sum_conflict(t)
        if held is None:
            return None
        return (
            f"aggregate {self.name!r}, namespace {key_repr(decode_key(ens))}: sum_value "
            f"{key_repr(value)}: {mixed_sums(t, held)}"
        )

    def _check_sum_type(self, aid: bytes, ens: bytes, value: Sum) -> None:
        meta = self.store.tree_meta(tree_key(aid, ens))
        if meta is not None and meta.decimal is not (type(value) is Decimal):
            why = self.sum_conflict(ens, value)
            if why is not None:
                raise InvalidArgument(why)

    def _maybe_drop(self, tk: bytes, tree: Tree) -> None:
        if (
            tree.meta.height == 1
            and tree.count() == 0
            and _drops_when_empty(self.store, tree.meta.max_node_size)
        ):
            self.store.drop_tree(tk)

    def _remove(self, id: Any, strict: bool) -> bool:
        store = self.store
        eid = _encode_id(id)
        with store.transaction() as tx:
            aid = store.agg_id(self.physical, False)
            old = None if aid is None else tx.get_id(aid + eid)
            if old is None or aid is None:
                if strict:
                    raise ItemNotFound(
                        f"aggregate {self.name!r} has no item with id {key_repr(id)} to delete"
                    )
                return False
            tk, tree = self._take_out(aid, eid, old, id)
            self._maybe_drop(tk, tree)
            tx.set_id(aid + eid, old, None)
            return True

    def insert(self, key: Any, id: Any, sum_value: Sum = 0, namespace: Any = None) -> None:
        """Add an item; raise `ItemExists` if the id is taken. O(log n)."""
        self._write(key, id, sum_value, namespace, "insert")

    def replace(self, id: Any, key: Any, sum_value: Sum = 0, namespace: Any = None) -> None:
        """Change an existing item (maybe across namespaces); `ItemNotFound` if absent. O(log n)."""
        self._write(key, id, sum_value, namespace, "replace")

    def upsert(self, key: Any, id: Any, sum_value: Sum = 0, namespace: Any = None) -> bool:
        """Make the item for ``id`` be exactly this; True if anything changed. O(log n)."""
        return self._write(key, id, sum_value, namespace, "upsert")

    insert_if_does_not_exist = upsert
    replace_or_insert = upsert

    def delete(self, id: Any) -> None:
        """Remove the item for ``id``; raise `ItemNotFound` if absent. O(log n)."""
        self._remove(id, True)

    def delete_if_exists(self, id: Any) -> bool:
        """Remove the item for ``id`` if present; True if it was. O(log n)."""
        return self._remove(id, False)

    def entries(self, eids: Iterable[bytes]) -> dict[bytes, IdEntry | None]:
        """Id-index entries (namespace, key, sum; encoded) of encoded ids, None if absent. O(k) point reads."""
        aid = self.store.agg_id(self.physical, False)
        if aid is None:
            return dict.fromkeys(eids)
        get = self.store.tx.get_id
        return {eid: get(aid + eid) for eid in eids}

    def id_entries(self) -> Iterator[tuple[bytes, IdEntry]]:
        """(encoded id, entry) of every item, in id order, streamed (constant memory outside
        a batch; batches committed meanwhile do not disturb it). O(n)."""
        aid = self.store.agg_id(self.physical, False)
        if aid is None:
            return
        n = len(aid)
        for k, e in self.store.id_scan(aid):
            yield k[n:], e

    def get(self, id: Any) -> Item | None:
        """The item for ``id``, or None. O(1) RocksDB point read."""
        aid = self.store.agg_id(self.physical, False)
        if aid is None:
            return None
        e = self.store.tx.get_id(aid + _encode_id(id))
        if e is None:
            return None
        return Item(decode_key(e.key), id, e.sum, decode_key(e.ns))

    # ---- maintenance ------------------------------------------------------------

    def clear(self, namespace: Any = None, max_node_size: int | None = None) -> None:
        """Remove every item of a namespace; optionally set its node size. O(n)."""
        store = self.store
        ens = encode_key(namespace)
        m = store.max_node_size if max_node_size is None else check_node_size(max_node_size)
        with store.transaction():
            aid = store.agg_id(self.physical, True)
            assert aid is not None
            self._clear_tree(aid, tree_key(aid, ens))
            if m != store.max_node_size:
                store.new_tree(tree_key(aid, ens), m)

    def _clear_tree(self, aid: bytes, tk: bytes) -> None:
        store = self.store
        meta = store.tree_meta(tk)
        if meta is None:
            return
        tx = store.tx
        for ek, _ in list(Tree(store.nodes, meta).items(None, None)):
            _, j = decode_keys(ek, 0)
            tx.forget_id(aid + ek[j:])
        store.drop_tree(tk)

    def drop_namespace(self, namespace: Any) -> None:
        """Remove a namespace and its items (and its node-size setting). O(n)."""
        store = self.store
        ens = encode_key(namespace)
        with store.transaction():
            aid = store.agg_id(self.physical, False)
            if aid is not None:
                self._clear_tree(aid, tree_key(aid, ens))

    def clear_all(self) -> None:
        """Remove every item of every namespace. O(number of namespaces)."""
        store = self.store
        with store.transaction() as tx:
            aid = store.agg_id(self.physical, False)
            if aid is not None:
                for tk in store.tree_keys(aid):
                    store.drop_tree(tk)
                tx.clear_ids(aid)
                tx.put_meta(watermark_key(aid), None)

    def truncate(self, before: bytes | None = None) -> int:
        """A source truncate: remove every item, or with ``before`` (an encoded source
        position) every item not changed after it, and remember ``before`` so changes from
        before it that arrive later are skipped (`watermark`). O(n). Returns items removed.

        Why: a truncate can reach the consumer on another partition than the rows it clears;
        changes made after it may have been applied already and must survive.
        """
        store = self.store
        with store.transaction() as tx:
            aid = store.agg_id(self.physical, before is not None)
            if aid is None:
                return 0
            wm = self.watermark()
            keep: dict[bytes, Prepared | None] = {}
            total = 0
            for eid, e in self.id_entries():
                total += 1
                if before is not None and e.pos is not None and e.pos > before:
                    keep[eid] = _new_prepared(Prepared, (e.key, eid, e.ns, e.sum, e.pos))
            self.clear_all()
            if keep:
                self.apply_many(keep, rebuild_ratio=0.0)
            if before is not None or wm is not None:
                mark = before if wm is None or (before is not None and before > wm) else wm
                tx.put_meta(watermark_key(aid), mark)
            return total - len(keep)

    def watermark(self) -> bytes | None:
        """The position of the last positioned truncate (encoded), or None. O(1)."""
        aid = self.store.agg_id(self.physical, False)
        return None if aid is None else self.store.tx.get_meta(watermark_key(aid))

    def namespaces(self) -> list[Any]:
        """Namespaces holding at least one item, in key order. O(namespaces)."""
        return [decode_key(ens) for ens in self.namespace_keys()]

    def namespace_keys(self) -> list[bytes]:
        """`namespaces`, encoded (``encode_key(namespace)``), in key order. O(namespaces)."""
        store = self.store
        aid = store.agg_id(self.physical, False)
        if aid is None:
            return []
        out = []
        n = len(P_TREE) + len(aid)
        for tk in store.tree_keys(aid):
            meta = store.tree_meta(tk)
            if meta is not None and Tree(store.nodes, meta).count():
                out.append(tk[n:])
        return out

    # ---- reads -----------------------------------------------------------------

    def count(self, namespace: Any = None, bounds: Bounds | Mapping[str, Any] | None = None) -> int:
        """Number of items in range. O(log n)."""
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            return 0
        if lo is None and hi is None:
            return tree.count()
        return tree.rank(hi) - (tree.rank(lo) if lo is not None else 0)

    def sum(self, namespace: Any = None, bounds: Bounds | Mapping[str, Any] | None = None) -> Sum:
        """Sum of the items' sum values in range (0 if none). O(log n).

        A Decimal when the range holds a Decimal sum: exact, with the largest number of
        decimal places among them (as SQL's sum of a numeric column)."""
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            return 0
        if lo is None and hi is None:
            return tree.total()
        return tree.range_sum(lo, hi)

    def at(
        self, offset: int, namespace: Any = None, bounds: Bounds | Mapping[str, Any] | None = None
    ) -> Item:
        """The item at ``offset`` in (key, id) order; negative counts from the end. O(log n)."""
        # `select_entries` for one offset, inlined: `at` is a hot path (no list, one check).
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise InvalidArgument(f"offset must be an int, got {key_repr(offset)}")
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            raise offset_out_of_range(offset, 0)
        base = tree.rank(lo) if lo is not None else 0
        n = tree.rank(hi) - base
        k = offset + n if offset < 0 else offset
        if not 0 <= k < n:
            raise offset_out_of_range(offset, n)
        ek, s = tree.select(base + k)
        return decode_item(ek, s, namespace)

    def select_entries(
        self,
        offsets: Iterable[int],
        namespace: Any = None,
        bounds: Bounds | Mapping[str, Any] | None = None,
    ) -> list[tuple[bytes, Sum]]:
        """The items at ``offsets`` in range as `at` finds them (negative counts from the end;
        `OffsetOutOfRange` the same), encoded: ``(encode_key(key) + encode_key(id), sum)``.
        O(log n) each, the range resolved once.

        Why encoded: a deployment's members compare and rank each other's items by these
        bytes (`tally.consumers.cluster`), never by decoded values.
        """
        offs = list(offsets)
        for offset in offs:
            if not isinstance(offset, int) or isinstance(offset, bool):
                raise InvalidArgument(f"offset must be an int, got {key_repr(offset)}")
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            if offs:
                raise offset_out_of_range(offs[0], 0)
            return []
        base = tree.rank(lo) if lo is not None else 0
        n = tree.rank(hi) - base
        out = []
        for offset in offs:
            k = offset + n if offset < 0 else offset
            if not 0 <= k < n:
                raise offset_out_of_range(offset, n)
            out.append(tree.select(base + k))
        return out

    def ranks(
        self,
        item_keys: Iterable[bytes],
        namespace: Any = None,
        bounds: Bounds | Mapping[str, Any] | None = None,
    ) -> list[int]:
        """For each encoded item key (``encode_key(key) + encode_key(id)``, as `select_entries`
        and `page_entries` give them), the number of items in range ordered before it.
        O(log n) each, the range resolved once.

        Why: a deployment's members rank another member's item among their own (the select
        across members in `tally.consumers.cluster`); `index_of` takes decoded keys.
        """
        xs = list(item_keys)
        for x in xs:
            if type(x) is not bytes:
                raise InvalidArgument(
                    f"an item key must be bytes (encode_key(key) + encode_key(id)), "
                    f"got {key_repr(x)}"
                )
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            return [0] * len(xs)
        base = tree.rank(lo) if lo is not None else 0
        end = tree.rank(hi)
        if end <= base:
            return [0] * len(xs)
        rank = tree.rank
        return [min(max(rank(x), base), end) - base for x in xs]

    def index_of(
        self,
        key: Any,
        id: Any = None,
        order: Order = "asc",
        namespace: Any = None,
        bounds: Bounds | Mapping[str, Any] | None = None,
    ) -> int:
        """Asc: items in range before (key, id). Desc: items in range after it. O(log n).

        Without ``id`` the whole tie group of ``key`` counts as (key): asc gives
        the index of its first item, desc the rank from the top of its last.
        """
        reverse = parse_order(order)
        ek = encode_key(key)
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            return 0
        base = tree.rank(lo) if lo is not None else 0
        end = tree.rank(hi)
        if end <= base:
            return 0
        if not reverse:
            x = ek if id is None else ek + _encode_id(id)
            r = tree.rank(x)
            return min(max(r, base), end) - base
        x = ek + b"\xff" if id is None else ek + _encode_id(id) + b"\x00"
        r = tree.rank(x)
        return end - min(max(r, base), end)

    def min(
        self, namespace: Any = None, bounds: Bounds | Mapping[str, Any] | None = None
    ) -> Item | None:
        """The first item in range, or None. O(log n)."""
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            return None
        for ek, s in tree.items(lo, hi):
            return decode_item(ek, s, namespace)
        return None

    def max(
        self, namespace: Any = None, bounds: Bounds | Mapping[str, Any] | None = None
    ) -> Item | None:
        """The last item in range, or None. O(log n)."""
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            return None
        for ek, s in tree.items(lo, hi, reverse=True):
            return decode_item(ek, s, namespace)
        return None

    def random(
        self, namespace: Any = None, bounds: Bounds | Mapping[str, Any] | None = None
    ) -> Item | None:
        """A uniformly random item in range, or None. O(log n)."""
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            return None
        got = tree.random_in(lo, hi, self._rng)
        return None if got is None else decode_item(got[0], got[1], namespace)

    def paginate(
        self,
        cursor: str | None = None,
        page_size: int = 100,
        order: Order = "asc",
        namespace: Any = None,
        bounds: Bounds | Mapping[str, Any] | None = None,
    ) -> Page:
        """One page after ``cursor`` (None: from the start). O(log n + page_size).

        ``is_done`` is exact: True only when no item follows this page.
        """
        after = None if cursor is None else decode_cursor(cursor)
        entries, done = self.page_entries(after, page_size, order, namespace, bounds)
        if not entries:
            return Page([], cursor, done)
        items = [decode_item(ek, s, namespace) for ek, s in entries]
        return Page(items, encode_cursor(entries[-1][0]), done)

    def page_entries(
        self,
        after: bytes | None = None,
        page_size: int = 100,
        order: Order = "asc",
        namespace: Any = None,
        bounds: Bounds | Mapping[str, Any] | None = None,
    ) -> tuple[list[tuple[bytes, Sum]], bool]:
        """Up to ``page_size`` items in range strictly after the encoded item key ``after``
        in ``order`` (None: from the first), encoded as in `select_entries`, and whether no
        item follows them (exact). `paginate` is this with ``after`` from its cursor.
        O(log n + page_size).
        """
        if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size <= 0:
            raise InvalidArgument(f"page_size must be a positive int, got {key_repr(page_size)}")
        reverse = parse_order(order)
        tree, lo, hi = self._range(namespace, bounds)
        if after is not None:
            if reverse:
                hi = after if hi is None else min(hi, after)
            else:
                c = after + b"\x00"
                lo = c if lo is None else max(lo, c)
        if tree is None or (lo is not None and hi is not None and lo >= hi):
            return [], True
        out: list[tuple[bytes, Sum]] = []
        for entry in tree.items(lo, hi, reverse):
            if len(out) == page_size:
                return out, False
            out.append(entry)
        return out, True

    def iter(
        self,
        namespace: Any = None,
        bounds: Bounds | Mapping[str, Any] | None = None,
        order: Order = "asc",
    ) -> Iterator[Item]:
        """Items in range, lazily, in order. O(log n) to start, O(1) amortized per item.

        Writing to the aggregate while iterating gives undefined results; use
        `paginate` for long walks interleaved with writes.
        """
        reverse = parse_order(order)
        tree, lo, hi = self._range(namespace, bounds)
        if tree is None:
            return iter(())
        return (decode_item(ek, s, namespace) for ek, s in tree.items(lo, hi, reverse))

    def count_batch(self, queries: Iterable[Query | Mapping[str, Any]]) -> list[int]:
        """`count` for each query, in input order."""
        return [self.count(q.namespace, q.bounds) for q in as_queries(queries)]

    def sum_batch(self, queries: Iterable[Query | Mapping[str, Any]]) -> list[Sum]:
        """`sum` for each query, in input order."""
        return [self.sum(q.namespace, q.bounds) for q in as_queries(queries)]

    def at_batch(self, queries: Iterable[Query | Mapping[str, Any]]) -> list[Item]:
        """`at` for each query (its ``offset``), in input order."""
        return [self.at(q.offset, q.namespace, q.bounds) for q in as_queries(queries)]

    # ---- checks -----------------------------------------------------------------

    def validate(self) -> None:
        """Check every tree invariant and that the id index agrees with the trees. O(n)."""
        store = self.store
        aid = store.agg_id(self.physical, False)
        if aid is None:
            return
        seen: dict[bytes, tuple[bytes, bytes, Sum]] = {}
        n = len(P_TREE) + len(aid)
        for tk in store.tree_keys(aid):
            meta = store.tree_meta(tk)
            assert meta is not None
            tree = Tree(store.nodes, meta)
            tree.validate()
            ens = tk[n:]
            for ek, s in tree.items(None, None):
                _, j = decode_keys(ek, 0)
                eid = ek[j:]
                if eid in seen:
                    raise StoreCorrupted(
                        f"aggregate {self.name!r}: id {key_repr(decode_key(eid))} appears twice in the trees"
                    )
                seen[eid] = (ens, ek[:j], s)
        count = 0
        for eid, e in self.id_entries():
            t = seen.get(eid)
            if t is None or t[0] != e.ns or t[1] != e.key or t[2] != e.sum:
                raise StoreCorrupted(
                    f"aggregate {self.name!r}: id index entry for {key_repr(decode_key(eid))} "
                    f"({e!r}) does not match the tree ({t!r})"
                )
            count += 1
        if count != len(seen):
            raise StoreCorrupted(
                f"aggregate {self.name!r}: trees hold {len(seen)} items but the id index {count}"
            )
