"""The one JSON Lines / CSV row reader (`tally.consumers.rows`), and the progress display
(`tally.consumers.cli.progress`) that `tally produce` and `tally reconcile` share.

The reader's rules are strict and every error names the line; `tally produce --dry-run`
and `tally reconcile`'s snapshot source must refuse a bad file with the same message
(they used to disagree: reconcile read NaN and filled short CSV rows with None).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from tally.consumers.cli import main
from tally.consumers.cli.progress import Tick, progress
from tally.consumers.reconcile.sources import snapshot_source
from tally.consumers.rows import Lines, RowError, format_of, read_rows
from tally.schemas.errors import EXIT_USAGE, UsageError


def rows(data: bytes, fmt: str = "jsonl", **kw: Any) -> list[tuple[int, dict[str, Any]]]:
    return list(read_rows(Lines(io.BytesIO(data)), fmt, where="f", **kw))  # type: ignore[arg-type]


def error(data: bytes, fmt: str = "jsonl", **kw: Any) -> str:
    with pytest.raises(RowError) as e:
        rows(data, fmt, **kw)
    return str(e.value)


# ---------------------------------------------------------------- JSON Lines


def test_json_lines_rows_with_their_line_numbers() -> None:
    data = b'{"id": 1}\n\n  \r\n{"id": 2, "v": [1, 2.5]}\r\n{"id": 3}'  # no final newline
    assert rows(data) == [(1, {"id": 1}), (4, {"id": 2, "v": [1, 2.5]}), (5, {"id": 3})]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b'{"id": 2, "v": NaN}', "invalid JSON"),
        (b'{"id": 2, "v": Infinity}', "invalid JSON"),
        (b'{"id": 2, "v": -Infinity}', "invalid JSON"),
        (b'{"id": 2, "v": 1e400}', "invalid JSON: Number out of range"),
        (b"[1, 2]", "expected a JSON object, got an array"),
        (b"null", "expected a JSON object, got null"),
        (b'"x"', "expected a JSON object, got a str"),
        (b'{"id": "caf\xe9"}', "not UTF-8 text (invalid continuation byte 0xe9 at byte 12"),
        (b'{"id": 2,', "invalid JSON"),
    ],
)
def test_json_lines_refuse_what_json_cannot_carry(line: bytes, problem: str) -> None:
    message = error(b'{"id": 1}\n' + line + b"\n")
    assert message.startswith(f"f line 2: {problem}"), message


def test_a_json_array_file_is_told_how_to_convert() -> None:
    assert "jq -c '.[]' FILE" in error(b'[\n{"id": 1}\n]\n')


# ---------------------------------------------------------------- CSV


def test_csv_rows_cells_and_line_numbers() -> None:
    data = '\ufeffid,name,score\n1,ana,10\n\n2,"bo\nb, jr",1e3\n3,,007\n'.encode()
    assert rows(data, "csv") == [
        (2, {"id": 1, "name": "ana", "score": 10}),
        (5, {"id": 2, "name": "bo\nb, jr", "score": 1000.0}),  # a record ends on line 5
        (6, {"id": 3, "name": None, "score": "007"}),
    ]
    assert rows(b"id,v\n1,\n", "csv", infer=False) == [(2, {"id": "1", "v": ""})]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"id,v\n1,2\n2\n", "f line 3: 1 fields, but the header has 2 columns"),  # short: refused
        (b"id,v\n1,2\n2,3,4\n", "f line 3: 3 fields, but the header has 2 columns"),
        (b"", "f line 1: empty CSV file"),
        (b"id,,v\n", "f line 1: the CSV header has an empty column name"),
        (b"id,v,v\n", "f line 1: the CSV header repeats column(s) ['v']"),
        (b'id,v\n1,"a"b\n', "f line 2: bad CSV"),
        (b"id,v\n1,caf\xe9\n", "f line 2: not UTF-8 text"),
    ],
)
def test_csv_refuses_ragged_and_broken_files(data: bytes, message: str) -> None:
    assert error(data, "csv").startswith(message)


def test_csv_required_columns_are_checked_at_the_header() -> None:
    message = error(b"name\nx\n", "csv", required_columns=("id",), column_hint="pick with --x")
    assert (
        message == "f line 1: the CSV header has no id column ['id'] (columns: name); pick with --x"
    )


def test_the_format_comes_from_the_flag_or_the_extension() -> None:
    assert [format_of(p, None) for p in ("a.jsonl", "a.NDJSON", "a.json", "-", "a.csv")] == [
        "jsonl",
        "jsonl",
        "jsonl",
        "jsonl",
        "csv",
    ]
    assert format_of("a.txt", "csv") == "csv"
    with pytest.raises(UsageError, match=r"cannot tell the format of 'a\.txt'.*--format csv"):
        format_of("a.txt", None, flag="--format")


def test_lines_call_the_hook_before_every_read_and_count() -> None:
    class Trickle(io.RawIOBase):
        """Returns one line per read, as a slow pipe does."""

        def __init__(self, lines: list[bytes]) -> None:
            self.lines = lines

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            return self.lines.pop(0) if self.lines else b""

    seen: list[int] = []
    pipe: Any = Trickle([b"a\n", b"b", b"c\nd\n"])
    lines = Lines(pipe, lambda: seen.append(lines.number))
    assert list(lines) == [b"a\n", b"bc\n", b"d\n"]
    assert seen == [0, 1, 1, 3]  # before each read: the lines handed out so far
    assert (lines.number, lines.pos) == (3, 7)


# ---------------------------------------------------------------- produce and reconcile agree

BAD_FILES = [
    ("nan.jsonl", '{"id": 1, "score": 1}\n{"id": 2, "score": NaN}\n', "line 2: invalid JSON"),
    ("short.csv", "id,score\n1,1\n2\n", "line 3: 1 fields, but the header has 2 columns"),
    ("long.csv", "id,score\n1,1\n2,2,2\n", "line 3: 3 fields, but the header has 2 columns"),
    ("noid.jsonl", '{"id": 1}\n{"score": 2}\n', "line 2: the row has no id field 'id'"),
    ("nullid.jsonl", '{"id": null, "score": 2}\n', "line 1: the row's id field 'id' is null"),
    ("noidcol.csv", "key,score\n1,1\n", "line 1: the CSV header has no id column ['id']"),
]


@pytest.mark.parametrize(("name", "text", "problem"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_produce_and_reconcile_refuse_a_bad_file_alike(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, problem: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    code = main(["produce", "--dry-run", "--table", "scores", "--topic", "t", str(path)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert err.startswith(f"tally produce: error: {path} {problem}"), err
    with pytest.raises(RowError) as e:
        list(snapshot_source(str(path), ["id"]))
    assert str(e.value).startswith(f"{path} {problem}"), e.value
    assert e.value.exit_code == EXIT_USAGE


def test_a_snapshot_refuses_a_duplicated_id_naming_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "dupe.jsonl"
    path.write_text("".join(json.dumps({"id": i % 3}) + "\n" for i in range(5)))
    with pytest.raises(
        RowError, match=r"dupe\.jsonl line 4: id 0 appears twice \(also on line 1\)"
    ):
        list(snapshot_source(str(path), ["id"]))


# ---------------------------------------------------------------- progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def detail(tick: Tick) -> str:
    return f"{tick.done} rows, {tick.rate:.0f}/s, {tick.fields['diffs']} diffs"


def test_progress_lines_every_interval() -> None:
    out, clock = io.StringIO(), Clock()
    with progress(
        "lines", title="work", total=None, detail=detail, interval=10, stream=out, clock=clock
    ) as p:
        p.update(10, diffs=0)
        clock.now += 9.9
        p.update(20, diffs=1)
        assert out.getvalue() == ""  # not before the interval
        clock.now += 0.1
        p.update(30, diffs=2)
        clock.now += 5
        p.update(40, diffs=2)
        clock.now += 5
        p.update(50, diffs=3)
    assert out.getvalue() == "work: 30 rows, 3/s, 2 diffs\nwork: 50 rows, 2/s, 3 diffs\n"


def test_progress_lines_show_the_share_of_a_known_total() -> None:
    out, clock = io.StringIO(), Clock()
    with progress(
        "lines", title="t", total=200, detail=detail, interval=0, stream=out, clock=clock
    ) as p:
        clock.now += 1
        p.update(50, diffs=0)
    assert out.getvalue() == "t: 50 rows, 50/s, 0 diffs (25%)\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_a_bar_on_a_terminal_and_lines_elsewhere_and_none_is_silent() -> None:
    tty = Terminal()
    with progress("auto", title="bar", total=10, detail=detail, stream=tty) as p:
        p.update(12, diffs=1)  # past an estimate: the total follows
    assert "\x1b[" in tty.getvalue()  # rich drew (and, transient, erased) its bar
    pipe, clock = io.StringIO(), Clock()
    with progress(
        "auto", title="x", total=None, detail=detail, interval=1, stream=pipe, clock=clock
    ) as p:
        clock.now += 1
        p.update(5, diffs=0)
    assert pipe.getvalue().startswith("x: 5 rows")
    quiet = Terminal()
    with progress("none", title="x", total=None, detail=detail, stream=quiet) as p:
        p.update(5, diffs=0)
    assert quiet.getvalue() == ""
