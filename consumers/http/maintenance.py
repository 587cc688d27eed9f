"""The state-changing routes, served only with a token: rebuild and live patch sessions.

With ``--token``, (``Authorization: Bearer <token>``)::

    POST   /v1/aggregates/{name}/rebuild                   rebuild by replay
    POST   /v1/aggregates/{name}/patch-sessions            open a live patch session
    POST   /v1/aggregates/{name}/patch-sessions/{session}  apply a chunk of fixes (msgpack)
    DELETE /v1/aggregates/{name}/patch-sessions/{session}  close it; its totals

State-changing routes are declared with `protected_route` (they land in
`PROTECTED_ROUTES`); `tally.consumers.http.app.create_app` registers them, wrapped in
`require_token`, only when the process has a token, so without one they do not exist at
all. Declare them in this module (or in one it imports) so they are registered before
`create_app` runs.
"""

from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web

from tally.consumers.http.common import (
    PROCESS,
    ApiError,
    Handler,
    check_aggregate,
    json_response,
    read_body,
)
from tally.consumers.http.openapi import RouteDoc, route_operation_id
from tally.engine.reconcile import decode_fixes
from tally.schemas.maintenance import (
    PatchChunkAnswer,
    PatchSessionAnswer,
    PatchTotalsAnswer,
    RebuildAnswer,
)

__all__ = [
    "PROTECTED_ROUTES",
    "ProtectedRoute",
    "protected_route",
    "require_token",
    "template_regex",
]


@dataclass(frozen=True)
class ProtectedRoute:
    """A state-changing route: served only with a token, behind `require_token`."""

    method: str
    path: str
    handler: Handler
    summary: str
    description: str = ""
    request_schema: dict[str, Any] | None = None
    response_schema: dict[str, Any] | type[msgspec.Struct] | None = None
    """The success answer: a Struct (its schema is generated), or a JSON schema."""
    status: int = 200
    """The success status the handler answers."""
    errors: Mapping[int, str] = field(default_factory=dict)
    """Error statuses it answers besides 400/401/500 and the HTTP layer's (documented)."""
    request_media_type: str = "application/json"
    links: Mapping[str, dict[str, Any]] = field(default_factory=dict)
    """OpenAPI links of the success response."""

    def doc(self) -> RouteDoc:
        return RouteDoc(
            self.method,
            self.path,
            self.summary,
            self.description,
            self.request_schema,
            self.response_schema or {"type": "object"},
            status=self.status,
            errors=self.errors,
            request_media_type=self.request_media_type,
            links=self.links,
        )


PROTECTED_ROUTES: list[ProtectedRoute] = []
"""Registry filled by `protected_route`; `create_app` serves them only with a token."""


def protected_route(
    method: str,
    path: str,
    *,
    summary: str,
    description: str = "",
    request_schema: dict[str, Any] | None = None,
    response_schema: dict[str, Any] | type[msgspec.Struct] | None = None,
    status: int = 200,
    errors: Mapping[int, str] | None = None,
    request_media_type: str = "application/json",
    links: Mapping[str, dict[str, Any]] | None = None,
) -> Callable[[Handler], Handler]:
    """Declare a state-changing route (e.g. rebuild, reconcile, clear).

    The handler gets the process as ``request.app[PROCESS]``. It is
    registered (behind `require_token`) only when the consumer has a token.
    ``errors``: every other error status it answers, with why (the OpenAPI
    document lists them; the fuzzer in tests/test_http_fuzz.py holds us to it).
    """

    def register(handler: Handler) -> Handler:
        PROTECTED_ROUTES.append(
            ProtectedRoute(
                method.upper(),
                path,
                handler,
                summary,
                description,
                request_schema,
                response_schema,
                status,
                dict(errors or {}),
                request_media_type,
                dict(links or {}),
            )
        )
        return handler

    return register


def require_token(token: str) -> Callable[[Handler], Handler]:
    """Wrap a handler so it answers 401 unless ``Authorization: Bearer <token>`` matches."""
    expected = f"Bearer {token}".encode()

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def checked(request: web.Request) -> web.StreamResponse:
            got = request.headers.get("Authorization", "").strip().encode("utf-8", "replace")
            if not hmac.compare_digest(got, expected):
                why = "a wrong bearer token" if got else "no Authorization header"
                err = ApiError(
                    401,
                    "unauthorized",
                    f"{request.method} {request.path} changes state and needs "
                    f"'Authorization: Bearer <token>' with the consumer's --token; got {why}",
                )
                err.headers["WWW-Authenticate"] = 'Bearer realm="tally"'
                raise err
            return await handler(request)

        return checked

    return wrap


def template_regex(path: str) -> re.Pattern[str]:
    """A regex matching the concrete paths of a route template (``{name}`` = one segment)."""
    parts = re.split(r"(\{[^}]*\})", path)
    body = "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(f"^{body}$")


