"""The OpenAPI 3.1 document of the consumer's HTTP API, built as a plain dict.

`consumers.http.app` serves it at ``GET /openapi.json``, built once per app from
the same tables that register the routes (the ops and their arguments, the
token-protected routes), so the document and the router cannot drift apart;
``tests/test_http.py`` checks both directions.

Schemas follow JSON Schema 2020-12, as OpenAPI 3.1 does (``type`` lists,
``prefixItems``). JSON-encoded query parameters use a parameter ``content``
entry (``application/json``), the OpenAPI way to say "this value is JSON".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

__all__ = [
    "FIELD_SCHEMAS",
    "OP_DOCS",
    "OpDoc",
    "RouteDoc",
    "build_openapi",
    "openapi_path",
    "route_operation_id",
]

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


@dataclass(frozen=True)
class OpDoc:
    """Documentation of one read op: a summary and the schema of its ``result``."""

    summary: str
    result: Schema
    description: str = ""


@dataclass(frozen=True)
class RouteDoc:
    """Documentation of one extra route (e.g. a token-protected, state-changing one)."""

    method: str
    path: str
    summary: str
    description: str = ""
    request_schema: Schema | None = None
    response_schema: Schema = field(default_factory=lambda: {"type": "object"})
    status: int = 200
    """The success status."""
    errors: Mapping[int, str] = field(default_factory=dict)
    """Error statuses the route answers besides 400/401/500 and the HTTP layer's, with why."""
    request_media_type: str = "application/json"
    """Media type of the request body (``request_schema``)."""
    links: Mapping[str, Schema] = field(default_factory=dict)
    """OpenAPI links of the success response (e.g. a new session's id to the routes using it)."""


_ITEM_OR_NULL: Schema = {"oneOf": [_ref("Item"), {"type": "null"}]}

OP_DOCS: dict[str, OpDoc] = {
    "count": OpDoc("Number of items in range", {"type": "integer", "minimum": 0}),
    "sum": OpDoc("Sum of the items' sum values in range", {"type": "number"}),
    "at": OpDoc(
        "The item at `offset` in (key, id) order; a negative offset counts from the end",
        _ref("Item"),
        "An offset outside the range answers 400 `offset_out_of_range`, naming the count.",
    ),
    "index_of": OpDoc(
        "Rank of (key, id): asc = items in range before it, desc = items in range after it",
        {"type": "integer", "minimum": 0},
        "Without `id` the whole tie group of `key` counts as one position.",
    ),
    "min": OpDoc("The first item in range, or null", _ITEM_OR_NULL),
    "max": OpDoc("The last item in range, or null", _ITEM_OR_NULL),
    "random": OpDoc("A uniformly random item in range, or null", _ITEM_OR_NULL),
    "paginate": OpDoc(
        "One page of items after `cursor` (null: from the start)",
        _ref("Page"),
        "Pass the returned `cursor` back to get the next page; `is_done` is exact.",
    ),
    "count_batch": OpDoc(
        "`count` of each query, in order, all answered from the same committed state",
        {"type": "array", "items": {"type": "integer", "minimum": 0}},
    ),
    "sum_batch": OpDoc(
        "`sum` of each query, in order, all answered from the same committed state",
        {"type": "array", "items": {"type": "number"}},
    ),
    "at_batch": OpDoc(
        "`at` of each query (its `offset`), in order, all answered from the same committed state",
        {"type": "array", "items": _ref("Item")},
    ),
    "namespaces": OpDoc(
        "Namespaces holding at least one item, in key order",
        {"type": "array", "items": _ref("Key")},
    ),
}

FIELD_SCHEMAS: dict[str, Schema] = {
    "namespace": {**_ref("Key"), "description": "Namespace to read (default null: the default namespace)."},
    "bounds": {"oneOf": [_ref("Bounds"), {"type": "null"}], "description": "Key range (default: everything)."},
    "offset": {"type": "integer", "description": "Position in (key, id) order; negative counts from the end."},
    "key": {**_ref("Key"), "description": "The sort key to rank."},
    "id": {**_ref("Key"), "description": "Item id cutting the tie group of `key` (default null: none)."},
    "order": {"type": "string", "enum": ["asc", "desc"], "default": "asc"},
    "cursor": {
        "type": ["string", "null"],
        "description": "Opaque cursor of a previous page (default null: start).",
    },
    "page_size": {"type": "integer", "minimum": 1, "default": 100},
    "queries": {"type": "array", "items": _ref("Query"), "description": "The queries, answered in order."},
}

