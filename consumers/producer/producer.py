"""Publish tally's native change events to Kafka: `ChangeProducer`.

This is the small producer API other services use to tell tally about their
changes (see `tally.schemas.events.NativeEvent` for the event itself)::

    async with ChangeProducer("127.0.0.1:9092") as p:
        ack = await p.insert("scores", "scores", {"id": 7, "player": "ada", "score": 91})
        await p.update("scores", "scores", {"id": 7, "player": "ada", "score": 95})
        await p.delete("scores", "scores", 7)
        await ack                         # RecordMetadata once the broker acked it
        await p.flush()                   # every event so far acked (raises ProduceError if not)
        n = await p.insert_many("scores", "scores", rows)   # bulk: whole record batches

Each single-event method (`send`, `insert`, `update`, `delete`, `truncate`)
is a coroutine that *enqueues* the event and returns an `asyncio.Future`
resolving to an `aiokafka.structs.RecordMetadata` once the broker acked it
(aiokafka's own ``send`` pattern): ``await (await p.insert(...))`` waits for
one event; ``await p.insert(...)`` in a loop followed by ``await p.flush()``
pipelines many. The enqueue only waits when the producer's buffer for that
partition is full (back-pressure). For bulk loads `send_many` /
`insert_many` / `bulk` skip the per-event futures and build whole record
batches per partition (about 3x faster; see "Throughput").

The key contract (row id → Kafka key → partition) is `tally.schemas.keys`.

Delivery
--------
The producer is idempotent (``enable_idempotence=True``, ``acks="all"``): a
retried batch is never written twice and order per partition is kept (aiokafka
sends one request per broker at a time). A failed delivery shows up on the
event's future and again, for fire-and-forget callers, as a `ProduceError`
from the next `flush` / `stop`.

Tunables
--------
* ``linger_ms`` (default 5) — how long a not-yet-full batch waits for more
  events. Higher: bigger batches, more throughput for a steady stream of
  single sends; lower: less latency per event. The bulk path fills batches
  itself and does not depend on it.
* ``max_batch_size`` (default 256 KiB, aiokafka's default is 16 KiB) — bytes
  per partition batch. Bigger batches mean fewer requests (the broker is sent
  one request at a time) at the cost of memory: at most about two batches per
  partition are buffered. Keep it under the broker's ``message.max.bytes``
  (1 MiB by default).
* ``connect_timeout`` (default 15 s) — how long `start` waits for the broker.
* Any other keyword goes to `aiokafka.AIOKafkaProducer` (``client_id``,
  ``compression_type``, ``request_timeout_ms`` — the delivery timeout —,
  security settings …).

Throughput
----------
Measured on a 2-core machine shared with the local broker, 100k events of
~80-byte rows to a 3-partition topic, until every event is acked:
``insert_many`` ~150k-230k events/s (JSON or msgpack alike), pipelined
single sends (``await p.insert`` per row, one `flush`) ~45k-78k events/s.
Both are CPU-bound in this process; the broker is not the limit.

Scripts without an event loop can use `SyncChangeProducer` (same methods,
blocking, with the event loop in a background thread), or simply
``asyncio.run(main())``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeVar, cast

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError, MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.structs import RecordMetadata

from tally.schemas.config import DEFAULT_BOOTSTRAP_SERVERS, DEFAULT_CONNECT_TIMEOUT
from tally.schemas.errors import ConfigError, InvalidEvent, TallyError, Unreachable
from tally.schemas.events import NativeEvent, NativeOp
from tally.schemas.keys import (
    IdField,
    ProduceFormat,
    encode_event,
    id_fields,
    row_id,
)

__all__ = [
    "DEFAULT_BOOTSTRAP_SERVERS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_BATCH_SIZE",
    "BrokerUnavailable",
    "BulkPublisher",
    "ChangeProducer",
    "ProduceError",
    "SyncChangeProducer",
]

DEFAULT_MAX_BATCH_SIZE: Final = 256 * 1024
_RECORD_OVERHEAD: Final = (
    64  # bytes a record costs in a batch besides its key and value (upper bound)
)

_T = TypeVar("_T")


# ------------------------------------------------------------------ errors


class ProduceError(TallyError):
    """Kafka did not take the events: the broker is unreachable, or a delivery failed or timed out.

    `undelivered` is how many events are known not to have been acked (0 when
    unknown or when the failure came before anything was enqueued).
    """

    def __init__(
        self,
        message: str,
        undelivered: int = 0,
        *,
        advice: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, advice=advice, hint=hint)
        self.undelivered = undelivered


class BrokerUnavailable(ProduceError, Unreachable):
    """No broker answered at the bootstrap address within the connect timeout."""


# ---------------------------------------------------------------- producer


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {text}" if text and text != name else name


class ChangeProducer:
    """Publishes native change events to Kafka (idempotent, ``acks="all"``); see the module docs.

    Use as ``async with ChangeProducer(...) as p:`` or call `start` / `stop`.
    ``format`` is the value encoding (``"json"`` or ``"msgpack"``; keys are
    always JSON). Extra keywords go to `aiokafka.AIOKafkaProducer`, except
    those that would break the contract (``enable_idempotence``, ``acks``,
    key/value serializers).
    """

    def __init__(
        self,
        bootstrap_servers: str | Sequence[str] = DEFAULT_BOOTSTRAP_SERVERS,
        *,
        format: ProduceFormat = "json",
        linger_ms: int = 5,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        **producer_kwargs: Any,
    ) -> None:
        if format not in ("json", "msgpack"):
            raise ConfigError(f"unknown event format {format!r}; use 'json' or 'msgpack'")
        if producer_kwargs.pop("enable_idempotence", True) is not True:
            raise ConfigError(
                "ChangeProducer is always idempotent; do not pass enable_idempotence=False"
            )
        if producer_kwargs.pop("acks", "all") not in ("all", -1):
            raise ConfigError(
                "ChangeProducer always uses acks='all'; do not pass another acks value"
            )
        for name in ("key_serializer", "value_serializer", "transactional_id"):
            if producer_kwargs.get(name) is not None:
                raise ConfigError(
                    f"ChangeProducer does not support {name}: it encodes keys and values itself"
                )
        self._servers = bootstrap_servers
        self._format: ProduceFormat = format
        self._connect_timeout = connect_timeout
        self._partitioner = producer_kwargs.get("partitioner") or DefaultPartitioner()
        self._max_request_size = int(producer_kwargs.get("max_request_size", 1048576))
        self._kwargs: dict[str, Any] = {
            **producer_kwargs,
            "bootstrap_servers": bootstrap_servers,
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": linger_ms,
            "max_batch_size": max_batch_size,
        }
        self._producer: AIOKafkaProducer | None = None
        self._partition_cache: dict[str, tuple[Any, list[int]]] = {}
        self._failure: BaseException | None = None
        self._failed = 0

    # ------------------------------------------------------------ lifecycle

    @property
    def servers(self) -> str:
        """The bootstrap address, as text (for messages)."""
        return self._servers if isinstance(self._servers, str) else ",".join(self._servers)

    @property
    def format(self) -> ProduceFormat:
        """The value encoding: ``"json"`` or ``"msgpack"``."""
        return self._format

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self) -> None:
        """Connect to the cluster; `BrokerUnavailable` if no broker answers within ``connect_timeout``."""
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(**self._kwargs)
        try:
            await asyncio.wait_for(producer.start(), self._connect_timeout)
        except (TimeoutError, KafkaError, OSError) as exc:
            await producer.stop()
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {self._connect_timeout:g}s"
            elif isinstance(exc, KafkaConnectionError):
                reason = "no broker answered (connection failed)"
            else:
                reason = _describe(exc)
            raise BrokerUnavailable(
                f"cannot connect to Kafka at {self.servers}: {reason}",
                advice="check the address and that the broker is running (the local one: "
                "scripts/kafka start)",
                hint="check --bootstrap-servers (or $TALLY_BOOTSTRAP_SERVERS) and that the "
                "broker is running (the local one: scripts/kafka start)",
            ) from exc
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer

    async def stop(self) -> None:
        """Deliver everything enqueued, then close; `ProduceError` if some events were not delivered."""
        producer = self._producer
        if producer is None:
            return
        try:
            await self.flush()
        finally:
            self._producer = None
            await producer.stop()

    async def __aenter__(self) -> ChangeProducer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            await self.stop()
            return
        with contextlib.suppress(ProduceError, KafkaError):  # already failing: do not mask it
            await self.stop()

    def _started(self) -> AIOKafkaProducer:
        producer = self._producer
        if producer is None:
            raise ProduceError(
                "the ChangeProducer is not started; use 'async with' or await start() first"
            )
        return producer

    async def partitions(self, topic: str) -> list[int]:
        """The topic's partition ids, sorted (fetches metadata; auto-creates the topic if the broker does)."""
        producer = self._started()
        # Cached until the next metadata refresh (a private aiokafka stamp; without it, no cache).
        stamp = getattr(producer.client.cluster, "_last_successful_refresh_ms", None)
        cached = self._partition_cache.get(topic)
        if cached is not None and stamp is not None and cached[0] == stamp:
            return cached[1]
        try:
            parts = sorted(await producer.partitions_for(topic))
        except KafkaError as exc:
            raise ProduceError(
                f"no metadata for topic {topic!r} at {self.servers} ({_describe(exc)}); does the topic exist?"
            ) from exc
        self._partition_cache[topic] = (stamp, parts)
        return parts

    # --------------------------------------------------------- single events

    def _on_delivery(self, fut: asyncio.Future[RecordMetadata]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()  # also marks it retrieved: no "never retrieved" warnings
        if exc is not None:
            self._failed += 1
            if self._failure is None:
                self._failure = exc

    async def _send_record(
        self, topic: str, key: bytes, value: bytes | None
    ) -> asyncio.Future[RecordMetadata]:
        producer = self._started()
        parts = await self.partitions(topic)
        partition = self._partitioner(key, parts, parts)
        try:
            fut = await producer.send(topic, value, key=key, partition=partition)
        except MessageSizeTooLargeError as exc:
            raise InvalidEvent(f"the event for key {key[:80]!r} is too large: {exc}") from None
        except KafkaError as exc:
            raise ProduceError(
                f"cannot enqueue an event for topic {topic!r}: {_describe(exc)}"
            ) from exc
        fut.add_done_callback(self._on_delivery)
        return cast("asyncio.Future[Any]", fut)

    async def send(
        self, topic: str, event: NativeEvent, *, id_field: IdField = "id"
    ) -> asyncio.Future[RecordMetadata]:
        """Enqueue one native event; the returned future resolves once the broker acked it.

        Without an ``id`` the event's id is read from its row image via `id_field`.
        """
        key, value = encode_event(event, format=self._format, id_field=id_field)
        return await self._send_record(topic, key, value)

    async def _row_event(
        self,
        topic: str,
        op: NativeOp,
        table: str,
        row: Mapping[str, Any],
        id: Any,
        id_field: IdField,
        position: str | int | None,
        ts_ms: int | None,
    ) -> asyncio.Future[RecordMetadata]:
        if not isinstance(row, Mapping):
            raise InvalidEvent(
                f"{op} for table {table!r}: the row must be a mapping, got {type(row).__name__}"
            )
        if id is None:
            id = row_id(row, id_field if id_field.__class__ is not str else (id_field,))
        after = row if row.__class__ is dict else dict(row)
        event = NativeEvent(table, op, id, after=after, position=position, ts_ms=ts_ms)
        return await self.send(topic, event)

    async def insert(
        self,
        topic: str,
        table: str,
        row: Mapping[str, Any],
        *,
        id: Any = None,
        id_field: IdField = "id",
        position: str | int | None = None,
        ts_ms: int | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        """Enqueue an insert of `row`; its id is `id`, else ``row[id_field]`` (a tuple for several fields)."""
        return await self._row_event(topic, "insert", table, row, id, id_field, position, ts_ms)

    async def update(
        self,
        topic: str,
        table: str,
        row: Mapping[str, Any],
        *,
        id: Any = None,
        id_field: IdField = "id",
        position: str | int | None = None,
        ts_ms: int | None = None,
    ) -> asyncio.Future[RecordMetadata]:
        """Enqueue an update: `row` is the full new row image (the trigger treats it like an insert; the op only feeds drift signals)."""
        return await self._row_event(topic, "update", table, row, id, id_field, position, ts_ms)

    async def delete(
        self,
        topic: str,
        table: str,
        id: Any = None,
        *,
        before: Mapping[str, Any] | None = None,
        id_field: IdField = "id",
        position: str | int | None = None,
        ts_ms: int | None = None,
        tombstone: bool = False,
    ) -> asyncio.Future[RecordMetadata]:
        """Enqueue a delete of the row `id` (or of the row `before`, whose id is read via `id_field`).

        ``tombstone=True`` also sends a null-value record with the same key,
        so a compacted topic can forget the row (see the module docs); the
        future is then the tombstone's, acked after the delete's.
        """
        if id is None:
            if before is None:
                raise InvalidEvent(
                    f"delete for table {table!r} needs the row id (or the 'before' row)"
                )
            id = row_id(before, id_field)
        event = NativeEvent(
            table,
            "delete",
            id,
            before=None if before is None else dict(before),
            position=position,
            ts_ms=ts_ms,
        )
        key, value = encode_event(event, format=self._format)
        fut = await self._send_record(topic, key, value)
        if tombstone:
            fut = await self._send_record(topic, key, None)
        return fut

    async def truncate(
        self, topic: str, table: str, *, position: str | int | None = None, ts_ms: int | None = None
    ) -> asyncio.Future[RecordMetadata]:
        """Enqueue a truncate: every row of `table` is gone (keyed ``{"truncate": TABLE}``)."""
        return await self.send(
            topic, NativeEvent(table, "truncate", position=position, ts_ms=ts_ms)
        )

    async def flush(self) -> None:
        """Wait until every enqueued event is acked or failed.

        Raises `ProduceError` for the single-event failures since the last
        flush (whether or not their futures were awaited); the count resets.
        """
        producer = self._producer
        if producer is not None:
            await producer.flush()
        failure, failed = self._failure, self._failed
        if failure is not None:
            self._failure, self._failed = None, 0
            raise ProduceError(
                f"{failed:,} event(s) were not delivered to Kafka at {self.servers}: {_describe(failure)}",
                failed,
            ) from failure

    # ------------------------------------------------------------------ bulk

    def bulk(self, topic: str, *, id_field: IdField = "id") -> BulkPublisher:
        """A `BulkPublisher` for `topic`: whole record batches per partition, no per-event futures."""
        self._started()
        return BulkPublisher(self, topic, id_field=id_field)

    async def send_many(
        self, topic: str, events: Iterable[NativeEvent], *, id_field: IdField = "id"
    ) -> int:
        """Publish many events in order (per row) and wait until all are acked; returns how many.

        Raises `InvalidEvent` at the first event that cannot be encoded (the
        events before it are still published) and `ProduceError` when Kafka
        did not ack them all.
        """
        async with self.bulk(topic, id_field=id_field) as pub:
            for event in events:
                await pub.add(event)
        return pub.count

    async def insert_many(
        self,
        topic: str,
        table: str,
        rows: Iterable[Mapping[str, Any]],
        *,
        op: Literal["insert", "update"] = "insert",
        id_field: IdField = "id",
    ) -> int:
        """Publish one insert (or update) per row, ids read via `id_field`; returns how many were acked."""
        if op not in ("insert", "update"):
            raise ConfigError(f"insert_many publishes inserts or updates, not {op!r}")
        fields = id_fields(id_field)

        def events() -> Iterable[NativeEvent]:
            for row in rows:
                after = row if row.__class__ is dict else dict(row)
                yield NativeEvent(table, op, row_id(after, fields), after=after)

        return await self.send_many(topic, events())


class BulkPublisher:
    """Publishes many events to one topic as whole record batches (aiokafka's batch API).

    Events are encoded, partitioned by key (the same partitioner as single
    sends) and appended to one open batch per partition; a full batch is handed
    to the producer, which sends it when the broker is free. `add` waits only
    for that hand-over (back-pressure: about two batches per partition are
    buffered). `submit` hands over the partly filled batches now (call it when
    the source goes quiet, to bound latency); `close` — or leaving the
    ``async with`` block — submits everything and waits for every ack.

    `count` is how many events were added, `acked` how many the broker acked
    so far. Get one from `ChangeProducer.bulk`.

    Order: an added event reaches the producer when its batch is handed over,
    so do not send single events (`ChangeProducer.insert` …) for the same rows
    while a publisher holds unsubmitted events for them: `submit` or `close`
    it first (`send_many` / `insert_many` close theirs before returning).
    """

    def __init__(self, owner: ChangeProducer, topic: str, *, id_field: IdField = "id") -> None:
        self._owner = owner
        self._producer = owner._started()
        self._topic = topic
        self._fields = id_fields(id_field)
        self._format = owner.format
        self._partitioner = owner._partitioner
        self._max_record = owner._max_request_size - _RECORD_OVERHEAD
        self._parts: list[int] | None = None
        self._builders: dict[int, Any] = {}
        self._inflight: list[tuple[asyncio.Future[Any], int]] = []
        self._closed = False
        self.count = 0
        self.acked = 0

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def pending(self) -> bool:
        """Whether partly filled batches wait for `submit` / `close`."""
        return bool(self._builders)

    async def add(self, event: NativeEvent) -> None:
        """Encode and add one event (see `encode_event`)."""
        key, value = encode_event(event, format=self._format, id_field=self._fields)
        await self.add_encoded(key, value)

    async def add_encoded(self, key: bytes, value: bytes | None) -> None:
        """Add one already encoded record; `key` must follow the key contract (see `encode_event`)."""
        if self._closed:
            raise ProduceError(f"the bulk publisher for topic {self._topic!r} is closed")
        parts = self._parts
        if parts is None:
            parts = self._parts = await self._owner.partitions(self._topic)
        if len(key) + (0 if value is None else len(value)) > self._max_record:
            raise InvalidEvent(
                f"the event for key {key[:80]!r} is {len(key) + len(value or b''):,} bytes encoded, more "
                f"than the producer's max_request_size ({self._max_record + _RECORD_OVERHEAD:,})"
            )
        partition = self._partitioner(key, parts, parts)
        builder = self._builders.get(partition)
        if builder is None:
            builder = self._builders[partition] = self._producer.create_batch()
        if builder.append(key=key, value=value, timestamp=None) is None:
            await self._submit(partition, builder)
            builder = self._builders[partition] = self._producer.create_batch()
            builder.append(key=key, value=value, timestamp=None)  # an empty batch takes any record
        self.count += 1

    async def _submit(self, partition: int, builder: Any) -> None:
        del self._builders[partition]
        builder.close()
        n = builder.record_count()
        try:
            fut = await self._producer.send_batch(builder, self._topic, partition=partition)
        except KafkaError as exc:
            raise ProduceError(
                f"cannot enqueue {n:,} events for topic {self._topic!r} partition {partition}: "
                f"{_describe(exc)}",
                n,
            ) from exc
        inflight = self._inflight
        inflight.append((fut, n))
        if len(inflight) > 8 and inflight[0][0].done():
            self._reap()

    def _reap(self) -> None:
        """Account for the acked batches; raise for a failed one (fail fast)."""
        still: list[tuple[asyncio.Future[Any], int]] = []
        failure: BaseException | None = None
        lost = 0
        for fut, n in self._inflight:
            if not fut.done():
                still.append((fut, n))
                continue
            exc = fut.exception()
            if exc is None:
                self.acked += n
            else:
                failure = failure or exc
                lost += n
        self._inflight = still
        if failure is not None:
            self._closed = True
            for fut, n in still:  # nobody will await these now; consume their outcome
                lost += n
                fut.add_done_callback(_consume)
            self._inflight = []
            raise self._failed(failure, lost)

    def _failed(self, exc: BaseException, undelivered: int) -> ProduceError:
        return ProduceError(
            f"Kafka at {self._owner.servers} did not ack events for topic {self._topic!r} "
            f"({self.acked:,} of {self.count:,} acked): {_describe(exc)}",
            undelivered,
        )

    async def submit(self) -> None:
        """Hand the partly filled batches to the producer now (they are sent when the broker is free)."""
        for partition, builder in list(self._builders.items()):
            await self._submit(partition, builder)

    async def close(self) -> int:
        """Submit every batch and wait for every ack; returns `count`. `ProduceError` if some failed."""
        if self._closed:
            return self.count
        self._closed = True
        await self.submit()
        inflight, self._inflight = self._inflight, []
        results = await asyncio.gather(*(fut for fut, _ in inflight), return_exceptions=True)
        first: BaseException | None = None
        lost = 0
        for (_fut, n), result in zip(inflight, results, strict=True):
            if isinstance(result, BaseException):
                lost += n
                first = first or result
            else:
                self.acked += n
        if first is not None:
            raise self._failed(first, lost)
        return self.count

    async def __aenter__(self) -> BulkPublisher:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            await self.close()
        elif isinstance(exc, Exception) and not isinstance(exc, ProduceError):
            # The caller's loop failed (an invalid event …): what was added before it was
            # valid, so it is still published; the caller's error is the one that propagates.
            with contextlib.suppress(ProduceError):
                await self.close()
        else:  # cancelled, or Kafka already failed: do not wait for more
            self._closed = True


def _consume(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


# ------------------------------------------------------------- sync facade


def _copy_future(cf: concurrent.futures.Future[Any], fut: asyncio.Future[Any]) -> None:
    if fut.cancelled():
        cf.cancel()
    elif fut.exception() is not None:
        cf.set_exception(fut.exception())
    else:
        cf.set_result(fut.result())


class SyncChangeProducer:
    """`ChangeProducer` for plain scripts: the same methods, blocking, loop in a background thread.

    ::

        with SyncChangeProducer("127.0.0.1:9092") as p:
            p.insert("scores", "scores", {"id": 1, "score": 10})   # enqueued; returns a Future
            p.insert_many("scores", "scores", rows)                # blocks until acked
        # leaving the block flushes: every event acked, or ProduceError

    Single-event methods return a `concurrent.futures.Future` resolving to the
    `RecordMetadata`. Each call crosses threads, so prefer `send_many` /
    `insert_many` for bulk.
    """

    def __init__(
        self, bootstrap_servers: str | Sequence[str] = DEFAULT_BOOTSTRAP_SERVERS, **kwargs: Any
    ) -> None:
        self._async = ChangeProducer(bootstrap_servers, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise ProduceError(
                "the SyncChangeProducer is not started; use 'with' or call start() first"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def start(self) -> None:
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="tally-producer", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._run(self._async.start())
        except BaseException:
            self._shutdown()
            raise

    def _shutdown(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join()
            loop.close()

    def stop(self) -> None:
        """Deliver everything, close, stop the thread; `ProduceError` if some events were not delivered."""
        if self._loop is None:
            return
        try:
            self._run(self._async.stop())
        finally:
            self._shutdown()

    def __enter__(self) -> SyncChangeProducer:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc is None:
            self.stop()
            return
        with contextlib.suppress(ProduceError, KafkaError):
            self.stop()

    async def _enqueue(
        self, coro: Coroutine[Any, Any, asyncio.Future[RecordMetadata]]
    ) -> concurrent.futures.Future[RecordMetadata]:
        fut = await coro
        cf: concurrent.futures.Future[RecordMetadata] = concurrent.futures.Future()
        cf.set_running_or_notify_cancel()
        fut.add_done_callback(lambda f: _copy_future(cf, f))
        return cf

    def send(
        self, topic: str, event: NativeEvent, *, id_field: IdField = "id"
    ) -> concurrent.futures.Future[RecordMetadata]:
        return self._run(self._enqueue(self._async.send(topic, event, id_field=id_field)))

    def insert(
        self, topic: str, table: str, row: Mapping[str, Any], **kwargs: Any
    ) -> concurrent.futures.Future[RecordMetadata]:
        return self._run(self._enqueue(self._async.insert(topic, table, row, **kwargs)))

    def update(
        self, topic: str, table: str, row: Mapping[str, Any], **kwargs: Any
    ) -> concurrent.futures.Future[RecordMetadata]:
        return self._run(self._enqueue(self._async.update(topic, table, row, **kwargs)))

    def delete(
        self, topic: str, table: str, id: Any = None, **kwargs: Any
    ) -> concurrent.futures.Future[RecordMetadata]:
        return self._run(self._enqueue(self._async.delete(topic, table, id, **kwargs)))

    def truncate(
        self, topic: str, table: str, **kwargs: Any
    ) -> concurrent.futures.Future[RecordMetadata]:
        return self._run(self._enqueue(self._async.truncate(topic, table, **kwargs)))

    def flush(self) -> None:
        self._run(self._async.flush())

    def send_many(
        self, topic: str, events: Iterable[NativeEvent], *, id_field: IdField = "id"
    ) -> int:
        return self._run(self._async.send_many(topic, events, id_field=id_field))

    def insert_many(
        self, topic: str, table: str, rows: Iterable[Mapping[str, Any]], **kwargs: Any
    ) -> int:
        return self._run(self._async.insert_many(topic, table, rows, **kwargs))
