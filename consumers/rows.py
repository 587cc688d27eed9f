"""The one reader of JSON Lines and CSV rows: what `tally produce` publishes and what
`tally reconcile` compares a snapshot file with.

Both commands must read a file the same way, or a file produced and then reconciled
would differ from itself. The rules are strict, and every error names the line:

* the input is UTF-8 (a CSV file may start with a byte-order mark); a line that is not
  says which byte is wrong and how to convert the file;
* **JSON Lines**: one JSON object per line (msgspec's decoder: ``NaN``, ``Infinity`` and
  numbers beyond a float's range are refused, not read as special floats); blank lines
  are skipped;
* **CSV**: a header line of distinct, non-empty column names, then rows with exactly as
  many fields (RFC 4180 quoting, fields may span lines; blank lines are skipped). A cell
  that is a JSON number becomes an int or a (finite) float, an empty cell None, anything
  else stays the string (``true``, ``NaN``, ``007`` and ``1e400`` included), unless
  ``infer=False`` keeps every cell a string (`infer_value`).

`Lines` reads with ``read1`` (whatever is available, so a slow pipe's lines are seen as
they arrive) and calls a hook before every read that may block: `tally produce` hands its
parsed records over there while its reader thread parses big files chunk by chunk.
"""

from __future__ import annotations

import codecs
import csv
import io
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Final, Literal

import msgspec

from tally.schemas.errors import InputError, UsageError

__all__ = ["READ_SIZE", "Lines", "RowError", "RowFormat", "format_of", "infer_value", "read_rows"]

RowFormat = Literal["jsonl", "csv"]
READ_SIZE: Final = 256 * 1024
"""Bytes per read: at most one hand-over per read."""
JSON_EXTENSIONS: Final = (".jsonl", ".ndjson", ".json")
CSV_EXTENSIONS: Final = (".csv",)

_NUMBER_RE: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?\Z")


class RowError(InputError):
    """A bad line of a JSON Lines or CSV input; ``where`` (the file) and ``line`` say which."""

    def __init__(self, where: str, line: int, problem: str) -> None:
        super().__init__(f"{where} line {line}: {problem}")
        self.where = where
        self.line = line
        self.problem = problem


def infer_value(text: str) -> Any:
    """A CSV cell's value: JSON numbers become int/float, ``""`` becomes None, else the string."""
    if not text:
        return None
    if text[0] in "-0123456789":
        m = _NUMBER_RE.match(text)
        if m is not None:
            if m.group(1) is None and m.group(2) is None:
                return int(text)
            value = float(text)
            if math.isfinite(value):
                return value
    return text


def format_of(path: str, given: str | None, flag: str = "--input-format") -> RowFormat:
    """The format of ``path``: ``given``, else from its extension (``-``, stdin, is JSON Lines)."""
    if given is not None:
        if given not in ("jsonl", "csv"):
            raise UsageError(f"{flag} must be jsonl or csv, got {given!r}")
        return "csv" if given == "csv" else "jsonl"
    suffix = Path(path).suffix.lower()
    if path == "-" or suffix in JSON_EXTENSIONS:
        return "jsonl"
    if suffix in CSV_EXTENSIONS:
        return "csv"
    raise UsageError(
        f"cannot tell the format of {path!r} from its extension (.jsonl, .ndjson, .json or .csv); "
        f"pass {flag} jsonl or {flag} csv"
    )


class Lines:
    """The lines of a binary stream (with their ``\\n``), read with ``read1``.

    `before_read` runs before every read that may block. `number` is the number of the
    last line yielded, `pos` the bytes consumed.
    """

    def __init__(self, stream: IO[bytes], before_read: Callable[[], None] | None = None) -> None:
        self._stream = stream
        self._before_read = before_read
        self.number = 0
        self.pos = 0

    def __iter__(self) -> Iterator[bytes]:
        stream = self._stream
        read: Callable[[int], bytes] = getattr(stream, "read1", stream.read)
        hook = self._before_read
        tail = b""
        while True:
            if hook is not None:
                hook()
            data = read(READ_SIZE)
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

    Checked here rather than left to the JSON decoder, whose wording for it changes
    between msgspec releases.
    """
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return (
            f"not UTF-8 text ({exc.reason} 0x{raw[exc.start]:02x} at byte {exc.start + 1} of "
            "the line); convert the file to UTF-8 (from Latin-1: iconv -f latin1 -t utf-8)"
        )
    return None


def read_rows(
    lines: Lines,
    fmt: RowFormat,
    *,
    where: str,
    infer: bool = True,
    required_columns: Sequence[str] = (),
    column_hint: str = "",
    expect: str = "a JSON object",
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for every row of ``lines``; a `RowError` names a bad line.

    ``where`` names the input in messages. CSV only: ``required_columns`` must be in the
    header (``column_hint`` says how to choose others), ``infer`` applies `infer_value`.
    ``expect`` describes a valid JSON line in the error for a line that is no object.
    """
    if fmt == "csv":
        return _csv_rows(lines, where, infer, required_columns, column_hint)
    return _json_rows(lines, where, expect)


def _json_rows(lines: Lines, where: str, expect: str) -> Iterator[tuple[int, dict[str, Any]]]:
    decode = msgspec.json.Decoder().decode
    for raw in lines:
        if not raw.isascii() and (problem := _not_utf8(raw)) is not None:
            raise RowError(where, lines.number, problem)
        try:
            obj = decode(raw)
        except msgspec.DecodeError as exc:
            if not raw.strip():
                continue  # a blank line
            hint = ""
            if lines.number == 1 and raw.strip() == b"[":
                hint = " (a JSON array file? convert it to JSON Lines: jq -c '.[]' FILE)"
            raise RowError(where, lines.number, f"invalid JSON: {exc}{hint}") from None
        if obj.__class__ is not dict:
            kind = "an array" if isinstance(obj, list) else f"a {type(obj).__name__}"
            if obj is None:
                kind = "null"
            raise RowError(where, lines.number, f"expected {expect}, got {kind}")
        yield lines.number, obj


def _csv_rows(
    lines: Lines, where: str, infer: bool, required: Sequence[str], column_hint: str
) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.reader(_text_lines(lines, where), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise RowError(where, 1, "empty CSV file: expected a header line of column names") from None
    except csv.Error as exc:
        raise RowError(where, 1, f"bad CSV: {exc}") from None
    if not header or not all(header):
        raise RowError(where, 1, f"the CSV header has an empty column name: {header}")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise RowError(where, 1, f"the CSV header repeats column(s) {dupes}")
    absent = [f for f in required if f not in header]
    if absent:
        shown = ", ".join(header[:12]) + (", …" if len(header) > 12 else "")
        raise RowError(
            where,
            1,
            f"the CSV header has no id column {absent} (columns: {shown})"
            + (f"; {column_hint}" if column_hint else ""),
        )
    width = len(header)
    cell = infer_value if infer else None
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise RowError(where, lines.number, f"bad CSV: {exc}") from None
        if not fields:
            continue  # a blank line
        if len(fields) != width:
            raise RowError(
                where, lines.number, f"{len(fields)} fields, but the header has {width} columns"
            )
        if cell is not None:
            yield lines.number, dict(zip(header, map(cell, fields), strict=True))
        else:
            yield lines.number, dict(zip(header, fields, strict=True))


def _text_lines(lines: Lines, where: str) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    for raw in lines:
        try:
            yield decoder.decode(raw)
        except UnicodeDecodeError as exc:
            problem = _not_utf8(raw) or f"not UTF-8 text ({exc.reason})"
            raise RowError(where, lines.number, problem) from None
