"""Group membership on the real broker: three AIOKafkaConsumers in one group on a 6-partition
topic, with tally's assignor.

Every member receives the same ownership map with the others' advertised URLs, partitions
disjoint and covering; a member that leaves (a clean close, or kill -9 of a child process)
is dropped and the others cover everything; one that comes back holding its old partitions
gets exactly those back. Waits are driven by progress (the next map), never by sleeps; the
timeouts only turn a hang into a failure that shows the last maps.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from aiokafka.structs import TopicPartition
from cluster_util import MAP_PREFIX, Member, view_json
from kafka_util import acreate_topic, unique_topic

from tally.consumers.cluster import Membership

HERE = Path(__file__).resolve().parent
PARTITIONS = 6
WAIT = 90.0  # a hang fails after this; a kill -9 is seen after the 6 s session timeout

Owners = dict[str, tuple[str | None, frozenset[int]]]
Snapshot = tuple[int, str, Owners]  # (map version, the member's own id, owners)


def _snapshot(raw: dict[str, object]) -> Snapshot:
    owners = raw["owners"]
    assert isinstance(owners, dict)
    return (
        int(raw["version"]),  # type: ignore[call-overload]
        str(raw["you"]),
        {m: (o["url"], frozenset(o["partitions"])) for m, o in owners.items()},
    )


class InProcess:
    """A member of this process, watched through its Membership."""

    def __init__(self, member: Member) -> None:
        self.member = member

    def latest(self) -> Snapshot | None:
        view = self.member.membership.current()
        return None if view is None else _snapshot(view_json(view))

    def changes(self) -> int:
        return self.member.membership.changes

    async def next_change(self, after: int) -> None:
        m: Membership = self.member.membership
        await m.wait_for(lambda _view: m.changes > after)


class Child:
    """A member in a child process (so it can be killed -9), watched through its stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.maps: list[Snapshot] = []
        self._event = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, bootstrap: str, topic: str, group: str, url: str, held: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "cluster_util.py"),
            bootstrap,
            topic,
            group,
            url,
            held,
            stdout=asyncio.subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            text = line.decode()
            if text.startswith(MAP_PREFIX):
                self.maps.append(_snapshot(json.loads(text[len(MAP_PREFIX) :])))
                self._event.set()
        self._event.set()

    def latest(self) -> Snapshot | None:
        return self.maps[-1] if self.maps else None

    def changes(self) -> int:
        return len(self.maps)

    async def next_change(self, after: int) -> None:
        while len(self.maps) <= after:
            if self.proc.returncode is not None:
                raise AssertionError(f"member child exited with {self.proc.returncode}")
            self._event.clear()
            await self._event.wait()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        await self._reader


Watch = InProcess | Child


async def settled(watches: Sequence[Watch], members: int) -> Owners:
    """Wait until every watched member holds the same map (same version and owners) listing
    ``members`` members, including each watched member itself; return its owners."""
    deadline = time.monotonic() + WAIT
    while True:
        snaps = [w.latest() for w in watches]
        if all(s is not None for s in snaps):
            versions = {s[0] for s in snaps if s}
            owners = [s[2] for s in snaps if s]
            if (
                len(versions) == 1
                and all(o == owners[0] for o in owners)
                and len(owners[0]) == members
                and all(s[1] in s[2] for s in snaps if s)
            ):
                return owners[0]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"the group did not settle on {members} members: {snaps}")
        counts = [w.changes() for w in watches]
        waits = [
            asyncio.ensure_future(w.next_change(c)) for w, c in zip(watches, counts, strict=True)
        ]
        done, pending = await asyncio.wait(
            waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
        )
        for fut in pending:
            fut.cancel()
        for fut in done:
            fut.result()  # a child that died raises here


def _me(w: Watch) -> str:
    snap = w.latest()
    assert snap is not None
    return snap[1]


def _check_cover(owners: Owners, urls: dict[str, str]) -> None:
    """Disjoint, covering, balanced, and each member listed with its advertised URL."""
    assert {m: url for m, (url, _) in owners.items()} == urls
    every = [p for _, ps in owners.values() for p in ps]
    assert sorted(every) == list(range(PARTITIONS))
    loads = [len(ps) for _, ps in owners.values()]
    assert max(loads) - min(loads) <= 1, owners


