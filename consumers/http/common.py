"""What every route module of the HTTP API shares.

The served process (`Served`, `Stats`), the application keys handlers read it through,
the error envelope (`ApiError`: ``{"error": {"code", "message", ...}}``), JSON answers,
and the bounded read of a request body (`read_body`). Route modules (`reads`, `status`,
`metrics`, `maintenance`) import this; `tally.consumers.http.app` assembles them.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from aiokafka.structs import TopicPartition

from tally.consumers.http.limits import ConnectionStats
from tally.consumers.logs import get_logger
from tally.engine import Store, TableAggregate
from tally.schemas.config import ConsumerSettings
from tally.schemas.values import RESPONSE_ENCODER

__all__ = [
    "BODY_TIMEOUT",
    "CONNECTIONS",
    "DEFINITIONS",
    "MAX_BODY",
    "OPENAPI",
    "PROCESS",
    "TOKEN_ROUTES",
    "ApiError",
    "Handler",
    "Served",
    "Stats",
    "check_aggregate",
    "encoder",
    "json_response",
    "read_body",
    "short",
    "too_large",
]

MAX_BODY = 1 << 20
"""Request body limit (bytes): larger bodies get a 413."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Stats(Protocol):
    """The counters the API reports (`tally.consumers.runtime.stats.ConsumerStats` has them)."""

    started: float
    events: int
    batches: int
    dead_letters: int
    changed: int
    latency_buckets: list[int]
    """Per bucket of `LATENCY_BUCKETS` (not cumulative), then the overflow bucket."""
    latency_sum: float
    offsets: dict[TopicPartition, int]
    end_offsets: dict[TopicPartition, int]
    beyond_end: dict[TopicPartition, tuple[int, int]]
    """Partitions whose stored offset was past the partition's end: (stored, end)."""
    broker_ok: bool

    def lag(self) -> dict[TopicPartition, int]: ...


class Served(Protocol):
    """What the HTTP API needs of a process (`ConsumerProcess` provides it)."""

    @property
    def store(self) -> Store | None: ...

    """None for a member of a deployment, which reads through its ``read`` method."""

    @property
    def definitions(self) -> list[TableAggregate]: ...
    @property
    def stats(self) -> Stats: ...
    @property
    def settings(self) -> ConsumerSettings: ...
    @property
    def topics(self) -> list[str]: ...
    @property
    def table_topics(self) -> dict[str, str]: ...
    @property
    def assigned(self) -> list[TopicPartition]: ...


PROCESS: web.AppKey[Served] = web.AppKey("tally.process")
"""``request.app[PROCESS]``: the served process (handlers of protected routes use it)."""
DEFINITIONS: web.AppKey[dict[str, TableAggregate]] = web.AppKey("tally.definitions")
OPENAPI: web.AppKey[bytes] = web.AppKey("tally.openapi")
TOKEN_ROUTES: web.AppKey[list[tuple[str, re.Pattern[str], str]]] = web.AppKey("tally.token_routes")
BODY_TIMEOUT: web.AppKey[float] = web.AppKey("tally.body_timeout")
CONNECTIONS: web.AppKey[ConnectionStats] = web.AppKey("tally.connections")


encoder = RESPONSE_ENCODER
"""The JSON encoder of every answer: Decimals as exact JSON numbers, dates as ISO strings
(`tally.schemas.values`)."""


def json_response(
    obj: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """``obj`` as a JSON answer."""
    return web.Response(
        body=encoder.encode(obj), status=status, content_type="application/json", headers=headers
    )


class ApiError(Exception):
    """An error answer: HTTP status, machine code, human message (+ extra error fields)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra
        self.headers: dict[str, str] = {}
        self.close_connection = False
        """Close the connection after this answer (e.g. a body that did not arrive)."""

    def response(self) -> web.Response:
        body = {"error": {"code": self.code, "message": self.message, **self.extra}}
        resp = json_response(body, self.status, self.headers)
        if self.close_connection:
            resp.force_close()
        return resp


def short(value: Any) -> str:
    """``repr(value)``, cut to 80 characters."""
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def too_large(size: int | None = None) -> ApiError:
    """The 413 of a body over `MAX_BODY`."""
    got = f" ({size} bytes)" if size is not None else ""
    return ApiError(
        413,
        "payload_too_large",
        f"request body is over the {MAX_BODY} byte limit{got}: split the queries over several "
        "requests",
    )


async def read_body(request: web.Request) -> bytes:
    """The request's body, within the body timeout (``http_body_timeout``) and `MAX_BODY`.

    A body that has not arrived in time is answered 408 and the connection closed:
    a slow or stalled client cannot hold a connection (and its descriptor) open.
    """
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large(request.content_length)
    timeout = request.app.get(BODY_TIMEOUT, 30.0)
    try:
        async with asyncio.timeout(timeout):
            return await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    except TimeoutError:
        stats = request.app.get(CONNECTIONS)
        if stats is not None:
            stats.timeouts["body"] += 1
        get_logger(component="http").info(
            "http body timed out", method=request.method, path=request.path, timeout=timeout
        )
        err = ApiError(
            408,
            "request_timeout",
            f"the request body did not arrive within {timeout:g} s (http_body_timeout): "
            "send the whole body at once",
        )
        err.close_connection = True
        raise err from None


def check_aggregate(request: web.Request, name: str) -> None:
    """Raise a 404 listing the known aggregates unless ``name`` is one of them."""
    defs = request.app[DEFINITIONS]
    if name not in defs:
        known = sorted(defs)
        raise ApiError(
            404,
            "unknown_aggregate",
            f"no aggregate named {name!r} in this consumer; known: {', '.join(known) or '(none)'} "
            "(GET /v1/aggregates lists them)",
            known=known,
        )
