"""Patching an aggregate while its consumer is live: the patch runs inside the consumer.

Why inside the consumer, and why this rule
------------------------------------------
A reconcile reads the source of truth at one moment (a Postgres snapshot, a
topic's end) and the aggregate a little later, while the live stream keeps
applying events. Writing the source's row for an id that a live event has
meanwhile changed would overwrite a newer change with an older read. Per-row
versions would need a version column in every table and in every event; a
pause would stop the live path. Instead:

1. ``tally reconcile --patch --url`` opens a **patch session** in the consumer
   (`PatchSessions.begin`). From then on the consumer records every id its
   live stream writes for that aggregate (and whether a truncate happened).
   It also notes the topics' end offsets at that moment.
2. Only then is the source read (so its snapshot is taken after the session
   began), diffed against the data dir (read-only), and each fix sent to the
   consumer in chunks (`PatchSessions.apply`).
3. The consumer applies a chunk between two batches, in its own event loop
   (so never inside a batch), through `Aggregate.apply_many` — the write path
   events use — **skipping every id a live event wrote since the session
   began**: that event carries the row's full image from a change at least as
   new as the session, so the live stream is authoritative for that id, and
   the skip is reported (``skipped_live``). A truncate during the session
   refuses further chunks (409: run it again).
4. A chunk is applied only once the live stream has read up to the end offsets
   noted at step 1, so events older than the source snapshot that were
   already on the topic cannot land after the patch and undo it.

What is not covered: an event whose database change committed before the
snapshot but that reached Kafka after step 1 (CDC latency), when it is not the
row's latest change, can still land after the patch; the next reconcile (or
the next change of that row) repairs it. Snapshot files are refused for live
patching: their moment is unknown, so rule 3 cannot hold.

Sessions live in memory (a consumer restart ends them: the client gets 404
and runs again); each holds one entry per id changed live while it is open;
an idle session expires after `SESSION_TTL` seconds.

Wire format of a chunk: ``application/msgpack``, ``{"changes": [[eid, key,
namespace, sum] | [eid], ...]}`` — encoded id, key and namespace bytes as
produced by `tally.engine.encode_key` (the client computes them with the same
definition: it refuses to send when its definition's fingerprint differs from
the one the session reports), ``[eid]`` alone meaning "absent". A sum is a msgpack int
or float, or a string of a Decimal's digits (msgspec's encoding of a Decimal; no sum is
ever a string otherwise).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiokafka.structs import TopicPartition

from tally.engine import TallyError
from tally.engine.reconcile import Change
from tally.engine.triggers import CLEAR, UPSERT, Op

if TYPE_CHECKING:
    from tally.consumers.runtime.streams import Stream
    from tally.engine import Store, TableAggregate


class PatchHost(Protocol):
    """What patch sessions need of the consumer process (`ConsumerProcess` has it)."""

    @property
    def by_name(self) -> dict[str, TableAggregate]: ...
    @property
    def live(self) -> Stream: ...
    @property
    def store(self) -> Store: ...
    @property
    def table_topics(self) -> dict[str, str]: ...
    @property
    def log(self) -> Any: ...


__all__ = [
    "MAX_SESSIONS",
    "SESSION_TTL",
    "PatchError",
    "PatchHost",
    "PatchSession",
    "PatchSessions",
]

SESSION_TTL = 600.0
"""Seconds an idle patch session lives."""
MAX_SESSIONS = 8
CATCH_UP_WAIT = 10.0
"""Seconds a chunk waits for the live stream to reach the session's offsets before a 503."""


