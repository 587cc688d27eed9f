"""A deployment of real members (issue 13): `tally consume --group-id` processes on a real broker.

One scenario, in steps, on a 6-partition topic: three members answer every read equal to the
oracle; a kill -9 mid-stream and the group settling leaves the others exact; reads hammered
while members come back, join and leave are never wrong (each 200 answer equals the oracle:
no partition missing or counted twice; otherwise a 503 that says what is moving).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from consumer_util import (
    TALLY,
    Feeder,
    RowStream,
    child_env,
    consume_args,
    free_port,
    native_records,
    tail,
    wait_exit,
    wait_for,
    write_definitions,
)
from kafka_util import create_topic, produce, unique_topic
from oracle import Event, ExpectedItem, canon, expected_items

from tally.consumers import TallyClient
from tally.schemas.keys import partition_for_id

pytestmark = pytest.mark.slow

PARTITIONS = 6
SESSION_TIMEOUT_MS = "6000"  # the broker's minimum: a kill is noticed this fast


@dataclass
class Member:
    name: str
    port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/status", timeout=5) as r:
            doc: dict[str, Any] = json.load(r)
        return doc


@dataclass
class Deployment:
    defs: str
    topic: str
    group: str
    bootstrap: str
    root: Path
    members: dict[str, Member] = field(default_factory=dict)
    partitions: int = PARTITIONS

    def start(self, name: str) -> Member:
        m = self.members.get(name)
        if m is None:
            m = Member(name, free_port(), self.root / name, self.root / f"{name}.log")
            self.members[name] = m
        args = consume_args(
            self.defs,
            self.topic,
            m.data_dir,
            self.bootstrap,
            "--group-id",
            self.group,
            "--session-timeout-ms",
            SESSION_TIMEOUT_MS,
            until_caught_up=False,
            http=f"127.0.0.1:{m.port}",
        )
        with open(m.log, "ab") as f:
            m.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=f, env=child_env(), cwd=str(self.root)
            )
        return m

    def running(self) -> list[Member]:
        return [m for m in self.members.values() if m.proc is not None and m.proc.poll() is None]

    def kill(self, name: str) -> None:
        m = self.members[name]
        assert m.proc is not None
        m.proc.kill()  # SIGKILL: no LeaveGroup, no last commit
        m.proc.wait(30)
        m.proc = None

    def stop(self, name: str) -> None:
        m = self.members[name]
        assert m.proc is not None
        m.proc.send_signal(signal.SIGTERM)
        wait_exit(m.proc, f"member {name} after SIGTERM", timeout=60, log=m.log)
        m.proc = None

    def logs(self) -> str:
        return "\n".join(f"--- {m.name}:\n{tail(m.log, 1500)}" for m in self.members.values())

    def settled(self) -> bool:
        """Every running member sees one map of exactly the running members, which gives
        every partition to one of them, and each has caught up on every partition it owns."""
        for m in self.members.values():
            if m.proc is not None and m.proc.poll() is not None:
                raise AssertionError(f"member {m.name} exited {m.proc.returncode}\n{self.logs()}")
        running = self.running()
        urls = {m.url for m in running}
        maps = set()
        for m in running:
            doc = m.status()["member"]
            owners = {x["url"]: x["partitions"] for x in doc["members"]}
            if set(owners) != urls or doc["map_version"] is None:
                return False
            owned = sorted(p["partition"] for ps in owners.values() for p in ps)
            if owned != list(range(self.partitions)):
                return False
            mine = sorted(p["partition"] for p in owners[m.url])
            tasks = {t["partition"]: t for t in doc["tasks"]}
            if sorted(tasks) != mine or any(
                t["state"] != "live" or t["lag"] for t in tasks.values()
            ):
                return False
            maps.add(doc["map_version"])
        return len(maps) == 1

    def wait_settled(self, what: str, timeout: float = 120) -> None:
        wait_for(
            self.settled,
            lambda: f"the group to settle ({what})\n{self.logs()}",
            timeout=timeout,
            every=0.2,
            swallow=(OSError, KeyError, urllib.error.URLError),
        )


@pytest.fixture
def deployment(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Deployment]:
    defs, _ = write_definitions(tmp_path)
    topic = unique_topic("cluster")
    create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    d = Deployment(defs, topic, unique_topic("group"), kafka_bootstrap, tmp_path)
    try:
        yield d
    finally:
        for m in d.members.values():
            if m.proc is not None and m.proc.poll() is None:
                m.proc.kill()
                m.proc.wait(30)


def _key_id(item: Any) -> tuple[Any, Any]:
    return canon(item.key), canon(item.id)


def _want(items: list[ExpectedItem]) -> list[tuple[Any, Any]]:
    return [(canon(i.key), canon(i.id)) for i in items]


def check_answers(url: str, definitions: list[Any], events: list[Event], seed: int) -> None:
    """Every read op through ``url`` equals the oracle of ``events``, for every aggregate."""
    client = TallyClient(url, timeout=30)
    expected = expected_items(events, definitions)
    rng = random.Random(seed)
    for d in definitions:
        per_ns = expected[d.name]
        got_ns = client.read("namespaces", d.name)
        assert sorted(map(canon, got_ns), key=repr) == sorted(map(canon, per_ns), key=repr), d.name
        for ns, items in per_ns.items():
            where = f"{url} {d.name}[{ns!r}]"
            want = _want(items)
            assert client.read("count", d.name, ns) == len(items), where
            total = client.read("sum", d.name, ns)
            exact = sum(i.sum_value for i in items)
            assert total == pytest.approx(exact, rel=1e-9, abs=1e-9), where
            # paginate: the merge of every member's pages, the cursor carried across them
            seen: list[tuple[Any, Any]] = []
            cursor = None
            while True:
                page = client.read("paginate", d.name, namespace=ns, page_size=7, cursor=cursor)
                seen += [_key_id(i) for i in page.items]
                if page.is_done:
                    break
                cursor = page.cursor
            assert seen == want, f"{where}: paginate"
            for k in {0, len(items) - 1, *rng.sample(range(len(items)), min(4, len(items)))}:
                assert _key_id(client.read("at", d.name, k, ns)) == want[k], f"{where}: at {k}"
                it = items[k]
                assert client.read("index_of", d.name, it.key, it.id, namespace=ns) == k, where
            assert _key_id(client.read("min", d.name, ns)) == want[0], where
            assert _key_id(client.read("max", d.name, ns)) == want[-1], where
            assert _key_id(client.read("random", d.name, ns)) in set(want), where
            counts = client.read(
                "count_batch", d.name, [{"namespace": ns}, {"namespace": ns, "bounds": None}]
            )
            assert counts == [len(items), len(items)], where


class Hammer(threading.Thread):
    """Reads ``count`` and the middle item of one aggregate from every URL in a loop; each
    answer must be the oracle's, or a 503 saying partitions move (or a member is down)."""

    def __init__(self, urls: list[str], expected_count: int, expected_mid: tuple[Any, Any]):
        super().__init__(daemon=True)
        self.urls = urls
        self.want_count = expected_count
        self.want_mid = expected_mid
        self.stop_flag = threading.Event()
        self.seen: Counter[str] = Counter()
        self.wrong: list[str] = []

    def run(self) -> None:
        clients = [TallyClient(u, timeout=30) for u in self.urls]
        while not self.stop_flag.is_set():
            for c in clients:
                for op in ("count", "at"):
                    try:
                        if op == "count":
                            got = c.read("count", "scores")
                            ok = got == self.want_count
                        else:
                            got = _key_id(c.read("at", "scores", self.want_count // 2))
                            ok = got == self.want_mid
                        self.seen[f"{op} 200"] += 1
                        if not ok:
                            self.wrong.append(f"{c.url} {op}: {got!r}")
                    except Exception as e:
                        status = getattr(e, "status", None)
                        code = getattr(e, "code", None)
                        self.seen[f"{op} {status} {code}"] += 1
                        if status != 503 and code is not None:
                            self.wrong.append(f"{c.url} {op}: {status} {code} {e}")

    def finish(self) -> Counter[str]:
        self.stop_flag.set()
        self.join(60)
        assert not self.is_alive()
        return self.seen


def test_members_answer_exactly_through_kills_joins_and_leaves(deployment: Deployment) -> None:
    d = deployment
    _, definitions = write_definitions(d.root)
    stream = RowStream(seed=13, n_ids=400)
    events = stream.take(1500)
    produce(d.bootstrap, d.topic, native_records(events, seed=14))
    for name in ("a", "b", "c"):
        d.start(name)
    d.wait_settled("three members start and backfill their partitions")
    for m in d.running():
        check_answers(m.url, definitions, events, seed=1)

    # kill -9 of a member mid-stream: the others take its partitions and replay them
    feeder = Feeder(d.bootstrap, d.topic, stream, rate=1500)
    feeder.start()
    wait_for(lambda: len(feeder.sent) >= 1500, "the feeder to get going", timeout=60)
    d.kill("b")
    wait_for(lambda: len(feeder.sent) >= 4500, "more events after the kill", timeout=60)
    events += feeder.finish()
    d.wait_settled("a and c take over b's partitions")
    for m in d.running():
        check_answers(m.url, definitions, events, seed=2)

    # Reads hammered through every rebalance below (no new events: the oracle is fixed).
    expected = expected_items(events, definitions)["scores"]
    items = next(iter(expected.values()))
    hammer = Hammer(
        [d.members["a"].url, d.members["c"].url], len(items), _want(items)[len(items) // 2]
    )
    hammer.start()
    try:
        d.start("b")  # comes back: resumes the partitions it held from its stored offsets
        d.wait_settled("b rejoins")
        d.start("d")  # a new member: replays the partitions it is given from the beginning
        d.wait_settled("d joins")
        d.stop("c")  # a clean leave: the others take c's partitions at once
        d.wait_settled("c leaves")
    finally:
        seen = hammer.finish()
    assert not hammer.wrong, f"wrong answers during rebalances: {hammer.wrong[:10]} ({seen})"
    assert seen["count 200"] > 0 and seen["at 200"] > 0, seen
    print("hammer:", dict(seen))
    for m in d.running():
        check_answers(m.url, definitions, events, seed=3)
    logs = d.logs()
    assert "resume from stored offset" in tail(d.members["b"].log, 200_000), logs
    assert "replay from the beginning" in tail(d.members["d"].log, 200_000), logs
    assert os.path.isdir(d.members["c"].data_dir / "partitions"), "c's parked stores stay on disk"


def test_processes_starts_members_that_share_the_partitions(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """`--processes 2`: two members on ports P and P+1 under DATA_DIR/member-k, which split
    the partitions and answer for the whole; SIGTERM to the parent stops both cleanly."""
    defs, definitions = write_definitions(tmp_path)
    topic = unique_topic("procs")
    create_topic(kafka_bootstrap, topic, partitions=PARTITIONS)
    events = RowStream(seed=21, n_ids=200).take(600)
    produce(kafka_bootstrap, topic, native_records(events, seed=22))
    port = free_port()
    while True:  # P+1 must be free too
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            break
        except OSError:
            port = free_port()
    root = tmp_path / "data"
    group = unique_topic("procs-group")
    args = consume_args(
        defs,
        topic,
        root,
        kafka_bootstrap,
        "--group-id",
        group,
        "--processes",
        "2",
        until_caught_up=False,
        http=f"127.0.0.1:{port}",
    )
    log = tmp_path / "processes.log"
    with open(log, "ab") as f:
        parent = subprocess.Popen(
            args, stdout=f, stderr=f, env=child_env(), cwd=str(tmp_path), start_new_session=True
        )
    d = Deployment(defs, topic, group, kafka_bootstrap, root)
    try:
        for k in range(2):  # the members the parent started, seen through their HTTP API
            m = Member(f"member-{k}", port + k, root / f"member-{k}", log)
            m.proc = parent  # alive while the parent is (settled() checks it)
            d.members[m.name] = m
        d.wait_settled("the two members of --processes 2")
        owned = [
            sorted(p["partition"] for p in x["partitions"])
            for x in d.members["member-0"].status()["member"]["members"]
        ]
        assert sorted(len(o) for o in owned) == [PARTITIONS // 2] * 2, owned
        for k in range(2):
            assert (root / f"member-{k}" / "partitions").is_dir()
            check_answers(f"http://127.0.0.1:{port + k}", definitions, events, seed=k)
        shown = subprocess.run(
            [TALLY, "status", "--url", f"http://127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**child_env(), "COLUMNS": "200"},
            check=True,
        ).stdout
        assert f"members of {group}" in shown, shown
        for k in range(2):  # each member with its partitions' state
            url = f"http://127.0.0.1:{port + k}"
            line = next(x for x in shown.splitlines() if x.strip().startswith(url))
            assert line.count(" live") == PARTITIONS // 2, shown
        assert "uptime ?" not in shown, shown
        parent.send_signal(signal.SIGTERM)
        assert wait_exit(parent, "--processes after SIGTERM", timeout=60, log=log) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):  # the parent and its members
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(30)


def test_a_partition_whose_store_cannot_open_answers_503_and_recovers(
    deployment: Deployment,
) -> None:
    """A partition's store that does not open (here: junk where RocksDB's CURRENT file goes)
    makes reads answer 503 naming the partition and the error, never an answer without it;
    once the store can open (the junk removed), the member retries, replays the partition and
    answers exactly."""
    d = deployment
    _, definitions = write_definitions(d.root)
    events = RowStream(seed=31, n_ids=200).take(500)
    produce(d.bootstrap, d.topic, native_records(events, seed=32))
    broken = d.root / "a" / "partitions" / d.topic / "2"
    broken.mkdir(parents=True)
    (broken / "CURRENT").write_text("not a rocksdb manifest name\n")
    a = d.start("a")
    client = TallyClient(a.url, timeout=30)

    def refused() -> dict[str, Any] | None:
        try:
            client.read("count", "scores")
        except Exception as e:
            details = getattr(e, "details", {})
            moving = details.get("moving") or []
            if getattr(e, "status", None) == 503 and any(
                m.get("state") == "failed" for m in moving
            ):
                return {"error": str(e), "moving": moving}
            return None
        raise AssertionError("answered without partition 2, whose store cannot open")

    got = wait_for(
        refused,
        lambda: f"a 503 naming the failed partition\n{d.logs()}",
        timeout=60,
        swallow=(OSError,),
    )
    (failed,) = [m for m in got["moving"] if m.get("state") == "failed"]
    assert failed["partition"] == 2 and failed.get("error"), got
    # ?partial=true: what the other partitions hold, labelled with the one left out
    items = next(iter(expected_items(events, definitions)["scores"].values()))
    others = [i for i in items if partition_for_id(i.id, PARTITIONS) != 2]
    assert 0 < len(others) < len(items)

    def partial() -> dict[str, Any] | None:
        req = urllib.request.Request(
            a.url + "/v1/aggregates/scores/count?partial=true", data=b"{}", method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                doc: dict[str, Any] = json.load(r)
                return doc
        except urllib.error.HTTPError as e:  # 503 while every partition still replays
            assert e.code == 503, e.read()
            return None

    body = wait_for(partial, "a partial answer once the other partitions are live", timeout=60)
    assert body["result"] == len(others), body
    assert [(m["partition"], m["state"]) for m in body["partial"]] == [(2, "failed")], body
    for p in broken.iterdir():
        p.unlink()
    broken.rmdir()
    d.wait_settled("the member retries partition 2 and replays it")
    check_answers(a.url, definitions, events, seed=4)


DEFS_V1 = """
from tally.engine import TableAggregate
scores = TableAggregate("scores", table="players", sort_key="score", sum_value="score")
"""
DEFS_V2 = DEFS_V1.replace('sum_value="score"', 'sum_value="level"')


def test_a_rolling_definition_change_never_mixes_two_definitions(
    deployment: Deployment,
) -> None:
    """Members restarted one by one with a changed definition: while partitions of the two
    definitions coexist, a read answers from one definition only — every 200 is the old
    oracle's or the new one's, never a sum of both — else a 503 naming what rebuilds or runs
    another definition; once all members run the new one, every answer is the new oracle's."""
    from tally.consumers.runtime.definitions import load_definitions

    d = deployment
    defs = d.root / "defs_rolling.py"
    defs.write_text(DEFS_V1)
    d.defs = str(defs)
    events = RowStream(seed=41, n_ids=300).take(1200)
    produce(d.bootstrap, d.topic, native_records(events, seed=42))
    (v1,) = load_definitions(str(defs))
    (v2,) = load_definitions_text(d.root, DEFS_V2)
    old = sum(i.sum_value for i in next(iter(expected_items(events, [v1])["scores"].values())))
    new = sum(i.sum_value for i in next(iter(expected_items(events, [v2])["scores"].values())))
    assert old != new
    d.start("a"), d.start("b")
    d.wait_settled("two members on the first definition")
    seen: Counter[str] = Counter()

    def sums(phase: str, until: str) -> bool:
        """Read the sum through every member, counting what each answer was; whether
        ``until`` has been seen."""
        for m in d.running():
            try:
                got = TallyClient(m.url, timeout=30).read("sum", "scores")
            except Exception as e:
                status, code = getattr(e, "status", None), getattr(e, "code", None)
                assert status in (503, None), e
                seen[f"{phase} {code}"] += 1
                for moving in getattr(e, "details", {}).get("moving") or []:
                    seen[f"{phase} {m.name} sees {moving.get('state')}"] += 1
                continue
            assert got in (old, new), f"{phase}: {m.name} answered {got}: neither {old} nor {new}"
            seen[f"{phase} {'new' if got == new else 'old'}"] += 1
        return seen[until] > 0

    defs.write_text(DEFS_V2)  # the file both members read on their next start
    d.stop("a")
    d.start("a")
    # Until a's partitions have rebuilt, b reads them from their old generation (stale); once
    # they switched, they serve another definition than b's: b must refuse them.
    # And a, once its own partitions are live, refuses b's old ones.
    wait_for(
        lambda: (
            sums("half", "half b sees other_definition")
            and seen["half a sees other_definition"] > 0
        ),
        lambda: f"b refusing a's rebuilt partitions and a b's ({seen})\n{d.logs()}",
        timeout=90,
        every=0.1,
    )
    d.stop("b")
    d.start("b")
    d.wait_settled("both members on the new definition")
    wait_for(
        lambda: sums("after", "after new") and seen["after new"] >= 2 * len(d.running()),
        lambda: f"every member answering the new definition ({seen})\n{d.logs()}",
        timeout=90,
        every=0.1,
    )
    assert not seen["after old"], seen


def load_definitions_text(root: Path, text: str) -> list[Any]:
    from tally.consumers.runtime.definitions import load_definitions

    path = root / "defs_rolling_v2_copy.py"
    path.write_text(text)
    return list(load_definitions(str(path)))
