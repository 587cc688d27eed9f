"""Answers for the whole aggregate from members that each hold a disjoint part of it.

In a deployment (issue 13) every member holds the items of the Kafka partitions it owns; any
member answers a read for the whole aggregate by asking every member (itself included) and
merging their partial answers. This module is that merge, independent of the transport:

* `Member` — the member-side primitives a merge asks for, each one call to one member (a
  transport sends each as one request, or batches a round's calls). Keys travel encoded
  (`Entry`: ``encode_key(key) + encode_key(id)`` and the sum value), so merges compare the
  tree's own order, never decoded Python values (mixed types, Decimal against float).
  `LocalMember` implements it on an `engine.Aggregate` (the member's own part; and tests).
* `MergedReads` — the reads of `engine.Aggregate` (every op of `READ_OPS`, same names and
  parameters, but ``async``) answered from a list of members:

  ====================  ============================================================
  count, sum, index_of  the sum of the parts (sums combine as a tree adds them:
                        `engine.btree.add_sums`)
  *_batch               elementwise; at_batch selects per query
  min, max              the best part by encoded (key, id)
  paginate              a k-way merge of each member's next page after the cursor;
                        the cursor is the engine's (an encoded item key), valid on
                        any member; ``is_done`` exact
  random                one round: each member's (count, random item); a member is
                        chosen with probability count / total (`pick_weighted`)
  namespaces            the union, in encoded order
  at                    a select across members by rank queries (`MergedReads.at`)
  ====================  ============================================================

* pure helpers the async layer is made of (`merge_pages`, `best_entry`, `pick_weighted`,
  `union_namespaces`, `elementwise`), usable by a transport with its own fan-out;
* `Claim` / `check_coverage` — each member's answer says which partitions it answered for;
  the read may only be answered when every partition is claimed exactly once.

**Exactness.** Answers are exact for the members' states as they were when asked. count,
sum, index_of, min/max, paginate, random, namespaces and the count/sum batches ask each member
once, so each part is one whole state of that member. ``at`` takes several rounds: a member
that applies a batch between them can make the rounds disagree; every answer is checked against
the previous rounds, and a contradiction raises `StateMoved` (retry; over HTTP a 503) rather
than answering from mixed states that do not fit together.

Wiring (for the transport): wrap each member in an adapter implementing `Member` that
records the `Claim` of every response, run the merge, then ``check_coverage(claims,
partitions)`` and answer only if `Coverage.complete` (else 503 with `Coverage.describe`).
"""

from __future__ import annotations

import asyncio
import heapq
import random as _random
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice, pairwise
from typing import Any, Protocol, TypeAlias, TypeVar

from tally.engine import Aggregate, Bounds, InvalidArgument, Item, Order, Page, Query, TallyError
from tally.engine.btree import Sum, add_sums
from tally.engine.errors import OffsetOutOfRange
from tally.engine.keys import decode_key, key_repr
from tally.engine.types import (
    as_queries,
    decode_cursor,
    decode_item,
    encode_cursor,
    offset_out_of_range,
    parse_order,
)

__all__ = [
    "BadMemberAnswer",
    "BoundsArg",
    "Claim",
    "Coverage",
    "CoverageError",
    "Entry",
    "LocalMember",
    "Member",
    "MergedReads",
    "Partition",
    "RandomSource",
    "StateMoved",
    "best_entry",
    "check_coverage",
    "elementwise",
    "merge_pages",
    "pick_weighted",
    "union_namespaces",
]

Entry: TypeAlias = tuple[bytes, Sum]
"""An item as members exchange it: its encoded item key (``encode_key(key) +
encode_key(id)``, the tree's order) and its sum value."""

BoundsArg: TypeAlias = Bounds | Mapping[str, Any] | None
"""A read's ``bounds`` argument, passed to members as the caller gave it."""

Partition: TypeAlias = Hashable
"""A partition of the aggregate's topics: an int, or e.g. a (topic, partition) pair."""

T = TypeVar("T")


class StateMoved(TallyError):
    """A member's items changed between the rounds of a multi-round read (``at``): its
    answers contradict each other. Retry the read (over HTTP: 503, retry shortly)."""


class BadMemberAnswer(TallyError):
    """A member's answer cannot be right whatever its state: the wrong number of results, an
    item twice (two members answered for the same partition), a count without its item."""


