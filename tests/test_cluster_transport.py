"""Members' reads of each other (`tally.consumers.cluster.transport`), without a broker.

* The wire codec: every primitive's result survives `encode_result` → msgpack →
  `decode_result` with its types (an int stays an int, a float a float, a Decimal keeps its
  digits, keys stay bytes); what can be no answer is a `BadMemberAnswer`. Arguments written
  by `to_json` come back from `call_args` as the engine reads them (Decimal, dates, times,
  UUIDs; tuples arrive as lists), checked on a real aggregate: the same items either way.
* End to end over real aiohttp servers on 127.0.0.1 serving `tally.consumers.http.internal`:
  each server is a "member" answering its partitions from real aggregates, one RocksDB store
  per partition, as `MemberProcess.answer` does. `MergedReads` over `RemoteTask`s (and the
  reader's own `LocalMember`s) answers every read op as one aggregate holding every item
  (the oracle), in one request per member per round.
* The errors a remote part raises: moving, not ready, the engine's own, a member down or
  stalled, an answer that is garbage or has the wrong number of results.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import itertools
import math
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiokafka.structs import TopicPartition
from budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.consumers.cluster.merge import BadMemberAnswer, LocalMember, Member, MergedReads
from tally.consumers.cluster.transport import (
    INTERNAL_PATH,
    METHODS,
    READ_METHODS,
    Call,
    Calls,
    MemberUnreachable,
    Outcome,
    PartitionMoving,
    Peers,
    RemoteTask,
    call_args,
    decode_calls,
    decode_outcomes,
    decode_result,
    encode_args,
    encode_calls,
    encode_outcomes,
    encode_result,
    error_outcome,
)
from tally.consumers.http import internal
from tally.consumers.http.app import _errors
from tally.consumers.http.common import PROCESS, Served
from tally.engine import (
    Aggregate,
    AggregateNotReady,
    Bound,
    Bounds,
    InvalidArgument,
    InvalidKey,
    OffsetOutOfRange,
    Query,
    Store,
    encode_key,
)
from tally.engine.types import Order, as_queries, normalize_bounds
from tally.schemas.reads import READ_OPS
from tally.schemas.values import to_json

TOPIC = "scores"
PARTITIONS = 6


def shape(v: Any) -> Any:
    """``v`` with each leaf as (type, repr): equal shapes are equal values of equal types
    (1 is not 1.0, Decimal('1.10') is not Decimal('1.1'), -0.0 is not 0.0)."""
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [shape(x) for x in v])
    return (type(v).__name__, repr(v))


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """What ``fn()`` does: ("ok", its result) or (its error's type, message)."""
    try:
        return "ok", fn()
    except Exception as e:
        return type(e).__name__, str(e)


# ============================================================== the codec: results

INT64 = st.integers(-(2**63), 2**63 - 1)
COUNTS = st.integers(0, 2**63 - 1)
# A sum is what a tree adds: ints, floats (an overflow is inf) or Decimals (any digits).
SUMS = st.one_of(
    INT64, st.floats(allow_nan=False), st.decimals(allow_nan=False, allow_infinity=False)
)
ENTRIES = st.tuples(st.binary(max_size=40), SUMS)

RESULTS: dict[str, st.SearchStrategy[Any]] = {
    "count": COUNTS,
    "index_of": COUNTS,
    "sum": SUMS,
    "count_batch": st.lists(COUNTS, max_size=5),
    "ranks": st.lists(COUNTS, max_size=5),
    "sum_batch": st.lists(SUMS, max_size=5),
    "select": st.lists(ENTRIES, max_size=5),
    "page": st.tuples(st.lists(ENTRIES, max_size=5), st.booleans()),
    "sample": st.one_of(st.just((0, None)), st.tuples(st.integers(1, 2**63 - 1), ENTRIES)),
    "namespaces": st.lists(st.binary(max_size=20), max_size=5),
    # a reconcile's partition calls: a page of the id index, the patch session's answers
    "ids": st.tuples(
        st.text(max_size=16),
        st.lists(
            st.tuples(st.binary(max_size=20), st.binary(max_size=20), st.binary(max_size=20), SUMS),
            max_size=5,
        ),
        st.booleans(),
    ),
    **{
        m: st.dictionaries(
            st.text(max_size=10),
            st.one_of(st.none(), INT64, st.text(max_size=10), st.binary(max_size=10)),
            max_size=4,
        )
        for m in ("patch_begin", "patch_apply", "patch_end")
    },
}
"""What each primitive of a `Member` (`LocalMember` on an engine aggregate) returns, and each
partition call of a deployment's reconcile."""


def result_over_the_wire(method: str, value: Any) -> Any:
    """``value`` as the calling member gets it: encoded by the callee into its answer's
    msgpack body, decoded by the caller."""
    body = encode_outcomes("http://callee", [Outcome(ok=encode_result(method, value))])
    (out,) = decode_outcomes(body).results
    assert out.error is None
    return decode_result(method, out.ok)


def test_every_method_has_its_results_tested() -> None:
    assert set(RESULTS) == METHODS


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=examples(100), deadline=None)
@given(data=st.data())
def test_results_cross_the_wire_with_their_types(method: str, data: st.DataObject) -> None:
    value = data.draw(RESULTS[method])
    assert shape(result_over_the_wire(method, value)) == shape(value)


