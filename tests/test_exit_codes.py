"""The exit-code table (`tally.schemas.errors.EXIT_CODES`), each kind through a real subcommand.

Every row of the table is provoked through the `tally` entry point as a user runs it (a
subprocess), and each failure must be one line ``tally COMMAND: error: ...`` on stderr
with the code of its kind: the same failure gives the same code and the same CLI hint in
every command (an unreachable consumer says ``--url``, never "TallyClient"). The table is
also what `tally --help` and the README say.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from consumer_util import TALLY, child_env, free_port, wait_exit, wait_for
from kafka_util import create_topic, unique_topic

from tally.consumers.version import DISTRIBUTION
from tally.engine import Store, TableAggregate
from tally.engine.triggers import Applier
from tally.schemas import ChangeEvent
from tally.schemas.errors import (
    EXIT_CODES,
    EXIT_DRIFT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_USAGE,
)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(300)

DEFS = """
from tally.engine import TableAggregate
scores = TableAggregate("scores", table="scores", sort_key="score", sum_value="score")
"""


def tally(
    *args: str, cwd: Path | None = None, input: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TALLY, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(**env),
        cwd=cwd or ROOT,
        input=input,
        check=False,
    )


def one_line(res: subprocess.CompletedProcess[str], code: int, command: str, fragment: str) -> str:
    """``res`` failed with ``code`` and one line ``tally COMMAND: error: ...fragment...``."""
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"tally {command}: "), lines[0]
    assert fragment in lines[0], lines[0]
    return lines[0]


def build_store(path: Path, scores: dict[int, int]) -> None:
    """A store holding aggregate ``scores`` as a consumer builds it, one upsert per row."""
    d = TableAggregate("scores", table="scores", sort_key="score", sum_value="score")
    with Store.open(path) as store:
        events = [
            ChangeEvent("scores", "upsert", i, {"id": i, "score": s}) for i, s in scores.items()
        ]
        Applier(store, [d]).apply_events(events)


@pytest.fixture
def defs(tmp_path: Path) -> Path:
    p = tmp_path / "defs.py"
    p.write_text(DEFS)
    return p


# ---------------------------------------------------------------- the table itself


def test_the_table_is_in_tally_help_and_the_readme() -> None:
    res = tally("--help")
    assert res.returncode == EXIT_OK, res.stderr
    help_text = " ".join(res.stdout.split())
    readme = (ROOT / "README.md").read_text()
    for code, meaning in EXIT_CODES.items():
        assert f"{code} {meaning}" in help_text, (code, res.stdout)
        assert re.search(rf"^\| `{code}` \| {re.escape(meaning)} \|", readme, re.M), code
    assert set(EXIT_CODES) == {EXIT_OK, EXIT_RUNTIME, EXIT_USAGE, EXIT_DRIFT, EXIT_INTERRUPTED}


def test_version_is_the_installed_distributions() -> None:
    from importlib import metadata

    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["name"] == DISTRIBUTION  # the one constant follows the distribution's name
    for argv in (
        [TALLY, "--version"],
        [str(Path(TALLY).parent / "python"), "-m", "tally.consumers", "--version"],
    ):
        res = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=child_env(), check=False
        )
        assert res.returncode == EXIT_OK, res.stderr
        assert res.stdout.strip() == f"tally {metadata.version(DISTRIBUTION)} ({DISTRIBUTION})"


# ---------------------------------------------------------------- 2: usage


def test_usage_errors_exit_2(tmp_path: Path, defs: Path) -> None:
    build_store(tmp_path / "d", {1: 10})
    # argparse's own usage errors, in the command and in a query op's sub-parser
    one_line(tally("query"), EXIT_USAGE, "query", "required")
    one_line(
        tally("query", "--data-dir", str(tmp_path / "d"), "scores", "median"),
        EXIT_USAGE,
        "query",
        "invalid choice",
    )
    # a wrong name, from the engine (an unknown aggregate) and from the command
    one_line(
        tally("query", "--data-dir", str(tmp_path / "d"), "nope", "count"),
        EXIT_USAGE,
        "query",
        "known aggregates: scores",
    )
    one_line(
        tally(
            "reconcile",
            "nope",
            "--source",
            str(tmp_path / "s.jsonl"),
            "--definitions",
            str(defs),
            "--data-dir",
            str(tmp_path / "d"),
        ),
        EXIT_USAGE,
        "reconcile",
        "no aggregate named 'nope'",
    )
    one_line(
        tally("rebuild", "nope", "--data-dir", str(tmp_path / "d")),
        EXIT_USAGE,
        "rebuild",
        "no aggregate named 'nope'",
    )
    one_line(
        tally("produce", "--table", "t", "--topic", "bad topic!", "x.jsonl"),
        EXIT_USAGE,
        "produce",
        "invalid topic name",
    )
    one_line(tally("demo", "--events", "0"), EXIT_USAGE, "demo", "--events")


def test_config_errors_exit_2_and_name_the_layer(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[status]\nnonsense = 1\n")
    line = one_line(
        tally("status", "--config", str(bad)),
        EXIT_USAGE,
        "status",
        "[status] has no setting 'nonsense'",
    )
    assert "bootstrap_servers" in line  # the keys it does have
    bad.write_text("url = [\n")
    one_line(
        tally("query", "--config", str(bad), "scores", "count"),
        EXIT_USAGE,
        "query",
        "not valid TOML",
    )
    one_line(
        tally("query", "scores", "count", TALLY_TIMEOUT="soon"),
        EXIT_USAGE,
        "query",
        "invalid setting",
    )
    assert "(from TALLY_TIMEOUT)" in tally("query", "scores", "count", TALLY_TIMEOUT="soon").stderr
    res = tally("produce", "--table", "t", "--topic", "t", "--timeout", "-1", "x.jsonl")
    assert "(from --timeout)" in one_line(res, EXIT_USAGE, "produce", "invalid setting")
    one_line(
        tally("consume", "--data-dir", str(tmp_path / "c")),
        EXIT_USAGE,
        "consume",
        "no definitions given",
    )


def test_input_errors_exit_2_and_name_the_line(tmp_path: Path, defs: Path) -> None:
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,score\n1,5\n2,6,7\n")
    nan = tmp_path / "nan.jsonl"
    nan.write_text('{"id": 1, "score": 5}\n{"id": 2, "score": NaN}\n')
    build_store(tmp_path / "d", {1: 5, 2: 6})
    for path, where in (
        (ragged, f"{ragged} line 3: 3 fields"),
        (nan, f"{nan} line 2: invalid JSON"),
    ):
        one_line(
            tally("produce", "--dry-run", "--table", "scores", "--topic", "t", str(path)),
            EXIT_USAGE,
            "produce",
            where,
        )
        one_line(
            tally(
                "reconcile",
                "scores",
                "--source",
                str(path),
                "--definitions",
                str(defs),
                "--data-dir",
                str(tmp_path / "d"),
            ),
            EXIT_USAGE,
            "reconcile",
            where,
        )


# ---------------------------------------------------------------- 1: runtime


def test_runtime_failures_exit_1(tmp_path: Path) -> None:
    one_line(
        tally("query", "--data-dir", str(tmp_path / "nope"), "scores", "count"),
        EXIT_RUNTIME,
        "query",
        "does not exist",
    )
    one_line(
        tally("status", "--data-dir", str(tmp_path / "nope")),
        EXIT_RUNTIME,
        "status",
        "does not exist",
    )
    build_store(tmp_path / "d", {1: 10})
    with Store.open(tmp_path / "d"):  # a writer holds the store, as a running consumer does
        line = one_line(
            tally("rebuild", "scores", "--data-dir", str(tmp_path / "d")),
            EXIT_RUNTIME,
            "rebuild",
            "is locked",
        )
        assert "--url" in line


@pytest.fixture
def no_answer() -> Iterator[str]:
    """The url of a port nothing listens on."""
    yield f"http://127.0.0.1:{free_port()}"


def test_an_unreachable_consumer_is_the_same_error_in_every_command(
    tmp_path: Path, defs: Path, no_answer: str
) -> None:
    """Same failure, same exit code, same advice (the CLI's, not the library's)."""
    runs = {
        "query": tally("query", "--url", no_answer, "scores", "count"),
        "status": tally("status", "--url", no_answer),
        "rebuild": tally("rebuild", "scores", "--url", no_answer),
        "reconcile": tally(
            "reconcile",
            "scores",
            "--source",
            "kafka:t",
            "--definitions",
            str(defs),
            "--patch",
            "--url",
            no_answer,
        ),
        "query (url from the environment)": tally("query", "scores", "count", TALLY_URL=no_answer),
    }
    for name, res in runs.items():
        line = one_line(res, EXIT_RUNTIME, name.split()[0], f"cannot reach tally at {no_answer}")
        assert "pass the right --url (or $TALLY_URL)" in line, name
        assert "TallyClient" not in line, name


def test_an_unreachable_broker_exits_1(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"id": 1}\n')
    port = free_port()
    line = one_line(
        tally(
            "produce",
            "--table",
            "t",
            "--topic",
            "t",
            "--timeout",
            "3",
            str(rows),
            TALLY_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}",
        ),
        EXIT_RUNTIME,
        "produce",
        f"cannot connect to Kafka at 127.0.0.1:{port}",
    )
    assert "--bootstrap-servers (or $TALLY_BOOTSTRAP_SERVERS)" in line


# ---------------------------------------------------------------- 3: drift


def test_drift_exits_3_with_the_report_on_stdout(tmp_path: Path, defs: Path) -> None:
    build_store(tmp_path / "d", {1: 10, 2: 20, 3: 30})
    snap = tmp_path / "snap.jsonl"
    snap.write_text(
        "".join(json.dumps({"id": i, "score": s}) + "\n" for i, s in {1: 10, 2: 21, 4: 40}.items())
    )
    base = [
        "reconcile",
        "scores",
        "--source",
        str(snap),
        "--definitions",
        str(defs),
        "--data-dir",
        str(tmp_path / "d"),
        "--json",
    ]
    res = tally(*base, "--fail-on-drift", "--progress", "lines", TALLY_PROGRESS_INTERVAL="0")
    assert res.returncode == EXIT_DRIFT, res.stderr
    report = json.loads(res.stdout)
    assert (report["missing"], report["extra"], report["wrong"]) == (1, 1, 1)
    lines = res.stderr.strip().splitlines()
    assert (
        lines[-1] == "tally reconcile: drift: 3 difference(s) between 'scores' and the source "
        "(--fail-on-drift); see the report above; --patch fixes them"
    )
    assert lines[:-1] and all(
        ln.startswith("reconcile: ") and " rows, " in ln for ln in lines[:-1]
    ), lines
    assert "3 rows" in lines[-2] and "3 differences" in lines[-2]  # the last line: the whole source
    res = tally(*base)  # without --fail-on-drift a report is a success
    assert res.returncode == EXIT_OK and res.stderr == "", res.stderr
    res = tally(*base, "--patch", "--fail-on-drift")  # patched: in sync now
    assert res.returncode == EXIT_OK, res.stderr
    assert tally(*base, "--fail-on-drift").returncode == EXIT_OK


# ---------------------------------------------------------------- 130: interrupted


class _Silent:
    """A TCP server that accepts connections and never answers; `accepted` is set on the first."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_ctrl_c_exits_130(tmp_path: Path) -> None:
    server = _Silent()
    err_log = tmp_path / "stderr"
    try:
        with open(err_log, "w") as err:
            proc = subprocess.Popen(
                [TALLY, "query", "--url", server.url, "--timeout", "100", "scores", "count"],
                stdout=subprocess.PIPE,
                stderr=err,
                env=child_env(),
                text=True,
            )
        try:
            # It is waiting for the answer once its request reached the server.
            wait_for(
                server.accepted.is_set, "tally query to connect to the silent server", timeout=60
            )
            proc.send_signal(signal.SIGINT)
            rc = wait_exit(proc, "tally query did not exit on Ctrl-C", 30, err_log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        server.close()
    assert rc == EXIT_INTERRUPTED, err_log.read_text()
    assert err_log.read_text() == "tally query: interrupted\n"


@pytest.mark.kafka
def test_ctrl_c_stops_tally_produce_with_130_after_its_progress_lines(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A pipe that stays open: progress lines (every 0 s) show what was published, Ctrl-C ends."""
    topic = unique_topic("exit-130")
    create_topic(kafka_bootstrap, topic, partitions=1)
    err_log = tmp_path / "stderr"
    with open(err_log, "w") as err:
        proc = subprocess.Popen(
            [TALLY, "produce", "--table", "t", "--topic", topic, "--progress", "lines", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=child_env(TALLY_BOOTSTRAP_SERVERS=kafka_bootstrap, TALLY_PROGRESS_INTERVAL="0"),
        )
    assert proc.stdin is not None
    try:
        proc.stdin.write('{"id": 1}\n{"id": 2}\n')
        proc.stdin.flush()
        wait_for(
            lambda: f"producing to {topic}: 2 events" in err_log.read_text(),
            lambda: f"a progress line with 2 events; stderr: {err_log.read_text()!r}",
            timeout=60,
        )
        proc.send_signal(signal.SIGINT)
        rc = wait_exit(proc, "tally produce did not exit on Ctrl-C", 30, err_log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err_log.read_text().splitlines()
    assert rc == EXIT_INTERRUPTED, lines
    assert lines[-1] == "tally produce: interrupted", lines
    assert all(ln.startswith(f"producing to {topic}: ") for ln in lines[:-1]), lines
