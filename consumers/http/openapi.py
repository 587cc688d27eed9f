"""The OpenAPI 3.1 document of the consumer's HTTP API, generated from the Structs.

`tally.consumers.http.app` serves it at ``GET /openapi.json``, built once per app from the
same tables that register the routes: the read ops of `tally.schemas.reads.READ_OPS` (their
args and result Structs) and the token-protected routes; the other answers' shapes are
the Structs of `tally.schemas.status`. Every schema comes from `msgspec.json.schema_components`
but the ``Key`` component (`tally.schemas.reads.KEY_SCHEMA`: what a key is cannot be said with
a Python type) and the token routes' own request/response schemas (a msgpack body).
``tests/test_http.py`` checks document and router in both directions, and
``tests/test_http_fuzz.py`` holds the server to the document.

Schemas follow JSON Schema 2020-12, as OpenAPI 3.1 does (``type`` lists,
``prefixItems``). JSON-encoded query parameters use a parameter ``content``
entry (``application/json``), the OpenAPI way to say "this value is JSON".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import msgspec

from tally.consumers.version import DISTRIBUTION
from tally.schemas.reads import KEY_SCHEMA, READ_OPS, REF_TEMPLATE, TYPED_VALUE_SCHEMA, ReadOp
from tally.schemas.status import AggregateStatus, Error, Health, Ready, Status

__all__ = [
    "RouteDoc",
    "build_openapi",
    "openapi_path",
    "route_operation_id",
]

JSON = "application/json"
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": REF_TEMPLATE.format(name=name)}


@dataclass(frozen=True)
class RouteDoc:
    """Documentation of one extra route (e.g. a token-protected, state-changing one)."""

    method: str
    path: str
    summary: str
    description: str = ""
    request_schema: Schema | None = None
    response_schema: Schema | type[msgspec.Struct] = field(
        default_factory=lambda: {"type": "object"}
    )
    """The success answer: a Struct (its schema is generated) or a JSON schema."""
    status: int = 200
    """The success status."""
    errors: Mapping[int, str] = field(default_factory=dict)
    """Error statuses the route answers besides 400/401/500 and the HTTP layer's, with why."""
    request_media_type: str = "application/json"
    """Media type of the request body (``request_schema``)."""
    links: Mapping[str, Schema] = field(default_factory=dict)
    """OpenAPI links of the success response (e.g. a new session's id to the routes using it)."""


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
        out["408"] = _error(
            "The request body did not arrive within `http_body_timeout`; the connection is closed."
        )
        out["413"] = _error("Request body over the size limit.")
    return out


