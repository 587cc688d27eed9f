"""`tally query` and `tally status`: every read, from a data dir or a running server.

`tally query AGGREGATE OP ...` answers one read (``count``, ``sum``, ``at``,
``index-of``, ``min``, ``max``, ``random``, ``page``, ``namespaces`` and the
``*-batch`` forms) either straight from a store directory, opened read-only
(a RocksDB secondary instance, so it works while a consumer writes there), or
through the HTTP API of a running consumer (``--url``).

Where the answer comes from (`schemas.config.QuerySettings`, resolved by
`consumers.cli.settings`): ``--url URL``, else ``--data-dir DIR``, else
``$TALLY_URL``, else ``$TALLY_DATA_DIR``, else ``url`` / ``data_dir`` of the TOML
file (``[query]`` / ``[status]`` or top level), else ``./tally-data``.

Values on the command line (keys, ids, namespaces) are JSON when they parse as
JSON, else plain strings: ``1000`` is the int 1000, ``1.5`` a float, ``true`` a
bool, ``null`` None, ``ana`` and ``'"ana"'`` both the string "ana",
``'"1000"'`` the string "1000", and ``'[1,"a"]'`` the tuple ``(1, "a")``.

Output: a readable table on a terminal (items as rows: #, key, id, sum,
namespace; single numbers plainly, so ``$(tally query ... count)`` works), or
one JSON document with ``--json``. Errors are raised and reported as one line
on stderr by `consumers.cli.errors`; exit status 2 for bad usage, arguments,
JSON or an unknown aggregate, 1 when the server is unreachable or the data dir
is missing, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, TypeVar

import msgspec

from consumers.cli.parser import add_setting, given_settings
from consumers.cli.settings import Loaded, load
from consumers.cli.stores import open_store
from consumers.logs import quiet_kafka_logs
from consumers.signals import on_stop_signals
from engine import (
    Aggregate,
    AggregateNotReady,
    Item,
    Order,
    Page,
    Store,
    TallyError,
)
from schemas.config import DEFAULT_BOOTSTRAP_SERVERS, QuerySettings, StatusSettings
from schemas.errors import UsageError
from schemas.values import REQUEST_DECODER, TypedValueError, from_json

_JSON_OUT: Final = msgspec.json.Encoder(decimal_format="number")
"""Answers as HTTP writes them (`schemas.values`), but raising on what JSON cannot hold."""

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
    like ``{"$decimal": "12.10"}`` as in HTTP requests, `schemas.values`), else the string."""
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


