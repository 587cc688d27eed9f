"""The HTTP JSON API of a consumer process: aiohttp, in the consumer's own event loop.

This module assembles the app (`create_app`), serves it (`start_http`) and turns every
error into the JSON envelope (its middleware). The routes live by role:

* `tally.consumers.http.reads` — ``/v1/aggregates`` and the reads of `tally.schemas.reads.READ_OPS`
  (``POST /v1/aggregates/{name}/{op}``, or ``GET`` with JSON-encoded query parameters);
* `tally.consumers.http.status` — ``/status``, ``/readyz``, ``/healthz``;
* `tally.consumers.http.metrics` — ``/metrics`` (Prometheus text format);
* `tally.consumers.http.maintenance` — the token-protected rebuild and patch-session routes;
* `tally.consumers.http.openapi` — ``GET /openapi.json``, generated from the same tables.

For example::

    curl -s localhost:8750/v1/aggregates/by_game/count \\
         -d '{"namespace": "chess", "bounds": {"lower": {"key": 1000}}}'
    curl -sG localhost:8750/v1/aggregates/by_game/count \\
         --data-urlencode 'namespace="chess"' --data-urlencode 'bounds={"lower":{"key":1000}}'

**Errors.** Every bad request gets a 4xx ``{"error": {"code", "message"}}``
whose message says what was wrong and what to do (unknown aggregate or op:
404 listing the known ones; bad JSON, arguments, bounds, keys, cursors: 400;
``offset_out_of_range``: 400 naming the count; body over `MAX_BODY`: 413;
an aggregate being built: 503 with its ``progress``). Anything unexpected is
a logged 500 JSON error, never a dropped connection. A client that goes away
mid-request is an info line, not an error.

**Transport** (`tally.consumers.http.limits`, settings ``http_*``). Connections are
capped (over the cap: 503 ``too_many_connections``, closed at once; the
default cap is what the open-file limit leaves after RocksDB, Kafka and the
process) and timed: idle, headers (from a request's first byte) and body
(408 ``request_timeout``, then closed). aiohttp's own answers to malformed
requests use the same JSON envelope. ``GET /openapi.json`` documents all of
it per operation, and ``tests/test_http_fuzz.py`` fuzzes the running server
against that document.

**Token.** The state-changing routes (`tally.consumers.http.maintenance.PROTECTED_ROUTES`) are
registered, behind `require_token`, only when the process has a token; without one they
do not exist at all.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from collections.abc import Iterable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from tally.consumers.cluster.membership import MembershipUnknown
from tally.consumers.cluster.merge import CoverageError, StateMoved
from tally.consumers.cluster.transport import MemberUnreachable, PartitionMoving
from tally.consumers.http import internal, metrics, reads, status
from tally.consumers.http.common import (
    BODY_TIMEOUT,
    CONNECTIONS,
    DEFINITIONS,
    MAX_BODY,
    OPENAPI,
    PROCESS,
    TOKEN_ROUTES,
    ApiError,
    Handler,
    Served,
    check_aggregate,
    encoder,
    too_large,
)
from tally.consumers.http.limits import ConnectionStats, HttpLimits, LimitedSite
from tally.consumers.http.maintenance import (
    PROTECTED_ROUTES,
    ProtectedRoute,
    require_token,
    template_regex,
)
from tally.consumers.http.openapi import build_openapi
from tally.consumers.logs import get_logger
from tally.consumers.runtime.patches import PatchError
from tally.engine import (
    AggregateNotReady,
    InvalidArgument,
    InvalidKey,
    OffsetOutOfRange,
    TallyError,
)
from tally.engine.catalog import not_ready
from tally.schemas import ConfigError
from tally.schemas.reads import READ_OPS

__all__ = ["create_app", "parse_address", "start_http", "warn_if_exposed"]


async def _openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


def create_app(
    process: Served,
    token: str | None,
    *,
    protected: Iterable[ProtectedRoute] | None = None,
    stats: ConnectionStats | None = None,
    body_timeout: float | None = None,
) -> web.Application:
    """The aiohttp application serving ``process``.

    ``protected`` defaults to `PROTECTED_ROUTES`; they are registered only if
    ``token`` is set (a non-empty string). ``stats``: the transport guards'
    counters, reported in /metrics; ``body_timeout``: seconds to wait for a
    request body (default: the process's ``http_body_timeout``). `start_http`
    passes both from its `HttpLimits`.
    """
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY)
    app.on_response_prepare.append(_errors_are_json)
    app[PROCESS] = process
    app[BODY_TIMEOUT] = float(
        process.settings.http_body_timeout if body_timeout is None else body_timeout
    )
    if stats is not None:
        app[CONNECTIONS] = stats
    defs = {d.name: d for d in process.definitions}
    app[DEFINITIONS] = defs
    routes = list(PROTECTED_ROUTES if protected is None else protected)
    app[TOKEN_ROUTES] = [(r.method, template_regex(r.path), r.path) for r in routes]

    r = app.router
    reads.add_routes(r)
    status.add_routes(r)
    metrics.add_routes(r)
    if getattr(process, "answer", None) is not None:  # members only; not in the OpenAPI
        internal.add_routes(r)
    r.add_get("/openapi.json", _openapi, allow_head=False)

    served: list[ProtectedRoute] = []
    if token:
        check = require_token(token)
        for pr in routes:
            r.add_route(pr.method, pr.path, check(pr.handler))
            served.append(pr)
    app[OPENAPI] = msgspec.json.encode(
        build_openapi(
            aggregates=sorted(defs),
            routes=[pr.doc() for pr in served],
            max_body=MAX_BODY,
            maximum=reads.HTTP_MAXIMUM,
        )
    )
    return app


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8750`` for IPv6; port 0 = any free port) → (host, port).

    The host is required: ``:8750`` used to mean every interface, silently; now
    listening beyond this machine takes an explicit ``0.0.0.0`` (or ``[::]``).
    """
    text = address.strip()
    host, sep, port_s = text.rpartition(":")
    if not sep or not port_s:
        raise ConfigError(
            f"--http takes HOST:PORT (e.g. 127.0.0.1:8750, or 0.0.0.0:8750 for every interface), got {address!r}"
        )
    if not host:
        raise ConfigError(
            f"--http {address!r} names no host: write 127.0.0.1:{port_s} to serve this machine only, "
            f"or 0.0.0.0:{port_s} to serve every interface (anyone who can reach it reads every aggregate)"
        )
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(
            f"--http: write an IPv6 host in brackets, e.g. [::1]:8750, got {address!r}"
        )
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"--http: port must be a number in 0..65535, got {port_s!r} in {address!r}"
        )
    return host, port