@pytest.mark.parametrize(
    ("method", "value"),
    [
        ("sum", Decimal("1.10")),  # the trailing zero is a digit
        ("sum", Decimal("-0")),
        ("sum", Decimal("1E+3")),
        ("sum", Decimal("123456789012345678901234567890.000000001")),
        ("sum", -0.0),
        ("sum", 0.1),
        ("sum", 2**53 + 1),  # not a float
        ("sum", 2**63 - 1),
        ("sum", -(2**63)),
        ("sum", math.inf),
        ("sum_batch", [1, 0.5, Decimal("0.50")]),
        ("select", [(b"\x00\x01\xff", Decimal("2.5")), (b"", 0)]),
        ("page", ([], True)),
        ("page", ([(b"\x05\x80\x00", 7)], False)),
        ("sample", (0, None)),
        ("sample", (3, (b"\x08a\x00\x04", 0.25))),
        ("namespaces", [b"", b"\x02", b"\x00\xff"]),
    ],
)
def test_result_examples_cross_the_wire(method: str, value: Any) -> None:
    assert shape(result_over_the_wire(method, value)) == shape(value)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(2**64, id="2**64"),
        pytest.param(-(2**63) - 1, id="-2**63-1"),
        pytest.param(4 * (2**63 - 1), id="four-max-items"),
    ],
)
def test_int_sums_beyond_64_bits_cross_the_wire(value: int) -> None:
    assert shape(result_over_the_wire("sum", value)) == shape(value)
    assert shape(result_over_the_wire("sum_batch", [value, 1])) == shape([value, 1])


# What cannot be an answer (values as msgpack decodes them: lists, str, bytes, int, float).
MALFORMED: list[Any] = [
    ("count", "1"),
    ("count", 1.0),
    ("count", True),
    ("count", None),
    ("index_of", [1]),
    ("sum", b"1"),  # bytes, not a Decimal's string
    ("sum", True),
    ("sum", None),
    ("sum", [1]),
    pytest.param(
        "sum",
        "twelve",
        id="sum-not-a-decimal",
    ),
    pytest.param(
        "sum",
        "NaN",
        id="sum-nan",
    ),
    ("count_batch", 5),
    ("count_batch", [1, "2"]),
    ("ranks", [1.0]),
    ("ranks", [True]),
    ("sum_batch", [1, b"x"]),
    pytest.param(
        "sum_batch",
        5,
        id="sum_batch-not-a-list",
    ),
    ("select", [["k", 1]]),  # str as bytes
    ("select", [[b"k"]]),  # an entry without its sum
    ("select", [[b"k", 1, 2]]),
    ("select", [None]),
    ("select", [[b"k", True]]),
    pytest.param(
        "select",
        7,
        id="select-not-a-list",
    ),
    ("page", [[["k", 1]], True]),
    pytest.param(
        "page",
        [[[b"k", 1]], True, 3],
        id="page-three-elements",
    ),
    pytest.param(
        "page",
        5,
        id="page-not-a-list",
    ),
    pytest.param(
        "page",
        [[[b"k", 1]]],
        id="page-without-done",
    ),
    pytest.param(
        "page",
        [[], "yes"],
        id="page-done-not-a-bool",
    ),
    ("sample", [1, ["k", 1]]),
    pytest.param(
        "sample",
        None,
        id="sample-none",
    ),
    pytest.param(
        "sample",
        [1],
        id="sample-one-element",
    ),
    pytest.param(
        "sample",
        [1.5, None],
        id="sample-float-count",
    ),
    pytest.param(
        "sample",
        ["3", None],
        id="sample-str-count",
    ),
    ("namespaces", ["a"]),
    ("namespaces", [b"a", 1]),
    ("namespaces", b"ab"),
    ("drop_everything", 1),  # no such method
]


@pytest.mark.parametrize(("method", "value"), MALFORMED)
def test_what_cannot_be_an_answer_is_a_bad_member_answer(method: str, value: Any) -> None:
    with pytest.raises(BadMemberAnswer, match=r"a member sent|unknown member call"):
        decode_result(method, value)


# ============================================================== the codec: arguments

TZS = st.sampled_from(
    [dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(-dt.timedelta(hours=8))]
)
SCALARS: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    INT64,
    st.floats(allow_nan=False),
    st.decimals(allow_nan=False),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.dates(),
    st.datetimes(timezones=st.none() | TZS),
    st.times(timezones=st.none() | TZS),
    st.timedeltas(),
    st.uuids(),
)
KEYS: st.SearchStrategy[Any] = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3).map(tuple), max_leaves=5
)
BOUND_STRUCTS = st.builds(Bound, KEYS, st.booleans(), KEYS)
BOUND_DICTS = st.fixed_dictionaries(
    {"key": KEYS, "inclusive": st.booleans()}, optional={"id": KEYS}
)
BOUNDS: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.builds(
        Bounds,
        lower=st.none() | BOUND_STRUCTS,
        upper=st.none() | BOUND_STRUCTS,
        eq=st.just(msgspec.UNSET) | KEYS,
        prefix=st.none() | st.lists(KEYS, max_size=2).map(tuple),
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "lower": BOUND_DICTS,
            "upper": BOUND_DICTS,
            "eq": KEYS,
            "prefix": st.lists(KEYS, max_size=2).map(tuple),
        },
    ),
)
QUERIES = st.one_of(
    st.builds(Query, KEYS, BOUNDS.filter(lambda b: not isinstance(b, dict)), st.integers(-5, 5)),
    st.fixed_dictionaries(
        {}, optional={"namespace": KEYS, "bounds": BOUNDS, "offset": st.integers(-5, 5)}
    ),
)
ORDERS: tuple[Order, ...] = ("asc", "desc")


def args_over_the_wire(method: str, args: Sequence[Any]) -> list[Any]:
    """``args`` as the callee's engine gets them: written as `RemoteTask` writes them, one
    call of a msgpack request body, decoded by `decode_calls`, read by `call_args`."""
    call = Call("agg", TOPIC, 3, method, encode_args(args))
    (got,) = decode_calls(encode_calls([call]))
    assert got.args == [to_json(a) for a in args]  # big ints decoded back from extensions
    assert (got.aggregate, got.topic, got.partition, got.method) == ("agg", TOPIC, 3, method)
    return call_args(got)


