"""The HTTP JSON API of a consumer process: aiohttp, in the consumer's own event loop.

Routes (``GET /openapi.json`` describes them all, with schemas)::

    GET  /v1/aggregates                     aggregates of this process, with item counts
    POST /v1/aggregates/{name}/{op}         a read; body = the Python API's keyword arguments
    GET  /v1/aggregates/{name}/{op}?a=JSON  the same read, each argument JSON-encoded
    GET  /status                            aggregates, partitions (offset, end, lag), counters
    GET  /metrics                           Prometheus text format
    GET  /healthz                           200 while the process runs
    GET  /readyz                            200 when assigned, broker up and lag <= ready_max_lag
    GET  /openapi.json                      OpenAPI 3.1 document

With ``--token``, also (``Authorization: Bearer <token>``)::

    POST   /v1/aggregates/{name}/rebuild                   rebuild by replay
    POST   /v1/aggregates/{name}/patch-sessions            open a live patch session
    POST   /v1/aggregates/{name}/patch-sessions/{session}  apply a chunk of fixes (msgpack)
    DELETE /v1/aggregates/{name}/patch-sessions/{session}  close it; its totals

``op`` is one of count, sum, at, index_of, min, max, random, paginate,
count_batch, sum_batch, at_batch, namespaces, taking the arguments of the
`engine.Aggregate` method of the same name: ``namespace``, ``bounds``
(``{"lower": {"key": 10, "inclusive": false, "id": 7}, "upper": ...}``,
``{"eq": ...}``, ``{"prefix": [...]}``), ``offset``, ``key``, ``id``,
``order``, ``cursor``, ``page_size``, ``queries`` (a list of ``{namespace,
bounds, offset}``). Keys are JSON scalars or arrays (arrays are tuples). A
read answers ``{"result": ...}``, items as ``{"key", "id", "sum_value",
"namespace"}``. For example::

    curl -s localhost:8750/v1/aggregates/by_game/count \\
         -d '{"namespace": "chess", "bounds": {"lower": {"key": 1000}}}'
    curl -sG localhost:8750/v1/aggregates/by_game/count \\
         --data-urlencode 'namespace="chess"' --data-urlencode 'bounds={"lower":{"key":1000}}'

**Consistency.** Handlers read the store synchronously, without awaiting in
between, and the consumer applies and commits each batch synchronously in
the same event loop: a request sees the state after some whole batch, never
half of one, and a ``*_batch`` read answers all its queries from one state.

**Errors.** Every bad request gets a 4xx ``{"error": {"code", "message"}}``
whose message says what was wrong and what to do (unknown aggregate or op:
404 listing the known ones; bad JSON, arguments, bounds, keys, cursors: 400;
``offset_out_of_range``: 400 naming the count; body over `MAX_BODY`: 413;
an aggregate being built: 503 with its ``progress``). Anything unexpected is
a logged 500 JSON error, never a dropped connection. A client that goes away
mid-request is an info line, not an error.

**Transport** (`consumers.http.limits`, settings ``http_*``). Connections are
capped (over the cap: 503 ``too_many_connections``, closed at once; the
default cap is what the open-file limit leaves after RocksDB, Kafka and the
process) and timed: idle, headers (from a request's first byte) and body
(408 ``request_timeout``, then closed). aiohttp's own answers to malformed
requests use the same JSON envelope. ``GET /openapi.json`` documents all of
it per operation, and ``tests/test_http_fuzz.py`` fuzzes the running server
against that document.

**Token.** State-changing routes are declared with `protected_route` (they
land in `PROTECTED_ROUTES`); `create_app` registers them, wrapped in
`require_token`, only when the process has a token, so without one they do
not exist at all. Declare them in this module (or in a module imported at
its end) so they are registered before `create_app` runs.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hmac
import ipaddress
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from aiokafka.structs import TopicPartition

from consumers.http.limits import ConnectionStats, HttpLimits, LimitedSite
from consumers.http.openapi import OP_DOCS, RouteDoc, build_openapi, route_operation_id
from consumers.logs import get_logger
from consumers.runtime.deadletters import DeadLetterHealth
from consumers.runtime.patches import PatchError
from consumers.runtime.stats import LATENCY_BUCKETS
from engine import (
    Aggregate,
    AggregateNotReady,
    InvalidArgument,
    InvalidKey,
    OffsetOutOfRange,
    Store,
    TableAggregate,
    TallyError,
)
from engine.catalog import not_ready
from engine.reconcile import decode_fixes
from engine.triggers import DRIFT_KINDS
from schemas import ConfigError
from schemas.config import ConsumerSettings
from schemas.values import REQUEST_DECODER, RESPONSE_ENCODER, TypedValueError, from_json

__all__ = [
    "MAX_BODY",
    "MAX_PAGE_SIZE",
    "OPS",
    "PROCESS",
    "PROTECTED_ROUTES",
    "ApiError",
    "Op",
    "ProtectedRoute",
    "Served",
    "Stats",
    "aggregate_statuses",
    "create_app",
    "parse_address",
    "protected_route",
    "read_body",
    "readiness",
    "render_metrics",
    "require_token",
    "start_http",
    "status",
    "warn_if_exposed",
]

MAX_BODY = 1 << 20
"""Request body limit (bytes): larger bodies get a 413."""
MAX_PAGE_SIZE = 10_000
"""Largest ``page_size`` served over HTTP (walk further with the cursor)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Stats(Protocol):
    """The counters the API reports (`consumers.runtime.stats.ConsumerStats` has them)."""

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
    broker_ok: bool

    def lag(self) -> dict[TopicPartition, int]: ...