def _check_kafka_agrees(members: Sequence[Member], owners: Owners) -> None:
    """What Kafka assigned each consumer is what the map says it owns."""
    for m in members:
        view = m.membership.view()
        expect = {TopicPartition(m.topic, p) for p in owners[view.member_id][1]}
        assert m.consumer.assignment() == expect == view.mine()


async def _close_and_rejoin(bootstrap: str) -> None:
    topic = unique_topic("assignor")
    group = f"{topic}-group"
    await acreate_topic(bootstrap, topic, partitions=PARTITIONS)
    a, b, c = (Member(bootstrap, topic, group, f"http://{n}.test:8750") for n in "abc")
    running = [a, b, c]
    try:
        for m in running:
            await m.start()
        watches = [InProcess(m) for m in running]
        owners = await settled(watches, 3)
        ids = {n: _me(w) for n, w in zip("abc", watches, strict=True)}
        _check_cover(owners, {ids[n]: f"http://{n}.test:8750" for n in "abc"})
        _check_kafka_agrees(running, owners)
        before = {n: owners[ids[n]][1] for n in "abc"}

        await c.stop()  # a clean close: LeaveGroup
        running.remove(c)
        owners = await settled(watches[:2], 2)
        assert ids["c"] not in owners
        _check_cover(owners, {ids[n]: f"http://{n}.test:8750" for n in "ab"})
        for n in "ab":  # sticky: the survivors keep theirs and split c's
            assert owners[ids[n]][1] >= before[n]
        _check_kafka_agrees(running, owners)

        held = {TopicPartition(topic, p) for p in before["c"]}
        c2 = await Member(bootstrap, topic, group, "http://c.test:8750", held).start()
        running.append(c2)
        watches = [*watches[:2], InProcess(c2)]
        owners = await settled(watches, 3)
        assert ids["c"] not in owners  # a new member id, the same state on disk
        ids["c"] = _me(watches[2])
        _check_cover(owners, {ids[n]: f"http://{n}.test:8750" for n in "abc"})
        assert {n: owners[ids[n]][1] for n in "abc"} == before  # everything back home
        _check_kafka_agrees(running, owners)
    finally:
        for m in running:
            await m.stop()


def test_members_share_one_map_and_a_member_that_closes_and_returns_gets_its_partitions_back(
    kafka_bootstrap: str,
) -> None:
    asyncio.run(_close_and_rejoin(kafka_bootstrap))


async def _kill_and_rejoin(bootstrap: str) -> None:
    topic = unique_topic("assignor-kill")
    group = f"{topic}-group"
    await acreate_topic(bootstrap, topic, partitions=PARTITIONS)
    a, b = (Member(bootstrap, topic, group, f"http://{n}.test:8750") for n in "ab")
    children: list[Child] = []
    try:
        await a.start()
        await b.start()
        child = await Child.start(bootstrap, topic, group, "http://c.test:8750", "-")
        children.append(child)
        watches: list[Watch] = [InProcess(a), InProcess(b), child]
        owners = await settled(watches, 3)
        ids = {n: _me(w) for n, w in zip("abc", watches, strict=True)}
        _check_cover(owners, {ids[n]: f"http://{n}.test:8750" for n in "abc"})
        before = {n: owners[ids[n]][1] for n in "abc"}

        await child.kill()  # no LeaveGroup: the broker notices when the session times out
        owners = await settled(watches[:2], 2)
        assert ids["c"] not in owners
        _check_cover(owners, {ids[n]: f"http://{n}.test:8750" for n in "ab"})
        for n in "ab":
            assert owners[ids[n]][1] >= before[n]
        _check_kafka_agrees([a, b], owners)

        held = ",".join(str(p) for p in sorted(before["c"]))
        child = await Child.start(bootstrap, topic, group, "http://c.test:8750", held)
        children.append(child)
        watches = [*watches[:2], child]
        owners = await settled(watches, 3)
        ids["c"] = _me(child)
        _check_cover(owners, {ids[n]: f"http://{n}.test:8750" for n in "abc"})
        assert {n: owners[ids[n]][1] for n in "abc"} == before
        _check_kafka_agrees([a, b], owners)
    finally:
        await a.stop()
        await b.stop()
        for ch in children:
            await ch.kill()


def test_a_killed_member_is_dropped_and_gets_its_partitions_back_when_it_returns(
    kafka_bootstrap: str,
) -> None:
    asyncio.run(_kill_and_rejoin(kafka_bootstrap))
