"""A member of a deployment: `tally consume --group-id G` (issue 13).

Every process started with the same group id joins one Kafka consumer group. The group's
leader runs tally's sticky assignor (`tally.consumers.cluster.assignor`), which hands out the
topics' partitions and gives every member the ownership map (who owns what, at which URL).

State, per partition. For each partition it owns, a member runs a **task**: an ordinary
`ConsumerProcess` restricted to that partition, on its own store in
``DATA_DIR/partitions/<topic>/<partition>``. So everything a lone consumer guarantees holds per
partition unchanged: state and offsets commit together, a kill -9 loses nothing and applies
nothing twice, dead letters, generations and rebuilds by replay. A task for a partition with
no store yet replays it from its beginning offset (a backfill); a partition that comes back
resumes its parked store from its stored offset. A partition handed away is stopped after
its current batch and its store stays on disk (parked): the member reports it as held, so the
sticky assignor gives it back to this member first.

Reads. Any member answers for the whole aggregate: one part per partition of the aggregate's
topic — the owned ones from the task's store (`LocalMember`), the others from their owners
(`RemoteTask`, one request per member per round) — merged by `MergedReads`. A partition is
answered only by the member the current map gives it to, once its task has caught up; while it
moves (a rebalance, a replay, a resume still catching up) the read answers 503 with each
moving partition and its progress, or, with ``partial=true``, what the others hold, labelled.

The group consumer only keeps the membership, in a thread of its own so that heartbeats never
wait for a bulk build (`tally.consumers.cluster.group`); its partitions stay paused. Each task
reads its partition with a consumer of its own, and the member commits the tasks' offsets to
Kafka under the group id, so lag tools see the deployment as one group.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.structs import OffsetAndMetadata, TopicPartition

from tally.consumers.cluster.assignor import make_assignor
from tally.consumers.cluster.group import GroupThread
from tally.consumers.cluster.membership import Membership, MembershipUnknown
from tally.consumers.cluster.merge import LocalMember, Member, MergedReads
from tally.consumers.cluster.transport import (
    PARTITION_CALLS,
    Call,
    Outcome,
    PartitionMoving,
    PartitionRefused,
    Peers,
    RemoteTask,
    call_args,
    encode_result,
    error_outcome,
)
from tally.consumers.logs import get_logger
from tally.consumers.runtime.definitions import id_fields_by_table
from tally.consumers.runtime.process import ConsumerProcess
from tally.consumers.runtime.stats import ConsumerStats
from tally.consumers.signals import on_stop_signals
from tally.engine import AggregateNotReady, Store, TableAggregate
from tally.engine.reconcile import decode_fixes
from tally.schemas import ConfigError
from tally.schemas.config import ConsumerSettings
from tally.schemas.keys import learn_key_shape

__all__ = ["MemberProcess", "Task", "partition_dir"]

HEARTBEAT_MS = 1000
"""Most milliseconds between heartbeats (fewer with a session timeout under 6 s: six per
session at least). A member learns of a rebalance at its next heartbeat, so a long interval
(a sixth of a 60 s session timeout) held every hand-off up for seconds."""
SCAN_TTL = 300.0
"""Seconds an id scan of a reconcile may sit unread before it is dropped."""
COMMIT_INTERVAL = 5.0
"""Seconds between commits of the tasks' offsets to Kafka (lag tools only)."""
RESTART_DELAYS = (1.0, 5.0, 30.0, 120.0)
"""Seconds before a failed task is started again (then the last, for ever): its partition
answers 503 meanwhile, with the error in /status."""


def partition_dir(root: str, tp: TopicPartition) -> str:
    """Where the store of one partition lives under a member's data dir."""
    return os.path.join(root, "partitions", tp.topic, str(tp.partition))