def _is_loopback(addr: Any) -> bool:
    try:
        return ipaddress.ip_address(str(addr[0]).split("%")[0]).is_loopback
    except (ValueError, IndexError, TypeError):
        return False


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def start_http(
    process: Served, address: str, token: str | None, *, limits: HttpLimits | None = None
) -> web.AppRunner:
    """Serve the API on ``address`` (HOST:PORT) in the running loop; returns the runner.

    Stop it with ``await runner.cleanup()``. Raises `ConfigError` for a bad
    address or a port that cannot be bound (e.g. already in use). Connections
    are capped and timed by ``limits`` (default: from the process's settings and
    open-file limit; see `tally.consumers.http.limits`). Listening on an address beyond
    loopback is logged as a warning naming it.
    """
    host, port = parse_address(address)
    if limits is None:
        limits = HttpLimits.from_settings(
            process.settings, getattr(process.store, "max_open_files", None)
        )
    stats = ConnectionStats()
    app = create_app(process, token, stats=stats, body_timeout=limits.body_timeout)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = LimitedSite(runner, host, port, limits=limits, stats=stats)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"cannot serve the HTTP API on {host}:{port}: port {port} is already in use "
                "(another tally consume?); choose another with --http HOST:PORT "
                "(or TALLY_HTTP), or run without it with --no-http"
            ) from None
        raise ConfigError(
            f"cannot serve the HTTP API on {address!r}: {e.strerror or e}; "
            "choose another address with --http HOST:PORT, or run without it with --no-http"
        ) from None
    addresses = [a for a in runner.addresses if isinstance(a, tuple) and len(a) >= 2]
    bound = int(addresses[0][1]) if addresses else port
    url = _url(host, bound)
    log = get_logger(component="http")
    log.info(
        "http api listening",
        url=url,
        openapi=url + "/openapi.json",
        protected_routes=len(PROTECTED_ROUTES) if token else 0,
        max_connections=limits.max_connections,
        idle_timeout=limits.idle_timeout,
        header_timeout=limits.header_timeout,
        body_timeout=limits.body_timeout,
        **(
            {"open_files": limits.budget.nofile, "reserved_files": limits.budget.reserved}
            if limits.budget
            else {}
        ),
    )
    if limits.over_budget and limits.budget is not None:
        log.warning(
            "http connections may starve the consumer of files",
            open_files=limits.budget.nofile,
            reserved=limits.budget.reserved,
            max_connections=limits.max_connections,
            hint="RocksDB, Kafka and the process need the reserved files: raise the open-file limit "
            "(ulimit -n) or lower http_max_connections",
        )
    warn_if_exposed(addresses, token)
    return runner


