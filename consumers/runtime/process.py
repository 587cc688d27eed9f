"""The consumer process: Kafka batches → triggers → one RocksDB commit with the offsets.

aiokafka's "local state with offsets stored outside Kafka" pattern: this
process owns every partition of its topics (manual assignment, no group
rebalancing), applies each ``getmany`` batch inside one `Store.batch()` and
writes the next offset of every partition it consumed into the same
WriteBatch. On start it seeks to those stored offsets (or the beginning).
Offsets committed to Kafka under ``tally`` are only for lag monitoring. A member of a
deployment (``--group-id``) runs one such process per partition it owns, each on its own
store (`tally.consumers.cluster.member`).

Aggregates that have no ready generation for their current definition
(new ones, changed ones, rebuilds) are built by a replay stream from the
topics' beginning offsets while the live stream keeps feeding and serving
every other aggregate (see `tally.consumers.runtime.streams`).

A bad record (undecodable, no id, unknown table, a user function raising)
goes to the dead-letter topic first, with its reason in headers; only once
the broker has acknowledged it does the batch commit. If the dead-letter
write fails, nothing commits and the batch is fetched again: nothing lost.
Every record makes a writable dead letter (null key and value, any size: see
`tally.consumers.runtime.deadletters` for the headers); a dead-letter topic that cannot be
written holds the batch and says so in /status, /readyz and the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Collection, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from tally.consumers.logs import get_logger
from tally.consumers.runtime import generations
from tally.consumers.runtime.deadletters import (
    MAX_REQUEST_SIZE,
    STOP_TIMEOUT,
    DeadLetters,
    dlq_topic_problem,
)
from tally.consumers.runtime.definitions import column_types_by_table, id_fields_by_table
from tally.consumers.runtime.drift import DriftLog
from tally.consumers.runtime.patches import PatchSessions
from tally.consumers.runtime.stats import ConsumerStats, beyond_end_problem
from tally.consumers.runtime.streams import LIVE, Stream, offset_key, stored_offsets
from tally.consumers.runtime.topicmap import mapping_hint
from tally.consumers.signals import on_stop_signals
from tally.engine import Store, TableAggregate
from tally.engine.triggers import Applier
from tally.schemas import BadRecord, ChangeEvent, ConfigError, EventDecoder
from tally.schemas.config import ConsumerSettings

__all__ = ["ConsumerProcess", "ConsumerStats", "offset_key", "stored_offsets"]

GC_THRESHOLD = 200_000
"""Allocations between young-generation GC runs while consuming (Python's default is 700)."""
KEEP_HISTORY = (
    "Keep every event: retention.ms=-1 for a table that is ever TRUNCATEd (Debezium cannot write "
    "a truncate to a compacted topic: its task fails on it), cleanup.policy=compact for a table "
    "that never is."
)
"""What the history warnings recommend (README, Debezium: compaction and truncate)."""
LAG_GROUP = "tally"
"""The consumer group a lone process commits its offsets under, for lag tools only."""
HEALTH_INTERVAL = 1.0
"""Seconds between broker probes (end offsets); an outage is logged within about twice this."""


class ConsumerProcess:
    """One `tally consume` process: owns its store and all partitions of its topics."""

    def __init__(
        self,
        settings: ConsumerSettings,
        definitions: Sequence[TableAggregate],
        store: Store,
        *,
        partitions: Collection[TopicPartition] | None = None,
    ) -> None:
        """``partitions``: consume only these (a member's task, `tally.consumers.cluster`);
        None: every partition of the definitions' topics, offsets committed to Kafka for lag
        tools under ``tally``. A task commits nothing to Kafka: its member does."""
        stale = settings.stale
        if stale not in ("serve", "drop"):
            raise ConfigError(f"stale policy must be 'serve' or 'drop', got {stale!r}")
        self.settings = settings
        self.definitions = list(definitions)
        self.by_name = {d.name: d for d in self.definitions}
        self.store = store
        self.only = None if partitions is None else frozenset(partitions)
        self.stale_policy = stale
        settings.check_topic_pattern()
        self.table_topics = {d.table: settings.topic_for(d.table) for d in self.definitions}
        self.topics = sorted(set(self.table_topics.values()))
        self._check_dlq_topics()
        topic_tables: dict[str, str] = {}
        per_topic: dict[str, set[str]] = {}
        for table, topic in self.table_topics.items():
            per_topic.setdefault(topic, set()).add(table)
        for topic, tables in per_topic.items():
            if len(tables) == 1:
                topic_tables[topic] = next(iter(tables))
        self.decoder = EventDecoder(
            format=settings.format,
            id_fields=id_fields_by_table(self.definitions),
            topic_tables=topic_tables,
            known_tables=set(self.table_topics),
            column_types=column_types_by_table(self.definitions),
            decimal_handling=settings.decimal_handling,
            time_precision=settings.time_precision,
            placeholder=settings.unavailable_placeholder,
        )
        self.stats = ConsumerStats()
        self.log = get_logger(bootstrap=settings.bootstrap_servers, data_dir=settings.data_dir)
        self.warnings: list[str] = []
        """Warnings about the configuration, each logged once; /status ``warnings``."""
        self.last_keyed: tuple[bytes | None, Any] | None = None
        """(record key, row id) of the last row event consumed: how the topic keys rows."""
        self._unwrapped_warned = 0
        self._stop = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self.live: Stream = self._stream(LIVE, {})
        self.replays: list[Stream] = []
        self._pending_rebuilds: list[str] = []
        self.caught_up = asyncio.Event()
        self.patches = PatchSessions(self)
        self.drift = DriftLog(self.log, self.stats.drift)
        self.dead_letters = DeadLetters(
            settings.bootstrap_servers,
            settings.dlq_topic,
            self.log,
            self.stats.dead_letter,
            lambda: self._producer,
            self._restart_producer,
        )

    # ---- public state -------------------------------------------------------------

    @property
    def assigned(self) -> list[TopicPartition]:
        """The partitions the live stream owns (empty until assignment)."""
        return list(self.live.tps)

    def aggregate_states(self) -> dict[str, dict[str, Any]]:
        """Per aggregate: state (ready / stale / building) and replay progress."""
        out: dict[str, dict[str, Any]] = {}
        for d in self.definitions:
            g = self.store.generation(d.name)
            state = "building" if g is None else g.state
            info: dict[str, Any] = {"state": state, "table": d.table, "fingerprint": d.fingerprint}
            for r in self.replays:
                if d.name in r.targets:
                    info["progress"] = r.progress()
            out[d.name] = info
        return out

    def request_stop(self) -> None:
        """Finish the current batch, commit, and return from `run`."""
        self._stop.set()

    def request_rebuild(self, name: str) -> None:
        """Rebuild an aggregate by replay; the current generation serves until the switch."""
        if name not in self.by_name:
            raise ConfigError(f"no aggregate named {name!r}; known: {sorted(self.by_name)}")
        if name not in self._pending_rebuilds:
            self._pending_rebuilds.append(name)

    def _check_dlq_topics(self) -> None:
        """A dead-letter topic Kafka cannot have, or one consumed here, is a config error."""
        pattern = self.settings.dlq_topic
        for topic in self.topics:
            dlq = pattern.replace("{topic}", topic)
            problem = dlq_topic_problem(dlq)
            if problem is not None:
                raise ConfigError(
                    f"--dlq-topic {pattern!r} names the dead-letter topic {dlq!r} for topic {topic!r}, "
                    f"which Kafka cannot have: {problem}. Use e.g. '{{topic}}.dlq'"
                )
            if dlq in self.topics:
                raise ConfigError(
                    f"--dlq-topic {pattern!r} sends the dead letters of {topic!r} to {dlq!r}, a topic "
                    "this consumer reads: its dead letters would come back as bad records forever. "
                    "Use a topic of its own, e.g. '{topic}.dlq'"
                )

    # ---- planning generations -----------------------------------------------------------

    def _stream(self, key: str, targets: dict[str, tuple[TableAggregate, str]]) -> Stream:
        defs = [d for d, _ in targets.values()]
        physical = {name: phys for name, (_, phys) in targets.items()}
        topics = sorted({self.table_topics[d.table] for d in defs})
        return Stream(key, targets, Applier(self.store, defs, physical, drift=key == LIVE), topics)

    def _plan_generations(self) -> None:
        """Decide, per definition, live or replay; persist the catalog. Runs at start."""
        live, replays = generations.plan(self.store, self.definitions, self.stale_policy)
        self.live = self._stream(LIVE, live)
        self.replays = [self._stream(k, t) for k, t in sorted(replays.items())]
        for r in self.replays:
            self.log.info(
                "building by replay",
                stream=r.key,
                aggregates=sorted(r.targets),
                stale=generations.serving(self.store, r.targets),
            )

    # ---- lifecycle ----------------------------------------------------------------

    async def run(self, *, until_caught_up: bool = False, install_signals: bool = True) -> int:
        """Consume until stopped (or caught up); returns the process exit code."""
        loop = asyncio.get_running_loop()
        remove_signals = on_stop_signals(loop, self._on_signal) if install_signals else None
        self._plan_generations()
        # Millions of short-lived rows and items would make the cyclic GC walk the whole heap
        # again and again (it showed up as ~40% of replay time); our data has no cycles to
        # collect, so collect rarely and leave the startup heap out of it.
        gc.freeze()
        old_gc = gc.get_threshold()
        gc.set_threshold(GC_THRESHOLD, 100, 1000)
        http = None
        if self.settings.http:
            from tally.consumers.http.app import start_http

            http = await start_http(self, self.settings.http, self.settings.token)
        try:
            if not await self._connect():
                return 0  # stopped while waiting for the broker
            tps_by_topic = await self._wait_for_topics()
            if tps_by_topic is None:
                return 0
            self._tps_by_topic = tps_by_topic
            await self._start_stream(self.live)
            for r in self.replays:
                await self._start_stream(r)
            await self._check_history([t for r in self.replays for t in r.topics])
            await self._loop(until_caught_up)
            return 0
        finally:
            gc.set_threshold(*old_gc)
            gc.unfreeze()
            await self._close()
            if http is not None:
                await http.cleanup()
            if remove_signals is not None:
                remove_signals()

    def _on_signal(self, sig: signal.Signals) -> None:
        self.log.info(
            "stopping", signal=sig.name, note="finishing the current batch, then committing"
        )
        self.request_stop()

    def _new_consumer(self) -> AIOKafkaConsumer:
        s = self.settings
        return AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers,
            group_id=LAG_GROUP if self.only is None else None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 << 20,
            fetch_max_bytes=64 << 20,
            request_timeout_ms=15000,
        )

    def _new_producer(self) -> AIOKafkaProducer:
        """The dead-letter producer (also used for cluster metadata)."""
        return AIOKafkaProducer(
            bootstrap_servers=self.settings.bootstrap_servers,
            acks="all",
            enable_idempotence=True,
            request_timeout_ms=15000,
            max_request_size=MAX_REQUEST_SIZE,
        )

    async def _restart_producer(self) -> None:
        """Replace the producer with a new one (a new idempotent producer id)."""
        fresh = self._new_producer()
        try:
            await fresh.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await fresh.stop()
            raise
        old, self._producer = self._producer, fresh
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(old.stop(), STOP_TIMEOUT)

    async def _connect(self) -> bool:
        delay = 1.0
        warned = False
        while not self._stop.is_set():
            producer = self._new_producer()
            try:
                await producer.start()
            except KafkaError as e:
                with contextlib.suppress(Exception):
                    await producer.stop()
                if not warned:
                    self.log.warning(
                        "broker unreachable, waiting",
                        error=str(e),
                        hint="start one with `scripts/kafka start` or check --bootstrap-servers",
                    )
                    warned = True
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                delay = min(delay * 2, 15.0)
                continue
            self._producer = producer
            if warned:
                self.log.info("broker reachable, starting")
            return True
        return False

    async def _wait_for_topics(self) -> dict[str, list[TopicPartition]] | None:
        assert self._producer is not None
        waiting_logged: set[tuple[frozenset[str], str]] = set()
        while not self._stop.is_set():
            # aiokafka keeps metadata only for topics in use; ask the cluster directly.
            cluster = await self._producer.client.fetch_all_metadata()
            found: dict[str, list[TopicPartition]] = {}
            missing = []
            for topic in self.topics:
                parts = cluster.partitions_for_topic(topic)
                if parts:
                    found[topic] = [
                        tp
                        for tp in (TopicPartition(topic, p) for p in sorted(parts))
                        if self.only is None or tp in self.only
                    ]
                else:
                    missing.append(topic)
            if not missing:
                return found
            # Say it again when a topic is newly missing or a new look-alike appeared (Debezium
            # creates a table's topic with its first record).
            waiting = {t: tp for t, tp in self.table_topics.items() if tp in missing}
            hint = mapping_hint(waiting, cluster.topics())
            said = (frozenset(missing), repr(hint.get("similar")))
            if said not in waiting_logged:
                self.log.warning("waiting for topics to exist", topics=sorted(missing), **hint)
                waiting_logged.add(said)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 2.0)
        return None

    async def _start_stream(self, stream: Stream) -> None:
        """Assign a stream's partitions and seek to its stored offsets (or the beginning)."""
        tps = [tp for t in stream.topics for tp in self._tps_by_topic[t]]
        if stream.is_live:
            # Live also owns partitions it already has offsets for (kept across joins).
            stored = stored_offsets(self.store, LIVE)
            tps = sorted(set(tps) | {tp for tp in stored if tp.topic in self._tps_by_topic})
        else:
            stored = stored_offsets(self.store, stream.key)
        stream.tps = tps
        if not tps:
            return
        if stream.consumer is None:
            stream.consumer = self._new_consumer()
            await stream.consumer.start()
        consumer = stream.consumer
        consumer.assign(tps)
        begin = await consumer.beginning_offsets(tps)
        # Fetched after the stored offsets were read: an end below one is not a stale answer.
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            off = stored.get(tp)
            if off is None:
                off = begin.get(tp, 0)
            elif off > ends.get(tp, off):
                self._beyond_end(tp, off, ends[tp])
            elif off < begin.get(tp, 0):
                self.log.warning(
                    "stored offset is below the topic's first offset: events were deleted "
                    "before this consumer read them; reconcile the aggregates of this topic",
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=off,
                    first=begin[tp],
                )
            consumer.seek(tp, off)
            stream.offsets[tp] = off
        # Progress counts from the topic's beginning for a replay (a resumed replay
        # reports the whole history, not what is left), from the resume point for live.
        stream.start_offsets = (
            dict(stream.offsets) if stream.is_live else {tp: begin.get(tp, 0) for tp in tps}
        )
        stream.end_at_start = dict(ends)
        if stream.is_live:
            self.stats.offsets.update(stream.offsets)
            self.stats.end_offsets.update(ends)
        self.log.info(
            "consuming",
            stream=stream.key,
            topics=stream.topics,
            partitions=len(tps),
            aggregates=sorted(stream.targets),
        )

    async def _check_history(self, topics: list[str]) -> None:
        """Warn when a topic cannot hold every row any more (replay would not be a backfill)."""
        topics = sorted(set(topics))
        if not topics:
            return
        consumer = self.replays[0].consumer if self.replays else None
        if consumer is not None:
            tps = [tp for t in topics for tp in self._tps_by_topic[t]]
            begin = await consumer.beginning_offsets(tps)
            for tp, off in sorted(begin.items()):
                if off > 0:
                    self._warn(
                        f"topic {tp.topic!r} partition {tp.partition} starts at offset {off}: "
                        "earlier events were deleted, so a replay cannot see every row. "
                        f"{KEEP_HISTORY} Or reconcile the aggregate after the replay."
                    )
        try:
            from aiokafka.admin import AIOKafkaAdminClient
            from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

            admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap_servers)
            await admin.start()
            try:
                resp = await admin.describe_configs(
                    [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
                )
            finally:
                await admin.close()
        except Exception as e:  # diagnostics only
            self.log.debug("could not read topic configs", error=str(e))
            return
        for r in resp:
            for res in getattr(r, "resources", []):
                name = res[3]
                entries = {e[0]: e[1] for e in res[4]}
                policy = entries.get("cleanup.policy") or "delete"
                retention = entries.get("retention.ms")
                if "compact" not in policy and retention not in ("-1", None):
                    self._warn(
                        f"topic {name!r} has cleanup.policy={policy} and retention.ms={retention}: old "
                        "events expire, so a replay is a backfill only while the topic still holds every "
                        f"row. {KEEP_HISTORY} Or reconcile after a replay."
                    )

    def _beyond_end(self, tp: TopicPartition, stored: int, end: int) -> None:
        """A stored offset past the partition's end: flag it (/status, /readyz, the log).

        The consumer goes on from the partition's beginning (auto_offset_reset=earliest), on
        top of the old state: only a rebuild makes the aggregates exact again."""
        self.stats.beyond_end[tp] = (stored, end)
        self._warn(
            beyond_end_problem(tp, stored, end),
            event="stored offset beyond the partition's end",
            topic=tp.topic,
            partition=tp.partition,
        )

    def _warn(self, message: str, event: str = "history", **fields: Any) -> None:
        """Log a warning once and keep it for /status ``warnings``."""
        if message not in self.warnings:
            self.warnings.append(message)
            self.log.warning(event, message=message, **fields)

    def _check_unwrapped(self) -> None:
        """Warn once per topic whose rows come without Debezium's envelope: no truncate can
        arrive there (ExtractNewRecordState drops truncate events whatever
        ``skipped.operations`` says; tests/data/debezium/README.md)."""
        seen = self.decoder.unwrapped_topics
        if len(seen) == self._unwrapped_warned:
            return
        for topic, has_op in list(seen.items())[self._unwrapped_warned :]:
            tables = sorted(t for t, tp in self.table_topics.items() if tp == topic)
            message = (
                f"topic {topic!r} carries rows without Debezium's envelope (ExtractNewRecordState "
                "output): a TRUNCATE can never arrive on it, since the SMT drops truncate events "
                "whatever skipped.operations says, so after a TRUNCATE of "
                f"{', '.join(tables) or 'its table'} the aggregates keep the old rows until "
                "`tally reconcile --patch`. For a table that is ever truncated, consume the "
                "envelope (no unwrap SMT) with skipped.operations=none."
            )
            if not has_op:
                message += (
                    " Its rows carry no __op (add ExtractNewRecordState's add.fields=op), so tally "
                    "cannot tell an insert from an update: drift signals are off for it."
                )
            self._warn(message, "truncates cannot arrive", topic=topic)
        self._unwrapped_warned = len(seen)

    async def _close(self) -> None:
        for s in [self.live, *self.replays]:
            if s.consumer is not None:
                if s.is_live:
                    await self._commit_kafka()
                with contextlib.suppress(Exception):
                    await s.consumer.stop()
                s.consumer = None
        if self._producer is not None:
            # A dead letter the broker keeps refusing would make stop() wait for ever.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), STOP_TIMEOUT)
        self._producer = None

    # ---- the loop -----------------------------------------------------------------

    async def _loop(self, until_caught_up: bool) -> None:
        s = self.settings
        last_progress = last_health = time.monotonic()
        events_at_last = self.stats.events + self.stats.replayed
        while not self._stop.is_set():
            if time.monotonic() - last_health >= HEALTH_INTERVAL:
                # aiokafka retries a lost broker silently; a short probe makes outages visible.
                await self._refresh_end_offsets(timeout=HEALTH_INTERVAL)
                last_health = time.monotonic()
            if self._pending_rebuilds:
                await self._start_rebuilds()
            if not self.replays and self._live_caught_up():
                self.caught_up.set()
                if until_caught_up:
                    self.log.info(
                        "caught up",
                        events=self.stats.events,
                        replayed=self.stats.replayed,
                        dead_letters=self.stats.dead_letters,
                    )
                    break
            else:
                self.caught_up.clear()
            hold_live = False
            for r in list(self.replays):
                hold_live |= await self._replay_step(r)
            if self.live.consumer is not None and not hold_live:
                timeout = 0 if self.replays else s.poll_timeout_ms
                batch = await self.live.consumer.getmany(
                    timeout_ms=timeout, max_records=s.batch_size
                )
                if batch:
                    await self._process(self.live, batch)
            elif self.live.consumer is None and not self.replays:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), s.poll_timeout_ms / 1000)
            self.drift.flush()
            now = time.monotonic()
            if now - last_progress >= s.progress_interval:
                await self._refresh_end_offsets()
                total = self.stats.events + self.stats.replayed
                self.log.info(
                    "progress",
                    events=self.stats.events,
                    events_per_s=round((total - events_at_last) / (now - last_progress), 1),
                    lag=sum(self.stats.lag().values()),
                    dead_letters=self.stats.dead_letters,
                    replays={r.key: r.progress() for r in self.replays} or None,
                )
                await self._commit_kafka()
                last_progress, events_at_last = now, total
        for r in self.replays:
            self._flush_replay(r)  # a clean stop keeps the replay's gathered work
        self.drift.flush(force=True)
        self.log.info(
            "stopped",
            events=self.stats.events,
            replayed=self.stats.replayed,
            batches=self.stats.batches,
        )

    def _live_caught_up(self) -> bool:
        live = self.live
        if live.consumer is None:
            return not self.live.targets and not self.replays
        for tp in live.tps:
            end = self.stats.end_offsets.get(tp)
            hw = live.consumer.highwater(tp)
            if hw is not None and (end is None or hw > end):
                self.stats.end_offsets[tp] = end = hw
            if end is None or live.offsets.get(tp, 0) < end:
                return False
        return True

    async def _replay_step(self, r: Stream) -> bool:
        """One replay batch, trimmed at the live position; joins when there. True: hold live."""
        live = self.live
        if self._ready_to_join(r):
            await self._join(r)
            return False
        consumer = r.consumer
        if consumer is None:
            return False
        batch = await consumer.getmany(
            timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.replay_batch_size
        )
        trimmed: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
        reached: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            cap = live.offsets.get(tp)
            if cap is not None and records and records[-1].offset >= cap:
                # Live already applies these: the replay stops exactly at the live position.
                records = [rec for rec in records if rec.offset < cap]
                consumer.seek(tp, cap)
                reached[tp] = cap
            if records:
                trimmed[tp] = records
        if trimmed or reached:
            await self._process(r, trimmed, reached)
        elif r.pending is not None:
            self._flush_replay(r)  # nothing more to read right now: commit what we have
        # Close enough to the live position: let the replay catch it before live moves on.
        near = all(
            live.offsets.get(tp) is None
            or live.offsets[tp] - r.offsets.get(tp, 0) <= self.settings.batch_size
            for tp in r.tps
        )
        return near and self._history_done(r)

    def _history_done(self, r: Stream, ahead: dict[TopicPartition, int] | None = None) -> bool:
        """The replay read everything that was in its topics when it started."""
        ahead = ahead or {}
        return all(ahead.get(tp, r.offsets.get(tp, 0)) >= end for tp, end in r.end_at_start.items())

    def _ready_to_join(self, r: Stream) -> bool:
        if not self._history_done(r):
            return False
        live = self.live
        return all(
            live.offsets.get(tp) is None or live.offsets[tp] == r.offsets.get(tp, 0) for tp in r.tps
        )

    async def _join(self, r: Stream) -> None:
        """Switch a replayed generation live: catalog, offsets and old data in one batch."""
        store = self.store
        live = self.live
        adopted = {tp: off for tp, off in r.offsets.items() if tp not in live.offsets}
        with store.batch() as b:
            generations.switch(store, r.targets)
            live.put_offsets(b, adopted)
            for tp in r.tps:
                b.delete_meta(offset_key(tp.topic, tp.partition, r.key))
        self.replays.remove(r)
        if r.consumer is not None:
            with contextlib.suppress(Exception):
                await r.consumer.stop()
        targets = dict(live.targets)
        targets.update(r.targets)
        consumer, live.consumer = live.consumer, None
        self.live = self._stream(LIVE, targets)
        self.live.consumer = consumer
        await self._start_stream(self.live)
        self.log.info(
            "replay joined live; generation switched", stream=r.key, aggregates=sorted(r.targets)
        )

    async def _start_rebuilds(self) -> None:
        names, self._pending_rebuilds = self._pending_rebuilds, []
        busy = {n for r in self.replays for n in r.targets}
        key, targets = generations.begin_rebuilds(
            self.store, [self.by_name[n] for n in names if n not in busy], self.stale_policy
        )
        if not targets:
            return
        if self.stale_policy == "drop":
            live_targets = {k: v for k, v in self.live.targets.items() if k not in targets}
            consumer, self.live.consumer = self.live.consumer, None
            self.live = self._stream(LIVE, live_targets)
            self.live.consumer = consumer
            await self._start_stream(self.live)
        r = self._stream(key, targets)
        self.replays.append(r)
        await self._start_stream(r)
        self.log.info("rebuild started", stream=key, aggregates=sorted(targets))

    async def _refresh_end_offsets(self, timeout: float = 10.0) -> None:
        consumer = self.live.consumer
        if consumer is None or not self.live.tps:
            return
        committed = dict(self.live.offsets)  # before the request: an end below is not stale
        try:
            ends = await asyncio.wait_for(consumer.end_offsets(self.live.tps), timeout)
        except (TimeoutError, KafkaError) as e:
            if self.stats.broker_ok:
                self.log.warning(
                    "broker unreachable; will resume automatically when it is back",
                    error=str(e) or type(e).__name__,
                )
            self.stats.broker_ok = False
            return
        if not self.stats.broker_ok:
            self.log.info("broker reachable again; resuming")
        self.stats.broker_ok = True
        self.stats.end_offsets.update(ends)
        for tp, end in ends.items():
            off = committed.get(tp)
            if off is not None and off > end and tp not in self.stats.beyond_end:
                self._beyond_end(tp, off, end)

    async def _process(
        self,
        stream: Stream,
        batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]],
        reached: dict[TopicPartition, int] | None = None,
    ) -> None:
        """Decode, dead-letter, apply and commit one batch of a stream with its offsets.

        ``reached``: partitions a replay read up to the live position (their
        next offset is that position, whatever records it skipped).
        """
        t0 = time.perf_counter()
        decode = self.decoder.decode
        events: list[ChangeEvent] = []
        refs: list[tuple[TopicPartition, ConsumerRecord[Any, Any]]] = []
        bad: list[tuple[TopicPartition, ConsumerRecord[Any, Any], BadRecord]] = []
        next_offsets: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            if not records:
                continue
            next_offsets[tp] = records[-1].offset + 1
            topic = tp.topic
            for r in records:
                try:
                    events.append(decode(r.key, r.value, topic))
                except BadRecord as e:
                    bad.append((tp, r, e))
                    continue
                refs.append((tp, r))
        if reached:
            next_offsets.update(reached)
        if events and events[-1].id is not None:
            # One sample of how this topic keys its rows (reconcile places missing rows by it).
            self.last_keyed = (refs[-1][1].key, events[-1].id)
        self._check_unwrapped()
        if bad and not stream.is_live:
            # Undecodable records below the live position were dead-lettered by the live stream
            # (same decoder). Records the replay's own definitions cannot apply (below) are new:
            # live never planned those aggregates, so they are always reported.
            seen = self.live.offsets
            bad = [x for x in bad if x[1].offset >= seen.get(x[0], 0)]
        ops, bad_events = stream.applier.plan(events)
        for i, why in bad_events:
            bad.append((*refs[i], why))
        if bad and not await self._dead_letter(stream.key, bad):
            # Nothing committed: fetch the same records again after a pause.
            for tp, records in batch.items():
                if records:
                    stream.consumer.seek(tp, records[0].offset)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 2.0)
            return
        n = sum(len(r) for r in batch.values())
        st = self.stats
        st.dead_letters += len(bad)
        if not stream.is_live:
            # A replay gathers batches and commits them as one chunk (one bulk build).
            if stream.pending is None:
                stream.pending = stream.applier.new_pending()
            stream.applier.collect(ops, stream.pending)
            stream.pending.events += n
            stream.pending_offsets.update(next_offsets)
            if (
                reached
                or stream.pending.events >= self.settings.replay_chunk
                or self._history_done(stream, stream.pending_offsets)
            ):
                self._flush_replay(stream)
            return
        with self.store.batch() as b:
            result = stream.applier.apply(ops)
            if self.patches.active:
                self.patches.note(ops)
            stream.put_offsets(b, next_offsets)
            stream.offsets.update(next_offsets)
            stream.events += n
        st.events += n
        st.offsets.update(next_offsets)
        st.batches += 1
        st.changed += result.changed
        if result.drift:
            self.drift.report(result.drift, result.drift_ids)
        dt = time.perf_counter() - t0
        st.observe_batch(dt)
        self.log.debug(
            "batch",
            stream=stream.key,
            events=n,
            upserts=result.upserts,
            deletes=result.deletes,
            clears=result.clears,
            dead_letters=len(bad),
            ms=round(dt * 1000, 2),
        )

    def _flush_replay(self, stream: Stream) -> None:
        """Commit what a replay gathered: its changes, offsets and progress in one batch."""
        pending = stream.pending
        if pending is None:
            return
        t0 = time.perf_counter()
        with self.store.batch() as b:
            result = stream.applier.flush(pending)
            stream.put_offsets(b, stream.pending_offsets)
            stream.offsets.update(stream.pending_offsets)
            stream.events += pending.events
            stream.pending, stream.pending_offsets = None, {}  # committed now: not pending
            progress = stream.progress()
            for name in stream.targets:
                g = self.store.generation(name)
                if g is not None:
                    g.progress = progress
                    self.store.put_generation(name, g)
        st = self.stats
        st.replayed += pending.events
        st.batches += 1
        st.changed += result.changed
        dt = time.perf_counter() - t0
        st.observe_batch(dt)
        self.log.debug(
            "replay chunk",
            stream=stream.key,
            events=pending.events,
            changed=result.changed,
            ms=round(dt * 1000, 2),
        )

    async def _dead_letter(
        self, stream: str, bad: list[tuple[TopicPartition, ConsumerRecord[Any, Any], BadRecord]]
    ) -> bool:
        """Send bad records to their dead-letter topics; True once all are acknowledged."""
        if not await self.dead_letters.write(stream, bad, self._stop):
            return False
        for tp, r, why in bad[:5]:
            self.log.warning(
                "dead letter",
                topic=tp.topic,
                partition=tp.partition,
                offset=r.offset,
                reason=why.reason,
                error=str(why),
            )
        return True

    async def _commit_kafka(self) -> None:
        """Live offsets to Kafka under group_id: lag monitoring only, best effort."""
        consumer = self.live.consumer
        if consumer is None or not self.live.offsets or self.only is not None:
            return
        try:
            await asyncio.wait_for(consumer.commit(dict(self.live.offsets)), 5)
        except Exception as e:  # monitoring only: never fatal
            self.log.debug("kafka offset commit failed", error=str(e) or type(e).__name__)
