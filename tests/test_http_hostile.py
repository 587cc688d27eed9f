"""The HTTP API under hostile clients (consumers/http/limits.py, issue 10 §3).

* In-process (`start_http` with a stand-in process, real aiohttp, real sockets):
  the connection cap (503 envelope, exact count, the slot comes back), the idle,
  header (slow-loris, trickled) and body timeouts (408 envelope, then closed),
  aiohttp's own parser errors in our JSON envelope, a client vanishing mid-body
  (an info line, no error, no traceback), the bind rule for ``--http``.
* Subprocess: `tally consume` under ``ulimit -n 256`` flooded with more
  connections than the limit (idle ones, half headers, half bodies): it stays
  alive, keeps applying events produced during the flood, keeps descriptors free
  for RocksDB, closes every stale connection, and answers reads afterwards.
* A key nested ~980 deep is dead-lettered (reason ``apply``) by a real consumer,
  and everything stored stays readable.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import signal
import socket
import subprocess
import time
import types
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from consumer_util import (
    TABLE,
    TALLY,
    RowStream,
    child_env,
    consume_args,
    dlq_records,
    free_port,
    json_logs,
    log_events,
    native_records,
    open_store,
    run_consume,
    tail,
    wait_for,
    write_definitions,
)
from kafka_util import create_topic, produce, unique_topic

from tally.consumers.client import TallyClient
from tally.consumers.http.app import parse_address, start_http, warn_if_exposed
from tally.consumers.http.common import CONNECTIONS
from tally.consumers.http.limits import ROCKSDB_FIXED_FDS, ConnectionStats, HttpLimits, fd_budget
from tally.consumers.runtime.stats import ConsumerStats
from tally.engine import MAX_KEY_DEPTH, Store, TableAggregate, TallyError
from tally.schemas import ConfigError
from tally.schemas.config import ConsumerSettings

# ---------------------------------------------------------------- in-process server

AGG = TableAggregate("scores", table="players", sort_key="score", sum_value="score")


def stand_in(store: Store, definitions: list[TableAggregate] | None = None, **settings: Any) -> Any:
    """The parts of a `ConsumerProcess` the HTTP API reads."""
    return types.SimpleNamespace(
        store=store,
        definitions=definitions or [AGG],
        stats=ConsumerStats(),
        settings=ConsumerSettings(**settings),
        topics=["players"],
        table_topics={"players": "players"},
        assigned=[],
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def serve(
    store: Store,
    fn: Callable[[int, ConnectionStats], Awaitable[None]],
    *,
    limits: HttpLimits,
    body_timeout: float = 30.0,
) -> None:
    """Run ``fn(port, stats)`` against a real `start_http` server on a free port."""

    async def main() -> None:
        runner = await start_http(
            stand_in(store, http_body_timeout=body_timeout), "127.0.0.1:0", None, limits=limits
        )
        try:
            port = runner.addresses[0][1]
            await fn(port, runner.app[CONNECTIONS])
        finally:
            await runner.cleanup()

    asyncio.run(main())


def limits(**kw: Any) -> HttpLimits:
    base: dict[str, Any] = {
        "max_connections": 64,
        "idle_timeout": 60.0,
        "header_timeout": 60.0,
        "body_timeout": 60.0,
    }
    base.update(kw)
    return HttpLimits(**base)


async def until(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await asyncio.sleep(0.01)


async def read_all(reader: asyncio.StreamReader, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except TimeoutError:
        pytest.fail(f"the server did not close the connection within {timeout}s")


def split(raw: bytes) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body) of one raw HTTP response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return status, headers, json.loads(body) if body else None


GET_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


def test_connections_over_the_cap_get_a_503_envelope_and_the_slot_comes_back(store: Store) -> None:
    cap = 4

    async def steps(port: int, stats: ConnectionStats) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        await until(lambda: stats.open == cap, f"{cap} open connections")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET_HEALTHZ)
        status, headers, body = split(await read_all(reader))
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        assert f"limit of {cap} open connections" in body["error"]["message"]
        assert headers["connection"] == "close" and headers["retry-after"] == "1"
        assert headers["content-type"] == "application/json"
        assert stats.open == cap and stats.refused == 1
        # A held connection is served normally, and keeps its slot across requests.
        r0, w0 = held[0]
        for _ in range(3):
            w0.write(GET_HEALTHZ)
            line = await r0.readline()
            assert line.startswith(b"HTTP/1.1 200"), line
            await r0.readuntil(b'{"status":"ok"}')
        # Closing one gives its slot back.
        w1 = held[1][1]
        w1.close()
        await until(lambda: stats.open == cap - 1, "the closed connection's slot to come back")
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GET_HEALTHZ)
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        for _, w in held:
            w.close()
        writer.close()
        await until(lambda: stats.open == 0, "every connection to be released")

    serve(store, steps, limits=limits(max_connections=cap))


def test_idle_connections_are_closed_and_kept_alive_ones_reused(store: Store) -> None:
    async def steps(port: int, stats: ConnectionStats) -> None:
        # Opened and never used: closed by the server.
        reader, _ = await asyncio.open_connection("127.0.0.1", port)
        assert await read_all(reader) == b""
        # Used, then idle: answered on the same connection, then closed.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            writer.write(GET_HEALTHZ)
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b'{"status":"ok"}')
        assert await read_all(reader) == b""
        await until(lambda: stats.open == 0, "the idle connections' slots")

    serve(store, steps, limits=limits(idle_timeout=0.5))


def test_slow_loris_headers_get_408_even_when_trickled(store: Store) -> None:
    async def steps(port: int, stats: ConnectionStats) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 5000 + b"\r\n\r\n"
        answer = asyncio.ensure_future(reader.read())
        sent = 0
        while not answer.done() and sent < len(request):  # one byte every 20 ms: ~100 s in all
            writer.write(request[sent : sent + 1])
            sent += 1
            await asyncio.sleep(0.02)
        raw = await asyncio.wait_for(answer, 30)
        assert sent < len(request), "the trickled headers were never cut off"
        status, headers, body = split(raw)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert (
            "http_header_timeout" in body["error"]["message"] and headers["connection"] == "close"
        )
        assert stats.timeouts["headers"] == 1
        # A trickle of requests that each complete in time is fine.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(3):
            writer.write(GET_HEALTHZ)
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b'{"status":"ok"}')
        writer.close()

    serve(store, steps, limits=limits(header_timeout=1.0))


def test_slow_body_gets_408_and_is_closed(store: Store) -> None:
    async def steps(port: int, stats: ConnectionStats) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/aggregates/scores/count HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"
        )
        status, headers, body = split(await read_all(reader))
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert "http_body_timeout" in body["error"]["message"] and headers["connection"] == "close"
        assert stats.timeouts["body"] == 1 and stats.timeouts["headers"] == 0
        # The body's time does not count against the headers and vice versa: a whole request is fine.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/aggregates/scores/count HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
        )
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        writer.close()

    serve(store, steps, limits=limits(body_timeout=0.5), body_timeout=0.5)


COUNT = b"POST /v1/aggregates/scores/count HTTP/1.1\r\nHost: t\r\n"


@pytest.mark.parametrize(
    "raw, status, code, text",
    [
        (
            b"GET /status?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n",
            400,
            "request_too_large",
            "POST",
        ),
        (
            b"GET /status HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n",
            400,
            "request_too_large",
            "8190",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_http", "malformed HTTP request"),
        (b"GET /status HTTP/1.1\r\nBad Header\r\n\r\n", 400, "bad_http", "malformed HTTP request"),
        (b"GET /status HTTP/1.1\r\n\r\n", 400, "bad_http", "Host"),
        (
            COUNT + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            400,
            "bad_http",
            "chunk size",
        ),
        (
            COUNT + b"Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello",
            400,
            "bad_body",
            "gzip",
        ),
        (
            COUNT + b"Content-Encoding: deflate\r\nContent-Length: 5\r\n\r\nhello",
            400,
            "bad_body",
            "deflate",
        ),
        (
            COUNT + b"Expect: 200-ok\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            417,
            "expectation_failed",
            "100-continue",
        ),
        (
            b"POST /nope HTTP/1.1\r\nHost: t\r\nExpect: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            417,
            "expectation_failed",
            "100-continue",
        ),
    ],
    ids=[
        "long-request-line",
        "long-header",
        "garbage",
        "bad-header",
        "no-host",
        "bad-chunk",
        "bad-gzip",
        "bad-deflate",
        "unknown-expect",
        "unknown-expect-unknown-path",
    ],
)
def test_http_layer_errors_use_the_json_envelope_and_are_not_logged_as_errors(
    store: Store, caplog: pytest.LogCaptureFixture, raw: bytes, status: int, code: str, text: str
) -> None:
    async def steps(port: int, stats: ConnectionStats) -> None:
        with structlog.testing.capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(raw)
            got, headers, body = split(await read_all(reader))
            await until(lambda: stats.open == 0, "the connection's slot")
        assert got == status and headers["content-type"].startswith("application/json")
        assert set(body) == {"error"} and body["error"]["code"] == code, body
        assert text in body["error"]["message"], body
        assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], (
            caplog.records
        )
        # ... and the server goes on answering.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            COUNT + b"Expect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        )
        answer = await read_all(reader)
        assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK"), answer[:80]

    serve(store, steps, limits=limits())


def test_a_client_leaving_mid_body_is_logged_as_info_not_as_a_server_error(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    async def steps(port: int, stats: ConnectionStats) -> None:
        with structlog.testing.capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"POST /v1/aggregates/scores/count HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            # aiohttp answers 100 Continue as the handler starts; client and server share this
            # loop, so once we read it the handler is waiting for the body.
            assert await asyncio.wait_for(reader.readline(), 30) == b"HTTP/1.1 100 Continue\r\n"
            writer.write(b'{"na')
            await writer.drain()
            writer.transport.abort()
            await until(
                lambda: any(e["event"] == "http client disconnected" for e in logs),
                "the disconnect line",
            )
            await until(lambda: stats.open == 0, "the slot")
        (line,) = [e for e in logs if e["event"] == "http client disconnected"]
        assert line["log_level"] == "info" and "exc_info" not in line
        assert line["path"] == "/v1/aggregates/scores/count"
        assert not [e for e in logs if e["log_level"] in ("error", "critical", "exception")], logs
        assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], (
            caplog.records
        )

    serve(store, steps, limits=limits())


def test_http_address_needs_a_host_and_beyond_loopback_is_a_warning(store: Store) -> None:
    with pytest.raises(
        ConfigError, match=r"names no host: write 127\.0\.0\.1:8750 .* or 0\.0\.0\.0:8750"
    ):
        parse_address(":8750")
    assert parse_address("0.0.0.0:8750") == ("0.0.0.0", 8750)
    assert parse_address("[::1]:8750") == ("::1", 8750)
    bound = [
        ("0.0.0.0", 8750),
        ("10.1.2.3", 1),
        ("127.0.0.1", 2),
        ("127.9.9.9", 3),
        ("::1", 4, 0, 0),
        ("::", 5, 0, 0),
    ]
    with structlog.testing.capture_logs() as logs:
        warn_if_exposed(bound, token="t")
        warn_if_exposed([("127.0.0.1", 2), ("::1", 4, 0, 0)], token=None)
    (warning,) = logs
    assert (
        warning["event"] == "http api reachable beyond this machine"
        and warning["log_level"] == "warning"
    )
    assert warning["addresses"] == ["http://0.0.0.0:8750", "http://10.1.2.3:1", "http://[::]:5"]
    assert "state-changing routes need the token" in warning["note"]

    # Loopback: no warning (we bind nothing wider in tests).
    async def main() -> list[MutableMapping[str, Any]]:
        with structlog.testing.capture_logs() as logs:
            runner = await start_http(stand_in(store), "127.0.0.1:0", None, limits=limits())
            await runner.cleanup()
        return logs

    events = [e["event"] for e in asyncio.run(main())]
    assert "http api listening" in events and "http api reachable beyond this machine" not in events


def test_file_budget_leaves_the_consumer_its_files() -> None:
    b = fd_budget(256)
    assert b.rocksdb_files == 32 and b.reserved == 104 and b.max_connections == 152
    b = fd_budget(1024)
    assert b.rocksdb_files == 128 and b.max_connections == 1024 - b.reserved
    b = fd_budget(1 << 20)
    assert b.rocksdb_files == 1024 and b.max_connections == 4096
    b = fd_budget(64)  # too low for the reserve: a small floor, and start_http warns
    assert b.http < 0 and b.max_connections == 8
    assert fd_budget(1024, rocksdb_files=500).reserved == fd_budget(1024).reserved - 128 + 500
    # The settings' defaults take the cap from the budget; a cap given above it is a warning.
    derived = HttpLimits.from_settings(ConsumerSettings())
    assert derived.max_connections == fd_budget().max_connections and not derived.over_budget
    assert HttpLimits.from_settings(ConsumerSettings(http_max_connections=7)).max_connections == 7


def test_a_connection_cap_above_the_file_budget_is_a_warning(store: Store) -> None:
    async def main(cap: int) -> list[str]:
        with structlog.testing.capture_logs() as logs:
            runner = await start_http(
                stand_in(store),
                "127.0.0.1:0",
                None,
                limits=limits(max_connections=cap, budget=fd_budget(256)),
            )
            await runner.cleanup()
        return [e["event"] for e in logs if e["log_level"] == "warning"]

    assert asyncio.run(main(1000)) == ["http connections may starve the consumer of files"]
    assert asyncio.run(main(152)) == []


# ---------------------------------------------------------------- a real consumer flooded

FLOOD_NOFILE = 256
FLOOD = {"idle": 250, "half_headers": 150, "half_body": 50}
"""450 connections at a process limited to 256 descriptors."""


def _raise_own_nofile(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= need, (
        f"the test needs {need} descriptors of its own; raise `ulimit -n` (it is {soft})"
    )


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _classify(sock: socket.socket) -> str:
    """What the server did to a flood connection so far: "open", "refused" (503), "closed"."""
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return "open"
    try:
        data = sock.recv(1 << 16)
    except ConnectionResetError:
        return "closed"
    if data.startswith(b"HTTP/1.1 503") and b"too_many_connections" in data:
        return "refused"
    if data.startswith(b"HTTP/1.1 408") or not data:
        return "closed"
    return "answered:" + data[:60].decode("latin-1")


def test_connection_flood_under_a_low_file_limit_leaves_the_consumer_alive_and_serving(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    total = sum(FLOOD.values())
    _raise_own_nofile(total + 200)
    topic = unique_topic("http-flood")
    create_topic(kafka_bootstrap, topic)
    defs, _ = write_definitions(tmp_path)
    stream = RowStream(seed=41)
    produce(kafka_bootstrap, topic, native_records(stream.take(300), seed=41))
    port = free_port()
    log = tmp_path / "consumer.log"
    args = consume_args(
        defs,
        topic,
        tmp_path / "data",
        kafka_bootstrap,
        "--http-idle-timeout",
        "5",
        "--http-header-timeout",
        "5",
        "--http-body-timeout",
        "5",
        until_caught_up=False,
        http=f"127.0.0.1:{port}",
    )

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (FLOOD_NOFILE, FLOOD_NOFILE))

    with open(log, "ab") as f:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=child_env(),
            cwd=tmp_path,
            preexec_fn=limit_files,
        )
    socks: list[tuple[str, socket.socket]] = []
    try:
        client = TallyClient(f"http://127.0.0.1:{port}", timeout=10)
        expected = len(stream.live)

        def count() -> int:
            assert proc.poll() is None, f"the consumer exited {proc.returncode}:\n{tail(log)}"
            return client.count("scores")

        wait_for(
            lambda: count() == expected,
            "the consumer to apply the first 300 events",
            swallow=(TallyError,),
        )
        (listening,) = log_events(log.read_text(), "http api listening")
        budget = fd_budget(FLOOD_NOFILE)
        assert listening["max_connections"] == budget.max_connections == 152
        assert listening["open_files"] == FLOOD_NOFILE

        # The flood: idle connections, headers that never end, bodies that never end.
        for kind, n in FLOOD.items():
            for _ in range(n):
                s = socket.create_connection(("127.0.0.1", port), timeout=10)
                s.setblocking(False)
                if kind == "half_headers":
                    s.send(b"GET /status HTTP/1.1\r\nHost: t\r\nX-Slow: ")
                elif kind == "half_body":
                    s.send(
                        b"POST /v1/aggregates/scores/count HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{"
                    )
                socks.append((kind, s))
        peak_fds = _open_fds(proc.pid)
        # Events produced during the flood are applied (read through a read-only store: the
        # API is full).
        produce(kafka_bootstrap, topic, native_records(stream.take(300), seed=42))
        expected = len(stream.live)

        def applied() -> bool:
            nonlocal peak_fds
            assert proc.poll() is None, (
                f"the consumer exited {proc.returncode} during the flood:\n{tail(log)}"
            )
            peak_fds = max(peak_fds, _open_fds(proc.pid))
            with open_store(tmp_path / "data") as ro:
                count: int = ro.aggregate("scores").count()
                return count == expected

        wait_for(
            applied, "the events produced during the flood to be applied", swallow=(TallyError,)
        )
        # RocksDB can always open its table files (and its own few) on top of what was open.
        assert peak_fds + budget.rocksdb_files + ROCKSDB_FIXED_FDS <= FLOOD_NOFILE, peak_fds
        seen = {id(s): _classify(s) for _, s in socks}
        states = list(seen.values())
        held = states.count("open")
        refused = states.count("refused")
        assert not [v for v in states if v.startswith("answered")], states
        assert held <= budget.max_connections, (held, budget.max_connections)
        assert refused + states.count("closed") >= total - budget.max_connections, states
        assert refused > 0
        # Every stale connection is closed by the server (idle and header/body timeouts).
        pending = [s for _, s in socks if seen[id(s)] == "open"]

        def all_closed() -> bool:
            nonlocal pending
            pending = [s for s in pending if _classify(s) == "open"]
            return not pending

        wait_for(all_closed, f"the server to close {len(pending)} stale connections", timeout=60)
        # Serving again: a read, the metrics, the same answer.
        assert count() == expected
        metrics = client.metrics()
        refused_total = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("tally_http_connections_refused_total ")
        )
        assert refused_total >= refused
        text = log.read_text()
        assert "Too many open files" not in text and "cannot accept http connections" not in text
        assert log_events(text, "http connections refused")
        print(
            f"\nflood: {total} connections ({', '.join(f'{n} {k}' for k, n in FLOOD.items())}) at "
            f"ulimit -n {FLOOD_NOFILE}: cap {budget.max_connections}, held {held}, refused {refused} "
            f"(503) + {states.count('closed')} closed early, peak fds {peak_fds}, refused_total {refused_total:.0f}"
        )
    finally:
        for _, s in socks:
            s.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the consumer did not stop within 30 s of SIGTERM:\n{tail(log)}")
    assert proc.returncode == 0, tail(log)


# ---------------------------------------------------------------- keys nested too deeply


def test_a_key_nested_too_deeply_is_dead_lettered_and_everything_stored_stays_readable(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    topic = unique_topic("deep-key")
    create_topic(kafka_bootstrap, topic)
    defs, defs_loaded = write_definitions(tmp_path)
    stream = RowStream(seed=5)
    good = native_records(stream.take(200), seed=5)

    def record(rid: int, depth: int) -> tuple[bytes, bytes]:
        """An insert whose ``tag`` (by_tag's sort key) is "x" inside ``depth`` arrays (written
        as text: too deep for msgspec's encoder, as for Python's own recursion)."""
        row = {
            "id": rid,
            "team": "red",
            "score": 3,
            "level": 1,
            "name": "deep",
            "active": True,
            "weight": 1.0,
            "tag": "@TAG@",
        }
        doc = msgspec.json.encode({"table": TABLE, "op": "insert", "id": rid, "after": row})
        tag = b"[" * depth + b'"x"' + b"]" * depth
        return str(rid).encode(), doc.replace(b'"@TAG@"', tag)

    bad = record(10_001, 980)
    at_limit = record(10_002, MAX_KEY_DEPTH)  # exactly at the limit: stored
    placed = produce(kafka_bootstrap, topic, [*good[:100], bad, at_limit, *good[100:]])
    res = run_consume(defs, topic, tmp_path / "data", kafka_bootstrap)
    (caught,) = log_events(res.stderr, "caught up")
    assert caught["dead_letters"] == 1
    (dead,) = dlq_records(kafka_bootstrap, topic)
    _p, _o, key, value, headers = dead
    h = dict(headers)
    assert (key, value) == bad
    assert h["tally.reason"] == b"apply"
    assert int(h["tally.source.offset"]) == placed[100][1]
    error = h["tally.error"].decode()
    assert "aggregate 'by_tag'" in error and f"more than {MAX_KEY_DEPTH} levels deep" in error, (
        error
    )
    # Everything stored reads back, through the engine and over HTTP (where the deep key used
    # to make every read that returned it a 400).
    with open_store(tmp_path / "data") as ro:
        agg = ro.aggregate("by_tag")
        items = [it for ns in agg.namespaces() for it in agg.iter(namespace=ns)]
        assert len(items) == len(stream.live) + 1  # the at-limit row is stored
        assert ro.aggregate("scores").count() == len(stream.live) + 1

        async def read_over_http() -> list[Any]:
            runner = await start_http(
                stand_in(ro, definitions=defs_loaded), "127.0.0.1:0", None, limits=limits()
            )
            try:
                client = TallyClient(f"http://127.0.0.1:{runner.addresses[0][1]}")
                return await asyncio.to_thread(
                    lambda: [
                        i
                        for ns in client.namespaces("by_tag")
                        for i in client.paginate("by_tag", page_size=10_000, namespace=ns).items
                    ]
                )
            finally:
                await runner.cleanup()

        over_http = asyncio.run(read_over_http())
        assert over_http == items
    assert not [e for e in json_logs(res.stderr) if e.get("level") == "error"]


def test_cli_refuses_an_http_address_without_host_and_says_prefer_tally_token(
    tmp_path: Path,
) -> None:
    defs, _ = write_definitions(tmp_path)
    res = subprocess.run(
        [TALLY, "consume", defs, "--data-dir", str(tmp_path / "d"), "--http", ":8750"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        cwd=tmp_path,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "names no host: write 127.0.0.1:8750" in res.stderr and "0.0.0.0:8750" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "d").exists()
    for cmd in (["consume"], ["rebuild"], ["reconcile"]):
        helptext = subprocess.run(
            [TALLY, *cmd, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env=child_env(),
            check=True,
        ).stdout
        assert "TALLY_TOKEN" in helptext and "process list" in " ".join(helptext.split()), cmd
    helptext = subprocess.run(
        [TALLY, "consume", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
        check=True,
    ).stdout
    for flag in (
        "--http-max-connections",
        "--http-idle-timeout",
        "--http-header-timeout",
        "--http-body-timeout",
    ):
        assert flag in helptext


def test_http_guard_settings_come_from_flags_environment_and_file_and_are_checked(
    tmp_path: Path,
) -> None:
    from tally.consumers.cli.settings import load_settings

    env = {
        "TALLY_HTTP_MAX_CONNECTIONS": "12",
        "TALLY_HTTP_IDLE_TIMEOUT": "2.5",
        "TALLY_HTTP_BODY_TIMEOUT": "4",
    }
    toml = tmp_path / "tally.toml"
    toml.write_text("[consume]\nhttp_header_timeout = 3\nhttp_body_timeout = 9\n")
    s = load_settings({"http_idle_timeout": 1.5}, str(toml), env=env)
    assert (
        s.http_max_connections,
        s.http_idle_timeout,
        s.http_header_timeout,
        s.http_body_timeout,
    ) == (12, 1.5, 3.0, 4.0)
    d = ConsumerSettings()
    assert (
        d.http_max_connections,
        d.http_idle_timeout,
        d.http_header_timeout,
        d.http_body_timeout,
    ) == (None, 15.0, 10.0, 30.0)
    for bad in (
        {"TALLY_HTTP_MAX_CONNECTIONS": "0"},
        {"TALLY_HTTP_IDLE_TIMEOUT": "0"},
        {"TALLY_HTTP_HEADER_TIMEOUT": "-1"},
        {"TALLY_HTTP_BODY_TIMEOUT": "soon"},
    ):
        with pytest.raises(ConfigError, match="invalid setting"):
            load_settings({}, str(toml), env=bad)