def same_value(want: Any, got: Any) -> bool:
    """``got`` is ``want`` of the same type, a tuple as a list (JSON and msgpack have no
    tuples); a datetime or time keeps its UTC offset, a Decimal its digits."""
    if isinstance(want, (tuple, list)):
        return (
            type(got) is list
            and len(got) == len(want)
            and all(same_value(w, g) for w, g in zip(want, got, strict=True))
        )
    if type(got) is not type(want):
        return False
    if isinstance(want, (float, Decimal)):
        return repr(got) == repr(want)
    if isinstance(want, (dt.datetime, dt.time)):
        return bool(got == want) and got.utcoffset() == want.utcoffset()
    return bool(got == want)


def key_view(k: Any) -> tuple[str, Any]:
    """A key as the engine sees it: its encoding (or the error it gets)."""
    return outcome(lambda: encode_key(k))


def bounds_view(b: Any) -> tuple[str, Any]:
    return outcome(lambda: normalize_bounds(b))


def queries_view(qs: Any) -> tuple[str, Any]:
    def view() -> list[Any]:
        return [(key_view(q.namespace), bounds_view(q.bounds), q.offset) for q in as_queries(qs)]

    return outcome(view)


@settings(max_examples=examples(200), deadline=None)
@given(
    ns=KEYS,
    key=KEYS,
    id_=KEYS,
    bounds=BOUNDS,
    queries=st.lists(QUERIES, max_size=3),
    after=st.none() | st.binary(max_size=8),
    offsets=st.lists(st.integers(-(2**40), 2**40), max_size=3),
    item_keys=st.lists(st.binary(max_size=8), max_size=3),
    order=st.sampled_from(ORDERS),
    page_size=st.integers(1, 1000),
)
def test_arguments_cross_the_wire_as_the_engine_reads_them(
    ns: Any,
    key: Any,
    id_: Any,
    bounds: Any,
    queries: list[Any],
    after: bytes | None,
    offsets: list[int],
    item_keys: list[bytes],
    order: Order,
    page_size: int,
) -> None:
    k, b, q = "key", "bounds", "queries"
    calls: dict[str, tuple[tuple[str, Any], ...]] = {
        "count": ((k, ns), (b, bounds)),
        "sum": ((k, ns), (b, bounds)),
        "index_of": ((k, key), (k, id_), ("=", order), (k, ns), (b, bounds)),
        "count_batch": ((q, queries),),
        "sum_batch": ((q, queries),),
        "select": (("=", offsets), (k, ns), (b, bounds)),
        "ranks": (("=", item_keys), (k, ns), (b, bounds)),
        "page": (("=", after), ("=", page_size), ("=", order), (k, ns), (b, bounds)),
        "sample": ((k, ns), (b, bounds)),
        "namespaces": (),
        # a reconcile's partition calls: a scan id or None and a page size; a session id
        # and a chunk of fixes (msgpack bytes)
        "ids": (("=", None), ("=", page_size)),
        "patch_begin": (),
        "patch_apply": (("=", "0123abcd"), ("=", after or b"")),
        "patch_end": (("=", "0123abcd"),),
    }
    assert set(calls) == METHODS
    for method, typed in calls.items():
        sent = [v for _, v in typed]
        got = args_over_the_wire(method, sent)
        assert len(got) == len(sent), method
        for (kind, want), have in zip(typed, got, strict=True):
            if kind == k:
                assert same_value(want, have), (method, want, have)
                assert key_view(have) == key_view(want), (method, want, have)
            elif kind == b:
                assert bounds_view(have) == bounds_view(want), (method, want, have)
            elif kind == q:
                assert queries_view(have) == queries_view(want), (method, want, have)
            else:
                assert shape(have) == shape(want), (method, want, have)


@pytest.mark.parametrize("value", [2**64, 2**70, -(2**63) - 1])
def test_big_int_arguments_cross_the_wire(value: int) -> None:
    (got,) = args_over_the_wire("count", [value])
    assert got == value


# ---- a real aggregate reads the arguments the same way --------------------------------

NOON = dt.datetime(2024, 1, 1, 12, 0)
POOL_KEYS: list[Any] = [
    None,
    0,
    1,
    1.5,
    Decimal("1.10"),  # the key 1.1
    Decimal("2.5"),  # the key 2.5
    "a",
    b"b",
    (1,),
    (1, "x"),
    (1, "x", 2),
    (1, ("n", Decimal("0.5"))),
    (2, NOON.date()),
    NOON.date(),
    NOON,
    NOON.replace(tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    NOON.replace(tzinfo=dt.UTC),
    dt.time(12, 30),
    dt.time(12, 30, tzinfo=dt.timezone(dt.timedelta(hours=-3))),
    dt.timedelta(days=-1, microseconds=5),
    dt.timedelta(seconds=90),
    uuid.UUID(int=7),
]
POOL_NAMESPACES: list[Any] = [None, (1, "a"), "n", NOON.date(), Decimal("7.5")]
POOL_PREFIXES: list[Any] = [(), (1,), (1, "x"), (2,), (1, ("n",))]


def pool_ids(i: int) -> Any:
    """Distinct ids of the kinds rows have: ints, strings, tuples, UUIDs, Decimals."""
    return [i, f"s{i}", (i, "x"), uuid.UUID(int=1000 + i), Decimal(i) / 8][i % 5]


@st.composite
def pool_bound(draw: st.DrawFn) -> Any:
    key = draw(st.sampled_from(POOL_KEYS))
    inclusive = draw(st.booleans())
    id_ = draw(st.none() | st.integers(0, 120).map(pool_ids))
    if draw(st.booleans()):
        return Bound(key, inclusive, id_)
    return {"key": key, "inclusive": inclusive, "id": id_}


@st.composite
def pool_bounds(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["none", "lower", "upper", "both", "eq", "prefix"]))
    if kind == "none":
        return None
    out: dict[str, Any] = {}
    if kind in ("lower", "both"):
        out["lower"] = draw(pool_bound())
    if kind in ("upper", "both"):
        out["upper"] = draw(pool_bound())
    if kind == "eq":
        out["eq"] = draw(st.sampled_from(POOL_KEYS))
    if kind == "prefix":
        out["prefix"] = draw(st.sampled_from(POOL_PREFIXES))
    if draw(st.booleans()):
        return Bounds(
            out.get("lower") if isinstance(out.get("lower"), Bound) else None,
            out.get("upper") if isinstance(out.get("upper"), Bound) else None,
            out.get("eq", msgspec.UNSET),
            out.get("prefix"),
        )
    return out


