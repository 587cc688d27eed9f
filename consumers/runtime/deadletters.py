"""Dead letters: records a consumer cannot apply go to a dead-letter topic, and it goes on.

A dead letter is the source record's key and value with headers saying why and where from:

``tally.reason``
    the machine code (``decode``, ``missing-id``, ``unknown-table``, ``apply``, ...).
``tally.error``
    the human explanation (UTF-8, at most 4,000 bytes, cut at a character boundary).
``tally.source.topic`` / ``tally.source.partition`` / ``tally.source.offset``
    where the original record is: fetch it from there when the dead letter is truncated.
``tally.source.key.size`` / ``tally.source.value.size``
    the original key's and value's length in bytes, or ``null`` when the record had none.
``tally.truncated``
    present only when the dead letter does not carry the whole record: ``key``, ``value``
    or ``key,value`` — the parts that are prefixes of the original.

A null key stays null. A null value is written as an empty value (a null/null record
cannot be produced, and a null value would be a tombstone on a compacted dead-letter
topic); ``tally.source.value.size: null`` says it was null.

**Every dead letter fits.** Its size limit is the smaller of the producer's
``max_request_size`` (`MAX_REQUEST_SIZE`) and the dead-letter topic's
``max.message.bytes``, read from the broker (for a topic that does not exist yet, the
broker's ``message.max.bytes``, which an auto-created topic gets; if neither can be read,
Kafka's default 1,048,588). The record-batch framing, the headers and a margin
(`SAFETY_BYTES`, more when the topic recompresses) are taken off; what is left holds
the original bytes when they fit, else a prefix of each (the key kept whole when it is
the small part). Should the broker still refuse one as too large (a limit lowered after
it was read), it is written again with headers only. On topics whose limit is below the
producer's batch size, dead letters are sent one at a time, so batching cannot add them up
past the limit.

**When the topic is truly unwritable** (missing with auto-creation off, a name the broker
refuses to create because it clashes with an existing topic's '.'/'_', not authorized,
fewer in-sync replicas than ``min.insync.replicas``, ...) the batch is held, as a batch
commits only after its dead letters are acknowledged. `DeadLetterHealth` says so
(``/status`` → ``dead_letter``, ``/readyz`` → not ready, with the reason and since when),
and the log says it once when it starts, then at most every `LOG_INTERVAL` s, and once
when it recovers. A send that is not acknowledged yet is not sent again on the next
attempt: the same future is awaited (the idempotent producer keeps retrying it), so a
topic that comes back gets each dead letter once.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
    UnknownTopicOrPartitionError,
)
from aiokafka.structs import ConsumerRecord, TopicPartition

from tally.schemas import BadRecord

__all__ = [
    "ACK_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "H_ERROR",
    "H_KEY_SIZE",
    "H_OFFSET",
    "H_PARTITION",
    "H_REASON",
    "H_TOPIC",
    "H_TRUNCATED",
    "H_VALUE_SIZE",
    "MAX_REQUEST_SIZE",
    "DeadLetterHealth",
    "DeadLetters",
    "Limit",
    "build_dead_letter",
    "dlq_topic_problem",
]

H_REASON = "tally.reason"
H_ERROR = "tally.error"
H_TOPIC = "tally.source.topic"
H_PARTITION = "tally.source.partition"
H_OFFSET = "tally.source.offset"
H_KEY_SIZE = "tally.source.key.size"
H_VALUE_SIZE = "tally.source.value.size"
H_TRUNCATED = "tally.truncated"

ERROR_MAX_BYTES = 4000
"""``tally.error`` is cut to this many bytes (at a UTF-8 character boundary)."""
DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
"""Kafka's default ``message.max.bytes``: the limit assumed when the broker cannot be asked."""
MAX_REQUEST_SIZE = 16 << 20
"""The dead-letter producer's ``max_request_size``: dead letters up to this size keep the
original bytes when the topic allows them."""
BATCH_OVERHEAD = 61 + 21
"""A record batch's header plus aiokafka's upper bound of one record's framing."""
SAFETY_BYTES = 512
"""Bytes kept free below the limit (estimates are upper bounds already; this is slack)."""
PRODUCER_BATCH_SIZE = 16384
"""aiokafka's default ``max_batch_size``: small records sent together share one batch."""
ACK_TIMEOUT = 10.0
"""Seconds one attempt waits for the broker's acknowledgements before reporting the topic
unwritable and retrying the batch (the unacknowledged sends stay in flight meanwhile)."""
LOG_INTERVAL = 30.0
"""Seconds between "still unwritable" log lines while dead-letter writes keep failing."""
LIMIT_TTL = 300.0
"""Seconds a topic's size limit read from the broker is trusted (dropped on any failure)."""
STOP_TIMEOUT = 5.0
"""Seconds to wait for a producer to flush when it is replaced or stopped."""

