"""The members' own route: ``POST /internal/v1/calls`` (`tally.consumers.cluster.transport`).

Registered only for a member of a deployment (a process with an ``answer`` method): the calls
of one round of another member's merge (or a reconcile's partition calls), answered from this
member's partitions, msgpack both ways. Not part of the public API, so not in the OpenAPI
document; it changes with tally's version, and members of one deployment run the same one.
"""

from __future__ import annotations

from aiohttp import web

from tally.consumers.cluster.transport import INTERNAL_PATH, decode_calls, encode_outcomes
from tally.consumers.http.common import PROCESS, ApiError, read_body

__all__ = ["add_routes"]


async def _calls(request: web.Request) -> web.StreamResponse:
    process = request.app[PROCESS]
    answer = getattr(process, "answer", None)
    if answer is None:
        raise ApiError(
            404,
            "not_a_member",
            "this consumer is not a member of a deployment (started without --group-id)",
        )
    calls = decode_calls(await read_body(request))
    outcomes = await answer(calls)
    return web.Response(
        body=encode_outcomes(getattr(process, "url", ""), outcomes),
        content_type="application/msgpack",
    )


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the internal route."""
    router.add_post(INTERNAL_PATH, _calls)