@dataclass
class Task:
    """One owned partition: its store and the consumer process applying it."""

    tp: TopicPartition
    store: Store
    process: ConsumerProcess
    runner: asyncio.Task[int] | None = None
    started: float = field(default_factory=time.monotonic)
    ready: bool = False
    """Caught up at least once since it started: from then on it answers for its partition."""
    failed: str | None = None
    failed_at: float = 0.0
    attempts: int = 0
    """Starts of this partition's task that ended in a failure, in a row."""

    def refresh(self) -> bool:
        if not self.ready and self.process.caught_up.is_set():
            self.ready = True
        return self.ready

    def state(self) -> str:
        if self.failed is not None:
            return "failed"
        if self.refresh():
            return "live"
        if self.process.replays or any(
            a["state"] != "ready" for a in self.process.aggregate_states().values()
        ):
            return "replaying"
        return "catching_up"

    def progress(self) -> dict[str, Any]:
        """Where the task is, for /status and a 503's ``moving``."""
        st = self.process.stats
        tp = self.tp
        out: dict[str, Any] = {
            "topic": tp.topic,
            "partition": tp.partition,
            "state": self.state(),
            "offset": st.offsets.get(tp),
            "end_offset": st.end_offsets.get(tp),
            "lag": st.lag().get(tp),
        }
        replays = [r.progress() for r in self.process.replays]
        if replays:
            out["progress"] = replays[0]
        if self.failed:
            out["error"] = self.failed
        return out


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no stubs
    """Runs in the group thread (`GroupThread`): hands the assignment to the member's loop."""

    def __init__(self, member: MemberProcess, loop: asyncio.AbstractEventLoop) -> None:
        self.member = member
        self.loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        # Eager protocol: everything is revoked before the group re-forms; stop answering at
        # once (the tasks go on applying to their own stores, which is harmless).
        self.member.owned = frozenset()
        self.member.rebalances += 1

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        m = self.member
        group = m.group.consumer if m.group is not None else None
        if group is not None and assigned:
            group.pause(*assigned)  # the tasks read; this consumer only keeps the membership
        m.wanted = frozenset(assigned)
        m.owned = frozenset(assigned)
        self.loop.call_soon_threadsafe(m.settle.set)  # tasks start and stop in the member's loop