_LEGAL_TOPIC = re.compile(r"[a-zA-Z0-9._-]+")
_COMPRESSED = {"gzip", "snappy", "lz4", "zstd"}
_SIZE_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError, RecordTooLargeError)

Bad = tuple[TopicPartition, ConsumerRecord[Any, Any], BadRecord]


def dlq_topic_problem(name: str) -> str | None:
    """Why Kafka would refuse ``name`` as a topic name, or None when it is a legal one."""
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} is reserved"
    if len(name) > 249:
        return f"it is {len(name)} characters long (Kafka allows 249)"
    if not _LEGAL_TOPIC.fullmatch(name):
        bad = sorted({c for c in name if not _LEGAL_TOPIC.fullmatch(c)})
        return (
            f"it contains {''.join(bad)!r} (Kafka allows only ASCII letters, digits, '.', '_', '-')"
        )
    return None


def _varint_size(n: int) -> int:
    """Bytes of Kafka's zigzag varint for ``n`` (as aiokafka's ``size_of_varint``)."""
    v = (n << 1) ^ (n >> 63)
    size = 1
    while v >= 0x80:
        v >>= 7
        size += 1
    return size


def _headers_size(headers: Sequence[tuple[str, bytes]]) -> int:
    size = _varint_size(len(headers))
    for k, v in headers:
        kb = len(k.encode())
        size += _varint_size(kb) + kb + _varint_size(len(v)) + len(v)
    return size


def _cut_utf8(text: str, limit: int) -> bytes:
    """``text`` as UTF-8 of at most ``limit`` bytes, never ending inside a character."""
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    return raw[: max(0, limit)].decode("utf-8", "ignore").encode()


def _size(b: bytes | None) -> bytes:
    return b"null" if b is None else str(len(b)).encode()


@dataclass(frozen=True)
class Limit:
    """How large a dead letter to one topic may be, and where that figure came from."""

    max_bytes: int
    """Upper bound of one record batch holding one dead letter (producer and topic limits)."""
    margin: int = SAFETY_BYTES
    source: str = "Kafka's default"
    read_at: float = field(default_factory=time.monotonic)


