"""The `tally` command line.

Every subcommand has ``--help`` with an example. Errors are one clear line on
stderr and the exit code of their kind (`tally.schemas.errors.EXIT_CODES`, listed in
`tally --help`), never a traceback: every subcommand raises, and
`tally.consumers.cli.errors.run_command` reports. Settings of every subcommand come
from `tally.consumers.cli.settings` (flag > environment > TOML file > default).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from tally.consumers.cli.errors import exit_codes_text, run_command
from tally.consumers.cli.parser import Parser, add_config, add_setting, given_settings
from tally.consumers.cli.settings import ENV_CONFIG, load, parse_topic_map
from tally.consumers.cli.stores import open_store
from tally.consumers.version import DISTRIBUTION, version
from tally.engine import Store
from tally.schemas.config import ConsumerSettings, RebuildSettings
from tally.schemas.errors import UsageError

if TYPE_CHECKING:
    from tally.consumers.http.limits import FdBudget

__all__ = ["build_parser", "main"]

# Subcommand modules: each exposes register(subparsers).
_SUBCOMMANDS = (
    "tally.consumers.cli.produce",
    "tally.consumers.cli.query",
    "tally.consumers.demo.app",
    "tally.consumers.cli.reconcile",
)

EPILOG = f"""\
run `tally COMMAND --help` for a command's options and an example.

settings: every setting of a command is a flag, an environment variable
TALLY_<SETTING> (e.g. TALLY_DATA_DIR) and a key of a TOML file (--config FILE,
${ENV_CONFIG}, else ./tally.toml): top-level keys are shared by every command
that has the setting, a [consume], [query], ... section holds one command's.
Precedence: flag > environment > file > default.