class Served(Protocol):
    """What the HTTP API needs of a process (`ConsumerProcess` provides it)."""

    @property
    def store(self) -> Store: ...
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

_decoder = REQUEST_DECODER  # then from_json: typed values (schemas.values)
_encoder = RESPONSE_ENCODER  # Decimals as exact JSON numbers, dates as ISO strings


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
        resp = _json({"error": {"code": self.code, "message": self.message, **self.extra}}, self.status, self.headers)
        if self.close_connection:
            resp.force_close()
        return resp


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encoder.encode(obj), status=status, content_type="application/json", headers=headers)


# ---- the read ops -------------------------------------------------------------------


class Op(NamedTuple):
    """A read op: its argument names, the required ones, and how to run it."""

    fields: tuple[str, ...]
    required: tuple[str, ...]
    read: Callable[[Aggregate, dict[str, Any]], Any]
    example: str


_RANGE = ("namespace", "bounds")


def _page_size(a: dict[str, Any]) -> Any:
    n = a.get("page_size", 100)
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_PAGE_SIZE:
        raise ApiError(
            400,
            "invalid_argument",
            f"page_size {n} is over the HTTP limit of {MAX_PAGE_SIZE}: ask for smaller pages "
            "and pass each page's cursor to get the next",
        )
    return n


def _queries(a: dict[str, Any]) -> list[Any]:
    q = a["queries"]
    if not isinstance(q, list):
        raise ApiError(
            400,
            "invalid_argument",
            f"queries must be a list of {{namespace, bounds, offset}} objects, got {_short(q)}",
        )
    return q


OPS: dict[str, Op] = {
    "count": Op(_RANGE, (), lambda g, a: g.count(a.get("namespace"), a.get("bounds")), "{}"),
    "sum": Op(_RANGE, (), lambda g, a: g.sum(a.get("namespace"), a.get("bounds")), "{}"),
    "at": Op(
        ("offset", *_RANGE),
        ("offset",),
        lambda g, a: g.at(a["offset"], a.get("namespace"), a.get("bounds")),
        '{"offset": 0} (or -1 for the last item)',
    ),
    "index_of": Op(
        ("key", "id", "order", *_RANGE),
        ("key",),
        lambda g, a: g.index_of(
            a["key"], a.get("id"), a.get("order", "asc"), a.get("namespace"), a.get("bounds")
        ),
        '{"key": 1000, "order": "desc"}',
    ),
    "min": Op(_RANGE, (), lambda g, a: g.min(a.get("namespace"), a.get("bounds")), "{}"),
    "max": Op(_RANGE, (), lambda g, a: g.max(a.get("namespace"), a.get("bounds")), "{}"),
    "random": Op(_RANGE, (), lambda g, a: g.random(a.get("namespace"), a.get("bounds")), "{}"),
    "paginate": Op(
        ("cursor", "page_size", "order", *_RANGE),
        (),
        lambda g, a: g.paginate(
            a.get("cursor"), _page_size(a), a.get("order", "asc"), a.get("namespace"), a.get("bounds")
        ),
        '{"page_size": 50, "cursor": "<cursor of the previous page>"}',
    ),
    "count_batch": Op(
        ("queries",), ("queries",), lambda g, a: g.count_batch(_queries(a)), '{"queries": [{"namespace": "x"}]}'
    ),
    "sum_batch": Op(
        ("queries",), ("queries",), lambda g, a: g.sum_batch(_queries(a)), '{"queries": [{"namespace": "x"}]}'
    ),
    "at_batch": Op(
        ("queries",),
        ("queries",),
        lambda g, a: g.at_batch(_queries(a)),
        '{"queries": [{"offset": 0}, {"offset": -1}]}',
    ),
    "namespaces": Op((), (), lambda g, a: g.namespaces(), "{}"),
}
assert set(OPS) == set(OP_DOCS), "every op needs its OpenAPI doc in consumers/http/openapi.py"


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."