_COMPONENT_SCHEMAS: dict[str, Schema] = {
    "Key": {
        "description": (
            "A sort key, id or namespace: null, number, boolean, string, an array of keys "
            "(a tuple), or a typed value (`TypedValue`). Total order: null < numbers < false "
            "< true < strings < bytes < arrays < dates < datetimes < times < timedeltas < "
            "UUIDs; numbers compare exactly across ints, floats and decimals; arrays compare "
            "element-wise, a shorter prefix first. In answers a decimal is a JSON number with "
            "its exact digits, dates and times ISO 8601 strings (aware datetimes in UTC), a "
            "UUID its string. In requests a plain number is an int or a float (12.1 is the "
            "float, not the decimal 12.1): write other types as a `TypedValue`. "
            "(bytes keys, possible from msgpack events, are rendered as base64 strings.)"
        ),
        "anyOf": [
            {"type": ["null", "number", "boolean", "string", "array"], "items": _ref("Key")},
            _ref("TypedValue"),
        ],
    },
    "TypedValue": {
        "type": "object",
        "description": (
            'A value JSON has no type for, in requests: {"$decimal": "12.10"} (or a number: '
            'its digits as written), {"$datetime": "2024-01-01T00:00:00Z"} (RFC 3339; no '
            'offset: naive), {"$date": "2024-01-01"}, {"$time": "12:30:00"}, '
            '{"$timedelta": "PT90S"} (ISO 8601 duration), {"$uuid": "..."}.'
        ),
        "minProperties": 1,
        "maxProperties": 1,
        "additionalProperties": False,
        "properties": {
            "$decimal": {"type": ["string", "number"]},
            "$datetime": {"type": "string", "format": "date-time"},
            "$date": {"type": "string", "format": "date"},
            "$time": {"type": "string", "format": "time"},
            "$timedelta": {"type": "string", "format": "duration"},
            "$uuid": {"type": "string", "format": "uuid"},
        },
    },
    "Bound": {
        "type": "object",
        "description": "One end of a range; `id` cuts a tie group of equal keys at that id.",
        "required": ["key"],
        "additionalProperties": False,
        "properties": {
            "key": _ref("Key"),
            "inclusive": {"type": "boolean", "default": True},
            "id": _ref("Key"),
        },
    },
    "Bounds": {
        "type": "object",
        "description": "A key range; several members given together intersect.",
        "additionalProperties": False,
        "properties": {
            "lower": {"oneOf": [_ref("Bound"), {"type": "null"}]},
            "upper": {"oneOf": [_ref("Bound"), {"type": "null"}]},
            "eq": {**_ref("Key"), "description": "Only items with exactly this key."},
            "prefix": {
                "type": ["array", "null"],
                "items": _ref("Key"),
                "description": "Only array (tuple) keys starting with these elements.",
            },
        },
    },
    "Query": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "namespace": _ref("Key"),
            "bounds": {"oneOf": [_ref("Bounds"), {"type": "null"}]},
            "offset": {"type": "integer", "default": 0, "description": "Used by at_batch only."},
        },
    },
    "Item": {
        "type": "object",
        "required": ["key", "id", "sum_value", "namespace"],
        "properties": {
            "key": _ref("Key"),
            "id": _ref("Key"),
            "sum_value": {
                "type": "number",
                "description": "int, float or decimal (a decimal's exact digits)",
            },
            "namespace": _ref("Key"),
        },
    },
    "Page": {
        "type": "object",
        "required": ["items", "cursor", "is_done"],
        "properties": {
            "items": {"type": "array", "items": _ref("Item")},
            "cursor": {"type": ["string", "null"]},
            "is_done": {"type": "boolean"},
        },
    },
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {
                        "type": "string",
                        "description": (
                            "Machine-readable: not_found, unknown_aggregate, unknown_op, "
                            "method_not_allowed, bad_json, bad_request, unknown_field, missing_field, "
                            "invalid_argument, invalid_key, offset_out_of_range, payload_too_large, "
                            "unauthorized, not_ready, internal; from the HTTP layer bad_http, bad_body, "
                            "request_too_large, request_timeout, expectation_failed, too_many_connections; "
                            "on the token routes also not_supported, "
                            "unsupported_media_type and the patch-session codes not_live, rebuilding, "
                            "too_many_sessions, broker_unreachable, unknown_session, catching_up, truncated, "
                            "generation_switched, busy."
                        ),
                    },
                    "message": {"type": "string", "description": "What was wrong and what to do."},
                    "known": {"type": "array", "items": {"type": "string"}},
                    "progress": {"description": "not_ready only: the build's progress."},
                },
            }
        },
    },
    "AggregateStatus": {
        "type": "object",
        "required": ["name", "table", "topic", "state", "items", "namespaces"],
        "properties": {
            "name": {"type": "string"},
            "table": {"type": "string"},
            "topic": {"type": "string"},
            "state": {
                "type": "string",
                "description": (
                    "ready; otherwise the process's state while a generation is being built by "
                    "replay (e.g. building, stale, backfilling), with `progress`."
                ),
            },
            "items": {"type": ["integer", "null"], "description": "Items over all namespaces."},
            "namespaces": {"type": ["integer", "null"]},
            "progress": {"description": "Build progress while not ready, else null."},
            "fingerprint": {
                "type": "string",
                "description": "Hash of the definition this process runs (table, functions' source, version).",
            },
            "drift": {
                "type": "object",
                "description": (
                    "Live events that imply the aggregate was out of step with its table, per kind: "
                    "update_unknown / delete_unknown (an id it does not hold; not counted with a filter), "
                    "create_existing (an insert of an id it holds with other values). Reconcile when they grow."
                ),
                "additionalProperties": {"type": "integer"},
            },
        },
    },
    "PartitionStatus": {
        "type": "object",
        "required": ["topic", "partition", "offset", "end_offset", "lag"],
        "properties": {
            "topic": {"type": "string"},
            "partition": {"type": "integer"},
            "offset": {"type": ["integer", "null"], "description": "Next offset to read (committed)."},
            "end_offset": {"type": ["integer", "null"]},
            "lag": {"type": ["integer", "null"]},
        },
    },
    "Status": {
        "type": "object",
        "required": [
            "aggregates",
            "partitions",
            "events",
            "batches",
            "dead_letters",
            "lag",
            "uptime_seconds",
            "broker_reachable",
        ],
        "properties": {
            "aggregates": {"type": "array", "items": _ref("AggregateStatus")},
            "partitions": {"type": "array", "items": _ref("PartitionStatus")},
            "events": {"type": "integer", "description": "Records consumed live and committed."},
            "replayed": {
                "type": "integer",
                "description": "Records consumed by replays (backfills, rebuilds) and committed.",
            },
            "batches": {"type": "integer"},
            "changed": {"type": "integer"},
            "dead_letters": {"type": "integer"},
            "lag": {"type": "integer", "description": "Total lag over all partitions."},
            "caught_up": {"type": "boolean"},
            "uptime_seconds": {"type": "number"},
            "broker_reachable": {"type": "boolean"},
            "warnings": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Problems with the configuration, each logged once as a "
                "warning too: topics that cannot hold every row (a replay would not be a "
                "backfill), topics on which no truncate can arrive (Debezium's unwrap SMT).",
            },
            "dead_letter": {
                "type": "object",
                "description": "Whether dead letters can be written. `failing`: the batch holding "
                "bad records is not committed (nothing after it applies) until the write succeeds.",
                "required": ["state"],
                "properties": {
                    "state": {"type": "string", "enum": ["ok", "failing"]},
                    "written": {"type": "integer", "description": "Dead letters acknowledged."},
                    "topic": {"type": "string"},
                    "reason": {"type": "string"},
                    "since": {"type": "string", "format": "date-time"},
                    "attempts": {"type": "integer"},
                    "records": {"type": "integer", "description": "Dead letters the held batch waits to write."},
                },
            },
        },
    },
    "Health": {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}},
    },
    "Ready": {
        "type": "object",
        "required": ["status", "lag"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "not_ready"]},
            "lag": {"type": "integer"},
            "max_lag": {"type": "integer"},
            "reason": {"type": "string", "description": "Why not ready (503 only)."},
        },
    },
}


