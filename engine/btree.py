"""Counted B+ tree over encoded item keys, with per-child counts and sums.

Leaves hold item keys (``encode_key(key) + encode_key(id)``) and the items'
sum values. Internal nodes hold separators (``len(children) - 1``), child
references, and per child its item count and sum, so rank, select-by-offset
and range count/sum are O(log n) node visits of O(B) work each.

Separator invariant: every key of child ``i`` < ``keys[i]`` <= every key of
child ``i + 1``.

Nodes live in a `NodeStore` (the node cache of `tally.engine.state.cache`); a
tree only knows its root reference, its height and its max node size. Float
sums are recomputed from the children whenever a node changes, so they cannot
drift however many updates they see; int sums are adjusted by exact deltas.

**Decimal sums are exact.** A tree whose meta says ``decimal`` may hold
`decimal.Decimal` sums: all its arithmetic (node sums, fix-ups, range sums,
totals, validation) runs in `tally.engine.decimals.exact()`, so neither rounding nor
the caller's decimal context touches them, and its sums are recomputed from the
children like float sums. Floats and Decimals cannot be added exactly, so one
tree never holds both: `admit` refuses a float while the tree holds a Decimal
and vice versa (ints mix with either). A subtree's sum has the type of what it
holds (Decimal if any Decimal, else float if any float, else int), so the
root's sums tell in O(B) whether the tree holds a type; the ``decimal`` flag
makes the common case O(1).
"""

from __future__ import annotations

import random as _random
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from decimal import Decimal
from operator import itemgetter
from typing import Any, Protocol, TypeAlias, cast

import msgspec

from .decimals import exact
from .errors import InvalidArgument, StoreCorrupted

Sum: TypeAlias = "int | float | Decimal"
"""An item's or a subtree's sum value."""

__all__ = [
    "DELETE",
    "INSERT",
    "REPLACE",
    "Node",
    "NodeStore",
    "Sum",
    "Tree",
    "TreeMeta",
    "add_sums",
    "mixed_sums",
]


class Node(msgspec.Struct, array_like=True, gc=False):
    """A tree node. A leaf has no children."""

    keys: list[bytes]
    sums: list[int | float | Decimal]  # ints beyond 64 bits are stored as msgpack ext (codec)
    children: list[int] = msgspec.field(default_factory=list)
    counts: list[int] = msgspec.field(default_factory=list)


class TreeMeta(msgspec.Struct, array_like=True):
    """Where a tree's root is. Persisted in the meta column family.

    Node ids are local to a tree (``root``, ``children``, ``next_nid``); the
    store addresses a node globally as ``tid << NID_BITS | local id``.
    ``decimal``: the tree may hold Decimal sums (and then holds no float). Metas stored
    before it existed read back with False; older readers ignore it.
    """

    tid: int
    root: int
    height: int
    max_node_size: int
    next_nid: int = 1
    decimal: bool = False


NID_BITS = 40

INTERNAL_FACTOR = 8
"""Internal nodes hold up to ``INTERNAL_FACTOR * max_node_size`` children (for node sizes of 16
and up): their entries are small (short separators, ids, counts, sums), so wide internal nodes
keep trees shallow and per-op read cost grows little from 100k to 10M items. Tiny node sizes
(tests) keep internal nodes as small as leaves, so internal splits and merges stay frequent."""


def internal_max(m: int) -> int:
    """Max children of an internal node for leaves of at most ``m`` items."""
    return m * INTERNAL_FACTOR if m >= 16 else m


class NodeStore(Protocol):
    """Where nodes live, addressed by global node id (``tid << NID_BITS | local``)."""

    def get_node(self, gid: int) -> Node: ...
    def get_cum(self, gid: int, node: Node) -> list[int]: ...
    def put_node(self, gid: int, node: Node) -> None: ...
    def add_node(self, gid: int, node: Node) -> None: ...
    def free_node(self, gid: int) -> None: ...


INSERT = 0
DELETE = 1
REPLACE = 2
"""Ops of `Tree.apply_sorted`."""


def _first(change: tuple[bytes, int, Sum]) -> bytes:
    return change[0]


