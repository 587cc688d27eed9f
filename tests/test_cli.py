"""`tally query`, `tally status` and `tally demo` as a user runs them: subprocesses of the CLI.

A small known change stream is produced to a fresh compacted topic and
consumed with `tally consume --until-caught-up` into a data dir; every read of
`tally query --json` is compared with the engine's answer on the same store
(opened read-only here), the table output is checked for the expected values,
bad arguments give one line on stderr and the right exit code, `tally status`
reports the stored offsets equal to the topic's end offsets, `--url` answers
like `--data-dir` against a running consumer, and `tally demo --short` runs to
its verification line.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from consumer_util import TALLY, child_env, free_port, tail, wait_exit, wait_for
from kafka_util import create_topic, unique_topic

from tally.engine import Store

ROOT = Path(__file__).resolve().parent.parent
DEFINITIONS = str(ROOT / "consumers" / "demo" / "leaderboard.py")
GAMES = ("chess", "go", "poker")

pytestmark = pytest.mark.timeout(300)


# ---------------------------------------------------------------- helpers


def _env() -> dict[str, str]:
    return child_env(COLUMNS="160")  # no TALLY_* of the developer's shell leaks in


def tally(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(
        [TALLY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
        cwd=ROOT,
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"tally {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
        )
    return res


def as_json(value: Any) -> Any:
    """What `--json` prints for an engine answer, parsed back."""
    return json.loads(msgspec.json.encode(value))


def expected_rows() -> tuple[list[tuple[str, dict[str, Any]]], dict[int, dict[str, Any]]]:
    """A known stream (inserts, updates, deletes, ties at 1000) and the rows it leaves."""
    events: list[tuple[str, dict[str, Any]]] = []
    rows: dict[int, dict[str, Any]] = {}
    for i in range(1, 81):
        score = (i * 137) % 1500 + (700 if i % 10 == 0 else 0)
        if i % 16 == 5:
            score = 1000  # a tie group at the threshold
        row = {"id": i, "player": f"p{i % 17}", "game": GAMES[i % 3], "score": score}
        rows[i] = row
        events.append(("insert", row))
    for i in range(1, 40, 3):
        row = {**rows[i], "score": rows[i]["score"] + 50}
        rows[i] = row
        events.append(("update", row))
    for i in (7, 14, 28, 33):
        del rows[i]
        events.append(("delete", {"id": i}))
    return events, rows


async def _produce(bootstrap: str, topic: str, events: list[tuple[str, dict[str, Any]]]) -> None:
    from tally.consumers.producer import ChangeProducer

    async with ChangeProducer(bootstrap) as p:
        for op, row in events:
            if op == "insert":
                await p.insert(topic, "scores", row)
            elif op == "update":
                await p.update(topic, "scores", row)
            else:
                await p.delete(topic, "scores", row["id"], tombstone=row["id"] % 2 == 0)
        await p.flush()


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await c.start()
    try:
        parts = sorted(c.partitions_for_topic(topic) or ())
        if not parts:
            await c._client.force_metadata_update()
            parts = sorted(c.partitions_for_topic(topic) or ())
        tps = [TopicPartition(topic, p) for p in parts]
        ends = await c.end_offsets(tps)
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await c.stop()


class Built:
    def __init__(
        self, bootstrap: str, topic: str, data_dir: Path, rows: dict[int, dict[str, Any]]
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.data_dir = data_dir
        self.rows = rows
        self.store = Store.open(data_dir, read_only=True)

    def agg(self, name: str) -> Any:
        return self.store.aggregate(name)

    def query(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return tally("query", "--data-dir", str(self.data_dir), *args, check=check)

    def query_json(self, *args: str) -> Any:
        return json.loads(self.query(*args, "--json").stdout)


@pytest.fixture(scope="module")
def built(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    topic = unique_topic("cli-scores")
    create_topic(kafka_bootstrap, topic, partitions=3, compacted=True)
    events, rows = expected_rows()
    asyncio.run(_produce(kafka_bootstrap, topic, events))
    data_dir = tmp_path_factory.mktemp("cli") / "data"
    res = tally(
        "consume",
        DEFINITIONS,
        "--topic",
        f"scores={topic}",
        "--data-dir",
        str(data_dir),
        "--bootstrap-servers",
        kafka_bootstrap,
        "--until-caught-up",
        "--log-level",
        "warning",
        timeout=180,
    )
    assert res.returncode == 0, res.stderr
    b = Built(kafka_bootstrap, topic, data_dir, rows)
    try:
        yield b
    finally:
        b.store.close()


# ---------------------------------------------------------------- the store is what we produced


@pytest.mark.kafka
def test_store_holds_the_stream(built: Built) -> None:
    lb = built.agg("leaderboard")
    assert lb.count() == len(built.rows)
    assert [(i.key, i.id) for i in lb.iter()] == sorted(
        (r["score"], i) for i, r in built.rows.items()
    )
    assert sorted(built.store.aggregates()) == ["by_game", "high_scores", "leaderboard"]


# ---------------------------------------------------------------- every op, --json vs the engine

LOWER_EXCL = {"lower": {"key": 1000, "inclusive": False}}

# (CLI args after AGGREGATE OP..., aggregate, engine call)
CASES: list[tuple[list[str], str, Any]] = [
    (["count"], "leaderboard", lambda a: a.count()),
    (
        ["count", "--lower", "1000", "--lower-exclusive"],
        "leaderboard",
        lambda a: a.count(bounds=LOWER_EXCL),
    ),
    (["count", "--eq", "1000"], "leaderboard", lambda a: a.count(bounds={"eq": 1000})),
    (
        ["count", "--lower", "1000", "--lower-id", "37"],
        "leaderboard",
        lambda a: a.count(bounds={"lower": {"key": 1000, "id": 37}}),
    ),
    (
        ["count", "--lower", "200", "--upper", "900", "--upper-exclusive"],
        "leaderboard",
        lambda a: a.count(
            bounds={"lower": {"key": 200}, "upper": {"key": 900, "inclusive": False}}
        ),
    ),
    (["count", "--namespace", "chess"], "by_game", lambda a: a.count(namespace="chess")),
    (["count", "--namespace", '"go"'], "by_game", lambda a: a.count(namespace="go")),
    (["count", "--namespace", "nope"], "by_game", lambda a: a.count(namespace="nope")),
    (
        ["count", "--prefix", '["chess"]'],
        "high_scores",
        lambda a: a.count(bounds={"prefix": ["chess"]}),
    ),
    (["sum"], "leaderboard", lambda a: a.sum()),
    (
        ["sum", "--namespace", "poker", "--upper", "700"],
        "by_game",
        lambda a: a.sum(namespace="poker", bounds={"upper": {"key": 700}}),
    ),
    (["at", "0"], "leaderboard", lambda a: a.at(0)),
    (["at", "-1"], "leaderboard", lambda a: a.at(-1)),
    (
        ["at", "3", "--lower", "1000"],
        "leaderboard",
        lambda a: a.at(3, bounds={"lower": {"key": 1000}}),
    ),
    (["at", "-2", "--namespace", "go"], "by_game", lambda a: a.at(-2, namespace="go")),
    (["index-of", "1000"], "leaderboard", lambda a: a.index_of(1000)),
    (
        ["index-of", "1000", "--order", "desc"],
        "leaderboard",
        lambda a: a.index_of(1000, order="desc"),
    ),
    (
        ["index-of", "1000", "--id", "21", "--order", "desc"],
        "leaderboard",
        lambda a: a.index_of(1000, 21, order="desc"),
    ),
    (["min"], "leaderboard", lambda a: a.min()),
    (["max"], "leaderboard", lambda a: a.max()),
    (
        ["max", "--upper", "1000", "--upper-exclusive"],
        "leaderboard",
        lambda a: a.max(bounds={"upper": {"key": 1000, "inclusive": False}}),
    ),
    (["min", "--namespace", "nope"], "by_game", lambda a: a.min(namespace="nope")),
    (["min", "--prefix", '["go"]'], "high_scores", lambda a: a.min(bounds={"prefix": ["go"]})),
    (["page", "--page-size", "7"], "leaderboard", lambda a: a.paginate(page_size=7)),
    (
        ["page", "--page-size", "5", "--order", "desc", "--namespace", "chess"],
        "by_game",
        lambda a: a.paginate(page_size=5, order="desc", namespace="chess"),
    ),
    (["page", "--page-size", "1000"], "high_scores", lambda a: a.paginate(page_size=1000)),
    (["namespaces"], "by_game", lambda a: a.namespaces()),
    (["namespaces"], "leaderboard", lambda a: a.namespaces()),
    (
        ["count-batch", '[{}, {"namespace": "chess"}, {"bounds": {"lower": {"key": 1000}}}]'],
        "by_game",
        lambda a: a.count_batch([{}, {"namespace": "chess"}, {"bounds": {"lower": {"key": 1000}}}]),
    ),
    (
        ["sum-batch", '[{"namespace": "go"}, {"namespace": "poker", "bounds": {"eq": 1000}}]'],
        "by_game",
        lambda a: a.sum_batch(
            [{"namespace": "go"}, {"namespace": "poker", "bounds": {"eq": 1000}}]
        ),
    ),
    (
        [
            "at-batch",
            '[{"offset": 0}, {"offset": -1}, {"offset": 2, "bounds": {"lower": {"key": 1000}}}]',
        ],
        "leaderboard",
        lambda a: a.at_batch(
            [{"offset": 0}, {"offset": -1}, {"offset": 2, "bounds": {"lower": {"key": 1000}}}]
        ),
    ),
]


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("args", "aggregate", "engine"), CASES, ids=[" ".join([c[1], *c[0]]) for c in CASES]
)
def test_query_json_matches_engine(
    built: Built, args: list[str], aggregate: str, engine: Any
) -> None:
    got = built.query_json(aggregate, *args)
    assert got == as_json(engine(built.agg(aggregate)))


@pytest.mark.kafka
def test_flags_before_and_after_the_op_are_the_same(built: Built) -> None:
    a = built.query_json("--namespace", "chess", "--lower", "500", "by_game", "count")
    b = built.query_json("by_game", "count", "--namespace", "chess", "--lower", "500")
    assert a == b == built.agg("by_game").count(namespace="chess", bounds={"lower": {"key": 500}})


@pytest.mark.kafka
def test_page_cursor_walks_like_the_engine(built: Built) -> None:
    lb = built.agg("leaderboard")
    cursor: str | None = None
    seen = []
    while True:
        args = ["leaderboard", "page", "--page-size", "30", "--order", "desc"]
        if cursor is not None:
            args += ["--cursor", cursor]
        got = built.query_json(*args)
        want = lb.paginate(cursor=cursor, page_size=30, order="desc")
        assert got == as_json(want)
        seen += [(i["key"], i["id"]) for i in got["items"]]
        if got["is_done"]:
            break
        cursor = got["cursor"]
    assert seen == [(i.key, i.id) for i in lb.iter(order="desc")]


@pytest.mark.kafka
def test_random_is_an_item_in_range(built: Built) -> None:
    lb = built.agg("leaderboard")
    for _ in range(3):
        got = built.query_json("leaderboard", "random", "--lower", "1000", "--lower-exclusive")
        assert got["key"] > 1000
        item = lb.get(got["id"])
        assert item is not None and item.key == got["key"]
    assert built.query_json("leaderboard", "random", "--lower", "999999") is None


# ---------------------------------------------------------------- human output


@pytest.mark.kafka
def test_table_output_has_the_values(built: Built) -> None:
    lb = built.agg("leaderboard")
    assert built.query("leaderboard", "count").stdout == f"{lb.count()}\n"
    assert built.query("leaderboard", "sum").stdout == f"{lb.sum()}\n"
    top = lb.at(-1)
    out = built.query("leaderboard", "at", "-1").stdout
    assert str(top.key) in out and str(top.id) in out and "(default)" in out
    out = built.query("leaderboard", "page", "--page-size", "5", "--order", "desc").stdout
    page = lb.paginate(page_size=5, order="desc")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    for item in page.items:
        assert any(str(item.key) in ln and str(item.id) in ln for ln in lines), (item, out)
    assert f"next page: --cursor {page.cursor}" in out
    out = built.query("by_game", "namespaces").stdout
    assert out.split() == [json.dumps(g) for g in sorted(GAMES)]
    out = built.query("high_scores", "max", "--prefix", '["chess"]').stdout
    hs = built.agg("high_scores").max(bounds={"prefix": ["chess"]})
    assert '["chess",' in out and str(hs.id) in out
    assert (
        built.query("leaderboard", "min", "--lower", "999999").stdout.strip() == "no items in range"
    )


# ---------------------------------------------------------------- errors


ERRORS: list[tuple[list[str], int, str]] = [
    (["leaderboard", "median"], 2, "invalid choice"),
    (["nope", "count"], 2, "known aggregates: by_game, high_scores, leaderboard"),
    (["high_scores", "count", "--prefix", "[chess"], 2, "--prefix"),
    (["high_scores", "count", "--prefix", '"chess"'], 2, "JSON array"),
    (["leaderboard", "at", "first"], 2, "OFFSET must be an integer"),
    (["leaderboard", "at", "100000"], 2, "out of range"),
    (["leaderboard", "at", "0", "--lower", "999999"], 2, "out of range"),
    (["leaderboard", "count-batch", "[{"], 2, "not valid JSON"),
    (["leaderboard", "count-batch", "{}"], 2, "JSON list"),
    (["leaderboard", "count-batch", "[{}]", "--namespace", "x"], 2, "inside each query"),
    (["leaderboard", "page", "--page-size", "0"], 2, "positive"),
    (["leaderboard", "page", "--cursor", "garbage!"], 2, "cursor"),
    (["leaderboard", "count", "--lower-exclusive"], 2, "needs --lower"),
    (["leaderboard", "count", "--eq", '{"a": 1}'], 2, "invalid"),
    (["leaderboard", "index-of", "1", "--order", "up"], 2, "invalid choice"),
    ([], 2, "required"),
]


def _one_line_error(res: subprocess.CompletedProcess[str], code: int, fragment: str) -> None:
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "error" in lines[0] and fragment in lines[0], lines[0]
    assert res.stdout == ""


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("args", "code", "fragment"), ERRORS, ids=[" ".join(e[0]) or "nothing" for e in ERRORS]
)
def test_query_errors(built: Built, args: list[str], code: int, fragment: str) -> None:
    _one_line_error(built.query(*args, check=False), code, fragment)


def test_missing_data_dir(tmp_path: Path) -> None:
    res = tally("query", "--data-dir", str(tmp_path / "nope"), "leaderboard", "count")
    _one_line_error(res, 1, "does not exist")
    (tmp_path / "empty").mkdir()
    res = tally("query", "--data-dir", str(tmp_path / "empty"), "leaderboard", "count")
    _one_line_error(res, 1, "not a tally store")
    res = tally("status", "--data-dir", str(tmp_path / "nope"))
    _one_line_error(res, 1, "does not exist")


def test_empty_store_lists_no_aggregates(tmp_path: Path) -> None:
    Store.open(tmp_path / "d").close()
    res = tally("query", "--data-dir", str(tmp_path / "d"), "leaderboard", "count")
    _one_line_error(res, 2, "no aggregates yet")


def test_url_and_data_dir_together(tmp_path: Path) -> None:
    res = tally("query", "--url", "http://127.0.0.1:1", "--data-dir", str(tmp_path), "x", "count")
    _one_line_error(res, 2, "not both")


def test_unreachable_server() -> None:
    port = free_port()
    res = tally(
        "query", "--url", f"http://127.0.0.1:{port}", "leaderboard", "count", "--timeout", "3"
    )
    _one_line_error(res, 1, "cannot reach")
    res = tally("status", "--url", f"http://127.0.0.1:{port}", "--timeout", "3")
    _one_line_error(res, 1, "cannot reach")


HELPS = [
    ["query"],
    ["status"],
    ["demo"],
    *[
        ["query", "leaderboard", op]
        for op in ("count", "at", "index-of", "page", "count-batch", "namespaces")
    ],
]


@pytest.mark.parametrize("cmd", HELPS, ids=[" ".join(c) for c in HELPS])
def test_help_has_an_example(cmd: list[str]) -> None:
    res = tally(*cmd, "--help")
    assert res.returncode == 0, res.stderr
    assert "example" in res.stdout.lower()
    assert res.stderr == ""


def test_value_rule_is_documented() -> None:
    out = tally("query", "--help").stdout
    assert "'\"1000\"'" in out and '[1,"a"]' in out


# ---------------------------------------------------------------- status


@pytest.mark.kafka
def test_status_offsets_equal_end_offsets(built: Built) -> None:
    res = tally(
        "status",
        "--data-dir",
        str(built.data_dir),
        "--json",
        "--bootstrap-servers",
        built.bootstrap,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    ends = asyncio.run(_end_offsets(built.bootstrap, built.topic))
    got = {p["partition"]: p["offset"] for p in doc["partitions"] if p["topic"] == built.topic}
    assert got == ends
    assert all(p["end_offset"] == ends[p["partition"]] and p["lag"] == 0 for p in doc["partitions"])
    assert doc["lag"] == 0 and doc["broker_reachable"] is True
    items = {a["name"]: a["items"] for a in doc["aggregates"]}
    assert items == {
        n: sum(built.agg(n).count(ns) for ns in built.agg(n).namespaces()) for n in items
    }
    assert set(items) == {"leaderboard", "by_game", "high_scores"}


@pytest.mark.kafka
def test_status_tables_and_unreachable_broker(built: Built) -> None:
    res = tally(
        "status",
        "--data-dir",
        str(built.data_dir),
        "--bootstrap-servers",
        f"127.0.0.1:{free_port()}",
    )
    assert res.returncode == 0, res.stderr
    assert "lag unknown: broker unreachable" in res.stdout
    assert "leaderboard" in res.stdout and built.topic in res.stdout
    assert f"{len(built.rows)}" in res.stdout


def read_lines(
    proc: subprocess.Popen[bytes], n: int, timeout: float, what: str, log: Path
) -> bytes:
    """``proc``'s stdout up to (at least) its ``n``-th line; fails naming ``what`` (with the lines so
    far and the tail of its stderr ``log``) if they do not arrive within ``timeout`` s."""
    assert proc.stdout is not None
    fd, buf, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while (got := buf.count(b"\n")) < n:
        left = deadline - time.monotonic()
        chunk = os.read(fd, 1 << 16) if left > 0 and select.select([fd], [], [], left)[0] else None
        if not chunk:
            state = f"still running after {timeout}s" if chunk is None else f"exited {proc.wait()}"
            raise AssertionError(
                f"waiting for {what}: the process {state}, after {got} lines: "
                f"{buf[-2000:]!r}\nits stderr:\n{tail(log)}"
            )
        buf += chunk
    return buf


@pytest.mark.kafka
def test_status_watch_refreshes_until_ctrl_c(built: Built, tmp_path: Path) -> None:
    err_log = tmp_path / "status.stderr"
    with open(err_log, "wb") as err:
        proc = subprocess.Popen(
            [TALLY, "status", "--data-dir", str(built.data_dir), "--watch", "0.3", "--json",
             "--bootstrap-servers", built.bootstrap],
            stdout=subprocess.PIPE,
            stderr=err,
            env=_env(),
        )  # fmt: skip
    try:
        out = read_lines(proc, 2, 60, "two refreshes of tally status --watch", err_log)
        proc.send_signal(signal.SIGINT)
        rc = wait_exit(proc, "tally status --watch did not exit on Ctrl-C", 30, err_log)
        assert proc.stdout is not None
        out += proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, tail(err_log)
    docs = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert len(docs) >= 2
    # Every refresh reads the same (unchanging) store: the items of each aggregate.
    items = {
        n: sum(built.agg(n).count(ns) for ns in built.agg(n).namespaces())
        for n in ("leaderboard", "by_game", "high_scores")
    }
    assert all({a["name"]: a["items"] for a in d["aggregates"]} == items for d in docs), docs


# ---------------------------------------------------------------- --url against a running server


@pytest.mark.kafka
@pytest.mark.skipif(
    importlib.util.find_spec("tally.consumers.http.app") is None,
    reason="consumers/http/app.py not in this build",
)
def test_query_url_matches_data_dir(built: Built, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [TALLY, "consume", DEFINITIONS, "--topic", f"scores={built.topic}", "--data-dir", str(tmp_path / "d"),
         "--bootstrap-servers", built.bootstrap, "--http", f"127.0.0.1:{port}", "--log-level", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )  # fmt: skip
    try:

        def caught_up() -> Any:
            """/status once the server has caught up; else what it said (or None)."""
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            with urllib.request.urlopen(f"{url}/status", timeout=2) as r:
                doc = json.loads(r.read())
            items = {a["name"]: (a["state"], a["items"]) for a in doc["aggregates"]}
            ready = (
                doc.get("partitions")
                and doc.get("lag") == 0
                and all(state == "ready" for state, _ in items.values())
                and items.get("leaderboard") == ("ready", len(built.rows))
            )
            return ready or (doc.get("lag"), items)

        wait_for(
            lambda: caught_up() is True,
            f"the server at {url} to catch up",
            timeout=60,
            every=0.2,
            swallow=(OSError,),
        )
        for args, aggregate, engine in CASES[::2]:
            remote = tally("query", "--url", url, aggregate, *args, "--json")
            assert remote.returncode == 0, remote.stderr
            assert json.loads(remote.stdout) == as_json(engine(built.agg(aggregate))), args
        res = tally("query", "--url", url, "leaderboard", "count")
        assert res.stdout == f"{len(built.rows)}\n"
        _one_line_error(tally("query", "--url", url, "nope", "count"), 2, "nope")
        _one_line_error(
            tally("query", "--url", url, "leaderboard", "at", "100000"), 2, "out of range"
        )
        res = tally("status", "--url", url, "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert {a["name"] for a in doc["aggregates"]} == {"leaderboard", "by_game", "high_scores"}
        res = tally("status", "--url", url)
        assert res.returncode == 0 and "leaderboard" in res.stdout and "events" in res.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- demo


@pytest.mark.kafka
def test_demo_short_verifies(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = unique_topic("demo-scores")
    common = [
        "demo",
        "--no-http",
        "--bootstrap-servers",
        kafka_bootstrap,
        "--topic",
        topic,
        "--seed",
        "7",
    ]
    # (How long it takes is measured by scripts/bench/demo.py, not asserted here.)
    res = tally(*common, "--short", "--data-dir", str(tmp_path / "a"), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "verified against an in-memory oracle: ✓" in res.stdout
    assert "tally query --data-dir" in res.stdout
    # The oracle of a later run starts from the topic's content: once resuming
    # the same data dir, once replaying everything into a fresh one.
    for data_dir in ("a", "b"):
        res = tally(
            *common,
            "--short",
            "--events",
            "300",
            "--data-dir",
            str(tmp_path / data_dir),
            timeout=180,
        )
        assert res.returncode == 0, res.stdout + res.stderr
        assert "verified against an in-memory oracle: ✓" in res.stdout
        assert "already holds" in res.stdout
    # The data dir it leaves answers `tally query`.
    res = tally("query", "--data-dir", str(tmp_path / "b"), "leaderboard", "count", "--json")
    with Store.open(tmp_path / "b", read_only=True) as store:
        count = store.aggregate("leaderboard").count()
    assert res.returncode == 0 and int(res.stdout) == count > 0


def test_demo_bad_usage() -> None:
    _one_line_error(tally("demo", "--events", "0"), 2, "--events")
    _one_line_error(tally("demo", "--no-http", "--http", "127.0.0.1:1"), 2, "not both")


@pytest.mark.parametrize(
    ("cli", "env", "field"),
    [
        ({"batch_size": 0}, {}, "batch_size"),
        ({}, {"TALLY_REPLAY_CHUNK": "0"}, "replay_chunk"),
        ({}, {"TALLY_REPLAY_BATCH_SIZE": "-5"}, "replay_batch_size"),
        ({}, {"TALLY_POLL_TIMEOUT_MS": "-1"}, "poll_timeout_ms"),
    ],
)
def test_settings_out_of_range_are_refused_from_any_layer(
    cli: dict[str, Any], env: dict[str, str], field: str
) -> None:
    from tally.consumers.cli.settings import load_settings
    from tally.schemas import ConfigError

    with pytest.raises(ConfigError, match=rf"invalid setting: .*\$\.{field}"):
        load_settings(cli, None, env)
    assert load_settings({}, None, {}).batch_size == 5000  # the defaults themselves are valid


async def _delete_topic(bootstrap: str, topic: str) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
        for _ in range(300):  # deletion is asynchronous on the broker
            if topic not in await admin.list_topics():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"topic {topic} still listed after deletion")
    finally:
        await admin.close()


@pytest.mark.kafka
def test_status_flags_a_stored_offset_past_the_partition_end(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A topic deleted and recreated (with fewer records) leaves stored offsets past the new
    end: `tally status` says so and what to do instead of reporting lag 0, and a consumer
    started on that data dir flags it in its log, /status and /readyz."""
    topic = unique_topic("recreated")
    create_topic(kafka_bootstrap, topic, partitions=1, compacted=True)
    events, _ = expected_rows()
    asyncio.run(_produce(kafka_bootstrap, topic, events))
    data_dir = tmp_path / "data"
    consume = ["consume", DEFINITIONS, "--topic", f"scores={topic}", "--data-dir", str(data_dir),
               "--bootstrap-servers", kafka_bootstrap]  # fmt: skip
    tally(*consume, "--until-caught-up", "--log-level", "warning", timeout=180, check=True)
    stored = asyncio.run(_end_offsets(kafka_bootstrap, topic))[0]
    assert stored > 3  # (deletes add tombstones: more records than events)

    asyncio.run(_delete_topic(kafka_bootstrap, topic))
    create_topic(kafka_bootstrap, topic, partitions=1, compacted=True)
    asyncio.run(_produce(kafka_bootstrap, topic, events[:3]))

    status = ["status", "--data-dir", str(data_dir), "--bootstrap-servers", kafka_bootstrap]
    res = tally(*status, "--json", check=True)
    (part,) = json.loads(res.stdout)["partitions"]
    assert (part["offset"], part["end_offset"], part["lag"]) == (stored, 3, None)
    assert "past the partition's end" in part["problem"] and "tally rebuild" in part["problem"]
    assert json.loads(res.stdout)["lag"] is None
    text = tally(*status, check=True).stdout
    assert "problem:" in text and "recreated" in text

    port = free_port()
    log = tmp_path / "consume.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [TALLY, *consume, "--http", f"127.0.0.1:{port}", "--log-format", "json"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=_env(),
        )
    try:

        def flagged() -> Any:
            assert proc.poll() is None, tail(log)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as r:
                doc = json.loads(r.read())
            parts = doc.get("partitions") or []
            return parts and parts[0].get("problem") and doc

        doc = wait_for(flagged, "/status to flag the partition", timeout=60, swallow=(OSError,))
        assert doc["partitions"][0]["lag"] is None
        assert any("past the partition's end" in w for w in doc["warnings"])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2)
            raise AssertionError("/readyz answered ready with a recreated topic under it")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and "past the partition's end" in e.read().decode()
        assert "stored offset beyond the partition's end" in log.read_text()
    finally:
        proc.terminate()
        wait_exit(proc, "the consumer", 30, log)