class CoverageError(TallyError):
    """The members' claims do not cover every partition exactly once (a rebalance is moving
    partitions, or a member is down): no exact answer is possible right now."""

    def __init__(self, message: str, coverage: Coverage) -> None:
        super().__init__(message)
        self.coverage = coverage


class RandomSource(Protocol):
    """What `pick_weighted` needs of a random generator (`random.Random` is one)."""

    def randrange(self, stop: int, /) -> int: ...


# ---- the member side ---------------------------------------------------------------------


class Member(Protocol):
    """The primitives a merge asks one member for, each one call about its own items only.

    ``namespace`` and ``bounds`` are the read's own arguments, passed through; offsets and
    ranks are positions among the member's items in that range. Errors of a wrong argument
    are the engine's (`InvalidArgument`, `InvalidKey`), raised by the member.
    """

    async def count(self, namespace: Any, bounds: BoundsArg) -> int:
        """`Aggregate.count` of the member's items."""
        ...

    async def sum(self, namespace: Any, bounds: BoundsArg) -> Sum:
        """`Aggregate.sum` of the member's items."""
        ...

    async def index_of(
        self, key: Any, id: Any, order: Order, namespace: Any, bounds: BoundsArg
    ) -> int:
        """`Aggregate.index_of` among the member's items."""
        ...

    async def count_batch(self, queries: Sequence[Query]) -> list[int]:
        """`Aggregate.count_batch` of the member's items."""
        ...

    async def sum_batch(self, queries: Sequence[Query]) -> list[Sum]:
        """`Aggregate.sum_batch` of the member's items."""
        ...

    async def select(
        self, offsets: Sequence[int], namespace: Any, bounds: BoundsArg
    ) -> list[Entry]:
        """The member's items at these offsets (0 <= offset < its count in range)."""
        ...

    async def ranks(
        self, item_keys: Sequence[bytes], namespace: Any, bounds: BoundsArg
    ) -> list[int]:
        """For each encoded item key, how many of the member's items in range precede it."""
        ...

    async def page(
        self, after: bytes | None, page_size: int, order: Order, namespace: Any, bounds: BoundsArg
    ) -> tuple[list[Entry], bool]:
        """Up to ``page_size`` of the member's items strictly after the encoded item key
        ``after`` (None: from the first) in ``order``, and whether none follows them."""
        ...

    async def sample(self, namespace: Any, bounds: BoundsArg) -> tuple[int, Entry | None]:
        """The member's count in range and one of those items uniformly at random (None if
        the count is 0), both from one state."""
        ...

    async def namespaces(self) -> list[bytes]:
        """The member's non-empty namespaces, encoded, in order."""
        ...


_SHARED_RNG = _random.Random()


class LocalMember:
    """`Member` over an `engine.Aggregate` in this process (a member's own part).

    Each call reads the store synchronously (no await inside), so it sees one committed
    state, as the HTTP read routes do. ``rng`` draws `sample`'s item (tests fix its seed).
    """

    synchronous = True
    """Its calls never suspend: `MergedReads` calls them in turn rather than as tasks."""

    def __init__(self, aggregate: Aggregate, rng: RandomSource | None = None) -> None:
        self.aggregate = aggregate
        # Seeding a Random costs ~12 µs: a member builds one part per partition per read,
        # and only `sample` draws, so the default is one generator shared by all parts.
        self.rng: RandomSource = _SHARED_RNG if rng is None else rng

    def __repr__(self) -> str:
        return f"<LocalMember {self.aggregate!r}>"

    async def count(self, namespace: Any, bounds: BoundsArg) -> int:
        """`Aggregate.count`. O(log n)."""
        return self.aggregate.count(namespace, bounds)

    async def sum(self, namespace: Any, bounds: BoundsArg) -> Sum:
        """`Aggregate.sum`. O(log n)."""
        return self.aggregate.sum(namespace, bounds)

    async def index_of(
        self, key: Any, id: Any, order: Order, namespace: Any, bounds: BoundsArg
    ) -> int:
        """`Aggregate.index_of`. O(log n)."""
        return self.aggregate.index_of(key, id, order, namespace, bounds)

    async def count_batch(self, queries: Sequence[Query]) -> list[int]:
        """`Aggregate.count_batch`. O(log n) per query."""
        return self.aggregate.count_batch(queries)

    async def sum_batch(self, queries: Sequence[Query]) -> list[Sum]:
        """`Aggregate.sum_batch`. O(log n) per query."""
        return self.aggregate.sum_batch(queries)

    async def select(
        self, offsets: Sequence[int], namespace: Any, bounds: BoundsArg
    ) -> list[Entry]:
        """`Aggregate.select_entries`. O(log n) per offset."""
        return self.aggregate.select_entries(offsets, namespace, bounds)

    async def ranks(
        self, item_keys: Sequence[bytes], namespace: Any, bounds: BoundsArg
    ) -> list[int]:
        """`Aggregate.ranks`. O(log n) per key."""
        return self.aggregate.ranks(item_keys, namespace, bounds)

    async def page(
        self, after: bytes | None, page_size: int, order: Order, namespace: Any, bounds: BoundsArg
    ) -> tuple[list[Entry], bool]:
        """`Aggregate.page_entries`. O(log n + page_size)."""
        return self.aggregate.page_entries(after, page_size, order, namespace, bounds)

    async def sample(self, namespace: Any, bounds: BoundsArg) -> tuple[int, Entry | None]:
        """Count and a uniformly random item, from one state. O(log n)."""
        agg = self.aggregate
        n = agg.count(namespace, bounds)
        if not n:
            return 0, None
        return n, agg.select_entries((self.rng.randrange(n),), namespace, bounds)[0]

    async def namespaces(self) -> list[bytes]:
        """`Aggregate.namespace_keys`. O(namespaces)."""
        return self.aggregate.namespace_keys()


