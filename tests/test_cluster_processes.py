"""``tally consume --processes N`` (`tally.consumers.cluster.processes`), without a broker.

`member_args` is driven through the real CLI (`tally.consumers.cli.main`: the settings are
what the flags, the environment and the defaults make of them; only the spawning is replaced
by a recorder), and each member's command line is parsed back by the real parser: what a
member does is what its parsed flags say. `run_processes` runs real member processes (with
no broker they wait for one) to check the exit statuses and the forwarding of SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tally.consumers.cli.main import build_parser, main
from tally.consumers.cluster import processes
from tally.consumers.cluster.processes import member_args, run_processes
from tally.consumers.http import parse_address
from tally.schemas.config import ConsumerSettings
from tally.schemas.errors import EXIT_USAGE, UsageError

DEFS = "defs.py"  # --processes starts the members before any definitions are loaded
BASE = ["consume", DEFS, "--group-id", "g", "--topic", "players=scores", "--batch-size", "7"]


@pytest.fixture(autouse=True)
def no_tally_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the flags of each test only (and what it sets itself)."""
    for name in list(os.environ):
        if name.startswith("TALLY_"):
            monkeypatch.delenv(name)


def spawned(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> list[list[str]]:
    """The members' command lines of ``tally ARGV``: the settings and argv the CLI hands
    `run_processes`, given to `member_args` as `run_processes` does."""
    got: list[list[list[str]]] = []

    def record(settings: ConsumerSettings, n: int, parent: list[str]) -> int:
        got.append(member_args(settings, n, parent))
        return 0

    monkeypatch.setattr(processes, "run_processes", record)
    monkeypatch.setattr(sys, "argv", ["tally", *argv])
    assert main(argv) == 0
    (commands,) = got
    return commands


def parsed(command: list[str]) -> argparse.Namespace:
    """A member's command line as the member's own parser reads it."""
    assert command[:3] == [sys.executable, "-m", "tally.consumers"]
    return build_parser().parse_args(command[3:])


def flag_spellings(command: list[str], flag: str) -> list[str]:
    return [a for a in command if a == flag or a.startswith(flag + "=")]


@pytest.mark.parametrize(
    ("front", "back"),
    [
        (["--processes", "3"], ["--data-dir", "D", "--http", "127.0.0.1:9100"]),
        (["--processes=3"], ["--data-dir=D", "--http=127.0.0.1:9100"]),
        (["--http=127.0.0.1:9100", "--processes", "3"], ["--data-dir=D"]),
        # repeated: argparse takes the last, and so must the members
        (
            ["--data-dir", "old", "--processes", "5", "--http", "127.0.0.1:1"],
            ["--processes=3", "--data-dir=D", "--http", "127.0.0.1:9100"],
        ),
    ],
    ids=["spaced", "equals", "mixed", "repeated"],
)
def test_each_member_gets_its_own_data_dir_and_port_and_every_other_flag(
    monkeypatch: pytest.MonkeyPatch, front: list[str], back: list[str]
) -> None:
    """The flags around the definitions and between the others (argparse takes both)."""
    commands = spawned(monkeypatch, [*BASE[:2], *front, *BASE[2:], *back])
    assert len(commands) == 3
    for k, command in enumerate(commands):
        args = parsed(command)
        assert args.processes is None, command  # a member starts no members of its own
        assert args.data_dir == os.path.join("D", f"member-{k}")
        assert args.http == f"127.0.0.1:{9100 + k}"
        assert parse_address(args.http) == ("127.0.0.1", 9100 + k)
        assert (args.definitions, args.group_id, args.topic, args.batch_size) == (
            DEFS,
            "g",
            ["players=scores"],
            7,
        )
        assert flag_spellings(command, "--processes") == []
        assert len(flag_spellings(command, "--data-dir")) == 1
        assert len(flag_spellings(command, "--http")) == 1
        # the parent's other arguments, in their order
        assert command[3:-4] == BASE
    assert len({tuple(c[:-4]) for c in commands}) == 1  # only the data dir and port differ


def test_the_data_dir_and_address_from_the_environment_and_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TALLY_DATA_DIR", str(tmp_path / "env-data"))
    commands = spawned(monkeypatch, [*BASE, "--processes", "2"])
    got = [(parsed(c).data_dir, parsed(c).http) for c in commands]
    assert got == [
        (str(tmp_path / "env-data" / "member-0"), "127.0.0.1:8750"),  # the default --http
        (str(tmp_path / "env-data" / "member-1"), "127.0.0.1:8751"),
    ]


@pytest.mark.parametrize("spelling", [["--http", "[::1]:9100"], ["--http=[::1]:9100"]])
def test_an_ipv6_host_stays_in_brackets(
    monkeypatch: pytest.MonkeyPatch, spelling: list[str]
) -> None:
    commands = spawned(monkeypatch, [*BASE, *spelling, "--processes", "2"])
    for k, command in enumerate(commands):
        http = parsed(command).http
        assert http == f"[::1]:{9100 + k}"
        assert parse_address(http) == ("::1", 9100 + k)


def test_the_last_port_may_be_65535(monkeypatch: pytest.MonkeyPatch) -> None:
    commands = spawned(monkeypatch, [*BASE, "--http", "127.0.0.1:65534", "--processes", "2"])
    assert [parsed(c).http for c in commands] == ["127.0.0.1:65534", "127.0.0.1:65535"]


def test_an_abbreviated_data_dir_is_overridden_by_the_members_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """argparse takes ``--data`` for ``--data-dir``; the member's own flag comes last."""
    commands = spawned(monkeypatch, [*BASE, "--data", "D", "--processes", "2"])
    assert [parsed(c).data_dir for c in commands] == [
        os.path.join("D", "member-0"),
        os.path.join("D", "member-1"),
    ]


@pytest.mark.parametrize("spelling", [["--proc", "2"], ["--process=2"]])
def test_an_abbreviated_processes_flag_is_not_passed_to_the_members(
    monkeypatch: pytest.MonkeyPatch, spelling: list[str]
) -> None:
    commands = spawned(monkeypatch, [*BASE, "--http", "127.0.0.1:9100", *spelling])
    assert len(commands) == 2
    assert [parsed(c).processes for c in commands] == [None, None]


# ---- what cannot be started, and what to do instead --------------------------------------


def settings(**fields: Any) -> ConsumerSettings:
    base: dict[str, Any] = {"definitions": DEFS, "group_id": "g", "http": "127.0.0.1:9100"}
    return ConsumerSettings(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "n", "words"),
    [
        ({"group_id": None}, 2, "give it a --group-id, e.g. --group-id leaderboard"),
        ({"http": None}, 2, "--processes needs --http HOST:PORT (member k serves on PORT+k)"),
        ({"advertise": "http://me:9100"}, 2, "leave out --advertise"),
        ({}, 0, "--processes must be at least 1, got 0"),
        ({}, -3, "--processes must be at least 1, got -3"),
        (
            {"http": "127.0.0.1:65534"},
            3,
            "--processes 3 needs ports 65534..65536: choose another --http port",
        ),
        ({"http": "127.0.0.1:0"}, 2, "choose another --http port"),
    ],
    ids=["no-group-id", "no-http", "advertise", "zero", "negative", "past-65535", "port-0"],
)
def test_what_cannot_be_started_is_a_usage_error_saying_what_to_do(
    fields: dict[str, Any], n: int, words: str
) -> None:
    with pytest.raises(UsageError) as e:
        member_args(settings(**fields), n, [*BASE, "--processes", str(n)])
    assert words in str(e.value)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--no-http"], "--processes needs --http HOST:PORT"),
        (["--advertise", "http://h:1"], "leave out --advertise"),
        (["--processes", "0"], "--processes must be at least 1, got 0"),
    ],
)
def test_the_cli_says_it_on_one_line_and_exits_with_the_usage_status(
    capsys: pytest.CaptureFixture[str], flags: list[str], words: str
) -> None:
    argv = [*BASE, "--http", "127.0.0.1:9100", "--processes", "2", *flags]
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("tally consume: ") and words in err
    assert err.count("\n") == 1


