"""Reconciling while a consumer is live: real PostgreSQL (the table), real broker, real consumer process.

The "application" writes a row to Postgres and produces its change event, the
way a service with an outbox (or Debezium) does. Drift is injected by writing
Postgres without producing (lost events, manual fixes), by buggy events, and by
deleting records from the topic before a backfill (events lost from the topic).
Direct engine writes are covered offline in test_reconcile.py (a running
consumer holds the data dir's lock).
Then `tally reconcile --patch --url` runs against the running consumer.

The race the live patch must win: the source is read, then a live event
changes an id the diff is about to fix. Applying the older source read would
silently undo the newer change; the session must skip that id.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from consumer_util import TALLY, child_env, free_port, open_store, tail, topic_end_offsets, wait_for
from kafka_util import create_topic, unique_topic
from prometheus_client.parser import text_string_to_metric_families

from tally.consumers.client import ClientError, RemotePatcher, TallyClient
from tally.consumers.producer import SyncChangeProducer
from tally.consumers.reconcile.sources import postgres_source
from tally.engine import TableAggregate
from tally.engine.reconcile import diff, encode_fixes
from tally.schemas import NativeEvent

psycopg = pytest.importorskip(
    "psycopg", reason="psycopg (psycopg[binary]) is not installed in this venv"
)

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sekret"

DEFS = """
from tally.engine import TableAggregate
scores = TableAggregate("scores", table={table!r}, sort_key="score", sum_value="score", namespace="game")
"""


def definition(table: str) -> TableAggregate:
    return TableAggregate(
        "scores", table=table, sort_key="score", sum_value="score", namespace="game"
    )


class App:
    """Writes Postgres and (unless told not to) produces the matching native change event."""

    def __init__(self, url: str, table: str, bootstrap: str, topic: str) -> None:
        self.url, self.table, self.bootstrap, self.topic = url, table, bootstrap, topic
        self.conn = psycopg.connect(url, autocommit=True)
        self.lock = threading.Lock()
        self.producer = SyncChangeProducer(bootstrap)
        self.producer.start()

    def close(self) -> None:
        self.producer.stop()
        self.conn.close()

    def write(
        self,
        changes: list[tuple[str, int, str, int]],
        *,
        emit: bool = True,
        op_override: str | None = None,
    ) -> None:
        """changes: (op, id, game, score), op insert / update / upsert / delete; events in the same order.

        ``upsert`` writes the row whether or not it exists and emits insert or update accordingly.
        """
        events = []
        t = f'"{self.table}"'
        with self.lock:
            for op, rid, game, score in changes:
                if op == "insert":
                    self.conn.execute(
                        f"INSERT INTO {t} (id, game, score) VALUES (%s, %s, %s)", (rid, game, score)
                    )
                elif op == "update":
                    self.conn.execute(
                        f"UPDATE {t} SET game = %s, score = %s WHERE id = %s", (game, score, rid)
                    )
                elif op == "upsert":
                    (inserted,) = self.conn.execute(
                        f"INSERT INTO {t} (id, game, score) VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE "
                        "SET game = excluded.game, score = excluded.score RETURNING (xmax = 0)",
                        (rid, game, score),
                    ).fetchone()
                    op = "insert" if inserted else "update"
                else:
                    self.conn.execute(f"DELETE FROM {t} WHERE id = %s", (rid,))
                row = None if op == "delete" else {"id": rid, "game": game, "score": score}
                events.append(NativeEvent(self.table, op_override or op, id=rid, after=row))  # type: ignore[arg-type]
        if emit:
            self.producer.send_many(self.topic, events)

    def rows(self) -> dict[int, tuple[str, int, int]]:
        with self.lock:
            cur = self.conn.execute(f'SELECT id, game, score FROM "{self.table}"')
            return {r[0]: (r[1], r[2], r[2]) for r in cur.fetchall()}


@pytest.fixture
def table(pg_url: str) -> Iterator[str]:
    name = f"lr_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(
            f'CREATE TABLE "{name}" (id bigint PRIMARY KEY, game text NOT NULL, score integer NOT NULL)'
        )
    yield name
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(f'DROP TABLE IF EXISTS "{name}"')


class Live:
    """A running `tally consume` with its HTTP API and token."""

    def __init__(self, tmp: Path, table: str, topic: str, bootstrap: str) -> None:
        self.defs = tmp / "defs.py"
        self.defs.write_text(DEFS.format(table=table))
        self.data = tmp / "data"
        self.log = tmp / "consume.log"
        self.topic, self.bootstrap = topic, bootstrap
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [
                    TALLY,
                    "consume",
                    str(self.defs),
                    "--topic",
                    f"{table}={topic}",
                    "--data-dir",
                    str(self.data),
                    "--http",
                    f"127.0.0.1:{port}",
                    "--token",
                    TOKEN,
                    "--log-format",
                    "json",
                    "--bootstrap-servers",
                    bootstrap,
                ],
                stderr=err,
                stdout=subprocess.DEVNULL,
                env=child_env(),
                cwd=str(tmp),
            )
        self.client = TallyClient(self.url, token=TOKEN)

    def tail(self) -> str:
        return tail(self.log, 4000)

    def caught_up(self) -> bool:
        assert self.proc.poll() is None, f"consumer exited {self.proc.returncode}:\n{self.tail()}"
        ends = topic_end_offsets(self.bootstrap, self.topic)
        try:
            st = self.client.status()
        except ClientError:
            return False
        if any(a["state"] != "ready" for a in st["aggregates"]):
            return False
        done = {p["partition"]: p["offset"] for p in st["partitions"] if p["topic"] == self.topic}
        return all(
            (done.get(p) or 0) >= end for p, end in ends.items()
        )  # offset is null before the first batch

    def wait_caught_up(self) -> None:
        wait_for(self.caught_up, "the consumer to apply every event")

    def contents(self) -> dict[Any, tuple[Any, Any, Any]]:
        with open_store(self.data) as store:
            agg = store.aggregate("scores")
            return {
                it.id: (it.namespace, it.key, it.sum_value)
                for ns in agg.namespaces()
                for it in agg.iter(ns)
            }

    def reconcile(self, pg_url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                TALLY,
                "reconcile",
                "scores",
                "--source",
                pg_url,
                "--definitions",
                str(self.defs),
                "--data-dir",
                str(self.data),
                "--json",
                "--progress",
                "lines",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env=child_env(),
            check=False,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def seeded(live: tuple[Live, App], n: int = 300) -> tuple[Live, App]:
    """``n`` rows written with their events, applied by the consumer."""
    lv, app = live
    rng = random.Random(7)
    app.write([("insert", i, rng.choice("ab"), rng.randrange(1000)) for i in range(1, n + 1)])
    lv.wait_caught_up()
    assert lv.contents() == app.rows()
    return lv, app


@pytest.fixture
def pg_app(
    pg_url: str, table: str, kafka_bootstrap: str, tmp_path: Path
) -> Iterator[tuple[Live, App]]:
    topic = unique_topic("live-reconcile")
    create_topic(kafka_bootstrap, topic, partitions=2)
    app = App(pg_url, table, kafka_bootstrap, topic)
    lv: Live | None = None
    try:
        lv = Live(tmp_path, table, topic, kafka_bootstrap)
        yield lv, app
    finally:
        if lv is not None:
            lv.stop()
        app.close()


def test_live_patch_never_overwrites_a_newer_live_change(
    pg_app: tuple[Live, App], pg_url: str, table: str
) -> None:
    lv, app = seeded(pg_app)
    # Drift: rows changed without events (ids 1-10), lost deletes (11-13), lost inserts (301-305).
    app.write([("update", i, "b", 5000 + i) for i in range(1, 11)], emit=False)
    app.write([("delete", i, "", 0) for i in (11, 12, 13)], emit=False)
    app.write([("insert", i, "a", 7000 + i) for i in range(301, 306)], emit=False)
    drifted = set(range(1, 14)) | set(range(301, 306))

    # 1. the session opens, 2. the source is read and diffed (fixes held back here)
    patcher = RemotePatcher(lv.client, "scores", batch_size=4)
    session = patcher.begin()
    assert session["generation"] == "scores#1"
    fixes: list[Any] = []
    with open_store(lv.data) as store:
        report = diff(
            store.aggregate("scores"),
            definition(table),
            postgres_source(pg_url, table, ["id"]),
            on_change=lambda e, it: fixes.append((e, it)),
        )
    assert (report.missing, report.extra, report.wrong) == (5, 3, 10)

    # 3. the race: live changes to three ids the diff is about to fix, applied before the fixes arrive
    app.write([("update", 1, "a", 1), ("delete", 2, "", 0), ("update", 301, "b", 2)])
    lv.wait_caught_up()

    # 4. the fixes go in: the three ids written live are skipped, everything else is repaired
    for eid, item in fixes:
        patcher(eid, item)
    changed = patcher.close()
    assert patcher.skipped_live == 3
    assert changed == len(drifted) - 3
    assert patcher.totals["touched_live"] == 3 and patcher.totals["chunks"] == 5
    assert lv.contents() == app.rows()  # the oracle: the table itself

    # a dry run now finds nothing
    res = lv.reconcile(pg_url)
    assert res.returncode == 0, res.stderr
    assert (
        json.loads(res.stdout)["missing"]
        + json.loads(res.stdout)["wrong"]
        + json.loads(res.stdout)["extra"]
        == 0
    )


def test_drift_signals_are_counted_and_logged(pg_app: tuple[Live, App], pg_url: str) -> None:
    lv, app = seeded(pg_app, n=50)
    # a lost insert, then an update of that row: the consumer sees an update of an id it never saw
    app.write([("insert", 400, "a", 1)], emit=False)
    app.write([("update", 400, "a", 2)])
    # a lost delete, then a delete event replayed by a buggy producer for another unknown id
    app.write([("delete", 401, "", 0)])
    # a producer bug: an update sent as an insert for a held id with other values
    app.write([("update", 5, "b", 999)], op_override="insert")
    lv.wait_caught_up()
    metrics = lv.client.metrics()
    drift = {
        smp.labels["kind"]: smp.value
        for fam in text_string_to_metric_families(metrics)
        for smp in fam.samples
        if smp.name == "tally_drift_events_total" and smp.labels["aggregate"] == "scores"
    }
    assert drift == {"update_unknown": 1, "delete_unknown": 1, "create_existing": 1}, metrics
    st = {a["name"]: a for a in lv.client.status()["aggregates"]}
    assert st["scores"]["drift"] == {"update_unknown": 1, "delete_unknown": 1, "create_existing": 1}
    wait_for(lambda: "out of step" in lv.log.read_text(), "the drift log line")
    lines = [json.loads(x) for x in lv.log.read_text().splitlines() if "out of step" in x]
    assert sum(x.get("update_unknown", 0) for x in lines) == 1
    assert any(400 in x["example_ids"].get("update_unknown", []) for x in lines)
    assert any("tally reconcile scores" in x["hint"] for x in lines)


def test_cli_live_patch_while_events_flow_ends_exact(pg_app: tuple[Live, App], pg_url: str) -> None:
    lv, app = seeded(pg_app, n=2000)
    rng = random.Random(11)
    # drift of every kind, without events
    changed = rng.sample(range(1, 2001), 300)
    gone = rng.sample(sorted(set(range(1, 2001)) - set(changed)), 30)
    app.write([("update", i, "b", 9000 + i) for i in changed], emit=False)
    app.write([("delete", i, "", 0) for i in gone], emit=False)
    app.write([("insert", i, "a", i) for i in range(3000, 3030)], emit=False)
    hot = [*changed, *gone, *range(3000, 3030)]

    stop = threading.Event()
    errors: list[BaseException] = []
    written = [0]

    def writer() -> None:
        # ~300 live changes/s, a quarter of them to the drifted ids the reconcile is fixing
        wrng = random.Random(5)
        try:
            while not stop.is_set():
                batch = []
                for _ in range(10):
                    rid = wrng.choice(hot) if wrng.random() < 0.25 else wrng.randrange(1, 2001)
                    if wrng.random() < 0.1:
                        batch.append(("delete", rid, "", 0))
                    else:
                        batch.append(("upsert", rid, wrng.choice("ab"), wrng.randrange(1000)))
                app.write(batch)
                written[0] += len(batch)
                time.sleep(0.03)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_for(lambda: written[0] >= 50, "the live writer to get going")
        res = lv.reconcile(
            pg_url, "--patch", "--url", lv.url, "--token", TOKEN, "--batch-size", "10"
        )
    finally:
        stop.set()
        t.join(30)
    assert not errors, errors
    assert res.returncode == 0, res.stderr + lv.tail()
    report = json.loads(res.stdout)
    # ~310 of the 360 drifted ids are patched; a few (3-12 in our runs) are written live during the
    # reconcile and skipped. Applying those anyway fails this test every time (checked by mutation).
    assert report["patched"] > 200
    # every fix the diff sent was either applied or left to the live stream
    assert (
        report["patched"] + report["skipped_live"]
        == report["missing"] + report["extra"] + report["wrong"]
    )
    lv.wait_caught_up()
    assert lv.contents() == app.rows()


def test_live_patch_refusals_say_what_to_do(
    pg_app: tuple[Live, App], pg_url: str, table: str, tmp_path: Path
) -> None:
    lv, app = seeded(pg_app, n=20)
    snap = tmp_path / "snap.jsonl"
    snap.write_text(
        "".join(json.dumps({"id": i, "game": "a", "score": i}) + "\n" for i in range(1, 21))
    )
    base = [TALLY, "reconcile", "scores", "--definitions", str(lv.defs), "--data-dir", str(lv.data)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=child_env(),
            check=False,
        )

    r = run("--source", str(snap), "--patch", "--url", lv.url, "--token", TOKEN)
    assert r.returncode == 2 and "snapshot file cannot patch a running consumer" in r.stderr, (
        r.stderr
    )
    r = run("--source", pg_url, "--patch")
    assert r.returncode == 1 and "--url" in r.stderr and "locked" in r.stderr, r.stderr
    r = run("--source", pg_url, "--patch", "--url", lv.url, "--token", "wrong")
    assert r.returncode == 2 and "401" in r.stderr and "Bearer" in r.stderr, r.stderr
    other = tmp_path / "other.py"
    other.write_text(DEFS.format(table=table).replace('sum_value="score"', "sum_value=None"))
    r = subprocess.run(
        [
            *base[:4],
            str(other),
            *base[5:],
            "--source",
            pg_url,
            "--patch",
            "--url",
            lv.url,
            "--token",
            TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        check=False,
    )
    assert r.returncode == 2 and "another definition" in r.stderr, r.stderr
    # the wire: a bad chunk is a 4xx with a reason, and an unknown session says to run again
    s = lv.client.patch_begin("scores")
    with pytest.raises(ClientError) as e:
        lv.client.patch_chunk("scores", s["session"], b"\x81\xa7changes\x91\x92\xa1x\xa1y")
    assert e.value.status == 400
    with pytest.raises(ClientError) as e:
        lv.client.patch_chunk("scores", "nope", encode_fixes([]))
    assert e.value.status == 404 and "run the reconcile again" in str(e.value)
    with pytest.raises(ClientError) as e:
        lv.client._request(
            "POST", f"/v1/aggregates/scores/patch-sessions/{s['session']}", {"changes": []}
        )
    assert e.value.status == 415
    assert lv.client.patch_end("scores", s["session"])["received"] == 0
    with pytest.raises(ClientError) as e:
        TallyClient(lv.url).patch_begin("scores")
    assert e.value.status == 401
    assert lv.contents() == app.rows()


def test_store_reads_of_the_fixture_are_real(pg_app: tuple[Live, App], pg_url: str) -> None:
    """Guard for the oracle itself: a consumer's state equals the table only when it should."""
    lv, app = seeded(pg_app, n=10)
    app.write([("update", 3, "a", 123)], emit=False)
    assert lv.contents() != app.rows()