def warn_if_exposed(addresses: Iterable[Any], token: str | None) -> None:
    """Warn, naming them, about bound addresses beyond loopback (socket address tuples)."""
    beyond = sorted({_url(str(a[0]), int(a[1])) for a in addresses if not _is_loopback(a)})
    if beyond:
        get_logger(component="http").warning(
            "http api reachable beyond this machine",
            addresses=beyond,
            note="anyone who can reach these addresses reads every aggregate"
            + ("; state-changing routes need the token" if token else ""),
            hint="bind 127.0.0.1 (--http 127.0.0.1:PORT) unless other hosts must read it",
        )


# ---- errors -------------------------------------------------------------------------------

_OP_PATH = re.compile(r"^/v1/aggregates/([^/]+)/([^/]+)$")


def _not_found(request: web.Request) -> ApiError:
    for method, pattern, path in request.app[TOKEN_ROUTES]:
        if pattern.match(request.path):
            return ApiError(
                404,
                "not_found",
                f"{method} {path} changes state and is served only when the consumer has a token: "
                "start it with --token (or TALLY_TOKEN) and send 'Authorization: Bearer <token>'",
            )
    m = _OP_PATH.match(request.path)
    if m:
        name, op = m.group(1), m.group(2)
        try:
            check_aggregate(request, name)
        except ApiError as e:
            return e
        return ApiError(
            404,
            "unknown_op",
            f"unknown op {op!r}; ops are {', '.join(READ_OPS)} "
            f"(e.g. POST /v1/aggregates/{name}/count; GET /openapi.json describes them)",
            known=list(READ_OPS),
        )
    return ApiError(
        404,
        "not_found",
        f"no route {request.method} {request.path}: routes are /v1/aggregates, "
        "/v1/aggregates/{name}/{op}, /status, /metrics, /healthz, /readyz, /openapi.json",
    )


def _live_not_ready(request: web.Request, e: AggregateNotReady) -> AggregateNotReady:
    """``e`` with the serving process's current build progress (what /status shows: the
    chunk being gathered included), rather than the progress the last commit stored."""
    hook = getattr(request.app[PROCESS], "aggregate_states", None)
    name = request.match_info.get("name")
    if not callable(hook) or name is None:
        return e
    progress = (hook().get(name) or {}).get("progress")
    return not_ready(name, progress) if isinstance(progress, dict) else e


