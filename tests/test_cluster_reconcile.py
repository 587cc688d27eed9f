"""`tally reconcile --url` against a deployment (issue 13): real members, real Postgres.

No member holds the whole aggregate: the reconcile reads every partition's id index through
the members and sends each fix to its row's partition on the member owning it — a row the
aggregate holds where it is, a missing row to the partition its events would land in (the
topic's record keys, learned from what the members consumed).
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from consumer_util import TALLY, child_env, free_port, wait_for
from kafka_util import create_topic, unique_topic
from test_cluster_e2e import Deployment, Member
from test_live_reconcile import TOKEN, App
from test_live_reconcile import table as table  # the same throwaway Postgres table fixture

from tally.consumers import TallyClient

pytestmark = pytest.mark.slow

PARTITIONS = 3
DEFS = """
from tally.engine import TableAggregate
scores = TableAggregate("scores", table={table!r}, sort_key="score", sum_value="score", namespace="game")
"""


class Members(Deployment):
    """Members of a deployment on ``table``'s topic, with a token (patch sessions need one)."""

    table: str = ""

    def start(self, name: str) -> Member:
        m = self.members.get(name)
        if m is None:
            m = Member(name, free_port(), self.root / name, self.root / f"{name}.log")
            self.members[name] = m
        args = [
            TALLY,
            "consume",
            self.defs,
            "--topic",
            f"{self.table}={self.topic}",
            "--data-dir",
            str(m.data_dir),
            "--bootstrap-servers",
            self.bootstrap,
            "--group-id",
            self.group,
            "--session-timeout-ms",
            "6000",
            "--http",
            f"127.0.0.1:{m.port}",
            "--token",
            TOKEN,
            "--log-format",
            "json",
        ]
        with open(m.log, "ab") as f:
            m.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=f, env=child_env(), cwd=str(self.root)
            )
        return m


@pytest.fixture
def members(
    kafka_bootstrap: str, pg_url: str, table: str, tmp_path: Path
) -> Iterator[tuple[Members, App]]:
    topic = unique_topic("cluster-reconcile")
    create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    defs = tmp_path / "defs.py"
    defs.write_text(DEFS.format(table=table))
    d = Members(str(defs), topic, unique_topic("reconcile-group"), kafka_bootstrap, tmp_path)
    d.table = table
    app = App(pg_url, table, kafka_bootstrap, topic)
    try:
        yield d, app
    finally:
        for m in d.members.values():
            if m.proc is not None and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(30)
        app.close()


def reconcile(d: Members, url: str, pg_url: str, *extra: str) -> dict[str, Any]:
    res = subprocess.run(
        [
            TALLY,
            "reconcile",
            "scores",
            "--source",
            pg_url,
            "--definitions",
            d.defs,
            "--url",
            url,
            "--json",
            "--progress",
            "none",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        check=False,
    )
    assert res.returncode == 0, f"reconcile exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    report: dict[str, Any] = json.loads(res.stdout)
    return report


def contents(url: str) -> dict[int, tuple[str, int, int]]:
    """Every item of the aggregate through one member: id → (namespace, key, sum); an id
    held twice (in two partitions) fails."""
    client = TallyClient(url, timeout=30)
    out: dict[int, tuple[str, int, int]] = {}
    for ns in client.read("namespaces", "scores"):
        cursor = None
        while True:
            page = client.read("paginate", "scores", namespace=ns, page_size=500, cursor=cursor)
            for it in page.items:
                assert it.id not in out, f"id {it.id} is held twice: {out[it.id]} and {it}"
                out[it.id] = (it.namespace, it.key, it.sum_value)
            if page.is_done:
                break
            cursor = page.cursor
    return out


def test_reconcile_of_a_deployment_finds_and_patches_drift_on_every_partition(
    members: tuple[Members, App], pg_url: str
) -> None:
    d, app = members
    d.partitions = PARTITIONS
    rng = random.Random(5)
    app.write([("insert", i, rng.choice("ab"), rng.randrange(1000)) for i in range(1, 301)])
    a, b = d.start("a"), d.start("b")
    d.wait_settled("two members build the three partitions")
    assert contents(a.url) == app.rows()

    # Drift, without events: changed rows (wrong), lost deletes (extra), lost inserts (missing).
    app.write([("update", i, "b", 5000 + i) for i in range(1, 21)], emit=False)
    app.write([("delete", i, "", 0) for i in range(21, 31)], emit=False)
    app.write([("insert", i, "a", 7000 + i) for i in range(301, 316)], emit=False)

    dry = reconcile(d, a.url, pg_url)
    assert (dry["wrong"], dry["extra"], dry["missing"]) == (20, 10, 15), dry
    assert dry["patched"] is None and contents(b.url) != app.rows()

    fixed = reconcile(d, b.url, pg_url, "--patch", "--token", TOKEN)
    assert fixed["patched"] == 45 and fixed["unplaced"] == 0, fixed
    for m in (a, b):
        assert contents(m.url) == app.rows(), m.name
    again = reconcile(d, a.url, pg_url)
    assert again["wrong"] + again["extra"] + again["missing"] == 0, again

    # The fixed rows live where their events go: an event for a patched-in row updates it in
    # place (it would be a second item in another partition otherwise).
    app.write([("update", i, "b", 1) for i in range(301, 316)])
    wait_for(
        lambda: contents(a.url) == app.rows(),
        lambda: f"the members to apply the updates of the patched-in rows\n{d.logs()}",
        timeout=60,
        every=0.2,
    )