def _count(n: Node) -> int:
    return sum(n.counts) if n.children else len(n.keys)


def _sum(n: Node) -> Sum:
    return sum(n.sums)


def mixed_sums(value_type: type, held: type) -> str:
    """The error for a sum value that cannot join a tree holding sums of type ``held``."""
    name = {float: "float", Decimal: "Decimal"}
    return (
        f"a {name.get(value_type, value_type.__name__)} sum_value cannot join sums of type "
        f"{name.get(held, held.__name__)} in one namespace: floats and Decimals cannot be "
        "added exactly; make sum_value return one type: Decimal(str(x)) or float(x)"
    )


def add_sums(parts: Iterable[Sum]) -> Sum:
    """Add sums as a tree adds its children's: ints exactly (an int), floats by float
    addition, Decimals exactly in `exact()` (the most decimal places among them win, as
    SQL's sum); 0 for no parts. O(number of parts).

    Why: partial sums of one range (e.g. from several members of a deployment) combine
    exactly as the tree would have combined them. A float and a Decimal cannot be added
    exactly: `InvalidArgument`, saying what to do.
    """
    parts = list(parts)
    kinds = set(map(type, parts))
    if Decimal in kinds:
        if float in kinds:
            raise InvalidArgument(mixed_sums(float, Decimal))
        with exact():
            return sum(parts)
    return sum(parts)