@protected_route(
    "POST",
    "/v1/aggregates/{name}/rebuild",
    summary="Clear and rebuild an aggregate by replaying its topics",
    description=(
        "Starts a new generation built by replay from the topics' beginning offsets. The current "
        "generation keeps serving (state `stale`; with `--stale drop` it stops at once) until the new "
        "one has caught up; then the switch is atomic. Answers 202 at once; follow progress in /status."
    ),
    status=202,
    response_schema=RebuildAnswer,
    errors={404: "Unknown aggregate.", 501: "This process cannot rebuild aggregates."},
)
async def rebuild(request: web.Request) -> web.StreamResponse:
    process = request.app[PROCESS]
    name = request.match_info["name"]
    check_aggregate(request, name)
    rebuild_all = getattr(process, "rebuild_all", None)
    if rebuild_all is not None:  # a member: every member rebuilds its partitions
        members = await rebuild_all(name, forwarded=request.query.get("scope") == "member")
        result = {"aggregate": name, "status": "rebuild requested", "members": members}
        return json_response({"result": result}, 202)
    request_rebuild = getattr(process, "request_rebuild", None)
    if request_rebuild is None:
        raise ApiError(501, "not_supported", "this process cannot rebuild aggregates")
    request_rebuild(name)
    return json_response({"result": {"aggregate": name, "status": "rebuild requested"}}, 202)


def _patch_sessions(request: web.Request) -> Any:
    process = request.app[PROCESS]
    sessions = getattr(process, "patches", None)
    if sessions is None and getattr(process, "member_status", None) is not None:
        raise ApiError(
            501,
            "not_supported",
            "a member of a deployment takes patches per partition: run `tally reconcile "
            "AGGREGATE --patch --url URL` (it sends each fix to its row's partition on the "
            "member owning it)",
        )
    if sessions is None:
        raise ApiError(501, "not_supported", "this process cannot patch aggregates")
    return sessions


@protected_route(
    "POST",
    "/v1/aggregates/{name}/patch-sessions",
    summary="Open a patch session (live reconcile)",
    description=(
        "From now on the consumer records every id its live stream writes to the aggregate; fixes sent to "
        "the session skip those ids (the live change is newer than any source read after this call). "
        "Used by `tally reconcile --patch --url`; see consumers/runtime/patches.py for the rule."
    ),
    response_schema=PatchSessionAnswer,
    status=201,
    errors={
        404: "Unknown aggregate.",
        409: "`not_live` or `rebuilding`: the aggregate is being built or rebuilt by replay.",
        429: "`too_many_sessions`: wait for one to end.",
        501: "This process cannot patch aggregates.",
        503: "`not_ready` (no partitions yet) or `broker_unreachable`: retry shortly; or the connection "
        "limit is reached.",
    },
    links={
        f"{verb}_session": {
            "operationId": route_operation_id(
                method, "/v1/aggregates/{name}/patch-sessions/{session}"
            ),
            "parameters": {
                "name": "$request.path.name",
                "session": "$response.body#/result/session",
            },
        }
        for verb, method in (("chunk", "POST"), ("close", "DELETE"))
    },
)
async def patch_begin(request: web.Request) -> web.StreamResponse:
    s = await _patch_sessions(request).begin(request.match_info["name"])
    return json_response(
        {
            "result": {
                "session": s.id,
                "aggregate": s.aggregate,
                "generation": s.physical,
                "fingerprint": s.fingerprint,
            }
        },
        201,
    )


@protected_route(
    "POST",
    "/v1/aggregates/{name}/patch-sessions/{session}",
    summary="Apply a chunk of fixes in a patch session",
    description=(
        'Body: application/msgpack {"changes": [[id, key, namespace, sum] | [id]]} with keys as '
        "tally.engine.encode_key bytes ([id] alone: the id must be absent). Applied between two live batches "
        "through the events' write path, skipping ids written live since the session opened. 503 "
        "`catching_up` when the live stream has not yet read up to the offsets of the session's start: "
        "send the chunk again."
    ),
    response_schema=PatchChunkAnswer,
    request_media_type="application/msgpack",
    request_schema={
        "type": "object",
        "required": ["changes"],
        "properties": {
            "changes": {
                "type": "array",
                "description": "[id, key, namespace, sum] (upsert) or [id] (must be absent); keys, ids and "
                "namespaces as tally.engine.encode_key bytes (msgpack bin).",
                "items": {
                    "oneOf": [
                        {"type": "array", "minItems": 4, "maxItems": 4},
                        {"type": "array", "minItems": 1, "maxItems": 1},
                    ]
                },
            }
        },
    },
    errors={
        404: "Unknown aggregate, or `unknown_session` (expired or never opened).",
        409: "`truncated`, `generation_switched`, `not_live` or `rebuilding`: run the reconcile again.",
        415: "`unsupported_media_type`: the body must be application/msgpack.",
        501: "This process cannot patch aggregates.",
        503: "`catching_up` or `busy`: send the chunk again; or the connection limit is reached.",
    },
)
async def patch_chunk(request: web.Request) -> web.StreamResponse:
    """Apply one msgpack chunk of fixes."""

    sessions = _patch_sessions(request)
    ctype = request.content_type
    if ctype != "application/msgpack":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"a patch chunk is application/msgpack (got {ctype!r}); `tally reconcile --patch --url` sends them",
        )
    changes = decode_fixes(await read_body(request))
    result = await sessions.apply(
        request.match_info["name"], request.match_info["session"], changes
    )
    return json_response({"result": result})


@protected_route(
    "DELETE",
    "/v1/aggregates/{name}/patch-sessions/{session}",
    summary="Close a patch session; answers its totals",
    response_schema=PatchTotalsAnswer,
    errors={
        404: "`unknown_session` (expired or never opened) or unknown aggregate.",
        501: "This process cannot patch aggregates.",
    },
)
async def patch_end(request: web.Request) -> web.StreamResponse:
    totals = _patch_sessions(request).end(request.match_info["name"], request.match_info["session"])
    return json_response({"result": totals})
