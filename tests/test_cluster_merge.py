"""The merge of members' partial answers (`tally.consumers.cluster.merge`) against one
aggregate holding everything.

Each example spreads items (mixed key types, ties, Decimal and float sums) over 1-4
"members", each a real `Aggregate` on its own real RocksDB `Store` (tiny nodes, so the trees
have depth), and puts all of them in one more aggregate, the oracle (the engine itself is
model-tested against a `SortedList` in test_engine_model.py). Every read of `MergedReads`
must equal the oracle's: the same items (compared by ``repr``, so 1 and 1.0 or
Decimal('1.10') and Decimal('1.1') differ), the same cursors, the same errors.
"""

from __future__ import annotations

import asyncio
import decimal
import inspect
import itertools
import math
import random
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.consumers.cluster import (
    BadMemberAnswer,
    Claim,
    CoverageError,
    Entry,
    LocalMember,
    MergedReads,
    StateMoved,
    check_coverage,
    merge_pages,
    pick_weighted,
)
from tally.engine import (
    Aggregate,
    InvalidArgument,
    OffsetOutOfRange,
    Query,
    Store,
    encode_key,
)
from tally.engine.btree import add_sums
from tally.engine.types import Order, decode_cursor
from tally.schemas.reads import READ_OPS

E = encode_key
MAX_MEMBERS = 4

KEYS: list[Any] = [
    None,
    -1,
    0,
    1,
    1.0,  # the key 1
    1.5,
    Decimal("1.5"),  # the key 1.5
    Decimal("1.25"),
    Decimal("0.1"),
    0.1,  # not Decimal("0.1"): a float is a binary fraction
    2**70,
    -math.inf,
    False,
    True,
    "",
    "a",
    "b",
    b"x",
    (1,),
    (1, "x"),
    (1, "y"),
    (2,),
    ("a", 1),
    date(2024, 1, 1),
]
BOUND_KEYS: list[Any] = [*KEYS, 0.5, "aa", (1, "x", 0), ()]
PREFIXES: list[Any] = [(), (1,), (1, "x"), ("a",), (9,)]
IDS: list[Any] = [*range(48), "s1", "s2", (1, 2), -7]
# Sums by namespace: a namespace holds float or Decimal sums, never both (ints mix with either).
SUMS: dict[Any, list[Any]] = {
    None: [0, 1, -3, 2**53 + 1, 0.5, 0.1, -2.25],
    "dec": [0, 2, Decimal("1.10"), Decimal("-0.005"), Decimal("12.5")],
    7: [0, 1, 5, -(2**60), 2**62],
}
NAMESPACES: list[Any] = list(SUMS)
NAMESPACE_ST = st.sampled_from([None, None, None, "dec", 7])
"""Most items in the default namespace, so most ranges hold several of them."""

Spread = list[tuple[Any, Any, Any, Any, int]]
"""Items as (key, id, sum, namespace, member index)."""


@st.composite
def spreads(draw: st.DrawFn) -> tuple[int, Spread]:
    """A number of members and items spread over them (each id on exactly one member)."""
    members = draw(st.integers(1, MAX_MEMBERS))
    ids = draw(st.permutations(IDS))[: draw(st.integers(0, len(IDS)))]
    out: Spread = []
    for id_ in ids:
        ns = draw(NAMESPACE_ST)
        out.append(
            (
                draw(st.sampled_from(KEYS)),
                id_,
                draw(st.sampled_from(SUMS[ns])),
                ns,
                draw(st.integers(0, members - 1)),
            )
        )
    return members, out


@st.composite
def bound(draw: st.DrawFn) -> dict[str, Any]:
    b: dict[str, Any] = {"key": draw(st.sampled_from(BOUND_KEYS)), "inclusive": draw(st.booleans())}
    if draw(st.booleans()):
        b["id"] = draw(st.sampled_from([*IDS, 1000]))
    return b


@st.composite
def bounds(draw: st.DrawFn) -> dict[str, Any] | None:
    kind = draw(st.sampled_from(["none", "none", "none", "lower", "upper", "both", "eq", "prefix"]))
    if kind == "none":
        return None
    if kind == "eq":
        return {"eq": draw(st.sampled_from(BOUND_KEYS))}
    if kind == "prefix":
        return {"prefix": draw(st.sampled_from(PREFIXES))}
    out: dict[str, Any] = {}
    if kind in ("lower", "both"):
        out["lower"] = draw(bound())
    if kind in ("upper", "both"):
        out["upper"] = draw(bound())
    return out