def fill(agg: Aggregate, rng: random.Random, n: int, ids: Iterator[int]) -> list[tuple[Any, ...]]:
    """``n`` items of pool keys, ids and namespaces in ``agg`` (int sums, Decimal sums in
    the namespace "n"); returns them as (key, id, sum, namespace)."""
    items = []
    for _ in range(n):
        ns = rng.choice(POOL_NAMESPACES)
        s: Any = Decimal(rng.randrange(-999, 999)) / 100 if ns == "n" else rng.randrange(-50, 50)
        items.append((rng.choice(POOL_KEYS), pool_ids(next(ids)), s, ns))
    with agg.store.transaction():
        for key, id_, s, ns in items:
            agg.insert(key, id_, s, ns)
    return items


@pytest.fixture(scope="module")
def pool_aggregate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Aggregate]:
    store = Store.open(tmp_path_factory.mktemp("pool"), max_node_size=4)
    agg = store.aggregate("pool")
    fill(agg, random.Random(11), 120, itertools.count())
    yield agg
    store.close()


def test_the_pool_puts_items_where_tuples_select(pool_aggregate: Aggregate) -> None:
    """The property below is not vacuous: tuple prefixes and namespaces sent as lists
    select items, the same ones as the tuples."""
    agg = pool_aggregate
    for ns in POOL_NAMESPACES:
        (wire_ns, wire_b) = args_over_the_wire("count", [ns, {"prefix": (1,)}])
        assert isinstance(wire_b["prefix"], list)
        assert agg.count(ns) > 0
        assert agg.count(wire_ns, wire_b) == agg.count(ns, {"prefix": (1,)})
    assert agg.count((1, "a"), {"prefix": (1,)}) > 0


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    ns=st.sampled_from([*POOL_NAMESPACES, "absent"]),
    bounds=pool_bounds(),
    key=st.sampled_from(POOL_KEYS),
    id_=st.none() | st.integers(0, 130).map(pool_ids),
    order=st.sampled_from(ORDERS),
    offsets=st.lists(st.integers(-30, 30), max_size=4),
    ranked=st.lists(st.integers(0, 119), max_size=4),
    after=st.none() | st.integers(0, 119),
    page_size=st.integers(1, 9),
    queries=st.lists(
        st.tuples(st.sampled_from(POOL_NAMESPACES), pool_bounds(), st.integers(-9, 9)),
        max_size=3,
    ),
)
def test_wire_arguments_select_the_same_items_of_a_real_aggregate(
    pool_aggregate: Aggregate,
    ns: Any,
    bounds: Any,
    key: Any,
    id_: Any,
    order: Order,
    offsets: list[int],
    ranked: list[int],
    after: int | None,
    page_size: int,
    queries: list[tuple[Any, Any, int]],
) -> None:
    """Each primitive of `LocalMember` (what the callee runs) answers the arguments after
    the wire exactly as it answers them as given: results and errors, word for word."""
    agg = pool_aggregate
    everything, _ = agg.page_entries(None, 1000)
    item_keys = [everything[i % len(everything)][0] for i in ranked]
    after_key = None if after is None else everything[after % len(everything)][0]
    qs = [
        Query(q_ns, q_b, off)
        if isinstance(q_b, Bounds) or q_b is None
        else {"namespace": q_ns, "bounds": q_b, "offset": off}
        for q_ns, q_b, off in queries
    ]
    calls: dict[str, list[Any]] = {
        "count": [ns, bounds],
        "sum": [ns, bounds],
        "index_of": [key, id_, order, ns, bounds],
        "count_batch": [qs],
        "sum_batch": [qs],
        "select": [offsets, ns, bounds],
        "ranks": [item_keys, ns, bounds],
        "page": [after_key, page_size, order, ns, bounds],
        "sample": [ns, bounds],
        "namespaces": [],
    }
    assert set(calls) == READ_METHODS

    async def run_all(args_of: Callable[[str, list[Any]], list[Any]]) -> dict[str, Any]:
        out = {}
        for method, args in calls.items():
            member = LocalMember(agg, random.Random(5))
            try:
                out[method] = ("ok", shape(await getattr(member, method)(*args_of(method, args))))
            except Exception as e:
                out[method] = (type(e).__name__, str(e))
        return out

    given_ = asyncio.run(run_all(lambda m, a: a))
    wired = asyncio.run(run_all(args_over_the_wire))
    assert wired == given_


# ============================================================== over HTTP: the harness