class MemberProcess:
    """One member of a deployment: the group membership, one task per owned partition, and
    the HTTP API answering for the whole aggregate (``settings.group_id`` names the group)."""

    def __init__(
        self,
        settings: ConsumerSettings,
        definitions: Sequence[TableAggregate],
        *,
        max_open_files: int | None = None,
    ) -> None:
        if not settings.group_id:
            raise ConfigError("a member needs --group-id (the deployment's consumer group)")
        if not settings.http:
            raise ConfigError(
                "a member needs --http HOST:PORT: the other members read its partitions there"
            )
        self.settings = settings
        self.definitions = list(definitions)
        self.by_name = {d.name: d for d in self.definitions}
        settings.check_topic_pattern()
        self.table_topics = {d.table: settings.topic_for(d.table) for d in self.definitions}
        self.topics = sorted(set(self.table_topics.values()))
        self.root = settings.data_dir
        self._check_root()
        self.url = settings.advertise or f"http://{settings.http}"
        self.max_open_files = max_open_files
        self.membership = Membership()
        self.assignor = make_assignor(self.url, self.held, membership=self.membership)
        self.peers = Peers()
        self.group: GroupThread | None = None
        self.tasks: dict[TopicPartition, Task] = {}
        self.owned: frozenset[TopicPartition] = frozenset()
        """What the latest assignment gives this member (empty during a rebalance)."""
        self.wanted: frozenset[TopicPartition] = frozenset()
        self.settle = asyncio.Event()
        self.rebalances = 0
        self.broken: dict[TopicPartition, tuple[str, float, int]] = {}
        self.scans: dict[str, tuple[TopicPartition, Iterator[Any], float]] = {}
        """A reconcile's open id scans: partition, the store's iterator, last used."""
        self._id_fields = id_fields_by_table(self.definitions)
        """Owned partitions whose task could not start: the error, when, attempts."""
        self.store: Store | None = None
        """A member has no one store (one per partition: `tasks`); the HTTP API asks `read`."""
        self.warnings: list[str] = []
        self.started = time.time()
        self.log = get_logger(group=settings.group_id, member=self.url)
        self._stop = asyncio.Event()
        self._partitions: dict[str, list[int]] = {}

    # ---- the state on disk -------------------------------------------------------------

    def _check_root(self) -> None:
        if os.path.exists(os.path.join(self.root, "CURRENT")):
            raise ConfigError(
                f"data dir {self.root!r} holds the store of a lone consumer (one store for every "
                "partition); a member keeps one store per partition under DIR/partitions/. Give "
                "the member a new --data-dir (it backfills its partitions by replay), or run "
                "without --group-id"
            )

    def held(self) -> list[TopicPartition]:
        """The partitions with a store under this member's data dir (told to the assignor)."""
        base = os.path.join(self.root, "partitions")
        out = []
        for topic in self.topics:
            d = os.path.join(base, topic)
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                if name.isdigit() and os.path.exists(os.path.join(d, name, "CURRENT")):
                    out.append(TopicPartition(topic, int(name)))
        return sorted(out)

    # ---- what the HTTP API needs ---------------------------------------------------------

    @property
    def assigned(self) -> list[TopicPartition]:
        return sorted(self.owned)

    @property
    def caught_up(self) -> asyncio.Event:
        ev = asyncio.Event()
        if self.owned and all(tp in self.tasks and self.tasks[tp].refresh() for tp in self.owned):
            ev.set()
        return ev

    @property
    def stats(self) -> ConsumerStats:
        """The tasks' counters added up (a snapshot)."""
        out = ConsumerStats(started=self.started)
        for task in self.tasks.values():
            st = task.process.stats
            out.events += st.events
            out.batches += st.batches
            out.dead_letters += st.dead_letters
            out.changed += st.changed
            out.replayed += st.replayed
            out.latency_sum += st.latency_sum
            out.latency_buckets = [
                a + b for a, b in zip(out.latency_buckets, st.latency_buckets, strict=True)
            ]
            out.offsets.update(st.offsets)
            out.end_offsets.update(st.end_offsets)
            out.beyond_end.update(st.beyond_end)
            out.broker_ok = out.broker_ok and st.broker_ok
            for k, v in st.drift.items():
                out.drift[k] = out.drift.get(k, 0) + v
            if st.dead_letter.problem() is not None:
                out.dead_letter = st.dead_letter
        return out

    def aggregate_states(self) -> dict[str, dict[str, Any]]:
        """Per aggregate: "ready" when every partition this member owns answers, else the
        first moving partition's state and progress."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.definitions:
            topic = self.table_topics[d.table]
            info: dict[str, Any] = {
                "state": "ready",
                "table": d.table,
                "fingerprint": d.fingerprint,
            }
            for tp in sorted(t for t in self.owned if t.topic == topic):
                why = self._unanswerable(tp, d.name)
                if why is not None:
                    info["state"] = "moving"
                    info["progress"] = why
                    break
            out[d.name] = info
        return out

    def item_counts(self, name: str) -> tuple[int, int] | None:
        """This member's own items and namespaces of ``name`` (None if a part is not ready)."""
        items = 0
        namespaces: set[bytes] = set()
        topic = self.table_topics[self.by_name[name].table]
        for tp, task in self.tasks.items():
            if tp.topic != topic or tp not in self.owned:
                continue
            agg = task.store.aggregate(name)
            try:
                ns = agg.namespace_keys()
                items += sum(agg.count(n) for n in agg.namespaces())
            except AggregateNotReady:
                return None
            namespaces.update(ns)
        return items, len(namespaces)

    def member_status(self) -> dict[str, Any]:
        """This member's part of /status: its group, map and partitions."""
        view = self.membership.current()
        members = []
        if view is not None:
            for mid, info in view.owners.items():
                members.append(
                    {
                        "member_id": mid,
                        "url": info.url,
                        "you": mid == view.member_id,
                        "partitions": [
                            {"topic": tp.topic, "partition": tp.partition}
                            for tp in sorted(info.partitions)
                        ],
                    }
                )
        return {
            "group": self.settings.group_id,
            "url": self.url,
            "member_id": view.member_id if view is not None else None,
            "map_version": view.version if view is not None else None,
            "membership_error": self.membership.error,
            "rebalances": self.rebalances,
            "members": members,
            "tasks": [self.tasks[tp].progress() for tp in sorted(self.tasks)],
            "held": [{"topic": tp.topic, "partition": tp.partition} for tp in self.held()],
        }

    async def cluster_status(self) -> dict[str, Any]:
        """`member_status` with every other member's partitions (state, lag, progress) asked
        of it (``GET /status?scope=member``, a short timeout: a member down says so)."""
        doc = self.member_status()
        me = {t["partition"]: t for t in doc["tasks"]}

        async def ask(entry: dict[str, Any]) -> None:
            if entry["you"]:
                entry["reachable"] = True
                entry["tasks"] = [me.get(p["partition"], p) for p in entry["partitions"]]
                return
            try:
                other = await self.peers.get_json(f"{entry['url']}/status?scope=member", 2.0)
                entry["reachable"] = True
                entry["tasks"] = other.get("member", {}).get("tasks", [])
            except Exception as e:
                entry["reachable"] = False
                entry["error"] = str(e) or type(e).__name__

        await asyncio.gather(*(ask(e) for e in doc["members"] if e["url"]))
        return doc

    async def rebuild_all(self, name: str, forwarded: bool) -> list[dict[str, Any]]:
        """Rebuild ``name`` on this member's partitions and, unless ``forwarded``, ask every
        other member to do the same; each member's outcome."""
        self.request_rebuild(name)
        out: list[dict[str, Any]] = [{"url": self.url, "status": "rebuild requested"}]
        view = self.membership.current()
        if forwarded or view is None:
            return out
        token = self.settings.token

        async def ask(url: str) -> dict[str, Any]:
            try:
                await self.peers.post_json(
                    f"{url}/v1/aggregates/{name}/rebuild?scope=member", token, 5.0
                )
                return {"url": url, "status": "rebuild requested"}
            except Exception as e:
                return {"url": url, "status": "failed", "error": str(e) or type(e).__name__}

        urls = sorted({i.url for i in view.owners.values() if i.url and i.url != self.url})
        out += await asyncio.gather(*(ask(u) for u in urls))
        return out

    # ---- answering reads ------------------------------------------------------------------

    def _unanswerable(
        self, tp: TopicPartition, name: str, fingerprint: str | None = None
    ) -> dict[str, Any] | None:
        """Why this member cannot answer for ``tp`` now (its state and progress), or None.

        ``fingerprint``: the definition the reading member runs (default: this member's).
        A partition serves only a generation of that definition: while a changed definition
        is rebuilt the partitions switch one by one, and an answer adding up partitions of
        two definitions would be wrong."""
        base = {"topic": tp.topic, "partition": tp.partition, "member": self.url}
        if tp not in self.owned:
            return {**base, "state": "rebalancing" if not self.owned else "not_owned"}
        task = self.tasks.get(tp)
        if task is None:
            broken = self.broken.get(tp)
            if broken is not None:
                return {**base, "state": "failed", "error": broken[0]}
            return {**base, "state": "starting"}
        if task.failed is not None or not task.refresh():
            return {**base, **task.progress(), "member": self.url}
        want = fingerprint or self.by_name[name].fingerprint
        g = task.store.generation(name)
        serving = None if g is None else g.active_fingerprint
        if g is None or g.active is None or (serving is not None and serving != want):
            state = "rebuilding" if want == self.by_name[name].fingerprint else "other_definition"
            out = {**base, "state": state, "serving": serving, "wanted": want}
            if g is not None and g.progress:
                out["progress"] = g.progress
            return out
        return None

    def local_part(
        self, name: str, tp: TopicPartition, fingerprint: str | None = None
    ) -> LocalMember:
        """The `Member` of an owned, caught-up partition serving the definition
        ``fingerprint`` (default: this member's); `PartitionMoving` otherwise."""
        why = self._unanswerable(tp, name, fingerprint)
        if why is not None:
            raise PartitionMoving(_moving_message([why]), [why])
        return LocalMember(self.tasks[tp].store.aggregate(name))

    def partitions_of(self, topic: str) -> list[int]:
        """The topic's partition numbers, as the group consumer's metadata has them."""
        if self.group is not None:
            parts = self.group.partitions_for_topic(topic)
            if parts:
                self._partitions[topic] = sorted(parts)
        return self._partitions.get(topic, [])

    def parts(self, name: str, partial: bool) -> tuple[list[Member], list[dict[str, Any]]]:
        """The parts of a read of ``name`` and the partitions left out (only with ``partial``)."""
        topic = self.table_topics[self.by_name[name].table]
        numbers = self.partitions_of(topic)
        if not numbers:
            raise PartitionMoving(
                f"no partitions of topic {topic!r} known yet (joining the group)",
                [{"topic": topic, "state": "joining"}],
            )
        view = self.membership.view()
        parts: list[Member] = []
        moving: list[dict[str, Any]] = []
        for p in numbers:
            tp = TopicPartition(topic, p)
            try:
                info = view.owner_of(tp)
                url = view.url_of(tp)
            except MembershipUnknown as e:
                moving.append(
                    {"topic": topic, "partition": p, "state": "unassigned", "reason": str(e)}
                )
                continue
            if info.member_id == view.member_id:
                why = self._unanswerable(tp, name)
                if why is None:
                    parts.append(LocalMember(self.tasks[tp].store.aggregate(name)))
                else:
                    moving.append(why)
            else:
                parts.append(RemoteTask(self.peers, url, name, tp, self.by_name[name].fingerprint))
        if moving and not partial:
            raise PartitionMoving(_moving_message(moving), moving)
        return parts, moving

    async def read(
        self, name: str, method: str, args: dict[str, Any], partial: bool = False
    ) -> tuple[Any, list[dict[str, Any]]]:
        """One read of the whole aggregate; also the partitions left out (``partial``)."""
        skipped: list[dict[str, Any]] = []
        for _ in range(3):
            parts, missing = self.parts(name, partial)
            skipped = missing + skipped
            if not parts:
                raise PartitionMoving(_moving_message(skipped), skipped)
            try:
                result = await getattr(MergedReads(parts), method)(**args)
            except PartitionMoving as e:
                if not partial:
                    raise
                skipped = [*skipped, *e.moving]
                continue
            return result, skipped
        raise PartitionMoving(_moving_message(skipped), skipped)

    async def answer(self, calls: list[Call]) -> list[Outcome]:
        """The internal endpoint: each call on an owned, caught-up partition, else why not."""
        out = []
        for c in calls:
            try:
                if c.aggregate not in self.by_name:
                    raise PartitionMoving(f"no aggregate {c.aggregate!r} on this member", [])
                tp = TopicPartition(c.topic, c.partition)
                part = self.local_part(c.aggregate, tp, c.fingerprint or None)
                if c.method in PARTITION_CALLS:
                    value = await self._maintain(self.tasks[tp], c.aggregate, c.method, c)
                else:
                    value = await getattr(part, c.method)(*call_args(c))
                out.append(Outcome(ok=encode_result(c.method, value)))
            except Exception as e:
                out.append(error_outcome(e))
        return out

    async def _maintain(self, task: Task, name: str, method: str, call: Call) -> Any:
        """A reconcile's call on one partition: page its id index, or drive its patch
        session (`tally.consumers.cluster.reconcile`)."""
        args = call_args(call)
        if method == "ids":
            scan, limit = args
            now = time.monotonic()
            for sid, (_, _, used) in list(self.scans.items()):
                if now - used > SCAN_TTL:
                    del self.scans[sid]
            if scan is None:
                scan = secrets.token_hex(8)
                self.scans[scan] = (task.tp, task.store.aggregate(name).id_entries(), now)
            entry = self.scans.get(scan)
            if entry is None or entry[0] != task.tp:
                raise PartitionRefused(
                    f"id scan {scan} of {task.tp.topic}[{task.tp.partition}] expired or moved: "
                    "run the reconcile again",
                    409,
                    "scan_expired",
                )
            tp, it, _ = entry
            page = [
                (eid, e.ns, e.key, e.sum)
                for eid, e in itertools.islice(it, max(1, min(int(limit), 50_000)))
            ]
            done = len(page) < limit
            if done:
                del self.scans[scan]
            else:
                self.scans[scan] = (tp, it, now)
            return scan, page, done
        sessions = task.process.patches
        if method == "patch_begin":
            s = await sessions.begin(name)
            table = self.by_name[name].table
            shape = None
            last = task.process.last_keyed
            if last is not None:
                shape = learn_key_shape(last[0], last[1], self._id_fields[table])
            return {
                "session": s.id,
                "generation": s.physical,
                "fingerprint": s.fingerprint,
                "shape": None
                if shape is None
                else [shape.kind, list(shape.fields), shape.prefix, shape.suffix],
            }
        if method == "patch_apply":
            session, chunk = args
            return await sessions.apply(name, session, decode_fixes(chunk))
        (session,) = args
        return sessions.end(name, session)

    # ---- lifecycle ---------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_rebuild(self, name: str) -> None:
        """Rebuild ``name`` in every partition this member owns (each by its own replay)."""
        if name not in self.by_name:
            raise ConfigError(f"no aggregate named {name!r}; known: {sorted(self.by_name)}")
        for task in self.tasks.values():
            if name in task.process.by_name:
                task.process.request_rebuild(name)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.log.info("stopping", signal=sig.name, note="tasks finish their batch and commit")
        self.request_stop()

    async def run(self, *, install_signals: bool = True) -> int:
        """Be a member until stopped; returns the exit code."""
        from tally.consumers.http.app import start_http

        loop = asyncio.get_running_loop()
        remove = on_stop_signals(loop, self._on_signal) if install_signals else None
        assert self.settings.http is not None
        http = await start_http(self, self.settings.http, self.settings.token)
        settler = asyncio.ensure_future(self._settle_loop())
        self.group = self._group(loop)
        try:
            self.group.start()
            self.log.info("joining the group", topics=self.topics, held=len(self.held()))
            last_commit = time.monotonic()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 0.2)
                for task in list(self.tasks.values()):
                    self._check_task(task)
                self._retry_broken()
                if self.group.error is not None:
                    raise self.group.error
                if time.monotonic() - last_commit >= COMMIT_INTERVAL:
                    await self._commit_offsets()
                    last_commit = time.monotonic()
            return 0
        finally:
            settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await settler
            await self._stop_tasks(list(self.tasks))
            with contextlib.suppress(Exception):
                await self._commit_offsets()
            await self.group.stop()  # LeaveGroup: the others take over at once
            await self.peers.close()
            await http.cleanup()
            if remove is not None:
                remove()

    def _group(self, loop: asyncio.AbstractEventLoop) -> GroupThread:
        s = self.settings
        warned: list[str] = []

        def make() -> AIOKafkaConsumer:
            return AIOKafkaConsumer(
                bootstrap_servers=s.bootstrap_servers,
                group_id=s.group_id,
                enable_auto_commit=False,
                partition_assignment_strategy=(self.assignor,),
                session_timeout_ms=s.session_timeout_ms,
                heartbeat_interval_ms=max(100, min(HEARTBEAT_MS, s.session_timeout_ms // 6)),
                request_timeout_ms=max(15000, s.session_timeout_ms + 5000),
            )

        def unreachable(error: str) -> None:
            if not warned:
                warned.append(error)
                self.log.warning(
                    "broker unreachable, waiting",
                    error=error,
                    hint="start one with `scripts/kafka start` or check --bootstrap-servers",
                )

        return GroupThread(make, self.topics, _Listener(self, loop), unreachable)

    async def _settle_loop(self) -> None:
        """Start the tasks of newly owned partitions and stop (park) the others."""
        while True:
            await self.settle.wait()
            self.settle.clear()
            wanted = self.wanted
            gone = [tp for tp in self.tasks if tp not in wanted]
            # New partitions first: a task handed away may take a while to stop (it commits
            # the replay chunk it gathered, so a later resume need not redo it).
            stopping = [self.tasks.pop(tp) for tp in gone]
            for tp in sorted(wanted):
                if tp not in self.tasks:
                    self._start_task(tp)
            await self._finish(stopping)
            self.log.info(
                "partitions settled",
                owned=[f"{tp.topic}[{tp.partition}]" for tp in sorted(wanted)],
                parked=[f"{tp.topic}[{tp.partition}]" for tp in gone],
            )

    def _start_task(self, tp: TopicPartition, attempts: int = 0) -> None:
        """Start the task of ``tp``; a store that cannot be opened is retried later (the
        partition answers 503 with the error meanwhile)."""
        try:
            self._open_task(tp, attempts)
        except Exception as e:
            self.broken[tp] = (f"{type(e).__name__}: {e}", time.monotonic(), attempts + 1)
            self.log.error(
                "partition task cannot start", topic=tp.topic, partition=tp.partition, error=str(e)
            )
        else:
            self.broken.pop(tp, None)

    def _retry_broken(self) -> None:
        for tp, (_, since, attempts) in list(self.broken.items()):
            if tp not in self.wanted or tp in self.tasks:
                self.broken.pop(tp, None)
                continue
            if time.monotonic() - since >= _restart_delay(attempts):
                self._start_task(tp, attempts)

    def _open_task(self, tp: TopicPartition, attempts: int) -> None:
        path = partition_dir(self.root, tp)
        resumed = os.path.exists(os.path.join(path, "CURRENT"))
        os.makedirs(path, exist_ok=True)
        s = self.settings
        store = Store.open(
            path,
            cache_nodes=(
                None
                if s.cache_nodes is None
                else max(1024, s.cache_nodes // max(1, len(self.wanted)))
            ),
            max_node_size=s.max_node_size,
            max_open_files=self._files_per_task(),
        )
        settings = msgspec.structs.replace(s, data_dir=path, http=None)
        defs = [d for d in self.definitions if self.table_topics[d.table] == tp.topic]
        proc = ConsumerProcess(settings, defs, store, partitions={tp})
        task = Task(tp, store, proc, attempts=attempts)
        task.runner = asyncio.ensure_future(proc.run(install_signals=False))
        self.tasks[tp] = task
        self.log.info(
            "partition task started",
            topic=tp.topic,
            partition=tp.partition,
            start="resume from stored offset" if resumed else "replay from the beginning",
        )

    def _files_per_task(self) -> int | None:
        if self.max_open_files is None or self.max_open_files < 0:
            return self.max_open_files
        return max(20, self.max_open_files // max(1, len(self.wanted)))

    def _check_task(self, task: Task) -> None:
        runner = task.runner
        if task.failed is not None:
            delay = _restart_delay(task.attempts)
            if task.tp in self.wanted and time.monotonic() - task.failed_at >= delay:
                self.tasks.pop(task.tp)
                task.store.close()
                self._start_task(task.tp, attempts=task.attempts)
            return
        if runner is None or not runner.done():
            return
        task.failed_at = time.monotonic()
        task.attempts += 1
        if runner.cancelled():
            task.failed = "cancelled"
        elif runner.exception() is not None:
            e = runner.exception()
            task.failed = f"{type(e).__name__}: {e}"
        else:
            task.failed = "stopped"
        self.log.error(
            "partition task ended",
            topic=task.tp.topic,
            partition=task.tp.partition,
            error=task.failed,
            restart_in_s=_restart_delay(task.attempts),
        )

    async def _stop_tasks(self, tps: list[TopicPartition]) -> None:
        await self._finish([self.tasks.pop(tp) for tp in tps if tp in self.tasks])

    async def _finish(self, tasks: list[Task]) -> None:
        """Stop tasks (each after its current batch, committed) and close their stores."""
        gone = {t.tp for t in tasks}
        for sid, (tp, _, _) in list(self.scans.items()):
            if tp in gone:  # no iterator may outlive its store
                del self.scans[sid]
        for t in tasks:
            t.process.request_stop()
        runners = [t.runner for t in tasks if t.runner is not None]
        await asyncio.gather(*runners, return_exceptions=True)
        for t in tasks:
            t.store.close()

    async def _commit_offsets(self) -> None:
        """The owned tasks' offsets to Kafka under the group: lag monitoring, best effort."""
        if self.group is None:
            return
        offsets = {
            tp: OffsetAndMetadata(off, "")
            for tp, task in self.tasks.items()
            if tp in self.owned and (off := task.process.stats.offsets.get(tp)) is not None
        }
        if not offsets:
            return
        try:
            await self.group.commit(offsets)
        except Exception as e:  # monitoring only
            self.log.debug("kafka offset commit failed", error=str(e) or type(e).__name__)


def _restart_delay(attempts: int) -> float:
    """Seconds before the next start of a partition that failed ``attempts`` times in a row."""
    return RESTART_DELAYS[min(max(attempts, 1), len(RESTART_DELAYS)) - 1]


def _moving_message(moving: list[dict[str, Any]]) -> str:
    parts = []
    for m in moving[:6]:
        where = (
            f"{m.get('topic')}[{m.get('partition')}]" if "partition" in m else str(m.get("topic"))
        )
        detail = m.get("state", "moving")
        prog = m.get("progress")
        if isinstance(prog, dict) and isinstance(prog.get("percent"), (int, float)):
            detail += f" {prog['percent']:.1f}%"
        elif m.get("lag") is not None:
            detail += f", lag {m['lag']}"
        parts.append(f"{where} {detail}")
    more = f" and {len(moving) - 6} more" if len(moving) > 6 else ""
    return (
        "cannot answer for the whole aggregate while partitions move: "
        + "; ".join(parts)
        + more
        + ". Retry shortly (GET /status shows the members and progress), or read with "
        "partial=true for what is available"
    )