def _from_http_exception(request: web.Request, e: web.HTTPException) -> web.StreamResponse:
    if e.status == 404:
        return _not_found(request).response()
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        err = ApiError(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.path}; use {allowed}",
        )
        err.headers["Allow"] = ",".join(sorted(e.allowed_methods))
        return err.response()
    if e.status == 413:
        return too_large().response()
    if e.status < 400:
        return e
    return ApiError(
        e.status, re.sub(r"\W+", "_", e.reason.lower()).strip("_"), e.text or e.reason
    ).response()


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return e.response()
    except web.HTTPException as e:
        return _from_http_exception(request, e)
    except PatchError as e:
        return ApiError(e.status, e.code, str(e), **e.details).response()
    except AggregateNotReady as e:
        live = _live_not_ready(request, e)
        return ApiError(
            503,
            "not_ready",
            f"{live}; it answers once it has caught up (GET /status shows its progress)",
            progress=live.progress,
        ).response()
    except PartitionMoving as e:
        return ApiError(503, "partitions_moving", str(e), moving=e.moving).response()
    except (MemberUnreachable, MembershipUnknown, StateMoved, CoverageError) as e:
        code = {
            MemberUnreachable: "member_unreachable",
            MembershipUnknown: "membership_unknown",
            StateMoved: "state_moved",
        }.get(type(e), "partitions_moving")
        err = ApiError(503, code, str(e))
        err.headers["Retry-After"] = "1"
        return err.response()
    except OffsetOutOfRange as e:
        return ApiError(400, "offset_out_of_range", str(e)).response()
    except InvalidKey as e:
        return ApiError(400, "invalid_key", str(e)).response()
    except InvalidArgument as e:
        return ApiError(400, "invalid_argument", str(e)).response()
    except RecursionError:
        return ApiError(
            400,
            "bad_request",
            "the request nests arrays too deeply: keys may nest a few levels, not thousands",
        ).response()
    except RequestPayloadError as e:
        if _client_gone(request):
            return _went_away(request, e)
        # aiohttp could not read the body: bad chunked framing, undecodable gzip/deflate...
        detail = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        err = ApiError(
            400,
            "bad_body",
            f"the request body cannot be read ({detail}): send it whole, uncompressed or validly "
            "compressed (Content-Encoding gzip, deflate)",
        )
        err.close_connection = True
        request.content.feed_eof()  # nothing more to read: aiohttp must not linger on a broken body
        return err.response()
    except ConnectionError as e:
        if not _client_gone(request):
            return _internal(request, e)
        return _went_away(request, e)
    except Exception as e:
        return _internal(request, e)


def _went_away(request: web.Request, e: Exception) -> web.StreamResponse:
    """The client went away (e.g. mid-body): not a server error, and nobody to answer."""
    get_logger(component="http").info(
        "http client disconnected",
        method=request.method,
        path=request.path,
        error=str(e) or type(e).__name__,
    )
    # Never sent (the connection is gone; aiohttp drops it). 499 is nginx's name for this.
    return web.Response(status=499, reason="Client Closed Request")


async def _errors_are_json(request: web.Request, response: web.StreamResponse) -> None:
    """Last resort (``on_response_prepare``): an error answer aiohttp made outside the
    middleware — e.g. its 417 for an ``Expect`` other than 100-continue, sent before routing's
    handler runs — gets the API's envelope too."""
    if (
        response.status < 400
        or not isinstance(response, web.Response)
        or response.content_type == "application/json"
        or request.method == "HEAD"
    ):
        return
    message = (response.text or "").strip() or response.reason
    if response.status == 417:
        message += "; only 'Expect: 100-continue' is supported"
    code = re.sub(r"\W+", "_", response.reason.lower()).strip("_") or "error"
    body = encoder.encode({"error": {"code": code, "message": message}})
    response.body = body
    response.headers["Content-Type"] = "application/json"
    response.headers["Content-Length"] = str(len(body))


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _internal(request: web.Request, e: Exception) -> web.StreamResponse:
    """A logged 500 for an unexpected error (call it inside the ``except`` block: it logs the traceback)."""
    kind = "a tally error" if isinstance(e, TallyError) else "an unexpected error"
    get_logger(component="http").exception(
        "http request failed", method=request.method, path=request.path, error=str(e)
    )
    return ApiError(
        500,
        "internal",
        f"{kind} answering {request.method} {request.path}: {type(e).__name__}: {e} "
        "(logged by the consumer; the request was not applied anywhere, retry or report it)",
    ).response()