class PartitionsMember:
    """What `tally.consumers.http.internal` serves: a process with ``answer(calls)``,
    answering each call from the aggregate of its partition (one real store per partition)
    as `MemberProcess.answer` does: `call_args`, the `LocalMember` primitive,
    `encode_result`, and `error_outcome` for what it raises.

    ``fail`` makes the call on a partition raise (a moving partition, a replay...);
    ``requests`` records the number of calls of each request it answered."""

    def __init__(self, stores: Mapping[int, Store]) -> None:
        self.stores = dict(stores)
        self.url = ""
        self.fail: dict[int, Exception] = {}
        self.requests: list[int] = []

    async def answer(self, calls: list[Call]) -> list[Outcome]:
        self.requests.append(len(calls))
        out = []
        for c in calls:
            try:
                if c.partition in self.fail:
                    raise self.fail[c.partition]
                store = self.stores.get(c.partition) if c.topic == TOPIC else None
                if store is None:
                    info = {"topic": c.topic, "partition": c.partition, "state": "not_owned"}
                    raise PartitionMoving(f"{c.topic}[{c.partition}] is not here", [info])
                part = LocalMember(store.aggregate(c.aggregate), random.Random(c.partition))
                value = await getattr(part, c.method)(*call_args(c))
                out.append(Outcome(ok=encode_result(c.method, value)))
            except Exception as e:
                out.append(error_outcome(e))
        return out


class NotAMember:
    """A process without ``answer``: a consumer started without --group-id."""

    url = "http://not-a-member"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def serve(
    process: PartitionsMember | NotAMember | None = None, handler: Handler | None = None
) -> AsyncIterator[str]:
    """A real HTTP server on a free 127.0.0.1 port: the internal route of ``process`` (with
    the API's error middleware), or a raw ``handler`` on that route. Yields its URL."""
    app = web.Application(middlewares=[_errors])
    if process is not None:
        app[PROCESS] = cast(Served, process)  # the internal route only asks for ``answer``
        internal.add_routes(app.router)
    else:
        assert handler is not None
        app.router.add_post(INTERNAL_PATH, handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    if isinstance(process, PartitionsMember):
        process.url = url
    try:
        yield url
    finally:
        await runner.cleanup()


def tp(p: int) -> TopicPartition:
    return TopicPartition(TOPIC, p)


class Partitions:
    """One store per partition and one for the oracle, opened once per module; a fresh
    aggregate name per example keeps examples apart without reopening RocksDB."""

    def __init__(self, root: Path) -> None:
        self.stores = [Store.open(root / f"p{p}", max_node_size=4) for p in range(PARTITIONS)]
        self.whole = Store.open(root / "whole", max_node_size=4)
        self.names = itertools.count()

    def close(self) -> None:
        for s in [*self.stores, self.whole]:
            s.close()

    def build(self, items: Sequence[tuple[Any, Any, Any, Any, int]]) -> tuple[str, Aggregate]:
        """A new aggregate holding (key, id, sum, namespace, partition) items in their
        partitions' stores, and the oracle holding all of them."""
        name = f"a{next(self.names)}"
        for p, store in enumerate(self.stores):
            agg = store.aggregate(name)
            with store.transaction():
                for key, id_, s, ns, where in items:
                    if where == p:
                        agg.insert(key, id_, s, ns)
        whole = self.whole.aggregate(name)
        with self.whole.transaction():
            for key, id_, s, ns, _ in items:
                whole.insert(key, id_, s, ns)
        return name, whole


@pytest.fixture(scope="module")
def partitions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Partitions]:
    ps = Partitions(tmp_path_factory.mktemp("partitions"))
    yield ps
    ps.close()


def small_items(n: int, seed: int = 1) -> list[tuple[Any, Any, Any, Any, int]]:
    rng = random.Random(seed)
    return [(rng.randrange(10), i, rng.randrange(100), None, i % PARTITIONS) for i in range(n)]


def remote_parts(peers: Peers, url: str, name: str) -> MergedReads:
    """Reads over every partition, each a `RemoteTask` on the member at ``url``."""
    return MergedReads([RemoteTask(peers, url, name, tp(p)) for p in range(PARTITIONS)])


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ============================================================== over HTTP: every read op

# Sums by namespace: one kind per namespace (ints mix with either), as a table's rows give;
# (sums past 64 bits have tests of their own above).
E2E_SUMS: dict[Any, list[Any]] = {
    None: [0, 1, -3, 2**53 + 1, 0.5, 0.1, -2.25],
    (1, "a"): [0, 2, Decimal("1.10"), Decimal("-0.005"), Decimal("12.5")],
    "n": [0, 1, 5, -(2**40)],
}
E2E_RANGES = st.tuples(st.sampled_from([None, None, (1, "a"), "n", "absent"]), pool_bounds())
OWNERS = ("reader", "A", "B")
"""Who holds a partition: the reading member itself (a `LocalMember`), or member A or B."""


@st.composite
def e2e_items(draw: st.DrawFn) -> list[tuple[Any, Any, Any, Any, int]]:
    n = draw(st.integers(0, 40))
    out = []
    for i in range(n):
        ns = draw(st.sampled_from([None, None, (1, "a"), "n"]))
        out.append(
            (
                draw(st.sampled_from(POOL_KEYS)),
                pool_ids(i),
                draw(st.sampled_from(E2E_SUMS[ns])),
                ns,
                draw(st.integers(0, PARTITIONS - 1)),
            )
        )
    return out


def same_sum(got: Any, want: Any) -> bool:
    """Ints and Decimals exactly (type and digits); floats within the rounding of the
    order the parts were added in."""
    if isinstance(want, float) or isinstance(got, float):
        return type(got) is float and type(want) is float and math.isclose(got, want, abs_tol=1e-6)
    return type(got) is type(want) and repr(got) == repr(want)