class LocalReader:
    """Reads from a store directory opened read-only; the same calls as `TallyClient`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def close(self) -> None:
        self.store.close()

    def aggregates(self) -> list[str]:
        return self.store.aggregates()

    def _agg(self, name: str) -> Aggregate:
        known = self.store.aggregates()
        if name not in known:
            if known:
                have = f"known aggregates: {', '.join(known)}"
            else:
                have = "it has no aggregates yet (a consumer creates them with their first item)"
            raise UsageError(
                f"unknown aggregate {name!r} in the store at {self.store.path!r}: {have}"
            )
        return self.store.aggregate(name)

    def count(self, aggregate: str, namespace: Any = None, bounds: Any = None) -> int:
        return int(self._agg(aggregate).count(namespace, bounds))

    def sum(
        self, aggregate: str, namespace: Any = None, bounds: Any = None
    ) -> int | float | Decimal:
        return self._agg(aggregate).sum(namespace, bounds)

    def at(self, aggregate: str, offset: int, namespace: Any = None, bounds: Any = None) -> Item:
        return self._agg(aggregate).at(offset, namespace, bounds)

    def index_of(
        self,
        aggregate: str,
        key: Any,
        id: Any = None,
        order: Order = "asc",
        namespace: Any = None,
        bounds: Any = None,
    ) -> int:
        return int(self._agg(aggregate).index_of(key, id, order, namespace, bounds))

    def min(self, aggregate: str, namespace: Any = None, bounds: Any = None) -> Item | None:
        return self._agg(aggregate).min(namespace, bounds)

    def max(self, aggregate: str, namespace: Any = None, bounds: Any = None) -> Item | None:
        return self._agg(aggregate).max(namespace, bounds)

    def random(self, aggregate: str, namespace: Any = None, bounds: Any = None) -> Item | None:
        return self._agg(aggregate).random(namespace, bounds)

    def paginate(
        self,
        aggregate: str,
        cursor: str | None = None,
        page_size: int = 100,
        order: Order = "asc",
        namespace: Any = None,
        bounds: Any = None,
    ) -> Page:
        return self._agg(aggregate).paginate(cursor, page_size, order, namespace, bounds)

    def count_batch(self, aggregate: str, queries: list[dict[str, Any]]) -> list[int]:
        return self._agg(aggregate).count_batch(queries)

    def sum_batch(
        self, aggregate: str, queries: list[dict[str, Any]]
    ) -> list[int | float | Decimal]:
        return self._agg(aggregate).sum_batch(queries)

    def at_batch(self, aggregate: str, queries: list[dict[str, Any]]) -> list[Item]:
        return self._agg(aggregate).at_batch(queries)

    def namespaces(self, aggregate: str) -> list[Any]:
        return self._agg(aggregate).namespaces()


def _client(url: str, timeout: float) -> Any:
    from consumers.client import TallyClient

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
    return LocalReader(open_store(data_dir))


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
  tally query by_game page --namespace chess --page-size 25 --order desc
  tally query high_scores count --prefix '["chess"]'             # tuple keys by prefix
  tally query --url http://127.0.0.1:8750 leaderboard sum
  tally query leaderboard count-batch '[{{"namespace": null}}, {{"bounds": {{"eq": 1000}}}}]'

ops: count, sum, at OFFSET, index-of KEY, min, max, random, page, namespaces,
count-batch QUERIES, sum-batch QUERIES, at-batch QUERIES (`OP --help` for each).
Common flags (--namespace, bounds, --json, the source) go before or after OP.

{VALUE_RULE}
bounds: --lower KEY [--lower-exclusive] [--lower-id ID], --upper KEY
[--upper-exclusive] [--upper-id ID] (an id cuts a tie group of equal keys),
--eq KEY, --prefix JSON_ARRAY (tuple keys); several given together intersect.

{SOURCE_RULE}"""

# op name -> (help, extra epilog example)
_OPS: Final[dict[str, tuple[str, str]]] = {
    "count": ("number of items in range", "tally query leaderboard count --lower 1000 --lower-exclusive"),
    "sum": ("sum of the items' sum values in range", "tally query by_game sum --namespace chess"),
    "at": (
        "the item at OFFSET in (key, id) order; negative counts from the end",
        "tally query leaderboard at -1        # the largest key",
    ),
    "index-of": (
        "items before KEY (asc), or after it (desc: 0 = the top)",
        "tally query leaderboard index-of 1520 --id 17 --order desc",
    ),
    "min": ("the first item in range", "tally query leaderboard min --namespace chess"),
    "max": ("the last item in range", "tally query leaderboard max --upper 1000"),
    "random": ("a uniformly random item in range", "tally query leaderboard random --lower 1000"),
    "page": (
        "one page of items; prints the cursor of the next page",
        "tally query leaderboard page --page-size 25 --order desc\n"
        "  tally query leaderboard page --page-size 25 --order desc --cursor CURSOR",
    ),
    "namespaces": ("namespaces holding at least one item", "tally query by_game namespaces"),
    "count-batch": (
        "count for each query of a JSON list",
        "tally query leaderboard count-batch '[{\"bounds\": {\"lower\": {\"key\": 1000}}}, {}]'",
    ),
    "sum-batch": (
        "sum for each query of a JSON list",
        "tally query by_game sum-batch '[{\"namespace\": \"chess\"}, {\"namespace\": \"go\"}]'",
    ),
    "at-batch": (
        "at for each query (its \"offset\") of a JSON list",
        "tally query leaderboard at-batch '[{\"offset\": 0}, {\"offset\": -1}]'",
    ),
}


