"""tally's running processes: Kafka consumption, replay, dead letters, HTTP, CLI.

Names are imported lazily so that `tally query` does not pay for aiokafka.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumers.cli.settings import load_settings
    from consumers.client.client import ClientError, TallyClient
    from consumers.client.patcher import RemotePatcher
    from consumers.producer.producer import ChangeProducer, SyncChangeProducer
    from consumers.runtime.definitions import load_definitions
    from consumers.runtime.patches import PatchSessions
    from consumers.runtime.process import ConsumerProcess
    from consumers.runtime.stats import ConsumerStats
    from consumers.runtime.streams import offset_key, stored_offsets

_WHERE = {
    "ChangeProducer": ".producer",
    "ClientError": ".client",
    "ConsumerProcess": ".runtime",
    "ConsumerStats": ".runtime",
    "SyncChangeProducer": ".producer",
    "TallyClient": ".client",
    "PatchSessions": ".runtime.patches",
    "RemotePatcher": ".client",
    "load_definitions": ".runtime",
    "load_settings": ".cli.settings",
    "offset_key": ".runtime",
    "stored_offsets": ".runtime",
}

__all__ = [
    "ChangeProducer",
    "ClientError",
    "ConsumerProcess",
    "ConsumerStats",
    "PatchSessions",
    "RemotePatcher",
    "SyncChangeProducer",
    "TallyClient",
    "load_definitions",
    "load_settings",
    "offset_key",
    "stored_offsets",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'consumers' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
