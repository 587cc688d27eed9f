"""Member-to-member reads: the `Member` primitives of one partition of another member, over HTTP.

A read on any member is a merge (`tally.consumers.cluster.merge`) over one part per partition
of the aggregate's topic: a `LocalMember` for a partition this member owns, a `RemoteTask`
for one another member owns. The calls a merge makes in one round (``asyncio.gather``) to the
partitions of one member travel as **one** request (`Peers` coalesces the calls made in the
same event-loop turn), so a read costs one request per member per round, whatever the number
of partitions.

Wire: ``POST /internal/v1/calls``, msgpack both ways (bytes stay bytes, ints and floats keep
their type). Arguments are written as the public API writes them (`tally.schemas.values.to_json`:
Decimal, dates, UUIDs as ``{"$type": ...}``), so the callee reads them back exactly; sums come
back as int, float or, for a Decimal, its string. Each call is answered only by the member
that owns its partition *now* and has caught up on it; otherwise its outcome says why
(``moving``, with the partition's progress), and the read answers 503 rather than guess.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
from aiokafka.structs import TopicPartition

from tally.consumers.cluster.merge import BadMemberAnswer, BoundsArg, Entry
from tally.engine import AggregateNotReady, InvalidArgument, InvalidKey, Order, Query, TallyError
from tally.engine.btree import Sum
from tally.engine.errors import OffsetOutOfRange
from tally.schemas.values import from_json, to_json

__all__ = [
    "INTERNAL_PATH",
    "METHODS",
    "PARTITION_CALLS",
    "READ_METHODS",
    "Call",
    "Calls",
    "MemberUnreachable",
    "Outcome",
    "Outcomes",
    "PartitionMoving",
    "PartitionRefused",
    "Peers",
    "RemoteTask",
    "decode_calls",
    "decode_outcomes",
    "decode_result",
    "encode_args",
    "encode_calls",
    "encode_outcomes",
    "encode_result",
    "error_outcome",
    "wire",
]

INTERNAL_PATH = "/internal/v1/calls"
"""The route members answer each other's calls on."""

READ_METHODS = frozenset(
    {
        "count",
        "sum",
        "index_of",
        "count_batch",
        "sum_batch",
        "select",
        "ranks",
        "page",
        "sample",
        "namespaces",
    }
)
"""The `Member` primitives a call may name (what a merged read asks of a partition)."""
PARTITION_CALLS = frozenset({"ids", "patch_begin", "patch_apply", "patch_end"})
"""The partition calls of a deployment's reconcile (`tally.consumers.cluster.reconcile`):
``ids`` pages one partition's id index in id order (a scan its member holds open),
``patch_*`` drive one partition's live patch session (`tally.consumers.runtime.patches`)."""
METHODS = READ_METHODS | PARTITION_CALLS
"""Everything a call may name."""


class PartitionMoving(TallyError):
    """A partition of the aggregate has no member that can answer for it right now: it is
    being handed over (a rebalance), built by replay, or catching up after a hand-off.
    Over HTTP: 503 with ``moving`` (each partition, its state and progress)."""

    def __init__(self, message: str, moving: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.moving = moving


class MemberUnreachable(TallyError):
    """Another member did not answer (down, or cut off): its partitions move to the others
    once the group notices (the session timeout). Over HTTP: 503."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            f"member {url} did not answer ({reason}); if it is down, the group gives its "
            "partitions to the others after the session timeout: retry shortly"
        )
        self.url = url


class Call(msgspec.Struct, array_like=True, frozen=True):
    """One primitive on one partition of one aggregate."""

    aggregate: str
    topic: str
    partition: int
    method: str
    args: list[Any]
    fingerprint: str = ""
    """The definition the caller runs: the partition answers only from a generation of it
    ("": whatever it serves)."""


class Calls(msgspec.Struct, frozen=True):
    calls: list[Call]


class Outcome(msgspec.Struct, array_like=True, omit_defaults=True):
    """A call's result, or the code and message of why there is none."""

    ok: Any = None
    error: str | None = None
    message: str | None = None
    moving: dict[str, Any] | None = None
    """For ``error == "moving"``: the partition's state and progress."""


class Outcomes(msgspec.Struct, frozen=True):
    member: str
    results: list[Outcome]


BIG_INT = 1
"""The msgpack extension code of an int beyond msgpack's 64 bits (its decimal digits): keys
and bounds are ints of any size, and a range's sum of 64-bit sums can leave 64 bits."""
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 64) - 1