def build_dead_letter(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    error: str,
    limit: Limit,
    *,
    keep_payload: bool = True,
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """(key, value, headers) of the dead letter of one record, within ``limit``.

    The original bytes when they fit, else prefixes of them with ``tally.truncated``
    (``keep_payload=False``: headers only). Never key=None and value=None together.
    """
    headers: list[tuple[str, bytes]] = [
        (H_REASON, reason.encode("utf-8", "replace")[:200]),
        (H_ERROR, _cut_utf8(error, ERROR_MAX_BYTES)),
        (H_TOPIC, topic.encode()),
        (H_PARTITION, str(partition).encode()),
        (H_OFFSET, str(offset).encode()),
        (H_KEY_SIZE, _size(key)),
        (H_VALUE_SIZE, _size(value)),
    ]
    klen = 0 if key is None else len(key)
    vlen = 0 if value is None else len(value)
    # Framing, the headers, the two length varints (<= 5 bytes each) and the margin (no
    # more than a quarter of a tiny limit: the estimates are upper bounds already).
    margin = min(limit.margin, limit.max_bytes // 4)
    room = limit.max_bytes - BATCH_OVERHEAD - margin - 10 - _headers_size(headers)
    if keep_payload and klen + vlen <= room:
        return key, b"" if value is None else value, headers
    cut_header = len(H_TRUNCATED) + len("key,value") + 2
    room -= cut_header
    if room < 0:  # a tiny topic limit: the error text gives way first
        err = headers[1][1]
        kept = _cut_utf8(err.decode("utf-8", "replace"), len(err) + room)
        headers[1] = (H_ERROR, kept)
        room = max(0, room + len(err) - len(kept))
    if not keep_payload:
        room = 0
    k_keep = min(klen, max(room - vlen, room // 2))
    v_keep = min(vlen, room - k_keep)
    cut = [
        part
        for part, full, kept_n in (("key", klen, k_keep), ("value", vlen, v_keep))
        if kept_n < full
    ]
    if cut:
        headers.append((H_TRUNCATED, ",".join(cut).encode()))
    out_key = None if key is None else key[:k_keep]
    out_value = b"" if value is None else value[:v_keep]
    return out_key, out_value, headers


@dataclass
class DeadLetterHealth:
    """Whether dead letters can be written: what /status, /readyz and /metrics show."""

    failing_since: float | None = None
    """Wall-clock time of the first failed attempt of the current outage (None: writable)."""
    topic: str | None = None
    reason: str | None = None
    attempts: int = 0
    """Failed attempts in a row."""
    records: int = 0
    """Dead letters the held batch is waiting to write."""
    written: int = 0
    """Dead letters acknowledged since the process started."""

    def status(self) -> dict[str, Any]:
        """The ``dead_letter`` object of /status."""
        if self.failing_since is None:
            return {"state": "ok", "written": self.written}
        return {
            "state": "failing",
            "topic": self.topic,
            "reason": self.reason,
            "since": datetime.fromtimestamp(self.failing_since, UTC).isoformat(timespec="seconds"),
            "attempts": self.attempts,
            "records": self.records,
            "written": self.written,
        }

    def problem(self) -> str | None:
        """Why the consumer is held by its dead letters (for /readyz), or None."""
        if self.failing_since is None:
            return None
        since = datetime.fromtimestamp(self.failing_since, UTC).isoformat(timespec="seconds")
        return (
            f"dead-letter topic {self.topic!r} unwritable since {since} ({self.attempts} attempts): "
            f"{self.reason}; the batch holding {self.records} bad record(s) is not committed, "
            "so nothing after it is applied until the write succeeds (see /status dead_letter)"
        )


class DeadLetters:
    """Writes a batch's bad records to their dead-letter topics; tracks and logs health."""

    def __init__(
        self,
        bootstrap_servers: str,
        pattern: str,
        log: Any,
        health: DeadLetterHealth,
        producer: Callable[[], AIOKafkaProducer | None],
        restart_producer: Callable[[], Awaitable[None]],
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.pattern = pattern
        self.log = log
        self.health = health
        self._producer = producer
        self._restart_producer = restart_producer
        self._limits: dict[str, Limit] = {}
        self._inflight: dict[tuple[str, str, int, int], asyncio.Future[Any]] = {}
        self._headers_only: set[tuple[str, str, int, int]] = set()
        self._logged_at = 0.0

    def topic_for(self, source_topic: str) -> str:
        return self.pattern.replace("{topic}", source_topic)

    async def write(self, stream: str, bad: Sequence[Bad], stop: asyncio.Event) -> bool:
        """Send the dead letters of ``bad``; True once every one is acknowledged.

        False: nothing must commit; the caller fetches the batch again and calls this
        again, which awaits (does not resend) what is still in flight.
        """
        producer = self._producer()
        futures: dict[tuple[str, str, int, int], asyncio.Future[Any]] = {}
        topics: dict[tuple[str, str, int, int], str] = {}
        error: BaseException | None = None
        current: tuple[str, str, int, int] | None = None
        known: set[str] = set()  # topics whose metadata this call has seen
        try:
            if producer is None:
                raise KafkaError("no producer (the broker was never reached)")
            for tp, r, why in bad:
                ident = current = (stream, tp.topic, tp.partition, r.offset)
                dlq = topics[ident] = self.topic_for(tp.topic)
                prev = self._inflight.get(ident)
                if prev is not None and not (
                    prev.done() and (prev.cancelled() or prev.exception())
                ):
                    futures[ident] = prev  # in flight or acknowledged already: never twice
                    continue
                if dlq not in known:
                    if not await self._partitions(producer, dlq, stop):
                        return False  # stopping: the batch is not committed, nothing to report
                    known.add(dlq)
                limit = await self._limit(dlq)
                if limit.max_bytes < PRODUCER_BATCH_SIZE + BATCH_OVERHEAD + limit.margin:
                    # Several small dead letters could share a batch over this topic's limit.
                    same = [f for i, f in futures.items() if topics[i] == dlq and not f.done()]
                    if same:
                        await asyncio.wait(same, timeout=ACK_TIMEOUT)
                k, v, headers = build_dead_letter(
                    tp.topic,
                    tp.partition,
                    r.offset,
                    r.key,
                    r.value,
                    why.reason,
                    str(why),
                    limit,
                    keep_payload=ident not in self._headers_only,
                )
                fut = await producer.send(dlq, value=v, key=k, headers=headers)
                self._inflight[ident] = futures[ident] = fut
                current = None
                if headers[-1][0] == H_TRUNCATED:
                    self.log.warning(
                        "dead letter truncated to fit its topic; the original stays at its source",
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=r.offset,
                        key_size=None if r.key is None else len(r.key),
                        value_size=None if r.value is None else len(r.value),
                        truncated=headers[-1][1].decode(),
                        limit=limit.max_bytes,
                        limit_from=limit.source,
                    )
            pending = {f for f in futures.values() if not f.done()}
            deadline = time.monotonic() + ACK_TIMEOUT
            while pending and not stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _, pending = await asyncio.wait(pending, timeout=min(left, 0.5))
        except (KafkaError, TimeoutError) as e:
            error = e
        except Exception as e:  # anything else must hold the batch visibly, not crash-loop
            error = e
            if self.health.failing_since is None:  # the traceback once, not on every retry
                self.log.exception("dead-letter write raised", error=f"{type(e).__name__}: {e}")
        failed = {i: f for i, f in futures.items() if f.done() and (f.cancelled() or f.exception())}
        waiting = [i for i, f in futures.items() if not f.done()]
        if error is None and not failed and not waiting and len(futures) == len(bad):
            for ident in futures:
                self._inflight.pop(ident, None)
                self._headers_only.discard(ident)
            self._ok(len(futures))
            return True
        if error is None and not failed and stop.is_set():
            return False  # stopping while acknowledgements are due: not a failure to report
        for ident, f in failed.items():
            self._inflight.pop(ident, None)  # refused: send it again next time
            exc = None if f.cancelled() else f.exception()
            if isinstance(exc, _SIZE_ERRORS):
                self._headers_only.add(ident)
            if error is None:
                error = exc or KafkaError("send cancelled")
        if isinstance(error, _SIZE_ERRORS) and current is not None:
            self._headers_only.add(current)  # the producer refused it before sending
        for dlq in set(topics.values()):
            self._limits.pop(dlq, None)
        if failed and not waiting:
            # A batch the broker refused leaves a gap in the idempotent producer's sequence
            # numbers for its partition: later sends there would fail out of order. A new
            # producer (new producer id) starts over.
            with contextlib.suppress(Exception):
                await self._restart_producer()
        order = [*([current] if current else []), *waiting, *failed, *topics]
        topic = topics.get(order[0]) if order else None
        if error is not None:
            reason = await self._describe(error, topic)
        else:
            reason = await self._diagnose(sorted({topics[i] for i in waiting}), len(waiting))
        self._failing(topic, reason, len(bad))
        return False

    # ---- health and log ------------------------------------------------------------

    def _ok(self, n: int) -> None:
        h = self.health
        h.written += n
        if h.failing_since is not None:
            self.log.info(
                "dead-letter writes recovered; the held batch commits",
                topic=h.topic,
                failed_for_s=round(time.time() - h.failing_since, 1),
                attempts=h.attempts,
            )
        h.failing_since = h.topic = h.reason = None
        h.attempts = h.records = 0

    def _failing(self, topic: str | None, reason: str, records: int) -> None:
        h = self.health
        first = h.failing_since is None
        changed = h.reason != reason
        if first:
            h.failing_since = time.time()
        h.topic, h.reason, h.records = topic, reason, records
        h.attempts += 1
        now = time.monotonic()
        if first:
            self.log.error(
                "dead-letter topic unwritable; holding the batch (nothing after it commits) "
                "until the write succeeds",
                topic=topic,
                reason=reason,
                records=records,
                retry="every few seconds; see /status dead_letter",
            )
            self._logged_at = now
        elif changed or now - self._logged_at >= LOG_INTERVAL:
            self.log.warning(
                "dead-letter topic still unwritable; batch held",
                topic=topic,
                reason=reason,
                records=records,
                attempts=h.attempts,
                failing_for_s=round(time.time() - (h.failing_since or time.time()), 1),
            )
            self._logged_at = now

    @staticmethod
    async def _partitions(producer: AIOKafkaProducer, topic: str, stop: asyncio.Event) -> bool:
        """Wait (at most `ACK_TIMEOUT` s) for the topic's metadata, which auto-creates it where
        the broker does that; False if stopped meanwhile. Raises `UnknownTopicOrPartitionError`."""
        if producer.client.cluster.partitions_for_topic(topic):
            return True  # known already (the usual case): no tasks, no waiting
        task = asyncio.ensure_future(producer.partitions_for(topic))
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {task, stopped}, timeout=ACK_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopped.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if stop.is_set():
                return False
            raise UnknownTopicOrPartitionError()
        task.result()
        return True

    async def _describe(self, e: BaseException, topic: str | None) -> str:
        name = type(e).__name__
        if isinstance(e, UnknownTopicOrPartitionError):
            why = "auto.create.topics.enable=false?"
            clash = await self._colliding(topic) if topic else None
            if clash:
                why = (
                    f"it collides with the existing topic {clash!r}: Kafka refuses topic names "
                    "that differ only in '.' versus '_'"
                )
            return (
                f"topic {topic!r} does not exist and the broker did not create it ({why}): "
                "create it, or point --dlq-topic at a topic that can exist"
            )
        if isinstance(e, TopicAuthorizationFailedError):
            return (
                f"not authorized to write to {topic!r}: grant this client WRITE and DESCRIBE on it"
            )
        if isinstance(e, InvalidTopicError):
            return f"the broker refuses {topic!r} as a topic name: choose another --dlq-topic"
        if isinstance(e, _SIZE_ERRORS):
            return f"{name}: {e} (the topic's limit changed? it is read again and the record resent smaller)"
        text = str(e)
        return f"{name}: {text}" if text and text != name else name

    async def _colliding(self, topic: str) -> str | None:
        """An existing topic whose name equals ``topic``'s once '.' and '_' are the same."""
        with contextlib.suppress(Exception):
            from aiokafka.admin import AIOKafkaAdminClient

            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000
            )
            await asyncio.wait_for(admin.start(), 5)
            try:
                names = await asyncio.wait_for(admin.list_topics(), 5)
            finally:
                await admin.close()
            norm = topic.replace(".", "_")
            for name in sorted(names):
                if name != topic and name.replace(".", "_") == norm:
                    return str(name)
        return None

    async def _diagnose(self, topics: list[str], n: int) -> str:
        """Why sends to ``topics`` are not acknowledged (the producer retries them silently)."""
        base = f"{n} dead letter(s) not acknowledged within {ACK_TIMEOUT:.0f}s"
        try:
            from aiokafka.admin import AIOKafkaAdminClient
            from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000
            )
            await asyncio.wait_for(admin.start(), 5)
            try:
                metas = await asyncio.wait_for(admin.describe_topics(topics), 5)
                resp = await asyncio.wait_for(
                    admin.describe_configs(
                        [ConfigResource(ConfigResourceType.TOPIC, t) for t in topics]
                    ),
                    5,
                )
            finally:
                await admin.close()
        except Exception as e:
            return f"{base}; the broker could not be asked why ({type(e).__name__}: {e})"
        min_isr: dict[str, int] = {}
        for r in resp:
            for res in getattr(r, "resources", []):
                entries = {e[0]: e[1] for e in res[4]}
                with contextlib.suppress(TypeError, ValueError):
                    min_isr[res[3]] = int(entries.get("min.insync.replicas") or 1)
        for meta in metas:
            t = meta.get("topic")
            for p in meta.get("partitions") or []:
                if p.get("leader", -1) < 0:
                    return f"{base}: partition {p['partition']} of {t!r} has no leader"
                isr, need = len(p.get("isr") or []), min_isr.get(t, 1)
                if isr < need:
                    return (
                        f"{base}: partition {p['partition']} of {t!r} has {isr} in-sync replica(s), "
                        f"fewer than its min.insync.replicas={need}, so the broker refuses acks=all "
                        "writes (NotEnoughReplicas): bring replicas back or lower min.insync.replicas"
                    )
        return f"{base}; the producer keeps retrying (broker overloaded, or the leader moving?)"

    # ---- limits ---------------------------------------------------------------------

    async def _limit(self, topic: str) -> Limit:
        """The size limit of dead letters to ``topic``, read from the broker (cached)."""
        cached = self._limits.get(topic)
        if cached is not None and time.monotonic() - cached.read_at < LIMIT_TTL:
            return cached
        limit = await self._read_limit(topic)
        self._limits[topic] = limit
        return limit

    async def _read_limit(self, topic: str) -> Limit:
        try:
            from aiokafka.admin import AIOKafkaAdminClient
            from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

            admin = AIOKafkaAdminClient(
                bootstrap_servers=self.bootstrap_servers, request_timeout_ms=5000
            )
            await asyncio.wait_for(admin.start(), 5)
            try:
                (resp,) = await asyncio.wait_for(
                    admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)]), 5
                )
                (res,) = resp.resources
                entries = {e[0]: e[1] for e in res[4]}
                source = f"topic {topic!r} max.message.bytes"
                if res[0] != 0:  # no such topic yet: it gets the broker's settings when created
                    cluster = await asyncio.wait_for(admin.describe_cluster(), 5)
                    broker = str(cluster["controller_id"])
                    if cluster.get("brokers"):
                        broker = str(cluster["brokers"][0]["node_id"])
                    (resp,) = await asyncio.wait_for(
                        admin.describe_configs([ConfigResource(ConfigResourceType.BROKER, broker)]),
                        5,
                    )
                    (res,) = resp.resources
                    b = {e[0]: e[1] for e in res[4]}
                    entries = {
                        "max.message.bytes": b.get("message.max.bytes"),
                        "compression.type": b.get("compression.type"),
                    }
                    source = "broker message.max.bytes (the topic does not exist yet)"
            finally:
                await admin.close()
            topic_max = int(entries.get("max.message.bytes") or DEFAULT_MAX_MESSAGE_BYTES)
            compression = (entries.get("compression.type") or "producer").lower()
        except Exception as e:
            self.log.warning(
                "could not read the dead-letter topic's size limit; assuming Kafka's default",
                topic=topic,
                error=f"{type(e).__name__}: {e}",
                assumed=DEFAULT_MAX_MESSAGE_BYTES,
            )
            return Limit(min(DEFAULT_MAX_MESSAGE_BYTES, MAX_REQUEST_SIZE))
        max_bytes = min(topic_max, MAX_REQUEST_SIZE)
        margin = SAFETY_BYTES
        if compression in _COMPRESSED:
            # The broker recompresses what we send uncompressed; incompressible bytes grow a
            # little, and the broker checks the size again after recompressing.
            margin += max_bytes // 32 + 1024
        return Limit(max_bytes, margin, source)
