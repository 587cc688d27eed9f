"""`tally reconcile --url` against a deployment: the diff and its fixes, partition by partition.

No member holds the whole aggregate, so the reconcile reads it from all of them and sends each
fix to the partition its row belongs to, on the member that owns that partition:

* **Reading.** The members' `/status` gives the ownership map. Each partition's id index is
  paged in id order (the ``ids`` call of `tally.consumers.cluster.transport`, a scan its member
  holds open), and the pages are merged into the one id-ordered stream `engine.reconcile.diff`
  reads, each entry tagged with its partition.
* **Where a fix goes.** A row the aggregate holds (a wrong or an extra item) is fixed in the
  partition that holds it. A row it lacks (missing) goes to the partition its events would
  land in: Kafka's default partitioner over the record key the topic uses, learned from a
  record each partition's task consumed (`tally.schemas.keys.learn_key_shape`: tally's
  producer key, or Debezium's key with or without its schema). When no partition has learned
  it (nothing consumed since the members started) or the id does not fit it, the row is
  left out and counted in ``unplaced``, never put in a partition that could be wrong.
* **Live patching.** With ``patch=True`` every partition's task opens its own patch session
  (`tally.consumers.runtime.patches`) before the source is read, and applies its fixes under
  that session's rule (ids written live meanwhile are left to the live stream). A partition
  that moves during the reconcile refuses further fixes: run it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

from tally.consumers.cluster.transport import Call, PartitionRefused, Peers, encode_args
from tally.engine import Prepared, TallyError
from tally.engine.keys import decode_key
from tally.engine.reconcile import Change, encode_fixes
from tally.engine.state import IdEntry
from tally.schemas.keys import KeyShape

__all__ = ["DeploymentReconcile", "is_member"]

PAGE = 5_000
"""Id entries per page of a partition's scan."""
CHUNK = 2_000
"""Fixes per chunk sent to one partition."""
CATCH_UP_WAIT = 600.0
"""Seconds a chunk may keep being refused with ``catching_up`` before the reconcile fails."""


def is_member(status: dict[str, Any]) -> bool:
    """Whether a consumer's /status is a member's (of a deployment)."""
    return isinstance(status.get("member"), dict)