# ---- pure merges -----------------------------------------------------------------------------


def _first(entry: Entry) -> bytes:
    return entry[0]


def elementwise(
    parts: Sequence[Sequence[T]], combine: Callable[[list[T]], T], expected: int
) -> list[T]:
    """``combine`` of the i-th result of every member, for each of ``expected`` results.
    A member answering another number of results is a `BadMemberAnswer`."""
    _check_lengths(parts, expected)
    return [combine([p[i] for p in parts]) for i in range(expected)]


def _check_lengths(parts: Sequence[Sequence[Any]], expected: int) -> None:
    for p in parts:
        if len(p) != expected:
            raise BadMemberAnswer(
                f"a member answered {len(p)} results to {expected} queries; "
                "members must run the same tally version"
            )


def best_entry(entries: Iterable[Entry | None], reverse: bool = False) -> Entry | None:
    """The first (``reverse``: the last) entry by encoded item key, None if there is none.
    O(number of entries)."""
    found = [e for e in entries if e is not None]
    if not found:
        return None
    return (max if reverse else min)(found, key=_first)


def merge_pages(
    pages: Sequence[tuple[Sequence[Entry], bool]], page_size: int, reverse: bool = False
) -> tuple[list[Entry], bool]:
    """The whole's next page from each member's next page (each after the same position,
    sorted in the read's order, ``is_done`` exact): the first ``page_size`` entries of their
    merge, and whether nothing follows them anywhere. O(k + page_size log k).

    Exact: if the merge holds more than ``page_size`` entries, more follow; else every member
    gave all it had up to the page's end, and the page is the last iff every member's was.
    An entry given by two members is a `BadMemberAnswer` (a partition answered twice).
    """
    merged = heapq.merge(*(p[0] for p in pages), key=_first, reverse=reverse)
    out = list(islice(merged, page_size + 1))
    for a, b in pairwise(out):
        if a[0] == b[0]:
            item = decode_item(a[0], a[1], None)
            raise BadMemberAnswer(
                f"two members answered the item with key {key_repr(item.key)} and id "
                f"{key_repr(item.id)}: a partition is held twice (check the members' claims)"
            )
    if len(out) > page_size:
        return out[:page_size], False
    return out, all(done for _, done in pages)


def pick_weighted(counts: Sequence[int], rng: RandomSource) -> int | None:
    """The index of one member, each with probability ``counts[i] / sum(counts)`` (None when
    the sum is 0): ``rng.randrange(total)`` falls in member i's share of ``[0, total)``.
    O(k). With each member's item uniform among its own, the pick is uniform over the whole:
    ``counts[i] / total * 1 / counts[i] = 1 / total``."""
    total = sum(counts)
    if total <= 0:
        return None
    r = rng.randrange(total)
    for i, c in enumerate(counts):
        if r < c:
            return i
        r -= c
    raise AssertionError("randrange(total) returned a value outside [0, total)")


