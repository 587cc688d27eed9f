"""tally's running processes: Kafka consumption, replay, dead letters, HTTP, CLI.

Names are imported lazily so that `tally query` does not pay for aiokafka.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import ClientError, TallyClient
    from .definitions import load_definitions
    from .live_patch import PatchSessions, RemotePatcher
    from .producer import ChangeProducer, SyncChangeProducer
    from .runner import ConsumerProcess, ConsumerStats
    from .settings import load_settings
    from .streams import offset_key, stored_offsets

_WHERE = {
    "ChangeProducer": ".producer",
    "ClientError": ".client",
    "ConsumerProcess": ".runner",
    "ConsumerStats": ".runner",
    "SyncChangeProducer": ".producer",
    "TallyClient": ".client",
    "PatchSessions": ".live_patch",
    "RemotePatcher": ".live_patch",
    "load_definitions": ".definitions",
    "load_settings": ".settings",
    "offset_key": ".streams",
    "stored_offsets": ".streams",
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
