"""Diff-and-patch repair (`tally.engine.reconcile`, `tally reconcile`) against a REAL PostgreSQL and a real store.

PostgreSQL is run by scripts/postgres (Debian packages, installed with apt-get
if missing; a throwaway cluster under $TALLY_CACHE_DIR/pg-PORT). The tests skip
with the reason when it cannot be installed or started. Port:
$TALLY_TEST_PG_PORT (default 25432).

The aggregate is built the way a consumer builds it (`Applier`, the trigger
logic, from change events of the table's rows); drift is then injected the
three ways it happens in life: rows changed in Postgres without events, direct
engine writes, and rows deleted in Postgres without events.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from tally.engine import Store, TableAggregate, encode_key
from tally.engine.reconcile import SourceOrderError, diff, keyed, patch, reconcile
from tally.engine.triggers import Applier
from tally.schemas import ChangeEvent

ROOT = Path(__file__).resolve().parents[1]
psycopg = pytest.importorskip(
    "psycopg", reason="psycopg (psycopg[binary]) is not installed in this venv"
)

DEFS = """
from tally.engine import TableAggregate
scores = TableAggregate(
    "scores", table=TABLE, sort_key="score", sum_value="score", namespace="game",
    filter=lambda r: r["score"] >= 0,
)
"""


@pytest.fixture
def table(pg_url: str) -> Any:
    name = f"rc_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(
            f'CREATE TABLE "{name}" (id bigint PRIMARY KEY, game text NOT NULL, score integer NOT NULL)'
        )
        with c.cursor().copy(f'COPY "{name}" (id, game, score) FROM STDIN') as cp:
            for i in range(1, 501):
                cp.write_row((i, "ab"[i % 2], (i * 37) % 1000))
    yield name
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{name}"')


def sql(url: str, stmt: str, *params: Any) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(stmt, params or None)


def rows(url: str, table: str) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with psycopg.connect(url, row_factory=dict_row) as c:
        return list(c.execute(f'SELECT * FROM "{table}" ORDER BY id'))


def definition(table: str) -> TableAggregate:
    return TableAggregate(
        "scores",
        table=table,
        sort_key="score",
        sum_value="score",
        namespace="game",
        filter=lambda r: r["score"] >= 0,
    )


def build_store(path: Path, url: str, table: str) -> Store:
    """The aggregate as a consumer would build it from one upsert event per row."""
    store = Store.open(path)
    d = definition(table)
    events = [ChangeEvent(table, "upsert", r["id"], r) for r in rows(url, table)]
    Applier(store, [d]).apply_events(events)
    return store


def contents(store: Store) -> dict[Any, tuple[Any, Any, Any]]:
    agg = store.aggregate("scores")
    out = {}
    for ns in agg.namespaces():
        for it in agg.iter(ns):
            out[it.id] = (it.namespace, it.key, it.sum_value)
    return out


def expected_contents(url: str, table: str) -> dict[Any, tuple[Any, Any, Any]]:
    return {
        r["id"]: (r["game"], r["score"], r["score"]) for r in rows(url, table) if r["score"] >= 0
    }


def inject_drift(store: Store, url: str, table: str) -> dict[str, set[int]]:
    """Drift of every kind; returns the ids expected in each class."""
    # 1. rows changed in Postgres without events
    sql(url, f'UPDATE "{table}" SET score = score + 1 WHERE id IN (10, 11, 12)')
    sql(url, f"UPDATE \"{table}\" SET game = 'z' WHERE id = 13")  # namespace moves
    sql(url, f'UPDATE "{table}" SET score = -5 WHERE id = 14')  # now filtered out → extra
    sql(
        url, f"INSERT INTO \"{table}\" (id, game, score) VALUES (1000, 'a', 7), (1001, 'b', -1)"
    )  # 1001 filtered
    # 2. direct engine writes
    agg = store.aggregate("scores")
    with store.batch():
        agg.upsert(
            123456, 20, 123456, "a"
        )  # wrong key/sum for id 20 (namespace "a": id 20 is in game "a")
        agg.upsert(1, 5000, 1, "b")  # an id the source never had → extra
        agg.delete(30)  # → missing
    # 3. rows deleted in Postgres without events
    sql(url, f'DELETE FROM "{table}" WHERE id IN (40, 41)')
    return {"wrong": {10, 11, 12, 13, 20}, "extra": {14, 40, 41, 5000}, "missing": {30, 1000}}


def classes(report: Any, n: int = 100) -> dict[str, set[Any]]:
    return {c: {e.id for e in report.examples[c]} for c in ("missing", "extra", "wrong")}


def run_cli(*argv: str) -> tuple[int, str, str]:
    """`tally reconcile ...` in process, through the `tally` entry point (its parser and its one
    error reporter, which fixes the exit code)."""
    import contextlib
    import io

    from tally.consumers.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["reconcile", *argv])
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------ engine API


def test_in_sync_after_build(tmp_path: Path, pg_url: str, table: str) -> None:
    from tally.consumers.reconcile.sources import postgres_source

    store = build_store(tmp_path / "s", pg_url, table)
    try:
        d = definition(table)
        rep = diff(store.aggregate("scores"), d, postgres_source(pg_url, table, ["id"]))
        assert rep.in_sync, rep
        assert rep.rows_scanned == 500 and rep.items_scanned == 500
    finally:
        store.close()


def test_dry_run_reports_exactly_the_drift_then_patch_converges(
    tmp_path: Path, pg_url: str, table: str
) -> None:
    from tally.consumers.reconcile.sources import postgres_source

    store = build_store(tmp_path / "s", pg_url, table)
    try:
        want = inject_drift(store, pg_url, table)
        d = definition(table)
        agg = store.aggregate("scores")
        before = contents(store)
        rep = diff(agg, d, postgres_source(pg_url, table, ["id"]), examples=100)
        assert classes(rep) == want
        assert (rep.missing, rep.extra, rep.wrong) == (2, 4, 5)
        assert rep.rows_filtered == 2  # 14 and 1001
        assert contents(store) == before  # a dry run changes nothing
        ex = {e.id: e for e in rep.examples["wrong"]}
        assert ex[20].actual == {"namespace": "a", "key": 123456, "sum": 123456}
        assert ex[13].expected is not None and ex[13].expected["namespace"] == "z"

        rep2 = reconcile(agg, d, postgres_source(pg_url, table, ["id"]), apply=True, batch_size=3)
        assert rep2.patched == 11
        assert contents(store) == expected_contents(pg_url, table)
        agg.validate()
        assert diff(agg, d, postgres_source(pg_url, table, ["id"])).in_sync
    finally:
        store.close()


def test_patch_function_and_source_order_check(tmp_path: Path) -> None:
    d = TableAggregate("t", table="t", sort_key="k")
    with Store.open(tmp_path / "s") as store:
        agg = store.aggregate("t")
        src = [{"id": i, "k": i * 2} for i in (1, 2, 3)]
        changes: list[Any] = []
        rep = diff(agg, d, keyed(d, src), on_change=lambda e, p: changes.append((e, p)))
        assert rep.missing == 3
        assert patch(agg, changes) == 3
        assert [(it.id, it.key) for it in agg.iter()] == [(1, 2), (2, 4), (3, 6)]
        with pytest.raises(SourceOrderError, match="sorted"):
            diff(agg, d, keyed(d, [{"id": 2, "k": 0}, {"id": 1, "k": 0}]))
        with pytest.raises(SourceOrderError, match="twice"):
            diff(agg, d, keyed(d, [{"id": 1, "k": 0}, {"id": 1, "k": 0}]))
        # ints sort numerically, strings by code point, numbers before strings
        ids = [-5, 2, 10, "A", "a", "é", "中"]
        src2 = [{"id": i, "k": 0} for i in ids]
        assert [e for e, _ in keyed(d, src2)] == sorted(encode_key(i) for i in ids)


def test_progress_reports_rows_and_differences(tmp_path: Path) -> None:
    d = TableAggregate("t", table="t", sort_key="k")
    with Store.open(tmp_path / "s") as store:
        agg = store.aggregate("t")
        src = [{"id": i, "k": i} for i in range(1, 251)]
        seen: list[tuple[int, int]] = []
        rep = diff(
            agg, d, keyed(d, src), progress=lambda r, n: seen.append((r, n)), progress_every=100
        )
        # every 100 rows, then once at the end with the final counts
        assert seen == [(100, 100), (200, 200), (250, 250)]
        assert rep.differences == 250


def test_text_ids_with_c_collation(tmp_path: Path, pg_url: str) -> None:
    from tally.consumers.reconcile.sources import postgres_source

    name = f"rc_{uuid.uuid4().hex[:10]}"
    # a non-C default collation would order "B" < "a" ... : the source must ORDER BY ... COLLATE "C"
    sql(pg_url, f'CREATE TABLE "{name}" (id text PRIMARY KEY, v integer)')
    try:
        ids = ["b", "B", "a", "Z", "é", "e", "10", "9", "中"]
        for i in ids:
            sql(pg_url, f'INSERT INTO "{name}" VALUES (%s, 1)', i)
        d = TableAggregate("t", table=name, sort_key="v")
        with Store.open(tmp_path / "s") as store:
            rep = reconcile(
                store.aggregate("t"), d, postgres_source(pg_url, name, ["id"]), apply=True
            )
            assert rep.missing == len(ids) and rep.patched == len(ids)
            assert diff(store.aggregate("t"), d, postgres_source(pg_url, name, ["id"])).in_sync
    finally:
        sql(pg_url, f'DROP TABLE "{name}"')


# ------------------------------------------------------------------------ CLI


def write_defs(tmp_path: Path, table: str) -> str:
    p = tmp_path / "defs.py"
    p.write_text(f"TABLE = {table!r}\n" + DEFS)
    return str(p)


def test_cli_dry_run_and_patch_postgres(tmp_path: Path, pg_url: str, table: str) -> None:
    store = build_store(tmp_path / "data", pg_url, table)
    want = inject_drift(store, pg_url, table)
    store.close()
    defs = write_defs(tmp_path, table)
    base = [
        "scores",
        "--source",
        pg_url,
        "--definitions",
        defs,
        "--data-dir",
        str(tmp_path / "data"),
    ]

    code, out, err = run_cli(*base, "--json", "--examples", "50", "--fail-on-drift")
    assert code == 3, err
    rep = json.loads(out)
    assert {c: {e["id"] for e in rep["examples"][c]} for c in want} == want
    assert rep["patched"] is None

    code, out, err = run_cli(*base)  # human table
    assert code == 0 and "11 difference(s)" in out and "missing" in out

    code, out, err = run_cli(*base, "--patch", "--json")
    assert code == 0, err
    assert json.loads(out)["patched"] == 11
    with Store.open(tmp_path / "data", read_only=True) as s:
        assert contents(s) == expected_contents(pg_url, table)
    code, out, _ = run_cli(*base, "--json", "--fail-on-drift")
    assert code == 0 and json.loads(out)["missing"] == 0


def test_cli_snapshot_files(tmp_path: Path, pg_url: str, table: str) -> None:
    store = build_store(tmp_path / "data", pg_url, table)
    inject_drift(store, pg_url, table)
    store.close()
    defs = write_defs(tmp_path, table)
    src = rows(pg_url, table)
    import random

    random.Random(1).shuffle(src)  # a snapshot need not be sorted
    jl = tmp_path / "snap.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in src))
    cs = tmp_path / "snap.csv"
    cs.write_text("id,game,score\n" + "".join(f"{r['id']},{r['game']},{r['score']}\n" for r in src))
    base = ["scores", "--definitions", defs, "--data-dir", str(tmp_path / "data"), "--json"]
    for f in (jl, cs):
        code, out, err = run_cli(*base, "--source", str(f))
        assert code == 0, err
        r = json.loads(out)
        assert (r["missing"], r["extra"], r["wrong"]) == (2, 4, 5), f
    # external sort path: tiny runs
    from tally.consumers.reconcile.sources import snapshot_source

    got = [e for e, _ in snapshot_source(str(jl), ["id"], run_rows=7)]
    assert got == sorted(got) and len(got) == len(src)
    code, out, err = run_cli(*base, "--source", str(cs), "--patch")
    assert code == 0 and json.loads(out)["patched"] == 11
    with Store.open(tmp_path / "data", read_only=True) as s:
        assert contents(s) == expected_contents(pg_url, table)


def test_cli_errors_are_one_line(tmp_path: Path, pg_url: str, table: str) -> None:
    store = build_store(tmp_path / "data", pg_url, table)
    defs = write_defs(tmp_path, table)
    base = ["scores", "--definitions", defs, "--data-dir", str(tmp_path / "data")]
    try:
        # --patch while the store is open for writing elsewhere (a running consumer holds the lock)
        code, _, err = run_cli(*base, "--source", pg_url, "--patch")
        assert code == 1 and "locked" in err and "--url" in err and err.count("\n") == 1, err
    finally:
        store.close()
    # (args, exit code, fragment): 1 = the source does not answer, 2 = the command is wrong
    cases = [
        (["--source", "postgresql://postgres@127.0.0.1:1/tally"], 1, "cannot connect to Postgres"),
        (["--source", pg_url, "--table", "no_such_table"], 2, "cannot read table"),
        (["--source", str(tmp_path / "nope.jsonl")], 2, "does not exist"),
        (["--source", "s3://bucket/x"], 2, "unsupported source"),
    ]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "game": "a", "score": 1}\nnot json\n')
    cases.append((["--source", str(bad)], 2, "bad.jsonl line 2: invalid JSON"))
    for extra, want, frag in cases:
        code, _, err = run_cli(*base, *extra)
        assert code == want and frag in err and err.count("\n") == 1, (extra, err)
        assert err.startswith("tally reconcile: error: "), err


def test_cli_compacted_topic_source(
    tmp_path: Path, pg_url: str, table: str, kafka_bootstrap: str
) -> None:
    """kafka:TOPIC: the latest row per id of a change topic (upserts, deletes, tombstones) is the truth."""
    from kafka_util import create_topic, produce, unique_topic

    store = build_store(tmp_path / "data", pg_url, table)
    want = inject_drift(store, pg_url, table)
    store.close()
    topic = unique_topic("reconcile")
    create_topic(kafka_bootstrap, topic, partitions=3, compacted=True)
    recs: list[Any] = []
    for r in rows(
        pg_url, table
    ):  # the table's current rows, after a stale version of a few of them
        key = json.dumps({"id": r["id"]}).encode()
        if r["id"] % 50 == 0:
            stale = {"table": table, "op": "update", "id": r["id"], "after": {**r, "score": 999}}
            recs.append((key, json.dumps(stale).encode()))
        recs.append(
            (key, json.dumps({"table": table, "op": "insert", "id": r["id"], "after": r}).encode())
        )
    # rows that existed and were deleted: a delete event and a tombstone
    recs.append(
        (
            b'{"id": 40}',
            json.dumps(
                {
                    "table": table,
                    "op": "insert",
                    "id": 40,
                    "after": {"id": 40, "game": "a", "score": 1},
                }
            ).encode(),
        )
    )
    recs.append((b'{"id": 40}', json.dumps({"table": table, "op": "delete", "id": 40}).encode()))
    recs.append(
        (
            b'{"id": 41}',
            json.dumps(
                {
                    "table": table,
                    "op": "insert",
                    "id": 41,
                    "after": {"id": 41, "game": "b", "score": 1},
                }
            ).encode(),
        )
    )
    recs.append((b'{"id": 41}', None))
    produce(kafka_bootstrap, topic, recs)
    defs = write_defs(tmp_path, table)
    base = ["scores", "--definitions", defs, "--data-dir", str(tmp_path / "data"), "--json"]
    src = ["--source", f"kafka:{topic}", "--bootstrap-servers", kafka_bootstrap]
    code, out, err = run_cli(*base, *src, "--examples", "50")
    assert code == 0, err
    r = json.loads(out)
    assert {c: {e["id"] for e in r["examples"][c]} for c in want} == want
    code, out, err = run_cli(*base, *src, "--patch")
    assert code == 0 and json.loads(out)["patched"] == 11, err
    with Store.open(tmp_path / "data", read_only=True) as s:
        assert contents(s) == expected_contents(pg_url, table)
    code, _, err = run_cli(
        *base,
        "--source",
        "kafka:no-such-topic-" + uuid.uuid4().hex,
        "--bootstrap-servers",
        kafka_bootstrap,
    )
    assert code == 2 and "does not exist" in err and err.count("\n") == 1, err


def test_csv_snapshot_cells_follow_tally_produce_rule(tmp_path: Path) -> None:
    """A CSV file produced with `tally produce` and reconciled against must read the same both ways."""
    from tally.consumers.cli import produce as cli_produce
    from tally.consumers.reconcile.sources import snapshot_source

    path = tmp_path / "snap.csv"
    path.write_text("id,a,b,c,d,e\n1,true,,1e400,7,2.5\n")
    ((_, row),) = list(snapshot_source(str(path), ["id"]))
    assert row == {"id": 1, "a": "true", "b": None, "c": "1e400", "d": 7, "e": 2.5}
    cells = {"id": "1", "a": "true", "b": "", "c": "1e400", "d": "7", "e": "2.5"}
    assert row == {k: cli_produce.infer_value(v) for k, v in cells.items()}
