"""Typed values over the HTTP API, the client and the CLI (schemas/values.py).

The app runs on a real aiohttp test server over a real store holding Decimal and datetime
keys and Decimal sums; requests are raw JSON (what curl sends) or go through
`TallyClient` (in a worker thread: it is synchronous). Answers must carry a Decimal's
exact digits as a JSON number and datetimes as UTC ISO strings; typed request objects
must bound keys exactly, while a plain JSON number keeps meaning a float.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import types
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from tally.consumers.cli.query import answer_json, parse_value
from tally.consumers.client import TallyClient
from tally.consumers.http.app import create_app
from tally.consumers.runtime.process import ConsumerStats
from tally.engine import Bound, Bounds, Store, TableAggregate
from tally.schemas.config import ConsumerSettings
from tally.schemas.errors import UsageError
from tally.schemas.values import REQUEST_DECODER, TypedValueError, from_json, to_json

UTC = dt.UTC
DEFS = [
    TableAggregate("amounts", table="t", sort_key="amount", sum_value="amount"),
    TableAggregate("events", table="t", sort_key="at", sum_value="n"),
]
AMOUNTS = {
    1: (Decimal("12.10"), Decimal("12.10")),
    2: (12.1, Decimal("1")),  # the float 12.1 (12.0999999999999996...) < the Decimal 12.1
    3: (Decimal("0.30"), Decimal("0.30")),
    4: (Decimal("99999999999.99"), Decimal("99999999999.99")),
    5: (12.5, Decimal("0.01")),
}
MIDNIGHT = dt.datetime(2024, 1, 1, tzinfo=UTC)
EVENTS = {
    1: MIDNIGHT - dt.timedelta(hours=1),
    2: MIDNIGHT.astimezone(dt.timezone(dt.timedelta(hours=5))),  # the same instant as midnight
    3: MIDNIGHT + dt.timedelta(minutes=30),
    4: dt.datetime(2024, 1, 1),  # naive: UTC wall time, just before the aware midnight
    5: MIDNIGHT,
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    amounts, events = s.aggregate("amounts"), s.aggregate("events")
    with s.batch():
        for i, (key, value) in AMOUNTS.items():
            amounts.insert(key, i, value)
        for i, at in EVENTS.items():
            events.insert(at, i, 1)
    yield s
    s.close()


def serve(store: Store, fn: Callable[[TestClient[Any, Any], str], Any]) -> None:
    proc = types.SimpleNamespace(
        store=store,
        definitions=list(DEFS),
        stats=ConsumerStats(),
        settings=ConsumerSettings(),
        topics=["t"],
        table_topics={"t": "t"},
        assigned=[],
    )

    async def main() -> None:
        async with TestClient(TestServer(create_app(proc, None))) as c:
            await fn(c, str(c.make_url("")).rstrip("/"))

    asyncio.run(main())


async def post(c: TestClient[Any, Any], path: str, body: bytes) -> tuple[int, bytes]:
    r = await c.post(path, data=body, headers={"Content-Type": "application/json"})
    return r.status, await r.read()


def test_answers_carry_exact_decimal_digits_and_utc_datetimes(store: Store) -> None:
    async def check(c: TestClient[Any, Any], _url: str) -> None:
        status, raw = await post(c, "/v1/aggregates/amounts/sum", b"{}")
        assert status == 200 and raw == b'{"result":100000000013.40}'
        _, raw = await post(c, "/v1/aggregates/amounts/min", b"{}")
        assert raw == b'{"result":{"key":0.3,"id":3,"sum_value":0.30,"namespace":null}}'
        _, raw = await post(c, "/v1/aggregates/events/max", b"{}")
        assert b'"key":"2024-01-01T00:30:00Z"' in raw
        _, raw = await post(c, "/v1/aggregates/events/at", b'{"offset": 1}')
        assert b'"key":"2024-01-01T00:00:00"' in raw  # the naive one: no offset

    serve(store, check)


def test_typed_bounds_are_exact_and_plain_numbers_stay_floats(store: Store) -> None:
    cases = [
        (b'{"bounds": {"eq": {"$decimal": "12.10"}}}', b"1"),
        (b'{"bounds": {"eq": {"$decimal": 12.1}}}', b"1"),
        (b'{"bounds": {"eq": 12.1}}', b"1"),  # the float item
        (b'{"bounds": {"lower": {"key": {"$decimal": "12.1"}, "inclusive": false}}}', b"2"),
        (b'{"bounds": {"upper": {"key": 12.1, "inclusive": false}}}', b"1"),  # 0.30 only
        (b'{"bounds": {"upper": {"key": {"$decimal": "12.1"}}}}', b"3"),  # and both 12.1s
    ]

    async def check(c: TestClient[Any, Any], _: str) -> None:
        for body, expect in cases:
            status, raw = await post(c, "/v1/aggregates/amounts/count", body)
            assert (status, raw) == (200, b'{"result":' + expect + b"}"), body
        midnight = b'{"$datetime": "2024-01-01T01:00:00+01:00"}'
        status, raw = await post(
            c, "/v1/aggregates/events/count", b'{"bounds": {"eq": ' + midnight + b"}}"
        )
        assert raw == b'{"result":2}'  # midnight UTC and 05:00+05:00
        status, raw = await post(
            c, "/v1/aggregates/events/index_of", b'{"key": {"$datetime": "2024-01-01T00:00:00"}}'
        )
        assert raw == b'{"result":1}'  # after 23:00 the day before, before the aware midnight
        r = await c.get(
            "/v1/aggregates/amounts/count", params={"bounds": '{"eq": {"$decimal": "0.3"}}'}
        )
        assert await r.read() == b'{"result":1}'

    serve(store, check)


@pytest.mark.parametrize(
    "value",
    [b'{"$date": "2024-13-01"}', b'{"$decimal": "twelve"}', b'{"$uuid": 5}', b'{"$time": 1}'],
)
def test_a_malformed_typed_value_is_a_400_with_an_example(store: Store, value: bytes) -> None:
    async def check(c: TestClient[Any, Any], _: str) -> None:
        body = b'{"bounds": {"eq": ' + value + b"}}"
        status, raw = await post(c, "/v1/aggregates/amounts/count", body)
        err = msgspec.json.decode(raw)["error"]
        assert status == 400 and err["code"] == "invalid_argument"
        assert "write e.g." in err["message"]

    serve(store, check)


def test_client_sends_typed_values_and_reads_decimals_when_asked(store: Store) -> None:
    def calls(url: str) -> None:
        plain, exact = TallyClient(url), TallyClient(url, decimals=True)
        assert plain.count("amounts", bounds={"eq": Decimal("12.10")}) == 1
        assert plain.count("amounts", bounds=Bounds(lower=Bound(Decimal("12.1"), False))) == 2
        assert plain.count("events", bounds={"eq": MIDNIGHT}) == 2
        assert plain.count("events", bounds={"lower": {"key": dt.datetime(2024, 1, 1)}}) == 4
        total = exact.sum("amounts")
        assert type(total) is Decimal and str(total) == "100000000013.40"
        assert type(plain.sum("amounts")) is float
        item = exact.min("amounts")
        assert item is not None and str(item.sum_value) == "0.30"
        top = plain.max("events")
        assert top is not None and top.key == "2024-01-01T00:30:00Z"  # JSON has no datetime

    async def check(c: TestClient[Any, Any], url: str) -> None:
        await asyncio.to_thread(calls, url)

    serve(store, check)


# ---------------------------------------------------------------------------
# tally.schemas.values and the CLI's value rule


def test_to_json_and_from_json_round_trip_typed_values() -> None:
    values = [
        Decimal("12.10"),
        dt.datetime(2024, 1, 1, 5, tzinfo=dt.timezone(dt.timedelta(hours=5))),
        dt.datetime(2024, 1, 1, 0, 0, 0, 7),
        dt.date(2024, 2, 29),
        dt.time(12, 30, 1, 5),
        dt.timedelta(days=-1, microseconds=3),
        uuid.UUID(int=7),
        (1, Decimal("0.1")),
    ]
    sent = msgspec.json.encode(to_json({"key": values, "bounds": Bounds(eq=Decimal("1.5"))}))
    back = from_json(REQUEST_DECODER.decode(sent))
    assert back["key"][:-1] == values[:-1]
    assert [type(v) for v in back["key"][:-1]] == [type(v) for v in values[:-1]]
    assert str(back["key"][0]) == "12.10" and back["key"][-1] == [1, Decimal("0.1")]
    assert back["bounds"] == {"lower": None, "upper": None, "eq": Decimal("1.5"), "prefix": None}
    assert from_json(REQUEST_DECODER.decode(b"[1.5, 12.1, 3, 1e3]")) == [1.5, 12.1, 3, 1000.0]
    assert type(from_json(REQUEST_DECODER.decode(b"12.1"))) is float
    two_keys = {"$decimal": "1", "x": 2}  # not a typed value: an ordinary object
    assert from_json(two_keys) == two_keys
    with pytest.raises(TypedValueError, match=r"write e\.g\."):
        from_json({"$datetime": "yesterday"})


def test_cli_reads_typed_values_and_writes_exact_decimals() -> None:
    assert parse_value('{"$decimal": "12.10"}') == Decimal("12.10")
    assert str(parse_value('{"$decimal": 12.10}')) == "12.10"
    assert parse_value("12.1") == 12.1 and type(parse_value("12.1")) is float
    assert parse_value('[1, {"$date": "2024-01-01"}]') == (1, dt.date(2024, 1, 1))
    with pytest.raises(UsageError, match=r"write e\.g\."):
        parse_value('{"$uuid": "nope"}')
    assert answer_json({"sum": Decimal("0.30"), "at": MIDNIGHT}) == (
        '{"sum":0.30,"at":"2024-01-01T00:00:00Z"}'
    )


def test_live_patch_chunks_carry_decimal_sums_exactly() -> None:
    """`tally reconcile --patch --url` sends items as msgpack chunks: a Decimal sum arrives as
    the same Decimal (digits and exponent), not as a string the engine would refuse."""
    from tally.engine import encode_key
    from tally.engine.aggregate import prepare_encoded_id
    from tally.engine.reconcile import decode_fixes, encode_fixes

    eid = encode_key(7)
    item = prepare_encoded_id(Decimal("12.10"), eid, Decimal("99999999999.90"), MIDNIGHT)
    ((back_id, back),) = decode_fixes(encode_fixes([(eid, item)]))
    assert back_id == eid and back == item and str(back.sum_value) == "99999999999.90"