def _check_args(op: str, spec: Op, args: dict[str, Any]) -> None:
    unknown = sorted(set(args) - set(spec.fields))
    if unknown:
        takes = ", ".join(spec.fields) if spec.fields else "no arguments"
        raise ApiError(400, "unknown_field", f"{op} does not take {', '.join(unknown)}; it takes {takes}")
    for f in spec.required:
        if f not in args:
            raise ApiError(400, "missing_field", f"{op} needs {f!r}, e.g. {spec.example}")


async def read_body(request: web.Request) -> bytes:
    """The request's body, within the body timeout (``http_body_timeout``) and `MAX_BODY`.

    A body that has not arrived in time is answered 408 and the connection closed:
    a slow or stalled client cannot hold a connection (and its descriptor) open.
    """
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise _too_large(request.content_length)
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


async def _body_args(request: web.Request) -> dict[str, Any]:
    raw = await read_body(request)
    if not raw.strip():
        return {}
    try:
        value = from_json(_decoder.decode(raw))
    except msgspec.DecodeError as e:
        raise ApiError(
            400,
            "bad_json",
            f"request body is not valid JSON ({e}); send an object of arguments, e.g. "
            '{"namespace": "chess", "bounds": {"lower": {"key": 1000}}}',
        ) from None
    except TypedValueError as e:
        raise ApiError(400, "invalid_argument", str(e)) from None
    if not isinstance(value, dict):
        raise ApiError(
            400,
            "bad_request",
            f"request body must be a JSON object of arguments, got {type(value).__name__} {_short(value)}",
        )
    return value


def _query_args(request: web.Request) -> dict[str, Any]:
    out: dict[str, Any] = {}
    q = request.query
    for k in dict.fromkeys(q.keys()):
        values = q.getall(k)
        if len(values) > 1:
            raise ApiError(400, "bad_request", f"query parameter {k!r} is given {len(values)} times; give it once")
        try:
            out[k] = from_json(_decoder.decode(values[0].encode()))
        except TypedValueError as e:
            raise ApiError(400, "invalid_argument", f"query parameter {k}: {e}") from None
        except msgspec.DecodeError:
            raise ApiError(
                400,
                "bad_json",
                f"query parameter {k}={_short(values[0])} is not JSON: GET arguments are JSON-encoded, "
                'strings in double quotes, e.g. ?namespace="chess"&offset=3&bounds={"lower":{"key":10}}',
            ) from None
    return out


def _too_large(size: int | None = None) -> ApiError:
    got = f" ({size} bytes)" if size is not None else ""
    return ApiError(
        413,
        "payload_too_large",
        f"request body is over the {MAX_BODY} byte limit{got}: split the queries over several requests",
    )


def _check_aggregate(request: web.Request, name: str) -> None:
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


def _op_handler(op: str, spec: Op) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        _check_aggregate(request, name)
        args = await _body_args(request) if request.method == "POST" else _query_args(request)
        _check_args(op, spec, args)
        # From here on: synchronous reads only (no await), so one committed state. The
        # handle is taken here too, after the last await, in case the process swaps it.
        agg: Aggregate = request.app[PROCESS].store.aggregate(name)
        result = spec.read(agg, args)
        return _json({"result": result})

    handler.__name__ = f"read_{op}"
    return handler


# ---- status, metrics, probes ----------------------------------------------------------


