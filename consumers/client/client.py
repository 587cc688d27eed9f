"""`TallyClient`: a small synchronous client of a consumer's HTTP API (stdlib urllib).

Every read goes through one method, ``read(op, aggregate, *args, **kwargs)``, driven by
`tally.schemas.reads.READ_OPS`: the arguments are those of the `engine.Aggregate` method of that
name, the answer is decoded with the op's result type (`engine.Item`, `engine.Page`...;
JSON arrays in keys, ids and namespaces come back as tuples). The typed methods (``count``,
``at``, ``paginate``...) are that call with the signature of the `Aggregate` method, the
aggregate name first; ``client.aggregate(name)`` is a handle with exactly `Aggregate`'s
read signatures (what `tally query` uses, local or remote alike)::

    from tally.consumers.client import TallyClient

    tally = TallyClient("http://127.0.0.1:8750")
    tally.count("by_game", namespace="chess", bounds={"lower": {"key": 1000}})
    tally.at("leaderboard", -1)                     # the top item
    page = tally.paginate("leaderboard", page_size=50)
    page = tally.paginate("leaderboard", cursor=page.cursor, page_size=50)
    tally.aggregate("leaderboard").index_of(1250, id=7, order="desc")

Errors raise `ClientError` (a `TallyError`) with the server's ``status`` and
``code``; an unreachable server raises one naming the URL. Keys are None, bool,
int, float (not NaN/inf), str, Decimal, date, datetime, time, timedelta, UUID and
tuples/lists of those; the typed ones are sent as ``{"$decimal": ...}``-style
objects (`tally.schemas.values`), so a bound on a Decimal key is exact (bytes keys
cannot be sent over JSON).

What comes back is JSON: numbers with a fraction are floats, or Decimals with
their exact digits with ``TallyClient(url, decimals=True)`` (a Decimal sum, or a
Decimal key, read exactly); datetime, date, time and UUID keys come back as their
ISO / canonical strings (JSON has no such types).
"""

from __future__ import annotations

import functools
import http.client
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import msgspec

from tally.engine import Aggregate, Item, Page, TallyError
from tally.schemas.config import DEFAULT_URL
from tally.schemas.errors import EXIT_RUNTIME, EXIT_USAGE, Unreachable
from tally.schemas.reads import READ_OPS
from tally.schemas.values import to_json

__all__ = ["DEFAULT_URL", "ClientError", "RemoteAggregate", "ServerUnreachable", "TallyClient"]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_decimal_decoder = msgspec.json.Decoder(float_hook=Decimal)
_answers: dict[type[msgspec.Struct], msgspec.json.Decoder[Any]] = {}
"""A reused typed decoder per answer type (made on first use)."""

_JSON_CONTAINERS = (str, bytes, bytearray, memoryview, list, tuple, Mapping, msgspec.Struct)
P = ParamSpec("P")
R = TypeVar("R")


class ClientError(TallyError):
    """An HTTP API call failed: ``status`` (None if no answer), ``code``, and the message.

    Its exit code follows the answer: a 4xx (or a value the client refused to send) is the
    caller's to fix (2), a 5xx the server's (1, e.g. 503 while an aggregate is being built).
    """

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        details: Mapping[str, Any] | None = None,
        *,
        advice: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, advice=advice, hint=hint)
        self.status = status
        self.code = code
        self.details = dict(details or {})
        self.exit_code = EXIT_RUNTIME if status is not None and status >= 500 else EXIT_USAGE


class ServerUnreachable(ClientError, Unreachable):
    """No HTTP answer at all: nothing listens at the url, or the connection failed (exit 1)."""

    def __init__(self, message: str, *, advice: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, advice=advice, hint=hint)
        self.exit_code = EXIT_RUNTIME


def _tup(v: Any) -> Any:
    if type(v) is list:
        return tuple(_tup(x) for x in v)
    return v


def _item(it: Item) -> Item:
    if list in (type(it.key), type(it.id), type(it.namespace)):
        return Item(_tup(it.key), _tup(it.id), it.sum_value, _tup(it.namespace))
    return it


