"""`TallyClient`: the Python client of the HTTP API (standard library only)."""

from consumers.client.client import DEFAULT_URL, ClientError, ServerUnreachable, TallyClient
from consumers.client.patcher import RemotePatcher

__all__ = ["DEFAULT_URL", "ClientError", "RemotePatcher", "ServerUnreachable", "TallyClient"]
