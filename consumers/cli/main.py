"""The `tally` command line.

Every subcommand has ``--help`` with an example. Errors are one clear line
on stderr and a non-zero exit (2: bad usage or configuration, 1: runtime),
never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from engine import Store, TallyError

if TYPE_CHECKING:
    from consumers.http.limits import FdBudget

__all__ = ["build_parser", "main"]

# Subcommand modules: each exposes register(subparsers).
_SUBCOMMANDS = (
    "consumers.cli.produce",
    "consumers.cli.query",
    "consumers.demo.app",
    "consumers.cli.reconcile",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override,unused-ignore]
        self.exit(2, f"{self.prog}: error: {message} (run `{self.prog} --help` for options and an example)\n")


def _consume_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "consume",
        help="run a consumer: apply change events from Kafka to the aggregates",
        description=(
            "Consume table change events from Kafka and maintain the aggregates defined in "
            "DEFINITIONS (a Python file or module with module-level TableAggregate objects). "
            "State and offsets commit together in --data-dir; a restart resumes exactly."
        ),
        epilog=(
            "example:\n"
            "  tally consume consumers/demo/leaderboard.py --topic scores=game.scores --data-dir ./data\n\n"
            "Each option also reads TALLY_<OPTION> (e.g. TALLY_BOOTSTRAP_SERVERS) and a TOML file\n"
            "(--config, $TALLY_CONFIG or ./tally.toml). Precedence: flag > environment > file > default."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("definitions", nargs="?", help="Python file or module with TableAggregate definitions")
    p.add_argument("--bootstrap-servers", metavar="HOST:PORT", help="Kafka brokers (default 127.0.0.1:9092)")
    p.add_argument("--data-dir", metavar="DIR", help="where state lives (default ./tally-data)")
    p.add_argument(
        "--topic",
        action="append",
        metavar="TABLE=TOPIC",
        help="read TABLE's changes from TOPIC (repeatable; default: the topic named like the table)",
    )
    p.add_argument(
        "--topic-pattern",
        metavar="PATTERN",
        help="the topic of every table without a --topic: {table} is replaced by the table's name, "
        "e.g. 'dbz.public.{table}' for Debezium's <topic.prefix>.<schema>.<table>",
    )
    p.add_argument("--format", choices=["auto", "native", "debezium"], help="event format (default auto)")
    p.add_argument(
        "--decimal-handling",
        choices=["precise", "double", "string"],
        help="the connector's decimal.handling.mode, for NUMERIC columns declared with columns= "
        "in records without a schema (default precise)",
    )
    p.add_argument(
        "--time-precision",
        choices=["adaptive", "adaptive_time_microseconds", "connect"],
        help="the connector's time.precision.mode, for time columns declared with columns= "
        "in records without a schema (default adaptive)",
    )
    p.add_argument(
        "--unavailable-placeholder",
        metavar="TEXT",
        help="the connector's unavailable.value.placeholder (default __debezium_unavailable_value)",
    )
    p.add_argument("--dlq-topic", metavar="NAME", help="dead-letter topic; {topic} = source topic (default {topic}.dlq)")
    p.add_argument("--group-id", help="consumer group for lag monitoring (default tally)")
    p.add_argument(
        "--batch-size", type=int, metavar="N", help="max records per live batch/commit (default 5000)"
    )
    p.add_argument(
        "--replay-batch-size",
        type=int,
        metavar="N",
        help="max records per replay batch/commit (default 50000; larger batches rebuild trees in bulk)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML settings file")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    p.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="serve the HTTP API here (default 127.0.0.1:8750; 0.0.0.0:PORT serves every interface)",
    )
    p.add_argument("--no-http", action="store_true", help="do not serve the HTTP API")
    p.add_argument(
        "--token",
        help="bearer token for state-changing HTTP endpoints; prefer the environment variable "
        "TALLY_TOKEN: a flag is visible to every user in the process list",
    )
    p.add_argument(
        "--http-max-connections",
        type=int,
        metavar="N",
        help="open HTTP connections at most; more are answered 503 and closed "
        "(default: what the open-file limit leaves after RocksDB and Kafka, at most 4096)",
    )
    p.add_argument(
        "--http-idle-timeout", type=float, metavar="S",
        help="close a connection idle this many seconds (default 15)",
    )
    p.add_argument(
        "--http-header-timeout", type=float, metavar="S",
        help="seconds from a request's first byte to the end of its headers, else 408 (default 10)",
    )
    p.add_argument(
        "--http-body-timeout", type=float, metavar="S",
        help="seconds to receive a request body, else 408 (default 30)",
    )
    p.add_argument(
        "--stale",
        choices=["serve", "drop"],
        default="serve",
        help="while a changed definition is rebuilt by replay: keep serving the old generation "
        "(serve, default) or stop serving it at once (drop)",
    )
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit 0 once every partition is consumed up to its end offset "
        "(a batch job: serves HTTP only if --http is given)",
    )
    p.set_defaults(func=_run_consume)


def _run_consume(args: argparse.Namespace) -> int:
    from consumers.cli.settings import load_settings, parse_topic_map
    from consumers.logs import configure_logging
    from consumers.runtime.definitions import load_definitions
    from consumers.runtime.process import ConsumerProcess

    cli = {
        "definitions": args.definitions,
        "bootstrap_servers": args.bootstrap_servers,
        "data_dir": args.data_dir,
        "topics": parse_topic_map(args.topic) if args.topic else None,
        "topic_pattern": args.topic_pattern,
        "format": args.format,
        "decimal_handling": args.decimal_handling,
        "time_precision": args.time_precision,
        "unavailable_placeholder": args.unavailable_placeholder,
        "dlq_topic": args.dlq_topic,
        "group_id": args.group_id,
        "batch_size": args.batch_size,
        "replay_batch_size": args.replay_batch_size,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "http": args.http,
        "token": args.token,
        "http_max_connections": args.http_max_connections,
        "http_idle_timeout": args.http_idle_timeout,
        "http_header_timeout": args.http_header_timeout,
        "http_body_timeout": args.http_body_timeout,
    }
    settings = load_settings(cli, args.config)
    settings.check_topic_pattern()
    if args.no_http or (args.until_caught_up and not args.http):
        settings = msgspec.structs.replace(settings, http=None)
    if not settings.definitions:
        raise TallyError("no definitions given: pass a Python file, e.g. `tally consume consumers/demo/leaderboard.py`")
    if settings.http:
        from consumers.http import parse_address

        parse_address(settings.http)  # a bad --http fails here, before the store opens
    configure_logging(settings.log_level, settings.log_format)
    budget = _file_budget()
    defs = load_definitions(settings.definitions)
    store = Store.open(
        settings.data_dir,
        cache_nodes=settings.cache_nodes,
        max_node_size=settings.max_node_size,
        max_open_files=budget.rocksdb_files,
    )
    try:
        proc = ConsumerProcess(settings, defs, store, stale=args.stale)
        return asyncio.run(proc.run(until_caught_up=args.until_caught_up))
    finally:
        store.close()


def _file_budget() -> FdBudget:
    """Lift the open-file limit to its hard value and share it (consumers/http/limits.py):
    RocksDB, Kafka and the process get their files first, HTTP clients only the rest."""
    from consumers.http.limits import fd_budget, raise_nofile_limit
    from consumers.logs import get_logger

    before, after = raise_nofile_limit()
    budget = fd_budget(after)
    raised = {"raised_from": before} if before != after else {}
    get_logger().info(
        "open-file limit",
        limit=after,
        **raised,
        rocksdb_max_open_files=budget.rocksdb_files,
        reserved=budget.reserved,
    )
    return budget


def _rebuild_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rebuild",
        help="clear and rebuild an aggregate by replaying its topics",
        description=(
            "Rebuild AGGREGATE as a new generation by replaying its topics from the beginning. "
            "The current generation keeps serving until the new one has caught up; then the "
            "switch is atomic. With --url the running consumer starts it now (needs its --token); "
            "with --data-dir (no consumer running) it happens at the consumer's next start."
        ),
        epilog=(
            "examples:\n"
            "  TALLY_TOKEN=... tally rebuild leaderboard --url http://127.0.0.1:8750\n"
            "  tally rebuild leaderboard --data-dir ./data"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("aggregate")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--url", help="a running consumer's HTTP API (env TALLY_URL)")
    src.add_argument("--data-dir", help="a data dir no consumer is running on (env TALLY_DATA_DIR)")
    p.add_argument(
        "--token",
        help="the consumer's bearer token; prefer the environment variable TALLY_TOKEN "
        "(a flag is visible in the process list)",
    )
    p.set_defaults(func=_run_rebuild)


def _run_rebuild(args: argparse.Namespace) -> int:
    import os

    url = args.url or (None if args.data_dir else os.environ.get("TALLY_URL"))
    if url:
        from consumers.client import TallyClient

        token = args.token or os.environ.get("TALLY_TOKEN")
        result = TallyClient(url, token=token).rebuild(args.aggregate)
        print(f"rebuild of {args.aggregate!r} started: {result}")
        return 0
    data_dir = args.data_dir or os.environ.get("TALLY_DATA_DIR") or "./tally-data"
    if not os.path.isdir(data_dir):
        raise TallyError(f"no data dir at {data_dir!r}: pass --data-dir, or --url for a running consumer")
    with Store.open(data_dir) as store:
        g = store.generation(args.aggregate)
        if g is None:
            known = ", ".join(store.generations()) or "none"
            raise TallyError(f"no aggregate named {args.aggregate!r} in {data_dir!r} (known: {known})")
        with store.batch():
            g.rebuild_requested = True
            store.put_generation(args.aggregate, g)
    print(f"rebuild of {args.aggregate!r} requested: it starts with the next `tally consume` on {data_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tally",
        description="tally: order-statistic aggregates over Kafka change streams, in RocksDB.",
        epilog="run `tally COMMAND --help` for a command's options and an example",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    _consume_parser(sub)
    _rebuild_parser(sub)
    for mod in _SUBCOMMANDS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except TallyError as e:
        print(f"tally: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
