"""A group member for the membership tests: a real AIOKafkaConsumer in a group, with tally's
assignor, fetching in a loop as the runtime does. Also runnable as a child process (so a test
can kill -9 it):

    python cluster_util.py BOOTSTRAP TOPIC GROUP URL HELD

HELD is a comma-separated list of the partitions of TOPIC it starts holding (or ``-``).
The child prints one line per ownership map it receives (flushed): ``MAP`` and the JSON
``{"you", "version", "owners": {member_id: {"url", "partitions"}}}``; it logs to stderr and
runs until killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from tally.consumers.cluster import Membership, OwnershipView, make_assignor
from tally.consumers.logs import configure_logging

SESSION_TIMEOUT_MS = 6000  # the broker's group.min.session.timeout.ms: a kill is seen this fast
HEARTBEAT_MS = 500


class Member:
    """One member. It holds (reports to the leader) what its latest map gives it, as a
    runtime does once its partitions are built; ``held`` seeds it (a restarted member)."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        url: str,
        held: set[TopicPartition] | None = None,
    ) -> None:
        self.topic = topic
        self.url = url
        self.held: set[TopicPartition] = set(held or ())
        self.membership = Membership()
        self.membership.add_listener(self._took)
        self.assignor = make_assignor(url, lambda: self.held, membership=self.membership)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=group,
            partition_assignment_strategy=(self.assignor,),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
        self._loop: asyncio.Task[None] | None = None

    def _took(self, membership: Membership) -> None:
        view = membership.current()
        if view is not None:
            self.held = set(view.mine())

    async def start(self) -> Member:
        await self.consumer.start()
        self.consumer.subscribe([self.topic])
        self._loop = asyncio.ensure_future(self._fetch())
        return self

    async def _fetch(self) -> None:
        while True:
            await self.consumer.getmany(timeout_ms=200)

    async def stop(self) -> None:
        """A clean close: aiokafka sends LeaveGroup, so the others rebalance at once."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        await self.consumer.stop()


def view_json(view: OwnershipView) -> dict[str, object]:
    """A map as the child prints it."""
    return {
        "you": view.member_id,
        "version": view.version,
        "owners": {
            mid: {"url": info.url, "partitions": sorted(tp.partition for tp in info.partitions)}
            for mid, info in view.owners.items()
        },
    }


MAP_PREFIX = "MAP "


async def _child(bootstrap: str, topic: str, group: str, url: str, held: str) -> None:
    configure_logging(fmt="console")  # stderr: stdout carries the maps only
    parts = {TopicPartition(topic, int(p)) for p in held.split(",")} if held != "-" else set()
    member = Member(bootstrap, topic, group, url, parts)

    def report(membership: Membership) -> None:
        view = membership.current()
        if view is not None:
            print(MAP_PREFIX + json.dumps(view_json(view)), flush=True)

    member.membership.add_listener(report)
    await member.start()
    await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(_child(*sys.argv[1:6]))
