"""The HTTP API's transport guards: a connection cap, timeouts, a file budget, one error shape.

Why: the API runs in the consumer's own process and event loop, and every open
connection is a file descriptor. ~1,100 idle connections (open, sending nothing
or half a request) once used up a 1,024-descriptor limit; RocksDB could not open
its next file and the consumer died. So:

* **A file budget** (`fd_budget`): the open-file limit (``RLIMIT_NOFILE``, whose
  soft value `raise_nofile_limit` lifts to the hard one at start) is split
  between what the consumer itself needs — RocksDB's table files
  (``max_open_files``, set from the budget), RocksDB's own few files, Kafka
  connections, the process — and the HTTP connections, which get only the rest.
* **A connection cap** (``http_max_connections``, default from the budget, at
  most `DEFAULT_MAX_CONNECTIONS`). `LimitedSite` accepts connections itself, one
  at a time, so the count is exact at every moment. A connection over the cap is
  answered ``503`` (our JSON error, ``Connection: close``, ``Retry-After``) and
  closed in the same callback: its descriptor lives for microseconds. Answering
  rather than no longer accepting: a paused accept leaves every client, the
  legitimate ones included, hanging in the kernel's listen queue behind the
  flood with no reason given; a 503 costs nothing more and tells a client why.
* **Timeouts** (`Connection`): idle (keep-alive: no request in flight),
  headers (first byte of a request to the end of its headers: slow-loris),
  body (enforced where handlers read it, `tally.consumers.http.common.read_body`: 408).
* **One error shape**: aiohttp's own answers to malformed requests (a request
  line or header over the size limit, a bad header...) were plain text; they
  are the API's ``{"error": {"code", "message"}}`` envelope too.

Uses aiohttp's `RequestHandler` (subclassed) and two of its internals to see
where a request's headers end (``_request_count``, ``_messages``); the lock file
pins aiohttp and ``tests/test_http_hostile.py`` exercises every guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from tally.consumers.logs import get_logger

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "Connection",
    "ConnectionStats",
    "FdBudget",
    "HttpLimits",
    "LimitedSite",
    "error_body",
    "fd_budget",
    "nofile_limit",
    "raise_nofile_limit",
]

# ---- the file budget ---------------------------------------------------------------------

PROCESS_FDS = 16
"""The process itself: stdio, the event loop's epoll and self-pipe, log files. Measured: 10."""
ROCKSDB_FIXED_FDS = 16
"""RocksDB besides table files: LOCK, LOG, MANIFEST, WAL(s), directory handles (one per
column family and the db), flush/compaction outputs. Measured: 10 on an idle store."""
KAFKA_FDS = 32
"""Broker connections: each aiokafka client (the live stream, every replay stream, the
dead-letter producer, the admin client) holds one per broker it talks to, plus the group
coordinator's. Measured: 5 for one stream on a one-broker cluster."""
ACCEPT_HEADROOM = 8
"""The listening sockets and the one connection being refused at a time."""
ROCKSDB_MIN_FILES, ROCKSDB_MAX_FILES = 32, 1024
"""Bounds on RocksDB's ``max_open_files``: an eighth of the file limit, within these."""
DEFAULT_MAX_CONNECTIONS = 4096
"""Ceiling of the derived connection cap even when files are plentiful: beyond a few
thousand clients the one event loop, shared with the consumer, is the bottleneck, and each
connection costs memory (tens of KiB)."""
MIN_CONNECTIONS = 8
"""Floor of the derived cap: below it the API is useless; a limit this low is warned about."""


def nofile_limit() -> int:
    """The current soft open-file limit (RLIMIT_NOFILE); 1024 where it cannot be read."""
    if resource is None:  # pragma: no cover
        return 1024
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_nofile_limit() -> tuple[int, int]:
    """Lift the soft open-file limit to the hard one (an unprivileged process may);
    returns (before, after). More room for RocksDB and clients, at no cost: the kernel
    allocates descriptor tables lazily."""
    if resource is None:  # pragma: no cover
        return 1024, 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):  # e.g. macOS caps below the hard value
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft, nofile_limit()