def union_namespaces(parts: Iterable[Iterable[bytes]]) -> list[bytes]:
    """The encoded namespaces any member holds, each once, in encoded order."""
    return sorted(set().union(*parts))


# ---- coverage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """What a member's answer covers: the partitions whose items it answered for."""

    member: str
    """The member (e.g. its advertised URL)."""
    partitions: frozenset[Partition]


def _sorted(ps: Iterable[Partition]) -> list[Partition]:
    items = list(ps)
    try:
        return sorted(items)  # type: ignore[type-var]
    except TypeError:
        return sorted(items, key=repr)


@dataclass(frozen=True)
class Coverage:
    """How a read's claims cover the aggregate's partitions (`check_coverage`)."""

    missing: frozenset[Partition] = frozenset()
    """Partitions no member answered for."""
    doubled: Mapping[Partition, tuple[str, ...]] = field(default_factory=dict)
    """Partitions two or more members answered for, with those members."""
    unknown: Mapping[Partition, tuple[str, ...]] = field(default_factory=dict)
    """Partitions claimed that are not the aggregate's, with the members claiming them."""
    changed: tuple[str, ...] = ()
    """Members whose claims differ between the calls of one read (a rebalance mid-read)."""

    @property
    def complete(self) -> bool:
        """Every partition answered for exactly once, from one claim per member."""
        return not (self.missing or self.doubled or self.unknown or self.changed)

    def describe(self) -> str:
        """What is wrong, in words (empty when complete), for a 503's message."""
        parts = []
        if self.missing:
            parts.append(f"no member answered for partition(s) {_sorted(self.missing)}")
        for p in _sorted(self.doubled):
            parts.append(f"partition {p!r} was answered by {', '.join(self.doubled[p])}")
        for p in _sorted(self.unknown):
            parts.append(f"{', '.join(self.unknown[p])} answered for unknown partition {p!r}")
        if self.changed:
            parts.append(f"the partitions of {', '.join(self.changed)} changed during the read")
        return "; ".join(parts)

    def raise_if_incomplete(self) -> None:
        """Raise `CoverageError` (saying what is moving and what to do) unless complete."""
        if not self.complete:
            raise CoverageError(
                f"cannot answer for the whole aggregate: {self.describe()}. Partitions are "
                "moving between members (a rebalance or a member down): retry shortly, or "
                "read with partial=true for what is available",
                self,
            )


def check_coverage(claims: Iterable[Claim], all_partitions: Iterable[Partition]) -> Coverage:
    """Which partitions of ``all_partitions`` the claims miss or double. O(claims + partitions).

    A member may appear in several claims (one per call of a multi-round read); its claims
    must be the same, else it is reported in ``changed``.
    """
    by_member: dict[str, frozenset[Partition]] = {}
    changed: list[str] = []
    for c in claims:
        seen = by_member.setdefault(c.member, c.partitions)
        if seen != c.partitions and c.member not in changed:
            changed.append(c.member)
    wanted = frozenset(all_partitions)
    owners: dict[Partition, list[str]] = {}
    for member, ps in by_member.items():
        for p in ps:
            owners.setdefault(p, []).append(member)
    return Coverage(
        missing=wanted - owners.keys(),
        doubled={p: tuple(ms) for p, ms in owners.items() if p in wanted and len(ms) > 1},
        unknown={p: tuple(ms) for p, ms in owners.items() if p not in wanted},
        changed=tuple(changed),
    )