def _tuples(result: Any) -> Any:
    """A decoded answer with JSON arrays in keys, ids and namespaces as tuples (as the engine
    gives them)."""
    t = type(result)
    if t is Item:
        return _item(result)
    if t is Page:
        return Page([_item(x) for x in result.items], result.cursor, result.is_done)
    if t is list:
        return [_tuples(x) if type(x) is Item else _tup(x) for x in result]
    return result


def _check(value: Any, where: str) -> None:
    """Reject values JSON cannot carry faithfully (msgspec would send NaN as null)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ClientError(
                f"{where}: {value!r} cannot be sent (NaN/inf are not valid keys or JSON numbers)"
            )
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raise ClientError(
            f"{where}: bytes values cannot be sent over the JSON API; use str or int keys"
        )
    elif isinstance(value, (list, tuple)):
        for x in value:
            _check(x, where)
    elif isinstance(value, Mapping):
        for k, x in value.items():
            _check(x, f"{where}.{k}")
    elif isinstance(value, msgspec.Struct):
        for f in value.__struct_fields__:
            _check(getattr(value, f), f"{where}.{f}")


class _Read(Generic[P, R]):
    """A read method of `TallyClient`: `TallyClient.read` of the op named like the
    `engine.Aggregate` method it is made from, typed with that method's signature and the
    aggregate name first (so the two cannot drift apart)."""

    def __init__(self, method: Callable[Concatenate[Aggregate, P], R]) -> None:
        self.op = method.__name__
        assert self.op in READ_OPS, f"{self.op} is not a read op of tally.schemas.reads.READ_OPS"
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, client: None, owner: type[Any]) -> _Read[P, R]: ...
    @overload
    def __get__(
        self, client: TallyClient, owner: type[Any]
    ) -> Callable[Concatenate[str, P], R]: ...
    def __get__(self, client: TallyClient | None, owner: type[Any]) -> Any:
        if client is None:
            return self
        return functools.partial(client.read, self.op)


class _AggregateRead(Generic[P, R]):
    """A read method of `RemoteAggregate`: the `engine.Aggregate` method's signature."""

    def __init__(self, method: Callable[Concatenate[Aggregate, P], R]) -> None:
        self.op = method.__name__
        assert self.op in READ_OPS, f"{self.op} is not a read op of tally.schemas.reads.READ_OPS"
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, handle: None, owner: type[Any]) -> _AggregateRead[P, R]: ...
    @overload
    def __get__(self, handle: RemoteAggregate, owner: type[Any]) -> Callable[P, R]: ...
    def __get__(self, handle: RemoteAggregate | None, owner: type[Any]) -> Any:
        if handle is None:
            return self
        return functools.partial(handle.client.read, self.op, handle.name)


class RemoteAggregate:
    """One aggregate of a server: the reads of `engine.Aggregate`, over HTTP."""

    def __init__(self, client: TallyClient, name: str) -> None:
        self.client = client
        self.name = name

    def __repr__(self) -> str:
        return f"<RemoteAggregate {self.name!r} at {self.client.url!r}>"

    count = _AggregateRead(Aggregate.count)
    sum = _AggregateRead(Aggregate.sum)
    at = _AggregateRead(Aggregate.at)
    index_of = _AggregateRead(Aggregate.index_of)
    min = _AggregateRead(Aggregate.min)
    max = _AggregateRead(Aggregate.max)
    random = _AggregateRead(Aggregate.random)
    paginate = _AggregateRead(Aggregate.paginate)
    count_batch = _AggregateRead(Aggregate.count_batch)
    sum_batch = _AggregateRead(Aggregate.sum_batch)
    at_batch = _AggregateRead(Aggregate.at_batch)
    namespaces = _AggregateRead(Aggregate.namespaces)


def _every_read_op(cls: type[Any], make: Callable[[Any], Any]) -> None:
    """Give ``cls`` a read for each op of `READ_OPS` it does not declare (untyped for mypy
    until declared, but there: adding an op to the table is enough to have it here)."""
    for op in READ_OPS:
        if op not in cls.__dict__:
            method = getattr(Aggregate, op, None)
            assert method is not None, f"READ_OPS has {op!r}, engine.Aggregate no such method"
            setattr(cls, op, make(method))


