"""tally's running processes: Kafka consumption, replay, dead letters, HTTP, CLI.

Names are imported lazily so that `tally query` does not pay for aiokafka.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tally.consumers.cli.settings import load_settings
    from tally.consumers.client.client import ClientError, TallyClient
    from tally.consumers.client.patcher import RemotePatcher
    from tally.consumers.cluster.member import MemberProcess
    from tally.consumers.producer.producer import ChangeProducer, SyncChangeProducer
    from tally.consumers.runtime.definitions import load_definitions
    from tally.consumers.runtime.patches import PatchSessions
    from tally.consumers.runtime.process import ConsumerProcess
    from tally.consumers.runtime.stats import ConsumerStats
    from tally.consumers.runtime.streams import offset_key, stored_offsets

_WHERE = {
    "ChangeProducer": ".producer",
    "ClientError": ".client",
    "ConsumerProcess": ".runtime",
    "ConsumerStats": ".runtime",
    "MemberProcess": ".cluster.member",
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
    "MemberProcess",
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
        raise AttributeError(f"module 'tally.consumers' has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)
