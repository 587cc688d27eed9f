"""tally's running processes: Kafka consumption, replay, dead letters, CLI."""

from .apply import Applier, ApplyResult
from .definitions import load_definitions
from .producer import ChangeProducer, SyncChangeProducer
from .runner import ConsumerProcess, ConsumerStats, offset_key, stored_offsets
from .settings import load_settings

__all__ = [
    "Applier",
    "ApplyResult",
    "ChangeProducer",
    "ConsumerProcess",
    "ConsumerStats",
    "SyncChangeProducer",
    "load_definitions",
    "load_settings",
    "offset_key",
    "stored_offsets",
]
