"""`tally query` and `tally status`: every read, from a data dir or a running server.

`tally query AGGREGATE OP ...` answers one read (``count``, ``sum``, ``at``,
``index-of``, ``min``, ``max``, ``random``, ``paginate`` (or ``page``), ``namespaces``
and the ``*-batch`` forms) either straight from a store directory, opened read-only
(a RocksDB secondary instance, so it works while a consumer writes there), or
through the HTTP API of a running consumer (``--url``).

The ops, their arguments and their answers come from `tally.schemas.reads.READ_OPS`: each op's
subcommand takes its args Struct's fields (required ones as positionals, the others as
``--flags``, namespace and bounds as the range flags), builds that Struct from them, and
calls ``getattr(handle, op)(**args)`` on a handle that is the store's `engine.Aggregate` or
the server's `tally.consumers.client.RemoteAggregate` — the same call either way.

Where the answer comes from (`tally.schemas.config.QuerySettings`, resolved by
`tally.consumers.cli.settings`): ``--url URL``, else ``--data-dir DIR``, else
``$TALLY_URL``, else ``$TALLY_DATA_DIR``, else ``url`` / ``data_dir`` of the TOML
file (``[query]`` / ``[status]`` or top level), else ``./tally-data``.

Values on the command line (keys, ids, namespaces) are JSON when they parse as
JSON, else plain strings: ``1000`` is the int 1000, ``1.5`` a float, ``true`` a
bool, ``null`` None, ``ana`` and ``'"ana"'`` both the string "ana",
``'"1000"'`` the string "1000", and ``'[1,"a"]'`` the tuple ``(1, "a")``.

Output: a readable table on a terminal (items as rows: #, key, id, sum,
namespace; single numbers plainly, so ``$(tally query ... count)`` works), or
one JSON document with ``--json``. Errors are raised and reported as one line
on stderr by `tally.consumers.cli.errors`; exit status 2 for bad usage, arguments,
JSON or an unknown aggregate, 1 when the server is unreachable or the data dir
is missing, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import typing
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec

from tally.consumers.cli.parser import add_setting, given_settings
from tally.consumers.cli.settings import Loaded, load
from tally.consumers.cli.stores import open_store
from tally.consumers.logs import quiet_kafka_logs
from tally.consumers.runtime.stats import beyond_end_problem
from tally.consumers.signals import on_stop_signals
from tally.engine import (
    AggregateNotReady,
    Item,
    Page,
    Store,
    TallyError,
)
from tally.schemas.config import DEFAULT_BOOTSTRAP_SERVERS, QuerySettings, StatusSettings
from tally.schemas.errors import UsageError
from tally.schemas.reads import READ_OPS, ReadOp, args_error
from tally.schemas.values import REQUEST_DECODER, TypedValueError, from_json

_JSON_OUT: Final = msgspec.json.Encoder(decimal_format="number")
"""Answers as HTTP writes them (`tally.schemas.values`), but raising on what JSON cannot hold."""

__all__ = ["bounds_from_args", "parse_value", "register"]

EXIT_OK: Final = 0

BROKER_TIMEOUT: Final = 3.0
"""Seconds `tally status --data-dir` waits for the broker before saying lag is unknown."""

VALUE_RULE: Final = """\
values: KEY, ID and NS are JSON when they parse as JSON, else plain strings:
  1000 -> int 1000   1.5 -> float   true -> bool   null -> None
  ana or '"ana"' -> "ana"   '"1000"' -> the string "1000"   '[1,"a"]' -> tuple (1, "a")
