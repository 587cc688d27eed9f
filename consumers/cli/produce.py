"""`tally produce`: publish rows or native change events from a JSON Lines or CSV file.

Each input record becomes one native change event (`tally.schemas.events.NativeEvent`)
published through `tally.consumers.producer.ChangeProducer` (idempotent, keyed by
the JSON-encoded row id, so all changes of a row stay in one partition, in
order). Exit codes (`tally.schemas.errors`): 0 done, 2 bad usage or input, 1 Kafka
unreachable or a delivery failed, 130 interrupted. Errors are one line on
stderr (`tally.consumers.cli.errors`), never a traceback.

Input (FILE, or ``-`` for stdin), read by `tally.consumers.rows` — the reader `tally
reconcile` reads snapshot files with, so both read a file alike:

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

Progress goes to stderr (`tally.consumers.cli.progress`: a bar on a terminal, a line
every `progress_interval` seconds otherwise, none with ``--no-progress``). The
final summary goes to stdout. ``--bootstrap-servers``, ``--timeout`` and
``--progress`` are settings (`tally.schemas.config.ProduceSettings`: also
``TALLY_<NAME>`` and the ``[produce]`` section of the TOML file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Final, cast

import msgspec

from tally.consumers.cli.errors import run_command
from tally.consumers.cli.parser import Parser, add_config, add_setting, given_settings
from tally.consumers.cli.progress import Tick, progress
from tally.consumers.cli.settings import load
from tally.consumers.logs import quiet_kafka_logs
from tally.consumers.producer import ChangeProducer, ProduceError
from tally.consumers.rows import Lines, RowError, format_of, infer_value, read_rows
from tally.schemas.config import ProduceSettings
from tally.schemas.errors import InvalidEvent, TallyError, UsageError
from tally.schemas.events import NativeEvent, NativeOp
from tally.schemas.keys import ProduceFormat, encode_event, row_id

__all__ = ["infer_value", "main", "register", "run"]

PROG: Final = "tally produce"

_QUEUE_CHUNKS: Final = 8  # chunks parsed ahead of the publisher (back-pressure on the reader)
_IDLE_SUBMIT_S: Final = 0.05  # source quiet this long: send the partly filled batches
_TOPIC_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,249}\Z")

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
--bootstrap-servers, --timeout and --progress are settings: also TALLY_<NAME>
and the [produce] section (or top level) of the TOML file (--config).
"""


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
    add_setting(p, ProduceSettings, "bootstrap_servers", metavar="HOST:PORT", help="Kafka brokers")
    add_setting(
        p,
        ProduceSettings,
        "timeout",
        type=float,
        metavar="SECONDS",
        help="how long to wait for the broker to answer",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="read and check the input; publish nothing"
    )
    add_setting(
        p,
        ProduceSettings,
        "progress",
        choices=["auto", "bar", "lines", "none"],
        help="progress on stderr: a bar on a terminal, a line every progress_interval "
        "seconds otherwise (auto)",
    )
    p.add_argument(
        "--no-progress",
        action="store_const",
        const="none",
        dest="progress",
        help="no progress display (--progress none)",
    )
    add_config(p)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tally.consumers.cli.produce ...``: the same as ``tally produce ...``."""
    p = Parser(
        prog=PROG,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _configure(p)
    return run_command(PROG, run, p.parse_args(argv))


# -------------------------------------------------------------------- run


def _options(args: argparse.Namespace) -> _Options:
    path: str = args.file
    if not _TOPIC_RE.match(args.topic):
        raise UsageError(
            f"invalid topic name {args.topic!r}: use 1-249 characters from a-z A-Z 0-9 . _ -"
        )
    if args.table is not None and not args.table:
        raise UsageError("--table must not be empty")
    id_fields = tuple(args.id_fields or ("id",))
    if not all(id_fields):
        raise UsageError("--id-field must not be empty")
    if len(set(id_fields)) != len(id_fields):
        raise UsageError(f"--id-field repeats a field: {list(id_fields)}")
    return _Options(
        path=path,
        display="stdin" if path == "-" else path,
        input_format=format_of(path, args.input_format),
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
        # The raw descriptor, not sys.stdin.buffer: the reader thread may still be blocked in a
        # read when the command ends (Ctrl-C), and a read of the buffered object holds its lock,
        # which the interpreter then needs to close stdin ("could not acquire lock ... at
        # interpreter shutdown", abort). A raw read holds none, and returns what is available.
        return io.FileIO(sys.stdin.fileno(), "rb", closefd=False), None
    try:
        stream = open(opts.path, "rb")  # noqa: SIM115 - closed by run()
    except OSError as exc:
        raise UsageError(f"cannot read {opts.path}: {exc.strerror or exc}") from None
    try:
        size = os.fstat(stream.fileno()).st_size
    except OSError:
        size = None
    return stream, size or None


def run(args: argparse.Namespace) -> int:
    """Run ``tally produce``; returns the exit code (errors are raised: `tally.consumers.cli.errors`)."""
    settings = load(ProduceSettings, given_settings(args, ProduceSettings), args.config).settings
    opts = _options(args)
    stream, size = _open(opts)
    try:
        if args.dry_run:
            return _dry_run(opts, stream)
        with quiet_kafka_logs():
            return asyncio.run(_produce(opts, stream, size, settings))
    finally:
        stream.close()  # (stdin's descriptor stays open: closefd=False)


def _dry_run(opts: _Options, stream: IO[bytes]) -> int:
    count = 0
    started = time.perf_counter()
    try:
        for _key_value in _records(opts, Lines(stream)):
            count += 1
    except RowError as exc:
        raise RowError(exc.where, exc.line, f"{exc.problem} (dry run: nothing published)") from None
    elapsed = time.perf_counter() - started
    print(
        f"checked {_events(count)} from {opts.display} in {elapsed:.1f}s: no errors "
        f"(dry run: nothing published to {opts.topic})"
    )
    return 0


# ------------------------------------------------------------------ input


def _records(opts: _Options, lines: Lines) -> Iterator[tuple[bytes, bytes]]:
    """Input lines → encoded ``(key, value)`` records; a `RowError` names a bad line."""
    where = opts.display
    is_csv = opts.input_format == "csv"
    rows = read_rows(
        lines,
        "csv" if is_csv else "jsonl",
        where=where,
        infer=opts.infer,
        required_columns=opts.id_fields,
        column_hint="choose the id column(s) with --id-field",
        expect="a JSON object (a row, or a change event with 'table' and 'op')",
    )
    fmt, id_fields, table, op = opts.format, opts.id_fields, opts.table, opts.op
    convert = msgspec.convert
    for n, obj in rows:
        if not is_csv and "op" in obj and "table" in obj:
            try:
                event = convert(obj, NativeEvent)
            except msgspec.ValidationError as exc:
                raise RowError(where, n, f"not a valid change event: {exc}") from None
        else:
            if table is None:
                raise RowError(
                    where,
                    n,
                    "a row, but no --table was given (give --table, or make the line a change "
                    'event with "table" and "op" keys)',
                )
            try:
                rid = row_id(obj, id_fields)
            except InvalidEvent as exc:
                raise RowError(where, n, f"{exc}; choose the id field(s) with --id-field") from None
            if op == "delete":
                event = NativeEvent(table, "delete", rid)
            else:
                event = NativeEvent(table, op, rid, after=obj)
        try:
            yield encode_event(event, format=fmt, id_field=id_fields)
        except InvalidEvent as exc:
            raise RowError(where, n, str(exc)) from None


# ---------------------------------------------------------------- reader


@dataclass(slots=True)
class _Chunk:
    records: list[tuple[bytes, bytes]]
    pos: int
    error: BaseException | None = None
    end: bool = False


class _Reader:
    """Parses the input in a daemon thread, handing chunks of records to the event loop."""

    def __init__(self, opts: _Options, stream: IO[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._opts = opts
        self._loop = loop
        self.queue: asyncio.Queue[_Chunk] = asyncio.Queue()
        self._slots = threading.Semaphore(_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self._records: list[tuple[bytes, bytes]] = []
        self._lines = Lines(stream, self._hand_over)
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
            for record in _records(self._opts, self._lines):
                self._records.append(record)  # not a bound append: _hand_over swaps the list
            self._hand_over()
            self._put(_Chunk([], self._lines.pos, end=True))
        except _Stopped:
            pass
        except BaseException as exc:  # a bad line, an I/O error, a bug: report it, never hang
            if isinstance(exc, OSError):
                exc = TallyError(
                    f"reading {self._opts.display} failed at line {self._lines.number + 1}: {exc}"
                )
            with contextlib.suppress(_Stopped, RuntimeError):
                self._hand_over()  # the records before the failure
                self._put(_Chunk([], self._lines.pos, error=exc))


class _Stopped(Exception):
    """The event loop side gave up; the reader thread ends."""


def _detail(tick: Tick) -> str:
    events = int(tick.fields.get("events", 0))
    rate = events / tick.elapsed if tick.elapsed > 0 else 0.0
    return f"{events:,} events, {rate:,.0f} events/s"


async def _produce(
    opts: _Options, stream: IO[bytes], size: int | None, settings: ProduceSettings
) -> int:
    producer = ChangeProducer(
        settings.bootstrap_servers, format=opts.format, connect_timeout=settings.timeout
    )
    await producer.start()  # BrokerUnavailable: exit 1, naming --bootstrap-servers
    reader = _Reader(opts, stream, asyncio.get_running_loop())
    pub = producer.bulk(opts.topic, id_field=opts.id_fields)
    started = time.perf_counter()
    error: BaseException | None = None
    shown = progress(
        settings.progress,
        title=f"producing to {opts.topic}",
        total=size,
        detail=_detail,
        interval=settings.progress_interval,
    )
    try:
        with shown as bar:
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
                bar.update(chunk.pos, events=pub.count)
                if chunk.error is not None:
                    error = chunk.error
                    break
                if chunk.end:
                    break
            await pub.close()
    except ProduceError as exc:
        await _stop_quietly(producer)
        raise ProduceError(
            f"publishing to {opts.topic} failed after {pub.acked:,} acked events: {exc}"
        ) from exc
    except InvalidEvent:  # e.g. an event larger than the producer's max request size
        with contextlib.suppress(ProduceError):
            await pub.close()
        await _stop_quietly(producer)
        raise
    except asyncio.CancelledError:  # Ctrl-C: give what was handed over a moment, then go
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_stop_quietly(producer), 5)
        raise
    finally:
        reader.stop()
    await producer.stop()
    elapsed = time.perf_counter() - started
    if isinstance(error, RowError):
        were = "was" if pub.count == 1 else "were"
        raise RowError(
            error.where,
            error.line,
            f"{error.problem} (the {_events(pub.count)} before it {were} published to "
            f"{opts.topic}; re-running after the fix is harmless)",
        )
    if error is not None:
        raise error
    rate = pub.count / elapsed if elapsed > 0 else 0.0
    print(f"produced {_events(pub.count)} to {opts.topic} in {elapsed:.1f}s ({rate:,.0f}/s)")
    return 0


def _events(n: int) -> str:
    return f"{n:,} event" if n == 1 else f"{n:,} events"


async def _stop_quietly(producer: ChangeProducer) -> None:
    with contextlib.suppress(ProduceError):
        await producer.stop()


if __name__ == "__main__":
    sys.exit(main())