ranges = st.tuples(st.sampled_from([None, None, None, "dec", 7, "absent"]), bounds())


class Cluster:
    """Member stores and the oracle's store, opened once per module; a fresh aggregate name
    per example keeps examples apart without reopening RocksDB."""

    def __init__(self, root: Path) -> None:
        self.members = [Store.open(root / f"m{i}", max_node_size=4) for i in range(MAX_MEMBERS)]
        self.whole = Store.open(root / "whole", max_node_size=4)
        self.names = itertools.count()

    def close(self) -> None:
        for s in [*self.members, self.whole]:
            s.close()

    def build(self, n: int, spread: Spread) -> tuple[list[Aggregate], Aggregate]:
        """n member aggregates and the oracle, holding ``spread``."""
        name = f"a{next(self.names)}"
        parts = [s.aggregate(name) for s in self.members[:n]]
        whole = self.whole.aggregate(name)
        for i, agg in enumerate(parts):
            with agg.store.transaction():
                for key, id_, s, ns, m in spread:
                    if m == i:
                        agg.insert(key, id_, s, ns)
        with whole.store.transaction():
            for key, id_, s, ns, _ in spread:
                whole.insert(key, id_, s, ns)
        return parts, whole


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    yield c
    c.close()


ORDERS: tuple[Order, ...] = ("asc", "desc")


def merged(parts: Sequence[Aggregate], **options: Any) -> MergedReads:
    return MergedReads(
        [LocalMember(p, random.Random(i)) for i, p in enumerate(parts)],
        rng=random.Random(99),
        **options,
    )


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def same_sum(got: Any, want: Any) -> bool:
    """Ints and Decimals exactly (type and digits); floats within rounding of the order in
    which the parts were added (a tree adds in its own shape)."""
    if isinstance(want, float) or isinstance(got, float):
        return type(got) is float and type(want) is float and math.isclose(got, want, abs_tol=1e-6)
    return type(got) is type(want) and repr(got) == repr(want)


def error_of(call: Any) -> str:
    with pytest.raises(OffsetOutOfRange) as e:
        call()
    return str(e.value)


EXAMPLES = settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


# ---- sums of parts ---------------------------------------------------------------------------


@EXAMPLES
@given(data=spreads(), reads=st.lists(ranges, min_size=1, max_size=3), probe=st.data())
def test_count_sum_and_index_of_are_the_sums_of_the_parts(
    cluster: Cluster, data: tuple[int, Spread], reads: list[Any], probe: st.DataObject
) -> None:
    parts, whole = cluster.build(*data)
    m = merged(parts)
    for ns, b in reads:
        assert run(m.count(ns, b)) == whole.count(ns, b)
        got, want = run(m.sum(ns, b)), whole.sum(ns, b)
        assert same_sum(got, want), (got, want)
        for _ in range(4):
            key = probe.draw(st.sampled_from(BOUND_KEYS))
            id_ = probe.draw(st.sampled_from([None, *IDS]))
            order: Order = probe.draw(st.sampled_from(ORDERS))
            assert run(m.index_of(key, id_, order, ns, b)) == whole.index_of(key, id_, order, ns, b)


@EXAMPLES
@given(data=spreads(), reads=st.lists(ranges, min_size=1, max_size=3))
def test_min_max_and_random_come_from_the_whole_range(
    cluster: Cluster, data: tuple[int, Spread], reads: list[Any]
) -> None:
    parts, whole = cluster.build(*data)
    m = merged(parts)
    for ns, b in reads:
        assert repr(run(m.min(ns, b))) == repr(whole.min(ns, b))
        assert repr(run(m.max(ns, b))) == repr(whole.max(ns, b))
        in_range = {repr(it) for it in whole.iter(ns, b)}
        for _ in range(3):
            r = run(m.random(ns, b))
            assert (r is None) == (not in_range)
            assert r is None or repr(r) in in_range


