"""`tally produce`: publish rows or native change events from a JSON Lines or CSV file.

Each input record becomes one native change event (`schemas.events.NativeEvent`)
published through `consumers.producer.ChangeProducer` (idempotent, keyed by
the JSON-encoded row id, so all changes of a row stay in one partition, in
order). Exit codes: 0 done, 2 bad usage or input, 1 Kafka failure, 130
interrupted. Errors are one line on stderr, never a traceback.

Input (FILE, or ``-`` for stdin):

* **JSON Lines** (``.jsonl``, ``.ndjson``, ``.json``; stdin by default): one
  JSON object per line; blank lines are skipped. An object with both a
  ``table`` and an ``op`` key is a full native change event, published as is
  (its id is read from its row image through ``--id-field`` when it has
  none). Any other object is a row of ``--table``, published as ``--op``
  (insert by default; ``delete`` publishes a delete of the row's id).
* **CSV** (``.csv``): a header line of column names, then one row per line
  (RFC 4180 quoting; quoted fields may span lines). Rows only. Unless
  ``--no-infer``, a field that is a JSON number (``-?(0|[1-9][0-9]*)``, then
  optionally ``.digits`` and/or an exponent; no ``+``, no leading zeros, so
  ``007`` and ``+1`` stay strings) becomes an int — or a float when it has a
  fraction or an exponent — and an empty field becomes null. Everything else
  stays a string (``true``, ``NaN``, ``1,5`` …). Numbers too large for a
  finite float stay strings.

The input is read in a background thread (whatever is available, so a slow
pipe's lines are published within ~50 ms) while the event loop publishes
whole record batches. On an input error the events before the bad line are
still published (re-running after the fix is harmless: tally applies changes
idempotently by id); ``--dry-run`` checks a file without publishing.

Progress (on a tty, to stderr): `rich` when installed, else `tqdm`, else a
one-line counter. The final summary goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import csv
import io
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Protocol, cast

import msgspec

from consumers.producer import (
    DEFAULT_BOOTSTRAP_SERVERS,
    DEFAULT_CONNECT_TIMEOUT,
    BrokerUnavailable,
    ChangeProducer,
    ProduceError,
)
from consumers.rows import infer_value
from schemas.errors import InvalidEvent
from schemas.events import NativeEvent, NativeOp
from schemas.keys import ProduceFormat, encode_event, row_id

__all__ = ["infer_value", "main", "register", "run"]

PROG: Final = "tally produce"
ENV_BOOTSTRAP: Final = "TALLY_BOOTSTRAP_SERVERS"
EXIT_OK: Final = 0
EXIT_KAFKA: Final = 1
EXIT_USAGE: Final = 2
EXIT_INTERRUPTED: Final = 130

_READ_SIZE: Final = 256 * 1024  # bytes per read: one hand-over to the event loop at most
_QUEUE_CHUNKS: Final = 8  # chunks parsed ahead of the publisher (back-pressure on the reader)
_IDLE_SUBMIT_S: Final = 0.05  # source quiet this long: send the partly filled batches
_PROGRESS_INTERVAL_S: Final = 0.1
_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")
_JSON_EXTENSIONS: Final = (".jsonl", ".ndjson", ".json")
_CSV_EXTENSIONS: Final = (".csv",)

DESCRIPTION: Final = """\
Publish rows or native change events to a Kafka topic, for tally consumers.

FILE is JSON Lines (one object per line) or CSV with a header line, chosen by
its extension (.jsonl/.ndjson/.json, .csv) or --input-format; `-` reads JSON
Lines from stdin. A JSON object with both "table" and "op" keys is a full
native change event ({"table": "scores", "op": "delete", "id": 7}) and is
published as is; any other object, and every CSV row, is a row of --table
published as --op. The Kafka key is the JSON-encoded row id (--id-field,
repeat it for a composite id), so all changes of a row stay in one partition,
in order.