"""

SOURCE_RULE: Final = """\
source: --url URL, else --data-dir DIR (opened read-only: safe while a consumer
writes it), else $TALLY_URL, else $TALLY_DATA_DIR, else url / data_dir of the
TOML file (--config, $TALLY_CONFIG, ./tally.toml), else ./tally-data.
exit status: 0 ok, 2 bad usage/arguments/JSON or unknown aggregate,
1 server unreachable or data dir missing, 130 interrupted.
"""


# ------------------------------------------------------------------ parsing


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


def parse_value(text: str) -> Any:
    """A KEY/ID/NS from the command line: JSON when it parses (arrays → tuples; typed values
    like ``{"$decimal": "12.10"}`` as in HTTP requests, `tally.schemas.values`), else the string."""
    try:
        value = REQUEST_DECODER.decode(text)
    except msgspec.DecodeError:
        return text
    try:
        return _tupled(from_json(value))
    except TypedValueError as e:
        raise UsageError(str(e)) from None


def _json_arg(text: str, what: str, example: str) -> Any:
    try:
        return from_json(REQUEST_DECODER.decode(text))
    except msgspec.DecodeError as e:
        raise UsageError(f"{what} is not valid JSON ({e}): {text!r}; e.g. {example}") from None
    except TypedValueError as e:
        raise UsageError(f"{what}: {e}") from None


def bounds_from_args(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``bounds`` dict of the bounds flags (None when none is given)."""
    out: dict[str, Any] = {}
    for side in ("lower", "upper"):
        key = getattr(args, side, None)
        exclusive = bool(getattr(args, f"{side}_exclusive", False))
        bid = getattr(args, f"{side}_id", None)
        if key is None:
            if exclusive or bid is not None:
                flag = f"--{side}-exclusive" if exclusive else f"--{side}-id"
                raise UsageError(f"{flag} needs --{side} KEY")
            continue
        bound: dict[str, Any] = {"key": parse_value(key), "inclusive": not exclusive}
        if bid is not None:
            bound["id"] = parse_value(bid)
        out[side] = bound
    eq = getattr(args, "eq", None)
    if eq is not None:
        out["eq"] = parse_value(eq)
    prefix = getattr(args, "prefix", None)
    if prefix is not None:
        value = _json_arg(prefix, "--prefix", "--prefix '[\"chess\"]'")
        if not isinstance(value, list):
            raise UsageError(
                f"--prefix takes a JSON array of the first key elements, e.g. --prefix '[\"chess\"]', "
                f"got {prefix!r}"
            )
        out["prefix"] = _tupled(value)
    return out or None