def test_min_max_compare_encoded_keys_where_python_cannot(tmp_path: Path) -> None:
    """Keys of different types on different members (None < 1 < "a" < (1,)): Python's own
    comparison raises on them; the merge orders them as the tree does."""
    stores = [Store.open(tmp_path / str(i)) for i in range(4)]
    parts = [s.aggregate("a") for s in stores]
    for i, key in enumerate(["a", (1,), None, 1]):
        parts[i].insert(key, i)
    with pytest.raises(TypeError):
        min(["a", (1,), None, 1])  # type: ignore[type-var]
    m = merged(parts)
    lo, hi = run(m.min()), run(m.max())
    assert lo is not None and hi is not None
    assert (lo.key, lo.id) == (None, 2)
    assert (hi.key, hi.id) == ((1,), 1)
    for s in stores:
        s.close()


# ---- at: the select across members --------------------------------------------------------------


@EXAMPLES
@given(
    data=spreads(),
    read=ranges,
    pivots=st.sampled_from([1, 2, 4]),
    final_window=st.sampled_from([1, 2, 32]),
)
def test_at_selects_what_one_aggregate_selects_at_every_offset(
    cluster: Cluster, data: tuple[int, Spread], read: Any, pivots: int, final_window: int
) -> None:
    parts, whole = cluster.build(*data)
    m = merged(parts, pivots=pivots, final_window=final_window)
    ns, b = read
    n = whole.count(ns, b)
    for offset in range(-n, n):
        assert repr(run(m.at(offset, ns, b))) == repr(whole.at(offset, ns, b)), offset
    for offset in (-n - 1, n, n + 5):  # the engine's error, word for word
        assert error_of(lambda o=offset: run(m.at(o, ns, b))) == error_of(
            lambda o=offset: whole.at(o, ns, b)
        )


class Counting:
    """A member that counts the calls made to it (a transport's requests)."""

    def __init__(self, inner: LocalMember) -> None:
        self.inner = inner
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.inner, name)

        async def call(*args: Any) -> Any:
            self.calls += 1
            return await fn(*args)

        return call


def test_at_asks_each_member_a_logarithmic_number_of_times(tmp_path: Path) -> None:
    """3 members, 3,000 items: each round shrinks every window 5× (4 pivots), so a select
    is done in a few rounds of two calls per member, whatever the offset."""
    stores = [Store.open(tmp_path / str(i), max_node_size=8) for i in range(3)]
    parts = [s.aggregate("a") for s in stores]
    whole = stores[0].aggregate("whole")
    rng = random.Random(5)
    items = [(rng.randrange(500), i, rng.randrange(3)) for i in range(3000)]
    for j, p in enumerate(parts):
        with p.store.transaction():
            for key, i, where in items:
                if where == j:
                    p.insert(key, i)
    with whole.store.transaction():
        for key, i, _ in items:
            whole.insert(key, i)
    members = [Counting(LocalMember(p)) for p in parts]
    m = MergedReads(members, pivots=4, final_window=32)
    worst = 0
    for offset in [0, 1, 2999, 1500, -1, *rng.sample(range(3000), 30)]:
        for c in members:
            c.calls = 0
        assert repr(run(m.at(offset))) == repr(whole.at(offset))
        worst = max(worst, *(c.calls for c in members))
    # count + (select + ranks) per round + the final select; ~1,000 per member: 5 rounds
    assert worst <= 1 + 2 * 5 + 1, worst
    # Everything on one member: its own count and one select, nothing else.
    single = [Counting(LocalMember(p)) for p in (parts[0], stores[1].aggregate("empty"))]
    assert repr(run(MergedReads(single).at(7))) == repr(parts[0].at(7))
    assert [c.calls for c in single] == [2, 1]
    for s in stores:
        s.close()


class Shrinking(LocalMember):
    """A member whose items are all deleted right after it answers its first count: a batch
    applied between the rounds of a read (driven by the read's progress, not by time)."""

    async def count(self, namespace: Any, bounds: Any) -> int:
        n = await super().count(namespace, bounds)
        self.aggregate.clear_all()
        return n