def aggregate_statuses(process: Served) -> list[dict[str, Any]]:
    """The aggregates' entries of /status and /v1/aggregates, in definition order.

    ``state`` is "ready" unless the process says otherwise: a process with an
    ``aggregate_states()`` method (name → {"state", "progress", ...}) supplies
    states such as "building" or "stale" and their progress. Independently, an
    aggregate whose reads raise `AggregateNotReady` is "backfilling" with the
    error's progress, and its item counts are null.
    """
    hook = getattr(process, "aggregate_states", None)
    states: dict[str, dict[str, Any]] = hook() if callable(hook) else {}
    drift: dict[tuple[str, str], int] = getattr(process.stats, "drift", {})
    out = []
    for d in process.definitions:
        info = states.get(d.name) or {}
        entry: dict[str, Any] = {
            "name": d.name,
            "table": d.table,
            "topic": process.table_topics.get(d.table, d.table),
            "state": info.get("state", "ready"),
            "items": None,
            "namespaces": None,
            "progress": info.get("progress"),
            "fingerprint": d.fingerprint,
            "drift": {k: drift.get((d.name, k), 0) for k in DRIFT_KINDS},
        }
        agg = process.store.aggregate(d.name)
        try:
            namespaces = agg.namespaces()
            entry["items"] = sum(agg.count(ns) for ns in namespaces)
            entry["namespaces"] = len(namespaces)
        except AggregateNotReady as e:
            if entry["state"] == "ready":
                entry["state"] = "backfilling"
            if entry["progress"] is None:
                entry["progress"] = e.progress
        out.append(entry)
    return out


def _partitions(process: Served) -> list[dict[str, Any]]:
    st = process.stats
    lag = st.lag()
    tps = sorted(set(process.assigned) | set(st.end_offsets), key=lambda tp: (tp.topic, tp.partition))
    return [
        {
            "topic": tp.topic,
            "partition": tp.partition,
            "offset": st.offsets.get(tp),
            "end_offset": st.end_offsets.get(tp),
            "lag": lag.get(tp),
        }
        for tp in tps
    ]


def status(process: Served) -> dict[str, Any]:
    """The /status document."""
    st = process.stats
    caught_up = getattr(process, "caught_up", None)
    return {
        "aggregates": aggregate_statuses(process),
        "partitions": _partitions(process),
        "events": st.events,
        "replayed": int(getattr(st, "replayed", 0)),
        "batches": st.batches,
        "changed": st.changed,
        "dead_letters": st.dead_letters,
        "lag": sum(st.lag().values()),
        "caught_up": bool(caught_up is not None and caught_up.is_set()),
        "uptime_seconds": round(time.time() - st.started, 3),
        "broker_reachable": st.broker_ok,
        "dead_letter": _dead_letter(st).status(),
        "warnings": list(getattr(process, "warnings", ())),
    }


def _dead_letter(st: Stats) -> DeadLetterHealth:
    return getattr(st, "dead_letter", None) or DeadLetterHealth()


def readiness(process: Served) -> tuple[bool, str, int]:
    """(ready, reason if not, total lag) for /readyz."""
    st = process.stats
    lag = sum(st.lag().values())
    max_lag = process.settings.ready_max_lag
    held = _dead_letter(st).problem()
    if held and st.broker_ok:  # (with the broker gone, that is the reason to give)
        return False, held, lag
    if not process.assigned:
        return (
            False,
            f"no partitions assigned yet: waiting for the broker at {process.settings.bootstrap_servers} "
            f"or for topics {', '.join(process.topics)} to exist",
            lag,
        )
    if not st.broker_ok:
        return False, "broker unreachable (the last end-offset refresh failed); reads serve the last committed state", lag
    if lag > max_lag:
        return False, f"lag {lag} events is over ready_max_lag {max_lag}: catching up (see /status for each partition)", lag
    return True, "", lag