def _add_source_flags(p: argparse.ArgumentParser, suppress: bool, bootstrap: bool = False) -> None:
    """The source settings (`schemas.config.QuerySettings`); SUPPRESSed on the op parsers."""
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
    g.add_argument("--namespace", default=d, metavar="NS", help="namespace to read (default: the default one)")
    g.add_argument("--lower", default=d, metavar="KEY", help="lower bound key (inclusive unless --lower-exclusive)")
    g.add_argument("--lower-exclusive", action="store_true", default=flag, help="exclude --lower itself")
    g.add_argument("--lower-id", default=d, metavar="ID", help="cut the tie group of --lower at this id")
    g.add_argument("--upper", default=d, metavar="KEY", help="upper bound key (inclusive unless --upper-exclusive)")
    g.add_argument("--upper-exclusive", action="store_true", default=flag, help="exclude --upper itself")
    g.add_argument("--upper-id", default=d, metavar="ID", help="cut the tie group of --upper at this id")
    g.add_argument("--eq", default=d, metavar="KEY", help="only items whose key equals KEY")
    g.add_argument(
        "--prefix", default=d, metavar="JSON_ARRAY", help="tuple keys starting with these elements, e.g. '[\"chess\"]'"
    )
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", default=flag, help="print one JSON document")


def _order_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--order", choices=["asc", "desc"], default="asc", help="asc (default) or desc")


def _offset(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"OFFSET must be an integer (negative counts from the end), got {text!r}") from None


def _page_size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"--page-size must be a positive integer, got {text!r}")
    return n