CSV values: unless --no-infer, a field that is a JSON number becomes an int
(or a float with a fraction/exponent) and an empty field becomes null; "007",
"+1", "true" and the rest stay strings.
"""

EPILOG: Final = """\
examples:
  tally produce --table scores --topic scores scores.jsonl
  tally produce --table scores --topic scores --id-field player --id-field season scores.csv
  tally produce --table scores --topic scores --op delete removed.jsonl
  my-exporter | tally produce --table scores --topic scores -
  tally produce --table scores --topic scores --dry-run scores.csv   # check only

exit status: 0 done, 2 bad usage or input (the message names the line),
1 Kafka unreachable or a delivery failed, 130 interrupted.
The broker address also reads $TALLY_BOOTSTRAP_SERVERS.
"""


class _UsageError(Exception):
    """A problem with the command line or the input: exit 2."""


@dataclass(frozen=True, slots=True)
class _Options:
    path: str
    display: str
    input_format: str
    table: str | None
    topic: str
    id_fields: tuple[str, ...]
    op: NativeOp
    format: ProduceFormat
    infer: bool


# ------------------------------------------------------------------ parser


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "file", metavar="FILE", help="JSON Lines or CSV file; `-` for JSON Lines on stdin"
    )
    p.add_argument("--topic", required=True, help="Kafka topic to publish to")
    p.add_argument(
        "--table",
        help="table the rows belong to (needed for rows; change events name their own table)",
    )
    p.add_argument(
        "--id-field",
        action="append",
        dest="id_fields",
        metavar="FIELD",
        help="row field holding the id (default id); repeat for a composite id, in order",
    )
    p.add_argument(
        "--op",
        choices=["insert", "update", "delete"],
        default="insert",
        help="event published for each row (default insert; consumers upsert inserts and updates alike)",
    )
    p.add_argument(
        "--format",
        choices=["json", "msgpack"],
        default="json",
        help="encoding of the event values (default json; keys are always JSON)",
    )
    p.add_argument(
        "--input-format",
        choices=["jsonl", "csv"],
        help="input format (default: from FILE's extension; jsonl for stdin)",
    )
    p.add_argument("--no-infer", action="store_true", help="CSV: keep every value a string")
    p.add_argument(
        "--bootstrap-servers",
        metavar="HOST:PORT",
        help=f"Kafka brokers (default ${ENV_BOOTSTRAP}, else {DEFAULT_BOOTSTRAP_SERVERS})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_CONNECT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to wait for the broker to answer (default {DEFAULT_CONNECT_TIMEOUT:g})",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="read and check the input; publish nothing"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress display, even on a tty")
    p.set_defaults(func=run)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``produce`` subcommand to the `tally` CLI."""
    p = subparsers.add_parser(
        "produce",
        help="publish rows or change events from a JSON Lines / CSV file to Kafka",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)