def _ext(code: int, data: memoryview) -> Any:
    if code == BIG_INT:
        return int(bytes(data))
    raise msgspec.DecodeError(f"unknown msgpack extension {code}")


def wire(v: Any) -> Any:
    """``v`` with every int msgpack cannot carry as an extension (lists and dicts walked)."""
    t = type(v)
    if t is int:
        return v if _INT_MIN <= v <= _INT_MAX else msgspec.msgpack.Ext(BIG_INT, str(v).encode())
    if t is list or t is tuple:
        return [wire(x) for x in v]
    if t is dict:
        return {k: wire(x) for k, x in v.items()}
    return v


_calls_decoder = msgspec.msgpack.Decoder(Calls, ext_hook=_ext)
_outcomes_decoder = msgspec.msgpack.Decoder(Outcomes, ext_hook=_ext)
_encoder = msgspec.msgpack.Encoder()


def decode_calls(body: bytes) -> list[Call]:
    """The calls of a request; `InvalidArgument` when the body is not one."""
    try:
        calls = _calls_decoder.decode(body).calls
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise InvalidArgument(f"not a tally member call ({e})") from None
    for c in calls:
        if c.method not in METHODS:
            raise InvalidArgument(f"unknown member call {c.method!r}; known: {sorted(METHODS)}")
    return calls


def call_args(call: Call) -> list[Any]:
    """A call's arguments as the engine takes them (typed values back from their objects)."""
    return [from_json(a) for a in call.args]


def encode_outcomes(member: str, outcomes: list[Outcome]) -> bytes:
    """A member's answer to one request of calls (the callee side)."""
    return _encoder.encode(Outcomes(member, outcomes))


def decode_outcomes(body: bytes) -> Outcomes:
    """A member's answer as the caller reads it; msgspec's errors on anything else."""
    return _outcomes_decoder.decode(body)


def encode_args(args: Sequence[Any]) -> list[Any]:
    """A call's arguments as they travel (`to_json`, ints past 64 bits as extensions)."""
    return [wire(to_json(a)) for a in args]


def encode_calls(calls: list[Call]) -> bytes:
    """One request's body."""
    return _encoder.encode(Calls(calls))


def _sum_out(s: Sum) -> Any:
    return str(s) if type(s) is Decimal else wire(s)


def _sum_in(v: Any) -> Sum:
    if type(v) is str:
        try:
            d = Decimal(v)
        except ArithmeticError:
            raise BadMemberAnswer(f"a member sent {v!r} as a sum") from None
        if d.is_finite():
            return d
    elif type(v) in (int, float):
        return v  # type: ignore[no-any-return]
    raise BadMemberAnswer(f"a member sent {v!r} as a sum")


def _entry_out(e: Entry | None) -> Any:
    return None if e is None else [e[0], _sum_out(e[1])]


def _entry_in(v: Any) -> Entry:
    if isinstance(v, list) and len(v) == 2 and type(v[0]) is bytes:
        return v[0], _sum_in(v[1])
    raise BadMemberAnswer(f"a member sent {v!r} as an item")