# ---- the async merges ----------------------------------------------------------------------


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await the calls concurrently; on the first error cancel the rest, then raise it."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _spread(lo: int, hi: int, n: int) -> list[int]:
    """Up to ``n`` offsets splitting ``[lo, hi)`` into ``n + 1`` near-equal parts."""
    w = hi - lo
    if w <= n:
        return list(range(lo, hi))
    return [lo + (j + 1) * w // (n + 1) for j in range(n)]


def _check_offset(offset: Any) -> None:
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise InvalidArgument(f"offset must be an int, got {key_repr(offset)}")


class MergedReads:
    """The reads of `engine.Aggregate` for the whole aggregate, from members holding disjoint
    parts of it: every op of `tally.schemas.reads.READ_OPS`, same names and parameters, as
    coroutines (``await getattr(reads, op)(**args)``).

    ``rng`` picks the member of `random`; ``pivots`` (per member and round) and
    ``final_window`` tune `at` (see there).
    """

    def __init__(
        self,
        members: Sequence[Member],
        *,
        rng: RandomSource | None = None,
        pivots: int = 4,
        final_window: int = 32,
    ) -> None:
        if not members:
            raise InvalidArgument("MergedReads needs at least one member")
        if pivots < 1 or final_window < 1:
            raise InvalidArgument(
                f"pivots and final_window must be >= 1, got {pivots} and {final_window}"
            )
        self.members = list(members)
        self.rng: RandomSource = _random.Random() if rng is None else rng
        self.pivots = pivots
        self.final_window = final_window
        self._local = [getattr(m, "synchronous", False) is True for m in self.members]

    async def _map(self, indices: Iterable[int], fn: Callable[[int], Awaitable[T]]) -> list[T]:
        """``fn(i)`` for each member index, in order: the calls of members that answer without
        suspending (`LocalMember`) one after the other (no task each: for a member owning many
        partitions that is most of a read's cost), the others concurrently meanwhile."""
        idx = list(indices)
        local = self._local
        if all(local[i] for i in idx):
            return [await fn(i) for i in idx]
        remote = {i: asyncio.ensure_future(fn(i)) for i in idx if not local[i]}
        try:
            near = {i: await fn(i) for i in idx if local[i]}
            far = dict(zip(remote, await asyncio.gather(*remote.values()), strict=True))
        except BaseException:
            for t in remote.values():
                t.cancel()
            await asyncio.gather(*remote.values(), return_exceptions=True)
            raise
        return [near[i] if i in near else far[i] for i in idx]

    async def _every(self, fn: Callable[[Member], Awaitable[T]]) -> list[T]:
        """``fn(member)`` for every member, in order (see `_map`)."""
        members = self.members
        return await self._map(range(len(members)), lambda i: fn(members[i]))

    async def count(self, namespace: Any = None, bounds: BoundsArg = None) -> int:
        """Number of items in range: the sum of the members' counts."""
        return sum(await self._every(lambda m: m.count(namespace, bounds)))

    async def sum(self, namespace: Any = None, bounds: BoundsArg = None) -> Sum:
        """Sum of the items' sum values in range: the members' sums added as a tree adds
        them (ints exact, Decimals exact with the most places, floats as floats)."""
        return add_sums(await self._every(lambda m: m.sum(namespace, bounds)))

    async def index_of(
        self,
        key: Any,
        id: Any = None,
        order: Order = "asc",
        namespace: Any = None,
        bounds: BoundsArg = None,
    ) -> int:
        """Asc: items in range before (key, id); desc: after it. The sum of the members'."""
        parse_order(order)
        return sum(await self._every(lambda m: m.index_of(key, id, order, namespace, bounds)))

    async def min(self, namespace: Any = None, bounds: BoundsArg = None) -> Item | None:
        """The first item in range (by encoded key and id), or None."""
        return await self._end(False, namespace, bounds)

    async def max(self, namespace: Any = None, bounds: BoundsArg = None) -> Item | None:
        """The last item in range (by encoded key and id), or None."""
        return await self._end(True, namespace, bounds)

    async def _end(self, reverse: bool, namespace: Any, bounds: BoundsArg) -> Item | None:
        order: Order = "desc" if reverse else "asc"
        pages = await self._every(lambda m: m.page(None, 1, order, namespace, bounds))
        best = best_entry((p[0][0] if p[0] else None for p in pages), reverse)
        return None if best is None else decode_item(best[0], best[1], namespace)

    async def random(self, namespace: Any = None, bounds: BoundsArg = None) -> Item | None:
        """A uniformly random item in range, or None: one round, each member's count and
        random item; a member is picked with probability count / total."""
        samples = await self._every(lambda m: m.sample(namespace, bounds))
        i = pick_weighted([c for c, _ in samples], self.rng)
        if i is None:
            return None
        entry = samples[i][1]
        if entry is None:
            raise BadMemberAnswer(f"a member counted {samples[i][0]} items but gave none")
        return decode_item(entry[0], entry[1], namespace)

    async def paginate(
        self,
        cursor: str | None = None,
        page_size: int = 100,
        order: Order = "asc",
        namespace: Any = None,
        bounds: BoundsArg = None,
    ) -> Page:
        """One page after ``cursor`` (None: from the start), ``is_done`` exact: each member's
        next ``page_size`` items after the cursor, merged. The cursor is the engine's (the
        page's last encoded item key), so a page's cursor continues on any member, and a
        single aggregate's cursor continues here."""
        reverse = parse_order(order)
        after = None if cursor is None else decode_cursor(cursor)
        pages = await self._every(lambda m: m.page(after, page_size, order, namespace, bounds))
        entries, done = merge_pages(pages, page_size, reverse)
        if not entries:
            return Page([], cursor, done)
        items = [decode_item(ek, s, namespace) for ek, s in entries]
        return Page(items, encode_cursor(entries[-1][0]), done)

    async def count_batch(self, queries: Iterable[Query | Mapping[str, Any]]) -> list[int]:
        """`count` of each query, in order: the members' batches added elementwise."""
        qs = as_queries(queries)
        parts = await self._every(lambda m: m.count_batch(qs))
        return elementwise(parts, sum, len(qs))

    async def sum_batch(self, queries: Iterable[Query | Mapping[str, Any]]) -> list[Sum]:
        """`sum` of each query, in order: the members' batches added elementwise."""
        qs = as_queries(queries)
        parts = await self._every(lambda m: m.sum_batch(qs))
        return elementwise(parts, add_sums, len(qs))

    async def at_batch(self, queries: Iterable[Query | Mapping[str, Any]]) -> list[Item]:
        """`at` of each query (its offset), in order: one count_batch per member, then the
        selects of all queries concurrently."""
        qs = as_queries(queries)
        parts = await self._every(lambda m: m.count_batch(qs))
        _check_lengths(parts, len(qs))
        entries = await _all(
            self._select(q.offset, [p[i] for p in parts], q.namespace, q.bounds)
            for i, q in enumerate(qs)
        )
        return [decode_item(e[0], e[1], q.namespace) for e, q in zip(entries, qs, strict=True)]

    async def namespaces(self) -> list[Any]:
        """Namespaces holding at least one item anywhere, in key order."""
        parts = await self._every(lambda m: m.namespaces())
        return [decode_key(ens) for ens in union_namespaces(parts)]

    async def at(self, offset: int, namespace: Any = None, bounds: BoundsArg = None) -> Item:
        """The item at ``offset`` in (key, id) order over all members; negative counts from
        the end; `OffsetOutOfRange` as the engine says it.

        A select across k sorted sets by rank queries: each member keeps a window of its
        items that must hold the answer. Each round every member with a non-empty window
        proposes ``pivots`` items spread over it (one call), every member ranks all the
        proposals (one call), and the proposals' global ranks (sums of the ranks) bracket
        the offset: every window shrinks to between two adjacent proposals, so by a factor
        ``pivots + 1`` per round. Once the windows hold ``final_window`` items or fewer in
        all, they are fetched and merged. Rounds: O(log_{pivots+1}(n / final_window)), each
        two calls per member of O(k * pivots) keys.
        """
        _check_offset(offset)
        counts = await self._every(lambda m: m.count(namespace, bounds))
        entry = await self._select(offset, counts, namespace, bounds)
        return decode_item(entry[0], entry[1], namespace)

    async def _member_select(
        self, i: int, offsets: Sequence[int], namespace: Any, bounds: BoundsArg
    ) -> list[Entry]:
        try:
            got = await self.members[i].select(offsets, namespace, bounds)
        except OffsetOutOfRange as e:
            raise StateMoved(
                f"member {i} no longer holds the items it counted ({e}); retry the read"
            ) from None
        if len(got) != len(offsets):
            raise BadMemberAnswer(f"member {i} gave {len(got)} items for {len(offsets)} offsets")
        return got

    def _selects(
        self, offsets: Mapping[int, Sequence[int]], namespace: Any, bounds: BoundsArg
    ) -> Callable[[int], Awaitable[list[Entry]]]:
        return lambda i: self._member_select(i, offsets[i], namespace, bounds)

    def _ranks(
        self, keys: Sequence[bytes], namespace: Any, bounds: BoundsArg
    ) -> Callable[[int], Awaitable[list[int]]]:
        return lambda i: self._member_ranks(i, keys, namespace, bounds)

    async def _member_ranks(
        self, i: int, keys: Sequence[bytes], namespace: Any, bounds: BoundsArg
    ) -> list[int]:
        got = await self.members[i].ranks(keys, namespace, bounds)
        if len(got) != len(keys):
            raise BadMemberAnswer(f"member {i} gave {len(got)} ranks for {len(keys)} keys")
        return got

    async def _select(
        self, offset: int, counts: Sequence[int], namespace: Any, bounds: BoundsArg
    ) -> Entry:
        """The entry at ``offset`` of the whole, given each member's count in range."""
        if len(counts) != len(self.members):
            raise BadMemberAnswer(f"{len(counts)} counts for {len(self.members)} members")
        n = sum(counts)
        k = offset + n if offset < 0 else offset
        if not 0 <= k < n:
            raise offset_out_of_range(offset, n)
        live = [i for i, c in enumerate(counts) if c]
        if len(live) == 1:  # everything on one member: its own select
            i = live[0]
            return (await self._member_select(i, (k,), namespace, bounds))[0]
        lo = dict.fromkeys(live, 0)
        hi = {i: counts[i] for i in live}
        low_key: bytes | None = None  # every window's items lie strictly between these keys
        high_key: bytes | None = None

        def moved(why: str) -> StateMoved:
            return StateMoved(f"a member's items changed during the read ({why}); retry the read")

        def inside(ek: bytes) -> bool:
            return (low_key is None or ek > low_key) and (high_key is None or ek < high_key)

        for _ in range(64 * max(1, n.bit_length())):  # a bound, never reached when consistent
            open_ = [i for i in live if hi[i] > lo[i]]
            window = sum(hi[i] - lo[i] for i in open_)
            if window <= self.final_window:
                parts = await self._map(
                    open_,
                    self._selects({i: list(range(lo[i], hi[i])) for i in open_}, namespace, bounds),
                )
                merged = sorted((e for p in parts for e in p), key=_first)
                if not all(inside(e[0]) for e in merged):
                    raise moved("an item fell outside the range found so far")
                return merged[k - sum(lo.values())]
            # Ranking costs every member a query per proposal: with many members, fewer each.
            per = max(1, min(self.pivots, 4 * self.pivots // len(open_)))
            offsets = {i: _spread(lo[i], hi[i], per) for i in open_}
            parts = await self._map(open_, self._selects(offsets, namespace, bounds))
            # (item key, sum, proposing member, its offset there)
            pivots: list[tuple[bytes, Sum, int, int]] = []
            for i, got in zip(open_, parts, strict=True):
                for o, (ek, s) in zip(offsets[i], got, strict=True):
                    if not inside(ek):
                        raise moved("a proposed item fell outside the range found so far")
                    pivots.append((ek, s, i, o))
            pivots.sort(key=lambda p: p[0])
            keys = [p[0] for p in pivots]
            # A member whose window is empty ranks every proposal at its window's place.
            ranks = {i: [lo[i]] * len(keys) for i in live}
            ranks.update(
                zip(
                    open_,
                    await self._map(open_, self._ranks(keys, namespace, bounds)),
                    strict=True,
                )
            )
            for i in live:
                r = ranks[i]
                if any(not lo[i] <= x <= hi[i] for x in r) or any(a > b for a, b in pairwise(r)):
                    raise moved(f"member {i}'s ranks contradict its earlier answers")
            for j, (_, _, owner, o) in enumerate(pivots):
                if ranks[owner][j] != o:
                    raise moved(f"member {owner} ranks its own item at {ranks[owner][j]}, not {o}")
            glob = [sum(ranks[i][j] for i in live) for j in range(len(pivots))]
            j = bisect_left(glob, k)
            if j < len(glob) and glob[j] == k:
                return pivots[j][0], pivots[j][1]
            if j > 0:  # the answer follows pivot j - 1 (its owner's window starts after it)
                low_key, _, owner, _ = pivots[j - 1]
                for i in live:
                    lo[i] = ranks[i][j - 1] + (i == owner)
            if j < len(pivots):  # and precedes pivot j
                high_key = pivots[j][0]
                for i in live:
                    hi[i] = ranks[i][j]
            if any(lo[i] > hi[i] for i in live):
                raise moved("the windows crossed")
        raise moved("the select did not converge")
