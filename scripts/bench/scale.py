"""Scale-out benchmark: 1 vs 2 members of a deployment, and reads vs owned partitions, one run.

    .venv/bin/python scripts/bench/scale.py [--events 600000] [--ids 100000] [--partitions 6]
        [--rounds 2] [--read-ids 100000] [--reads 2000] [--no-replay] [--only {throughput,reads}]
        [--poll 0.05] [--http-port-base 0] [--profile DIR] [--bootstrap-servers 127.0.0.1:9092]

Every member is a real `tally consume DEFS --group-id G --http 127.0.0.1:PORT --data-dir DIR`
subprocess with its own data dir, in a fresh group per case, on one aggregate: live.py's
BY_GAME (per-game count and sum of scores over one row per id, the latest row wins).

**1. Throughput**, the same work done by 1 member and by 2 members of one deployment:

* *live* (a ready aggregate receiving updates, what scaling out is for): a fresh topic of
  ``--partitions`` partitions gets one row per id (``--ids``); the members start, replay it and
  settle (every partition owned by one member in the final map, its task live at the end).
  Then the members are paused (SIGSTOP; their session timeout is longer than the pause),
  ``--events`` random updates of those ids are produced (identical for both cases: same seeds),
  and the members are resumed. Clock: from just before the SIGCONT to the first `/status`
  poll round (every ``--poll`` s, each member's ``member.tasks``) in which every partition's
  task on its owner is live with its offset at the partition's end offset (known from the
  producer): so it is exact to about one poll interval, and counts neither starting,
  joining, replaying the rows, nor producing (which would share the 2 cores). The two cases
  alternate ``--rounds`` times, each on a fresh topic; the ratio is of the best of each.
* *replay* (a backfill: fresh members building the state by replaying the topic from its
  beginning; skipped with ``--no-replay``): the first 1-member case's topic (rows, updates) read
  by fresh members. The first member to join a group gets every partition, so it is paused
  (SIGSTOP) at the first poll that shows its tasks; with 2, the second one is started and
  the bench waits until the broker describes the group as PreparingRebalance (its join
  waiting for the paused member). Clock: from just before the first member's SIGCONT to the
  first poll round in which every partition is live at its end on the member the final map
  gives it to; the events counted are the topic's less what the first member's tasks had
  read when it was paused (next to nothing). So the 2-member clock includes the rebalance
  (the first member rejoining and parking half its tasks, the second starting its own) and
  the first member's work on the partitions it then hands over: what starting 2 costs.

Prints events/s of each and the ratios (issue 13 aims at >= 1.6x on 2 members); next to them
the cores the members used (their CPU seconds over the clock's seconds), the cores the whole
machine was busy meanwhile (the broker, this bench and anything else running included), and
for the replay cases when the final map was in effect. After each case the members' per-game
counts and sums are read back and must equal every other case's.

**2. Read latency** of ``count`` and ``at`` (offset in the middle), POSTed ``--reads`` times each
in sequence over one keep-alive aiohttp session, a namespace (game) per request in turn, on:
(a) the member of a 1-partition topic; (b) the member of a 12-partition topic holding the same
``--read-ids`` rows; (c) the same 12-partition deployment once a second member has joined and
taken 6 of them: the read member answers 6 partitions itself and asks the other for 6 (one
internal call per merge round: one for a count, two per round of at's select). Prints median and p99 µs per op and the ratios (b)/(a), (c)/(a) (the
issue's design target: 12 partitions within ~1.3x of 1). Answers must agree across cases.

``--profile DIR`` runs `py-spy record --format raw` on the read member during each read case
(collapsed stacks in DIR/<case>-<op>.txt); the latencies of such a run are sampled under
py-spy, so take the figures from a run without it. ``--http-port-base N`` gives the members
ports N, N+1, ... (default: free ports the OS picks). Member logs go to a temp dir; it is
removed after a clean run and kept (its path printed) when the run fails or is interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
from aiokafka.admin import AIOKafkaAdminClient
from live import GAMES, create_topic, end_offsets, produce

ROOT = Path(__file__).resolve().parents[2]
TALLY = str(Path(sys.executable).with_name("tally"))
AGGREGATE = "by_game"
DEFS = '''"""live.py's BY_GAME, for the members of scripts/bench/scale.py."""

from tally.engine import TableAggregate

