"""`ConsumerStats`: the counters behind the logs, /status and /metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final

from aiokafka.structs import TopicPartition

from tally.consumers.runtime.deadletters import DeadLetterHealth

__all__ = ["LATENCY_BUCKETS", "ConsumerStats"]

LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds (seconds) of the batch-apply latency histogram."""


@dataclass
class ConsumerStats:
    """Counters for logs, /status and /metrics (the live stream's offsets and lag)."""

    started: float = field(default_factory=time.time)
    events: int = 0
    batches: int = 0
    dead_letters: int = 0
    changed: int = 0
    replayed: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    end_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    broker_ok: bool = True
    drift: dict[tuple[str, str], int] = field(default_factory=dict)
    """(aggregate, kind) → live events that imply the aggregate was out of step (see `tally.engine.triggers`)."""
    dead_letter: DeadLetterHealth = field(default_factory=DeadLetterHealth)
    """Whether dead letters can be written (/status ``dead_letter``, /readyz)."""

    def observe_batch(self, seconds: float) -> None:
        self.latency_sum += seconds
        for i, b in enumerate(LATENCY_BUCKETS):
            if seconds <= b:
                self.latency_buckets[i] += 1
                return
        self.latency_buckets[-1] += 1

    beyond_end: dict[TopicPartition, tuple[int, int]] = field(default_factory=dict)
    """Partitions whose stored offset was past the partition's end: (stored, end)."""

    def lag(self) -> dict[TopicPartition, int]:
        """Per-partition lag; a partition in ``beyond_end`` has none to speak of (left out)."""
        return {
            tp: max(0, end - self.offsets.get(tp, 0))
            for tp, end in self.end_offsets.items()
            if tp not in self.beyond_end
        }


def beyond_end_problem(tp: TopicPartition, stored: int, end: int) -> str:
    """What a stored offset past the partition's end means, and what to do.

    The broker's end offset only grows, so a stored offset beyond it means the topic was
    deleted and recreated (or the broker lost records): the state holds rows from the old
    topic, and lag computed from it would read 0."""
    return (
        f"{tp.topic}[{tp.partition}]: stored offset {stored:,} is past the partition's end "
        f"{end:,}; the topic was probably deleted and recreated, so the state holds rows of the "
        "old topic and lag is unknown. Rebuild it (`tally rebuild --url URL AGGREGATE`, or "
        "consume into a fresh --data-dir)"
    )
