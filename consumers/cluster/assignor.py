"""tally's group assignor: sticky to the state members hold, balanced, and it tells every
member who owns what and where to reach them.

aiokafka's assignors are classmethod APIs (``AbstractPartitionAssignor``), so
`make_assignor` builds one subclass per process, carrying this member's advertised URL, a
callable returning the partitions it holds state for, and its `Membership`. Pass it as
``AIOKafkaConsumer(partition_assignment_strategy=(cls,))`` with a ``group_id`` and
``subscribe()``.

- ``metadata(topics)`` (every member, every JoinGroup): ``user_data`` = msgspec JSON
  `MemberSubscription` {url, held partitions, newest map version seen}.
- ``assign(cluster, members)`` (the group leader): `plan_assignment`, then one
  `OwnershipMap` {map_version, members: {id: {url, partitions}}} in every member's
  assignment ``user_data`` (Kafka Streams' partitionsByHost).
- ``on_assignment(assignment)`` (every member): decodes the map into the `Membership`.

The rule (`plan_assignment`), deterministic given the set of members (not their order):

1. **Sticky claims.** A partition stays with a member that reports holding it; when several
   do, the first by member id. A member taking over a held partition resumes from its
   stored offsets; anyone else must replay it from the beginning.
2. **Unheld partitions** go, in partition order, to the least-loaded member (ties by
   member id).
3. **Balance, moving as little as it needs.** While a member has at least two partitions
   more than another that may take one of them, one moves from the most loaded (ties by
   member id) to the least loaded: preferably a partition the receiver holds (a resume,
   not a replay), else the lowest. So balance wins over stickiness — loads differ by at most
   1 when all members subscribe to the same topics, as Kafka's StickyAssignor keeps them —
   but only the surplus moves: a member keeps ``min(claims won, its balanced share)`` of
   its own partitions, the most any balanced assignment could keep. A member that rejoins
   gets partitions back only if balance requires it, and then those it holds first.

Members whose subscription cannot be read (another tally version, not tally) are treated
as holding nothing and get no partitions while a readable member can take them (no URL
could reach them); they are listed in the map with ``url: None`` and in its ``problems``.
The leader never raises for a member's data: an exception in ``assign`` would stop the
leader's consumer, then the next leader's, and so on. Likewise ``on_assignment`` never
raises (it runs in aiokafka's coordinator task): an unreadable map leaves the `Membership`
without a map and with the reason, so reads answer "unknown" instead of from a stale map.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from aiokafka.structs import TopicPartition

from tally.consumers.cluster.membership import Membership, by_topic, tps
from tally.consumers.logs import get_logger
from tally.schemas.errors import ConfigError
from tally.schemas.membership import (
    MemberSubscription,
    OwnerEntry,
    OwnershipMap,
    UnreadableUserData,
    decode_map,
    decode_subscription,
    encode_map,
    encode_subscription,
)

__all__ = [
    "ASSIGNOR_NAME",
    "Candidate",
    "TallyAssignor",
    "check_advertise_url",
    "make_assignor",
    "plan_assignment",
]

ASSIGNOR_NAME = "tally-sticky"
"""The group protocol name: every member of a tally group offers it, nothing else does."""

_counter = itertools.count(1)


@dataclass(frozen=True)
class Candidate:
    """What the leader knows of one member when it plans."""

    topics: frozenset[str]
    held: frozenset[TopicPartition] = frozenset()
    readable: bool = True
    """False when its subscription could not be read: it gets partitions only if nobody else
    can take them."""


def plan_assignment(
    partitions: Iterable[TopicPartition], members: Mapping[str, Candidate]
) -> dict[str, frozenset[TopicPartition]]:
    """Member id → its partitions under the sticky, balanced rule of this module's doc.

    Every partition of a topic some member subscribes to goes to exactly one member that
    subscribes to it. Pure and deterministic: the result depends on the members' ids and
    data, not on the order of ``members``.
    """
    rank = {m: i for i, m in enumerate(sorted(members))}
    order = sorted(members)
    parts = sorted(set(partitions))
    eligible: dict[TopicPartition, list[str]] = {}
    for tp in parts:
        subscribed = [m for m in order if tp.topic in members[m].topics]
        readable = [m for m in subscribed if members[m].readable]
        if subscribed:
            eligible[tp] = readable or subscribed
    owned: dict[str, list[TopicPartition]] = {m: [] for m in order}  # each kept sorted

    # 1. sticky claims: the first holder by member id
    for tp, cands in eligible.items():
        holder = next((m for m in cands if tp in members[m].held), None)
        if holder is not None:
            owned[holder].append(tp)  # partition order: stays sorted
    # 2. unheld partitions: the least-loaded member, ties by member id
    taken = {tp for ps in owned.values() for tp in ps}
    for tp, cands in eligible.items():
        if tp not in taken:
            insort(owned[min(cands, key=lambda m: (len(owned[m]), rank[m]))], tp)
    # 3. balance: move the surplus only (each move lowers the sum of squared loads: it ends)
    allowed = {tp: frozenset(cands) for tp, cands in eligible.items()}
    while (move := _next_move(owned, allowed, members, rank)) is not None:
        tp, src, dst = move
        del owned[src][bisect_left(owned[src], tp)]
        insort(owned[dst], tp)
    return {m: frozenset(ps) for m, ps in owned.items()}


def _next_move(
    owned: dict[str, list[TopicPartition]],
    allowed: Mapping[TopicPartition, frozenset[str]],
    members: Mapping[str, Candidate],
    rank: Mapping[str, int],
) -> tuple[TopicPartition, str, str] | None:
    """(partition, from, to) for the next balancing move, or None when balanced enough."""
    sources = sorted(owned, key=lambda m: (-len(owned[m]), rank[m]))
    targets = sorted(owned, key=lambda m: (len(owned[m]), rank[m]))
    for src in sources:
        for dst in targets:
            if len(owned[src]) - len(owned[dst]) < 2:
                break
            # a partition the receiver holds (a resume), else the lowest it may take
            held = members[dst].held
            resumable = (tp for tp in owned[src] if tp in held and dst in allowed[tp])
            best = next(resumable, None) if held else None
            if best is None:
                best = next((tp for tp in owned[src] if dst in allowed[tp]), None)
            if best is not None:
                return best, src, dst
    return None


def check_advertise_url(url: str) -> str:
    """``url`` if other members can use it as this member's HTTP address; else `ConfigError`."""
    parts = urlsplit(url)
    advice = "pass --advertise with an absolute http(s) URL other members reach, e.g. "
    example = "http://10.0.0.5:8750"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"advertised URL {url!r} is not an absolute http(s) URL", advice=advice + example
        )
    if parts.hostname in ("0.0.0.0", "::"):
        raise ConfigError(
            f"advertised URL {url!r} names a bind-all address that other members cannot reach",
            advice=advice + example,
        )
    return url.rstrip("/")