def _queries(text: str, op: str) -> list[dict[str, Any]]:
    """The JSON list of a ``*-batch`` op: inline, ``@FILE`` or ``-`` (stdin)."""
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        try:
            with open(text[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"cannot read queries from {text[1:]!r}: {e.strerror or e}") from None
    example = (
        '\'[{"offset": 0}, {"offset": -1, "namespace": "chess"}]\''
        if op == "at-batch"
        else '\'[{"namespace": "chess"}, {"bounds": {"lower": {"key": 1000}}}]\''
    )
    value = _json_arg(text.strip(), "QUERIES", example)
    if not isinstance(value, list) or not all(isinstance(q, dict) for q in value):
        raise UsageError(f"QUERIES must be a JSON list of objects, e.g. {example}")
    return value


# ------------------------------------------------------------------ readers


def _aggregate(reader: Any, name: str) -> Any:
    """The read handle of aggregate ``name``: an `engine.Aggregate` of a local store (which
    must hold it), or a server's `tally.consumers.client.RemoteAggregate`."""
    if not isinstance(reader, Store):
        return reader.aggregate(name)
    known = reader.aggregates()
    if name not in known:
        if known:
            have = f"known aggregates: {', '.join(known)}"
        else:
            have = "it has no aggregates yet (a consumer creates them with their first item)"
        raise UsageError(f"unknown aggregate {name!r} in the store at {reader.path!r}: {have}")
    return reader.aggregate(name)


def _client(url: str, timeout: float) -> Any:
    from tally.consumers.client import TallyClient

    if timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {timeout:g}")
    return TallyClient(url, timeout=timeout, decimals=True)  # exact sums, the digits as sent


_Q = TypeVar("_Q", bound=QuerySettings)


def _source(loaded: Loaded[_Q]) -> tuple[str | None, str]:
    """(url or None, data dir): the url when the highest layer naming either names it."""
    s = loaded.settings
    if loaded.origin.get("url") == "flag" and loaded.origin.get("data_dir") == "flag":
        raise UsageError("give --url or --data-dir, not both")
    if s.url and loaded.rank("url") >= loaded.rank("data_dir"):
        return s.url, s.data_dir
    return None, s.data_dir


def _open_reader(loaded: Loaded[QuerySettings]) -> Any:
    url, data_dir = _source(loaded)
    if url is not None:
        return _client(url, loaded.settings.timeout)
    return open_store(data_dir)


# ------------------------------------------------------------------ output


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def _show(value: Any) -> str:
    """A key/id/namespace as you would type it back (JSON; see the value rule) — except typed
    values, shown as in HTTP answers: a Decimal as its digits, a datetime as an ISO string
    (typed back as ``{"$decimal": "12.1"}``, ``{"$datetime": "..."}``)."""
    if isinstance(value, (bytes, bytearray)):
        return repr(bytes(value))
    try:
        return _JSON_OUT.encode(value).decode()
    except (TypeError, msgspec.EncodeError):
        return repr(value)


def _num(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _show(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _fields(item: Any) -> tuple[Any, Any, Any, Any]:
    """(key, id, sum_value, namespace) of an `Item` or its JSON form."""
    if isinstance(item, dict):
        return item.get("key"), item.get("id"), item.get("sum_value"), item.get("namespace")
    return item.key, item.id, item.sum_value, item.namespace


def _items_table(items: Sequence[Any], title: str, numbers: Sequence[Any] | None = None) -> Any:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(box=box.SIMPLE_HEAD)
    t.add_column("#", justify="right", style="dim")
    t.add_column("key")
    t.add_column("id")
    t.add_column("sum", justify="right")
    t.add_column("namespace")
    for i, item in enumerate(items):
        key, id_, s, ns = _fields(item)
        n = numbers[i] if numbers is not None else i + 1
        t.add_row(
            Text(str(n)),
            Text(_show(key)),
            Text(_show(id_)),
            Text(_num(s)),
            Text("(default)" if ns is None else _show(ns)),
        )
    return Group(Text(title, style="bold"), t)


def answer_json(value: Any) -> str:
    try:
        return _JSON_OUT.encode(value).decode()
    except (TypeError, msgspec.EncodeError) as e:
        raise TallyError(f"the answer cannot be written as JSON: {e}") from None


def _emit_json(value: Any) -> None:
    sys.stdout.write(answer_json(value) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------ query


QUERY_EPILOG: Final = f"""\
examples:
  tally query leaderboard count --lower 1000 --lower-exclusive   # scores above 1000
  tally query leaderboard index-of 1520 --id 17 --order desc     # rank from the top
  tally query leaderboard at -1 --json                           # the highest score
  tally query by_game paginate --namespace chess --page-size 25 --order desc
  tally query high_scores count --prefix '["chess"]'             # tuple keys by prefix
  tally query --url http://127.0.0.1:8750 leaderboard sum
  tally query leaderboard count-batch '[{{"namespace": null}}, {{"bounds": {{"eq": 1000}}}}]'

ops: count, sum, at OFFSET, index-of KEY, min, max, random, paginate (or page),
namespaces, count-batch QUERIES, sum-batch QUERIES, at-batch QUERIES (`OP --help` for each).
Common flags (--namespace, bounds, --json, the source) go before or after OP.

{VALUE_RULE}
bounds: --lower KEY [--lower-exclusive] [--lower-id ID], --upper KEY
[--upper-exclusive] [--upper-id ID] (an id cuts a tie group of equal keys),
--eq KEY, --prefix JSON_ARRAY (tuple keys); several given together intersect.

{SOURCE_RULE}"""

# Curated examples of each op's `--help` (an op without one gets a generated example).
_EXAMPLES: Final[dict[str, str]] = {
    "count": "tally query leaderboard count --lower 1000 --lower-exclusive",
    "sum": "tally query by_game sum --namespace chess",
    "at": "tally query leaderboard at -1        # the largest key",
    "index_of": "tally query leaderboard index-of 1520 --id 17 --order desc",
    "min": "tally query leaderboard min --namespace chess",
    "max": "tally query leaderboard max --upper 1000",
    "random": "tally query leaderboard random --lower 1000",
    "paginate": "tally query leaderboard paginate --page-size 25 --order desc\n"
    "  tally query leaderboard paginate --page-size 25 --order desc --cursor CURSOR",
    "namespaces": "tally query by_game namespaces",
    "count_batch": "tally query leaderboard count-batch "
    '\'[{"bounds": {"lower": {"key": 1000}}}, {}]\'',
    "sum_batch": 'tally query by_game sum-batch \'[{"namespace": "chess"}, {"namespace": "go"}]\'',
    "at_batch": 'tally query leaderboard at-batch \'[{"offset": 0}, {"offset": -1}]\'',
}
_ALIASES: Final[dict[str, list[str]]] = {"paginate": ["page"]}
"""Older names of ops, still accepted (`page` is what the docs used before `paginate`)."""
_RANGE: Final = ("namespace", "bounds")
"""Fields given by the range flags (--namespace, --lower, ... --prefix)."""


def _cli_name(op: str) -> str:
    return op.replace("_", "-")


def _unannotated(tp: Any) -> tuple[Any, str]:
    """(the type without `Annotated`, the description its metadata gives)."""
    description = ""
    while typing.get_origin(tp) is Annotated:
        tp, *meta = typing.get_args(tp)
        description = next((m.description for m in meta if getattr(m, "description", None)), "")
    return tp, description


def _int_type(metavar: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            hint = " (negative counts from the end)" if metavar == "OFFSET" else ""
            raise argparse.ArgumentTypeError(
                f"{metavar} must be an integer{hint}, got {text!r}"
            ) from None

    return parse


def _flag(field: str, required: bool) -> str:
    return field.upper() if required else f"--{field.replace('_', '-')}"


def _add_op_arguments(p: argparse.ArgumentParser, op: ReadOp) -> None:
    """The op's own arguments, from its args Struct: required fields as positionals, the
    others as --flags (namespace and bounds come from the range flags)."""
    hints = typing.get_type_hints(op.args, include_extras=True)
    for field in op.fields:
        if field in _RANGE:
            continue
        required = field in op.required
        tp, description = _unannotated(hints[field])
        kw: dict[str, Any] = {"help": description or None}
        if not required:
            kw.update(dest=field, default=argparse.SUPPRESS)
        if field == "queries":
            kw["help"] = (
                "JSON list of {namespace, bounds, offset} objects; @FILE reads a file, - stdin"
            )
        elif typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif tp is int:
            kw["type"] = _int_type(_flag(field, required))
        elif tp is Any:
            kw["type"] = parse_value
        if not required and field == "page_size":
            kw["metavar"] = "N"
        elif "choices" not in kw:
            kw["metavar"] = field.upper()
        if required:
            p.add_argument(field, **kw)
        else:
            p.add_argument(_flag(field, False), **kw)


def _add_source_flags(p: argparse.ArgumentParser, suppress: bool, bootstrap: bool = False) -> None:
    """The source settings (`tally.schemas.config.QuerySettings`); SUPPRESSed on the op parsers."""
    kind = StatusSettings if bootstrap else QuerySettings
    d: Any = argparse.SUPPRESS if suppress else None
    g = p.add_argument_group("source")
    add_setting(
        g, kind, "url", metavar="URL", default=d, help="read from a running server's HTTP API"
    )
    add_setting(
        g, kind, "data_dir", metavar="DIR", default=d, help="read a store directory, read-only"
    )
    add_setting(
        g,
        kind,
        "timeout",
        type=float,
        metavar="SECONDS",
        default=d,
        help="HTTP request timeout with --url",
    )
    if bootstrap:
        add_setting(
            g,
            kind,
            "bootstrap_servers",
            metavar="HOST:PORT",
            default=d,
            help="with --data-dir: the broker to ask for end offsets and lag",
        )
    g.add_argument(
        "--config",
        metavar="FILE",
        default=d,
        help="TOML settings file (default $TALLY_CONFIG, else ./tally.toml if it exists)",
    )


def _add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Flags every op takes; on the op parsers they are SUPPRESSed so they do not reset the
    values given before the op."""
    d: Any = argparse.SUPPRESS if suppress else None
    flag: Any = argparse.SUPPRESS if suppress else False
    g = p.add_argument_group("range (every op but the batches)")
    g.add_argument(
        "--namespace", default=d, metavar="NS", help="namespace to read (default: the default one)"
    )
    for side in ("lower", "upper"):
        g.add_argument(
            f"--{side}",
            default=d,
            metavar="KEY",
            help=f"{side} bound key (inclusive unless --{side}-exclusive)",
        )
        g.add_argument(
            f"--{side}-exclusive",
            action="store_true",
            default=flag,
            help=f"exclude --{side} itself",
        )
        g.add_argument(
            f"--{side}-id",
            default=d,
            metavar="ID",
            help=f"cut the tie group of --{side} at this id",
        )
    g.add_argument("--eq", default=d, metavar="KEY", help="only items whose key equals KEY")
    g.add_argument(
        "--prefix",
        default=d,
        metavar="JSON_ARRAY",
        help="tuple keys starting with these elements, e.g. '[\"chess\"]'",
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", default=flag, help="print one JSON document")


def _register_query(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "query",
        help="answer a read (count, sum, at, index-of, min, max, random, paginate, ...) "
        "from a data dir or server",
        description=(
            "Answer one read of an aggregate: from a store directory opened read-only (safe while a "
            "consumer writes it) or from a running server's HTTP API."
        ),
        epilog=QUERY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_flags(p, suppress=False)
    _add_common(p, suppress=False)
    p.add_argument(
        "aggregate", metavar="AGGREGATE", help="aggregate name (`tally status` lists them)"
    )
    ops = p.add_subparsers(dest="op", metavar="OP")
    ops.required = True
    for op in READ_OPS.values():
        name = _cli_name(op.name)
        positionals = " ".join(f.upper() for f in op.required)
        example = _EXAMPLES.get(op.name) or f"tally query AGGREGATE {name} {positionals}".rstrip()
        help_text = op.summary[0].lower() + op.summary[1:]
        sp = ops.add_parser(
            name,
            aliases=_ALIASES.get(op.name, []),
            help=help_text,
            description=f"{op.summary}. {op.description}".strip(),
            epilog=f"example:\n  {example}\n\n{VALUE_RULE}\n{SOURCE_RULE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(read_op=op.name)
        _add_op_arguments(sp, op)
        _add_common(sp, suppress=True)
        _add_source_flags(sp, suppress=True)
    p.set_defaults(func=run_query)


def _read_args(op: ReadOp, args: argparse.Namespace) -> msgspec.Struct:
    """The op's args Struct, built from the flags (validated as the HTTP API validates)."""
    cli_op: str = args.op
    values: dict[str, Any] = {}
    if "bounds" in op.fields:
        bounds = bounds_from_args(args)
        if bounds is not None:
            values["bounds"] = bounds
    if "namespace" in op.fields:
        if args.namespace is not None:
            values["namespace"] = parse_value(args.namespace)
    else:
        flags = ("namespace", "lower", "upper", "eq", "prefix")
        given = [f for f in flags if getattr(args, f, None) is not None]
        if given and "queries" in op.fields:
            raise UsageError(
                f"{cli_op} takes the namespace and bounds inside each query, not --{given[0]}: "
                'e.g. \'[{"namespace": "chess", "bounds": {"lower": {"key": 1000}}}]\''
            )
        if given:
            raise UsageError(f"{cli_op} takes no --{given[0]}: it reads the whole aggregate")
    for field in op.fields:
        if field not in _RANGE and hasattr(args, field):
            value = getattr(args, field)
            values[field] = _queries(value, cli_op) if field == "queries" else value
    try:
        return msgspec.convert(values, op.args)
    except msgspec.ValidationError as e:
        _, message = args_error(op, e)
        head, sep, rest = message.partition(" ")
        field = head.split(".")[0].split("[")[0]
        if field in op.fields:  # name the flag the user typed
            head = head.replace(field, _flag(field, field in op.required), 1)
        raise UsageError(head + sep + rest) from None


def _answer(reader: Any, args: argparse.Namespace) -> Any:
    """One read: ``getattr(handle, op)(**args)``, the handle local or remote alike."""
    op = READ_OPS[args.read_op]
    read_args = _read_args(op, args)
    args.read_args = read_args  # what the answer is printed with
    handle = _aggregate(reader, args.aggregate)
    return getattr(handle, op.name)(**msgspec.structs.asdict(read_args))


def _page_parts(page: Any) -> tuple[list[Any], str | None, bool]:
    if isinstance(page, dict):
        return list(page.get("items") or []), page.get("cursor"), bool(page.get("is_done"))
    return list(page.items), page.cursor, bool(page.is_done)


def _kind(result_type: Any) -> str:
    """How an answer of this type is shown: number, item, page, items, numbers or keys."""
    tp, _ = _unannotated(result_type)
    if typing.get_origin(tp) is list:
        inner, _ = _unannotated(typing.get_args(tp)[0])
        return "items" if inner is Item else "keys" if inner is Any else "numbers"
    if tp is Item or Item in typing.get_args(tp):
        return "item"
    if tp is Page:
        return "page"
    return "number"


def _print_answer(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        _emit_json(result)
        return
    console = _console()
    op = READ_OPS[args.read_op]
    read_args: Any = args.read_args
    title = f"{args.aggregate} · {args.op}"
    if "namespace" in op.fields and args.namespace is not None:
        title += f" · namespace {_show(parse_value(args.namespace))}"
    kind = _kind(op.result)
    if kind == "number":
        console.print(_num(result), markup=False)
    elif kind == "item":
        if result is None:
            console.print("no items in range", markup=False)
        else:
            numbers = [read_args.offset] if "offset" in op.fields else None
            console.print(_items_table([result], title, numbers))
    elif kind == "page":
        items, cursor, done = _page_parts(result)
        if items:
            order = getattr(read_args, "order", "asc")
            console.print(_items_table(items, f"{title} · {len(items)} items ({order})"))
        else:
            console.print("no items in range", markup=False)
        if done:
            console.print(f"last page (cursor {cursor})" if cursor else "last page", markup=False)
        else:
            console.print(f"next page: --cursor {cursor}", markup=False)
    elif kind == "keys":
        if not result:
            console.print(f"no {op.name} (the aggregate holds no items)", markup=False)
        for ns in result:
            console.print("(default)" if ns is None else _show(ns), markup=False)
    elif kind == "items":
        queries = getattr(read_args, "queries", None)
        offsets = [q.offset for q in queries] if queries is not None else None
        console.print(_items_table(result, title, offsets))
    else:  # numbers: count-batch, sum-batch
        from rich import box
        from rich.table import Table
        from rich.text import Text

        what = op.name.removesuffix("_batch")
        console.print(Text(title, style="bold"))
        t = Table(box=box.SIMPLE_HEAD)
        t.add_column("#", justify="right", style="dim")
        t.add_column(what, justify="right")
        for i, v in enumerate(result):
            t.add_row(Text(str(i + 1)), Text(_num(v)))
        console.print(t)


def run_query(args: argparse.Namespace) -> int:
    """``tally query``: returns the exit code (errors are raised, see `tally.consumers.cli.errors`)."""
    loaded = load(QuerySettings, given_settings(args, QuerySettings), getattr(args, "config", None))
    reader = _open_reader(loaded)
    try:
        result = _answer(reader, args)
        _print_answer(args, result)
        return EXIT_OK
    finally:
        with contextlib.suppress(Exception):
            reader.close()


# ------------------------------------------------------------------ status


STATUS_EPILOG: Final = f"""\
examples:
  tally status --data-dir ./tally-data          # aggregates, stored offsets, lag
  tally status --url http://127.0.0.1:8750 --watch
  tally status --json | jq '.partitions[].lag'

With --data-dir the store is opened read-only; end offsets and lag come from
the broker (--bootstrap-servers, $TALLY_BOOTSTRAP_SERVERS, default {DEFAULT_BOOTSTRAP_SERVERS})
when it answers within {BROKER_TIMEOUT:g}s, else lag is reported unknown.
--watch [SECONDS] refreshes in place every SECONDS (default 2) until Ctrl-C.

{SOURCE_RULE}"""


def _register_status(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="aggregates, item counts, partitions, offsets and lag of a data dir or server",
        description="Show what a consumer holds and how far behind it is: its aggregates and its "
        "partitions' offsets, end offsets and lag.",
        epilog=STATUS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_flags(p, suppress=False, bootstrap=True)
    p.add_argument(
        "--json", action="store_true", help="print one JSON document (one per refresh with --watch)"
    )
    p.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=float,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    p.set_defaults(func=run_status)


class _Broker:
    """End offsets from the broker, with a short timeout; reconnects lazily."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self._consumer: Any = None
        self.error: str | None = None

    async def end_offsets(self, tps: list[Any]) -> dict[Any, int] | None:
        from aiokafka import AIOKafkaConsumer

        if not tps:
            return {}
        try:
            if self._consumer is None:
                consumer = AIOKafkaConsumer(
                    bootstrap_servers=self.bootstrap,
                    group_id=None,
                    enable_auto_commit=False,
                    request_timeout_ms=int(BROKER_TIMEOUT * 1000),
                    metadata_max_age_ms=5000,
                )
                try:
                    await asyncio.wait_for(consumer.start(), BROKER_TIMEOUT)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await consumer.stop()
                    raise
                self._consumer = consumer
            ends = await asyncio.wait_for(self._consumer.end_offsets(tps), BROKER_TIMEOUT)
            self.error = None
            return dict(ends)
        except (TimeoutError, OSError, Exception) as e:
            self.error = " ".join(str(e).split()) or type(e).__name__
            await self.close()
            return None

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()


def _local_status(store: Store, broker_ends: dict[Any, int] | None) -> dict[str, Any]:
    from tally.consumers.runtime.streams import stored_offsets

    aggregates = []
    for name in store.aggregates():
        agg = store.aggregate(name)
        gen = store.generation(name)
        entry: dict[str, Any] = {
            "name": name,
            "state": "ready" if gen is None else gen.state,
            "items": None,
            "namespaces": None,
            "namespace_names": None,
            "progress": None if gen is None or gen.building is None else gen.progress,
        }
        try:
            nss = agg.namespaces()
            entry["items"] = sum(agg.count(ns) for ns in nss)
            entry["namespaces"] = len(nss)
            entry["namespace_names"] = nss
        except AggregateNotReady as e:
            entry["progress"] = e.progress
        aggregates.append(entry)
    partitions = []
    total_lag: int | None = 0
    stored = stored_offsets(store)
    if not stored:
        total_lag = None
    for tp, off in sorted(stored.items(), key=lambda kv: (kv[0].topic, kv[0].partition)):
        end = None if broker_ends is None else broker_ends.get(tp)
        problem = None if end is None or off <= end else beyond_end_problem(tp, off, end)
        lag = None if end is None or problem else max(0, end - off)
        if lag is None:
            total_lag = None
        elif total_lag is not None:
            total_lag += lag
        partitions.append(
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "offset": off,
                "end_offset": end,
                "lag": lag,
                "problem": problem,
            }
        )
    return {
        "source": "data-dir",
        "data_dir": store.path,
        "aggregates": aggregates,
        "partitions": partitions,
        "lag": total_lag,
        "broker_reachable": None if not stored else broker_ends is not None,
    }


def _fmt_uptime(seconds: Any) -> str:
    # The client reads numbers with a fraction as Decimals (exact keys and sums).
    if not isinstance(seconds, (int, float, Decimal)) or isinstance(seconds, bool):
        return "?"
    s = int(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _fmt_count(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "?" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ns_cell(nss: Any) -> str:
    if isinstance(nss, int):
        return f"{nss:,}"
    if not isinstance(nss, list):
        return "?"
    if nss == [None]:
        return "(default)"
    shown = ", ".join("(default)" if n is None else _show(n) for n in nss[:4])
    if len(nss) > 4:
        return f"{len(nss):,}: {shown}, …"
    return shown


def _state_cell(a: dict[str, Any]) -> str:
    state = str(a.get("state") or "?")
    progress = a.get("progress")
    if isinstance(progress, dict) and progress.get("percent") is not None:
        state += (
            f" {progress['percent']:.0f}%" if isinstance(progress["percent"], (int, float)) else ""
        )
    return state


def _render_status(
    doc: dict[str, Any], where: str, error: str | None = None, broker: str = ""
) -> Any:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [
        Text(f"tally status · {where} · {datetime.now().strftime('%H:%M:%S')}", style="bold")
    ]
    if error:
        parts.append(Text(f"error: {error}", style="red"))
    remote = doc.get("source") != "data-dir"
    aggs = Table(title="aggregates", box=box.SIMPLE_HEAD, title_justify="left")
    aggs.add_column("name")
    if remote:
        aggs.add_column("table")
    aggs.add_column("state")
    aggs.add_column("items", justify="right")
    aggs.add_column("namespaces")
    for a in doc.get("aggregates") or []:
        row = [Text(str(a.get("name")))]
        if remote:
            row.append(Text(str(a.get("table", "?"))))
        row.append(Text(_state_cell(a)))
        nss = a.get("namespace_names") or a.get("namespaces")
        row += [Text(_fmt_count(a.get("items"))), Text(_ns_cell(nss))]
        aggs.add_row(*row)
    if not doc.get("aggregates"):
        parts.append(Text("no aggregates yet"))
    else:
        parts.append(aggs)
    parts_t = Table(title="partitions", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("topic", "partition", "offset", "end", "lag"):
        parts_t.add_column(col, justify="left" if col == "topic" else "right")
    for p in doc.get("partitions") or []:
        parts_t.add_row(
            Text(str(p.get("topic"))),
            Text(str(p.get("partition"))),
            Text(_fmt_count(p.get("offset"))),
            Text(_fmt_count(p.get("end_offset"))),
            Text(_fmt_count(p.get("lag"))),
        )
    if doc.get("partitions"):
        parts.append(parts_t)
        for p in doc.get("partitions") or []:
            if p.get("problem"):
                parts.append(Text(f"problem: {p['problem']}", style="bold red"))
    else:
        parts.append(Text("no partitions consumed yet"))
    member = doc.get("member")
    if isinstance(member, dict):
        parts.append(_render_members(member))
    if remote:
        lag = doc.get("lag")
        if lag is None:
            lag = sum(p.get("lag") or 0 for p in doc.get("partitions") or [])
        uptime = doc.get("uptime_seconds", doc.get("uptime_s"))
        totals = (
            f"events {_fmt_count(doc.get('events'))} · batches {_fmt_count(doc.get('batches'))} · "
            f"dead letters {_fmt_count(doc.get('dead_letters'))} · lag {_fmt_count(lag)} · "
            f"uptime {_fmt_uptime(uptime)}"
        )
        if doc.get("caught_up"):
            totals += " · caught up"
        if doc.get("broker_reachable", doc.get("broker_ok")) is False:
            totals += " · broker unreachable"
        parts.append(Text(totals))
    elif doc.get("broker_reachable") is None:
        pass  # nothing consumed: no lag to speak of
    elif doc.get("broker_reachable"):
        parts.append(Text(f"lag {_fmt_count(doc.get('lag'))} (broker {broker})"))
    else:
        parts.append(Text(f"lag unknown: broker unreachable at {broker}", style="yellow"))
    return Group(*parts)


def _task_cell(t: dict[str, Any]) -> str:
    cell = f"{t.get('partition')} {t.get('state', '?')}"
    prog = t.get("progress")
    if isinstance(prog, dict) and isinstance(prog.get("percent"), (int, float)):
        cell += f" {prog['percent']:.0f}%"
    elif t.get("lag"):
        cell += f" lag {_fmt_count(t.get('lag'))}"
    return cell


def _render_members(member: dict[str, Any]) -> Any:
    """The deployment: each member, its URL and its partitions' state and lag."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    version = member.get("map_version")
    title = f"members of {member.get('group')} (map v{version})" if version else "members"
    t = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("member", "partitions"):
        t.add_column(col)
    for m in member.get("members") or []:
        who = str(m.get("url")) + (" (this one)" if m.get("you") else "")
        if m.get("reachable") is False:
            cell = Text(f"unreachable: {m.get('error')}", style="red")
        else:
            tasks = m.get("tasks") or m.get("partitions") or []
            cell = Text(", ".join(_task_cell(x) for x in tasks) or "-")
        t.add_row(Text(who), cell)
    if not member.get("members"):
        return Text(f"not in a group yet: {member.get('membership_error')}", style="yellow")
    return t


async def _status_async(args: argparse.Namespace, loaded: Loaded[StatusSettings]) -> int:
    settings = loaded.settings
    url, data_dir = _source(loaded)
    fetch: Callable[[], Awaitable[dict[str, Any]]]
    cleanup: list[Callable[[], Awaitable[None] | None]] = []
    broker_addr = ""
    if url is not None:
        client = _client(url, settings.timeout)
        where = url

        async def fetch_remote() -> dict[str, Any]:
            return dict(await asyncio.to_thread(client.status))

        fetch = fetch_remote
        if hasattr(client, "close"):
            cleanup.append(client.close)
    else:
        store = open_store(data_dir)
        cleanup.append(store.close)
        where = store.path
        broker_addr = settings.bootstrap_servers
        broker = _Broker(broker_addr)
        cleanup.append(broker.close)

        async def fetch_local() -> dict[str, Any]:
            from tally.consumers.runtime.streams import stored_offsets

            store.refresh()
            ends = await broker.end_offsets(list(stored_offsets(store)))
            return _local_status(store, ends)

        fetch = fetch_local
    try:
        if args.watch is None:
            doc = await fetch()
            if args.json:
                _emit_json(doc)
            else:
                _console().print(_render_status(doc, where, broker=broker_addr))
            return EXIT_OK
        if args.watch <= 0:
            raise UsageError(f"--watch takes a positive number of seconds, got {args.watch:g}")
        return await _watch(args, fetch, where, broker_addr)
    finally:
        for fn in reversed(cleanup):
            with contextlib.suppress(Exception):
                r = fn()
                if r is not None:
                    await r


async def _watch(
    args: argparse.Namespace,
    fetch: Callable[[], Awaitable[dict[str, Any]]],
    where: str,
    broker: str,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    remove = on_stop_signals(loop, lambda _sig: stop.set())
    console = _console()
    last: dict[str, Any] = {}

    async def tick() -> tuple[dict[str, Any], str | None]:
        nonlocal last
        try:
            last = await fetch()
            return last, None
        except TallyError as e:
            return last, " ".join(e.cli_text().split())

    async def pause() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.watch)

    try:
        if args.json:
            while not stop.is_set():
                doc, err = await tick()
                _emit_json({**doc, "error": err} if err else doc)
                await pause()
        elif console.is_terminal:
            from rich.live import Live

            doc, err = await tick()
            with Live(
                _render_status(doc, where, err, broker), console=console, auto_refresh=False
            ) as live:
                while not stop.is_set():
                    await pause()
                    if stop.is_set():
                        break
                    doc, err = await tick()
                    live.update(_render_status(doc, where, err, broker), refresh=True)
        else:
            while not stop.is_set():
                doc, err = await tick()
                console.print(_render_status(doc, where, err, broker))
                console.file.flush()
                await pause()
    finally:
        remove()
    return EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    """``tally status``: returns the exit code (errors are raised, see `tally.consumers.cli.errors`)."""
    loaded = load(StatusSettings, given_settings(args, StatusSettings), args.config)
    try:
        with quiet_kafka_logs():
            return asyncio.run(_status_async(args, loaded))
    except KeyboardInterrupt:
        if args.watch is None:
            raise
        return EXIT_OK  # Ctrl-C is how --watch ends


# ------------------------------------------------------------------ registration


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``query`` and ``status`` to the `tally` CLI."""
    _register_query(subparsers)
    _register_status(subparsers)
