"""`TallyClient`: the Python client of the HTTP API (standard library only).

`TallyClient.aggregate(name)` gives a `RemoteAggregate`, with `engine.Aggregate`'s reads.
"""

from tally.consumers.client.client import (
    DEFAULT_URL,
    ClientError,
    RemoteAggregate,
    ServerUnreachable,
    TallyClient,
)
from tally.consumers.client.patcher import RemotePatcher

__all__ = [
    "DEFAULT_URL",
    "ClientError",
    "RemoteAggregate",
    "RemotePatcher",
    "ServerUnreachable",
    "TallyClient",
]
