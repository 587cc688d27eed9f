"""The consumer runtime: the process loop, streams and generations, dead letters, stats,
live patch sessions. One `ConsumerProcess` per data dir."""

from tally.consumers.runtime.definitions import id_fields_by_table, load_definitions
from tally.consumers.runtime.patches import PatchError, PatchSession, PatchSessions
from tally.consumers.runtime.process import ConsumerProcess
from tally.consumers.runtime.stats import LATENCY_BUCKETS, ConsumerStats
from tally.consumers.runtime.streams import LIVE, Stream, offset_key, stored_offsets

__all__ = [
    "LATENCY_BUCKETS",
    "LIVE",
    "ConsumerProcess",
    "ConsumerStats",
    "PatchError",
    "PatchSession",
    "PatchSessions",
    "Stream",
    "id_fields_by_table",
    "load_definitions",
    "offset_key",
    "stored_offsets",
]