def test_at_says_state_moved_when_a_member_changes_between_rounds(tmp_path: Path) -> None:
    stores = [Store.open(tmp_path / str(i)) for i in range(2)]
    parts = [s.aggregate("a") for s in stores]
    for i in range(200):
        parts[i % 2].insert(i, i)
    m = MergedReads([LocalMember(parts[0]), Shrinking(parts[1])], final_window=4)
    with pytest.raises(StateMoved, match="retry the read"):
        run(m.at(100))
    for s in stores:
        s.close()


# ---- paginate ------------------------------------------------------------------------------


@EXAMPLES
@given(
    data=spreads(),
    read=ranges,
    page_size=st.integers(1, 7),
    order=st.sampled_from(["asc", "desc"]),
)
def test_paginate_walks_the_same_pages_with_cursors_valid_on_every_member(
    cluster: Cluster, data: tuple[int, Spread], read: Any, page_size: int, order: Any
) -> None:
    parts, whole = cluster.build(*data)
    m = merged(parts)
    ns, b = read
    cursor = None
    for _ in range(100):
        got = run(m.paginate(cursor, page_size, order, ns, b))
        want = whole.paginate(cursor, page_size, order, ns, b)
        assert repr(got) == repr(want)  # items, cursor and is_done
        if got.cursor is not None:
            # The merged cursor continues on any member: its own items after that position.
            c = decode_cursor(got.cursor)
            for p in parts:
                rest = p.paginate(got.cursor, 1000, order, ns, b).items
                mine = [
                    it
                    for it in p.iter(ns, b, order)
                    if ((E(it.key) + E(it.id) < c) if order == "desc" else E(it.key) + E(it.id) > c)
                ]
                assert repr(rest) == repr(mine)
        if got.is_done:
            break
        cursor = got.cursor
    else:
        pytest.fail("paginate never finished")


def test_merge_pages_is_done_only_when_nothing_follows() -> None:
    a = [(E(1) + E(1), 0), (E(3) + E(3), 0)]
    b = [(E(2) + E(2), 0)]
    # Three entries for a page of two: not done, whatever the members said.
    assert merge_pages([(a, True), (b, True)], 2) == (a[:1] + b, False)
    # All fit, but a member has more after its page: not done.
    assert merge_pages([(a, False), (b, True)], 3) == ([a[0], b[0], a[1]], False)
    assert merge_pages([(a, True), (b, True)], 3) == ([a[0], b[0], a[1]], True)
    assert merge_pages([(a[::-1], True), (b, True)], 3, reverse=True) == (
        [a[1], b[0], a[0]],
        True,
    )


def test_an_item_answered_by_two_members_is_refused(tmp_path: Path) -> None:
    """Two members holding the same id (a partition held twice) must not double-count into
    a page: the merge refuses it instead of answering."""
    stores = [Store.open(tmp_path / str(i)) for i in range(2)]
    parts = [s.aggregate("a") for s in stores]
    for p in parts:
        p.insert(5, "dup")
    with pytest.raises(BadMemberAnswer, match="a partition is held twice"):
        run(merged(parts).paginate(page_size=10))
    for s in stores:
        s.close()


# ---- batches and namespaces -------------------------------------------------------------------


@EXAMPLES
@given(data=spreads(), reads=st.lists(st.tuples(ranges, st.integers(-45, 45)), max_size=5))
def test_batches_answer_each_query_as_one_aggregate(
    cluster: Cluster, data: tuple[int, Spread], reads: list[Any]
) -> None:
    parts, whole = cluster.build(*data)
    m = merged(parts)
    queries: list[Any] = [
        Query(ns, None, off)
        if b is None and i % 2
        else {"namespace": ns, "bounds": b, "offset": off}
        for i, ((ns, b), off) in enumerate(reads)
    ]
    assert run(m.count_batch(queries)) == whole.count_batch(queries)
    for got, want in zip(run(m.sum_batch(queries)), whole.sum_batch(queries), strict=True):
        assert same_sum(got, want), (got, want)
    ok = [q for q in queries if _offset_ok(whole, q)]
    assert repr(run(m.at_batch(ok))) == repr(whole.at_batch(ok))
    bad = [q for q in queries if not _offset_ok(whole, q)]
    if bad:
        assert error_of(lambda: run(m.at_batch(bad))) == error_of(lambda: whole.at_batch(bad))