exit status (every command):
{exit_codes_text()}
"""


def _consume_parser(sub: argparse._SubParsersAction[Parser]) -> None:
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
            "(--config, $TALLY_CONFIG or ./tally.toml; its [consume] section over top-level\n"
            "keys). "
            "Precedence: flag > environment > file > default.\n"
            "exit status: 0 stopped (or caught up), 1 runtime failure, 2 bad usage or settings, "
            "130 interrupted"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "definitions", nargs="?", help="Python file or module with TableAggregate definitions"
    )
    add_setting(p, ConsumerSettings, "bootstrap_servers", metavar="HOST:PORT", help="Kafka brokers")
    add_setting(p, ConsumerSettings, "data_dir", metavar="DIR", help="where state lives")
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
    p.add_argument(
        "--format", choices=["auto", "native", "debezium"], help="event format (default auto)"
    )
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
    p.add_argument(
        "--dlq-topic",
        metavar="NAME",
        help="dead-letter topic; {topic} = source topic (default {topic}.dlq)",
    )
    p.add_argument(
        "--group-id",
        metavar="G",
        help="be a member of deployment G: every process started with the same group id "
        "(and definitions) shares the topics' partitions and answers reads for the whole "
        "aggregate (default: none, this process owns every partition)",
    )
    p.add_argument(
        "--advertise",
        metavar="URL",
        help="a member's URL for the other members, when it is not http://<--http> "
        "(a container, NAT or proxy)",
    )
    p.add_argument(
        "--session-timeout-ms",
        type=int,
        metavar="MS",
        help="a member that stops heartbeating loses its partitions after this long: the "
        "failover time (default 10000; the broker allows 6000 to 300000 by default)",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="start N members of --group-id on this machine (one core each): member k uses "
        "DATA_DIR/member-k and the --http port + k",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="max records per live batch/commit (default 5000)",
    )
    p.add_argument(
        "--replay-batch-size",
        type=int,
        metavar="N",
        help="max records per replay batch/commit (default 50000; larger batches rebuild trees in bulk)",
    )
    add_config(p)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", choices=["auto", "json", "console"])
    add_setting(
        p,
        ConsumerSettings,
        "http",
        metavar="HOST:PORT",
        help="serve the HTTP API here (0.0.0.0:PORT serves every interface)",
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
        "--http-idle-timeout",
        type=float,
        metavar="S",
        help="close a connection idle this many seconds (default 15)",
    )
    p.add_argument(
        "--http-header-timeout",
        type=float,
        metavar="S",
        help="seconds from a request's first byte to the end of its headers, else 408 (default 10)",
    )
    p.add_argument(
        "--http-body-timeout",
        type=float,
        metavar="S",
        help="seconds to receive a request body, else 408 (default 30)",
    )
    add_setting(
        p,
        ConsumerSettings,
        "stale",
        choices=["serve", "drop"],
        help="while a changed definition is rebuilt by replay: keep serving the old generation "
        "(serve) or stop serving it at once (drop)",
    )
    p.add_argument(
        "--until-caught-up",
        action="store_true",
        help="exit 0 once every partition is consumed up to its end offset "
        "(a batch job: serves HTTP only if --http is given)",
    )
    p.set_defaults(func=_run_consume)


def _run_consume(args: argparse.Namespace) -> int:
    from tally.consumers.logs import configure_logging
    from tally.consumers.runtime.definitions import load_definitions
    from tally.consumers.runtime.process import ConsumerProcess

    cli = given_settings(args, ConsumerSettings)
    cli["topics"] = parse_topic_map(args.topic) if args.topic else None
    settings = load(ConsumerSettings, cli, args.config).settings
    settings.check_topic_pattern()
    if args.no_http or (args.until_caught_up and not args.http):
        settings = msgspec.structs.replace(settings, http=None)
    if not settings.definitions:
        raise UsageError(
            "no definitions given: pass a Python file, e.g. "
            "`tally consume consumers/demo/leaderboard.py` (or $TALLY_DEFINITIONS)"
        )
    if settings.http:
        from tally.consumers.http import parse_address

        parse_address(settings.http)  # a bad --http fails here, before the store opens
    if args.processes is not None:
        from tally.consumers.cluster.processes import run_processes

        return run_processes(settings, args.processes, args.argv)
    configure_logging(settings.log_level, settings.log_format)
    budget = _file_budget()
    defs = load_definitions(settings.definitions)
    if settings.group_id:
        from tally.consumers.cluster.member import MemberProcess

        if args.until_caught_up:
            raise UsageError("--until-caught-up is for a lone consumer; leave out --group-id")
        if settings.advertise:
            from tally.consumers.cluster.assignor import check_advertise_url

            check_advertise_url(settings.advertise)
        member = MemberProcess(settings, defs, max_open_files=budget.rocksdb_files)
        return asyncio.run(member.run())
    store = Store.open(
        settings.data_dir,
        cache_nodes=settings.cache_nodes,
        max_node_size=settings.max_node_size,
        max_open_files=budget.rocksdb_files,
    )
    try:
        proc = ConsumerProcess(settings, defs, store)
        return asyncio.run(proc.run(until_caught_up=args.until_caught_up))
    finally:
        store.close()


def _file_budget() -> FdBudget:
    """Lift the open-file limit to its hard value and share it (consumers/http/limits.py):
    RocksDB, Kafka and the process get their files first, HTTP clients only the rest."""
    from tally.consumers.http.limits import fd_budget, raise_nofile_limit
    from tally.consumers.logs import get_logger

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


def _rebuild_parser(sub: argparse._SubParsersAction[Parser]) -> None:
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
    add_setting(src, RebuildSettings, "url", help="a running consumer's HTTP API")
    add_setting(
        src, RebuildSettings, "data_dir", metavar="DIR", help="a data dir no consumer is running on"
    )
    add_setting(
        p,
        RebuildSettings,
        "token",
        help="the consumer's bearer token; prefer the environment variable TALLY_TOKEN "
        "(a flag is visible in the process list)",
    )
    add_setting(
        p, RebuildSettings, "timeout", type=float, metavar="SECONDS", help="HTTP request timeout"
    )
    add_config(p)
    p.set_defaults(func=_run_rebuild)


def _run_rebuild(args: argparse.Namespace) -> int:
    loaded = load(RebuildSettings, given_settings(args, RebuildSettings), args.config)
    s = loaded.settings
    if s.url and loaded.rank("url") >= loaded.rank("data_dir"):
        from tally.consumers.client import TallyClient

        result = TallyClient(s.url, timeout=s.timeout, token=s.token).rebuild(args.aggregate)
        print(f"rebuild of {args.aggregate!r} started: {result}")
        return 0
    hint = "stop the consumer first, or rebuild through it with --url and its token in TALLY_TOKEN"
    with open_store(s.data_dir, read_only=False, locked_hint=hint) as store:
        g = store.generation(args.aggregate)
        if g is None:
            known = ", ".join(store.generations()) or "none"
            raise UsageError(
                f"no aggregate named {args.aggregate!r} in {s.data_dir!r} (known: {known})"
            )
        with store.batch():
            g.rebuild_requested = True
            store.put_generation(args.aggregate, g)
    print(
        f"rebuild of {args.aggregate!r} requested: it starts with the next `tally consume` "
        f"on {s.data_dir}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="tally",
        description="tally: order-statistic aggregates over Kafka change streams, in RocksDB.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {version()} ({DISTRIBUTION})",
        help="print the installed version and exit",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
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
    """Run ``tally ARGV``; returns the exit status (see `tally.schemas.errors.EXIT_CODES`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return run_command(f"tally {args.command}", args.func, args)


if __name__ == "__main__":
    sys.exit(main())