def _ok(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def openapi_path(path: str) -> str:
    """An aiohttp path template as an OpenAPI path: ``{name:regex}`` → ``{name}``."""
    return re.sub(r"\{([^}:]+):[^}]*\}", r"{\1}", path)


def _components(maximum: Mapping[str, int], routes: Sequence[RouteDoc] = ()) -> Schema:
    """Every component schema: generated from the Structs, plus ``Key``.

    ``maximum``: argument → its largest value over HTTP (e.g. ``page_size``), added to the
    args schemas that have it.
    """
    types: list[Any] = [op.args for op in READ_OPS.values()]
    types += [op.answer for op in READ_OPS.values()]
    types += [Error, Status, AggregateStatus, Health, Ready]
    types += [r.response_schema for r in routes if isinstance(r.response_schema, type)]
    _, schemas = msgspec.json.schema_components(types, ref_template=REF_TEMPLATE)
    schemas["Key"] = KEY_SCHEMA
    schemas["TypedValue"] = TYPED_VALUE_SCHEMA
    for op in READ_OPS.values():
        props = schemas[op.args.__name__].get("properties", {})
        for arg, most in maximum.items():
            if arg in props:
                props[arg] = {**props[arg], "maximum": most}
    return schemas


def _op_path(op: ReadOp, components: Schema, aggregates: Sequence[str]) -> Schema:
    args = components[op.args.__name__]
    name_schema: Schema = {"type": "string"}
    if aggregates:
        name_schema["enum"] = list(aggregates)
    responses: Schema = {
        "200": _ok(op.summary, _ref(op.answer.__name__)),
        "400": _error(
            f"Bad arguments (the message says which and how to fix them), or {_MALFORMED}."
        ),
        "404": _error("Unknown aggregate (the message lists the known ones)."),
        "500": _error(_SERVER_ERROR),
        "503": _error(
            f"The aggregate is being built by replay (`progress` says how far), or {_BUSY}."
        ),
    }
    required = set(args.get("required", ()))
    query_params = [
        {
            "name": f,
            "in": "query",
            "required": f in required,
            "description": "JSON-encoded, e.g. strings in double quotes.",
            "content": {JSON: {"schema": schema}},
        }
        for f, schema in args.get("properties", {}).items()
    ]
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
            "operationId": op.name,
            "summary": op.summary,
            "description": op.description,
            "tags": ["reads"],
            "requestBody": {
                "required": bool(required),
                "content": {JSON: {"schema": _ref(op.args.__name__)}},
            },
            "responses": {**_transport_errors(body=True), **responses},
        },
        "get": {
            "operationId": f"{op.name}_get",
            "summary": f"{op.summary} (arguments as JSON-encoded query parameters)",
            "description": op.description,
            "tags": ["reads"],
            "parameters": query_params,
            "responses": {**_transport_errors(body=False), **responses},
        },
    }


def _route_answer(route: RouteDoc) -> Schema:
    answer = route.response_schema
    return _ref(answer.__name__) if isinstance(answer, type) else answer


def route_operation_id(method: str, path: str) -> str:
    """The operationId of an extra route, e.g. ``post_v1_aggregates_name_rebuild``."""
    return f"{method.lower()}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"


def build_openapi(
    *,
    aggregates: Sequence[str] = (),
    routes: Sequence[RouteDoc] = (),
    max_body: int | None = None,
    maximum: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document.

    Every op of `READ_OPS` is served at ``/v1/aggregates/{name}/{op}`` (GET and POST).
    ``aggregates``: names for the path parameter's enum. ``routes``: extra
    (token-protected) routes. ``maximum``: argument → its largest value over HTTP.
    """
    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    schemas = _components(maximum or {}, routes)

    paths: dict[str, Any] = {
        "/v1/aggregates": {
            "get": {
                "operationId": "aggregates",
                "summary": "The aggregates this consumer maintains, with their item counts",
                "tags": ["reads"],
                "responses": {
                    "200": _ok(
                        "Aggregates",
                        {
                            "type": "object",
                            "required": ["result"],
                            "properties": {
                                "result": {"type": "array", "items": _ref("AggregateStatus")}
                            },
                        },
                    ),
                    **_transport_errors(body=False),
                },
            }
        },
    }
    for op in READ_OPS.values():
        paths[f"/v1/aggregates/{{name}}/{op.name}"] = _op_path(op, schemas, aggregates)
    paths["/status"] = {
        "get": {
            "operationId": "status",
            "summary": "Aggregates, partitions (offsets, end offsets, lag), counters, uptime, broker",
            "tags": ["operations"],
            "responses": {
                "200": _ok("Process status", _ref("Status")),
                **_transport_errors(body=False),
            },
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
            "responses": {
                "200": _ok("OpenAPI 3.1 document", {"type": "object"}),
                **_transport_errors(body=False),
            },
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
                str(r.status): _ok(r.summary, _route_answer(r)),
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
                '-d \'{"namespace": "chess", "bounds": {"lower": {"key": 1000}}}\'\n'
                "    curl -sG localhost:8750/v1/aggregates/by_game/count "
                "--data-urlencode 'namespace=\"chess\"' "
                '--data-urlencode \'bounds={"lower":{"key":1000}}\'\n\n'
                'Answers are `{"result": ...}`; errors are `{"error": {"code", "message"}}` '
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