def encode_result(method: str, value: Any) -> Any:
    """A primitive's result as it travels."""
    if method == "ids":
        scan, entries, done = value
        return [scan, [[eid, ns, key, _sum_out(sv)] for eid, ns, key, sv in entries], bool(done)]
    if method.startswith("patch_"):
        return wire(value)
    if method == "sum":
        return _sum_out(value)
    if method == "sum_batch":
        return [_sum_out(s) for s in value]
    if method == "select":
        return [_entry_out(e) for e in value]
    if method == "page":
        entries, done = value
        return [[_entry_out(e) for e in entries], bool(done)]
    if method == "sample":
        n, e = value
        return [n, _entry_out(e)]
    return value  # ints, lists of ints, lists of bytes


def _ints(v: Any) -> list[int]:
    if isinstance(v, list) and all(type(x) is int for x in v):
        return v
    raise BadMemberAnswer(f"a member sent {v!r} where counts belong")


def _pair(v: Any, what: str) -> tuple[Any, Any]:
    if isinstance(v, list) and len(v) == 2:
        return v[0], v[1]
    raise BadMemberAnswer(f"a member sent {v!r} as {what}")


def _list(v: Any, what: str) -> list[Any]:
    if isinstance(v, list):
        return v
    raise BadMemberAnswer(f"a member sent {v!r} as {what}")


def decode_result(method: str, v: Any) -> Any:
    """A primitive's result as `Member` returns it; `BadMemberAnswer` if it cannot be one."""
    if method in ("count", "index_of"):
        if type(v) is int:
            return v
        raise BadMemberAnswer(f"a member sent {v!r} as a count")
    if method == "sum":
        return _sum_in(v)
    if method in ("count_batch", "ranks"):
        return _ints(v)
    if method == "sum_batch":
        return [_sum_in(s) for s in _list(v, "sums")]
    if method == "select":
        return [_entry_in(e) for e in _list(v, "items")]
    if method == "page":
        entries, done = _pair(v, "a page")
        if type(done) is not bool:
            raise BadMemberAnswer(f"a member sent {done!r} as a page's is_done")
        return [_entry_in(e) for e in _list(entries, "items")], done
    if method == "sample":
        n, e = _pair(v, "a sample")
        if type(n) is not int or n < 0 or (e is None) != (n == 0):
            raise BadMemberAnswer(f"a member sent {v!r} as a sample (count, item)")
        return n, None if e is None else _entry_in(e)
    if method == "namespaces":
        if isinstance(v, list) and all(type(x) is bytes for x in v):
            return v
        raise BadMemberAnswer(f"a member sent {v!r} as namespaces")
    if method == "ids":
        scan, entries, done = v if isinstance(v, list) and len(v) == 3 else (None, None, None)
        if type(scan) is not str or type(done) is not bool or not isinstance(entries, list):
            raise BadMemberAnswer(f"a member sent {v!r} as a page of ids")
        out = []
        for e in entries:
            if not (isinstance(e, list) and len(e) == 4 and all(type(x) is bytes for x in e[:3])):
                raise BadMemberAnswer(f"a member sent {e!r} as an id entry")
            out.append((e[0], e[1], e[2], _sum_in(e[3])))
        return scan, out, done
    if method.startswith("patch_"):
        if isinstance(v, dict):
            return v
        raise BadMemberAnswer(f"a member sent {v!r} as a {method} answer")
    raise BadMemberAnswer(f"unknown member call {method!r}")


_ERRORS: Mapping[str, type[TallyError]] = {
    "invalid_argument": InvalidArgument,
    "invalid_key": InvalidKey,
    "offset_out_of_range": OffsetOutOfRange,
}