class PatchError(TallyError):
    """A patch session refused a request: ``status`` and ``code`` for the HTTP answer."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details


@dataclass
class PatchSession:
    id: str
    aggregate: str
    physical: str
    fingerprint: str
    wait_for: dict[TopicPartition, int]
    last_used: float = field(default_factory=time.monotonic)
    touched: set[bytes] = field(default_factory=set)
    truncated: bool = False
    chunks: int = 0
    received: int = 0
    changed: int = 0
    skipped_live: int = 0

    def totals(self) -> dict[str, Any]:
        return {
            "session": self.id,
            "aggregate": self.aggregate,
            "generation": self.physical,
            "chunks": self.chunks,
            "received": self.received,
            "changed": self.changed,
            "skipped_live": self.skipped_live,
            "touched_live": len(self.touched),
            "truncated": self.truncated,
        }


class PatchSessions:
    """The consumer's open patch sessions (see the module notes for the rule they enforce)."""

    def __init__(self, process: PatchHost) -> None:
        self.process = process
        self.sessions: dict[str, PatchSession] = {}
        self._by_physical: dict[str, list[PatchSession]] = {}

    @property
    def active(self) -> bool:
        return bool(self.sessions)

    # ---- the live path's hook (runs inside the batch, synchronously) --------------------

    def note(self, ops: Iterable[Op]) -> None:
        """Record the ids a live batch writes for aggregates with an open session. O(ops)."""
        by_phys = self._by_physical
        for kind, agg, arg, _, _ in ops:
            sessions = by_phys.get(agg.name)
            if not sessions:
                continue
            if kind == CLEAR:
                for s in sessions:
                    s.truncated = True
                continue
            eid = arg.id if kind == UPSERT else arg
            for s in sessions:
                s.touched.add(eid)

    # ---- sessions -------------------------------------------------------------------------

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, s in list(self.sessions.items()):
            if now - s.last_used > SESSION_TTL:
                self._drop(sid)

    def _drop(self, sid: str) -> PatchSession | None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            lst = self._by_physical.get(s.physical, [])
            if s in lst:
                lst.remove(s)
            if not lst:
                self._by_physical.pop(s.physical, None)
        return s

    def _live_physical(self, name: str) -> str:
        p = self.process
        if name not in p.by_name:
            raise PatchError(
                404,
                "unknown_aggregate",
                f"no aggregate named {name!r}; known: {', '.join(sorted(p.by_name))}",
            )
        target = p.live.targets.get(name)
        g = p.store.generation(name)
        if target is None or g is None or g.active != target[1]:
            raise PatchError(
                409,
                "not_live",
                f"aggregate {name!r} is not fed by the live stream right now (it is being built or rebuilt "
                "by replay); reconcile after it is ready",
            )
        if g.building is not None:
            raise PatchError(
                409,
                "rebuilding",
                f"aggregate {name!r} is being rebuilt (generation {g.building!r}); its current generation "
                "is frozen until the switch, so patch after the rebuild finishes",
            )
        return target[1]

    async def begin(self, name: str) -> PatchSession:
        """Open a session: live writes to ``name`` are recorded from now on."""
        self._expire()
        physical = self._live_physical(name)
        if len(self.sessions) >= MAX_SESSIONS:
            raise PatchError(
                429,
                "too_many_sessions",
                f"{MAX_SESSIONS} patch sessions are open; wait for one to end",
            )
        p = self.process
        live = p.live
        if live.consumer is None or not live.tps:
            raise PatchError(
                503,
                "not_ready",
                "the consumer has not been assigned its partitions yet; retry shortly",
            )
        d = p.by_name[name]
        sid = secrets.token_hex(8)
        # Register first, then read the end offsets: a live batch committed while we await
        # them is already recorded, so nothing slips between the two.
        s = PatchSession(sid, name, physical, d.fingerprint, {})
        self.sessions[sid] = s
        self._by_physical.setdefault(physical, []).append(s)
        tps = [tp for tp in live.tps if tp.topic == p.table_topics[d.table]]
        try:
            ends = await asyncio.wait_for(live.consumer.end_offsets(tps), 15)
        except Exception as e:
            self._drop(sid)
            raise PatchError(
                503,
                "broker_unreachable",
                f"cannot read the topics' end offsets: {e or type(e).__name__}",
            ) from None
        s.wait_for = dict(ends)
        p.log.info("patch session opened", aggregate=name, session=sid, generation=physical)
        return s

    def get(self, name: str, sid: str) -> PatchSession:
        self._expire()
        s = self.sessions.get(sid)
        if s is None or s.aggregate != name:
            raise PatchError(
                404,
                "unknown_session",
                f"no patch session {sid!r} for {name!r} (expired after {SESSION_TTL:.0f}s idle, or the consumer "
                "restarted): run the reconcile again",
            )
        s.last_used = time.monotonic()
        return s

    def lag_behind(self, s: PatchSession) -> int:
        offsets = self.process.live.offsets
        return sum(max(0, end - offsets.get(tp, 0)) for tp, end in s.wait_for.items())

    async def apply(self, name: str, sid: str, changes: Sequence[Change]) -> dict[str, Any]:
        """Apply one chunk of fixes, skipping ids written live since the session began."""
        s = self.get(name, sid)
        deadline = time.monotonic() + CATCH_UP_WAIT
        while (behind := self.lag_behind(s)) > 0:
            if time.monotonic() >= deadline:
                raise PatchError(
                    503,
                    "catching_up",
                    f"the live stream is {behind} events short of the offsets at the session's start; "
                    "the chunk was not applied, send it again shortly",
                    behind=behind,
                )
            await asyncio.sleep(0.05)
        s = self.get(name, sid)
        if s.truncated:
            raise PatchError(
                409,
                "truncated",
                f"table of {name!r} was truncated during the reconcile: run it again",
            )
        if self._live_physical(name) != s.physical:
            raise PatchError(
                409,
                "generation_switched",
                f"{name!r} switched generations during the reconcile: run it again",
            )
        store = self.process.store
        if store.in_batch:  # never: batches commit without awaiting; guard the invariant anyway
            raise PatchError(503, "busy", "a batch is being committed; send the chunk again")
        touched = s.touched
        todo = {eid: item for eid, item in changes if eid not in touched}
        skipped = len(changes) - len(todo)
        with store.batch():
            changed = store.aggregate(s.physical).apply_many(todo)
        s.chunks += 1
        s.received += len(changes)
        s.changed += changed
        s.skipped_live += skipped
        return {"received": len(changes), "changed": changed, "skipped_live": skipped}

    def end(self, name: str, sid: str) -> dict[str, Any]:
        s = self.get(name, sid)
        self._drop(sid)
        totals = s.totals()
        self.process.log.info("patch session closed", **totals)
        return totals