async def raises_like(got: Awaitable[Any], want: Callable[[], Any]) -> None:
    """``got`` fails as the oracle's ``want()`` does: same error type, same words."""
    try:
        want()
    except Exception as e:
        theirs = e
    else:
        pytest.fail("the oracle answered; the test expected an error")
    with pytest.raises(type(theirs)) as mine:
        await got
    assert str(mine.value) == str(theirs)


class Recording:
    """`MergedReads` noting the ops read through it (so a new read op fails the test until
    the test reads it too)."""

    def __init__(self, reads: MergedReads) -> None:
        self.reads = reads
        self.ops: set[str] = set()

    def __getattr__(self, op: str) -> Any:
        self.ops.add(op)
        return getattr(self.reads, op)


@settings(
    max_examples=examples(25),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    items=e2e_items(),
    owners=st.lists(st.sampled_from(OWNERS), min_size=PARTITIONS, max_size=PARTITIONS),
    reads=st.lists(E2E_RANGES, min_size=1, max_size=2),
    tuning=st.sampled_from([(4, 32), (2, 2), (1, 1)]),
    probe=st.data(),
)
def test_merged_reads_over_http_answer_as_one_aggregate(
    partitions: Partitions,
    items: list[tuple[Any, Any, Any, Any, int]],
    owners: list[str],
    reads: list[tuple[Any, Any]],
    tuning: tuple[int, int],
    probe: st.DataObject,
) -> None:
    name, whole = partitions.build(items)
    stores = partitions.stores

    async def check() -> None:
        a = PartitionsMember({p: stores[p] for p, o in enumerate(owners) if o == "A"})
        b = PartitionsMember({p: stores[p] for p, o in enumerate(owners) if o == "B"})
        peers = Peers()
        async with serve(a) as url_a, serve(b) as url_b:
            url = {"A": url_a, "B": url_b}
            parts: list[Member] = [
                LocalMember(stores[p].aggregate(name), random.Random(p))
                if o == "reader"
                else RemoteTask(peers, url[o], name, tp(p))
                for p, o in enumerate(owners)
            ]
            m = Recording(
                MergedReads(parts, rng=random.Random(3), pivots=tuning[0], final_window=tuning[1])
            )
            try:
                await read_everything(m, whole, reads, probe)
            finally:
                await peers.close()
            assert m.ops == set(READ_OPS)

    asyncio.run(check())


async def read_everything(
    m: Any, whole: Aggregate, reads: list[tuple[Any, Any]], probe: st.DataObject
) -> None:
    """Every read op of ``m`` (`MergedReads`) against the oracle ``whole``."""
    for ns, b in reads:
        assert await m.count(ns, b) == whole.count(ns, b)
        got, want = await m.sum(ns, b), whole.sum(ns, b)
        assert same_sum(got, want), (got, want)
        assert repr(await m.min(ns, b)) == repr(whole.min(ns, b))
        assert repr(await m.max(ns, b)) == repr(whole.max(ns, b))
        in_range = {repr(it) for it in whole.iter(ns, b)}
        r = await m.random(ns, b)
        assert (r is None) == (not in_range) and (r is None or repr(r) in in_range)
        for _ in range(3):
            key = probe.draw(st.sampled_from(POOL_KEYS))
            id_ = probe.draw(st.none() | st.integers(0, 45).map(pool_ids))
            order: Order = probe.draw(st.sampled_from(ORDERS))
            assert await m.index_of(key, id_, order, ns, b) == whole.index_of(
                key, id_, order, ns, b
            )
        n = whole.count(ns, b)
        for offset in probe.draw(st.lists(st.integers(-n, n - 1), max_size=3)) if n else []:
            assert repr(await m.at(offset, ns, b)) == repr(whole.at(offset, ns, b)), offset
        await raises_like(m.at(n, ns, b), functools.partial(whole.at, n, ns, b))
        page_size = probe.draw(st.integers(1, 9))
        order = probe.draw(st.sampled_from(ORDERS))
        cursor = None
        for _ in range(100):
            page = await m.paginate(cursor, page_size, order, ns, b)
            assert repr(page) == repr(whole.paginate(cursor, page_size, order, ns, b))
            if page.is_done:
                break
            cursor = page.cursor
        else:
            pytest.fail("paginate never finished")
    queries: list[Any] = [
        {"namespace": ns, "bounds": b, "offset": probe.draw(st.integers(-3, 3))} for ns, b in reads
    ]
    assert await m.count_batch(queries) == whole.count_batch(queries)
    for got, want in zip(await m.sum_batch(queries), whole.sum_batch(queries), strict=True):
        assert same_sum(got, want), (got, want)
    ok = [q for q in queries if -whole.count(q["namespace"], q["bounds"]) <= q["offset"]]
    ok = [q for q in ok if q["offset"] < whole.count(q["namespace"], q["bounds"])]
    assert repr(await m.at_batch(ok)) == repr(whole.at_batch(ok))
    assert repr(await m.namespaces()) == repr(whole.namespaces())


# ============================================================== over HTTP: one request a round