def test_events_lost_from_the_topic_are_found_and_patched(
    pg_url: str, table: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Records deleted from the topic (retention, an operator's delete-records) before a backfill."""
    import asyncio

    from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
    from aiokafka.structs import TopicPartition

    topic = unique_topic("live-reconcile-lost")
    create_topic(kafka_bootstrap, topic, partitions=1)
    app = App(pg_url, table, kafka_bootstrap, topic)
    lv: Live | None = None
    try:
        app.write([("insert", i, "a", i) for i in range(1, 101)])  # offsets 0-99
        app.write(
            [("update", i, "b", 1000 + i) for i in range(1, 51)]
        )  # offsets 100-149: id = offset - 99

        async def lose_first(n: int) -> None:
            admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
            await admin.start()
            try:
                await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(n)})
            finally:
                await admin.close()

        asyncio.run(lose_first(120))  # every insert and the updates of ids 1-20 are gone
        lv = Live(tmp_path, table, topic, kafka_bootstrap)  # a fresh data dir: a backfill by replay
        lv.wait_caught_up()
        assert sorted(lv.contents()) == list(range(21, 51))
        assert "starts at offset 120: earlier events were deleted" in lv.log.read_text()

        res = lv.reconcile(pg_url)
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert (report["missing"], report["extra"], report["wrong"]) == (70, 0, 0)
        assert [e["id"] for e in report["examples"]["missing"]] == list(range(1, 11))
        assert sorted(lv.contents()) == list(range(21, 51))  # a dry run changes nothing

        res = lv.reconcile(pg_url, "--patch", "--url", lv.url, "--token", TOKEN)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["patched"] == 70
        assert lv.contents() == app.rows()
    finally:
        if lv is not None:
            lv.stop()
        app.close()
