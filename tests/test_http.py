"""The consumer's HTTP API end to end: a real `ConsumerProcess` on the real broker.

The module fixture runs a `ConsumerProcess` (HTTP on a free port) in its own
event loop thread, creates and fills a topic, and waits until the process is
caught up. Every op goes through `TallyClient` and is compared with the
engine's answer on the same store, computed on the consumer's loop thread
(so both see the same committed state). Smaller tests use `create_app` with
a stand-in process (token rule, readiness rule, not-ready and 500 mapping),
and one test runs `tally consume --http` as a subprocess.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import consumer_util
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.structs import TopicPartition
from consumer_util import free_port
from kafka_util import create_topic, produce, unique_topic
from prometheus_client.parser import text_string_to_metric_families

from tally.consumers.client import ClientError, TallyClient
from tally.consumers.http.app import create_app, start_http
from tally.consumers.http.common import MAX_BODY
from tally.consumers.http.maintenance import ProtectedRoute
from tally.consumers.http.reads import MAX_PAGE_SIZE
from tally.consumers.runtime.process import ConsumerProcess
from tally.consumers.runtime.stats import LATENCY_BUCKETS, ConsumerStats
from tally.engine import (
    AggregateNotReady,
    Bound,
    Bounds,
    InvalidArgument,
    InvalidKey,
    Item,
    OffsetOutOfRange,
    Order,
    Page,
    Query,
    Store,
    TableAggregate,
    TallyError,
)
from tally.engine.triggers import DRIFT_KINDS
from tally.schemas import ConfigError, NativeEvent, NativeOp, encode_native
from tally.schemas.config import ConsumerSettings
from tally.schemas.reads import READ_OPS
from tally.schemas.status import (
    AggregateStatus,
    DeadLetterStatus,
    Error,
    ErrorDetail,
    Health,
    PartitionStatus,
    Ready,
    Status,
)

TABLE = "scores"
GAMES = ("chess", "go", "shogi")
N_ROWS = 600

BY_GAME = TableAggregate(
    "by_game", table=TABLE, namespace="game", sort_key="score", sum_value="score"
)
PAIRS = TableAggregate(
    "pairs",
    table=TABLE,
    sort_key=("game", "player"),
    sum_value="score",
    filter=lambda row: row["score"] >= 100,
)
RATINGS = TableAggregate(
    "ratings", table=TABLE, namespace=("game", "tier"), sort_key="rating", sum_value="rating"
)
DEFINITIONS = [BY_GAME, PAIRS, RATINGS]


def row(i: int, bump: int = 0) -> dict[str, Any]:
    return {
        "id": i,
        "game": GAMES[(i + bump) % 3],
        "player": f"p{i % 40}",
        "score": (i * 37) % 500 + bump * 1000,
        "rating": round((i * 7919 % 10007) / 7.0, 3),
        "tier": i % 2,
    }


def event(op: NativeOp, i: int, after: dict[str, Any] | None = None) -> tuple[bytes, bytes]:
    return str(i).encode(), encode_native(NativeEvent(table=TABLE, op=op, id=i, after=after))


def records() -> list[tuple[bytes | None, bytes | None]]:
    recs: list[tuple[bytes | None, bytes | None]] = [
        event("insert", i, row(i)) for i in range(N_ROWS)
    ]
    recs += [
        event("update", i, row(i, bump=1)) for i in range(0, N_ROWS, 6)
    ]  # score +1000, game moves
    recs += [event("delete", i) for i in range(3, N_ROWS, 10)]
    recs += [
        (b"bad-1", b"this is not an event"),
        (b"bad-2", encode_native(NativeEvent(table="ghosts", op="insert", id=1, after={"id": 1}))),
    ]
    return recs


def final_rows() -> dict[int, dict[str, Any]]:
    """What the table holds after `records()` (an oracle independent of the engine)."""
    rows = {i: row(i) for i in range(N_ROWS)}
    rows.update({i: row(i, bump=1) for i in range(0, N_ROWS, 6)})
    for i in range(3, N_ROWS, 10):
        del rows[i]
    return rows


def caught_up(status: dict[str, Any]) -> bool:
    return bool(
        status["caught_up"]
        and status["partitions"]
        and status["lag"] == 0
        and all(a["state"] == "ready" for a in status["aggregates"])
    )


class Served:
    """The running consumer: its process, loop, URL and client."""

    def __init__(self, proc: ConsumerProcess, loop: asyncio.AbstractEventLoop, url: str) -> None:
        self.proc = proc
        self.loop = loop
        self.url = url
        self.client = TallyClient(url, timeout=10)
        self.early_readyz: dict[str, Any] = {}
        self.early_status: dict[str, Any] = {}
        self.produced = 0

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the consumer's loop thread (same store state the API reads)."""

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(30)


def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    return consumer_util.wait_for(cond, what, timeout, swallow=(ClientError,))