def test_a_round_over_the_partitions_of_one_member_is_one_request(
    partitions: Partitions,
) -> None:
    name, whole = partitions.build(small_items(60))

    async def check() -> None:
        one = PartitionsMember(dict(enumerate(partitions.stores)))
        peers = Peers()
        async with serve(one) as url:
            m = MergedReads([RemoteTask(peers, url, name, tp(p)) for p in range(PARTITIONS)])
            assert await m.count() == whole.count() == 60
            assert (peers.requests, one.requests) == (1, [6])
            assert await m.sum(None, {"lower": {"key": 3}}) == whole.sum(
                None, {"lower": {"key": 3}}
            )
            assert repr(await m.namespaces()) == repr(whole.namespaces())
            qs = [{"bounds": {"eq": k}} for k in range(5)]
            assert await m.count_batch(qs) == whole.count_batch(qs)
            page = await m.paginate(page_size=7)
            assert repr(page) == repr(whole.paginate(page_size=7))
            # Each a single round: one request each, every partition's call in it.
            assert (peers.requests, one.requests) == (5, [6] * 5)
            await peers.close()

        # Two members, three partitions each: a round is one request to each.
        a = PartitionsMember({p: partitions.stores[p] for p in range(3)})
        b = PartitionsMember({p: partitions.stores[p] for p in range(3, PARTITIONS)})
        peers = Peers()
        async with serve(a) as url_a, serve(b) as url_b:
            m = MergedReads(
                [RemoteTask(peers, url_a if p < 3 else url_b, name, tp(p)) for p in range(6)]
            )
            assert await m.count() == 60
            assert (peers.requests, a.requests, b.requests) == (2, [3], [3])
            await peers.close()

    asyncio.run(check())


def big_int_read(
    partitions: Partitions, read: Callable[[Any], Awaitable[Any]], want: Callable[[Aggregate], Any]
) -> None:
    """``read(reads)`` over one remote member holding every partition equals ``want(oracle)``
    for items with an int key of 2**70 and sums of 2**62 (4 on partition 0)."""
    items = [(2**70, i, 2**62, None, 0) for i in range(4)] + [(1, 9, 5, None, 1)]
    name, whole = partitions.build(items)

    async def check() -> None:
        member = PartitionsMember(dict(enumerate(partitions.stores)))
        peers = Peers()
        async with serve(member) as url:
            try:
                got = await read(remote_parts(peers, url, name))
            finally:
                await peers.close()
        assert shape(got) == shape(want(whole))

    asyncio.run(check())


def test_a_big_int_key_reads_over_http(partitions: Partitions) -> None:
    big_int_read(
        partitions, lambda m: m.count(None, {"eq": 2**70}), lambda w: w.count(None, {"eq": 2**70})
    )


def test_a_partition_sum_beyond_64_bits_reads_over_http(partitions: Partitions) -> None:
    big_int_read(partitions, lambda m: m.sum(), lambda w: w.sum())


# ============================================================== over HTTP: errors


def with_member(
    partitions: Partitions,
    check: Callable[[PartitionsMember, Peers, str, str, Aggregate], Awaitable[None]],
) -> None:
    """Run ``check(member, peers, url, aggregate name, oracle)`` against one member
    serving every partition of 30 items."""
    name, whole = partitions.build(small_items(30, seed=2))

    async def run() -> None:
        member = PartitionsMember(dict(enumerate(partitions.stores)))
        peers = Peers()
        async with serve(member) as url:
            try:
                await check(member, peers, url, name, whole)
            finally:
                await peers.close()

    asyncio.run(run())


def test_a_moving_partition_raises_partition_moving_with_its_progress(
    partitions: Partitions,
) -> None:
    info = {
        "topic": TOPIC,
        "partition": 3,
        "member": "http://elsewhere",
        "state": "replaying",
        "offset": 120,
        "end_offset": 4000,
        "lag": 3880,
        "progress": {"percent": 3.0, "events": 120},
    }

    async def check(
        member: PartitionsMember, peers: Peers, url: str, name: str, whole: Aggregate
    ) -> None:
        member.fail[3] = PartitionMoving("scores[3] replaying 3.0%: retry shortly", [info])
        with pytest.raises(PartitionMoving) as e:
            await remote_parts(peers, url, name).count()
        assert e.value.moving == [info]
        assert str(e.value) == "scores[3] replaying 3.0%: retry shortly"

    with_member(partitions, check)


def test_an_aggregate_not_ready_raises_aggregate_not_ready_with_its_progress(
    partitions: Partitions,
) -> None:
    progress = {"state": "replaying", "percent": 41.5, "events": 415}

    async def check(
        member: PartitionsMember, peers: Peers, url: str, name: str, whole: Aggregate
    ) -> None:
        member.fail[0] = AggregateNotReady(f"aggregate {name!r} is being built", progress)
        with pytest.raises(AggregateNotReady) as e:
            await remote_parts(peers, url, name).paginate()
        assert str(e.value) == f"aggregate {name!r} is being built"
        assert e.value.progress == progress

    with_member(partitions, check)


def test_the_engines_errors_come_back_as_themselves_word_for_word(
    partitions: Partitions,
) -> None:
    async def check(
        member: PartitionsMember, peers: Peers, url: str, name: str, whole: Aggregate
    ) -> None:
        m = remote_parts(peers, url, name)
        # raised by every partition's engine, not by the merge
        await raises_like(m.count(None, {"bogus": 1}), lambda: whole.count(None, {"bogus": 1}))
        await raises_like(m.sum(math.nan), lambda: whole.sum(math.nan))
        await raises_like(
            m.index_of(1, None, "asc", None, {"lower": {"key": 1, "inclusive": "yes"}}),
            lambda: whole.index_of(1, None, "asc", None, {"lower": {"key": 1, "inclusive": "yes"}}),
        )
        with pytest.raises(InvalidArgument, match="unknown field"):
            await m.count(None, {"bogus": 1})
        with pytest.raises(InvalidKey, match="NaN"):
            await m.sum(math.nan)
        # a member asked for an offset its partition does not hold
        own = partitions.stores[0].aggregate(name)
        n = own.count()
        remote = RemoteTask(peers, url, name, tp(0))
        with pytest.raises(OffsetOutOfRange) as e:
            await remote.select([n], None, None)
        with pytest.raises(OffsetOutOfRange) as local:
            await LocalMember(own).select([n], None, None)
        assert str(e.value) == str(local.value)

    with_member(partitions, check)


