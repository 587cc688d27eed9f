"""A replay's progress counts what it has read, not only what it has committed.

A replay gathers batches in memory and commits them as one chunk (`replay_chunk`,
500,000 events by default); its progress (in /status and in the 503 of a read of an
aggregate it builds) must move from the first batch on, not stay at 0% until then.
The same progress served over HTTP is checked end to end in
tests/test_poison.py::test_an_unwritable_dead_letter_topic_is_reported_and_recovers.
"""

from __future__ import annotations

import types

import pytest
from aiokafka.structs import TopicPartition

from tally.consumers.runtime.streams import Stream
from tally.engine import AggregateNotReady
from tally.engine.catalog import Generation, not_ready


def _stream() -> Stream:
    s = Stream("replay-1", {}, applier=None, topics=["t"])  # type: ignore[arg-type]
    a, b = TopicPartition("t", 0), TopicPartition("t", 1)
    s.tps = [a, b]
    s.start_offsets = {a: 0, b: 100}
    s.end_at_start = {a: 600, b: 500}  # 1,000 events to replay
    s.offsets = {a: 0, b: 100}
    return s


def test_progress_counts_the_chunk_being_gathered() -> None:
    s = _stream()
    a, b = s.tps
    p = s.progress()
    assert (p["read"], p["pending"], p["replayed"], p["total"], p["percent"]) == (
        0,
        0,
        0,
        1000,
        0.0,
    )

    # Two batches gathered, nothing committed yet.
    s.pending = types.SimpleNamespace(events=250)
    s.pending_offsets = {a: 150, b: 200}
    p = s.progress()
    assert (p["read"], p["pending"], p["replayed"], p["events"]) == (250, 250, 0, 250)
    assert p["percent"] == 25.0 and p["events_per_s"] > 0 and "eta_s" in p

    # The chunk commits (what `_flush_replay` does), then another batch is gathered.
    s.offsets.update(s.pending_offsets)
    s.events += 250
    s.pending, s.pending_offsets = types.SimpleNamespace(events=300), {a: 450}
    p = s.progress()
    assert (p["read"], p["pending"], p["replayed"], p["events"], p["percent"]) == (
        550,
        300,
        250,
        550,
        55.0,
    )


def test_not_ready_says_how_much_is_read() -> None:
    s = _stream()
    s.pending = types.SimpleNamespace(events=400)
    s.pending_offsets = {s.tps[0]: 400}
    e = not_ready("scores", s.progress())
    assert isinstance(e.progress, dict)
    assert "400 of 1,000 events read, 40.0%" in str(e) and e.progress["read"] == 400
    # The catalog's own error (what a reader of the data dir sees) uses the same words.
    g = Generation(building="scores#1", progress=s.progress())
    with pytest.raises(AggregateNotReady, match="400 of 1,000 events read"):
        g.resolve("scores", partial=False)
    with pytest.raises(AggregateNotReady, match="replay starting"):
        Generation(building="scores#1", progress={"stream": "replay-1"}).resolve(
            "scores", partial=False
        )