by_game = TableAggregate(
    "by_game", table="scores", namespace="game", sort_key="score", sum_value="score"
)
'''
MAX_SESSION_TIMEOUT_MS = 300_000
"""The broker's default group.max.session.timeout.ms."""
REPLAY_SESSION_MS = 30_000
"""The replay cases' session timeout: longer than the first member stays paused."""
START_TIMEOUT = 300.0
"""Seconds a case may take to settle or to finish before the run fails."""


class BenchError(Exception):
    """The run cannot go on (a member died, or a case did not settle in time)."""


@dataclass
class Member:
    """One `tally consume --group-id` subprocess."""

    name: str
    port: int
    data: Path
    log: Path
    proc: subprocess.Popen[bytes]
    paused: bool = False
    stopping: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM once (a clean stop: the tasks commit, the member leaves the group); a
        second one would kill a member that has finished stopping and dropped its handler."""
        if self.paused:
            self.signal(signal.SIGCONT)
            self.paused = False
        if not self.stopping:
            self.signal(signal.SIGTERM)
            self.stopping = True

    def stop(self, timeout: float = 20.0) -> int | None:
        """`terminate` and wait; SIGKILL if it takes longer than ``timeout``."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class Fleet:
    """Every member this run started, so that any exit stops them all."""

    work: Path
    logs: Path
    defs: Path
    bootstrap: str
    port_base: int
    members: list[Member] = field(default_factory=list)
    started: int = 0
    keep_logs: bool = False

    def _port(self) -> int:
        self.started += 1
        if self.port_base:
            return self.port_base + self.started - 1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def start(
        self, name: str, topic: str, group: str, session_timeout_ms: int | None = None
    ) -> Member:
        """Start a member of ``group`` on ``topic`` (the default session timeout if None)."""
        port = self._port()
        data = self.work / name
        log = self.logs / f"{name}.log"
        cmd = [
            TALLY,
            "consume",
            str(self.defs),
            "--topic",
            f"scores={topic}",
            "--group-id",
            group,
            "--http",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(data),
            "--bootstrap-servers",
            self.bootstrap,
            "--log-level",
            "info",
            "--log-format",
            "json",
        ]
        if session_timeout_ms is not None:
            cmd += ["--session-timeout-ms", str(session_timeout_ms)]
        # No TALLY_* settings or ./tally.toml of the caller's: every member runs the defaults.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=self.work,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the bench only; it stops them
            )
        m = Member(name, port, data, log, proc)
        self.members.append(m)
        return m

    def stop(self, members: Sequence[Member]) -> None:
        for m in members:
            m.terminate()
        for m in members:
            code = m.stop()
            if code not in (0, None):
                print(f"  warning: member {m.name} exited {code} on SIGTERM (log: {m.log})")
                self.keep_logs = True
            if m in self.members:
                self.members.remove(m)
            shutil.rmtree(m.data, ignore_errors=True)

    def stop_all(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                m.terminate()
        for m in list(self.members):
            with contextlib.suppress(Exception):
                m.stop(timeout=10.0)
        self.members.clear()


def pause(members: Sequence[Member]) -> None:
    for m in members:
        m.signal(signal.SIGSTOP)
        m.paused = True


def resume(members: Sequence[Member]) -> None:
    for m in members:
        m.signal(signal.SIGCONT)
        m.paused = False


# ---- reading the members' /status ------------------------------------------------------------


async def status(session: aiohttp.ClientSession, m: Member) -> dict[str, Any] | None:
    """A member's /status, or None while it is not serving yet."""
    if m.proc.poll() is not None:
        raise BenchError(f"member {m.name} exited with {m.proc.returncode}; log: {m.log}")
    try:
        async with session.get(m.url + "/status") as r:
            if r.status != 200:
                return None
            doc: dict[str, Any] = msgspec.json.decode(await r.read())
            return doc
    except (TimeoutError, aiohttp.ClientError):
        return None


def owned_tasks(
    docs: Sequence[dict[str, Any] | None], topic: str, partitions: int, members: int
) -> dict[int, dict[str, Any]] | None:
    """Partition → its task on its owner, once the final ownership is in effect: every member
    has the same map of ``members`` members covering each partition once, and runs a task for
    each partition the map gives it. None before."""
    out: dict[int, dict[str, Any]] = {}
    versions = set()
    for doc in docs:
        mem = None if doc is None else doc.get("member")
        if mem is None or mem.get("map_version") is None or len(mem["members"]) != members:
            return None
        versions.add(mem["map_version"])
        mine = [e for e in mem["members"] if e["you"]]
        if len(mine) != 1:
            return None
        tasks = {t["partition"]: t for t in mem["tasks"] if t["topic"] == topic}
        for p in mine[0]["partitions"]:
            part = p["partition"]
            if p["topic"] != topic or part in out or part not in tasks:
                return None
            out[part] = tasks[part]
    if len(versions) != 1 or sorted(out) != list(range(partitions)):
        return None
    return out


def position(task: dict[str, Any], end: int) -> int:
    """How far a task that has just started has read its partition (``end``: the partition's
    end, which its replay took as its end): the live offset, else where its replay is (the
    replay's progress counts from where it started), else nothing yet (also while the
    replay has not captured its end yet: a total of 0)."""
    if task.get("offset") is not None:
        return int(task["offset"])
    prog = task.get("progress") or {}
    if prog.get("total"):
        return end - int(prog["total"]) + int(prog["read"])
    return 0


def at_end(tasks: dict[int, dict[str, Any]], ends: dict[int, int]) -> bool:
    return all(
        t["state"] == "live" and t.get("offset") is not None and t["offset"] >= ends[p]
        for p, t in tasks.items()
    )


def map_versions(docs: Sequence[dict[str, Any] | None]) -> list[Any]:
    return [None if d is None else d["member"]["map_version"] for d in docs]


Cond = Callable[[list[dict[str, Any] | None]], bool]


def settled(topic: str, partitions: int, members: int, ends: dict[int, int] | None) -> Cond:
    """The final ownership is in effect (and, given ``ends``, every task is live there)."""

    def cond(docs: list[dict[str, Any] | None]) -> bool:
        tasks = owned_tasks(docs, topic, partitions, members)
        return tasks is not None and (ends is None or at_end(tasks, ends))

    return cond


async def poll_until(
    session: aiohttp.ClientSession,
    members: Sequence[Member],
    cond: Cond,
    what: str,
    interval: float,
    timeout: float = START_TIMEOUT,
) -> tuple[float, list[dict[str, Any] | None]]:
    """Poll every member's /status until ``cond`` holds: (when that round ended, the docs)."""
    deadline = time.perf_counter() + timeout
    docs: list[dict[str, Any] | None] = []
    while True:
        docs = [await status(session, m) for m in members]
        now = time.perf_counter()
        if cond(docs):
            return now, docs
        if now > deadline:
            raise BenchError(
                f"{what}: not reached in {timeout:.0f}s; logs: "
                + ", ".join(str(m.log) for m in members)
            )
        await asyncio.sleep(interval)


# ---- the throughput cases -----------------------------------------------------------------------


@dataclass
class Totals:
    """The per-game counts and sums a deployment answers: must be equal in every case."""

    values: dict[str, tuple[int, Any]]


async def read(session: aiohttp.ClientSession, url: str, op: str, body: dict[str, Any]) -> Any:
    async with session.post(f"{url}/v1/aggregates/{AGGREGATE}/{op}", json=body) as r:
        raw = await r.read()
        if r.status != 200:
            raise BenchError(f"{op} {body} on {url}: HTTP {r.status} {raw[:300]!r}")
        return msgspec.json.decode(raw)["result"]


async def totals(session: aiohttp.ClientSession, url: str) -> Totals:
    out = {}
    for g in range(GAMES):
        ns = {"namespace": f"g{g}"}
        out[f"g{g}"] = (await read(session, url, "count", ns), await read(session, url, "sum", ns))
    return Totals(out)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """(all, idle) CPU ticks of the machine so far (Linux /proc/stat; zeros elsewhere)."""
    try:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(cpu), cpu[3] + (cpu[4] if len(cpu) > 4 else 0)


class CpuMeter:
    """Cores the members used, and cores the whole machine was busy (broker, bench and any
    other load included), between `start` and `stop`."""

    def __init__(self, members: Sequence[Member]) -> None:
        self.members = list(members)
        self.cpu0 = 0.0
        self.ticks0 = (0, 0)
        self.wall0 = 0.0
        self.members_cores = self.busy_cores = 0.0

    def start(self) -> None:
        self.cpu0 = sum(cpu_seconds(m.proc.pid) for m in self.members)
        self.ticks0 = machine_ticks()
        self.wall0 = time.perf_counter()

    def stop(self) -> None:
        wall = max(1e-9, time.perf_counter() - self.wall0)
        cpu = sum(cpu_seconds(m.proc.pid) for m in self.members) - self.cpu0
        total, idle = machine_ticks()
        d_all, d_idle = total - self.ticks0[0], idle - self.ticks0[1]
        self.members_cores = cpu / wall
        self.busy_cores = (os.cpu_count() or 1) * (d_all - d_idle) / d_all if d_all else 0.0


@dataclass
class Run:
    """One throughput case: events applied in ``seconds`` (and what the members answered)."""

    label: str
    events: int
    seconds: float
    totals: Totals
    cpu: CpuMeter
    settled_after: float | None = None
    """Replay cases: seconds from the clock's start until the final map was in effect."""

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def partition_ends(ends: dict[Any, int]) -> dict[int, int]:
    return {tp.partition: off for tp, off in ends.items()}


async def live_case(fleet: Fleet, args: argparse.Namespace, topic: str, n: int, label: str) -> Run:
    boot = fleet.bootstrap
    await create_topic(boot, topic, args.partitions)
    seconds = await produce(boot, topic, list(range(args.ids)), seed=1)
    seed_ends = partition_ends(await end_offsets(boot, topic))
    # The members stay in the group while paused: a session timeout well over the time the
    # updates take to produce (at the rows' rate); members heartbeat every second whatever it
    # is, so a join does not wait longer for it.
    pause_s = args.events * seconds / max(1, args.ids)
    session_ms = min(MAX_SESSION_TIMEOUT_MS, max(30_000, int(4000 * pause_s) + 10_000))
    group = f"{topic}-g"
    members = [fleet.start(f"{topic}-m{i}", topic, group, session_ms) for i in range(n)]
    async with aiohttp.ClientSession() as session:
        _, docs = await poll_until(
            session,
            members,
            settled(topic, args.partitions, n, seed_ends),
            f"{label}: {n} member(s) settling on the rows",
            args.poll,
        )
        versions = map_versions(docs)
        pause(members)
        paused = time.perf_counter()
        rnd = random.Random(2)
        rids = [rnd.randrange(args.ids) for _ in range(args.events)]
        await produce(boot, topic, rids, seed=3)
        ends = partition_ends(await end_offsets(boot, topic))
        if (time.perf_counter() - paused) * 1000 > session_ms * 0.8:
            raise BenchError(f"{label}: producing took nearly the session timeout; rerun")
        events = sum(ends.values()) - sum(seed_ends.values())
        cpu = CpuMeter(members)
        cpu.start()
        t0 = time.perf_counter()
        resume(members)
        t1, docs = await poll_until(
            session,
            members,
            settled(topic, args.partitions, n, ends),
            f"{label}: applying the updates",
            args.poll,
        )
        cpu.stop()
        if map_versions(docs) != versions:
            raise BenchError(f"{label}: the group rebalanced during the measurement; rerun")
        got = await totals(session, members[0].url)
    fleet.stop(members)
    return Run(label, events, t1 - t0, got, cpu)


async def wait_group_state(
    bootstrap: str, group: str, state: str, members: Sequence[Member], what: str
) -> None:
    """Until the broker describes ``group`` in ``state`` (e.g. a join is waiting for the
    others: PreparingRebalance)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        deadline = time.perf_counter() + START_TIMEOUT
        while True:
            for m in members:
                if m.proc.poll() is not None:
                    raise BenchError(
                        f"member {m.name} exited with {m.proc.returncode}; log: {m.log}"
                    )
            described = await admin.describe_consumer_groups([group])
            if described[0].groups[0][2] == state:
                return
            if time.perf_counter() > deadline:
                raise BenchError(f"{what}: group {group} never got to {state}")
            await asyncio.sleep(0.02)
    finally:
        await admin.close()


async def replay_case(
    fleet: Fleet, args: argparse.Namespace, topic: str, n: int, label: str
) -> Run:
    ends = partition_ends(await end_offsets(fleet.bootstrap, topic))
    group = f"{topic}-replay{n}-g"
    parts = args.partitions
    first = fleet.start(f"{topic}-replay{n}-m0", topic, group, REPLAY_SESSION_MS)
    members = [first]
    async with aiohttp.ClientSession() as session:
        # The first member to join gets every partition: it is paused as soon as its tasks
        # exist, so it cannot replay alone while the second one starts and joins.
        _, docs = await poll_until(
            session, [first], settled(topic, parts, 1, None), f"{label}: joining", args.poll
        )
        pause([first])
        start = owned_tasks(docs, topic, parts, 1)
        assert start is not None
        done = sum(min(position(t, ends[p]), ends[p]) for p, t in start.items())
        if n == 2:
            members.append(fleet.start(f"{topic}-replay{n}-m1", topic, group, REPLAY_SESSION_MS))
            # Its JoinGroup waits at the coordinator for the paused member to rejoin.
            await wait_group_state(
                fleet.bootstrap, group, "PreparingRebalance", members, f"{label}: joining"
            )
        cpu = CpuMeter(members)
        cpu.start()
        t0 = time.perf_counter()
        resume([first])
        tm, _ = await poll_until(
            session, members, settled(topic, parts, n, None), f"{label}: rejoining", args.poll
        )
        t1, _ = await poll_until(
            session, members, settled(topic, parts, n, ends), f"{label}: replaying", args.poll
        )
        cpu.stop()
        got = await totals(session, first.url)
    fleet.stop(members)
    return Run(label, sum(ends.values()) - done, t1 - t0, got, cpu, tm - t0)


# ---- the read cases -----------------------------------------------------------------------------


@dataclass
class Latency:
    """Per-request latencies (ns) of one op on one case, and the answers per namespace."""

    ns: list[int]
    answers: dict[str, Any]

    def quantile(self, q: float) -> float:
        xs = sorted(self.ns)
        return xs[min(len(xs) - 1, int(q * len(xs)))] / 1000

    @property
    def median(self) -> float:
        return statistics.median(self.ns) / 1000


async def latency(
    session: aiohttp.ClientSession, url: str, op: str, bodies: list[dict[str, Any]], warmup: int
) -> Latency:
    """``len(bodies)`` sequential POSTs of ``op``, timed each from send to the last body byte."""
    path = f"{url}/v1/aggregates/{AGGREGATE}/{op}"
    encoded = [msgspec.json.encode(b) for b in bodies]
    headers = {"Content-Type": "application/json"}
    answers: dict[str, Any] = {}
    times: list[int] = []
    for i, raw in enumerate([*encoded[:warmup], *encoded]):
        t = time.perf_counter_ns()
        async with session.post(path, data=raw, headers=headers) as r:
            body = await r.read()
        dt = time.perf_counter_ns() - t
        if r.status != 200:
            raise BenchError(f"{op} {raw!r} on {url}: HTTP {r.status} {body[:300]!r}")
        ns = bodies[(i - warmup) % len(bodies)]["namespace"] if i >= warmup else None
        if ns is not None:
            times.append(dt)
            result = msgspec.json.decode(body)["result"]
            if answers.setdefault(ns, result) != result:
                raise BenchError(f"{op} on {ns} answered {result} and {answers[ns]} at rest")
    return Latency(times, answers)


class Profiler:
    """py-spy recording one member while a block runs (only with ``--profile``)."""

    def __init__(self, out: Path | None, pid: int, name: str) -> None:
        self.path = None if out is None else out / f"{name}.txt"
        self.pid = pid
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        if self.path is not None:
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            cmd = [spy, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw"]
            self.proc = subprocess.Popen(
                [*cmd, "-o", str(self.path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            time.sleep(1.0)  # attached before the first timed request
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            _, err = self.proc.communicate(timeout=30)
            if self.proc.returncode not in (0, None) and not (self.path and self.path.exists()):
                print(f"  py-spy failed: {err.decode(errors='replace').strip()}")


async def read_cases(fleet: Fleet, args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    boot = fleet.bootstrap
    t1, t12 = f"{prefix}-r1", f"{prefix}-r12"
    for topic, parts in ((t1, 1), (t12, 12)):
        await create_topic(boot, topic, parts)
        await produce(boot, topic, list(range(args.read_ids)), seed=5)
    ends1 = partition_ends(await end_offsets(boot, t1))
    ends12 = partition_ends(await end_offsets(boot, t12))
    games = [f"g{i % GAMES}" for i in range(args.reads)]
    out: dict[str, dict[str, Latency]] = {}
    profile = Path(args.profile) if args.profile else None

    async def measure(case: str, m: Member, session: aiohttp.ClientSession) -> None:
        counts = {g: await read(session, m.url, "count", {"namespace": g}) for g in set(games)}
        runs = {}
        for op, bodies in (
            ("count", [{"namespace": g} for g in games]),
            ("at", [{"namespace": g, "offset": counts[g] // 2} for g in games]),
        ):
            with Profiler(profile, m.proc.pid, f"{case}-{op}"):
                runs[op] = await latency(session, m.url, op, bodies, warmup=min(200, args.reads))
        out[case] = runs

    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession() as poller, aiohttp.ClientSession(connector=connector) as s:
        one = fleet.start(f"{t1}-m0", t1, f"{t1}-g")
        await poll_until(poller, [one], settled(t1, 1, 1, ends1), "(a) settling", args.poll)
        await measure("a", one, s)
        fleet.stop([one])
        first = fleet.start(f"{t12}-m0", t12, f"{t12}-g")
        await poll_until(poller, [first], settled(t12, 12, 1, ends12), "(b) settling", args.poll)
        await measure("b", first, s)
        second = fleet.start(f"{t12}-m1", t12, f"{t12}-g")
        await poll_until(
            poller, [first, second], settled(t12, 12, 2, ends12), "(c) settling", args.poll
        )
        await measure("c", first, s)
        fleet.stop([first, second])
    for op in ("count", "at"):
        base = out["a"][op].answers
        for case in ("b", "c"):
            if out[case][op].answers != base:
                raise BenchError(f"{op}: case ({case}) answered differently from case (a)")
    return out


# ---- main -----------------------------------------------------------------------------------------


def check_totals(runs: list[Run]) -> None:
    for r in runs[1:]:
        if r.totals.values != runs[0].totals.values:
            raise BenchError(
                f"{r.label} answers per-game counts/sums that differ from {runs[0].label}'s"
            )


async def throughput(fleet: Fleet, args: argparse.Namespace, prefix: str) -> list[str]:
    """Part 1: the throughput cases; returns the table to print."""
    print(
        f"throughput: topics of {args.partitions} partitions, {args.ids:,} rows, then "
        f"{args.events:,} updates produced while the members are paused"
    )
    pairs: list[tuple[Run, Run]] = []
    for i in range(args.rounds):
        tag = f" #{i + 1}" if args.rounds > 1 else ""
        one = await live_case(fleet, args, f"{prefix}-live1-{i}", 1, f"(a) 1 member, live{tag}")
        print(f"  {one.label}: {one.rate:,.0f} events/s")
        two = await live_case(fleet, args, f"{prefix}-live2-{i}", 2, f"(b) 2 members, live{tag}")
        print(f"  {two.label}: {two.rate:,.0f} events/s")
        pairs.append((one, two))
    runs = [run for pair in pairs for run in pair]
    if args.replay:
        for n, label in ((1, "(c) 1 member, replay"), (2, "(d) 2 members, replay")):
            rep = await replay_case(fleet, args, f"{prefix}-live1-0", n, label)
            print(f"  {rep.label}: {rep.rate:,.0f} events/s")
            runs.append(rep)
    check_totals(runs)
    out = [
        f"{'throughput (same topic content)':<26} {'events':>8} {'seconds':>8} {'events/s':>9} "
        f"{'members cores':>13} {'machine busy':>12} {'map final at':>12}"
    ]
    for r in runs:
        at = "" if r.settled_after is None else f"+{r.settled_after:.2f}s"
        out.append(
            f"{r.label:<26} {r.events:>8,} {r.seconds:>8.2f} {r.rate:>9,.0f} "
            f"{r.cpu.members_cores:>13.2f} {r.cpu.busy_cores:>12.2f} {at:>12}"
        )
    best1 = max(one.rate for one, _ in pairs)
    best2 = max(two.rate for _, two in pairs)
    each = ", ".join(f"{two.rate / one.rate:.2f}x" for one, two in pairs)
    out.append(
        f"ratio live   (b)/(a) = {best2 / best1:.2f}x best of {args.rounds} "
        f"(rounds: {each})   (issue 13 aims at >= 1.6x)"
    )
    if args.replay:
        out.append(
            f"ratio replay (d)/(c) = {runs[-1].rate / runs[-2].rate:.2f}x   (with the rebalance)"
        )
    out.append(
        f"cores: CPU seconds / wall seconds of the members, and of the whole machine "
        f"({os.cpu_count()} cores: broker, bench and other load included)"
    )
    return out


async def reads(fleet: Fleet, args: argparse.Namespace, prefix: str) -> list[str]:
    """Part 2: the read latency cases; returns the table to print."""
    print(
        f"read latency: {args.read_ids:,} rows; {args.reads:,} sequential requests per op "
        "(after a warm-up), one keep-alive session"
    )
    lat = await read_cases(fleet, args, prefix)
    labels = {
        "a": "(a) 1 partition, 1 member",
        "b": "(b) 12 partitions, 1 member",
        "c": "(c) 12 partitions, 2 members (6 asked)",
    }
    out = [
        f"{'read latency, µs per op':<40} {'count p50':>10} {'p99':>8} {'at p50':>10} {'p99':>8}"
    ]
    for case, label in labels.items():
        c, a = lat[case]["count"], lat[case]["at"]
        out.append(
            f"{label:<40} {c.median:>10,.0f} {c.quantile(0.99):>8,.0f} "
            f"{a.median:>10,.0f} {a.quantile(0.99):>8,.0f}"
        )
    for case in ("b", "c"):
        parts = []
        for op in ("count", "at"):
            x, base = lat[case][op], lat["a"][op]
            parts.append(
                f"{op} p50 {x.median / base.median:.2f}x p99 "
                f"{x.quantile(0.99) / base.quantile(0.99):.2f}x"
            )
        target = "   (issue 13: within ~1.3x)" if case == "b" else ""
        out.append(f"ratio ({case})/(a): " + ", ".join(parts) + target)
    if args.profile:
        out.append(f"py-spy stacks (latencies above were sampled under py-spy): {args.profile}")
    return out


async def bench(fleet: Fleet, args: argparse.Namespace) -> None:
    prefix = f"bench-scale-{int(time.time())}"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, load average {load} before the run")
    tables = []
    if args.only in (None, "throughput"):
        tables.append(await throughput(fleet, args, prefix))
    if args.only in (None, "reads"):
        tables.append(await reads(fleet, args, prefix))
    for t in tables:
        print()
        print("\n".join(t))


def _interrupt(signum: int, frame: object) -> None:
    """A SIGTERM stops the run like a Ctrl-C: `main`'s finally stops the members."""
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=600_000, help="updates per throughput case")
    ap.add_argument("--ids", type=int, default=100_000, help="rows of the throughput topics")
    ap.add_argument("--partitions", type=int, default=6, help="of the throughput topics")
    ap.add_argument("--read-ids", type=int, default=100_000, help="rows of the read topics")
    ap.add_argument("--reads", type=int, default=2000, help="timed requests per op and case")
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternate the live cases this often (best of)"
    )
    ap.add_argument(
        "--replay",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time fresh members replaying the topic from its beginning",
    )
    ap.add_argument(
        "--only", choices=("throughput", "reads"), help="run one of the two parts alone"
    )
    ap.add_argument("--poll", type=float, default=0.05, help="seconds between /status polls")
    ap.add_argument("--http-port-base", type=int, default=0, help="members' ports from here")
    ap.add_argument("--profile", metavar="DIR", help="py-spy the read member into DIR")
    ap.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    args = ap.parse_args()
    if args.partitions < 2:
        ap.error("--partitions must be at least 2 (two members share them)")
    if min(args.rounds, args.reads, args.ids, args.events) < 1 or args.read_ids < GAMES:
        ap.error(f"--rounds, --reads, --ids and --events must be >= 1, --read-ids >= {GAMES}")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    if args.bootstrap_servers == "127.0.0.1:9092":
        subprocess.run(
            [str(ROOT / "scripts" / "kafka"), "start"], check=True, stdout=subprocess.DEVNULL
        )
    work = Path(tempfile.mkdtemp(prefix="tally-bench-scale-"))
    logs = Path(tempfile.mkdtemp(prefix="tally-bench-scale-logs-"))
    defs = work / "scale_defs.py"
    defs.write_text(DEFS)
    fleet = Fleet(work, logs, defs, args.bootstrap_servers, args.http_port_base)
    signal.signal(signal.SIGTERM, _interrupt)
    ok = False
    try:
        asyncio.run(bench(fleet, args))
        ok = True
    except BenchError as e:
        print(f"scale.py: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("scale.py: interrupted", file=sys.stderr)
    finally:
        fleet.stop_all()
        shutil.rmtree(work, ignore_errors=True)
        if ok and not fleet.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            print(f"scale.py: member logs kept in {logs}", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