class DeploymentReconcile:
    """The aggregate of a deployment, read and patched through its members.

    ``status``: one member's ``/status`` document (its ``member.members`` is the map used).
    Use `id_entries` as the ``aggregate`` argument's stream for `diff` (see `aggregate`), and
    the instance as its ``on_change`` when patching (`begin` first, `close` at the end).
    """

    def __init__(
        self,
        status: dict[str, Any],
        name: str,
        id_fields: Sequence[str],
        *,
        fingerprint: str = "",
        timeout: float = 60.0,
        batch_size: int = CHUNK,
    ) -> None:
        if not is_member(status):
            raise TallyError("not a member of a deployment (its /status has no member section)")
        entry = next((a for a in status.get("aggregates") or [] if a.get("name") == name), None)
        if entry is None:
            raise TallyError(f"the deployment has no aggregate {name!r}")
        self.name = name
        self.fingerprint = fingerprint
        """The definition the reconcile runs: partitions serving another one refuse."""
        self.topic = str(entry["topic"])
        self.id_fields = tuple(id_fields)
        self.batch_size = max(1, batch_size)
        owners: dict[int, str] = {}
        for m in status["member"].get("members") or []:
            for p in m.get("partitions") or []:
                if p.get("topic") == self.topic and m.get("url"):
                    owners[int(p["partition"])] = str(m["url"])
        if not owners or sorted(owners) != list(range(max(owners) + 1)):
            raise TallyError(
                f"the members' map does not give every partition of {self.topic!r} to a member "
                f"(owned: {sorted(owners)}): the group is rebalancing, retry shortly"
            )
        self.owners = owners
        self.partitions = len(owners)
        self.peers = Peers(timeout)
        self.loop = asyncio.new_event_loop()
        self.sessions: dict[int, str] = {}
        self.generations: set[str] = set()
        self.fingerprints: set[str] = set()
        self.shape: KeyShape | None = None
        self.pending: dict[int, list[Change]] = {}
        self.recent: deque[tuple[bytes, int]] = deque(maxlen=4)
        self.changed = 0
        self.skipped_live = 0
        self.unplaced = 0
        self.unplaced_examples: list[Any] = []

    # ---- plumbing ------------------------------------------------------------------------

    def _call(self, p: int, method: str, *args: Any) -> Any:
        call = Call(self.name, self.topic, p, method, encode_args(args), self.fingerprint)
        return self.loop.run_until_complete(self.peers.call(self.owners[p], call))

    def _all(self, method: str, args: dict[int, tuple[Any, ...]]) -> dict[int, Any]:
        async def every() -> list[Any]:
            calls = [
                self.peers.call(
                    self.owners[p],
                    Call(self.name, self.topic, p, method, encode_args(a), self.fingerprint),
                )
                for p, a in args.items()
            ]
            return list(await asyncio.gather(*calls))

        return dict(zip(args, self.loop.run_until_complete(every()), strict=True))

    # ---- reading -------------------------------------------------------------------------

    @property
    def physical(self) -> str:
        """The generation(s) the partitions' sessions patch (for the report)."""
        return ",".join(sorted(self.generations)) or self.name

    def _partition_entries(self, p: int) -> Iterator[tuple[bytes, int, IdEntry]]:
        scan: str | None = None
        while True:
            scan, page, done = self._call(p, "ids", scan, PAGE)
            for eid, ns, key, s in page:
                yield eid, p, IdEntry(ns, key, s)
            if done:
                return

    def id_entries(self) -> Iterator[tuple[bytes, IdEntry]]:
        """Every partition's id entries, merged in id order (what `diff` reads). O(n log P)."""
        streams = [self._partition_entries(p) for p in range(self.partitions)]
        for eid, p, e in heapq.merge(*streams, key=lambda x: x[0]):
            self.recent.append((eid, p))
            yield eid, e

    # ---- patching ------------------------------------------------------------------------

    def begin(self) -> dict[str, Any]:
        """Open a patch session on every partition (before the source is read)."""
        answers = self._all("patch_begin", {p: () for p in range(self.partitions)})
        for p, a in answers.items():
            self.sessions[p] = str(a["session"])
            self.generations.add(str(a["generation"]))
            self.fingerprints.add(str(a["fingerprint"]))
            shape = a.get("shape")
            if shape is not None and self.shape is None:
                kind, fields, prefix, suffix = shape
                self.shape = KeyShape(str(kind), tuple(fields), bytes(prefix), bytes(suffix))
        return {"fingerprint": ",".join(sorted(self.fingerprints))}

    def _partition_of(self, eid: bytes) -> int | None:
        for seen, p in self.recent:
            if seen == eid:
                return p
        if self.shape is None:
            return None
        try:
            return self.shape.partition(decode_key(eid), self.id_fields, self.partitions)
        except (ValueError, TypeError, TallyError):
            return None

    def __call__(self, eid: bytes, item: Prepared | None) -> None:
        """`diff`'s ``on_change``: queue the fix for its row's partition."""
        p = self._partition_of(eid)
        if p is None:
            self.unplaced += 1
            if len(self.unplaced_examples) < 5:
                self.unplaced_examples.append(decode_key(eid))
            return
        queue = self.pending.setdefault(p, [])
        queue.append((eid, item))
        if len(queue) >= self.batch_size:
            self._flush(p)

    def _flush(self, p: int) -> None:
        changes = self.pending.pop(p, [])
        if not changes:
            return
        deadline = self.loop.time() + CATCH_UP_WAIT
        while True:
            try:
                r = self._call(p, "patch_apply", self.sessions[p], encode_fixes(changes))
                break
            except PartitionRefused as e:
                if e.code != "catching_up" or self.loop.time() >= deadline:
                    raise
                self.loop.run_until_complete(asyncio.sleep(0.2))
        self.changed += int(r["changed"])
        self.skipped_live += int(r["skipped_live"])

    def close(self) -> int:
        """Send what is queued and end every session; the ids changed."""
        for p in list(self.pending):
            self._flush(p)
        if self.sessions:
            self._all("patch_end", {p: (sid,) for p, sid in self.sessions.items()})
            self.sessions = {}
        return self.changed

    def abort(self) -> None:
        """End the sessions without sending what is queued."""
        self.pending = {}
        if self.sessions:
            with contextlib.suppress(TallyError):
                self._all("patch_end", {p: (sid,) for p, sid in self.sessions.items()})
            self.sessions = {}

    def shutdown(self) -> None:
        self.loop.run_until_complete(self.peers.close())
        self.loop.close()
