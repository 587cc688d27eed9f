"""Reading a topic from its first offset to its end offsets as of now, without a consumer group.

Used by the reconciler's topic source, `tally demo` (what a topic already
holds) and the tests' `read_all`: one loop, so the subtle part — stop on each
partition's *position*, not on the last offset seen, because compaction and
transaction markers leave gaps — lives in one place.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition

__all__ = ["read_to_end"]


async def read_to_end(
    consumer: Any,
    tps: Sequence[TopicPartition],
    timeout: float,
    max_records: int | None = None,
) -> AsyncIterator[tuple[TopicPartition, list[ConsumerRecord[Any, Any]]]]:
    """Assign ``tps`` to a started consumer, seek to their beginning and yield ``(tp, records)``
    until every partition's position reaches its end offset as of the call.

    Records at or past that end offset are left out. Raises `TimeoutError`
    (naming the positions and end offsets) after ``timeout`` seconds.
    """
    consumer.assign(list(tps))
    await consumer.seek_to_beginning(*tps)
    ends = await consumer.end_offsets(list(tps))
    pending = {tp for tp in tps if ends[tp] > 0}
    deadline = time.monotonic() + timeout
    while pending:
        for tp in list(pending):
            if await consumer.position(tp) >= ends[tp]:
                pending.discard(tp)
        if not pending:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            got = {tp.partition: await consumer.position(tp) for tp in tps}
            raise TimeoutError(
                f"reading topic {tps[0].topic!r} to its end took more than {timeout:.0f}s: positions {got}, "
                f"end offsets { {tp.partition: o for tp, o in ends.items()} }"
            )
        batch = await consumer.getmany(
            *pending, timeout_ms=int(min(left, 1.0) * 1000), max_records=max_records
        )
        for tp, msgs in batch.items():
            end = ends[tp]
            if msgs and msgs[-1].offset >= end:
                msgs = [m for m in msgs if m.offset < end]
            if msgs:
                yield tp, msgs