def test_without_a_group_id_the_cli_asks_for_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["consume", DEFS, "--http", "127.0.0.1:9100", "--processes", "2"]) == EXIT_USAGE
    assert "give it a --group-id" in capsys.readouterr().err


# ---- run_processes: real members -----------------------------------------------------------

DEFINITIONS = """\
from tally.engine import TableAggregate

scores = TableAggregate("scores", table="players", sort_key="score")
"""


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive loopback ports nothing listens on right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + n - 1 > 65535:
            continue
        try:
            for p in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return first
    raise AssertionError(f"no {n} consecutive free ports")


def test_members_that_fail_are_reported_and_their_status_returned(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Two real members whose definitions file does not exist: each exits with its error;
    the parent names both and returns their status."""
    missing = str(tmp_path / "missing.py")
    argv = ["consume", missing, "--group-id", "g", "--topic", "players=scores"]
    port = free_ports(2)
    s = settings(definitions=missing, data_dir=str(tmp_path / "data"), http=f"127.0.0.1:{port}")
    rc = run_processes(s, 2, argv)
    err = capfd.readouterr().err
    assert rc not in (0, None)
    assert f"tally: member 0 exited with status {rc}" in err
    assert f"tally: member 1 exited with status {rc}" in err
    assert err.count("missing.py") >= 2, err  # each member's own error names the file


@pytest.fixture
def parent_group() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes started in their own session; whatever is left of a session at the end
    (a test that failed half way) is killed by its group id."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def start_waiting_members(
    tmp_path: Path, parent_group: list[subprocess.Popen[bytes]]
) -> tuple[subprocess.Popen[bytes], list[bytes], threading.Thread, set[str]]:
    """`tally consume --processes 2` against a broker address nothing answers; returns once
    both members said they wait for it (their signal handlers are set): the parent, its
    stderr lines, the thread reading them (done once every process closed stderr) and the
    members' URLs."""
    defs = tmp_path / "defs.py"
    defs.write_text(DEFINITIONS)
    port = free_ports(2)
    with socket.socket() as s:  # a broker address nothing answers: members wait for it
        s.bind(("127.0.0.1", 0))
        nobody = f"127.0.0.1:{s.getsockname()[1]}"
    tally = str(Path(sys.executable).parent / "tally")
    parent = subprocess.Popen(
        [
            *(tally, "consume", str(defs), "--topic", "players=scores", "--group-id", "g"),
            *("--bootstrap-servers", nobody, "--data-dir", str(tmp_path / "data")),
            *("--http", f"127.0.0.1:{port}", "--processes", "2", "--log-format", "json"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    parent_group.append(parent)
    lines: list[bytes] = []
    assert parent.stderr is not None
    stderr = parent.stderr
    reader = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)
    reader.start()

    def waiting() -> set[str]:
        """The members that have said they wait for the broker (signal handlers set)."""
        out = set()
        for line in list(lines):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "broker unreachable, waiting":
                out.add(rec["member"])
        return out

    want = {f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"}
    deadline = time.monotonic() + 90
    while waiting() != want:
        assert parent.poll() is None, b"".join(lines).decode()
        assert time.monotonic() < deadline, b"".join(lines).decode()
        time.sleep(0.05)
    return parent, lines, reader, want


def stopping(lines: list[bytes]) -> set[str]:
    return {
        json.loads(line)["member"]
        for line in list(lines)
        if line.startswith(b"{") and json.loads(line).get("event") == "stopping"
    }


def test_sigterm_to_the_parent_stops_every_member_and_it_exits_0(
    tmp_path: Path, parent_group: list[subprocess.Popen[bytes]]
) -> None:
    parent, lines, reader, want = start_waiting_members(tmp_path, parent_group)
    parent.send_signal(signal.SIGTERM)  # to the parent only: it forwards
    assert parent.wait(60) == 0, b"".join(lines).decode()
    reader.join(10)
    assert stopping(lines) == want
    with pytest.raises(ProcessLookupError):  # no member outlives the parent
        os.killpg(parent.pid, 0)


def test_a_kill_9_of_the_parent_stops_every_member(
    tmp_path: Path, parent_group: list[subprocess.Popen[bytes]]
) -> None:
    """The parent cannot forward a SIGKILL: each member is told by the kernel instead
    (PR_SET_PDEATHSIG) and stops cleanly rather than running on, unseen."""
    parent, lines, reader, want = start_waiting_members(tmp_path, parent_group)
    parent.kill()
    assert parent.wait(30) == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while True:  # the members are in the parent's process group until they exit
        try:
            os.killpg(parent.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, b"".join(lines).decode()
        time.sleep(0.05)
    reader.join(10)
    assert stopping(lines) == want, b"".join(lines).decode()