_every_read_op(RemoteAggregate, _AggregateRead)


class TallyClient:
    """Synchronous client of one consumer's HTTP API."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        timeout: float = 10.0,
        token: str | None = None,
        *,
        decimals: bool = False,
    ) -> None:
        """``decimals``: read numbers with a fraction as exact Decimals instead of floats."""
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token
        self.decimals = decimals
        self._decoder = _decimal_decoder if decimals else _decoder

    def __repr__(self) -> str:
        return f"TallyClient({self.url!r})"

    # ---- transport ----------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        ok: Iterable[int] = (),
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> tuple[int, bytes]:
        url = self.url + path
        data = None
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if raw is not None:
            data = raw
            headers["Content-Type"] = content_type
        elif body is not None:
            data = _encoder.encode(body)
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            if e.code in ok:
                return e.code, raw
            raise self._error(method, url, e.code, raw) from None
        except (OSError, http.client.HTTPException) as e:  # URLError, refused, reset, timeout
            reason = getattr(e, "reason", e)
            start = (
                "is a consumer running with its HTTP API there? Start one with "
                "`tally consume DEFINITIONS --http HOST:PORT`, or pass the right "
            )
            raise ServerUnreachable(
                f"cannot reach tally at {self.url} ({method} {path}): {reason}",
                advice=start + "url to TallyClient",
                hint=start + "--url (or $TALLY_URL)",
            ) from None

    @staticmethod
    def _error(method: str, url: str, status: int, raw: bytes) -> ClientError:
        try:
            doc = _decoder.decode(raw)
            err = doc["error"]
            code, message = str(err["code"]), str(err["message"])
        except (msgspec.DecodeError, KeyError, TypeError):
            text = raw[:200].decode("utf-8", "replace")
            return ClientError(f"{method} {url} answered HTTP {status}: {text}", status, None)
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        return ClientError(f"{message} (HTTP {status} {code})", status, code, details)

    def _json(
        self,
        method: str,
        path: str,
        body: Any = None,
        ok: Iterable[int] = (),
        *,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        status, raw = self._request(method, path, body, ok, raw=raw, content_type=content_type)
        try:
            return self._decoder.decode(raw)
        except msgspec.DecodeError:
            raise ClientError(
                f"{method} {self.url}{path} answered HTTP {status} with a body that is not JSON: "
                f"{raw[:200].decode('utf-8', 'replace')}",
                status,
            ) from None

    def read(self, op: str, aggregate: str, /, *args: Any, **kwargs: Any) -> Any:
        """The read ``op`` of `READ_OPS` on ``aggregate``; the other arguments are those of
        the `engine.Aggregate` method ``op`` (positional or by name)."""
        spec = READ_OPS.get(op)
        if spec is None:
            raise ClientError(f"unknown read op {op!r}; ops are {', '.join(READ_OPS)}")
        if not isinstance(aggregate, str) or not aggregate:
            raise ClientError(f"aggregate must be a non-empty name, got {aggregate!r}")
        if len(args) > len(spec.fields):
            raise TypeError(f"{op}() takes {len(spec.fields)} arguments, got {len(args)}")
        body = dict(zip(spec.fields, args, strict=False))
        for name, value in kwargs.items():
            if name in body:
                raise TypeError(f"{op}() got multiple values for argument {name!r}")
            body[name] = value
        for name, value in body.items():
            if isinstance(value, Iterable) and not isinstance(value, _JSON_CONTAINERS):
                body[name] = list(value)  # e.g. queries given as a generator, as Aggregate takes
        _check(body, op)
        path = f"/v1/aggregates/{urllib.parse.quote(aggregate, safe='')}/{op}"
        status, raw = self._request("POST", path, to_json(body))
        answer: Any
        try:
            if self.decimals:  # numbers with a fraction as exact Decimals (keys and sums)
                answer = msgspec.convert(_decimal_decoder.decode(raw), spec.answer)
            else:
                decoder = _answers.get(spec.answer)
                if decoder is None:
                    decoder = _answers[spec.answer] = msgspec.json.Decoder(spec.answer)
                answer = decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise ClientError(
                f"POST {self.url}{path} answered HTTP {status} with a body that is not a "
                f"{op} answer ({e}): {raw[:200].decode('utf-8', 'replace')}",
                status,
            ) from None
        return _tuples(answer.result)

    def aggregate(self, name: str) -> RemoteAggregate:
        """A handle on one aggregate of the server, with `engine.Aggregate`'s reads."""
        return RemoteAggregate(self, name)

    # ---- reads: `read` with the signatures of engine.Aggregate, the aggregate first -------

    def aggregates(self) -> list[dict[str, Any]]:
        """The consumer's aggregates: name, table, topic, state, items, namespaces."""
        result: list[dict[str, Any]] = self._json("GET", "/v1/aggregates")["result"]
        return result

    count = _Read(Aggregate.count)
    sum = _Read(Aggregate.sum)
    at = _Read(Aggregate.at)
    index_of = _Read(Aggregate.index_of)
    min = _Read(Aggregate.min)
    max = _Read(Aggregate.max)
    random = _Read(Aggregate.random)
    paginate = _Read(Aggregate.paginate)
    count_batch = _Read(Aggregate.count_batch)
    sum_batch = _Read(Aggregate.sum_batch)
    at_batch = _Read(Aggregate.at_batch)
    namespaces = _Read(Aggregate.namespaces)

    # ---- operations -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """/status: aggregates, partitions (offset, end offset, lag), counters, uptime, broker."""
        result: dict[str, Any] = self._json("GET", "/status")
        return result

    def rebuild(self, aggregate: str) -> dict[str, Any]:
        """Start a rebuild by replay in the running consumer (needs its token)."""
        from urllib.parse import quote

        doc = self._json("POST", f"/v1/aggregates/{quote(aggregate, safe='')}/rebuild", {})
        result: dict[str, Any] = (
            doc.get("result", doc) if isinstance(doc, dict) else {"result": doc}
        )
        return result

    # ---- live patch sessions (`tally reconcile --patch --url`; need the token) ---------

    def _session_path(self, aggregate: str, session: str | None = None) -> str:
        path = f"/v1/aggregates/{urllib.parse.quote(aggregate, safe='')}/patch-sessions"
        return path if session is None else f"{path}/{urllib.parse.quote(session, safe='')}"

    def patch_begin(self, aggregate: str) -> dict[str, Any]:
        """Open a patch session; ``{"session", "aggregate", "generation", "fingerprint"}``."""
        result: dict[str, Any] = self._json("POST", self._session_path(aggregate), {})["result"]
        return result

    def patch_chunk(self, aggregate: str, session: str, body: bytes) -> dict[str, Any]:
        """Send one msgpack chunk (`tally.engine.reconcile.encode_fixes`); its counts."""
        doc = self._json(
            "POST",
            self._session_path(aggregate, session),
            raw=body,
            content_type="application/msgpack",
        )
        result: dict[str, Any] = doc["result"]
        return result

    def patch_end(self, aggregate: str, session: str) -> dict[str, Any]:
        """Close a patch session; its totals."""
        result: dict[str, Any] = self._json("DELETE", self._session_path(aggregate, session))[
            "result"
        ]
        return result

    def metrics(self) -> str:
        """/metrics in Prometheus text format."""
        return self._request("GET", "/metrics")[1].decode("utf-8")

    def healthz(self) -> dict[str, Any]:
        result: dict[str, Any] = self._json("GET", "/healthz")
        return result

    def readyz(self) -> dict[str, Any]:
        """/readyz's body, for 200 and 503 alike: ``["status"]`` is "ready" or "not_ready" (+ ``reason``)."""
        result: dict[str, Any] = self._json("GET", "/readyz", ok=(503,))
        return result

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI 3.1 document of the API."""
        result: dict[str, Any] = self._json("GET", "/openapi.json")
        return result


_every_read_op(TallyClient, _Read)