class Tree:
    """Operations on one tree. Cheap to construct; holds no nodes itself."""

    __slots__ = ("base", "meta", "ns")

    def __init__(self, ns: NodeStore, meta: TreeMeta) -> None:
        self.ns = ns
        self.meta = meta
        self.base = meta.tid << NID_BITS

    def new_node(self, node: Node) -> int:
        """Allocate a local id for a new node (and add it to the node store)."""
        n = self.meta.next_nid
        self.meta.next_nid = n + 1
        self.ns.add_node(self.base | n, node)
        return n

    # ---- reads ---------------------------------------------------------------

    def count(self) -> int:
        """Items in the tree. O(B)."""
        return _count(self.ns.get_node(self.base | self.meta.root))

    def total(self) -> Sum:
        """Sum of all items. O(B)."""
        if self.meta.decimal:
            with exact():
                return _sum(self.ns.get_node(self.base | self.meta.root))
        return _sum(self.ns.get_node(self.base | self.meta.root))

    def holds(self, t: type) -> bool:
        """The tree holds an item sum of type ``t`` (float or Decimal). O(B)."""
        return t in map(type, self.ns.get_node(self.base | self.meta.root).sums)

    def sum_conflict(self, t: type) -> type | None:
        """The sum type held here that a value of type ``t`` cannot be added to exactly, or
        None. O(1) unless the value's type differs from the tree's flag, then O(B)."""
        if t is Decimal:
            return None if self.meta.decimal or not self.holds(float) else float
        if t is float and self.meta.decimal and self.holds(Decimal):
            return Decimal
        return None

    def admit(self, t: type) -> None:
        """Ready the tree for a sum of type ``t`` (float or Decimal), or raise
        `InvalidArgument` if it holds the other type. Changes only the ``decimal`` flag."""
        held = self.sum_conflict(t)
        if held is not None:
            raise InvalidArgument(mixed_sums(t, held))
        self.meta.decimal = t is Decimal

    def rank(self, x: bytes | None) -> int:
        """Number of items with key < x (x None = +infinity). O(B log n)."""
        get = self.ns.get_node
        base = self.base
        node = get(base | self.meta.root)
        if x is None:
            return _count(node)
        cum = self.ns.get_cum
        r = 0
        nid = self.meta.root
        while node.children:
            c = bisect_right(node.keys, x)
            if c:
                r += cum(base | nid, node)[c - 1]
            nid = node.children[c]
            node = get(base | nid)
        return r + bisect_left(node.keys, x)

    def select(self, k: int) -> tuple[bytes, Sum]:
        """The k-th item (0-based). Caller ensures 0 <= k < count. O(B log n)."""
        get = self.ns.get_node
        base = self.base
        cum = self.ns.get_cum
        nid = self.meta.root
        node = get(base | nid)
        while node.children:
            acc = cum(base | nid, node)
            c = bisect_right(acc, k)
            if c:
                k -= acc[c - 1]
            nid = node.children[c]
            node = get(base | nid)
        return node.keys[k], node.sums[k]

    def range_sum(self, lo: bytes | None, hi: bytes | None) -> Sum:
        """Sum of items in [lo, hi), added from whole children where possible."""
        if self.meta.decimal:
            with exact():
                return self._range_sum(self.meta.root, lo, hi)
        return self._range_sum(self.meta.root, lo, hi)

    def _range_sum(self, ref: int, lo: bytes | None, hi: bytes | None) -> Sum:
        node = self.ns.get_node(self.base | ref)
        if not node.children:
            i = 0 if lo is None else bisect_left(node.keys, lo)
            j = len(node.keys) if hi is None else bisect_left(node.keys, hi)
            return sum(node.sums[i:j]) if i < j else 0
        i = 0 if lo is None else bisect_right(node.keys, lo)
        j = len(node.keys) if hi is None else bisect_left(node.keys, hi)
        if i == j:
            return self._range_sum(node.children[i], lo, hi)
        if i > j:
            return 0
        # Any: a tree never mixes float and Decimal (see the notes), which mypy cannot see.
        left: Any = self._range_sum(node.children[i], lo, None) if lo is not None else node.sums[i]
        right: Any = self._range_sum(node.children[j], None, hi) if hi is not None else node.sums[j]
        return cast(Sum, left + sum(node.sums[i + 1 : j]) + right)

    def items(
        self, lo: bytes | None, hi: bytes | None, reverse: bool = False
    ) -> Iterator[tuple[bytes, Sum]]:
        """Items with lo <= key < hi, in order. Lazy; O(log n + k)."""
        return self._walk(self.meta.root, lo, hi, reverse)

    def _walk(
        self, ref: int, lo: bytes | None, hi: bytes | None, reverse: bool
    ) -> Iterator[tuple[bytes, Sum]]:
        node = self.ns.get_node(self.base | ref)
        keys = node.keys
        if not node.children:
            i = 0 if lo is None else bisect_left(keys, lo)
            j = len(keys) if hi is None else bisect_left(keys, hi)
            sums = node.sums
            rng = range(j - 1, i - 1, -1) if reverse else range(i, j)
            for k in rng:
                yield keys[k], sums[k]
            return
        i = 0 if lo is None else bisect_right(keys, lo)
        j = len(keys) if hi is None else bisect_left(keys, hi)
        children = node.children
        rng = range(j, i - 1, -1) if reverse else range(i, j + 1)
        for c in rng:
            yield from self._walk(
                children[c], lo if c == i else None, hi if c == j else None, reverse
            )

    def random_in(
        self, lo: bytes | None, hi: bytes | None, rng: _random.Random
    ) -> tuple[bytes, Sum] | None:
        a = self.rank(lo) if lo is not None else 0
        b = self.rank(hi)
        if b <= a:
            return None
        return self.select(rng.randrange(a, b))

    # ---- writes --------------------------------------------------------------

    def _descend(self, key: bytes) -> tuple[list[tuple[int, Node, int]], int, Node]:
        """The path (node id, node, child index) from the root to the leaf for ``key``."""
        get = self.ns.get_node
        base = self.base
        path: list[tuple[int, Node, int]] = []
        ref = self.meta.root
        node = get(base | ref)
        while node.children:
            c = bisect_right(node.keys, key)
            path.append((ref, node, c))
            ref = node.children[c]
            node = get(base | ref)
        return path, ref, node

    def insert(self, key: bytes, value: Sum) -> None:
        """Insert a key that is not present. O(B log n).

        `InvalidArgument` (before any change) for a float into a tree holding Decimals or
        the reverse; callers that must not fail midway check `sum_conflict` first."""
        meta = self.meta
        if (meta.decimal or type(value) is Decimal) and type(value) is not int:
            self.admit(type(value))  # a float into a Decimal tree, or a Decimal into any
        path, ref, node = self._descend(key)
        pos = bisect_left(node.keys, key)
        if pos < len(node.keys) and node.keys[pos] == key:
            raise StoreCorrupted(
                f"tree already holds item key {key!r}: the id index is out of step"
            )
        node.keys.insert(pos, key)
        node.sums.insert(pos, value)
        self.ns.put_node(self.base | ref, node)
        if meta.decimal:
            with exact():
                self._fix_up(path, ref, node, 1, value)
        else:
            self._fix_up(path, ref, node, 1, value)

    def delete(self, key: bytes) -> Sum:
        """Delete a present key; return its sum value. O(B log n)."""
        path, ref, node = self._descend(key)
        pos = bisect_left(node.keys, key)
        if pos >= len(node.keys) or node.keys[pos] != key:
            raise StoreCorrupted(f"tree lacks item key {key!r}: the id index is out of step")
        del node.keys[pos]
        value = node.sums.pop(pos)
        self.ns.put_node(self.base | ref, node)
        if self.meta.decimal:
            with exact():
                self._fix_up(path, ref, node, -1, -value)  # exact here
        else:
            self._fix_up(path, ref, node, -1, -value)
        return value

    def _fix_up(
        self, path: list[tuple[int, Node, int]], ref: int, node: Node, delta: int, dsum: Sum
    ) -> None:
        """Walk from a changed node to the root: counts, sums, splits, merges.

        ``dsum`` is the change of the subtree's sum: int sums are adjusted
        exactly; anything involving a float or a Decimal is recomputed from the
        children (so a subtree's sum has the type of what it holds).
        """
        exact = type(dsum) is int
        ns = self.ns
        ml = self.meta.max_node_size
        mi = internal_max(ml)
        for pref, parent, c in reversed(path):
            if node.children:
                size, m = len(node.children), mi
            else:
                size, m = len(node.keys), ml
            if size > m:
                self._split(parent, c, ref, node)
            elif size < m // 2:
                self._rebalance(parent, c, node)
            else:
                parent.counts[c] += delta
                if exact and type(parent.sums[c]) is int:
                    parent.sums[c] += dsum  # type: ignore[operator]  # both ints here
                else:
                    parent.sums[c] = _sum(node)
            ns.put_node(self.base | pref, parent)
            ref, node = pref, parent
        # root
        if node.children:
            size, m = len(node.children), mi
            if size == 1:
                ns.free_node(self.base | ref)
                self.meta.root = node.children[0]
                self.meta.height -= 1
                return
        else:
            size, m = len(node.keys), ml
        if size > m:
            new_root = Node([], [_sum(node)], [ref], [_count(node)])
            self._split(new_root, 0, ref, node)
            self.meta.root = self.new_node(new_root)
            self.meta.height += 1

    def _split(self, parent: Node, c: int, ref: int, node: Node) -> None:
        """Split an overfull child ``c`` of ``parent`` into two halves."""
        ns = self.ns
        if node.children:
            h = len(node.children) // 2
            right = Node(node.keys[h:], node.sums[h:], node.children[h:], node.counts[h:])
            sep = node.keys[h - 1]
            del node.keys[h - 1 :]
            del node.sums[h:], node.children[h:], node.counts[h:]
        else:
            h = len(node.keys) // 2
            right = Node(node.keys[h:], node.sums[h:])
            sep = _separator(node.keys[h - 1], right.keys[0])
            del node.keys[h:], node.sums[h:]
        rref = self.new_node(right)
        ns.put_node(self.base | ref, node)
        parent.keys.insert(c, sep)
        parent.children.insert(c + 1, rref)
        parent.counts[c] = _count(node)
        parent.sums[c] = _sum(node)
        parent.counts.insert(c + 1, _count(right))
        parent.sums.insert(c + 1, _sum(right))

    def _rebalance(self, parent: Node, c: int, node: Node) -> None:
        """Fix an underfull child ``c``: borrow from a sibling, else merge."""
        ns = self.ns
        base = self.base
        get = ns.get_node
        children = parent.children
        internal = bool(node.children)
        m = self.meta.max_node_size
        lo_size = (internal_max(m) if internal else m) // 2
        if c > 0:
            lref = children[c - 1]
            left = get(base | lref)
            lsize = len(left.children) if internal else len(left.keys)
            if lsize > lo_size:
                if internal:
                    node.keys.insert(0, parent.keys[c - 1])
                    parent.keys[c - 1] = left.keys.pop()
                    node.children.insert(0, left.children.pop())
                    node.counts.insert(0, left.counts.pop())
                    node.sums.insert(0, left.sums.pop())
                else:
                    node.keys.insert(0, left.keys.pop())
                    node.sums.insert(0, left.sums.pop())
                    parent.keys[c - 1] = _separator(left.keys[-1], node.keys[0])
                ns.put_node(base | lref, left)
                ns.put_node(base | children[c], node)
                self._refresh(parent, c - 1, left)
                self._refresh(parent, c, node)
                return
        if c + 1 < len(children):
            rref = children[c + 1]
            right = get(base | rref)
            rsize = len(right.children) if internal else len(right.keys)
            if rsize > lo_size:
                if internal:
                    node.keys.append(parent.keys[c])
                    parent.keys[c] = right.keys.pop(0)
                    node.children.append(right.children.pop(0))
                    node.counts.append(right.counts.pop(0))
                    node.sums.append(right.sums.pop(0))
                else:
                    node.keys.append(right.keys.pop(0))
                    node.sums.append(right.sums.pop(0))
                    parent.keys[c] = _separator(node.keys[-1], right.keys[0])
                ns.put_node(base | rref, right)
                ns.put_node(base | children[c], node)
                self._refresh(parent, c, node)
                self._refresh(parent, c + 1, right)
                return
            # merge right into node
            self._merge(parent, c, node, right)
            return
        if c > 0:
            self._merge(parent, c - 1, get(base | children[c - 1]), node)
            return
        # Only child (the parent is the root with one child): just refresh.
        ns.put_node(base | children[c], node)
        self._refresh(parent, c, node)

    def _merge(self, parent: Node, c: int, left: Node, right: Node) -> None:
        """Merge child ``c + 1`` into child ``c``."""
        ns = self.ns
        sep = parent.keys.pop(c)
        rref = parent.children.pop(c + 1)
        parent.counts.pop(c + 1)
        parent.sums.pop(c + 1)
        if left.children:
            left.keys.append(sep)
            left.keys.extend(right.keys)
            left.children.extend(right.children)
            left.counts.extend(right.counts)
        else:
            left.keys.extend(right.keys)
        left.sums.extend(right.sums)
        ns.put_node(self.base | parent.children[c], left)
        ns.free_node(self.base | rref)
        self._refresh(parent, c, left)

    @staticmethod
    def _refresh(parent: Node, c: int, child: Node) -> None:
        parent.counts[c] = _count(child)
        parent.sums[c] = _sum(child)

    # ---- batch merge -----------------------------------------------------------

    def apply_sorted(self, changes: list[tuple[bytes, int, Sum]]) -> None:
        """Apply many changes at once: ``(key, op, value)`` sorted by key, keys unique, op
        `INSERT` (absent key), `DELETE` (present key; value ignored) or `REPLACE` (present
        key, new value). O(k log n) but each touched node is visited and fixed up once, so a
        batch of k changes costs far less than k `insert`/`delete` calls.

        The caller admits the batch's sum types first (as `apply_many` does: no float and
        Decimal in one tree); a change the tree does not allow (an insert of a present key,
        a delete of an absent one) raises `StoreCorrupted` midway, like `insert`/`delete`.
        """
        if not changes:
            return
        for t in {type(v) for _, op, v in changes if op != DELETE} - {int}:
            if t is Decimal or self.meta.decimal:
                self.admit(t)
        if self.meta.decimal:
            with exact():
                self._apply_root(changes)
        else:
            self._apply_root(changes)

    def _apply_root(self, changes: list[tuple[bytes, int, Sum]]) -> None:
        meta = self.meta
        get = self.ns.get_node
        ref = meta.root
        node = get(self.base | ref)
        self._apply_node(ref, node, changes, 0, len(changes))
        mi = internal_max(meta.max_node_size)
        while True:
            if not node.children and not node.keys:
                node.sums.clear()  # everything is gone: the root is an empty leaf
                node.counts.clear()
                meta.height = 1
                return
            if node.children and len(node.children) == 1:
                self.ns.free_node(self.base | ref)
                ref = meta.root = node.children[0]
                meta.height -= 1
                node = get(self.base | ref)
                continue
            size = len(node.children) if node.children else len(node.keys)
            if size <= (mi if node.children else meta.max_node_size):
                return
            root = Node([], [_sum(node)], [ref], [_count(node)])
            self._regroup(root, 0, 1)
            ref = meta.root = self.new_node(root)
            meta.height += 1
            node = root

    def _apply_node(
        self, ref: int, node: Node, changes: list[tuple[bytes, int, Sum]], lo: int, hi: int
    ) -> None:
        """Apply ``changes[lo:hi]`` (all within this node's key range) below ``node``; its
        children come back within their size bounds, the node itself may not."""
        keys = node.keys
        if not node.children:
            sums = node.sums
            pos = 0
            for i in range(lo, hi):
                key, op, value = changes[i]
                pos = bisect_left(keys, key, pos)
                found = pos < len(keys) and keys[pos] == key
                if op == INSERT:
                    if found:
                        raise StoreCorrupted(
                            f"tree already holds item key {key!r}: the id index is out of step"
                        )
                    keys.insert(pos, key)
                    sums.insert(pos, value)
                    continue
                if not found:
                    raise StoreCorrupted(
                        f"tree lacks item key {key!r}: the id index is out of step"
                    )
                if op == DELETE:
                    del keys[pos], sums[pos]
                else:
                    sums[pos] = value
            self.ns.put_node(self.base | ref, node)
            return
        get = self.ns.get_node
        base = self.base
        touched: list[int] = []
        i = lo
        c = 0
        nk = len(keys)
        while i < hi:
            c = bisect_right(keys, changes[i][0], c)
            j = hi if c == nk else bisect_left(changes, keys[c], i, hi, key=_first)
            cref = node.children[c]
            self._apply_node(cref, get(base | cref), changes, i, j)
            touched.append(c)
            i = j
        for c in reversed(touched):
            self._normalize(node, c)
        self.ns.put_node(base | ref, node)

    def _normalize(self, parent: Node, c: int) -> None:
        """Bring child ``c`` back within its size bounds (split, or merge with a sibling)
        and refresh its count and sum in ``parent``."""
        get = self.ns.get_node
        base = self.base
        m = self.meta.max_node_size
        while True:
            if not parent.children:
                return  # every child emptied and gone
            c = min(c, len(parent.children) - 1)  # a merge to the left took this index
            child = get(base | parent.children[c])
            internal = bool(child.children)
            size = len(child.children) if internal else len(child.keys)
            mx = internal_max(m) if internal else m
            if size > mx:
                self._regroup(parent, c, 1)
                return
            if size >= mx // 2 or len(parent.children) == 1:
                parent.counts[c] = _count(child)
                parent.sums[c] = _sum(child)
                return
            # Underfull: merge with the right sibling (already within bounds), else the left.
            if c + 1 == len(parent.children):
                c -= 1
            self._regroup(parent, c, 2)
            # The merge may still be underfull (two underfull siblings), or empty and gone.

    def _regroup(self, parent: Node, c: int, k: int) -> None:
        """Replace children ``c .. c+k-1`` of ``parent`` by the same items cut into runs
        within the size bounds (one run when they fit one node), reusing their node ids."""
        ns = self.ns
        base = self.base
        refs = parent.children[c : c + k]
        nodes = [ns.get_node(base | r) for r in refs]
        internal = any(n.children for n in nodes)  # an emptied internal node has none
        m = self.meta.max_node_size
        keys: list[bytes] = []
        sums: list[Sum] = []
        children: list[int] = []
        counts: list[int] = []
        only: list[int] = []
        for i, n in enumerate(nodes):
            if internal:
                if children and n.children:
                    keys.append(parent.keys[c + i - 1])  # any separator between them holds
                if len(n.children) == 1:
                    only.append(len(children))
                children.extend(n.children)
                counts.extend(n.counts)
            keys.extend(n.keys)
            sums.extend(n.sums)
        if only and len(children) > 1:
            # An only child may be underfull (it had no sibling to merge with): now it has.
            tmp = Node(keys, sums, children, counts)
            for j in reversed(only):
                self._normalize(tmp, j)
        size = len(children) if internal else len(keys)
        runs = _chunks(size, internal_max(m) if internal else m)
        pieces: list[Node] = []
        seps: list[bytes] = []
        for a, b in runs:
            if internal:
                if a:
                    seps.append(keys[a - 1])
                pieces.append(Node(keys[a : b - 1], sums[a:b], children[a:b], counts[a:b]))
            else:
                if a:
                    seps.append(_separator(keys[a - 1], keys[a]))
                pieces.append(Node(keys[a:b], sums[a:b]))
        new_refs: list[int] = []
        for i, piece in enumerate(pieces):
            if i < len(refs):
                # Reuse the node objects in place: the node cache holds them by identity.
                n = nodes[i]
                n.keys, n.sums, n.children, n.counts = (
                    piece.keys,
                    piece.sums,
                    piece.children,
                    piece.counts,
                )
                ns.put_node(base | refs[i], n)
                new_refs.append(refs[i])
                pieces[i] = n
            else:
                new_refs.append(self.new_node(piece))
        for r in refs[len(pieces) :]:
            ns.free_node(base | r)
        if pieces:
            parent.keys[c : c + k - 1] = seps
        elif c:  # all of it is gone: so is a separator next to it
            del parent.keys[c - 1 : c + k - 1]
        else:
            del parent.keys[0:k]
        parent.children[c : c + k] = new_refs
        parent.counts[c : c + k] = [_count(p) for p in pieces]
        parent.sums[c : c + k] = [_sum(p) for p in pieces]

    # ---- bulk build ------------------------------------------------------------

    def build(self, entries: list[tuple[bytes, Sum]]) -> None:
        """Replace this (empty) tree by one built bottom-up from sorted, unique entries. O(n).

        Nodes are filled to 3/4 of the max size, so later inserts rarely split.
        `InvalidArgument` (before any change) if the entries mix float and Decimal sums.
        """
        kinds = set(map(type, map(itemgetter(1), entries)))
        if Decimal in kinds and float in kinds:
            raise InvalidArgument(mixed_sums(float, Decimal))
        self.meta.decimal = Decimal in kinds
        if self.meta.decimal:
            with exact():
                self._build(entries)
        else:
            self._build(entries)

    def _build(self, entries: list[tuple[bytes, Sum]]) -> None:
        ns = self.ns
        m = self.meta.max_node_size
        old_root = self.meta.root
        # level: (first key, last key, local id, count, sum) per node
        level: list[tuple[bytes, bytes, int, int, Sum]] = []
        for lo, hi in _chunks(len(entries), m):
            part = entries[lo:hi]
            keys = [k for k, _ in part]
            sums = [v for _, v in part]
            nid = self.new_node(Node(keys, sums))
            level.append((keys[0], keys[-1], nid, len(keys), sum(sums)))
        height = 1
        while len(level) > 1:
            up: list[tuple[bytes, bytes, int, int, Sum]] = []
            for lo, hi in _chunks(len(level), internal_max(m)):
                run = level[lo:hi]
                seps = [_separator(run[i][1], run[i + 1][0]) for i in range(len(run) - 1)]
                node = Node(seps, [r[4] for r in run], [r[2] for r in run], [r[3] for r in run])
                up.append(
                    (run[0][0], run[-1][1], self.new_node(node), sum(node.counts), sum(node.sums))
                )
            level = up
            height += 1
        if level:
            ns.free_node(self.base | old_root)
            self.meta.root = level[0][2]
            self.meta.height = height

    # ---- checks --------------------------------------------------------------

    def validate(self) -> int:
        """Assert every invariant; return the item count. O(n)."""
        if self.meta.decimal:
            with exact():
                return self._validate()
        return self._validate()

    def _validate(self) -> int:
        m = self.meta.max_node_size
        depths: set[int] = set()

        def check(
            ref: int, lo: bytes | None, hi: bytes | None, depth: int, is_root: bool
        ) -> tuple[int, Sum]:
            node = self.ns.get_node(self.base | ref)
            where = f"node {ref} of tree {self.meta.tid} (depth {depth})"
            if node.children:
                n = len(node.children)
                if len(node.keys) != n - 1 or len(node.counts) != n or len(node.sums) != n:
                    raise StoreCorrupted(
                        f"{where}: {n} children but {len(node.keys)} separators, {len(node.counts)} counts, {len(node.sums)} sums"
                    )
                mi = internal_max(m)
                if n > mi or (n < mi // 2 and not is_root) or (is_root and n < 2):
                    raise StoreCorrupted(f"{where}: {n} children outside [{mi // 2}, {mi}]")
                if any(a >= b for a, b in zip(node.keys, node.keys[1:], strict=False)):
                    raise StoreCorrupted(f"{where}: separators out of order")
                total_c = 0
                total_s: Any = 0  # one of int/float/Decimal trees: never float + Decimal
                for i, child in enumerate(node.children):
                    clo = lo if i == 0 else node.keys[i - 1]
                    chi = hi if i == n - 1 else node.keys[i]
                    cc, cs = check(child, clo, chi, depth + 1, False)
                    if cc != node.counts[i]:
                        raise StoreCorrupted(
                            f"{where}: child {i} holds {cc} items but the count says {node.counts[i]}"
                        )
                    if not _same_sum(cs, node.sums[i]):
                        raise StoreCorrupted(
                            f"{where}: child {i} sums to {cs} but the sum says {node.sums[i]}"
                        )
                    total_c += cc
                    total_s += node.sums[i]
                return total_c, total_s
            depths.add(depth)
            n = len(node.keys)
            if len(node.sums) != n or node.counts:
                raise StoreCorrupted(
                    f"{where}: leaf with {n} keys, {len(node.sums)} sums, {len(node.counts)} counts"
                )
            if n > m or (n < m // 2 and not is_root):
                raise StoreCorrupted(f"{where}: leaf with {n} items outside [{m // 2}, {m}]")
            if any(a >= b for a, b in zip(node.keys, node.keys[1:], strict=False)):
                raise StoreCorrupted(f"{where}: leaf keys out of order")
            if n and (
                (lo is not None and node.keys[0] < lo) or (hi is not None and node.keys[-1] >= hi)
            ):
                raise StoreCorrupted(f"{where}: leaf keys outside the separators around it")
            return n, sum(node.sums)

        count, _ = check(self.meta.root, None, None, 1, True)
        if self.holds(Decimal) and (not self.meta.decimal or self.holds(float)):
            raise StoreCorrupted(
                f"tree {self.meta.tid} holds Decimal sums but its meta says decimal="
                f"{self.meta.decimal}, or it also holds floats"
            )
        if len(depths) > 1:
            raise StoreCorrupted(f"leaves at different depths {sorted(depths)}")
        if depths and depths != {self.meta.height}:
            raise StoreCorrupted(
                f"tree height says {self.meta.height} but leaves are at depth {depths}"
            )
        return count


def _chunks(n: int, m: int) -> list[tuple[int, int]]:
    """Split n items into runs of about 3/4 * m, each within [m // 2, m] (one run if n <= m)."""
    if n <= m:
        return [(0, n)] if n else []
    fill = max(m // 2, (3 * m) // 4)
    k = -(-n // fill)  # runs
    base, extra = divmod(n, k)
    out = []
    lo = 0
    for i in range(k):
        hi = lo + base + (1 if i < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def _separator(left: bytes, right: bytes) -> bytes:
    """The shortest s with left < s <= right: keeps internal nodes small."""
    n = min(len(left), len(right))
    i = 0
    while i < n and left[i] == right[i]:
        i += 1
    return right[: i + 1]


def _same_sum(a: Sum, b: Sum) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, Decimal) or isinstance(b, Decimal):  # exact, one type (see the notes)
        return type(a) is type(b) and a == b
    return abs(a - b) <= 1e-9 * max(1.0, abs(a), abs(b))
