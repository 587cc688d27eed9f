"""Stateful model test: a real Store (tiny nodes) against a simple oracle.

The oracle is a `SortedList` of ``(encode_key(key), encode_key(id))`` per
namespace plus a dict ``id -> (namespace, key, sum)``. Every step runs
``validate()`` and compares the whole content; read rules compare every read
(count, sum, at, index_of, min, max, random, paginate, iter, *_batch) under
random bounds with the oracle.

``TALLY_STRESS=1`` (or a larger integer) multiplies the number of examples and
steps for a long run.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, cast

import budget
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from sortedcontainers import SortedList

from tally.engine import (
    Bound,
    Bounds,
    Item,
    ItemExists,
    ItemNotFound,
    OffsetOutOfRange,
    Order,
    Query,
    Store,
    decode_key,
    encode_key,
)

# ---------------------------------------------------------------------------
# Value pools: few keys (many ties), more ids, three namespaces.

KEYS: list[Any] = [
    None,
    -1,
    0,
    1,
    1.5,
    2,
    3.25,
    True,
    "",
    "a",
    "b",
    b"x",
    (1,),
    (1, "x"),
    (1, "y"),
    (2, "x"),
    ("a", 1),
]
# Same keys as some of KEYS, spelled differently (1.0 is the key 1; lists are tuples).
KEY_ALIASES: list[Any] = [1.0, 2.0, -0.0, [1, "x"], (1.0,), [2.0, "x"]]
BOUND_KEYS: list[Any] = [
    *KEYS,
    *KEY_ALIASES,
    0.5,
    1.2,
    "aa",
    (1, "x", 0),
    (0,),
    (),
    -math.inf,
    math.inf,
    2**70,
    b"zz",
    False,
]
IDS: list[Any] = [*range(40), "s1", "s2", "s3", (1, 2), (1, 3), 2.5, -7, b"\x00b", False]
ID_ALIASES: list[Any] = [7.0, 8.0, (1.0, 2)]
NAMESPACES: list[Any] = [None, "ns1", 2]
NS_ALIASES: list[Any] = [2.0]
SUMS: list[Any] = [0, 1, 2, 5, -3, 10, 2**53 + 1, -(2**60), 0.5, 0.1, -2.25, 1e10 + 0.3]
PREFIXES: list[Any] = [(), (1,), (1.0,), [1], ("a",), (1, "x"), (2,), (9,), (1, "x", 0)]

keys = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEY_ALIASES))
ids = st.one_of(st.sampled_from(IDS), st.sampled_from(IDS), st.sampled_from(ID_ALIASES))
namespaces = st.one_of(st.sampled_from(NAMESPACES), st.sampled_from(NS_ALIASES))
sums = st.sampled_from(SUMS)
bound_ids = st.one_of(st.none(), st.sampled_from([*IDS, *ID_ALIASES, -100, "zzz", 1000]))

E = encode_key
Pred = Callable[[bytes, bytes], bool]


# ---------------------------------------------------------------------------
# Oracle


class Oracle:
    """id -> (ns, key, sum) and, per namespace, a SortedList of (key, id), all encoded."""

    def __init__(self) -> None:
        self.by_id: dict[bytes, tuple[bytes, bytes, int | float]] = {}
        self.trees: dict[bytes, SortedList] = {}

    def copy(self) -> Oracle:
        o = Oracle()
        o.by_id = dict(self.by_id)
        o.trees = {ns: SortedList(t) for ns, t in self.trees.items()}
        return o

    def put(self, eid: bytes, ens: bytes, ek: bytes, s: int | float) -> bool:
        old = self.by_id.get(eid)
        if old is not None:
            ons, ok, osum = old
            if ons == ens and ok == ek and type(osum) is type(s) and osum == s:
                return False
            self.trees[ons].remove((ok, eid))
            if not self.trees[ons]:
                del self.trees[ons]
        self.by_id[eid] = (ens, ek, s)
        self.trees.setdefault(ens, SortedList()).add((ek, eid))
        return True

    def remove(self, eid: bytes) -> bool:
        old = self.by_id.pop(eid, None)
        if old is None:
            return False
        ons, ok, _ = old
        self.trees[ons].remove((ok, eid))
        if not self.trees[ons]:
            del self.trees[ons]
        return True

    def clear_ns(self, ens: bytes) -> None:
        for _, eid in list(self.trees.pop(ens, ())):
            del self.by_id[eid]

    def clear_all(self) -> None:
        self.by_id.clear()
        self.trees.clear()

    def entries(
        self, ens: bytes, pred: Pred | None = None
    ) -> list[tuple[bytes, bytes, int | float]]:
        out = []
        for ek, eid in self.trees.get(ens, ()):
            if pred is None or pred(ek, eid):
                out.append((ek, eid, self.by_id[eid][2]))
        return out


def same_number(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def close_sum(got: Any, values: list[int | float]) -> bool:
    """Int sums exact (and int); float sums within a tolerance relative to the magnitudes."""
    if all(type(v) is int for v in values):
        return type(got) is int and got == sum(values)
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        return False
    expect = math.fsum(values)
    scale = math.fsum(abs(v) for v in values)
    return abs(got - expect) <= 1e-9 * scale + 1e-9


def canonical_type_ok(value: Any, enc: bytes) -> bool:
    """A key read back has the canonical type: the decoded form of its encoding."""
    canon = decode_key(enc)

    def same(a: Any, b: Any) -> bool:
        if type(a) is not type(b):
            return False
        if isinstance(a, tuple):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
        return cast(bool, a == b)  # same built-in type: == is a bool

    return same(value, canon)


def check_item(item: Any, expect: tuple[bytes, bytes, int | float], ens: bytes) -> None:
    assert isinstance(item, Item), item
    ek, eid, s = expect
    assert E(item.key) == ek, (item, decode_key(ek))
    assert E(item.id) == eid, (item, decode_key(eid))
    assert canonical_type_ok(item.key, ek), item
    assert canonical_type_ok(item.id, eid), item
    assert same_number(item.sum_value, s), (item, s)
    assert E(item.namespace) == ens, (item, decode_key(ens))


# ---------------------------------------------------------------------------
# Random bounds, each with the oracle predicate it means.


def _to_dict_bound(b: Bound, full: bool) -> dict[str, Any]:
    d: dict[str, Any] = {"key": b.key}
    if full or not b.inclusive:
        d["inclusive"] = b.inclusive
    if b.id is not None:
        d["id"] = b.id
    return d


def _lower_pred(b: Bound) -> Pred:
    k = E(b.key)
    if b.id is None:
        if b.inclusive:
            return lambda ek, eid: ek >= k
        return lambda ek, eid: ek > k
    i = E(b.id)
    if b.inclusive:
        return lambda ek, eid: (ek, eid) >= (k, i)
    return lambda ek, eid: (ek, eid) > (k, i)


def _upper_pred(b: Bound) -> Pred:
    k = E(b.key)
    if b.id is None:
        if b.inclusive:
            return lambda ek, eid: ek <= k
        return lambda ek, eid: ek < k
    i = E(b.id)
    if b.inclusive:
        return lambda ek, eid: (ek, eid) <= (k, i)
    return lambda ek, eid: (ek, eid) < (k, i)


def _prefix_pred(prefix: Any) -> Pred:
    p = [E(x) for x in prefix]

    def pred(ek: bytes, eid: bytes) -> bool:
        key = decode_key(ek)
        return (
            isinstance(key, tuple)
            and len(key) >= len(p)
            and all(E(key[i]) == p[i] for i in range(len(p)))
        )

    return pred


@st.composite
def bound_st(draw: st.DrawFn) -> Bound:
    return Bound(draw(st.sampled_from(BOUND_KEYS)), draw(st.booleans()), draw(bound_ids))


@st.composite
def bounds_st(draw: st.DrawFn) -> tuple[Any, Pred | None, str]:
    """(bounds argument, predicate on (encoded key, encoded id), description)."""
    kind = draw(st.sampled_from(["none", "lower", "upper", "both", "both", "eq", "prefix"]))
    as_dict = draw(st.booleans())
    if kind == "none":
        return None, None, "none"
    if kind == "eq":
        k = draw(st.sampled_from(BOUND_KEYS))
        ek = E(k)
        arg = {"eq": k} if as_dict else Bounds(eq=k)
        return arg, (lambda key, eid: key == ek), f"eq={k!r}"
    if kind == "prefix":
        p = draw(st.sampled_from(PREFIXES))
        arg = {"prefix": p} if as_dict else Bounds(prefix=tuple(p))
        return arg, _prefix_pred(p), f"prefix={p!r}"
    lower = draw(bound_st()) if kind in ("lower", "both") else None
    upper = draw(bound_st()) if kind in ("upper", "both") else None
    preds = [f(b) for f, b in ((_lower_pred, lower), (_upper_pred, upper)) if b is not None]

    def pred(ek: bytes, eid: bytes) -> bool:
        return all(p(ek, eid) for p in preds)

    if as_dict:
        full = draw(st.booleans())
        spec: dict[str, Any] = {}
        if lower is not None:
            spec["lower"] = _to_dict_bound(lower, full)
        if upper is not None:
            spec["upper"] = _to_dict_bound(upper, full)
        arg = spec
    else:
        arg = Bounds(lower=lower, upper=upper)
    return arg, pred, f"lower={lower!r} upper={upper!r}"


# ---------------------------------------------------------------------------
# Writes as data, so they can be applied to the oracle and to the store alike.

write_op = st.one_of(
    st.tuples(st.just("insert"), keys, ids, sums, namespaces),
    st.tuples(st.just("replace"), keys, ids, sums, namespaces),
    st.tuples(st.just("upsert"), keys, ids, sums, namespaces),
    st.tuples(st.just("upsert"), keys, ids, sums, namespaces),
    st.tuples(st.just("delete"), ids),
    st.tuples(st.just("delete_if_exists"), ids),
    st.tuples(st.just("delete_if_exists"), ids),
)


def bulk_id(i: int) -> Any:
    """The i-th id of bulk writes: the pool first, then ints from 1000 + len(IDS) on."""
    return IDS[i] if i < len(IDS) else 1000 + i


class Boom(Exception):
    """Raised inside a batch to abort it."""


def apply_to_oracle(o: Oracle, op: tuple[Any, ...]) -> tuple[type[Exception] | None, Any]:
    """Apply one write to the oracle; return (expected error, expected return value)."""
    kind = op[0]
    if kind in ("insert", "replace", "upsert"):
        _, key, id_, s, ns = op
        eid = E(id_)
        present = eid in o.by_id
        if kind == "insert" and present:
            return ItemExists, None
        if kind == "replace" and not present:
            return ItemNotFound, None
        changed = o.put(eid, E(ns), E(key), s)
        return None, (changed if kind == "upsert" else None)
    _, id_ = op
    eid = E(id_)
    if kind == "delete" and eid not in o.by_id:
        return ItemNotFound, None
    removed = o.remove(eid)
    return None, (removed if kind == "delete_if_exists" else None)


def apply_to_store(agg: Any, op: tuple[Any, ...], alias: int = 0) -> Any:
    kind = op[0]
    if kind == "insert":
        _, key, id_, s, ns = op
        return agg.insert(key, id_, s, ns)
    if kind == "replace":
        _, key, id_, s, ns = op
        return agg.replace(id_, key, sum_value=s, namespace=ns)
    if kind == "upsert":
        _, key, id_, s, ns = op
        method = (agg.upsert, agg.insert_if_does_not_exist, agg.replace_or_insert)[alias % 3]
        return method(key, id_, s, namespace=ns)
    if kind == "delete":
        return agg.delete(op[1])
    if kind == "delete_if_exists":
        return agg.delete_if_exists(op[1])
    raise AssertionError(kind)


def run_op(agg: Any, o: Oracle, op: tuple[Any, ...], alias: int = 0) -> None:
    """Apply to both; the store must raise exactly when the oracle says so."""
    err, ret = apply_to_oracle(o, op)
    if err is not None:
        with pytest.raises(err):
            apply_to_store(agg, op, alias)
    else:
        got = apply_to_store(agg, op, alias)
        assert got == ret, (op, got, ret)


# ---------------------------------------------------------------------------
# The machine


class EngineModel(RuleBasedStateMachine):
    max_node_size = 4

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="tally-model-")
        self.path = os.path.join(self.dir, "store")
        self.store: Store | None = None
        self.oracle = Oracle()
        self.other: dict[bytes, tuple[Any, Any]] = {}  # second aggregate: id -> (key, sum)
        self.meta: bytes | None = None
        self.batches = 0
        self.cache_nodes: int | None = None

    # -- lifecycle --

    @initialize(
        cache_nodes=st.sampled_from([16, 16, 64, None]),
        prefill=st.integers(0, 150),
        seed=st.integers(0, 2**32),
    )
    def open_store(self, cache_nodes: int | None, prefill: int, seed: int) -> None:
        """Open the store, maybe with many items already, so the trees start several levels deep."""
        self.cache_nodes = cache_nodes
        self._open()
        assert self.store is not None
        rng = random.Random(seed)
        with self.store.batch():
            for i in range(prefill):
                key = rng.choice(KEYS)
                op = ("upsert", key, bulk_id(i), rng.choice(SUMS), rng.choice(NAMESPACES))
                run_op(self.agg, self.oracle, op)

    def _open(self) -> None:
        self.store = Store.open(
            self.path, max_node_size=self.max_node_size, cache_nodes=self.cache_nodes
        )
        self.agg = self.store.aggregate("agg")
        self.agg2 = self.store.aggregate("other")

    def teardown(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule()
    def reopen(self) -> None:
        assert self.store is not None
        self.store.close()
        self._open()

    # -- single writes --

    @rule(key=keys, id_=ids, s=sums, ns=namespaces)
    def insert(self, key: Any, id_: Any, s: Any, ns: Any) -> None:
        run_op(self.agg, self.oracle, ("insert", key, id_, s, ns))

    @rule(id_=ids)
    def delete(self, id_: Any) -> None:
        run_op(self.agg, self.oracle, ("delete", id_))

    @rule(key=keys, id_=ids, s=sums, ns=namespaces)
    def replace(self, key: Any, id_: Any, s: Any, ns: Any) -> None:
        run_op(self.agg, self.oracle, ("replace", key, id_, s, ns))

    @rule(key=keys, id_=ids, s=sums, ns=namespaces, alias=st.integers(0, 2))
    def upsert(self, key: Any, id_: Any, s: Any, ns: Any, alias: int) -> None:
        run_op(self.agg, self.oracle, ("upsert", key, id_, s, ns), alias)

    @rule(data=st.data())
    def upsert_existing_unchanged(self, data: st.DataObject) -> None:
        """Upserting an item exactly as stored (maybe spelled differently) is a no-op."""
        if not self.oracle.by_id:
            return
        eid = data.draw(st.sampled_from(sorted(self.oracle.by_id)))
        ens, ek, s = self.oracle.by_id[eid]
        key = decode_key(ek)
        if isinstance(key, tuple) and data.draw(st.booleans()):
            key = list(key)
        assert self.agg.upsert(key, decode_key(eid), s, namespace=decode_key(ens)) is False

    @rule(data=st.data())
    def move_existing(self, data: st.DataObject) -> None:
        """Move an existing id to another namespace (and maybe key)."""
        if not self.oracle.by_id:
            return
        eid = data.draw(st.sampled_from(sorted(self.oracle.by_id)))
        ens, ek, s = self.oracle.by_id[eid]
        others = [ns for ns in NAMESPACES if E(ns) != ens]
        ns = data.draw(st.sampled_from(others))
        key = data.draw(st.one_of(st.just(decode_key(ek)), keys))
        op = ("replace" if data.draw(st.booleans()) else "upsert", key, decode_key(eid), s, ns)
        run_op(self.agg, self.oracle, op)

    @rule(id_=ids)
    def delete_if_exists(self, id_: Any) -> None:
        run_op(self.agg, self.oracle, ("delete_if_exists", id_))

    # -- batches --

    @rule(
        ops=st.lists(st.tuples(write_op, st.integers(0, 2)), max_size=20),
        raise_at=st.one_of(st.none(), st.none(), st.integers(0, 20)),
        check_inside=st.booleans(),
    )
    def batch(self, ops: list[Any], raise_at: int | None, check_inside: bool) -> None:
        assert self.store is not None
        scratch = self.oracle.copy()
        tag = f"b{self.batches}".encode()
        self.batches += 1
        aborted = False
        try:
            with self.store.batch() as b:
                b.put_meta(b"last", tag)
                for i, (op, alias) in enumerate(ops):
                    if raise_at is not None and i == raise_at:
                        raise Boom
                    run_op(self.agg, scratch, op, alias)
                if raise_at is not None and raise_at >= len(ops):
                    raise Boom
                if check_inside:
                    # Reads inside a batch see the batch's own writes.
                    assert self.store.get_meta(b"last") == tag
                    for ens in {E(ns) for ns in NAMESPACES}:
                        ns = decode_key(ens)
                        assert self.agg.count(namespace=ns) == len(scratch.entries(ens))
        except Boom:
            aborted = True
        if not aborted:
            self.oracle = scratch
            self.meta = tag
        assert self.store.get_meta(b"last") == self.meta

    @rule(
        id_lo=st.integers(0, 150),
        n=st.integers(5, 60),
        key_choices=st.lists(keys, min_size=1, max_size=4),
        ns=namespaces,
        s=sums,
        delete=st.booleans(),
    )
    def bulk(
        self, id_lo: int, n: int, key_choices: list[Any], ns: Any, s: Any, delete: bool
    ) -> None:
        """Many writes in one batch, to grow/shrink the trees by several levels."""
        assert self.store is not None
        with self.store.batch():
            for j, i in enumerate(range(id_lo, id_lo + n)):
                id_ = bulk_id(i)
                if delete:
                    run_op(self.agg, self.oracle, ("delete_if_exists", id_))
                else:
                    op = ("upsert", key_choices[j % len(key_choices)], id_, s, ns)
                    run_op(self.agg, self.oracle, op)

    # -- maintenance --

    @precondition(lambda self: self.oracle.by_id)
    @rule(ns=namespaces, size=st.sampled_from([None, None, 4, 5, 8]))
    def clear(self, ns: Any, size: int | None) -> None:
        if size is None:
            self.agg.clear(ns)
        else:
            self.agg.clear(namespace=ns, max_node_size=size)
        self.oracle.clear_ns(E(ns))

    @precondition(lambda self: self.oracle.by_id)
    @rule(ns=namespaces)
    def drop_namespace(self, ns: Any) -> None:
        self.agg.drop_namespace(ns)
        self.oracle.clear_ns(E(ns))

    @precondition(lambda self: len(self.oracle.by_id) > 30)
    @rule()
    def clear_all(self) -> None:
        self.agg.clear_all()
        self.oracle.clear_all()

    # -- a second aggregate in the same store must stay independent --

    @rule(key=keys, id_=st.sampled_from(IDS[:10]), s=st.integers(-5, 5), delete=st.booleans())
    def write_other(self, key: Any, id_: Any, s: int, delete: bool) -> None:
        if delete:
            assert self.agg2.delete_if_exists(id_) == (E(id_) in self.other)
            self.other.pop(E(id_), None)
        else:
            self.agg2.upsert(key, id_, s)
            self.other[E(id_)] = (E(key), s)

    # -- invariants: structure and full content after every step --

    @invariant()
    def structure_and_content(self) -> None:
        if self.store is None:
            return
        agg, o = self.agg, self.oracle
        agg.validate()
        self.agg2.validate()
        expect_ns = sorted(o.trees)
        assert [E(ns) for ns in agg.namespaces()] == expect_ns
        for ens in {E(ns) for ns in NAMESPACES} | set(o.trees):
            ns = decode_key(ens)
            expect = o.entries(ens)
            got = list(agg.iter(namespace=ns))
            assert len(got) == len(expect)
            for item, e in zip(got, expect, strict=True):
                check_item(item, e, ens)
            assert agg.count(namespace=ns) == len(expect)
            assert close_sum(agg.sum(namespace=ns), [e[2] for e in expect])
        for id_ in [*IDS, *range(1000 + len(IDS), 1000 + 210, 7)]:
            eid = E(id_)
            found = agg.get(id_)
            if eid in o.by_id:
                ens, ek, s = o.by_id[eid]
                assert found is not None, id_
                assert E(found.key) == ek and E(found.id) == eid and same_number(found.sum_value, s)
                assert E(found.namespace) == ens
            else:
                assert found is None, (id_, found)
        other = sorted((ek, eid, s) for eid, (ek, s) in self.other.items())
        got2 = [(E(i.key), E(i.id), i.sum_value) for i in self.agg2.iter()]
        assert got2 == other
        assert self.store.get_meta(b"last") == self.meta

    # -- reads under random bounds --

    def _range(
        self, ns: Any, pred: Pred | None
    ) -> tuple[bytes, list[tuple[bytes, bytes, int | float]]]:
        ens = E(ns)
        return ens, self.oracle.entries(ens, pred)

    @rule(ns=namespaces, b=bounds_st(), data=st.data())
    def read_count_sum_at(self, ns: Any, b: Any, data: st.DataObject) -> None:
        bounds, pred, _ = b
        ens, expect = self._range(ns, pred)
        n = len(expect)
        assert self.agg.count(namespace=ns, bounds=bounds) == n
        assert close_sum(self.agg.sum(namespace=ns, bounds=bounds), [e[2] for e in expect])
        offsets = data.draw(st.lists(st.integers(-n - 2, n + 2), min_size=1, max_size=6))
        for off in offsets:
            if -n <= off < n:
                check_item(self.agg.at(off, namespace=ns, bounds=bounds), expect[off], ens)
            else:
                with pytest.raises(OffsetOutOfRange, match=rf"\b{n}\b"):
                    self.agg.at(off, namespace=ns, bounds=bounds)
        mn, mx = (
            self.agg.min(namespace=ns, bounds=bounds),
            self.agg.max(namespace=ns, bounds=bounds),
        )
        if n == 0:
            assert mn is None and mx is None
            assert self.agg.random(namespace=ns, bounds=bounds) is None
        else:
            check_item(mn, expect[0], ens)
            check_item(mx, expect[-1], ens)
            for _ in range(3):
                r = self.agg.random(namespace=ns, bounds=bounds)
                assert r is not None
                found = [e for e in expect if e[0] == E(r.key) and e[1] == E(r.id)]
                assert len(found) == 1, r
                check_item(r, found[0], ens)

    @rule(
        ns=namespaces,
        b=bounds_st(),
        key=st.sampled_from(BOUND_KEYS),
        id_=bound_ids,
        order=st.sampled_from(["asc", "desc"]),
    )
    def read_index_of(self, ns: Any, b: Any, key: Any, id_: Any, order: Order) -> None:
        bounds, pred, _ = b
        _, expect = self._range(ns, pred)
        ek = E(key)
        if id_ is None:
            if order == "asc":
                n = sum(1 for e in expect if e[0] < ek)
            else:
                n = sum(1 for e in expect if e[0] > ek)
        else:
            x = (ek, E(id_))
            if order == "asc":
                n = sum(1 for e in expect if (e[0], e[1]) < x)
            else:
                n = sum(1 for e in expect if (e[0], e[1]) > x)
        got = self.agg.index_of(key, id_, order=order, namespace=ns, bounds=bounds)
        assert got == n, (key, id_, order, b[2], got, n)

    @rule(
        ns=namespaces,
        b=bounds_st(),
        sizes=st.lists(st.integers(1, 7), min_size=1, max_size=4),
        order=st.sampled_from(["asc", "desc"]),
    )
    def read_paginate_and_iter(self, ns: Any, b: Any, sizes: list[int], order: Order) -> None:
        bounds, pred, _ = b
        ens, expect = self._range(ns, pred)
        if order == "desc":
            expect = expect[::-1]
        got: list[Item] = []
        cursor = None
        pages = 0
        while True:
            size = sizes[pages % len(sizes)]
            page = self.agg.paginate(cursor, size, order=order, namespace=ns, bounds=bounds)
            pages += 1
            remaining = len(expect) - len(got)
            assert len(page.items) == min(size, remaining), (size, remaining, page)
            got.extend(page.items)
            assert page.is_done == (len(got) == len(expect)), (page, len(got), len(expect))
            if page.is_done:
                break
            assert isinstance(page.cursor, str)
            cursor = page.cursor
            assert pages <= len(expect) + 1
        assert len(got) == len(expect)
        for item, e in zip(got, expect, strict=True):
            check_item(item, e, ens)
        if page.cursor is not None:
            again = self.agg.paginate(
                page.cursor, sizes[0], order=order, namespace=ns, bounds=bounds
            )
            assert again.items == [] and again.is_done
        items = list(self.agg.iter(namespace=ns, bounds=bounds, order=order))
        assert len(items) == len(expect)
        for item, e in zip(items, expect, strict=True):
            check_item(item, e, ens)

    @rule(
        qs=st.lists(st.tuples(namespaces, bounds_st(), st.booleans()), min_size=1, max_size=5),
        data=st.data(),
    )
    def read_batches(self, qs: list[Any], data: st.DataObject) -> None:
        queries: list[Any] = []
        expects = []
        for ns, (bounds, pred, _), as_dict in qs:
            ens, expect = self._range(ns, pred)
            expects.append((ens, expect))
            queries.append(
                {"namespace": ns, "bounds": bounds}
                if as_dict
                else Query(namespace=ns, bounds=bounds)
            )
        counts = self.agg.count_batch(queries)
        assert counts == [len(e) for _, e in expects]
        got_sums = self.agg.sum_batch(queries)
        assert len(got_sums) == len(expects)
        for s, (_, e) in zip(got_sums, expects, strict=True):
            assert close_sum(s, [x[2] for x in e])
        at_queries: list[Any] = []
        at_expect = []
        for (ns, (bounds, _, _), as_dict), (ens, expect) in zip(qs, expects, strict=True):
            if not expect:
                continue
            off = data.draw(st.integers(-len(expect), len(expect) - 1))
            at_expect.append((expect[off], ens))
            if as_dict:
                at_queries.append({"namespace": ns, "bounds": bounds, "offset": off})
            else:
                at_queries.append(Query(namespace=ns, bounds=bounds, offset=off))
        got_items = self.agg.at_batch(at_queries)
        assert len(got_items) == len(at_expect)
        for item, (want, ens) in zip(got_items, at_expect, strict=True):
            check_item(item, want, ens)


# ---------------------------------------------------------------------------
# One machine per node size.


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=budget.examples(examples),
        stateful_step_count=budget.steps(steps),
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )


class Model4(EngineModel):
    max_node_size = 4


class Model6(EngineModel):
    max_node_size = 6


class Model8(EngineModel):
    max_node_size = 8


TestModelNode4 = Model4.TestCase
TestModelNode4.settings = _settings(50, 50)
TestModelNode6 = Model6.TestCase
TestModelNode6.settings = _settings(40, 50)
TestModelNode8 = Model8.TestCase
TestModelNode8.settings = _settings(40, 50)