@pytest.fixture(scope="module")
def served(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    topic = unique_topic("http")
    port = free_port()
    settings = ConsumerSettings(
        bootstrap_servers=kafka_bootstrap,
        data_dir=str(tmp_path_factory.mktemp("http-store")),
        topics={TABLE: topic},
        http=f"127.0.0.1:{port}",
        ready_max_lag=0,
        group_id=unique_topic("http-group"),
        poll_timeout_ms=50,
        progress_interval=3600.0,
        batch_size=200,
    )
    store = Store.open(settings.data_dir)
    proc = ConsumerProcess(settings, DEFINITIONS, store)
    loop_box: list[asyncio.AbstractEventLoop] = []
    failure: list[BaseException] = []

    def run() -> None:
        async def main() -> None:
            loop_box.append(asyncio.get_running_loop())
            await proc.run(install_signals=False)

        try:
            asyncio.run(main())
        except BaseException as e:  # surfaced by the fixture
            failure.append(e)

    thread = threading.Thread(target=run, name="consumer", daemon=True)
    thread.start()
    try:
        wait_for(lambda: loop_box or failure, 10, "the consumer loop")
        s = Served(
            proc, loop_box[0] if loop_box else asyncio.new_event_loop(), f"http://127.0.0.1:{port}"
        )
        wait_for(lambda: failure or s.client.healthz(), 10, "/healthz")
        assert not failure, failure
        # The topic does not exist yet: the process serves but waits for it.
        s.early_readyz = s.client.readyz()
        s.early_status = s.client.status()

        create_topic(kafka_bootstrap, topic, partitions=3)
        create_topic(kafka_bootstrap, f"{topic}.dlq", partitions=1)
        recs = records()
        produce(kafka_bootstrap, topic, recs)
        s.produced = len(recs)
        wait_for(lambda: s.client.readyz()["status"] == "ready", 60, "/readyz 200")
        wait_for(lambda: caught_up(s.client.status()), 60, "caught up, every aggregate ready")
        yield s
    finally:
        if loop_box:
            loop_box[0].call_soon_threadsafe(proc.request_stop)
        thread.join(30)
        store.close()
    assert not thread.is_alive(), "the consumer did not stop"
    assert not failure, failure


# ---------------------------------------------------------------- ops vs the engine

_CODES: dict[type[TallyError], str] = {
    OffsetOutOfRange: "offset_out_of_range",
    InvalidKey: "invalid_key",
    InvalidArgument: "invalid_argument",
}


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _norm(v: Any) -> Any:
    """The engine echoes a namespace as passed; over JSON, arrays come back as tuples."""
    if isinstance(v, Item):
        return Item(v.key, v.id, v.sum_value, _tuples(v.namespace))
    if isinstance(v, Page):
        return Page([_norm(x) for x in v.items], v.cursor, v.is_done)
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return v


def _engine(s: Served, agg: str, op: str, **kw: Any) -> tuple[str, Any]:
    def call() -> tuple[str, Any]:
        a = s.proc.store.aggregate(agg)
        try:
            return "ok", _norm(getattr(a, op)(**kw))
        except TallyError as e:
            return "err", (_CODES.get(type(e), type(e).__name__), str(e))

    result: tuple[str, Any] = s.on_loop(call)
    return result


def _client(s: Served, agg: str, op: str, **kw: Any) -> tuple[str, Any]:
    try:
        return "ok", getattr(s.client, op)(agg, **kw)
    except ClientError as e:
        return "err", (e.code, str(e))


def check_same(s: Served, agg: str, op: str, **kw: Any) -> Any:
    want = _engine(s, agg, op, **kw)
    got = _client(s, agg, op, **kw)
    if want[0] == "ok":
        assert got == want, (agg, op, kw)
    else:
        assert got[0] == "err", (agg, op, kw, got)
        assert got[1][0] == want[1][0], (agg, op, kw, got)
        assert got[1][1].startswith(want[1][1]), (got, want)
    return want[1]


BY_GAME_BOUNDS: list[Any] = [
    None,
    {"lower": {"key": 300}},
    {"upper": {"key": 250, "inclusive": False}},
    {"lower": {"key": 100, "inclusive": False, "id": 120}, "upper": {"key": 1200, "id": 50}},
    {"eq": 185},
    {"lower": {"key": 900}, "upper": {"key": 100}},  # empty
    Bounds(lower=Bound(1000), upper=Bound(1400, inclusive=False)),
]
PAIRS_BOUNDS: list[Any] = [
    None,
    {"prefix": ["chess"]},
    {"prefix": ("go", "p3")},
    {"lower": {"key": ["chess", "p5"]}, "upper": {"key": ["go", "p1"], "inclusive": False}},
    Bounds(prefix=("shogi",)),
    {"eq": ["go", "p11"]},
]


def _range_cases(
    agg: str, namespaces: list[Any], bounds_list: list[Any], probe_key: Any, probe_id: Any
) -> list[tuple[str, str, dict[str, Any]]]:
    out: list[tuple[str, str, dict[str, Any]]] = []
    for ns in namespaces:
        for b in bounds_list:
            r = {"namespace": ns, "bounds": b}
            out += [(agg, "count", r), (agg, "sum", r), (agg, "min", r), (agg, "max", r)]
            out += [(agg, "at", {"offset": off, **r}) for off in (0, 3, -1, -4, 10**6)]
            out += [
                (agg, "index_of", {"key": probe_key, **r}),
                (agg, "index_of", {"key": probe_key, "order": "desc", **r}),
                (agg, "index_of", {"key": probe_key, "id": probe_id, **r}),
                (agg, "index_of", {"key": probe_key, "id": probe_id, "order": "desc", **r}),
                (agg, "paginate", {"page_size": 7, **r}),
                (agg, "paginate", {"page_size": 5, "order": "desc", **r}),
            ]
    return out


def test_every_op_matches_the_engine(served: Served) -> None:
    cases = _range_cases("by_game", ["chess", "go", "shogi", "nope", None], BY_GAME_BOUNDS, 185, 5)
    cases += _range_cases("pairs", [None, "nope"], PAIRS_BOUNDS, ("go", "p3"), 123)
    cases += _range_cases(
        "ratings",
        [("chess", 0), ["go", 1], ("shogi", 1)],
        [None, {"lower": {"key": 500.5}}],
        700.0,
        3,
    )
    for agg, op, kw in cases:
        check_same(served, agg, op, **kw)
    # Batches: mixed dicts and Query structs, answered in order.
    queries: list[Any] = [
        {"namespace": g, "bounds": b, "offset": off}
        for g in GAMES
        for b in ({"lower": {"key": 200}}, None)
        for off in (0, -1)
    ]
    queries.append(Query(namespace="go", bounds=Bounds(eq=185)))
    for op in ("count_batch", "sum_batch"):
        check_same(served, "by_game", op, queries=queries)
    check_same(served, "by_game", "at_batch", queries=queries[:-1])
    # Any iterable of queries, as the engine takes them (a generator too).
    assert (
        served.client.count_batch("by_game", (q for q in queries))
        == _engine(served, "by_game", "count_batch", queries=queries)[1]
    )
    check_same(
        served, "by_game", "at_batch", queries=[*queries[:-1], {"namespace": "go", "offset": 10**6}]
    )
    for agg in ("by_game", "pairs", "ratings"):
        check_same(served, agg, "namespaces")
    # Anchors independent of the engine: the oracle of the table's final rows.
    rows = final_rows().values()
    assert served.client.namespaces("ratings") == sorted({(r["game"], r["tier"]) for r in rows})
    for g in GAMES:
        mine = [r for r in rows if r["game"] == g]
        assert served.client.count("by_game", g) == len(mine)
        assert served.client.sum("by_game", g) == sum(r["score"] for r in mine)


def test_paginate_walk_matches_the_engine(served: Served) -> None:
    for agg, ns, bounds in [
        ("by_game", "chess", None),
        ("by_game", "go", {"lower": {"key": 150, "id": 300}, "upper": {"key": 1300}}),
        ("pairs", None, {"prefix": ["shogi"]}),
        ("ratings", ("go", 0), None),
    ]:
        orders: tuple[Order, ...] = ("asc", "desc")
        for order in orders:

            def engine_items(
                a: str = agg, n: Any = ns, b: Any = bounds, o: Order = order
            ) -> list[Item]:
                return list(served.proc.store.aggregate(a).iter(n, b, o))

            want = served.on_loop(engine_items)
            got: list[Any] = []
            cursor = None
            while True:
                page = served.client.paginate(
                    agg, cursor=cursor, page_size=13, order=order, namespace=ns, bounds=bounds
                )

                def engine_page_of(
                    a: str = agg,
                    c: str | None = cursor,
                    n: Any = ns,
                    b: Any = bounds,
                    o: Order = order,
                ) -> Page:
                    return served.proc.store.aggregate(a).paginate(c, 13, o, n, b)

                engine_page = served.on_loop(engine_page_of)
                assert page == engine_page
                got += page.items
                cursor = page.cursor
                if page.is_done:
                    break
            assert got == want and want, (agg, ns, order)


def test_random_returns_an_item_in_range(served: Served) -> None:
    for ns, bounds in [
        ("chess", None),
        ("go", {"lower": {"key": 300}, "upper": {"key": 1200}}),
        ("go", {"eq": 185}),
    ]:

        def engine_pool(n: str = ns, b: Any = bounds) -> list[Item]:
            return list(served.proc.store.aggregate("by_game").iter(n, b))

        pool = served.on_loop(engine_pool)
        seen = set()
        for _ in range(30):
            it = served.client.random("by_game", namespace=ns, bounds=bounds)
            assert it in pool
            assert it is not None
            seen.add(it.id)
        assert len(seen) > 1 or len(pool) == 1
    assert served.client.random("by_game", namespace="nope") is None
    assert served.client.random("by_game", namespace="go", bounds={"lower": {"key": 10**9}}) is None


def _get(url: str, params: dict[str, Any]) -> tuple[int, Any]:
    q = urllib.parse.urlencode({k: json.dumps(v) for k, v in params.items()})
    try:
        with urllib.request.urlopen(f"{url}?{q}" if q else url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(
    url: str, body: bytes | None, method: str = "POST", headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_get_with_json_query_params_matches_post(served: Served) -> None:
    base = served.url + "/v1/aggregates"
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("by_game", "count", {"namespace": "chess", "bounds": {"lower": {"key": 300}}}),
        ("by_game", "sum", {"namespace": "go"}),
        ("by_game", "at", {"namespace": "go", "offset": -2}),
        ("by_game", "index_of", {"namespace": "chess", "key": 185, "order": "desc"}),
        ("by_game", "min", {"namespace": "shogi", "bounds": {"eq": 185}}),
        ("by_game", "max", {"namespace": "shogi"}),
        ("by_game", "paginate", {"namespace": "chess", "page_size": 4, "order": "desc"}),
        ("by_game", "count_batch", {"queries": [{"namespace": "go"}, {"namespace": "chess"}]}),
        ("by_game", "sum_batch", {"queries": [{"namespace": "go"}]}),
        ("by_game", "at_batch", {"queries": [{"namespace": "go", "offset": 0}]}),
        ("by_game", "namespaces", {}),
        ("pairs", "count", {"bounds": {"prefix": ["chess"]}}),
        ("ratings", "min", {"namespace": ["go", 1]}),
    ]
    for agg, op, params in cases:
        status, got = _get(f"{base}/{agg}/{op}", params)
        pstatus, want = _post(f"{base}/{agg}/{op}", json.dumps(params).encode())
        assert (status, got) == (200, want) and pstatus == 200, (agg, op, got, want)
    # The curl one-liner from the docs, spelled exactly like that.
    status, got = _get(
        f"{base}/by_game/count", {"namespace": "chess", "bounds": {"lower": {"key": 1000}}}
    )
    assert got == {"result": served.client.count("by_game", "chess", {"lower": {"key": 1000}})}
    url = f'{base}/by_game/count?namespace="chess"&bounds={{"lower":{{"key":1000}}}}'
    with urllib.request.urlopen(urllib.parse.quote(url, safe=":/?&=,"), timeout=10) as r:
        assert json.loads(r.read()) == got
    # Random over GET is an item of the range.
    status, got = _get(f"{base}/by_game/random", {"namespace": "chess"})
    assert status == 200 and got["result"]["namespace"] == "chess"


# ---------------------------------------------------------------- status, metrics, probes


def test_readyz_and_status_before_the_topic_exists(served: Served) -> None:
    early = served.early_readyz
    assert early["status"] == "not_ready"
    assert "no partitions assigned" in early["reason"]
    assert served.early_status["partitions"] == []
    assert served.client.readyz() == {"status": "ready", "lag": 0, "max_lag": 0}
    assert served.client.healthz() == {"status": "ok"}


def test_aggregates_and_status(served: Served) -> None:
    st = served.client.status()
    counts = served.on_loop(
        lambda: {
            d.name: sum(
                served.proc.store.aggregate(d.name).count(ns)
                for ns in served.proc.store.aggregate(d.name).namespaces()
            )
            for d in DEFINITIONS
        }
    )
    assert [a["name"] for a in st["aggregates"]] == ["by_game", "pairs", "ratings"]
    for a in st["aggregates"]:
        assert a["state"] == "ready" and a["table"] == TABLE and a["progress"] is None
        assert a["items"] == counts[a["name"]]
    rows = final_rows().values()
    assert {a["name"]: a["namespaces"] for a in st["aggregates"]} == {
        "by_game": 3,
        "pairs": 1,
        "ratings": len({(r["game"], r["tier"]) for r in rows}),
    }
    assert {a["name"]: a["items"] for a in st["aggregates"]} == {
        "by_game": len(rows),
        "pairs": sum(r["score"] >= 100 for r in rows),
        "ratings": len(rows),
    }
    assert served.client.aggregates() == st["aggregates"]
    parts = st["partitions"]
    assert [p["partition"] for p in parts] == [0, 1, 2]
    assert all(p["lag"] == 0 and p["offset"] == p["end_offset"] for p in parts)
    assert sum(p["end_offset"] for p in parts) == served.produced
    pst = served.proc.stats
    stats = served.on_loop(
        lambda: (pst.events, getattr(pst, "replayed", 0), pst.batches, pst.dead_letters)
    )
    assert (st["events"], st["replayed"], st["batches"], st["dead_letters"]) == stats
    # Every record was consumed once, live or by the first build's replay.
    assert st["events"] + st["replayed"] == served.produced and st["dead_letters"] == 2
    assert st["lag"] == 0 and st["caught_up"] is True and st["broker_reachable"] is True
    assert 0 < st["uptime_seconds"] < 3600


def _prom_escape(value: str) -> str:
    """A label value as the text format writes it (backslash, newline and quote escaped)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def parse_metrics(
    text: str,
) -> tuple[dict[str, tuple[str, str]], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """(family → (type, help), (sample name, labels) → value), read by prometheus_client's
    text-format parser (an implementation independent of our renderer). That parser is lax,
    so this asserts what it lets through: every sample in a family with one # TYPE and one
    # HELP (a stray sample comes back as an untyped family of its own), counters named
    ``*_total``, no sample twice, and each sample line exactly what the parser read (it
    skips a malformed label silently)."""
    assert text.endswith("\n")
    families: dict[str, tuple[str, str]] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    heads: list[str] = []
    for m in text_string_to_metric_families(text):
        # the parser drops a counter's "_total" from the family name (OpenMetrics style)
        name = f"{m.name}_total" if m.type == "counter" else m.name
        assert m.type in ("counter", "gauge", "histogram"), f"{name}: type {m.type!r}, no # TYPE?"
        assert m.documentation, f"{name} has no # HELP"
        for what in (f"# TYPE {name} {m.type}", f"# HELP {name} "):
            n = sum(ln.startswith(what) for ln in text.splitlines())
            assert n == 1, f"{n} lines '{what}...' for {name}"
        families[name] = (m.type, m.documentation)
        for smp in m.samples:
            key = (smp.name, frozenset(smp.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = smp.value
            labels = ",".join(f'{k}="{_prom_escape(v)}"' for k, v in smp.labels.items())
            heads.append(f"{smp.name}{{{labels}}}" if labels else smp.name)
    lines = [ln.rsplit(" ", 1)[0] for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines == heads, [(a, b) for a, b in zip(lines, heads, strict=False) if a != b][:3]
    return families, samples


def test_metrics(served: Served) -> None:
    text = served.client.metrics()
    families, samples = parse_metrics(text)
    st = served.proc.stats
    stats = served.on_loop(
        lambda: {
            "events": st.events,
            "replayed": getattr(st, "replayed", 0),
            "batches": st.batches,
            "dead_letters": st.dead_letters,
            "latency_sum": st.latency_sum,
            "latency_buckets": list(st.latency_buckets),
            "changed": st.changed,
            "drift": dict(st.drift),
            "started": st.started,
        }
    )
    for name, kind in [
        ("tally_events_applied_total", "counter"),
        ("tally_batches_total", "counter"),
        ("tally_dead_letters_total", "counter"),
        ("tally_batch_apply_seconds", "histogram"),
        ("tally_lag", "gauge"),
        ("tally_items", "gauge"),
        ("tally_uptime_seconds", "gauge"),
    ]:
        assert families[name][0] == kind, name

    def one(name: str, **labels: Any) -> float:
        return samples[(name, frozenset((k, str(v)) for k, v in labels.items()))]

    assert one("tally_events_applied_total") == stats["events"]
    assert one("tally_events_replayed_total") == stats["replayed"]
    assert stats["events"] + stats["replayed"] == served.produced
    assert one("tally_batches_total") == stats["batches"]
    assert one("tally_dead_letters_total") == stats["dead_letters"] == 2
    # Histogram: cumulative, +Inf == _count == batches, _sum == latency_sum.
    name = "tally_batch_apply_seconds"
    buckets = [one(f"{name}_bucket", le=repr(float(le))) for le in LATENCY_BUCKETS] + [
        one(f"{name}_bucket", le="+Inf")
    ]
    assert buckets == sorted(buckets)
    running = 0
    for i, b in enumerate(buckets[:-1]):
        running += stats["latency_buckets"][i]
        assert b == running
    assert buckets[-1] == one(f"{name}_count") == stats["batches"] == sum(stats["latency_buckets"])
    assert one(f"{name}_sum") == stats["latency_sum"]  # rendered with repr(): exact
    topic = served.proc.topics[0]
    for p in range(3):
        assert one("tally_lag", topic=topic, partition=p) == 0
    for a in served.client.aggregates():
        assert one("tally_items", aggregate=a["name"]) == a["items"]
        assert one("tally_aggregate_ready", aggregate=a["name"]) == 1
    assert one("tally_items_changed_total") == stats["changed"] > 0
    for d in DEFINITIONS:
        for kind in DRIFT_KINDS:
            got = one("tally_drift_events_total", aggregate=d.name, kind=kind)
            assert got == stats["drift"].get((d.name, kind), 0), (d.name, kind)
    assert one("tally_broker_reachable") == 1
    # rendered before now, rounded to milliseconds
    assert 0 < one("tally_uptime_seconds") <= time.time() - stats["started"] + 0.001


# ---------------------------------------------------------------- bad requests


BAD: list[tuple[str, str, bytes | None, int, str, str]] = [
    # method, path (after the base url), body, status, code, text expected in the message
    (
        "POST",
        "/v1/aggregates/nope/count",
        b"{}",
        404,
        "unknown_aggregate",
        "by_game, pairs, ratings",
    ),
    ("GET", "/v1/aggregates/nope/count", None, 404, "unknown_aggregate", "by_game"),
    ("POST", "/v1/aggregates/by_game/median", b"{}", 404, "unknown_op", "count, sum, at"),
    ("GET", "/v1/aggregates/by_game/median", None, 404, "unknown_op", "paginate"),
    ("POST", "/v1/aggregates/by_game/count", b'{"namespace": ', 400, "bad_json", "not valid JSON"),
    ("POST", "/v1/aggregates/by_game/count", b"\xff\xfe{}", 400, "bad_json", "not valid JSON"),
    ("POST", "/v1/aggregates/by_game/count", b"[1, 2]", 400, "bad_request", "JSON object"),
    ("POST", "/v1/aggregates/by_game/count", b'{"bounds": 5}', 400, "invalid_argument", "bounds"),
    (
        "POST",
        "/v1/aggregates/by_game/count",
        b'{"bounds": [1, 2]}',
        400,
        "invalid_argument",
        "bounds",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count",
        b'{"bounds": {"lower": 5}}',
        400,
        "invalid_argument",
        "lower",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count",
        b'{"bounds": {"from": 5}}',
        400,
        "invalid_argument",
        "from",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count",
        b'{"bounds": {"lower": {"inclusive": true}}}',
        400,
        "invalid_argument",
        "key",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count",
        b'{"bounds": {"upper": {"key": 1, "inclusive": "no"}}}',
        400,
        "invalid_argument",
        "inclusive",
    ),
    (
        "POST",
        "/v1/aggregates/pairs/count",
        b'{"bounds": {"prefix": "chess"}}',
        400,
        "invalid_argument",
        "prefix",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count",
        b'{"bounds": {"eq": {"a": 1}}}',
        400,
        "invalid_key",
        "dict",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count",
        b'{"namespace": {"a": 1}}',
        400,
        "invalid_key",
        "dict",
    ),
    ("POST", "/v1/aggregates/by_game/index_of", b'{"key": {"a": 1}}', 400, "invalid_key", "dict"),
    ("POST", "/v1/aggregates/by_game/index_of", b"{}", 400, "missing_field", "key"),
    (
        "POST",
        "/v1/aggregates/by_game/at",
        b'{"offset": "3", "namespace": "go"}',
        400,
        "invalid_argument",
        "offset must be an int",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/at",
        b'{"offset": 1.5, "namespace": "go"}',
        400,
        "invalid_argument",
        "offset must be an int",
    ),
    ("POST", "/v1/aggregates/by_game/at", b'{"namespace": "go"}', 400, "missing_field", "offset"),
    (
        "POST",
        "/v1/aggregates/by_game/paginate",
        b'{"cursor": "not a cursor"}',
        400,
        "invalid_argument",
        "cursor",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/paginate",
        b'{"cursor": 5}',
        400,
        "invalid_argument",
        "cursor",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/paginate",
        b'{"page_size": 0}',
        400,
        "invalid_argument",
        "page_size",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/paginate",
        b'{"page_size": 1000000}',
        400,
        "invalid_argument",
        str(MAX_PAGE_SIZE),
    ),
    (
        "POST",
        "/v1/aggregates/by_game/paginate",
        b'{"order": "sideways"}',
        400,
        "invalid_argument",
        "order",
    ),
    ("POST", "/v1/aggregates/by_game/count", b'{"nmspace": "go"}', 400, "unknown_field", "nmspace"),
    (
        "POST",
        "/v1/aggregates/by_game/namespaces",
        b'{"namespace": "go"}',
        400,
        "unknown_field",
        "no arguments",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count_batch",
        b'{"queries": 5}',
        400,
        "invalid_argument",
        "queries",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count_batch",
        b'{"queries": [5]}',
        400,
        "invalid_argument",
        "queries[0]",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count_batch",
        b'{"queries": [{"bounds": 7}]}',
        400,
        "invalid_argument",
        "bounds",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/at_batch",
        b'{"queries": [{"offset": "x"}]}',
        400,
        "invalid_argument",
        "offset",
    ),
    (
        "POST",
        "/v1/aggregates/by_game/count",
        b'{"namespace": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        400,
        "bad_request",
        "deeply",
    ),
    (
        "GET",
        "/v1/aggregates/by_game/count?namespace=chess",
        None,
        400,
        "bad_json",
        '?namespace="chess"',
    ),
    (
        "GET",
        '/v1/aggregates/by_game/count?namespace="a"&namespace="b"',
        None,
        400,
        "bad_request",
        "once",
    ),
    ("GET", "/v1/aggregates/by_game/at?offset=%22x%22", None, 400, "invalid_argument", "offset"),
    ("PUT", "/status", b"{}", 405, "method_not_allowed", "GET"),
    ("DELETE", "/v1/aggregates/by_game/count", None, 405, "method_not_allowed", "POST"),
    ("GET", "/nope", None, 404, "not_found", "/openapi.json"),
    ("GET", "/v1/aggregates/by_game", None, 404, "not_found", "/v1/aggregates/{name}/{op}"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "text"),
    BAD,
    ids=[f"{b[0]} {b[1][:60]} {b[4]}" for b in BAD],
)
def test_bad_requests_get_a_clear_4xx(
    served: Served, method: str, path: str, body: bytes | None, status: int, code: str, text: str
) -> None:
    url = served.url + urllib.parse.quote(path, safe="/?&=%")
    got_status, doc = _post(url, body, method)
    assert got_status == status, doc
    assert doc["error"]["code"] == code, doc
    assert text in doc["error"]["message"], doc
    # ...and the server keeps answering.
    assert served.client.healthz() == {"status": "ok"}


def test_offset_out_of_range_names_the_count(served: Served) -> None:
    n = served.client.count("by_game", "go")
    with pytest.raises(ClientError) as e:
        served.client.at("by_game", n, namespace="go")
    assert e.value.status == 400 and e.value.code == "offset_out_of_range"
    assert f"holds {n} items" in str(e.value)
    with pytest.raises(ClientError, match="unknown_aggregate") as e2:
        served.client.count("nope")
    assert e2.value.status == 404 and e2.value.details["known"] == ["by_game", "pairs", "ratings"]
    with pytest.raises(ClientError, match="NaN"):
        served.client.count("by_game", bounds={"lower": {"key": float("nan")}})
    with pytest.raises(ClientError, match="bytes"):
        served.client.index_of("by_game", b"raw")


def test_oversized_body_is_413_and_the_server_keeps_answering(served: Served) -> None:
    big = b'{"queries": [' + b"{}," * (MAX_BODY // 3 + 10) + b"{}]}"
    assert len(big) > MAX_BODY
    status, doc = _post(served.url + "/v1/aggregates/by_game/count_batch", big)
    assert status == 413 and doc["error"]["code"] == "payload_too_large"
    assert str(MAX_BODY) in doc["error"]["message"]
    # Chunked (no Content-Length): refused while reading.
    conn = http.client.HTTPConnection("127.0.0.1", int(served.url.rsplit(":", 1)[1]), timeout=10)
    try:
        conn.request(
            "POST",
            "/v1/aggregates/by_game/count_batch",
            body=iter([big[i : i + 65536] for i in range(0, len(big), 65536)]),
            encode_chunked=True,
            headers={"Transfer-Encoding": "chunked"},
        )
        resp = conn.getresponse()
        assert (
            resp.status == 413 and json.loads(resp.read())["error"]["code"] == "payload_too_large"
        )
    finally:
        conn.close()
    # Just under the limit is fine.
    ok = b'{"queries": [' + b'{"namespace":"go"},' * 1000 + b'{"namespace":"go"}]}'
    status, doc = _post(served.url + "/v1/aggregates/by_game/count_batch", ok)
    assert status == 200 and len(set(doc["result"])) == 1 and len(doc["result"]) == 1001
    assert served.client.healthz() == {"status": "ok"}


def test_unreachable_server_names_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ClientError) as e:
        TallyClient(url, timeout=2).count("by_game")
    msg = str(e.value)
    assert url in msg and "tally consume" in msg and "--http" in msg
    assert e.value.status is None


# ---------------------------------------------------------------- stand-in processes


def fake_process(
    store: Any, *, assigned: list[TopicPartition] | None = None, **settings: Any
) -> Any:
    return types.SimpleNamespace(
        store=store,
        definitions=list(DEFINITIONS),
        stats=ConsumerStats(),
        settings=ConsumerSettings(**settings),
        topics=["scores"],
        table_topics={TABLE: "scores"},
        assigned=list(assigned or []),
    )


def serve(app: web.Application, fn: Callable[[TestClient[Any, Any]], Any]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(app)) as c:
            await fn(c)

    asyncio.run(main())


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


async def _dummy_clear(request: web.Request) -> web.StreamResponse:
    return web.json_response({"cleared": request.match_info["name"]})


DUMMY = ProtectedRoute(
    "POST", "/v1/aggregates/{name}/clear", _dummy_clear, summary="Clear an aggregate (test)"
)


def test_token_rule(store: Store) -> None:
    proc = fake_process(store)

    async def with_token(c: TestClient[Any, Any]) -> None:
        r = await c.post("/v1/aggregates/by_game/clear")
        assert r.status == 401 and (await r.json())["error"]["code"] == "unauthorized"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert "no Authorization header" in (await r.json())["error"]["message"]
        r = await c.post("/v1/aggregates/by_game/clear", headers={"Authorization": "Bearer wrong"})
        assert r.status == 401 and "wrong bearer token" in (await r.json())["error"]["message"]
        r = await c.post("/v1/aggregates/by_game/clear", headers={"Authorization": "Basic s3cret"})
        assert r.status == 401
        r = await c.post("/v1/aggregates/by_game/clear", headers={"Authorization": "Bearer s3cret"})
        assert r.status == 200 and await r.json() == {"cleared": "by_game"}
        # Reads never need the token.
        r = await c.post("/v1/aggregates/by_game/count", json={})
        assert r.status == 200 and await r.json() == {"result": 0}
        doc = await (await c.get("/openapi.json")).json()
        op = doc["paths"]["/v1/aggregates/{name}/clear"]["post"]
        assert op["security"] == [{"bearer": []}] and "401" in op["responses"]
        assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"

    app = create_app(proc, "s3cret", protected=[DUMMY])
    assert ("POST", "/v1/aggregates/{name}/clear") in _app_routes(app)
    serve(app, with_token)

    async def without_token(c: TestClient[Any, Any]) -> None:
        for headers in ({}, {"Authorization": "Bearer s3cret"}):
            r = await c.post("/v1/aggregates/by_game/clear", headers=headers)
            doc = await r.json()
            assert r.status == 404 and doc["error"]["code"] == "not_found"
            assert "--token" in doc["error"]["message"]
        doc = await (await c.get("/openapi.json")).json()
        assert "/v1/aggregates/{name}/clear" not in doc["paths"]
        assert "securitySchemes" not in doc["components"]

    for token in (None, ""):
        app = create_app(proc, token, protected=[DUMMY])
        assert not any(p.endswith("/clear") for _, p in _app_routes(app))
        serve(app, without_token)


def test_readiness_rule(store: Store) -> None:
    tp = TopicPartition("scores", 0)

    async def check(c: TestClient[Any, Any], status: int, text: str) -> None:
        r = await c.get("/readyz")
        doc = await r.json()
        assert r.status == status, doc
        if status == 503:
            assert doc["status"] == "not_ready" and text in doc["reason"], doc
        else:
            assert doc["status"] == "ready"

    proc = fake_process(store, ready_max_lag=10)

    async def steps(c: TestClient[Any, Any]) -> None:
        await check(c, 503, "no partitions assigned")
        proc.assigned = [tp]
        proc.stats.offsets[tp] = 100
        proc.stats.end_offsets[tp] = 150
        await check(c, 503, "lag 50 events is over ready_max_lag 10")
        proc.stats.offsets[tp] = 140
        await check(c, 200, "")  # lag 10 <= 10
        proc.stats.broker_ok = False
        await check(c, 503, "broker unreachable")
        proc.stats.broker_ok = True
        await check(c, 200, "")
        r = await c.get("/healthz")
        assert r.status == 200 and await r.json() == {"status": "ok"}

    serve(create_app(proc, None), steps)


class _Backfilling:
    def __getattr__(self, name: str) -> Any:
        def raise_(*a: Any, **k: Any) -> Any:
            raise AggregateNotReady(
                "aggregate 'by_game' is being built by replay", progress={"offset": 10, "end": 100}
            )

        return raise_


class _Broken:
    def __getattr__(self, name: str) -> Any:
        def raise_(*a: Any, **k: Any) -> Any:
            raise RuntimeError("disk on fire")

        return raise_


class _Store:
    def __init__(self, real: Store, special: dict[str, Any]) -> None:
        self.real, self.special = real, special

    def aggregate(self, name: str) -> Any:
        return self.special.get(name) or self.real.aggregate(name)


def test_not_ready_is_503_with_progress_and_unexpected_errors_are_500(store: Store) -> None:
    proc = fake_process(_Store(store, {"by_game": _Backfilling(), "pairs": _Broken()}))

    async def steps(c: TestClient[Any, Any]) -> None:
        r = await c.post("/v1/aggregates/by_game/count", json={"namespace": "go"})
        doc = await r.json()
        assert r.status == 503 and doc["error"]["code"] == "not_ready"
        assert doc["error"]["progress"] == {"offset": 10, "end": 100}
        r = await c.post("/v1/aggregates/pairs/min", json={})
        doc = await r.json()
        assert (
            r.status == 500
            and doc["error"]["code"] == "internal"
            and "disk on fire" in doc["error"]["message"]
        )
        r = await c.post("/v1/aggregates/ratings/count", json={})
        assert r.status == 200 and await r.json() == {"result": 0}

    serve(create_app(proc, None), steps)
    # /status and /metrics show the state instead of failing.
    proc = fake_process(_Store(store, {"by_game": _Backfilling()}))

    async def status(c: TestClient[Any, Any]) -> None:
        doc = await (await c.get("/status")).json()
        by = {a["name"]: a for a in doc["aggregates"]}
        assert by["by_game"]["state"] == "backfilling" and by["by_game"]["progress"] == {
            "offset": 10,
            "end": 100,
        }
        assert by["by_game"]["items"] is None and by["ratings"]["state"] == "ready"
        _, samples = parse_metrics(await (await c.get("/metrics")).text())
        assert samples[("tally_aggregate_ready", frozenset({("aggregate", "by_game")}))] == 0
        assert ("tally_items", frozenset({("aggregate", "by_game")})) not in samples
        assert samples[("tally_items", frozenset({("aggregate", "ratings")}))] == 0

    serve(create_app(proc, None), status)
    # A process that reports its own states (e.g. a rebuild by replay) is shown as it says.
    proc = fake_process(store)
    proc.aggregate_states = lambda: {"pairs": {"state": "building", "progress": {"events": 5}}}

    async def hooked(c: TestClient[Any, Any]) -> None:
        doc = await (await c.get("/v1/aggregates")).json()
        by = {a["name"]: a for a in doc["result"]}
        assert by["pairs"]["state"] == "building" and by["pairs"]["progress"] == {"events": 5}
        assert by["pairs"]["items"] == 0 and by["by_game"]["state"] == "ready"
        _, samples = parse_metrics(await (await c.get("/metrics")).text())
        assert samples[("tally_aggregate_ready", frozenset({("aggregate", "pairs")}))] == 0

    serve(create_app(proc, None), hooked)


# ---------------------------------------------------------------- OpenAPI

_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def _app_routes(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path, info
        out.add((route.method.upper(), path))
    return out


def _doc_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), path) for path, item in doc["paths"].items() for m in item if m in _METHODS}


def _check_openapi(doc: dict[str, Any]) -> None:
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    assert isinstance(doc["paths"], dict) and doc["paths"]
    op_ids = []
    schemas = doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        templated = set(re.findall(r"\{(\w+)\}", path))
        path_params = {p["name"] for p in item.get("parameters", []) if p["in"] == "path"}
        for m, op in item.items():
            if m not in _METHODS:
                continue
            assert op["responses"], (path, m)
            for code, resp in op["responses"].items():
                assert re.fullmatch(r"[1-5]\d\d|default", code) and resp["description"], (
                    path,
                    m,
                    code,
                )
            params = path_params | {
                p["name"] for p in op.get("parameters", []) if p["in"] == "path"
            }
            assert params == templated, (path, m, params)
            for p in op.get("parameters", []):
                assert p["in"] in ("query", "path", "header", "cookie")
                assert ("schema" in p) != ("content" in p), p
            op_ids.append(op["operationId"])
    assert len(op_ids) == len(set(op_ids)), "operationIds must be unique"

    def refs(x: Any) -> Iterator[str]:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "$ref":
                    yield v
                else:
                    yield from refs(v)
        elif isinstance(x, list):
            for v in x:
                yield from refs(v)

    for ref in refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    json.dumps(doc)  # plain JSON


def test_openapi_describes_exactly_the_registered_routes(store: Store, served: Served) -> None:
    for token, protected in ((None, []), ("t", [DUMMY]), (None, [DUMMY])):
        app = create_app(fake_process(store), token, protected=protected)
        holder: dict[str, Any] = {}

        async def fetch(c: TestClient[Any, Any], holder: dict[str, Any] = holder) -> None:
            holder["doc"] = await (await c.get("/openapi.json")).json()

        serve(app, fetch)
        doc = holder["doc"]
        assert _app_routes(app) == _doc_routes(doc)
        _check_openapi(doc)
    # The live process serves the same shape, with its aggregate names.
    doc = served.client.openapi()
    _check_openapi(doc)
    assert {p for _, p in _doc_routes(doc)} >= {f"/v1/aggregates/{{name}}/{op}" for op in READ_OPS}
    assert doc["paths"]["/v1/aggregates/{name}/count"]["parameters"][0]["schema"]["enum"] == [
        "by_game",
        "pairs",
        "ratings",
    ]
    for op in READ_OPS:
        assert {"get", "post"} <= set(doc["paths"][f"/v1/aggregates/{{name}}/{op}"])


def _fields_of(struct: Any) -> set[str]:
    return set(struct.__struct_fields__)


def test_answers_have_exactly_the_fields_of_their_structs(store: Store) -> None:
    # The OpenAPI document is generated from tally.schemas.status; the answers are built as dicts,
    # so hold each to its Struct: it decodes, and it has no field the Struct does not name.
    tp = TopicPartition("scores", 0)
    proc = fake_process(store, assigned=[tp])
    proc.stats.offsets[tp], proc.stats.end_offsets[tp] = 5, 9
    store.aggregate("by_game").insert(1, 1, 1, "go")

    async def steps(c: TestClient[Any, Any]) -> None:
        raw = await (await c.get("/status")).read()
        st = msgspec.json.decode(raw, type=Status)
        doc = json.loads(raw)
        assert set(doc) == _fields_of(Status)
        assert set(doc["dead_letter"]) <= _fields_of(DeadLetterStatus)
        assert all(set(a) == _fields_of(AggregateStatus) for a in doc["aggregates"])
        assert all(set(p) == _fields_of(PartitionStatus) for p in doc["partitions"])
        assert st.aggregates[0].items == 1 and st.partitions[0].lag == 4
        listed = json.loads(await (await c.get("/v1/aggregates")).read())["result"]
        assert [set(a) for a in listed] == [_fields_of(AggregateStatus)] * len(DEFINITIONS)
        for path, struct in [("/readyz", Ready), ("/healthz", Health)]:
            raw = await (await c.get(path)).read()
            msgspec.json.decode(raw, type=struct)
            assert set(json.loads(raw)) <= _fields_of(struct), path
        for method, path in [
            ("POST", "/v1/aggregates/nope/count"),
            ("POST", "/v1/aggregates/by_game/at"),
        ]:
            raw = await (await c.request(method, path, data=b"{}")).read()
            err = msgspec.json.decode(raw, type=Error)
            assert err.error.code in ("unknown_aggregate", "missing_field")
            assert set(json.loads(raw)["error"]) <= _fields_of(ErrorDetail)

    serve(create_app(proc, None), steps)


# ---------------------------------------------------------------- start_http and the CLI


def test_start_http_bad_address_and_port_in_use(store: Store) -> None:
    proc = fake_process(store)

    async def main() -> None:
        for bad in ("localhost", "127.0.0.1:", "127.0.0.1:http", "127.0.0.1:70000", "::1:80"):
            with pytest.raises(ConfigError, match=r"HOST:PORT|port must be|brackets"):
                await start_http(proc, bad, None)
        runner = await start_http(proc, "127.0.0.1:0", None)
        try:
            port = runner.addresses[0][1]
            with pytest.raises(ConfigError) as e:
                await start_http(proc, f"127.0.0.1:{port}", None)
            msg = str(e.value)
            assert (
                f"port {port} is already in use" in msg
                and "--http HOST:PORT" in msg
                and "--no-http" in msg
            )
        finally:
            await runner.cleanup()

    asyncio.run(main())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    return env


def test_cli_consume_serves_http_and_reports_a_taken_port(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("http-cli")
    create_topic(kafka_bootstrap, topic, partitions=2)
    produce(kafka_bootstrap, topic, [event("insert", i, row(i)) for i in range(200)])
    defs = tmp_path / "defs.py"
    defs.write_text(
        textwrap.dedent(f"""
        from tally.engine import TableAggregate
        by_game = TableAggregate("by_game", table={TABLE!r}, namespace="game", sort_key="score", sum_value="score")
    """)
    )
    port = free_port()
    data = tmp_path / "data"
    cmd = [
        sys.executable,
        "-m",
        "tally.consumers.cli.main",
        "consume",
        str(defs),
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic",
        f"{TABLE}={topic}",
        "--log-format",
        "json",
    ]
    log = tmp_path / "consumer.log"
    log_file = log.open("w")
    proc = subprocess.Popen(
        [*cmd, "--data-dir", str(data), "--http", f"127.0.0.1:{port}"],
        cwd=tmp_path,
        env=_env(),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = TallyClient(f"http://127.0.0.1:{port}", timeout=5)
        wait_for(lambda: proc.poll() is None and client.healthz(), 30, "the subprocess' /healthz")
        wait_for(
            lambda: caught_up(s := client.status()) and s["events"] + s["replayed"] == 200,
            60,
            "caught up",
        )
        assert client.readyz()["status"] == "ready"
        # The same state, read by the engine through a read-only (secondary) open of the data dir.
        with Store.open(data, read_only=True) as ro:
            agg = ro.aggregate("by_game")
            for g in GAMES:
                assert client.count("by_game", g) == agg.count(g)
                assert client.at("by_game", -1, namespace=g) == agg.at(-1, g)
                assert client.paginate("by_game", page_size=20, namespace=g) == agg.paginate(
                    None, 20, "asc", g
                )
        # A second consumer on the same port: one clear line, exit 2.
        second = subprocess.run(
            [*cmd, "--data-dir", str(tmp_path / "data2"), "--http", f"127.0.0.1:{port}"],
            cwd=tmp_path,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        assert f"port {port} is already in use" in second.stderr and "--no-http" in second.stderr
        assert "Traceback" not in second.stderr
        assert client.healthz() == {"status": "ok"}  # the first one is unaffected
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
    err = log.read_text()
    assert proc.returncode == 0, err
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    listening = [x for x in lines if x.get("event") == "http api listening"]
    assert len(listening) == 1 and listening[0]["url"] == f"http://127.0.0.1:{port}"
    with pytest.raises(ClientError, match="cannot reach tally"):
        TallyClient(f"http://127.0.0.1:{port}", timeout=2).healthz()
