"""The group membership of a member, in a thread (and event loop) of its own.

aiokafka heartbeats from a task of the consumer's event loop. A member's main loop applies
batches synchronously, and a replay chunk is one bulk build that can hold the loop for
seconds: heartbeats from that loop would stop, the group would expel the member after the
session timeout and rebalance for nothing (it did, building 50k-event partitions on two
cores). Here the group consumer lives in its own thread: it joins, heartbeats and runs the
rebalance callbacks whatever the apply loop is doing. Its partitions stay paused (the tasks
read them); it only keeps the membership and commits offsets for lag tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from tally.consumers.logs import get_logger

__all__ = ["GroupThread"]

T = TypeVar("T")


class GroupThread:
    """Runs ``make_consumer()`` subscribed to ``topics`` with ``listener`` in a thread.

    ``on_unreachable(error)`` is called (in the thread) when the broker cannot be reached at
    the start; the thread keeps retrying until `stop`.
    """

    def __init__(
        self,
        make_consumer: Callable[[], AIOKafkaConsumer],
        topics: list[str],
        listener: ConsumerRebalanceListener,
        on_unreachable: Callable[[str], None],
    ) -> None:
        self._make = make_consumer
        self._topics = topics
        self._listener = listener
        self._on_unreachable = on_unreachable
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="tally-group", daemon=True)
        self._ready = threading.Event()
        self.consumer: AIOKafkaConsumer | None = None
        """The started consumer (None until the broker answered); use it from the thread."""
        self.error: BaseException | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The thread's event loop (listener callbacks run there)."""
        return self._loop

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            loop.run_until_complete(self._main())
        except BaseException as e:  # reported by `stop` and the member's status
            self.error = e
            get_logger(component="cluster").error("group thread failed", error=repr(e))
        finally:
            loop.close()

    async def _main(self) -> None:
        assert self._stop is not None
        delay = 1.0
        while not self._stop.is_set():
            consumer = self._make()
            try:
                await consumer.start()
            except KafkaError as e:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                self._on_unreachable(str(e) or type(e).__name__)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 15.0)
                continue
            consumer.subscribe(self._topics, listener=self._listener)
            self.consumer = consumer
            break
        consumer = self.consumer
        if consumer is None:
            return
        try:
            while not self._stop.is_set():
                # Nothing to fetch (paused); keeps the member within max_poll_interval_ms.
                await consumer.getmany(timeout_ms=200)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()  # LeaveGroup: the others take over at once

    def call(self, coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
        """Run ``coro`` in the thread's loop; await the result from the caller's loop."""
        assert self._loop is not None
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return asyncio.wrap_future(fut)

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        """The topic's partitions in the consumer's metadata (None: not known yet)."""
        consumer = self.consumer
        if consumer is None:
            return None
        parts: set[int] | None = consumer.partitions_for_topic(topic)
        return parts

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> None:
        """Commit offsets under the group (only those of partitions it is assigned)."""
        consumer = self.consumer
        if consumer is None:
            return

        async def commit() -> None:
            await asyncio.wait_for(consumer.commit(offsets), 5)

        await self.call(commit())

    async def stop(self) -> None:
        """Leave the group and end the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        await asyncio.to_thread(self._thread.join, 30)