def _offset_ok(whole: Aggregate, q: Any) -> bool:
    ns, b, off = (q.namespace, q.bounds, q.offset) if isinstance(q, Query) else q.values()
    n = whole.count(ns, b)
    return -n <= off < n


@EXAMPLES
@given(data=spreads())
def test_namespaces_are_the_sorted_union(cluster: Cluster, data: tuple[int, Spread]) -> None:
    parts, whole = cluster.build(*data)
    assert repr(run(merged(parts).namespaces())) == repr(whole.namespaces())


# ---- sums keep the engine's types ----------------------------------------------------------


def test_sums_combine_as_a_tree_adds_them() -> None:
    assert repr(add_sums([1, 2, 2**62, 2**62])) == repr(3 + 2**63)  # ints: exact, an int
    assert repr(add_sums([])) == "0"
    assert repr(add_sums([1, 0.5])) == "1.5"
    # Decimals: exact with the most places, whatever the caller's context says.
    with decimal.localcontext(decimal.Context(prec=2, traps=[decimal.Inexact])):
        got = add_sums([Decimal("123456789.10"), 2, Decimal("-0.005")])
    assert repr(got) == repr(Decimal("123456791.095"))
    with pytest.raises(InvalidArgument, match=r"Decimal\(str\(x\)\) or float\(x\)"):
        add_sums([Decimal("1.5"), 0.5])


def test_a_float_part_and_a_decimal_part_are_refused_not_rounded(tmp_path: Path) -> None:
    """One namespace never mixes float and Decimal sums in a store; across members it can
    (rows of one namespace on different partitions): the merged sum says so."""
    stores = [Store.open(tmp_path / str(i)) for i in range(2)]
    parts = [s.aggregate("a") for s in stores]
    parts[0].insert(1, 1, 0.5)
    parts[1].insert(2, 2, Decimal("0.5"))
    with pytest.raises(InvalidArgument, match="cannot be added exactly"):
        run(merged(parts).sum())
    for s in stores:
        s.close()


# ---- random: uniform over the whole ------------------------------------------------------------


class Enumerating:
    """An rng whose ``randrange(n)`` returns 0, 1, ..., n - 1 in turn: every outcome once."""

    def __init__(self) -> None:
        self.next = 0

    def randrange(self, stop: int) -> int:
        r = self.next % stop
        self.next += 1
        return r


@given(counts=st.lists(st.integers(0, 30), max_size=6))
def test_pick_weighted_gives_each_member_exactly_its_share(counts: list[int]) -> None:
    rng = Enumerating()
    total = sum(counts)
    if total == 0:
        assert pick_weighted(counts, rng) is None
        return
    picks = [pick_weighted(counts, rng) for _ in range(total)]
    assert [picks.count(i) for i in range(len(counts))] == counts


def _chi_square(draws: list[Any], cells: int) -> float:
    expect = len(draws) / cells
    seen = {d: draws.count(d) for d in set(draws)}
    return sum((seen.get(c, 0) - expect) ** 2 / expect for c in range(cells))


@pytest.mark.slow  # 20,000 draws per case: statistical, so not in the fast loop
def test_random_is_uniform_over_the_whole(tmp_path: Path) -> None:
    """100 items on 3 members holding 5, 20 and 75 of them; 20,000 draws with fixed seeds.
    Chi-square over 100 cells (99 degrees of freedom: mean 99, sd 14) stays under a loose
    200; a pick that ignored the counts (each member 1/3) is far above it."""
    stores = [Store.open(tmp_path / str(i)) for i in range(3)]
    parts = [s.aggregate("a") for s in stores]
    for i in range(100):
        parts[0 if i < 5 else 1 if i < 25 else 2].insert(i % 7, i)
    m = merged(parts)
    draws = []
    for _ in range(20_000):
        r = run(m.random())
        assert r is not None
        draws.append(r.id)
    assert _chi_square(draws, 100) < 200

    class EachMemberAThird:
        """A wrong weighting, to show the statistic tells it apart."""

        def __init__(self) -> None:
            self.r = random.Random(1)

        def randrange(self, stop: int) -> int:
            counts = [p.count() for p in parts]
            i = self.r.randrange(3)
            return sum(counts[:i]) + self.r.randrange(counts[i])

    wrong = merged(parts)
    wrong.rng = EachMemberAThird()
    biased = [run(wrong.random()).id for _ in range(20_000)]
    assert _chi_square(biased, 100) > 1000
    for s in stores:
        s.close()