def main(argv: list[str] | None = None) -> int:
    """``python -m consumers.cli.produce ...``: the same as ``tally produce ...``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    return run(p.parse_args(argv))


# -------------------------------------------------------------------- run


def _fail(message: str, code: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _options(args: argparse.Namespace) -> _Options:
    path: str = args.file
    if not _TOPIC_RE.match(args.topic):
        raise _UsageError(
            f"invalid topic name {args.topic!r}: use 1-249 characters from a-z A-Z 0-9 . _ -"
        )
    if args.table is not None and not args.table:
        raise _UsageError("--table must not be empty")
    id_fields = tuple(args.id_fields or ("id",))
    if not all(id_fields):
        raise _UsageError("--id-field must not be empty")
    if len(set(id_fields)) != len(id_fields):
        raise _UsageError(f"--id-field repeats a field: {list(id_fields)}")
    if args.timeout <= 0:
        raise _UsageError(f"--timeout must be positive, got {args.timeout:g}")
    input_format = args.input_format
    if input_format is None:
        suffix = Path(path).suffix.lower()
        if path == "-" or suffix in _JSON_EXTENSIONS:
            input_format = "jsonl"
        elif suffix in _CSV_EXTENSIONS:
            input_format = "csv"
        else:
            raise _UsageError(
                f"cannot tell the format of {path!r} from its extension; "
                "pass --input-format jsonl or --input-format csv"
            )
    return _Options(
        path=path,
        display="stdin" if path == "-" else path,
        input_format=input_format,
        table=args.table,
        topic=args.topic,
        id_fields=id_fields,
        op=cast(NativeOp, args.op),
        format=args.format,
        infer=not args.no_infer,
    )


def _open(opts: _Options) -> tuple[IO[bytes], int | None]:
    """The input as a binary stream, and its size when known (for progress)."""
    if opts.path == "-":
        return sys.stdin.buffer, None
    try:
        stream = open(opts.path, "rb")  # noqa: SIM115 - closed by run()
    except OSError as exc:
        raise _UsageError(f"cannot read {opts.path}: {exc.strerror or exc}") from None
    try:
        size = os.fstat(stream.fileno()).st_size
    except OSError:
        size = None
    return stream, size or None


def run(args: argparse.Namespace) -> int:
    """Run ``tally produce``; returns the exit code."""
    try:
        opts = _options(args)
        stream, size = _open(opts)
    except _UsageError as exc:
        return _fail(str(exc), EXIT_USAGE)
    servers = args.bootstrap_servers or os.environ.get(ENV_BOOTSTRAP) or DEFAULT_BOOTSTRAP_SERVERS
    show = not args.no_progress and sys.stderr.isatty()
    try:
        if args.dry_run:
            return _dry_run(opts, stream)
        with _quiet_kafka_logs():
            return asyncio.run(_produce(opts, stream, size, servers, args.timeout, show))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


@contextlib.contextmanager
def _quiet_kafka_logs() -> Iterator[None]:
    """aiokafka logs every failed connection attempt; the command reports failures itself."""
    logger = logging.getLogger("aiokafka")
    if logger.level != logging.NOTSET:  # the process configured it: leave it alone
        yield
        return
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(logging.NOTSET)


def _dry_run(opts: _Options, stream: IO[bytes]) -> int:
    count = 0
    started = time.perf_counter()
    parser = _RecordParser(opts)
    try:
        for _key_value in parser.records(_Lines(stream, lambda: None)):
            count += 1
    except _InputError as exc:
        return _fail(f"{exc} (dry run: nothing published)", EXIT_USAGE)
    elapsed = time.perf_counter() - started
    print(
        f"checked {_events(count)} from {opts.display} in {elapsed:.1f}s: no errors "
        f"(dry run: nothing published to {opts.topic})"
    )
    return EXIT_OK


# ------------------------------------------------------------------ input


class _InputError(Exception):
    """A bad input record; the message names the file and line."""


class _Lines:
    """The lines of a binary stream (with their ``\\n``), read with ``read1``.

    ``read1`` returns whatever is available, so a slow pipe's lines are seen as
    they arrive; `before_read` runs before every read that may block (the
    reader hands its parsed records over there). `number` is the number of
    the last line yielded, `pos` the bytes consumed.
    """

    def __init__(self, stream: IO[bytes], before_read: Callable[[], None]) -> None:
        self._stream = stream
        self._before_read = before_read
        self.number = 0
        self.pos = 0

    def __iter__(self) -> Iterator[bytes]:
        stream = self._stream
        read: Callable[[int], bytes] = getattr(stream, "read1", stream.read)
        tail = b""
        while True:
            self._before_read()
            data = read(_READ_SIZE)
            if not data:
                break
            if tail:
                data = tail + data
            end = data.rfind(b"\n") + 1
            if not end:
                tail = data
                continue
            tail = data[end:]
            for line in io.BytesIO(data[:end]):
                self.number += 1
                self.pos += len(line)
                yield line
        if tail:
            self.number += 1
            self.pos += len(tail)
            yield tail


def _not_utf8(raw: bytes) -> str | None:
    """What is wrong with a line that is not UTF-8 (the bad byte and where), or None.

    Checked by tally itself rather than left to the JSON decoder, whose wording for it
    changes between msgspec releases.
    """
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            f"not UTF-8 text ({exc.reason} 0x{raw[exc.start]:02x} at byte {exc.start + 1} of "
            "the line); convert the file to UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"
        )
    return None


class _RecordParser:
    """Input lines → encoded ``(key, value)`` records; raises `_InputError` naming the line."""

    def __init__(self, opts: _Options) -> None:
        self._opts = opts
        self._where = opts.display
        self._json = msgspec.json.Decoder()

    def _error(self, line: int, message: str) -> _InputError:
        return _InputError(f"{self._where} line {line}: {message}")

    def _row_event(self, line: int, row: dict[str, Any]) -> NativeEvent:
        opts = self._opts
        if opts.table is None:
            raise self._error(
                line,
                "a row, but no --table was given (give --table, or make the line a change event "
                'with "table" and "op" keys)',
            )
        try:
            rid = row_id(row, opts.id_fields)
        except InvalidEvent as exc:
            raise self._error(line, f"{exc}; choose the id field(s) with --id-field") from None
        if opts.op == "delete":
            return NativeEvent(opts.table, "delete", rid)
        return NativeEvent(opts.table, opts.op, rid, after=row)

    def _encode(self, line: int, event: NativeEvent) -> tuple[bytes, bytes]:
        try:
            return encode_event(event, format=self._opts.format, id_field=self._opts.id_fields)
        except InvalidEvent as exc:
            raise self._error(line, str(exc)) from None

    def records(self, lines: _Lines) -> Iterator[tuple[bytes, bytes]]:
        if self._opts.input_format == "csv":
            return self._csv(lines)
        return self._jsonl(lines)

    def _jsonl(self, lines: _Lines) -> Iterator[tuple[bytes, bytes]]:
        decode = self._json.decode
        for raw in lines:
            n = lines.number
            if not raw.isascii() and (problem := _not_utf8(raw)) is not None:
                raise self._error(n, problem)
            try:
                obj = decode(raw)
            except msgspec.DecodeError as exc:
                if not raw.strip():
                    continue  # a blank line
                hint = ""
                if n == 1 and raw.strip() == b"[":
                    hint = " (a JSON array file? convert it to JSON Lines: jq -c '.[]' FILE)"
                raise self._error(n, f"invalid JSON: {exc}{hint}") from None
            if obj.__class__ is not dict:
                kind = "an array" if isinstance(obj, list) else f"a {type(obj).__name__}"
                if obj is None:
                    kind = "null"
                raise self._error(
                    n,
                    f"expected a JSON object (a row, or a change event with 'table' and 'op'), got {kind}",
                )
            if "op" in obj and "table" in obj:
                try:
                    event = msgspec.convert(obj, NativeEvent)
                except msgspec.ValidationError as exc:
                    raise self._error(n, f"not a valid change event: {exc}") from None
            else:
                event = self._row_event(n, obj)
            yield self._encode(n, event)

    def _csv(self, lines: _Lines) -> Iterator[tuple[bytes, bytes]]:
        text = self._text_lines(lines)
        reader = csv.reader(text, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise self._error(1, "empty CSV file: expected a header line of column names") from None
        except csv.Error as exc:
            raise self._error(1, f"bad CSV: {exc}") from None
        if not header or not all(header):
            raise self._error(1, f"the CSV header has an empty column name: {header}")
        dupes = sorted({h for h in header if header.count(h) > 1})
        if dupes:
            raise self._error(1, f"the CSV header repeats column(s) {dupes}")
        absent = [f for f in self._opts.id_fields if f not in header]
        if absent:
            raise self._error(
                1,
                f"the CSV header has no id column {absent} (columns: {', '.join(header[:12])}"
                f"{', …' if len(header) > 12 else ''}); choose the id column(s) with --id-field",
            )
        width = len(header)
        infer = infer_value if self._opts.infer else None
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise self._error(lines.number, f"bad CSV: {exc}") from None
            if not fields:
                continue  # a blank line
            n = lines.number
            if len(fields) != width:
                raise self._error(n, f"{len(fields)} fields, but the header has {width} columns")
            if infer is not None:
                row = dict(zip(header, map(infer, fields), strict=True))
            else:
                row = dict(zip(header, fields, strict=True))
            yield self._encode(n, self._row_event(n, row))

    def _text_lines(self, lines: _Lines) -> Iterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8-sig")()
        for raw in lines:
            try:
                yield decoder.decode(raw)
            except UnicodeDecodeError as exc:
                problem = _not_utf8(raw) or f"not UTF-8 text ({exc.reason})"
                raise self._error(lines.number, problem) from None


# ---------------------------------------------------------------- reader


@dataclass(slots=True)
class _Chunk:
    records: list[tuple[bytes, bytes]]
    pos: int
    error: _InputError | None = None
    end: bool = False


class _Reader:
    """Parses the input in a daemon thread, handing chunks of records to the event loop."""

    def __init__(self, opts: _Options, stream: IO[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._parser = _RecordParser(opts)
        self._stream = stream
        self._loop = loop
        self.queue: asyncio.Queue[_Chunk] = asyncio.Queue()
        self._slots = threading.Semaphore(_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._records: list[tuple[bytes, bytes]] = []
        self._lines = _Lines(stream, self._hand_over)
        self._thread = threading.Thread(target=self._run, name="tally-produce-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def consumed(self) -> None:
        """The loop took a chunk off the queue: the reader may parse another one."""
        self._slots.release()

    def _put(self, chunk: _Chunk) -> None:
        while not self._slots.acquire(timeout=0.2):
            if self._stop.is_set():
                raise _Stopped
        self._loop.call_soon_threadsafe(self.queue.put_nowait, chunk)

    def _hand_over(self) -> None:
        if self._stop.is_set():
            raise _Stopped
        if self._records:
            records, self._records = self._records, []
            self._put(_Chunk(records, self._lines.pos))

    def _run(self) -> None:
        try:
            for record in self._parser.records(self._lines):
                self._records.append(record)  # not a bound append: _hand_over swaps the list
            self._hand_over()
            self._put(_Chunk([], self._lines.pos, end=True))
        except _Stopped:
            pass
        except _InputError as exc:
            with contextlib.suppress(_Stopped):
                self._hand_over()  # the records before the bad line
                self._put(_Chunk([], self._lines.pos, error=exc))
        except BaseException as exc:  # an I/O error, a bug: report it, do not hang the loop
            error = _InputError(f"reading {self._parser._where} (line {self._lines.number}): {exc}")
            with contextlib.suppress(_Stopped, RuntimeError):
                self._hand_over()
                self._put(_Chunk([], self._lines.pos, error=error))


class _Stopped(Exception):
    """The event loop side gave up; the reader thread ends."""


async def _produce(
    opts: _Options, stream: IO[bytes], size: int | None, servers: str, timeout: float, show: bool
) -> int:
    producer = ChangeProducer(servers, format=opts.format, connect_timeout=timeout)
    try:
        await producer.start()
    except BrokerUnavailable as exc:
        return _fail(f"{exc}; another address: --bootstrap-servers or ${ENV_BOOTSTRAP}", EXIT_KAFKA)
    reader = _Reader(opts, stream, asyncio.get_running_loop())
    progress = _make_progress(show, size, opts.topic)
    pub = producer.bulk(opts.topic, id_field=opts.id_fields)
    started = time.perf_counter()
    error: _InputError | None = None
    try:
        reader.start()
        queue = reader.queue
        while True:
            if queue.empty() and pub.pending:
                try:
                    chunk = await asyncio.wait_for(queue.get(), _IDLE_SUBMIT_S)
                except TimeoutError:
                    await pub.submit()  # the source is quiet: send what we have
                    continue
            else:
                chunk = await queue.get()
            reader.consumed()
            add = pub.add_encoded
            for key, value in chunk.records:
                await add(key, value)
            progress.update(pub.count, chunk.pos)
            if chunk.error is not None:
                error = chunk.error
                break
            if chunk.end:
                break
        await pub.close()
    except ProduceError as exc:
        progress.close()
        await _stop_quietly(producer)
        return _fail(
            f"publishing to {opts.topic} failed after {pub.acked:,} acked events: {exc}", EXIT_KAFKA
        )
    except InvalidEvent as exc:  # e.g. an event larger than the producer's max request size
        progress.close()
        with contextlib.suppress(ProduceError):
            await pub.close()
        await _stop_quietly(producer)
        return _fail(str(exc), EXIT_USAGE)
    except asyncio.CancelledError:  # Ctrl-C: give what was handed over a moment, then go
        progress.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_stop_quietly(producer), 5)
        raise
    finally:
        reader.stop()
    progress.close()
    try:
        await producer.stop()
    except ProduceError as exc:
        return _fail(str(exc), EXIT_KAFKA)
    elapsed = time.perf_counter() - started
    if error is not None:
        return _fail(
            f"{error} (the {_events(pub.count)} before it {'was' if pub.count == 1 else 'were'} "
            f"published to {opts.topic}; re-running after the fix is harmless)",
            EXIT_USAGE,
        )
    rate = pub.count / elapsed if elapsed > 0 else 0.0
    print(f"produced {_events(pub.count)} to {opts.topic} in {elapsed:.1f}s ({rate:,.0f}/s)")
    return EXIT_OK


def _events(n: int) -> str:
    return f"{n:,} event" if n == 1 else f"{n:,} events"


async def _stop_quietly(producer: ChangeProducer) -> None:
    with contextlib.suppress(ProduceError):
        await producer.stop()


# --------------------------------------------------------------- progress


class _Progress(Protocol):
    def update(self, events: int, pos: int) -> None: ...
    def close(self) -> None: ...


class _NoProgress:
    def update(self, events: int, pos: int) -> None:
        pass

    def close(self) -> None:
        pass


class _CounterProgress:
    """A one-line ``\\r`` counter on stderr (no rich, no tqdm)."""

    def __init__(self, total: int | None, topic: str) -> None:
        self._total = total
        self._topic = topic
        self._last = 0.0
        self._width = 0

    def update(self, events: int, pos: int) -> None:
        now = time.monotonic()
        if now - self._last < _PROGRESS_INTERVAL_S:
            return
        self._last = now
        text = f"producing to {self._topic}: {events:,} events"
        if self._total:
            text += f" ({min(100.0, 100.0 * pos / self._total):.0f}%)"
        self._width = max(self._width, len(text))
        sys.stderr.write("\r" + text.ljust(self._width))
        sys.stderr.flush()

    def close(self) -> None:
        if self._width:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()
            self._width = 0


class _RichProgress:
    def __init__(self, total: int | None, topic: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn(f"producing to {topic}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[events]:,} events"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._progress.start()
        self._task = self._progress.add_task("produce", total=total, events=0)

    def update(self, events: int, pos: int) -> None:
        self._progress.update(self._task, completed=pos, events=events)

    def close(self) -> None:
        self._progress.stop()


class _TqdmProgress:
    def __init__(self, total: int | None, topic: str) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"producing to {topic}",
            file=sys.stderr,
            leave=False,
        )
        self._pos = 0

    def update(self, events: int, pos: int) -> None:
        self._bar.set_postfix_str(f"{events:,} events", refresh=False)
        self._bar.update(pos - self._pos)
        self._pos = pos

    def close(self) -> None:
        self._bar.close()


def _make_progress(show: bool, total: int | None, topic: str) -> _Progress:
    if not show:
        return _NoProgress()
    for kind in (_RichProgress, _TqdmProgress):
        try:
            return kind(total, topic)
        except ImportError:
            continue
    return _CounterProgress(total, topic)


if __name__ == "__main__":
    sys.exit(main())