class PartitionRefused(TallyError):
    """A partition's patch session refused a call (``status``, ``code`` as its HTTP answer
    would say: e.g. 503 ``catching_up``, 409 ``truncated``)."""

    def __init__(self, message: str, status: int, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def error_outcome(e: Exception) -> Outcome:
    """The outcome of a call that raised ``e`` (the callee side)."""
    status, code = getattr(e, "status", None), getattr(e, "code", None)
    if type(status) is int and type(code) is str and not isinstance(e, PartitionMoving):
        return Outcome(error="refused", message=str(e), moving={"status": status, "code": code})
    if isinstance(e, PartitionMoving):
        return Outcome(error="moving", message=str(e), moving=e.moving[0] if e.moving else None)
    if isinstance(e, AggregateNotReady):
        progress = e.progress if isinstance(e.progress, dict) else None
        return Outcome(error="not_ready", message=str(e), moving=progress)
    for code, cls in _ERRORS.items():
        if isinstance(e, cls):
            return Outcome(error=code, message=str(e))
    return Outcome(error="internal", message=f"{type(e).__name__}: {e}")


def _raise_outcome(url: str, call: Call, out: Outcome) -> None:
    code, message = out.error, out.message or ""
    if code == "moving":
        raise PartitionMoving(message, [out.moving or {}])
    if code == "not_ready":
        raise AggregateNotReady(message, out.moving)
    if code == "refused":
        info = out.moving or {}
        raise PartitionRefused(message, int(info.get("status", 500)), str(info.get("code", "")))
    cls = _ERRORS.get(code or "")
    if cls is not None:
        raise cls(message)
    raise BadMemberAnswer(
        f"member {url} failed {call.method} on {call.topic}[{call.partition}]: {message}"
    )


class Peers:
    """The HTTP client to the other members, one request per member per event-loop turn.

    ``timeout``: seconds a member may take to answer one request before the read gives up
    on it (`MemberUnreachable`)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._queued: dict[str, list[tuple[Call, asyncio.Future[Any]]]] = {}
        self._sending: set[asyncio.Future[None]] = set()
        self.requests = 0
        """Requests sent so far (tests check the coalescing by it)."""

    async def call(self, url: str, call: Call) -> Any:
        """The outcome's result of ``call`` on the member at ``url``. O(1) requests per turn."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        queue = self._queued.get(url)
        if queue is None:
            queue = self._queued[url] = []
            loop.call_soon(self._flush, url)
        queue.append((call, fut))
        return await fut

    def _flush(self, url: str) -> None:
        batch = self._queued.pop(url, [])
        if batch:
            fut = asyncio.ensure_future(self._send(url, batch))
            self._sending.add(fut)
            fut.add_done_callback(self._sending.discard)

    async def _send(self, url: str, batch: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        try:
            outcomes = await self._post(url, [c for c, _ in batch])
        except BaseException as e:
            err = (
                e
                if isinstance(e, TallyError)
                else MemberUnreachable(url, str(e) or type(e).__name__)
            )
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            if not isinstance(e, Exception):
                raise
            return
        for (call, fut), out in zip(batch, outcomes, strict=True):
            if fut.done():
                continue
            try:
                if out.error is not None:
                    _raise_outcome(url, call, out)
                fut.set_result(decode_result(call.method, out.ok))
            except TallyError as e:
                fut.set_exception(e)
            except Exception as e:  # whatever a member sends, the read ends (never hangs)
                fut.set_exception(
                    BadMemberAnswer(f"member {url} sent an unreadable {call.method} answer ({e})")
                )

    async def _post(self, url: str, calls: list[Call]) -> list[Outcome]:
        session = self._client()
        self.requests += 1
        try:
            async with session.post(
                url.rstrip("/") + INTERNAL_PATH,
                data=encode_calls(calls),
                headers={"Content-Type": "application/msgpack"},
            ) as resp:
                body = await resp.read()
                if resp.status == 404:  # no internal route: not a member (or another version)
                    raise BadMemberAnswer(
                        f"{url} is not a member of this deployment (a consumer started without "
                        "--group-id?): check the members' --advertise URLs"
                    )
                if 400 <= resp.status < 500:
                    raise BadMemberAnswer(
                        f"member {url} refused the call with HTTP {resp.status}: {body[:300]!r} "
                        "(do all members run the same tally version?)"
                    )
                if resp.status != 200:
                    raise MemberUnreachable(url, f"HTTP {resp.status}: {body[:200]!r}")
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise MemberUnreachable(url, str(e) or type(e).__name__) from None
        try:
            answer = decode_outcomes(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadMemberAnswer(f"member {url} sent an unreadable answer ({e})") from None
        if len(answer.results) != len(calls):
            raise BadMemberAnswer(
                f"member {url} answered {len(answer.results)} of {len(calls)} calls"
            )
        return answer.results

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit_per_host=8),
            )
        return self._session

    async def get_json(self, url: str, timeout: float) -> dict[str, Any]:
        """``GET url`` of another member, its JSON object (e.g. its /status)."""
        async with self._client().get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            r.raise_for_status()
            doc = await r.json()
        if not isinstance(doc, dict):
            raise BadMemberAnswer(f"{url} answered {doc!r}")
        return doc

    async def post_json(self, url: str, token: str | None, timeout: float) -> dict[str, Any]:
        """``POST url`` of another member (with the deployment's token), its JSON answer."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self._client().post(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            doc = await r.json(content_type=None)
            if r.status >= 300:
                message = (doc.get("error") or {}).get("message") if isinstance(doc, dict) else doc
                raise BadMemberAnswer(f"HTTP {r.status}: {message}")
        return doc if isinstance(doc, dict) else {}

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class RemoteTask:
    """`Member` for one partition another member owns: each primitive is a `Call` through
    `Peers` (coalesced with the round's other calls to that member)."""

    def __init__(
        self, peers: Peers, url: str, aggregate: str, tp: TopicPartition, fingerprint: str = ""
    ) -> None:
        self.peers = peers
        self.url = url
        self.aggregate = aggregate
        self.tp = tp
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"<RemoteTask {self.aggregate} {self.tp.topic}[{self.tp.partition}] at {self.url}>"

    async def _call(self, method: str, *args: Any) -> Any:
        call = Call(
            self.aggregate,
            self.tp.topic,
            self.tp.partition,
            method,
            encode_args(args),
            self.fingerprint,
        )
        return await self.peers.call(self.url, call)

    async def count(self, namespace: Any, bounds: BoundsArg) -> int:
        return await self._call("count", namespace, bounds)  # type: ignore[no-any-return]

    async def sum(self, namespace: Any, bounds: BoundsArg) -> Sum:
        return await self._call("sum", namespace, bounds)  # type: ignore[no-any-return]

    async def index_of(
        self, key: Any, id: Any, order: Order, namespace: Any, bounds: BoundsArg
    ) -> int:
        return await self._call("index_of", key, id, order, namespace, bounds)  # type: ignore[no-any-return]

    async def count_batch(self, queries: Sequence[Query]) -> list[int]:
        return await self._call("count_batch", list(queries))  # type: ignore[no-any-return]

    async def sum_batch(self, queries: Sequence[Query]) -> list[Sum]:
        return await self._call("sum_batch", list(queries))  # type: ignore[no-any-return]

    async def select(
        self, offsets: Sequence[int], namespace: Any, bounds: BoundsArg
    ) -> list[Entry]:
        return await self._call("select", list(offsets), namespace, bounds)  # type: ignore[no-any-return]

    async def ranks(
        self, item_keys: Sequence[bytes], namespace: Any, bounds: BoundsArg
    ) -> list[int]:
        return await self._call("ranks", list(item_keys), namespace, bounds)  # type: ignore[no-any-return]

    async def page(
        self, after: bytes | None, page_size: int, order: Order, namespace: Any, bounds: BoundsArg
    ) -> tuple[list[Entry], bool]:
        return await self._call("page", after, page_size, order, namespace, bounds)  # type: ignore[no-any-return]

    async def sample(self, namespace: Any, bounds: BoundsArg) -> tuple[int, Entry | None]:
        return await self._call("sample", namespace, bounds)  # type: ignore[no-any-return]

    async def namespaces(self) -> list[bytes]:
        return await self._call("namespaces")  # type: ignore[no-any-return]