@dataclass(frozen=True)
class FdBudget:
    """How a process's open-file limit is shared (see the module notes)."""

    nofile: int
    """The open-file limit."""
    rocksdb_files: int
    """RocksDB's ``max_open_files`` (table files kept open)."""
    reserved: int
    """Descriptors kept for the consumer itself (RocksDB, Kafka, the process, accepts)."""
    http: int
    """What is left for HTTP connections (may be < 1: the limit is too low)."""

    @property
    def max_connections(self) -> int:
        """The default connection cap."""
        return max(MIN_CONNECTIONS, min(DEFAULT_MAX_CONNECTIONS, self.http))


def fd_budget(nofile: int | None = None, rocksdb_files: int | None = None) -> FdBudget:
    """Share ``nofile`` (default: the current limit). ``rocksdb_files``: RocksDB's
    ``max_open_files`` when already known (a value < 1 = unbounded: counted as an eighth)."""
    n = nofile_limit() if nofile is None else nofile
    rocks = rocksdb_files if rocksdb_files is not None and rocksdb_files > 0 else None
    if rocks is None:
        rocks = max(ROCKSDB_MIN_FILES, min(ROCKSDB_MAX_FILES, n // 8))
    reserved = PROCESS_FDS + ROCKSDB_FIXED_FDS + KAFKA_FDS + ACCEPT_HEADROOM + rocks
    return FdBudget(n, rocks, reserved, n - reserved)


# ---- limits and counters ---------------------------------------------------------------------


@dataclass(frozen=True)
class HttpLimits:
    """The resolved guards of one server (from `ConsumerSettings`)."""

    max_connections: int
    idle_timeout: float
    header_timeout: float
    body_timeout: float
    budget: FdBudget | None = None
    """The process's file budget (the cap's default), when known."""

    @property
    def over_budget(self) -> bool:
        """The cap exceeds what the file limit leaves: clients could starve RocksDB."""
        return self.budget is not None and self.max_connections > self.budget.http

    @classmethod
    def from_settings(cls, settings: Any, rocksdb_files: int | None = None) -> HttpLimits:
        budget = fd_budget(rocksdb_files=rocksdb_files)
        cap = settings.http_max_connections
        return cls(
            budget.max_connections if cap is None else int(cap),
            float(settings.http_idle_timeout),
            float(settings.http_header_timeout),
            float(settings.http_body_timeout),
            budget,
        )


@dataclass
class ConnectionStats:
    """Counters of the transport guards (reported in /metrics)."""

    open: int = 0
    accepted: int = 0
    refused: int = 0
    timeouts: dict[str, int] = field(default_factory=lambda: {"headers": 0, "body": 0})
    _last_refusal_log: float = 0.0
    _refused_since_log: int = 0


# ---- the error envelope, for answers aiohttp makes itself -------------------------------------

_json = msgspec.json.Encoder()


def error_body(code: str, message: str) -> bytes:
    """The API's error envelope as JSON bytes."""
    return _json.encode({"error": {"code": code, "message": message}})


def _raw_response(status: int, reason: str, body: bytes, extra: str = "") -> bytes:
    """A complete HTTP/1.1 response that closes the connection (written to a bare socket)."""
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("ascii") + body


def _parse_error_message(exc: BaseException | None, limits: tuple[int, int]) -> tuple[str, str]:
    """(code, message) for a request aiohttp's parser rejected."""
    if isinstance(exc, LineTooLong):
        return (
            "request_too_large",
            f"the request line or a header is over {max(limits)} bytes: send long read arguments "
            "as a JSON body with POST instead of GET query parameters",
        )
    detail = exc.message if isinstance(exc, HttpProcessingError) and exc.message else str(exc or "")
    return (
        "bad_http",
        f"malformed HTTP request ({detail or 'unparseable'}): send HTTP/1.1 with a Host header",
    )


# ---- one connection ------------------------------------------------------------------------


class Connection(RequestHandler):
    """aiohttp's connection handler, plus the header timeout and our error envelope.

    * Idle: aiohttp's keep-alive timer (``keepalive_timeout`` = the idle timeout)
      closes a connection with no request in flight, from accept or from the end
      of the last response. It stops at a request's first byte.
    * Headers: from a request's first byte, its headers must be complete within
      the header timeout, or the connection is answered 408 and closed.
    * Body: `tally.consumers.http.common.read_body` bounds the wait for a body a handler
      reads; a body nobody reads is drained for at most `LINGER` s after the answer.
    """

    LINGER = 2.0
    """Seconds aiohttp keeps reading an unread request body after answering, so the client
    sees the answer before the close (aiohttp's default is 10)."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        limits: HttpLimits,
        stats: ConnectionStats,
        release: Callable[[Connection], None],
    ) -> None:
        self._limits = limits
        self._stats = stats
        self._release = release
        self._released = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=limits.idle_timeout,
            lingering_time=self.LINGER,
            access_log=None,  # type: ignore[arg-type]
        )

    def release(self) -> None:
        """Give the connection's slot back (once)."""
        if not self._released:
            self._released = True
            self._release(self)

    def data_received(self, data: bytes) -> None:
        if data and self._header_timer is None and (self._body is None or self._body.is_eof()):
            # The first bytes of a request: the idle timer stops, the header timer starts.
            self.keep_alive(True)
            self._header_timer = self._loop.call_later(
                self._limits.header_timeout, self._headers_late
            )
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:  # headers complete (or rejected) for a new request
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if self._messages:
                self._body = self._messages[-1][1]

    def _headers_late(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if getattr(self, "_request_in_progress", False):
            # A pipelined request's headers are late while the one before it is still being
            # answered: let that answer finish, then judge again.
            self._header_timer = self._loop.call_later(
                self._limits.header_timeout, self._headers_late
            )
            return
        self._stats.timeouts["headers"] += 1
        peer = self.peername
        get_logger(component="http").info(
            "http headers timed out",
            peer=f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer),
            timeout=self._limits.header_timeout,
        )
        transport.write(
            _raw_response(
                408,
                "Request Timeout",
                error_body(
                    "request_timeout",
                    f"the request's headers did not arrive within {self._limits.header_timeout:g} s "
                    "(http_header_timeout): send the whole request at once",
                ),
            )
        )
        self._linger_close(transport)

    def _linger_close(self, transport: asyncio.Transport) -> None:
        """Close after an answer to a client that may still be sending: half-close first.

        Closing a socket with unread input makes the kernel send a reset, which can destroy
        the answer before the client reads it (seen under load as ECONNRESET instead of the
        408). So: FIN after the answer, discard what still arrives (``_force_close``), and
        close when the client does or after `LINGER_SECONDS`."""
        self._force_close = True
        if self._waiter:
            self._waiter.cancel()
        self.transport = None
        if transport.can_write_eof():
            transport.write_eof()
            self._loop.call_later(LINGER_SECONDS, transport.close)
        else:
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._body = None
        try:
            super().connection_lost(exc)
        finally:
            self.release()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's own error answers, in the API's envelope (it always closes the connection)."""
        if request.writer.output_size > 0:
            raise ConnectionError(
                "Response is sent already, cannot send another response with the error message"
            )
        log = get_logger(component="http")
        if status >= 500:
            log.error(
                "http request failed in the server", status=status, error=repr(exc), exc_info=exc
            )
            code, text = (
                "internal",
                f"the server failed answering this request ({type(exc).__name__}); it was logged",
            )
        else:
            code, text = _parse_error_message(exc, (self.max_line_size, self.max_field_size))
            log.debug("http request rejected", status=status, error=str(exc))
        resp = web.Response(
            body=error_body(code, text), status=status, content_type="application/json"
        )
        resp.force_close()
        return resp


# ---- the listening side --------------------------------------------------------------------

LINGER_SECONDS = 2.0
"""How long a connection cut off mid-request may still send (discarded) before it is closed."""
ACCEPT_BATCH = 64
"""Connections accepted per readiness event, so an accept flood cannot hog the loop."""
EMFILE_PAUSE = 1.0
"""Seconds accepts pause when the process is out of descriptors anyway (it should never be)."""
REFUSAL_LOG_EVERY = 10.0
"""Seconds between warnings about refused connections (their count is in /metrics)."""


class _Listener:
    """Listening sockets, accepted by hand with an exact connection count.

    Quacks like the `asyncio.Server` aiohttp's runner expects of a site (``sockets``,
    ``close()``).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        server: web.Server,
        limits: HttpLimits,
        stats: ConnectionStats,
    ) -> None:
        self._loop = loop
        self.sockets = sockets
        self._server = server
        self._limits = limits
        self._stats = stats
        self._conns: set[Connection] = set()
        self._pending = 0
        self._closed = False
        self._busy = _raw_response(
            503,
            "Service Unavailable",
            error_body(
                "too_many_connections",
                f"the server holds its limit of {limits.max_connections} open connections "
                "(http_max_connections): retry shortly, and reuse connections",
            ),
            "Retry-After: 1\r\n",
        )
        self._log = get_logger(component="http")
        for s in sockets:
            loop.add_reader(s.fileno(), self._accept, s)

    @property
    def open(self) -> int:
        return len(self._conns) + self._pending

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._log.warning(
                        "cannot accept http connections",
                        error=e.strerror,
                        open=self.open,
                        hint="the process is out of descriptors: lower http_max_connections",
                    )
                    self._loop.remove_reader(sock.fileno())
                    self._loop.call_later(EMFILE_PAUSE, self._resume, sock)
                    return
                raise
            if self.open >= self._limits.max_connections:
                self._refuse(conn)
                continue
            self._start(conn)

    def _resume(self, sock: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _refuse(self, conn: socket.socket) -> None:
        try:
            conn.setblocking(False)
            # Read what already arrived, so the close is a FIN after the answer, not a reset
            # that could make the client drop the answer unread.
            with contextlib.suppress(OSError):
                conn.recv(1 << 16)
            with contextlib.suppress(OSError):
                conn.send(self._busy)
        finally:
            conn.close()
        st = self._stats
        st.refused += 1
        st._refused_since_log += 1
        now = time.monotonic()
        if now - st._last_refusal_log >= REFUSAL_LOG_EVERY:
            self._log.warning(
                "http connections refused",
                refused=st._refused_since_log,
                limit=self._limits.max_connections,
                hint="at the connection limit: answered 503 and closed (see http_max_connections)",
            )
            st._last_refusal_log = now
            st._refused_since_log = 0

    def _start(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        self._pending += 1
        self._stats.accepted += 1
        made: list[Connection] = []

        def factory() -> Connection:
            self._pending -= 1
            c = Connection(
                self._server,
                loop=self._loop,
                limits=self._limits,
                stats=self._stats,
                release=self._gone,
            )
            self._conns.add(c)
            self._stats.open = self.open
            made.append(c)
            return c

        def done(task: asyncio.Task[Any]) -> None:
            if task.cancelled() or task.exception() is not None:
                if made:
                    made[0].release()
                else:
                    self._pending -= 1
                    self._stats.open = self.open
                with contextlib.suppress(OSError):
                    conn.close()

        task = self._loop.create_task(self._loop.connect_accepted_socket(factory, conn))
        task.add_done_callback(done)

    def _gone(self, c: Connection) -> None:
        self._conns.discard(c)
        self._stats.open = self.open

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self.sockets:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(s.fileno())
            s.close()


def _bind(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets for every address of ``host`` (as asyncio's create_server binds)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    out: list[socket.socket] = []
    seen: set[tuple[Any, ...]] = set()
    try:
        for family, kind, proto, _name, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            s = socket.socket(family, kind, proto)
            out.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(backlog)
            s.setblocking(False)
    except BaseException:
        for s in out:
            s.close()
        raise
    return out


class LimitedSite(web.BaseSite):
    """A TCP site whose connections are capped and timed (see the module notes)."""

    BACKLOG = 128

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        limits: HttpLimits,
        stats: ConnectionStats,
    ) -> None:
        super().__init__(runner, backlog=self.BACKLOG)
        self._host = host
        self._port = port
        self._limits = limits
        self._stats = stats

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        sockets = _bind(self._host, self._port, self._backlog)
        self._server = _Listener(loop, sockets, server, self._limits, self._stats)  # type: ignore[assignment]
