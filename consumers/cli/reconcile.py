"""`tally reconcile`: diff an aggregate against its source of truth, and optionally patch it.

    tally reconcile AGGREGATE --source SOURCE --definitions FILE --data-dir DIR
                    [--table T] [--id-column C ...] [--dry-run | --patch] [--json]

SOURCE is a ``postgresql://`` URL (read the table ``--table``, default the
definition's table, ordered by ``--id-column``, default the definition's
``id_field``), ``kafka:TOPIC`` (a compacted change topic read to its end,
latest row per id; ``--bootstrap-servers``) or a JSON Lines / CSV snapshot
file. See `tally.engine.reconcile` for
the classes (missing / extra / wrong) and `tally.consumers.reconcile.sources` for
the ordering assumptions.

``--dry-run`` (the default) opens the data dir read-only (a RocksDB
secondary instance): safe while a consumer runs, and it writes nothing.
``--patch`` without ``--url`` opens it for writing, so no consumer may run on
it (RocksDB's lock refuses, and we say so); fixes go through the consumer's
write path (`Aggregate.apply_many`) in batches.

``--patch --url URL --token T`` patches a *running* consumer: the diff reads
the data dir read-only and each fix is applied inside the consumer between
two live batches, skipping ids the live stream wrote since the reconcile
began (see `tally.consumers.runtime.patches` for why this never overwrites a newer live
change with an older source read). Snapshot files are refused there.

A progress bar (rows, rows/s, differences) goes to stderr on a terminal; a
line every `progress_interval` (10) seconds otherwise (`tally.consumers.cli.progress`).
``--definitions``, ``--data-dir``, ``--url``, ``--token``, ``--bootstrap-servers``
and ``--progress`` are settings (`tally.schemas.config.ReconcileSettings`).

Exit status (`tally.schemas.errors.EXIT_CODES`): 0 in sync (or patched), 2 bad usage,
an unreadable source file or line, an unknown aggregate, 1 a source or consumer
that does not answer, a missing or locked data dir, an aggregate not ready, 3
differences found with ``--fail-on-drift`` on a dry run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import msgspec

from tally.consumers.cli.errors import DriftFound
from tally.consumers.cli.parser import add_config, add_setting, given_settings
from tally.consumers.cli.progress import Tick, progress
from tally.consumers.cli.settings import Loaded, load
from tally.consumers.cli.stores import open_store
from tally.engine import Store, TallyError
from tally.schemas.config import ReconcileSettings
from tally.schemas.errors import UsageError

__all__ = ["register", "run_reconcile"]

LOCKED_HINT = (
    "patch through it with --url http://HOST:PORT and its token in TALLY_TOKEN (its HTTP API), "
    "or stop it first (a dry run is read-only and works either way)"
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``reconcile`` to the `tally` CLI."""
    p = subparsers.add_parser(
        "reconcile",
        help="diff an aggregate against its source of truth (Postgres table, compacted topic or snapshot file); optionally patch",
        description=(
            "Compare AGGREGATE with the rows of its source of truth in one streaming merge by id, "
            "and report missing, extra and wrong items. With --patch, fix them through the "
            "consumer's write path: offline (no consumer on the data dir), or inside the running "
            "consumer with --url."
        ),
        epilog=(
            "examples:\n"
            "  tally reconcile scores --source postgresql://app@db/app --definitions defs.py --data-dir ./data\n"
            "  tally reconcile scores --source snapshot.jsonl --definitions defs.py --data-dir ./data --patch\n"
            "  tally reconcile scores --source kafka:game.scores --definitions defs.py --data-dir ./data\n"
            "  tally reconcile scores --source postgresql://app@db/app --definitions defs.py --data-dir ./data \\\n"
            "      --patch --url http://127.0.0.1:8750    # while the consumer runs; token in $TALLY_TOKEN\n"
            "\nexit status: 0 in sync or patched, 1 unreachable source/consumer or locked\n"
            "data dir, "
            "2 bad usage or source, 3 drift found (with --fail-on-drift)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("aggregate", help="logical aggregate name (as in the definitions)")
    p.add_argument(
        "--source",
        required=True,
        help="postgresql://... URL, kafka:TOPIC (a compacted change topic read to its end), "
        "or a .jsonl / .csv snapshot file",
    )
    add_setting(
        p,
        ReconcileSettings,
        "bootstrap_servers",
        metavar="HOST:PORT",
        help="Kafka for a kafka: source",
    )
    p.add_argument(
        "--table",
        help="Postgres table / the topic's table (default: the definition's table); schema.table allowed",
    )
    p.add_argument(
        "--id-column",
        action="append",
        metavar="C",
        help="id column (repeat for a composite id; default: the definition's id_field)",
    )
    p.add_argument(
        "--format",
        choices=["jsonl", "csv"],
        help="snapshot file format (default: from the extension)",
    )
    add_setting(
        p, ReconcileSettings, "definitions", help="Python file or module with the TableAggregate"
    )
    add_setting(p, ReconcileSettings, "data_dir", metavar="DIR", help="the store directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="only report (default; read-only, safe while a consumer runs)",
    )
    mode.add_argument(
        "--patch",
        action="store_true",
        help="fix the differences: offline (no consumer on --data-dir), or through the running consumer with --url",
    )
    add_setting(
        p,
        ReconcileSettings,
        "url",
        help="with --patch: the running consumer's HTTP API; fixes are applied inside it, never "
        "over a newer live change",
    )
    add_setting(
        p,
        ReconcileSettings,
        "token",
        help="the consumer's token, for --url; prefer the environment variable TALLY_TOKEN "
        "(a flag is visible in the process list)",
    )
    add_setting(
        p,
        ReconcileSettings,
        "progress",
        choices=["auto", "bar", "lines", "none"],
        help="progress on stderr: a bar on a terminal, a line every progress_interval seconds "
        "otherwise (auto)",
    )
    p.add_argument(
        "--examples", type=int, default=10, metavar="N", help="examples kept per class (default 10)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=10_000,
        metavar="N",
        help="ids per patch commit (default 10000)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    p.add_argument(
        "--fail-on-drift", action="store_true", help="exit 3 when a dry run finds differences"
    )
    add_config(p)
    p.set_defaults(func=run_reconcile)


def _open_source(args: argparse.Namespace, settings: ReconcileSettings, definition: Any) -> Any:
    from tally.consumers.reconcile.sources import (
        SourceError,
        postgres_source,
        snapshot_source,
        topic_source,
    )

    src: str = args.source
    ids = args.id_column or list(definition.id_fields)
    if src.startswith(("postgresql://", "postgres://")):
        return postgres_source(src, args.table or definition.table, ids)
    if src.startswith("kafka:"):
        topic = src[len("kafka:") :].lstrip("/")
        if not topic:
            raise SourceError("a topic source is kafka:TOPIC, e.g. --source kafka:game.scores")
        return topic_source(
            settings.bootstrap_servers,
            topic,
            args.table or definition.table,
            ids,
            column_types=definition.columns,
        )
    if "://" in src:
        raise SourceError(
            f"unsupported source {src!r}: use a postgresql:// URL, kafka:TOPIC or a .jsonl/.csv file"
        )
    if args.table:
        raise SourceError("--table only applies to a postgresql:// or kafka: source")
    return snapshot_source(src, ids, fmt=args.format)


def _open_store(data_dir: str, write: bool) -> Store:
    return open_store(data_dir, read_only=not write, locked_hint=LOCKED_HINT)


def run_reconcile(args: argparse.Namespace) -> int:
    from tally.consumers.runtime.definitions import load_definitions
    from tally.engine.reconcile import reconcile

    loaded = load(ReconcileSettings, given_settings(args, ReconcileSettings), args.config)
    settings = loaded.settings
    spec = settings.definitions
    if not spec:
        raise UsageError(
            "reconcile needs the aggregate's definition: pass --definitions FILE "
            "(or $TALLY_DEFINITIONS)"
        )
    if args.examples < 0 or args.batch_size < 1:
        raise UsageError("--examples must be >= 0 and --batch-size >= 1")
    defs = {d.name: d for d in load_definitions(spec)}
    definition = defs.get(args.aggregate)
    if definition is None:
        raise UsageError(
            f"no aggregate named {args.aggregate!r} in {spec!r} (defined: {', '.join(defs) or 'none'})"
        )
    data_dir = settings.data_dir
    url = settings.url
    deployment = (
        _deployment_status(url, settings.token)
        if url and (args.patch or loaded.origin.get("url") == "flag")
        else None
    )
    if deployment is not None:
        if args.patch and not _reads_at_run_time(args.source):
            raise UsageError(
                "a snapshot file cannot patch a running deployment: its moment is unknown, so "
                "fixes could undo newer live changes. Reconcile against the table "
                "(postgresql://...) or topic (kafka:...)"
            )
        source = _open_source(args, settings, definition)
        report = _deployment_reconcile(
            args, settings, definition, source, deployment, _estimate(args, definition)
        )
        return _finish(args, report)
    if loaded.origin.get("url") == "flag" and not args.patch:
        raise UsageError(
            "--url is for --patch through a running consumer; a dry run reads --data-dir directly"
        )
    live = bool(args.patch and url)
    if live and not _reads_at_run_time(args.source):
        raise UsageError(
            "a snapshot file cannot patch a running consumer: its moment is unknown, so fixes could undo "
            "newer live changes. Reconcile against the table (postgresql://...) or topic (kafka:...), or "
            "stop the consumer and --patch offline"
        )
    # Postgres connects and snapshot files are checked here, before the store opens;
    # a kafka: source connects when it is first read.
    source = _open_source(args, settings, definition)
    estimate = _estimate(args, definition)
    if live:
        report = _live_patch(args, loaded, definition, source, url or "", estimate)
    else:
        store = _open_store(data_dir, args.patch)
        try:
            gen = store.generation(args.aggregate)
            if gen is not None and gen.active is None:
                raise TallyError(
                    f"aggregate {args.aggregate!r} has no ready generation yet (it is being built "
                    "by replay)",
                    hint="reconcile once the consumer has built it (`tally status` shows progress)",
                )
            if args.patch and gen is not None and gen.building is not None:
                raise TallyError(
                    f"aggregate {args.aggregate!r} is being rebuilt (generation {gen.building!r}); "
                    "patch after the rebuild finishes"
                )
            agg = store.aggregate(args.aggregate)
            with _progress(settings, estimate) as on_progress:
                report = reconcile(
                    agg,
                    definition,
                    source,
                    apply=args.patch,
                    examples=args.examples,
                    batch_size=args.batch_size,
                    progress=on_progress,
                )
        finally:
            store.close()
    return _finish(args, report)


def _finish(args: argparse.Namespace, report: Any) -> int:
    if args.json:
        # Decimal keys and sums as exact JSON numbers, like the HTTP API's answers.
        out = msgspec.json.Encoder(decimal_format="number").encode(report)
        sys.stdout.write(out.decode() + "\n")
    else:
        _print_report(report)
    if args.fail_on_drift and report.patched is None and not report.in_sync:
        sys.stdout.flush()
        raise DriftFound(
            f"{report.differences} difference(s) between {args.aggregate!r} and the source "
            "(--fail-on-drift)",
            hint="see the report above; --patch fixes them",
        )
    return 0


def _deployment_status(url: str, token: str | None) -> dict[str, Any] | None:
    """The /status of the consumer at ``url`` if it is a member of a deployment, else None."""
    from tally.consumers.client import TallyClient
    from tally.consumers.cluster.reconcile import is_member

    status = TallyClient(url, timeout=30.0, token=token).status()
    return status if is_member(status) else None


def _deployment_reconcile(
    args: argparse.Namespace,
    settings: ReconcileSettings,
    definition: Any,
    source: Any,
    status: dict[str, Any],
    estimate: int | None,
) -> Any:
    """Diff a deployment's aggregate, read from its members; with --patch, each fix goes to
    its row's partition on the member owning it (`tally.consumers.cluster.reconcile`)."""
    from tally.consumers.cluster.reconcile import DeploymentReconcile
    from tally.engine.reconcile import diff

    name = args.aggregate
    dep = DeploymentReconcile(
        status,
        name,
        definition.id_fields,
        fingerprint=definition.fingerprint,
        batch_size=min(args.batch_size, 5_000),
    )
    try:
        if args.patch:
            dep.begin()  # before the source is read: see tally.consumers.runtime.patches
            if dep.fingerprints != {definition.fingerprint}:
                raise UsageError(
                    f"the deployment runs another definition of {name!r} (fingerprint "
                    f"{', '.join(sorted(dep.fingerprints))} vs {definition.fingerprint} in "
                    f"{settings.definitions}): reconcile with the definitions file it runs"
                )
        t0 = time.perf_counter()
        with _progress(settings, estimate) as on_progress:
            report = diff(
                cast(Any, dep),
                definition,
                source,
                examples=args.examples,
                on_change=dep if args.patch else None,
                progress=on_progress,
            )
        if args.patch:
            report.patched = dep.close()
            report.skipped_live = dep.skipped_live
            report.unplaced = dep.unplaced
        report.physical = dep.physical
        report.elapsed_s = round(time.perf_counter() - t0, 3)
    except BaseException:
        dep.abort()
        raise
    finally:
        dep.shutdown()
    if dep.unplaced:
        print(
            f"tally: {dep.unplaced} missing row(s) were not added (e.g. ids "
            f"{', '.join(map(repr, dep.unplaced_examples))}): the partition their events would "
            "land in is not known yet (no partition has consumed a record since its member "
            "started, or the topic's record keys are not tally's nor Debezium's). Run the "
            "reconcile again once events flow, or `tally rebuild` the aggregate",
            file=sys.stderr,
        )
    return report


def _reads_at_run_time(src: str) -> bool:
    return src.startswith(("postgresql://", "postgres://", "kafka:"))


def _estimate(args: argparse.Namespace, definition: Any) -> int | None:
    if args.source.startswith(("postgresql://", "postgres://")):
        from tally.consumers.reconcile.sources import postgres_row_estimate

        return postgres_row_estimate(args.source, args.table or definition.table)
    return None


def _live_patch(
    args: argparse.Namespace,
    loaded: Loaded[ReconcileSettings],
    definition: Any,
    source: Any,
    url: str,
    estimate: int | None,
) -> Any:
    """Diff read-only here; fixes applied inside the running consumer (`tally.consumers.runtime.patches`)."""
    from tally.consumers.client import TallyClient
    from tally.consumers.client.patcher import RemotePatcher
    from tally.engine.reconcile import diff

    settings = loaded.settings
    data_dir = settings.data_dir
    client = TallyClient(url, timeout=60.0, token=settings.token)
    name = args.aggregate
    patcher = RemotePatcher(client, name, batch_size=min(args.batch_size, 5_000))
    session = patcher.begin()  # before the source is read: see tally.consumers.runtime.patches
    try:
        if session["fingerprint"] != definition.fingerprint:
            raise UsageError(
                f"the consumer at {url} runs another definition of {name!r} (fingerprint "
                f"{session['fingerprint']} vs {definition.fingerprint} in "
                f"{settings.definitions}): "
                "reconcile with the definitions file the consumer runs"
            )
        store = _open_store(data_dir, False)
        try:
            agg = store.aggregate(name)
            if agg.physical != session["generation"]:
                raise UsageError(
                    f"{name!r} in {data_dir!r} is generation {agg.physical!r} but the consumer at {url} "
                    f"writes {session['generation']!r}: is --data-dir the consumer's data dir?"
                )
            t0 = time.perf_counter()
            with _progress(settings, estimate) as on_progress:
                report = diff(
                    agg,
                    definition,
                    source,
                    examples=args.examples,
                    on_change=patcher,
                    progress=on_progress,
                )
        finally:
            store.close()
        report.patched = patcher.close()
    except BaseException:
        patcher.abort()
        raise
    report.skipped_live = patcher.skipped_live
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    return report


def _detail(tick: Tick) -> str:
    of = f" of ~{tick.total:,} (estimated)" if tick.total else ""
    diffs = int(tick.fields.get("differences", 0))
    return f"{tick.done:,}{of} rows, {tick.rate:,.0f} rows/s, {diffs:,} differences"


@contextmanager
def _progress(
    settings: ReconcileSettings, total: int | None
) -> Iterator[Callable[[int, int], None] | None]:
    """A ``progress(rows, differences)`` callback for `tally.engine.reconcile.diff` (None: none shown)."""
    if settings.progress == "none":
        yield None
        return
    with progress(
        settings.progress,
        title="reconcile",
        total=total,
        detail=_detail,
        interval=settings.progress_interval,
    ) as shown:

        def update(rows: int, differences: int) -> None:
            shown.update(rows, differences=differences)

        yield update


def _fmt(side: dict[str, Any] | None) -> str:
    if side is None:
        return "—"
    ns = side["namespace"]
    s = f"key={side['key']!r} sum={side['sum']!r}"
    return s if ns is None else f"ns={ns!r} {s}"


def _print_report(r: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    state = "in sync" if r.in_sync else f"{r.differences} difference(s)"
    if r.patched is not None:
        state += f", {r.patched} id(s) patched"
    if r.skipped_live:
        state += f", {r.skipped_live} left to the live stream (written live during the reconcile)"
    con.print(
        f"[bold]{r.aggregate}[/bold] ({r.physical}): {state} — "
        f"{r.rows_scanned} source rows ({r.rows_filtered} filtered out), {r.items_scanned} items, {r.elapsed_s}s"
    )
    t = Table("class", "count")
    for c in ("missing", "extra", "wrong"):
        t.add_row(c, str(getattr(r, c)))
    con.print(t)
    if not r.in_sync:
        ex = Table("class", "id", "expected (source)", "actual (aggregate)", title="examples")
        for c in ("missing", "extra", "wrong"):
            for e in r.examples[c]:
                ex.add_row(c, repr(e.id), _fmt(e.expected), _fmt(e.actual))
        con.print(ex)