def test_an_unexpected_error_of_a_member_is_a_bad_member_answer_naming_it(
    partitions: Partitions,
) -> None:
    async def check(
        member: PartitionsMember, peers: Peers, url: str, name: str, whole: Aggregate
    ) -> None:
        member.fail[4] = RuntimeError("disk on fire")
        with pytest.raises(BadMemberAnswer) as e:
            await remote_parts(peers, url, name).count()
        assert (
            str(e.value) == f"member {url} failed count on {TOPIC}[4]: RuntimeError: disk on fire"
        )

    with_member(partitions, check)


def test_a_member_that_is_down_is_member_unreachable_naming_its_url() -> None:
    url = f"http://127.0.0.1:{closed_port()}"

    async def check() -> None:
        peers = Peers()
        m = remote_parts(peers, url, "a")
        with pytest.raises(MemberUnreachable) as e:
            await m.count()
        assert e.value.url == url
        assert url in str(e.value) and "retry shortly" in str(e.value)
        assert peers.requests == 1  # the round's six calls were one request
        await peers.close()

    asyncio.run(check())


def test_a_stalled_member_is_member_unreachable_after_the_timeout() -> None:
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(status=204)

    async def check() -> None:
        async with serve(handler=stall) as url:
            peers = Peers(timeout=0.3)
            try:
                with pytest.raises(MemberUnreachable) as e:
                    await remote_parts(peers, url, "a").count()
                assert e.value.url == url
            finally:
                release.set()
                await peers.close()

    asyncio.run(check())


def test_a_consumer_that_is_not_a_member_is_named_as_such() -> None:
    async def check() -> None:
        async with serve(NotAMember()) as url:
            peers = Peers()
            with pytest.raises(BadMemberAnswer) as e:
                await remote_parts(peers, url, "a").count()
            assert url in str(e.value) and "not a member of this deployment" in str(e.value)
            await peers.close()

    asyncio.run(check())


def raw_answer(body: Callable[[list[Call]], bytes]) -> Handler:
    """A handler answering the decoded calls with ``body(calls)``, status 200."""

    async def handle(request: web.Request) -> web.StreamResponse:
        calls = decode_calls(await request.read())
        return web.Response(body=body(calls), content_type="application/msgpack")

    return handle


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (lambda calls: b"\xc1", "sent an unreadable answer"),
        (lambda calls: b"", "sent an unreadable answer"),
        (lambda calls: msgspec.msgpack.encode({"results": 5}), "sent an unreadable answer"),
        (lambda calls: encode_outcomes("m", [Outcome(ok=1)]), "answered 1 of 6 calls"),
        (lambda calls: encode_outcomes("m", [Outcome(ok=1)] * 7), "answered 7 of 6 calls"),
        (lambda calls: encode_outcomes("m", [Outcome(ok="1")] * 6), "a member sent '1' as a count"),
        (lambda calls: encode_outcomes("m", [Outcome(error="??")] * 6), "failed count"),
    ],
    ids=["garbage", "empty", "not-outcomes", "too-few", "too-many", "str-count", "no-code"],
)
def test_a_member_answering_garbage_is_a_bad_member_answer(
    body: Callable[[list[Call]], bytes], words: str
) -> None:
    async def check() -> None:
        async with serve(handler=raw_answer(body)) as url:
            peers = Peers()
            with pytest.raises(BadMemberAnswer) as e:
                await remote_parts(peers, url, "a").count()
            assert words in str(e.value)
            await peers.close()

    asyncio.run(check())


def test_a_garbage_result_fails_the_read_instead_of_hanging_it() -> None:
    async def check() -> None:
        async with serve(
            handler=raw_answer(lambda calls: encode_outcomes("m", [Outcome(ok=5)] * len(calls)))
        ) as url:
            peers = Peers()
            try:
                with pytest.raises(BadMemberAnswer):
                    # the answer is back in milliseconds; the 3 s only bound the hang
                    await asyncio.wait_for(remote_parts(peers, url, "a").paginate(), 3)
            finally:
                await peers.close()

    asyncio.run(check())


# ============================================================== the callee: bad requests


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",
        b"not msgpack at all",
        msgspec.msgpack.encode({"calls": 5}),
        msgspec.msgpack.encode({"calls": [["a", TOPIC, 0, "count"]]}),  # no args
        msgspec.msgpack.encode({"calls": [["a", TOPIC, "zero", "count", []]]}),
        msgspec.msgpack.encode([1, 2, 3]),
    ],
)
def test_a_body_that_is_no_call_is_an_invalid_argument(body: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"^not a tally member call \(.+\)$"):
        decode_calls(body)


def test_an_unknown_method_is_an_invalid_argument_naming_the_known_ones() -> None:
    body = msgspec.msgpack.encode(
        Calls([Call("a", TOPIC, 0, "count", []), Call("a", TOPIC, 1, "drop_all", [])])
    )
    with pytest.raises(InvalidArgument) as e:
        decode_calls(body)
    assert str(e.value) == f"unknown member call 'drop_all'; known: {sorted(METHODS)}"


def test_a_member_answers_a_bad_request_with_a_400_saying_what_is_wrong() -> None:
    async def check() -> None:
        async with serve(PartitionsMember({})) as url, aiohttp.ClientSession() as http:
            for body, words in [
                (b"\xc1", "not a tally member call"),
                (
                    msgspec.msgpack.encode(Calls([Call("a", TOPIC, 0, "drop_all", [])])),
                    "unknown member call 'drop_all'",
                ),
            ]:
                async with http.post(url + INTERNAL_PATH, data=body) as resp:
                    assert resp.status == 400
                    err = (await resp.json())["error"]
                assert err["code"] == "invalid_argument"
                assert words in err["message"]

    asyncio.run(check())