def _num(v: float) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(process: Served, connections: ConnectionStats | None = None) -> str:
    """Prometheus text exposition format 0.0.4 (``connections``: the HTTP guards' counters)."""
    st = process.stats
    out: list[str] = []

    def family(name: str, kind: str, help: str) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")

    def sample(name: str, value: float, **labels: object) -> None:
        if labels:
            ls = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{ls}}} {_num(value)}")
        else:
            out.append(f"{name} {_num(value)}")

    family("tally_events_applied_total", "counter", "Records consumed live and committed (dead letters included).")
    sample("tally_events_applied_total", st.events)
    family("tally_events_replayed_total", "counter", "Records consumed by replays (backfills, rebuilds) and committed.")
    sample("tally_events_replayed_total", int(getattr(st, "replayed", 0)))
    family("tally_batches_total", "counter", "Consumer batches committed (one RocksDB WriteBatch each).")
    sample("tally_batches_total", st.batches)
    family("tally_items_changed_total", "counter", "Item writes that changed an aggregate.")
    sample("tally_items_changed_total", st.changed)
    family("tally_dead_letters_total", "counter", "Records sent to a dead-letter topic.")
    sample("tally_dead_letters_total", st.dead_letters)
    family(
        "tally_drift_events_total",
        "counter",
        "Live events implying the aggregate was out of step with its table (kind: update_unknown, "
        "delete_unknown, create_existing); reconcile when it grows.",
    )
    drift: dict[tuple[str, str], int] = getattr(st, "drift", {})
    for d in process.definitions:
        for kind in DRIFT_KINDS:
            sample("tally_drift_events_total", drift.get((d.name, kind), 0), aggregate=d.name, kind=kind)

    name = "tally_batch_apply_seconds"
    family(name, "histogram", "Seconds to decode, apply and commit one live batch (for a replay: to apply and commit one gathered chunk).")
    cumulative = 0
    for le, n in zip(LATENCY_BUCKETS, st.latency_buckets, strict=False):
        cumulative += n
        sample(f"{name}_bucket", cumulative, le=_num(float(le)))
    total = sum(st.latency_buckets)
    sample(f"{name}_bucket", total, le="+Inf")
    sample(f"{name}_sum", st.latency_sum)
    sample(f"{name}_count", total)

    family("tally_lag", "gauge", "Events between the committed offset and the end offset, per partition.")
    lag = st.lag()
    for tp in sorted(lag, key=lambda tp: (tp.topic, tp.partition)):
        sample("tally_lag", lag[tp], topic=tp.topic, partition=tp.partition)

    statuses = aggregate_statuses(process)
    family("tally_items", "gauge", "Items held per aggregate, over all namespaces.")
    for s in statuses:
        if s["items"] is not None:
            sample("tally_items", s["items"], aggregate=s["name"])
    family("tally_aggregate_ready", "gauge", "1 when the aggregate's state is ready, else 0 (see /status).")
    for s in statuses:
        sample("tally_aggregate_ready", int(s["state"] == "ready"), aggregate=s["name"])

    family("tally_broker_reachable", "gauge", "1 when the last broker request succeeded.")
    sample("tally_broker_reachable", int(st.broker_ok))
    family("tally_uptime_seconds", "gauge", "Seconds since the consumer process started.")
    sample("tally_uptime_seconds", round(time.time() - st.started, 3))
    if connections is not None:
        family("tally_http_connections", "gauge", "Open HTTP connections (capped by http_max_connections).")
        sample("tally_http_connections", connections.open)
        family("tally_http_connections_accepted_total", "counter", "HTTP connections accepted (within the cap).")
        sample("tally_http_connections_accepted_total", connections.accepted)
        family(
            "tally_http_connections_refused_total",
            "counter",
            "HTTP connections answered 503 and closed at once: the connection limit was reached.",
        )
        sample("tally_http_connections_refused_total", connections.refused)
        family(
            "tally_http_timeouts_total",
            "counter",
            "HTTP requests whose headers or body did not arrive in time (answered 408, closed).",
        )
        for kind in sorted(connections.timeouts):
            sample("tally_http_timeouts_total", connections.timeouts[kind], kind=kind)
    return "\n".join(out) + "\n"


async def _aggregates(request: web.Request) -> web.StreamResponse:
    process = request.app[PROCESS]
    return _json({"result": aggregate_statuses(process)})


async def _status(request: web.Request) -> web.StreamResponse:
    return _json(status(request.app[PROCESS]))


async def _metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(
        text=render_metrics(request.app[PROCESS], request.app.get(CONNECTIONS)),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Prometheus-Format": "0.0.4"},
    )


async def _healthz(request: web.Request) -> web.StreamResponse:
    return _json({"status": "ok"})


async def _readyz(request: web.Request) -> web.StreamResponse:
    process = request.app[PROCESS]
    ready, reason, lag = readiness(process)
    body: dict[str, Any] = {"status": "ready" if ready else "not_ready", "lag": lag,
                            "max_lag": process.settings.ready_max_lag}
    if not ready:
        body["reason"] = reason
    return _json(body, 200 if ready else 503)