def _error(description: str) -> Schema:
    return {"description": description, "content": {JSON: {"schema": _ref("Error")}}}


_MALFORMED = (
    "a request the HTTP layer rejects (malformed; a request line or header over 8190 bytes: "
    "send long arguments as a POST body; a body that cannot be read, `bad_body`)"
)
_BUSY = "the connection limit is reached (`http_max_connections`; the connection is closed, retry)"
_SERVER_ERROR = "Unexpected server error (logged by the consumer)."


def _transport_errors(*, body: bool) -> Schema:
    """What the HTTP layer answers on any operation (every one in the error envelope)."""
    out: Schema = {
        "400": _error(f"Bad request: {_MALFORMED}."),
        "417": _error("An `Expect` header other than `100-continue`."),
        "500": _error(_SERVER_ERROR),
        "503": _error(f"Service unavailable: {_BUSY}."),
    }
    if body:
        out["408"] = _error("The request body did not arrive within `http_body_timeout`; the connection is closed.")
        out["413"] = _error("Request body over the size limit.")
    return out


def _ok(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def openapi_path(path: str) -> str:
    """An aiohttp path template as an OpenAPI path: ``{name:regex}`` → ``{name}``."""
    return re.sub(r"\{([^}:]+):[^}]*\}", r"{\1}", path)


def _request_schema(fields: Sequence[str], required: Iterable[str]) -> Schema:
    s: Schema = {
        "type": "object",
        "additionalProperties": False,
        "properties": {f: FIELD_SCHEMAS[f] for f in fields},
    }
    req = list(required)
    if req:
        s["required"] = req
    return s


def _op_path(
    op: str, fields: Sequence[str], required: Sequence[str], aggregates: Sequence[str]
) -> Schema:
    doc = OP_DOCS[op]
    name_schema: Schema = {"type": "string"}
    if aggregates:
        name_schema["enum"] = list(aggregates)
    responses: Schema = {
        "200": _ok(doc.summary, {
            "type": "object",
            "required": ["result"],
            "properties": {"result": doc.result},
        }),
        "400": _error(f"Bad arguments (the message says which and how to fix them), or {_MALFORMED}."),
        "404": _error("Unknown aggregate (the message lists the known ones)."),
        "500": _error(_SERVER_ERROR),
        "503": _error(f"The aggregate is being built by replay (`progress` says how far), or {_BUSY}."),
    }
    query_params = [
        {
            "name": f,
            "in": "query",
            "required": f in required,
            "description": "JSON-encoded, e.g. strings in double quotes.",
            "content": {JSON: {"schema": FIELD_SCHEMAS[f]}},
        }
        for f in fields
    ]
    description = doc.description
    return {
        "parameters": [
            {
                "name": "name",
                "in": "path",
                "required": True,
                "description": "Aggregate name (GET /v1/aggregates lists them).",
                "schema": name_schema,
            }
        ],
        "post": {
            "operationId": op,
            "summary": doc.summary,
            "description": description,
            "tags": ["reads"],
            "requestBody": {
                "required": bool(required),
                "content": {JSON: {"schema": _ref(f"{_camel(op)}Request")}},
            },
            "responses": {**_transport_errors(body=True), **responses},
        },
        "get": {
            "operationId": f"{op}_get",
            "summary": f"{doc.summary} (arguments as JSON-encoded query parameters)",
            "description": description,
            "tags": ["reads"],
            "parameters": query_params,
            "responses": {**_transport_errors(body=False), **responses},
        },
    }


def route_operation_id(method: str, path: str) -> str:
    """The operationId of an extra route, e.g. ``post_v1_aggregates_name_rebuild``."""
    return f"{method.lower()}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"


def _camel(op: str) -> str:
    return "".join(part.capitalize() for part in op.split("_"))


def build_openapi(
    ops: Mapping[str, tuple[Sequence[str], Sequence[str]]],
    *,
    aggregates: Sequence[str] = (),
    routes: Sequence[RouteDoc] = (),
    max_body: int | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document.

    ``ops``: op name → (argument names, required argument names), served at
    ``/v1/aggregates/{name}/{op}`` (GET and POST). ``aggregates``: names for
    the path parameter's enum. ``routes``: extra (token-protected) routes.
    """
    try:
        version = metadata.version("tally")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    schemas = dict(_COMPONENT_SCHEMAS)
    for op, (fields, required) in ops.items():
        schemas[f"{_camel(op)}Request"] = _request_schema(fields, required)

    paths: dict[str, Any] = {
        "/v1/aggregates": {
            "get": {
                "operationId": "aggregates",
                "summary": "The aggregates this consumer maintains, with their item counts",
                "tags": ["reads"],
                "responses": {
                    "200": _ok("Aggregates", {
                        "type": "object",
                        "required": ["result"],
                        "properties": {"result": {"type": "array", "items": _ref("AggregateStatus")}},
                    }),
                    **_transport_errors(body=False),
                },
            }
        },
    }
    for op, (fields, required) in ops.items():
        paths[f"/v1/aggregates/{{name}}/{op}"] = _op_path(op, fields, required, aggregates)
    paths["/status"] = {
        "get": {
            "operationId": "status",
            "summary": "Aggregates, partitions (offsets, end offsets, lag), counters, uptime, broker",
            "tags": ["operations"],
            "responses": {"200": _ok("Process status", _ref("Status")), **_transport_errors(body=False)},
        }
    }
    paths["/metrics"] = {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics (text exposition format 0.0.4)",
            "tags": ["operations"],
            "responses": {
                "200": {
                    "description": "Metrics",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_transport_errors(body=False),
            },
        }
    }
    paths["/healthz"] = {
        "get": {
            "operationId": "healthz",
            "summary": "Liveness: 200 while the process runs",
            "tags": ["operations"],
            "responses": {"200": _ok("Alive", _ref("Health")), **_transport_errors(body=False)},
        }
    }
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "Readiness: partitions assigned, broker reachable, total lag <= ready_max_lag",
            "tags": ["operations"],
            "responses": {
                **_transport_errors(body=False),
                "200": _ok("Ready", _ref("Ready")),
                "503": _ok(
                    f"Not ready (`reason` says why: a Ready document), or {_BUSY} (an Error)",
                    {"oneOf": [_ref("Ready"), _ref("Error")]},
                ),
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "tags": ["operations"],
            "responses": {"200": _ok("OpenAPI 3.1 document", {"type": "object"}), **_transport_errors(body=False)},
        }
    }
    for r in routes:
        operation: Schema = {
            "operationId": route_operation_id(r.method, r.path),
            "summary": r.summary,
            "description": r.description,
            "tags": ["maintenance"],
            "responses": {
                **_transport_errors(body=r.request_schema is not None),
                str(r.status): _ok(r.summary, r.response_schema),
                "400": _error(f"Bad arguments, or {_MALFORMED}."),
                **{str(code): _error(why) for code, why in sorted(r.errors.items())},
            },
        }
        if r.links:
            operation["responses"][str(r.status)]["links"] = dict(r.links)
        if r.request_schema is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {r.request_media_type: {"schema": r.request_schema}},
            }
        operation["security"] = [{"bearer": []}]
        operation["responses"]["401"] = _error("Missing or wrong `Authorization: Bearer <token>`.")
        path = openapi_path(r.path)
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _path_params(r.path)
        ]
        if params:
            operation["parameters"] = params
        paths.setdefault(path, {})[r.method.lower()] = operation

    limit = f" Request bodies are limited to {max_body} bytes." if max_body else ""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "tally consumer HTTP API",
            "version": version,
            "description": (
                "Reads of the order-statistic aggregates a `tally consume` process maintains, "
                "answered from its committed state in O(log n), plus status, metrics and probes.\n\n"
                "Each read is `POST /v1/aggregates/{name}/{op}` with a JSON object of the "
                "Python API's keyword arguments, or `GET` with each argument JSON-encoded as a "
                "query parameter, e.g.\n\n"
                "    curl -s localhost:8750/v1/aggregates/by_game/count "
                "-d '{\"namespace\": \"chess\", \"bounds\": {\"lower\": {\"key\": 1000}}}'\n"
                "    curl -sG localhost:8750/v1/aggregates/by_game/count "
                "--data-urlencode 'namespace=\"chess\"' "
                "--data-urlencode 'bounds={\"lower\":{\"key\":1000}}'\n\n"
                "Answers are `{\"result\": ...}`; errors are `{\"error\": {\"code\", \"message\"}}` "
                "with a 4xx status (503 while an aggregate is being built)." + limit
            ),
        },
        "servers": [{"url": "/"}],
        "tags": [
            {"name": "reads", "description": "Aggregate reads (O(log n))"},
            {"name": "operations", "description": "Status, metrics, probes"},
            {"name": "maintenance", "description": "State-changing; need the bearer token"},
        ],
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if routes:
        doc["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "The consumer's --token (TALLY_TOKEN).",
            }
        }
    return doc


def _path_params(path: str) -> list[str]:
    out = []
    rest = path
    while "{" in rest:
        _, _, rest = rest.partition("{")
        name, _, rest = rest.partition("}")
        out.append(name.split(":")[0])
    return out
