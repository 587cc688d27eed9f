"""Streams: a set of aggregate generations fed from Kafka with their own offsets.

The *live* stream feeds every ready generation. A generation that must be
built — a new aggregate on an existing topic, a changed definition, an
explicit rebuild — gets a *replay* stream that reads its topics from the
beginning offsets with offsets of its own, committed with its state, so a
crash resumes the replay where it stopped. When the replay reaches the live
stream's position it joins it: in one batch the catalog switches the
generation to active, the previous generation is dropped, and the live
stream feeds it from exactly the offset where the replay stopped — no gap,
no double-apply.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiokafka.structs import TopicPartition

from tally.engine import Store, TableAggregate
from tally.engine.triggers import Applier

__all__ = ["LIVE", "OFFSETS_ROOT", "Stream", "offset_key", "stored_offsets"]

LIVE = "live"
OFFSETS_ROOT = b"offsets/"


def _prefix(stream: str) -> bytes:
    return OFFSETS_ROOT + stream.encode() + b"/"


def offset_key(topic: str, partition: int, stream: str = LIVE) -> bytes:
    """Store metadata key holding the next offset a stream reads from a partition."""
    return _prefix(stream) + topic.encode() + b"\x00" + str(partition).encode()


def stored_offsets(store: Store, stream: str = LIVE) -> dict[TopicPartition, int]:
    """The committed next offsets of every partition a stream has consumed."""
    prefix = _prefix(stream)
    out = {}
    for k, v in store.scan_meta(prefix):
        topic, _, part = k[len(prefix) :].partition(b"\x00")
        out[TopicPartition(topic.decode(), int(part))] = int.from_bytes(v, "big")
    return out


@dataclass
class Stream:
    """Generations fed together: logical name → (definition, physical aggregate)."""

    key: str
    targets: dict[str, tuple[TableAggregate, str]]
    applier: Applier
    topics: list[str]
    tps: list[TopicPartition] = field(default_factory=list)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    start_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    end_at_start: dict[TopicPartition, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    events: int = 0
    consumer: Any = None
    pending: Any = None  # apply.Pending gathered by a replay, committed as one chunk
    pending_offsets: dict[TopicPartition, int] = field(default_factory=dict)

    @property
    def is_live(self) -> bool:
        return self.key == LIVE

    def put_offsets(self, batch: Any, offsets: dict[TopicPartition, int]) -> None:
        for tp, off in offsets.items():
            batch.put_meta(offset_key(tp.topic, tp.partition, self.key), off.to_bytes(8, "big"))

    def progress(self) -> dict[str, Any]:
        """Replay progress against the end offsets captured when it started.

        ``read`` counts positions read so far, the chunk gathered in memory and not yet
        committed included (``pending`` events), so progress shows from the first batch
        on, not only once the first chunk (`replay_chunk` events) commits; ``replayed``
        counts committed positions only. ``percent`` and ``eta_s`` follow ``read``;
        ``events`` and ``events_per_s`` are this run's (read) events.
        """
        read_at = dict(self.offsets)
        read_at.update(self.pending_offsets)
        total = sum(
            max(0, end - self.start_offsets.get(tp, 0)) for tp, end in self.end_at_start.items()
        )

        def done(at: dict[TopicPartition, int]) -> int:
            return sum(
                max(0, min(at.get(tp, 0), end) - self.start_offsets.get(tp, 0))
                for tp, end in self.end_at_start.items()
            )

        read, replayed = done(read_at), done(self.offsets)
        pending = int(getattr(self.pending, "events", 0) or 0)
        events = self.events + pending
        elapsed = max(1e-9, time.monotonic() - self.started)
        rate = events / elapsed
        out: dict[str, Any] = {
            "stream": self.key,
            "events": events,
            "read": read,
            "pending": pending,
            "replayed": replayed,
            "total": total,
            "percent": round(100.0 * read / total, 2) if total else 100.0,
            "events_per_s": round(rate, 1),
        }
        if rate > 0 and total > read:
            out["eta_s"] = round((total - read) / rate, 1)
        return out
