"""The read routes, one pair per op of `tally.schemas.reads.READ_OPS`, and the aggregates' list.

::

    GET  /v1/aggregates                     aggregates of this process, with item counts
    POST /v1/aggregates/{name}/{op}         a read; body = the op's arguments (a JSON object)
    GET  /v1/aggregates/{name}/{op}?a=JSON  the same read, each argument JSON-encoded

A request's arguments are decoded straight into the op's args Struct (one typed decoder
per op, unknown fields refused); whatever does not fit becomes a 400 saying which argument
and what it must be (`tally.schemas.reads.args_error`). Then ``getattr(aggregate, op)(**args)``
and the answer, ``{"result": ...}``, encoded from the op's result type.

**Consistency.** Handlers read the store synchronously, without awaiting in between, and
the consumer applies and commits each batch synchronously in the same event loop: a request
sees the state after some whole batch, never half of one, and a ``*_batch`` read answers all
its queries from one state.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web

from tally.consumers.http.common import (
    PROCESS,
    ApiError,
    Handler,
    check_aggregate,
    encoder,
    json_response,
    read_body,
    short,
)
from tally.consumers.http.status import aggregate_statuses
from tally.schemas.reads import READ_OPS, ReadOp, args_error
from tally.schemas.values import TypedValueError, from_json

__all__ = ["HTTP_MAXIMUM", "MAX_PAGE_SIZE", "add_routes", "decode_args", "query_args"]

MAX_PAGE_SIZE = 10_000
"""Largest ``page_size`` served over HTTP (walk further with the cursor)."""
HTTP_MAXIMUM: dict[str, int] = {"page_size": MAX_PAGE_SIZE}
"""Argument → its largest value over HTTP (the OpenAPI document says so too)."""

_any = msgspec.json.Decoder()
_EXAMPLE = '{"namespace": "chess", "bounds": {"lower": {"key": 1000}}}'


def typed_args(value: Any) -> Any:
    """Keys of an args Struct with their typed values (`tally.schemas.values.from_json`)."""
    if isinstance(value, msgspec.Struct):
        fields = value.__struct_fields__
        return msgspec.structs.replace(value, **{f: typed_args(getattr(value, f)) for f in fields})
    if type(value) is list:
        return [typed_args(v) for v in value]
    return from_json(value)


def decode_args(op: ReadOp, decoder: msgspec.json.Decoder[Any], raw: bytes) -> Any:
    """The args Struct of ``op`` from a JSON object, or the `ApiError` (400) saying why not."""
    try:
        args = typed_args(decoder.decode(raw))
    except msgspec.ValidationError as e:
        code, message = args_error(op, e)
        raise ApiError(400, code, message) from None
    except TypedValueError as e:
        raise ApiError(400, "invalid_argument", str(e)) from None
    except msgspec.DecodeError as e:
        example = msgspec.json.encode(op.example).decode() if op.example else _EXAMPLE
        raise ApiError(
            400,
            "bad_json",
            f"request body is not valid JSON ({e}); send an object of arguments, e.g. {example}",
        ) from None
    page_size = getattr(args, "page_size", None)
    if page_size is not None and page_size > MAX_PAGE_SIZE:
        raise ApiError(
            400,
            "invalid_argument",
            f"page_size {page_size} is over the HTTP limit of {MAX_PAGE_SIZE}: ask for smaller "
            "pages and pass each page's cursor to get the next",
        )
    return args


def query_args(request: web.Request) -> bytes:
    """The JSON object of a GET's arguments: each query parameter's value is one JSON value.

    Every value is checked to be exactly one JSON value before it is spliced in, so a
    parameter cannot smuggle in another argument.
    """
    q = request.query
    if not q:
        return b"{}"
    parts = []
    for k in dict.fromkeys(q.keys()):
        if k == PARTIAL:
            continue
        values = q.getall(k)
        if len(values) > 1:
            raise ApiError(
                400,
                "bad_request",
                f"query parameter {k!r} is given {len(values)} times; give it once",
            )
        raw = values[0].encode()
        try:
            _any.decode(raw)
        except msgspec.DecodeError:
            raise ApiError(
                400,
                "bad_json",
                f"query parameter {k}={short(values[0])} is not JSON: GET arguments are "
                "JSON-encoded, strings in double quotes, e.g. "
                '?namespace="chess"&offset=3&bounds={"lower":{"key":10}}',
            ) from None
        parts.append(encoder.encode(k) + b":" + raw)
    return b"{" + b",".join(parts) + b"}"


PARTIAL = "partial"
"""The query parameter (``?partial=true``) asking a member of a deployment for what the
available partitions hold while others move, labelled ``"partial": [moving partitions]``."""


def _partial(request: web.Request) -> bool:
    value = request.query.get(PARTIAL)
    if value is None:
        return False
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise ApiError(
        400,
        "bad_request",
        f"?partial={short(value)}: write ?partial=true (answer from the partitions available "
        "now, labelled) or leave it out",
    )


def _handler(op: ReadOp) -> Handler:
    # Numbers keep their digits (float_hook) so {"$decimal": 12.10} is exact; `typed_args`
    # turns plain numbers back into floats and {"$type": ...} objects into values.
    decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(op.args, float_hook=Decimal)
    answer = op.answer
    asdict = msgspec.structs.asdict
    method = op.name

    async def handler(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        check_aggregate(request, name)
        partial = _partial(request)
        if request.method == "POST":
            raw = await read_body(request)
            args = decode_args(op, decoder, raw if raw.strip() else b"{}")
        else:
            args = decode_args(op, decoder, query_args(request))
        process = request.app[PROCESS]
        cluster_read = getattr(process, "read", None)
        if cluster_read is not None:
            # A member: the whole aggregate, merged from every partition's owner.
            result, skipped = await cluster_read(name, method, asdict(args), partial)
            out: Any = answer(result)
            if skipped:
                out = {"result": out.result, "partial": skipped}
            return web.Response(body=encoder.encode(out), content_type="application/json")
        # From here on: synchronous reads only (no await), so one committed state. The
        # handle is taken here too, after the last await, in case the process swaps it.
        store = process.store
        assert store is not None  # only a member has none, and it reads above
        aggregate = store.aggregate(name)
        result = getattr(aggregate, method)(**asdict(args))
        return web.Response(body=encoder.encode(answer(result)), content_type="application/json")

    handler.__name__ = f"read_{op.name}"
    return handler


async def _aggregates(request: web.Request) -> web.StreamResponse:
    return json_response({"result": aggregate_statuses(request.app[PROCESS])})


def add_routes(router: web.UrlDispatcher) -> None:
    """Register /v1/aggregates and, for every op, GET and POST /v1/aggregates/{name}/{op}."""
    router.add_get("/v1/aggregates", _aggregates, allow_head=False)
    for op in READ_OPS.values():
        h = _handler(op)
        router.add_get(f"/v1/aggregates/{{name}}/{op.name}", h, allow_head=False)
        router.add_post(f"/v1/aggregates/{{name}}/{op.name}", h)
