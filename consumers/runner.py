"""The consumer process: Kafka batches → triggers → one RocksDB commit with the offsets.

aiokafka's "local state with offsets stored outside Kafka" pattern: this
process owns every partition of its topics (manual assignment, no group
rebalancing), applies each ``getmany`` batch inside one `Store.batch()` and
writes the next offset of every partition it consumed into the same
WriteBatch. On start it seeks to those stored offsets (or the beginning).
Offsets committed to Kafka under ``group_id`` are only for lag monitoring.

A bad record (undecodable, no id, unknown table, a user function raising)
goes to the dead-letter topic first, with its reason in headers; only once
the broker has acknowledged it does the batch commit. If the dead-letter
write fails, nothing commits and the batch is fetched again: nothing lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import ConsumerRecord, TopicPartition

from engine import Store, TableAggregate
from schemas import BadRecord, ChangeEvent, EventDecoder
from schemas.config import ConsumerSettings

from .apply import Applier
from .definitions import id_fields_by_table
from .logs import get_logger

__all__ = ["ConsumerProcess", "ConsumerStats", "offset_key", "stored_offsets"]

OFFSETS_PREFIX = b"offsets/live/"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def offset_key(topic: str, partition: int) -> bytes:
    """Store metadata key holding the next offset to read of a partition."""
    return OFFSETS_PREFIX + topic.encode() + b"\x00" + str(partition).encode()


def stored_offsets(store: Store) -> dict[TopicPartition, int]:
    """The committed next offsets of every partition this store has consumed."""
    out = {}
    for k, v in store.scan_meta(OFFSETS_PREFIX):
        topic, _, part = k[len(OFFSETS_PREFIX) :].partition(b"\x00")
        out[TopicPartition(topic.decode(), int(part))] = int.from_bytes(v, "big")
    return out


@dataclass
class ConsumerStats:
    """Counters for logs, /status and /metrics."""

    started: float = field(default_factory=time.time)
    events: int = 0
    batches: int = 0
    dead_letters: int = 0
    changed: int = 0
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    offsets: dict[TopicPartition, int] = field(default_factory=dict)
    end_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    broker_ok: bool = True

    def observe_batch(self, seconds: float) -> None:
        self.latency_sum += seconds
        for i, b in enumerate(LATENCY_BUCKETS):
            if seconds <= b:
                self.latency_buckets[i] += 1
                return
        self.latency_buckets[-1] += 1

    def lag(self) -> dict[TopicPartition, int]:
        return {
            tp: max(0, end - self.offsets.get(tp, 0)) for tp, end in self.end_offsets.items()
        }


class ConsumerProcess:
    """One `tally consume` process: owns its store and all partitions of its topics."""

    def __init__(
        self,
        settings: ConsumerSettings,
        definitions: Sequence[TableAggregate],
        store: Store,
    ) -> None:
        self.settings = settings
        self.definitions = list(definitions)
        self.store = store
        self.applier = Applier(store, self.definitions)
        self.table_topics = {d.table: settings.topics.get(d.table, d.table) for d in self.definitions}
        self.topics = sorted(set(self.table_topics.values()))
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
        )
        self.stats = ConsumerStats()
        self.log = get_logger(bootstrap=settings.bootstrap_servers, data_dir=settings.data_dir)
        self._stop = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._assigned: list[TopicPartition] = []
        self.caught_up = asyncio.Event()

    @property
    def assigned(self) -> list[TopicPartition]:
        """The partitions this process owns (empty until assignment)."""
        return list(self._assigned)

    def request_stop(self) -> None:
        """Finish the current batch, commit, and return from `run`."""
        self._stop.set()

    # ---- lifecycle ----------------------------------------------------------------

    async def run(self, *, until_caught_up: bool = False, install_signals: bool = True) -> int:
        """Consume until stopped (or caught up); returns the process exit code."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._on_signal, sig)
        http = None
        if self.settings.http:
            from .http import start_http

            http = await start_http(self, self.settings.http, self.settings.token)
        try:
            if not await self._connect():
                return 0  # stopped while waiting for the broker
            await self._assign()
            await self._loop(until_caught_up)
            return 0
        finally:
            await self._close()
            if http is not None:
                await http.cleanup()
            if install_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.log.info("stopping", signal=sig.name, note="finishing the current batch, then committing")
        self.request_stop()

    async def _connect(self) -> bool:
        s = self.settings
        delay = 1.0
        warned = False
        while not self._stop.is_set():
            consumer = AIOKafkaConsumer(
                bootstrap_servers=s.bootstrap_servers,
                group_id=s.group_id,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=8 << 20,
                fetch_max_bytes=64 << 20,
                request_timeout_ms=15000,
            )
            producer = AIOKafkaProducer(
                bootstrap_servers=s.bootstrap_servers,
                acks="all",
                enable_idempotence=True,
                request_timeout_ms=15000,
            )
            try:
                await consumer.start()
                await producer.start()
            except KafkaError as e:
                with contextlib.suppress(Exception):
                    await consumer.stop()
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
            self._consumer, self._producer = consumer, producer
            if warned:
                self.log.info("broker reachable, starting")
            return True
        return False

    async def _assign(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        waiting_logged: set[str] = set()
        while not self._stop.is_set():
            # aiokafka keeps metadata only for subscribed topics; with manual
            # assignment we ask the cluster directly (no public API for it).
            cluster = await consumer._client.fetch_all_metadata()
            tps: list[TopicPartition] = []
            missing: list[str] = []
            for topic in self.topics:
                parts = cluster.partitions_for_topic(topic)
                if not parts:
                    missing.append(topic)
                    continue
                tps.extend(TopicPartition(topic, p) for p in sorted(parts))
            if not missing:
                break
            new = set(missing) - waiting_logged
            if new:
                self.log.warning("waiting for topics to exist", topics=sorted(new))
                waiting_logged |= new
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 2.0)
        else:
            return
        consumer.assign(tps)
        self._assigned = tps
        stored = stored_offsets(self.store)
        fresh = []
        for tp in tps:
            off = stored.get(tp)
            if off is None:
                fresh.append(tp)
            else:
                consumer.seek(tp, off)
            self.stats.offsets[tp] = off or 0
        if fresh:
            await consumer.seek_to_beginning(*fresh)
        begin = await consumer.beginning_offsets(tps)
        for tp in fresh:
            self.stats.offsets[tp] = begin.get(tp, 0)
        for tp in tps:
            off = stored.get(tp)
            if off is not None and off < begin.get(tp, 0):
                self.log.warning(
                    "stored offset is below the topic's first offset: events were deleted "
                    "before this consumer read them; reconcile this aggregate",
                    topic=tp.topic,
                    partition=tp.partition,
                    stored=off,
                    first=begin[tp],
                )
        self.stats.end_offsets.update(await consumer.end_offsets(tps))
        self.log.info(
            "consuming",
            topics=self.topics,
            partitions=len(tps),
            resumed=len(tps) - len(fresh),
            aggregates=[d.name for d in self.definitions],
        )

    async def _close(self) -> None:
        if self._consumer is not None:
            await self._commit_kafka()
            with contextlib.suppress(Exception):
                await self._consumer.stop()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
        self._consumer = self._producer = None

    # ---- the loop -----------------------------------------------------------------

    async def _loop(self, until_caught_up: bool) -> None:
        consumer = self._consumer
        assert consumer is not None
        s = self.settings
        last_progress = time.monotonic()
        events_at_last = self.stats.events
        while not self._stop.is_set():
            if self._is_caught_up():
                self.caught_up.set()
                if until_caught_up:
                    self.log.info("caught up", events=self.stats.events, dead_letters=self.stats.dead_letters)
                    break
            batch = await consumer.getmany(timeout_ms=s.poll_timeout_ms, max_records=s.batch_size)
            if batch:
                await self._process(batch)
            now = time.monotonic()
            if now - last_progress >= s.progress_interval:
                await self._refresh_end_offsets()
                rate = (self.stats.events - events_at_last) / (now - last_progress)
                lag = self.stats.lag()
                self.log.info(
                    "progress",
                    events=self.stats.events,
                    events_per_s=round(rate, 1),
                    lag=sum(lag.values()),
                    dead_letters=self.stats.dead_letters,
                )
                await self._commit_kafka()
                last_progress, events_at_last = now, self.stats.events
        self.log.info("stopped", events=self.stats.events, batches=self.stats.batches)

    def _is_caught_up(self) -> bool:
        if not self._assigned:
            return False
        offs = self.stats.offsets
        for tp in self._assigned:
            end = self.stats.end_offsets.get(tp)
            if end is None or offs.get(tp, 0) < end:
                if self._consumer is not None:
                    hw = self._consumer.highwater(tp)
                    if hw is not None and end is not None and hw > end:
                        self.stats.end_offsets[tp] = hw
                return False
        return True

    async def _refresh_end_offsets(self) -> None:
        assert self._consumer is not None
        try:
            ends = await asyncio.wait_for(self._consumer.end_offsets(self._assigned), 10)
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

    async def _process(self, batch: dict[TopicPartition, list[ConsumerRecord[Any, Any]]]) -> None:
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
        ops, bad_events = self.applier.plan(events)
        for i, why in bad_events:
            bad.append((*refs[i], why))
        if bad and not await self._dead_letter(bad):
            # Nothing committed: fetch the same records again after a pause.
            for tp, records in batch.items():
                if records:
                    self._consumer.seek(tp, records[0].offset)  # type: ignore[union-attr]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), 2.0)
            return
        with self.store.batch() as b:
            result = self.applier.apply(ops)
            for tp, off in next_offsets.items():
                b.put_meta(offset_key(tp.topic, tp.partition), off.to_bytes(8, "big"))
        n = sum(len(r) for r in batch.values())
        st = self.stats
        st.events += n
        st.batches += 1
        st.changed += result.changed
        st.dead_letters += len(bad)
        st.offsets.update(next_offsets)
        dt = time.perf_counter() - t0
        st.observe_batch(dt)
        self.log.debug(
            "batch",
            events=n,
            upserts=result.upserts,
            deletes=result.deletes,
            clears=result.clears,
            dead_letters=len(bad),
            ms=round(dt * 1000, 2),
            partitions={f"{tp.topic}/{tp.partition}": off for tp, off in next_offsets.items()},
        )

    async def _dead_letter(
        self, bad: list[tuple[TopicPartition, ConsumerRecord[Any, Any], BadRecord]]
    ) -> bool:
        """Send bad records to their dead-letter topics; True once all are acknowledged."""
        producer = self._producer
        assert producer is not None
        try:
            futures = []
            for tp, r, why in bad:
                dlq = self.settings.dlq_topic.replace("{topic}", tp.topic)
                headers = [
                    ("tally.reason", why.reason.encode()),
                    ("tally.error", str(why).encode("utf-8", "replace")[:4000]),
                    ("tally.source.topic", tp.topic.encode()),
                    ("tally.source.partition", str(tp.partition).encode()),
                    ("tally.source.offset", str(r.offset).encode()),
                ]
                futures.append(await producer.send(dlq, value=r.value, key=r.key, headers=headers))
            await asyncio.wait_for(asyncio.gather(*futures), 30)
        except (TimeoutError, KafkaError) as e:
            self.log.error(
                "dead-letter write failed; batch not committed, will retry",
                error=str(e) or type(e).__name__,
                records=len(bad),
            )
            return False
        for tp, r, why in bad[:5]:
            self.log.warning(
                "dead letter", topic=tp.topic, partition=tp.partition, offset=r.offset, reason=why.reason, error=str(why)
            )
        return True

    async def _commit_kafka(self) -> None:
        """Offsets to Kafka under group_id: lag monitoring only, best effort."""
        if self._consumer is None or not self.stats.offsets:
            return
        try:
            await asyncio.wait_for(self._consumer.commit(dict(self.stats.offsets)), 5)
        except Exception as e:  # monitoring only: never fatal
            self.log.debug("kafka offset commit failed", error=str(e) or type(e).__name__)
