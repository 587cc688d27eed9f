"""What this process knows of its group: the ownership map its assignor last received.

One `Membership` per process (shared by its assignor class and the runtime). The assignor's
``on_assignment`` replaces the current `OwnershipView` in one assignment (an immutable
snapshot: a reader that takes ``view()`` once sees one consistent map across awaits) and
wakes waiters. Reads that need a map raise `MembershipUnknown` (with the reason) while there
is none, or when the last one could not be read — never an answer from an old map.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aiokafka.structs import TopicPartition

from tally.schemas.errors import TallyError
from tally.schemas.membership import OwnershipMap, Partitions

__all__ = ["MemberInfo", "Membership", "MembershipUnknown", "OwnershipView", "by_topic", "tps"]


class MembershipUnknown(TallyError):
    """No usable ownership map: not joined yet, mid-rebalance, or the leader's map unreadable."""


def tps(partitions: Partitions) -> frozenset[TopicPartition]:
    """``{topic: [p, ...]}`` → a set of `TopicPartition`."""
    return frozenset(TopicPartition(t, p) for t, ps in partitions.items() for p in ps)


def by_topic(partitions: Iterable[TopicPartition]) -> Partitions:
    """A set of `TopicPartition` → ``{topic: [p, ...]}``, topics and partitions sorted."""
    out: dict[str, list[int]] = {}
    for tp in sorted(set(partitions)):
        out.setdefault(tp.topic, []).append(tp.partition)
    return out


@dataclass(frozen=True)
class MemberInfo:
    """One member as the map shows it."""

    member_id: str
    url: str | None
    partitions: frozenset[TopicPartition]


@dataclass(frozen=True)
class OwnershipView:
    """One ownership map, as received: immutable."""

    version: int
    member_id: str
    """This process's member id (the map's ``you``)."""
    owners: Mapping[str, MemberInfo]
    problems: tuple[str, ...] = ()
    _by_tp: Mapping[TopicPartition, MemberInfo] = field(default_factory=dict, repr=False)

    @classmethod
    def from_map(cls, m: OwnershipMap) -> OwnershipView:
        owners = {
            mid: MemberInfo(mid, e.url, tps(e.partitions)) for mid, e in sorted(m.members.items())
        }
        index = {tp: info for info in owners.values() for tp in info.partitions}
        return cls(m.map_version, m.you, owners, tuple(m.problems), index)

    def members(self) -> list[str]:
        """Member ids, sorted."""
        return sorted(self.owners)

    def mine(self) -> frozenset[TopicPartition]:
        """The partitions the map gives this process."""
        me = self.owners.get(self.member_id)
        return me.partitions if me is not None else frozenset()

    def owner_of(self, tp: TopicPartition) -> MemberInfo:
        """The member that owns ``tp``; `MembershipUnknown` when the map gives it to nobody."""
        info = self._by_tp.get(tp)
        if info is None:
            raise MembershipUnknown(
                f"ownership map v{self.version} gives {tp.topic}[{tp.partition}] to no member",
                advice="the partition is new or its topic is not subscribed; wait for the "
                "next rebalance",
            )
        return info

    def url_of(self, tp: TopicPartition) -> str:
        """The advertised URL of ``tp``'s owner."""
        info = self.owner_of(tp)
        if info.url is None:
            raise MembershipUnknown(
                f"{tp.topic}[{tp.partition}] is owned by member {info.member_id}, whose "
                "subscription could not be read (no URL)",
                advice="see the map's problems; run the same tally version on every member",
            )
        return info.url

    def partitions(self) -> frozenset[TopicPartition]:
        """Every partition the map assigns."""
        return frozenset(self._by_tp)


class Membership:
    """The current ownership map of this process, shared with its assignor."""

    def __init__(self, version: int = 0) -> None:
        """``version``: the newest map version this member saw before (e.g. stored with its
        state), so the leader keeps numbering upward after a restart of the whole group."""
        self._view: OwnershipView | None = None
        self._seen = version
        self._error: str | None = "not joined to the group yet"
        self._changes = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._listeners: list[Callable[[Membership], None]] = []

    # ---------------------------------------------------------------- written by the assignor

    def update(self, m: OwnershipMap) -> OwnershipView:
        """Install the leader's new map (called from the assignor's ``on_assignment``)."""
        view = OwnershipView.from_map(m)
        self._view = view
        self._seen = max(self._seen, view.version)
        self._error = None
        self._changed()
        return view

    def fail(self, reason: str) -> None:
        """The last assignment carried no usable map: forget the old one, keep the reason."""
        self._view = None
        self._error = reason
        self._changed()

    def add_listener(self, callback: Callable[[Membership], None]) -> None:
        """Call ``callback(self)`` after every change (from the consumer's coordinator task;
        keep it short and non-blocking, it runs before ``on_partitions_assigned``)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        self._changes += 1
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        for callback in list(self._listeners):
            callback(self)

    # ---------------------------------------------------------------- read by the process

    @property
    def seen(self) -> int:
        """The newest map version this process has been given (what it reports on joining)."""
        return self._seen

    @property
    def changes(self) -> int:
        """How many maps (or failures) this process has received: a progress counter."""
        return self._changes

    @property
    def error(self) -> str | None:
        """Why there is no usable map right now, or None."""
        return self._error

    def current(self) -> OwnershipView | None:
        """The current map, or None (see `error`)."""
        return self._view

    def view(self) -> OwnershipView:
        """The current map; `MembershipUnknown` (with the reason) when there is none."""
        if self._view is None:
            raise MembershipUnknown(
                f"no ownership map: {self._error}",
                advice="wait for the group to settle (`/status` shows the members)",
            )
        return self._view

    def owners(self) -> Mapping[str, MemberInfo]:
        """Member id → its URL and partitions, in the current map."""
        return self.view().owners

    def members(self) -> list[str]:
        """Member ids of the current map, sorted."""
        return self.view().members()

    def url_of(self, tp: TopicPartition) -> str:
        """The advertised URL of the member owning ``tp`` in the current map."""
        return self.view().url_of(tp)

    def mine(self) -> frozenset[TopicPartition]:
        """The partitions the current map gives this process (empty without a map)."""
        return self._view.mine() if self._view is not None else frozenset()

    async def wait_for(
        self, predicate: Callable[[OwnershipView], bool], timeout: float | None = None
    ) -> OwnershipView:
        """The first map (the current one included) for which ``predicate`` holds; progress
        driven: re-checked on every change. `TimeoutError` after ``timeout`` seconds says
        what the last map was."""
        deadline = None if timeout is None else time.monotonic() + timeout
        loop = asyncio.get_running_loop()
        while True:
            view = self._view
            if view is not None and predicate(view):
                return view
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            remaining = None if deadline is None else deadline - time.monotonic()
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                last = "none" if view is None else f"v{view.version} {_describe(view)}"
                raise TimeoutError(
                    f"no ownership map matched within {timeout}s; last map: {last}; "
                    f"error: {self._error}"
                ) from None


def _describe(view: OwnershipView) -> str:
    parts = []
    for mid, info in view.owners.items():
        owned = ",".join(f"{tp.topic}[{tp.partition}]" for tp in sorted(info.partitions))
        parts.append(f"{mid}@{info.url}: {owned or '-'}")
    return "; ".join(parts)