async def _openapi(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


# ---- token-protected (state-changing) routes --------------------------------------------


@dataclass(frozen=True)
class ProtectedRoute:
    """A state-changing route: served only with a token, behind `require_token`."""

    method: str
    path: str
    handler: Handler
    summary: str
    description: str = ""
    request_schema: dict[str, Any] | None = None
    response_schema: dict[str, Any] | None = None
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
    response_schema: dict[str, Any] | None = None,
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
                method.upper(), path, handler, summary, description, request_schema, response_schema, status,
                dict(errors or {}), request_media_type, dict(links or {}),
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


def _template_regex(path: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]*\})", path)
    return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


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
            _check_aggregate(request, name)
        except ApiError as e:
            return e
        return ApiError(
            404,
            "unknown_op",
            f"unknown op {op!r}; ops are {', '.join(OPS)} "
            f"(e.g. POST /v1/aggregates/{name}/count; GET /openapi.json describes them)",
            known=list(OPS),
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
        err = ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}; use {allowed}")
        err.headers["Allow"] = ",".join(sorted(e.allowed_methods))
        return err.response()
    if e.status == 413:
        return _too_large().response()
    if e.status < 400:
        return e
    return ApiError(e.status, re.sub(r"\W+", "_", e.reason.lower()).strip("_"), e.text or e.reason).response()


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
    except OffsetOutOfRange as e:
        return ApiError(400, "offset_out_of_range", str(e)).response()
    except InvalidKey as e:
        return ApiError(400, "invalid_key", str(e)).response()
    except InvalidArgument as e:
        return ApiError(400, "invalid_argument", str(e)).response()
    except RecursionError:
        return ApiError(
            400, "bad_request", "the request nests arrays too deeply: keys may nest a few levels, not thousands"
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
        "http client disconnected", method=request.method, path=request.path, error=str(e) or type(e).__name__
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
    body = _encoder.encode({"error": {"code": code, "message": message}})
    response.body = body
    response.headers["Content-Type"] = "application/json"
    response.headers["Content-Length"] = str(len(body))


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _internal(request: web.Request, e: Exception) -> web.StreamResponse:
    """A logged 500 for an unexpected error (call it inside the ``except`` block: it logs the traceback)."""
    kind = "a tally error" if isinstance(e, TallyError) else "an unexpected error"
    get_logger(component="http").exception("http request failed", method=request.method, path=request.path, error=str(e))
    return ApiError(
        500,
        "internal",
        f"{kind} answering {request.method} {request.path}: {type(e).__name__}: {e} "
        "(logged by the consumer; the request was not applied anywhere, retry or report it)",
    ).response()


# ---- the app and the server ---------------------------------------------------------------


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
    app[BODY_TIMEOUT] = float(process.settings.http_body_timeout if body_timeout is None else body_timeout)
    if stats is not None:
        app[CONNECTIONS] = stats
    defs = {d.name: d for d in process.definitions}
    app[DEFINITIONS] = defs
    routes = list(PROTECTED_ROUTES if protected is None else protected)
    app[TOKEN_ROUTES] = [(r.method, _template_regex(r.path), r.path) for r in routes]

    r = app.router
    r.add_get("/v1/aggregates", _aggregates, allow_head=False)
    for op, spec in OPS.items():
        h = _op_handler(op, spec)
        r.add_get(f"/v1/aggregates/{{name}}/{op}", h, allow_head=False)
        r.add_post(f"/v1/aggregates/{{name}}/{op}", h)
    r.add_get("/status", _status, allow_head=False)
    r.add_get("/metrics", _metrics, allow_head=False)
    r.add_get("/healthz", _healthz, allow_head=False)
    r.add_get("/readyz", _readyz, allow_head=False)
    r.add_get("/openapi.json", _openapi, allow_head=False)

    served: list[ProtectedRoute] = []
    if token:
        check = require_token(token)
        for pr in routes:
            r.add_route(pr.method, pr.path, check(pr.handler))
            served.append(pr)
    app[OPENAPI] = msgspec.json.encode(
        build_openapi(
            {op: (spec.fields, spec.required) for op, spec in OPS.items()},
            aggregates=sorted(defs),
            routes=[pr.doc() for pr in served],
            max_body=MAX_BODY,
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
        raise ConfigError(f"--http: write an IPv6 host in brackets, e.g. [::1]:8750, got {address!r}")
    try:
        port = int(port_s)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigError(f"--http: port must be a number in 0..65535, got {port_s!r} in {address!r}")
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
    open-file limit; see `consumers.http.limits`). Listening on an address beyond
    loopback is logged as a warning naming it.
    """
    host, port = parse_address(address)
    if limits is None:
        limits = HttpLimits.from_settings(process.settings, getattr(process.store, "max_open_files", None))
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
        **({"open_files": limits.budget.nofile, "reserved_files": limits.budget.reserved} if limits.budget else {}),
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


# ---- state-changing routes (token only) -----------------------------------------------------


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
    response_schema={"type": "object", "properties": {"result": {"type": "object"}}},
    errors={404: "Unknown aggregate.", 501: "This process cannot rebuild aggregates."},
)
async def rebuild(request: web.Request) -> web.StreamResponse:
    process = request.app[PROCESS]
    name = request.match_info["name"]
    _check_aggregate(request, name)
    request_rebuild = getattr(process, "request_rebuild", None)
    if request_rebuild is None:
        raise ApiError(501, "not_supported", "this process cannot rebuild aggregates")
    request_rebuild(name)
    return _json({"result": {"aggregate": name, "status": "rebuild requested"}}, 202)


def _patch_sessions(request: web.Request) -> Any:
    sessions = getattr(request.app[PROCESS], "patches", None)
    if sessions is None:
        raise ApiError(501, "not_supported", "this process cannot patch aggregates")
    return sessions


_SESSION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "result": {
            "type": "object",
            "properties": {
                "session": {"type": "string"},
                "aggregate": {"type": "string"},
                "generation": {"type": "string"},
                "fingerprint": {"type": "string"},
            },
        }
    },
}


@protected_route(
    "POST",
    "/v1/aggregates/{name}/patch-sessions",
    summary="Open a patch session (live reconcile)",
    description=(
        "From now on the consumer records every id its live stream writes to the aggregate; fixes sent to "
        "the session skip those ids (the live change is newer than any source read after this call). "
        "Used by `tally reconcile --patch --url`; see consumers/runtime/patches.py for the rule."
    ),
    response_schema=_SESSION_SCHEMA,
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
            "operationId": route_operation_id(method, "/v1/aggregates/{name}/patch-sessions/{session}"),
            "parameters": {"name": "$request.path.name", "session": "$response.body#/result/session"},
        }
        for verb, method in (("chunk", "POST"), ("close", "DELETE"))
    },
)
async def patch_begin(request: web.Request) -> web.StreamResponse:
    s = await _patch_sessions(request).begin(request.match_info["name"])
    return _json(
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
        "Body: application/msgpack {\"changes\": [[id, key, namespace, sum] | [id]]} with keys as "
        "engine.encode_key bytes ([id] alone: the id must be absent). Applied between two live batches "
        "through the events' write path, skipping ids written live since the session opened. 503 "
        "`catching_up` when the live stream has not yet read up to the offsets of the session's start: "
        "send the chunk again."
    ),
    response_schema={
        "type": "object",
        "properties": {
            "result": {
                "type": "object",
                "properties": {
                    "received": {"type": "integer"},
                    "changed": {"type": "integer"},
                    "skipped_live": {"type": "integer"},
                },
            }
        },
    },
    request_media_type="application/msgpack",
    request_schema={
        "type": "object",
        "required": ["changes"],
        "properties": {
            "changes": {
                "type": "array",
                "description": "[id, key, namespace, sum] (upsert) or [id] (must be absent); keys, ids and "
                "namespaces as engine.encode_key bytes (msgpack bin).",
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
    result = await sessions.apply(request.match_info["name"], request.match_info["session"], changes)
    return _json({"result": result})


@protected_route(
    "DELETE",
    "/v1/aggregates/{name}/patch-sessions/{session}",
    summary="Close a patch session; answers its totals",
    response_schema={"type": "object", "properties": {"result": {"type": "object"}}},
    errors={
        404: "`unknown_session` (expired or never opened) or unknown aggregate.",
        501: "This process cannot patch aggregates.",
    },
)
async def patch_end(request: web.Request) -> web.StreamResponse:
    totals = _patch_sessions(request).end(request.match_info["name"], request.match_info["session"])
    return _json({"result": totals})
