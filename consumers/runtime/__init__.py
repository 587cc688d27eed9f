"""The consumer runtime: the process loop, streams and generations, dead letters, stats,
live patch sessions. One `ConsumerProcess` per data dir."""

from consumers.runtime.definitions import id_fields_by_table, load_definitions
from consumers.runtime.patches import PatchError, PatchSession, PatchSessions
from consumers.runtime.process import ConsumerProcess
from consumers.runtime.stats import LATENCY_BUCKETS, ConsumerStats
from consumers.runtime.streams import LIVE, Stream, offset_key, stored_offsets

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
