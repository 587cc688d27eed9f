"""``tally consume --processes N``: N members of one deployment on this machine, one per core.

Member k runs as its own process (``python -m tally.consumers consume ...``, the same arguments)
with ``--data-dir DATA_DIR/member-k`` and ``--http HOST:PORT+k``, so N members use N cores (one
Python process applies on one). The parent forwards SIGINT and SIGTERM to every member and
exits when all have, with the worst exit status; a member that dies is reported and not
restarted (the others take over its partitions, as in any deployment). A member gets SIGTERM
when the parent dies, even by kill -9 (Linux: ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Sequence
from types import FrameType

from tally.schemas.config import ConsumerSettings
from tally.schemas.errors import UsageError

__all__ = ["member_args", "run_processes"]


def _strip(
    argv: Sequence[str], flags: Collection[str], switches: Collection[str] = ()
) -> list[str]:
    """``argv`` without the given flags (``--flag V``, ``--flag=V`` and any abbreviation
    argparse would take for them, ``--proc 2``) and switches (no value)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if len(name) > 2 and name.startswith("--"):
            if any(f.startswith(name) for f in flags):
                skip = "=" not in a
                continue
            if any(f.startswith(name) for f in switches):
                continue
        out.append(a)
    return out


def member_args(settings: ConsumerSettings, n: int, argv: Sequence[str]) -> list[list[str]]:
    """The command line of each of the ``n`` members (``argv``: the parent's, after ``tally``)."""
    from tally.consumers.http import parse_address

    if n < 1:
        raise UsageError(f"--processes must be at least 1, got {n}")
    if not settings.group_id:
        raise UsageError(
            "--processes starts members of one deployment: give it a --group-id, e.g. "
            "--group-id leaderboard"
        )
    if not settings.http:
        raise UsageError("--processes needs --http HOST:PORT (member k serves on PORT+k)")
    if settings.advertise:
        raise UsageError(
            "--processes gives each member its own port: leave out --advertise (start members "
            "one by one to advertise each)"
        )
    host, port = parse_address(settings.http)
    if port == 0 or port + n - 1 > 65535:
        raise UsageError(
            f"--processes {n} needs ports {port}..{port + n - 1}: choose another --http port"
        )
    base = _strip(argv, {"--processes", "--data-dir", "--http"}, {"--no-http"})
    hostpart = f"[{host}]" if ":" in host else host
    return [
        [
            sys.executable,
            "-m",
            "tally.consumers",
            *base,
            "--data-dir",
            os.path.join(settings.data_dir, f"member-{k}"),
            "--http",
            f"{hostpart}:{port + k}",
        ]
        for k in range(n)
    ]


def _die_with_parent() -> None:
    """In a member, before it runs: SIGTERM when the parent dies, however it dies (a kill -9
    of the parent must not leave members running unseen). Linux only; elsewhere a no-op."""
    if sys.platform != "linux":
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def run_processes(settings: ConsumerSettings, n: int, argv: Sequence[str]) -> int:
    """Run the members until they all exit; returns the worst exit status."""
    commands = member_args(settings, n, argv)
    children = [subprocess.Popen(cmd, preexec_fn=_die_with_parent) for cmd in commands]

    def forward(sig: int, frame: FrameType | None) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(sig)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        codes: dict[int, int] = {}
        while len(codes) < len(children):
            for k, c in enumerate(children):
                if k not in codes and (rc := c.poll()) is not None:
                    codes[k] = rc
                    if rc != 0:
                        print(f"tally: member {k} exited with status {rc}", file=sys.stderr)
            time.sleep(0.2)
        return max(codes.values(), key=abs)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