class TallyAssignor(AbstractPartitionAssignor):  # type: ignore[misc]  # aiokafka ships no stubs for it
    """The assignor; use a subclass from `make_assignor` (its class attributes are set)."""

    name = ASSIGNOR_NAME
    version = 0
    """Kafka's consumer-protocol schema version (aiokafka encodes v0); ours is in user_data."""
    advertise_url: ClassVar[str]
    held_partitions: ClassVar[Callable[[], Iterable[TopicPartition]]]
    membership: ClassVar[Membership]

    @classmethod
    def metadata(cls, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        """The JoinGroup metadata: subscribed topics, and in user_data URL, held, seen."""
        subscribed = sorted(topics)
        held = [_checked_tp(tp) for tp in cls.held_partitions()]
        sub = MemberSubscription(
            url=cls.advertise_url,
            held=by_topic(tp for tp in held if tp.topic in subscribed),
            seen=cls.membership.seen,
        )
        return ConsumerProtocolMemberMetadata(cls.version, subscribed, encode_subscription(sub))

    @classmethod
    def assign(
        cls,
        cluster: ClusterMetadata,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        """The leader's plan, with the full ownership map in every member's user_data."""
        problems: list[str] = []
        subs: dict[str, MemberSubscription | None] = {}
        candidates: dict[str, Candidate] = {}
        for mid in sorted(members):
            meta = members[mid]
            try:
                sub: MemberSubscription | None = decode_subscription(meta.user_data)
            except UnreadableUserData as e:
                problems.append(f"member {mid}: {e} (treated as holding nothing)")
                sub = None
            subs[mid] = sub
            candidates[mid] = Candidate(
                topics=frozenset(meta.subscription),
                held=tps(sub.held) if sub is not None else frozenset(),
                readable=sub is not None,
            )
        partitions: list[TopicPartition] = []
        for topic in sorted(set().union(*(c.topics for c in candidates.values()))):
            numbers = cluster.partitions_for_topic(topic)
            if numbers is None:
                problems.append(f"topic {topic!r}: no partition metadata (does it exist?)")
                continue
            partitions += [TopicPartition(topic, p) for p in numbers]
        plan = plan_assignment(partitions, candidates)
        urls: dict[str, list[str]] = {}
        for mid, sub in subs.items():
            if sub is not None:
                urls.setdefault(sub.url, []).append(mid)
        for url, mids in sorted(urls.items()):
            if len(mids) > 1:
                problems.append(f"members {', '.join(mids)} all advertise {url}")
        seen = max((s.seen for s in subs.values() if s is not None), default=0)
        version = max(seen, cls.membership.seen) + 1
        owners = {
            mid: OwnerEntry(
                url=sub.url if sub is not None else None, partitions=by_topic(plan[mid])
            )
            for mid, sub in subs.items()
        }
        moved = sum(len(plan[m] - candidates[m].held) for m in plan)
        log = get_logger(component="cluster")
        for problem in problems:
            log.warning("group member data problem", problem=problem)
        log.info(
            "group assignment",
            map_version=version,
            members=len(owners),
            partitions=len(partitions),
            not_held=moved,
        )
        return {
            mid: ConsumerProtocolMemberAssignment(
                cls.version,
                sorted(entry.partitions.items()),
                encode_map(
                    OwnershipMap(map_version=version, you=mid, members=owners, problems=problems)
                ),
            )
            for mid, entry in owners.items()
        }

    @classmethod
    def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
        """Install the map in the `Membership`; never raises (aiokafka's coordinator task)."""
        log = get_logger(component="cluster")
        try:
            owners = decode_map(assignment.user_data)
        except UnreadableUserData as e:
            log.error("ownership map unreadable", error=str(e))
            cls.membership.fail(str(e))
            return
        me = owners.members.get(owners.you)
        got = frozenset(assignment.partitions())
        if me is None or tps(me.partitions) != got:
            reason = (
                f"ownership map v{owners.map_version} does not match this member's assignment "
                f"(map: {me.partitions if me else 'no entry'}, assigned: {by_topic(got)})"
            )
            log.error("ownership map inconsistent", error=reason)
            cls.membership.fail(reason)
            return
        view = cls.membership.update(owners)
        log.info(
            "ownership map",
            map_version=view.version,
            member_id=view.member_id,
            members=len(view.owners),
            mine=len(view.mine()),
        )


def make_assignor(
    advertise_url: str,
    held: Callable[[], Iterable[TopicPartition]],
    *,
    membership: Membership | None = None,
) -> type[TallyAssignor]:
    """A `TallyAssignor` subclass for this process: ``advertise_url`` is where the others
    reach it, ``held()`` (called at every join) the partitions it has state for; the map it
    receives lands in ``membership`` (a new one if not given: ``cls.membership``)."""
    url = check_advertise_url(advertise_url)
    bound = membership if membership is not None else Membership()

    class Bound(TallyAssignor):
        advertise_url = url
        held_partitions = staticmethod(held)
        membership = bound

    Bound.__name__ = Bound.__qualname__ = f"TallyAssignor{next(_counter)}"
    Bound.__doc__ = f"tally's assignor for the member advertising {url}."
    return Bound


def _checked_tp(tp: object) -> TopicPartition:
    if (
        isinstance(tp, tuple)
        and len(tp) == 2
        and isinstance(tp[0], str)
        and isinstance(tp[1], int)
        and tp[1] >= 0
    ):
        return TopicPartition(tp[0], tp[1])
    raise TypeError(f"held() must return TopicPartition(topic, partition) items, got {tp!r}")
