"""`TallyClient`: a small synchronous client of a consumer's HTTP API (stdlib urllib).

Methods mirror `engine.Aggregate`'s reads with the aggregate name first and
return the same types (`engine.Item`, `engine.Page`; JSON arrays in keys, ids
and namespaces come back as tuples)::

    from consumers.client import TallyClient

    tally = TallyClient("http://127.0.0.1:8750")
    tally.count("by_game", namespace="chess", bounds={"lower": {"key": 1000}})
    tally.at("leaderboard", -1)                     # the top item
    page = tally.paginate("leaderboard", page_size=50)
    page = tally.paginate("leaderboard", cursor=page.cursor, page_size=50)

Errors raise `ClientError` (a `TallyError`) with the server's ``status`` and
``code``; an unreachable server raises one naming the URL. Keys are None, bool,
int, float (not NaN/inf), str, Decimal, date, datetime, time, timedelta, UUID and
tuples/lists of those; the typed ones are sent as ``{"$decimal": ...}``-style
objects (`schemas.values`), so a bound on a Decimal key is exact (bytes keys
cannot be sent over JSON).

What comes back is JSON: numbers with a fraction are floats, or Decimals with
their exact digits with ``TallyClient(url, decimals=True)`` (a Decimal sum, or a
Decimal key, read exactly); datetime, date, time and UUID keys come back as their
ISO / canonical strings (JSON has no such types).
"""

from __future__ import annotations

import http.client
import math
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

import msgspec

from engine import Bounds, Item, Order, Page, Query, TallyError
from schemas.config import DEFAULT_URL
from schemas.errors import EXIT_RUNTIME, EXIT_USAGE, Unreachable
from schemas.values import to_json

__all__ = ["DEFAULT_URL", "ClientError", "ServerUnreachable", "TallyClient"]

BoundsArg = Bounds | Mapping[str, Any] | None
QueryArg = Query | Mapping[str, Any]

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()
_decimal_decoder = msgspec.json.Decoder(float_hook=Decimal)


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
    if isinstance(v, list):
        return tuple(_tup(x) for x in v)
    return v


def _item(d: Any) -> Item:
    return Item(_tup(d["key"]), _tup(d["id"]), d["sum_value"], _tup(d.get("namespace")))


def _item_or_none(d: Any) -> Item | None:
    return None if d is None else _item(d)