def _register_query(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "query",
        help="answer a read (count, sum, at, index-of, min, max, random, page, ...) from a data dir or server",
        description=(
            "Answer one read of an aggregate: from a store directory opened read-only (safe while a "
            "consumer writes it) or from a running server's HTTP API."
        ),
        epilog=QUERY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_source_flags(p, suppress=False)
    _add_common(p, suppress=False)
    p.add_argument("aggregate", metavar="AGGREGATE", help="aggregate name (`tally status` lists them)")
    ops = p.add_subparsers(dest="op", metavar="OP")
    ops.required = True
    for name, (help_text, example) in _OPS.items():
        op = ops.add_parser(
            name,
            help=help_text,
            description=f"{help_text}.",
            epilog=f"example:\n  {example}\n\n{VALUE_RULE}\n{SOURCE_RULE}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if name == "at":
            op.add_argument("offset", type=_offset, metavar="OFFSET", help="0 = first; -1 = last")
        elif name == "index-of":
            op.add_argument("key", metavar="KEY", help="the key to look up")
            op.add_argument("--id", default=None, metavar="ID", help="the item's id: its exact position in a tie group")
            _order_arg(op)
        elif name == "page":
            op.add_argument("--cursor", default=None, help="the cursor printed with the previous page")
            op.add_argument("--page-size", type=_page_size, default=100, metavar="N", help="items per page (default 100)")
            _order_arg(op)
        elif name.endswith("-batch"):
            op.add_argument(
                "queries",
                metavar="QUERIES",
                help="JSON list of {namespace, bounds, offset} objects; @FILE reads a file, - stdin",
            )
        _add_common(op, suppress=True)
        _add_source_flags(op, suppress=True)
    p.set_defaults(func=run_query)


def _answer(reader: Any, args: argparse.Namespace) -> Any:
    agg: str = args.aggregate
    op: str = args.op
    if op.endswith("-batch"):
        given = [f for f in ("namespace", "lower", "upper", "eq", "prefix") if getattr(args, f, None) is not None]
        if given:
            raise UsageError(
                f"{op} takes the namespace and bounds inside each query, not --{given[0]}: "
                'e.g. \'[{"namespace": "chess", "bounds": {"lower": {"key": 1000}}}]\''
            )
        queries = _queries(args.queries, op)
        method = {"count-batch": reader.count_batch, "sum-batch": reader.sum_batch, "at-batch": reader.at_batch}[op]
        return method(agg, queries)
    if op == "namespaces":
        return reader.namespaces(agg)
    ns = None if args.namespace is None else parse_value(args.namespace)
    bounds = bounds_from_args(args)
    if op == "count":
        return reader.count(agg, namespace=ns, bounds=bounds)
    if op == "sum":
        return reader.sum(agg, namespace=ns, bounds=bounds)
    if op == "at":
        return reader.at(agg, args.offset, namespace=ns, bounds=bounds)
    if op == "index-of":
        key = parse_value(args.key)
        id_ = None if args.id is None else parse_value(args.id)
        return reader.index_of(agg, key, id=id_, order=args.order, namespace=ns, bounds=bounds)
    if op in ("min", "max", "random"):
        return getattr(reader, op)(agg, namespace=ns, bounds=bounds)
    if op == "page":
        return reader.paginate(
            agg, cursor=args.cursor, page_size=args.page_size, order=args.order, namespace=ns, bounds=bounds
        )
    raise UsageError(f"unknown op {op!r}")  # argparse's choices make this unreachable


def _page_parts(page: Any) -> tuple[list[Any], str | None, bool]:
    if isinstance(page, dict):
        return list(page.get("items") or []), page.get("cursor"), bool(page.get("is_done"))
    return list(page.items), page.cursor, bool(page.is_done)


def _print_answer(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        _emit_json(result)
        return
    console = _console()
    op: str = args.op
    title = f"{args.aggregate} · {op}"
    if args.namespace is not None and not op.endswith("-batch") and op != "namespaces":
        title += f" · namespace {_show(parse_value(args.namespace))}"
    if op in ("count", "sum", "index-of"):
        console.print(_num(result), markup=False)
    elif op in ("at", "min", "max", "random"):
        if result is None:
            console.print("no items in range", markup=False)
        else:
            numbers = [args.offset] if op == "at" else None
            console.print(_items_table([result], title, numbers))
    elif op == "page":
        items, cursor, done = _page_parts(result)
        if items:
            console.print(_items_table(items, f"{title} · {len(items)} items ({args.order})"))
        else:
            console.print("no items in range", markup=False)
        if done:
            console.print(f"last page (cursor {cursor})" if cursor else "last page", markup=False)
        else:
            console.print(f"next page: --cursor {cursor}", markup=False)
    elif op == "namespaces":
        if not result:
            console.print("no namespaces (the aggregate holds no items)", markup=False)
        for ns in result:
            console.print("(default)" if ns is None else _show(ns), markup=False)
    elif op == "at-batch":
        offsets = [q.get("offset", 0) for q in _queries(args.queries, op)] if args.queries != "-" else None
        console.print(_items_table(result, title, offsets))
    else:  # count-batch, sum-batch
        from rich import box
        from rich.table import Table
        from rich.text import Text

        what = "count" if op == "count-batch" else "sum"
        console.print(Text(title, style="bold"))
        t = Table(box=box.SIMPLE_HEAD)
        t.add_column("#", justify="right", style="dim")
        t.add_column(what, justify="right")
        for i, v in enumerate(result):
            t.add_row(Text(str(i + 1)), Text(_num(v)))
        console.print(t)


def run_query(args: argparse.Namespace) -> int:
    """``tally query``: returns the exit code (errors are raised, see `consumers.cli.errors`)."""
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
    p.add_argument("--json", action="store_true", help="print one JSON document (one per refresh with --watch)")
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
    from consumers.runtime.streams import stored_offsets

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
        lag = None if end is None else max(0, end - off)
        if lag is None:
            total_lag = None
        elif total_lag is not None:
            total_lag += lag
        partitions.append(
            {"topic": tp.topic, "partition": tp.partition, "offset": off, "end_offset": end, "lag": lag}
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
    if not isinstance(seconds, (int, float)):
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
        state += f" {progress['percent']:.0f}%" if isinstance(progress["percent"], (int, float)) else ""
    return state


def _render_status(doc: dict[str, Any], where: str, error: str | None = None, broker: str = "") -> Any:
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = [Text(f"tally status · {where} · {datetime.now().strftime('%H:%M:%S')}", style="bold")]
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
    else:
        parts.append(Text("no partitions consumed yet"))
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
            from consumers.runtime.streams import stored_offsets

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
    args: argparse.Namespace, fetch: Callable[[], Awaitable[dict[str, Any]]], where: str, broker: str
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
            with Live(_render_status(doc, where, err, broker), console=console, auto_refresh=False) as live:
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
    """``tally status``: returns the exit code (errors are raised, see `consumers.cli.errors`)."""
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