# ---- coverage ---------------------------------------------------------------------------------


def test_check_coverage_finds_missing_doubled_unknown_and_changed_partitions() -> None:
    parts = range(6)
    ok = check_coverage(
        # a answered two calls of one read, with the same claim both times
        [
            Claim("a", frozenset({0, 1})),
            Claim("b", frozenset({2, 3, 4, 5})),
            Claim("a", frozenset({1, 0})),
        ],
        parts,
    )
    assert ok.complete and ok.describe() == ""
    ok.raise_if_incomplete()

    bad = check_coverage(
        [
            Claim("a", frozenset({0, 1, 2})),
            Claim("b", frozenset({2, 3, 9})),
            Claim("c", frozenset({4})),
            Claim("c", frozenset({4, 5})),  # c's claim moved between two calls of one read
        ],
        parts,
    )
    assert not bad.complete
    assert bad.missing == frozenset({5})
    assert dict(bad.doubled) == {2: ("a", "b")}
    assert dict(bad.unknown) == {9: ("b",)}
    assert bad.changed == ("c",)
    with pytest.raises(CoverageError) as e:
        bad.raise_if_incomplete()
    msg = str(e.value)
    for words in (
        "no member answered for partition(s) [5]",
        "partition 2 was answered by a, b",
        "b answered for unknown partition 9",
        "the partitions of c changed during the read",
        "retry shortly, or read with partial=true",
    ):
        assert words in msg
    assert e.value.coverage is bad

    nobody = check_coverage([], parts)
    assert nobody.missing == frozenset(parts) and not nobody.complete


# ---- the API ----------------------------------------------------------------------------------


def test_merged_reads_offer_every_read_op_with_the_engines_parameters() -> None:
    for op in READ_OPS:
        fn = getattr(MergedReads, op)
        assert inspect.iscoroutinefunction(fn), op
        mine = list(inspect.signature(fn).parameters)[1:]
        assert mine == list(inspect.signature(getattr(Aggregate, op)).parameters)[1:], op
        assert tuple(mine) == READ_OPS[op].fields, op


def test_bad_arguments_get_the_engines_errors(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    agg = store.aggregate("a")
    agg.insert(1, 1)
    m = merged([agg])
    up: Any = "up"  # not an Order: the point of the test
    cases: list[tuple[Callable[[], Any], Callable[[], Any]]] = [
        (lambda: run(m.paginate("not a cursor")), lambda: agg.paginate("not a cursor")),
        (lambda: run(m.paginate(None, 0)), lambda: agg.paginate(None, 0)),
        (lambda: run(m.paginate(None, 5, up)), lambda: agg.paginate(None, 5, up)),
        (lambda: run(m.index_of(1, None, up)), lambda: agg.index_of(1, None, up)),
        (lambda: run(m.at("1")), lambda: agg.at("1")),  # type: ignore[arg-type]
        (lambda: run(m.count_batch([{"nope": 1}])), lambda: agg.count_batch([{"nope": 1}])),
    ]
    for call, engine_call in cases:
        with pytest.raises(InvalidArgument) as mine:
            call()
        with pytest.raises(InvalidArgument) as theirs:
            engine_call()
        assert str(mine.value) == str(theirs.value)
    with pytest.raises(InvalidArgument, match="at least one member"):
        MergedReads([])
    store.close()


def test_a_member_answering_the_wrong_number_of_results_is_refused(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")

    class Short(LocalMember):
        async def count_batch(self, queries: Sequence[Query]) -> list[int]:
            return (await super().count_batch(queries))[:-1]

        async def select(self, offsets: Sequence[int], namespace: Any, bounds: Any) -> list[Entry]:
            return []

    agg = store.aggregate("a")
    agg.insert(1, 1)
    m = MergedReads([Short(agg), LocalMember(store.aggregate("b"))])
    with pytest.raises(BadMemberAnswer, match="answered 1 results to 2 queries"):
        run(m.count_batch([{}, {}]))
    with pytest.raises(BadMemberAnswer, match="gave 0 items for 1 offsets"):
        run(m.at(0))
    store.close()