def _check(value: Any, where: str) -> None:
    """Reject values JSON cannot carry faithfully (msgspec would send NaN as null)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ClientError(f"{where}: {value!r} cannot be sent (NaN/inf are not valid keys or JSON numbers)")
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raise ClientError(f"{where}: bytes values cannot be sent over the JSON API; use str or int keys")
    elif isinstance(value, (list, tuple)):
        for x in value:
            _check(x, where)
    elif isinstance(value, Mapping):
        for k, x in value.items():
            _check(x, f"{where}.{k}")
    elif isinstance(value, msgspec.Struct):
        for f in value.__struct_fields__:
            _check(getattr(value, f), f"{where}.{f}")


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

    def _read(self, aggregate: str, op: str, **args: Any) -> Any:
        if not isinstance(aggregate, str) or not aggregate:
            raise ClientError(f"aggregate must be a non-empty name, got {aggregate!r}")
        _check(args, op)
        path = f"/v1/aggregates/{urllib.parse.quote(aggregate, safe='')}/{op}"
        return self._json("POST", path, to_json(args))["result"]

    @staticmethod
    def _range(namespace: Any, bounds: BoundsArg) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if namespace is not None:
            out["namespace"] = namespace
        if bounds is not None:
            out["bounds"] = bounds
        return out

    # ---- reads ----------------------------------------------------------------------

    def aggregates(self) -> list[dict[str, Any]]:
        """The consumer's aggregates: name, table, topic, state, items, namespaces."""
        result: list[dict[str, Any]] = self._json("GET", "/v1/aggregates")["result"]
        return result

    def count(self, aggregate: str, namespace: Any = None, bounds: BoundsArg = None) -> int:
        return int(self._read(aggregate, "count", **self._range(namespace, bounds)))

    def sum(self, aggregate: str, namespace: Any = None, bounds: BoundsArg = None) -> int | float:
        result: int | float = self._read(aggregate, "sum", **self._range(namespace, bounds))
        return result

    def at(self, aggregate: str, offset: int, namespace: Any = None, bounds: BoundsArg = None) -> Item:
        return _item(self._read(aggregate, "at", offset=offset, **self._range(namespace, bounds)))

    def index_of(
        self,
        aggregate: str,
        key: Any,
        id: Any = None,
        order: Order = "asc",
        namespace: Any = None,
        bounds: BoundsArg = None,
    ) -> int:
        args: dict[str, Any] = {"key": key, "order": order, **self._range(namespace, bounds)}
        if id is not None:
            args["id"] = id
        return int(self._read(aggregate, "index_of", **args))

    def min(self, aggregate: str, namespace: Any = None, bounds: BoundsArg = None) -> Item | None:
        return _item_or_none(self._read(aggregate, "min", **self._range(namespace, bounds)))

    def max(self, aggregate: str, namespace: Any = None, bounds: BoundsArg = None) -> Item | None:
        return _item_or_none(self._read(aggregate, "max", **self._range(namespace, bounds)))

    def random(self, aggregate: str, namespace: Any = None, bounds: BoundsArg = None) -> Item | None:
        return _item_or_none(self._read(aggregate, "random", **self._range(namespace, bounds)))

    def paginate(
        self,
        aggregate: str,
        cursor: str | None = None,
        page_size: int = 100,
        order: Order = "asc",
        namespace: Any = None,
        bounds: BoundsArg = None,
    ) -> Page:
        args: dict[str, Any] = {"page_size": page_size, "order": order, **self._range(namespace, bounds)}
        if cursor is not None:
            args["cursor"] = cursor
        d = self._read(aggregate, "paginate", **args)
        return Page([_item(x) for x in d["items"]], d["cursor"], d["is_done"])

    def count_batch(self, aggregate: str, queries: Iterable[QueryArg]) -> list[int]:
        return [int(x) for x in self._read(aggregate, "count_batch", queries=list(queries))]

    def sum_batch(self, aggregate: str, queries: Iterable[QueryArg]) -> list[int | float]:
        result: list[int | float] = self._read(aggregate, "sum_batch", queries=list(queries))
        return result

    def at_batch(self, aggregate: str, queries: Iterable[QueryArg]) -> list[Item]:
        return [_item(x) for x in self._read(aggregate, "at_batch", queries=list(queries))]

    def namespaces(self, aggregate: str) -> list[Any]:
        return [_tup(x) for x in self._read(aggregate, "namespaces")]

    # ---- operations -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """/status: aggregates, partitions (offset, end offset, lag), counters, uptime, broker."""
        result: dict[str, Any] = self._json("GET", "/status")
        return result

    def rebuild(self, aggregate: str) -> dict[str, Any]:
        """Start a rebuild by replay in the running consumer (needs its token)."""
        from urllib.parse import quote

        doc = self._json("POST", f"/v1/aggregates/{quote(aggregate, safe='')}/rebuild", {})
        result: dict[str, Any] = doc.get("result", doc) if isinstance(doc, dict) else {"result": doc}
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
        """Send one msgpack chunk (`engine.reconcile.encode_fixes`); its counts."""
        doc = self._json(
            "POST", self._session_path(aggregate, session), raw=body, content_type="application/msgpack"
        )
        result: dict[str, Any] = doc["result"]
        return result

    def patch_end(self, aggregate: str, session: str) -> dict[str, Any]:
        """Close a patch session; its totals."""
        result: dict[str, Any] = self._json("DELETE", self._session_path(aggregate, session))["result"]
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
