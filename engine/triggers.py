"""Triggers: change events → engine writes, per aggregate bound to the event's table.

Per event and per aggregate bound to the event's table:

* create/read/update (kind ``upsert``) → upsert the row's item by id, or
  delete it when the row fails the aggregate's ``filter``;
* delete / tombstone → delete the id if present;
* truncate → clear every aggregate of that table;
* logical messages (``ignore``) → nothing.

**Drift signals** (``Applier(drift=True)``, the live stream only): an event
whose *source op* contradicts what the aggregate holds says the aggregate was
out of step with its table before that event — an update (``u``) or delete
(``d``) of an id the aggregate does not hold, or an insert (``c``) of an id it
already holds with other values. They are counted per aggregate and kind
(``update_unknown``, ``delete_unknown``, ``create_existing``) in
`ApplyResult.drift`. The prior state of an id is what the batch saw before the
event (earlier events of the same batch included). Update/delete checks are
skipped for aggregates with a ``filter`` (a filtered-out row is legitimately
absent), as are snapshot reads (``r``: a re-snapshot re-emits held rows) and
events whose op is unknown (tombstones, unwrapped rows without ``__op``).

Every trigger converges to a state, so duplicates and replays change nothing.
An event is *planned* first (user functions run, keys are validated and
encoded) and only then applied, so a bad event applies to none of its
aggregates and never half of them.

**Sum types.** A namespace holds float or Decimal sums, never both. Planning
refuses (as a bad record) an event whose sum would join a namespace holding
the other type — as stored, or as planned since the last flush. The check is
conservative within a batch: a float for a namespace whose last Decimal the
same batch removes is still refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from tally.schemas import BadRecord, ChangeEvent
from tally.schemas.typed import UNAVAILABLE

from .aggregate import Aggregate, Prepared
from .aggregate import prepare_encoded_id as prepare
from .btree import mixed_sums
from .errors import AggregateNotReady, InvalidArgument, TallyError
from .keys import decode_key, encode_key
from .state import IdEntry
from .store import Store
from .table import TableAggregate

__all__ = ["DRIFT_KINDS", "Applier", "ApplyResult", "Op"]

UPSERT = 0
DELETE = 1
CLEAR = 2


Op = tuple[int, Aggregate, Any, "str | None", "bytes | None"]
"""One engine write planned from an event: (kind, aggregate, arg, source op, position) where
arg is a `Prepared` item for UPSERT, an encoded id for DELETE, None for CLEAR; the source op
is the event's ``op`` (c/u/d/r or None) and the position its encoded source position (an
LSN, binlog coordinates ...) or None."""

DRIFT_KINDS = ("update_unknown", "delete_unknown", "create_existing")
"""Kinds of drift signal, see the module notes."""
DRIFT_EXAMPLES = 5
"""Ids kept per (aggregate, kind) and batch for the log line."""

_MISSING: Any = object()
_UNKNOWN_KIND = {"u": "update_unknown", "d": "delete_unknown"}


class Pending:
    """Ops folded per aggregate, waiting for one commit (replays gather many batches).

    ``checks`` (drift tracking only): per aggregate, the first (source op, item)
    of each id whose prior state is in the store, judged at `Applier.flush`.
    """

    __slots__ = (
        "changes",
        "checks",
        "cleared",
        "clears",
        "deletes",
        "drift",
        "drift_ids",
        "events",
        "positions",
        "skipped",
        "upserts",
        "watermarks",
    )

    def __init__(self, track_drift: bool = False) -> None:
        self.changes: dict[Aggregate, dict[bytes, Prepared | None]] = {}
        self.cleared: dict[Aggregate, bytes | None] = {}
        """Aggregates truncated in this batch → the truncate's position (None: unknown)."""
        self.positions: dict[Aggregate, dict[bytes, bytes]] = {}
        """Per aggregate, the source position of each pending change that has one."""
        self.watermarks: dict[Aggregate, bytes | None] = {}
        """Per aggregate, the latest truncate's position (stored or in this batch)."""
        self.upserts = self.deletes = self.clears = self.events = self.skipped = 0
        self.checks: dict[Aggregate, dict[bytes, tuple[str, Prepared | None]]] | None = (
            {} if track_drift else None
        )
        self.drift: dict[tuple[str, str], int] = {}
        self.drift_ids: dict[tuple[str, str], list[Any]] = {}


class ApplyResult(NamedTuple):
    upserts: int
    deletes: int
    clears: int
    changed: int
    drift: dict[tuple[str, str], int]
    """(aggregate name, drift kind) → events (drift tracking only)."""
    drift_ids: dict[tuple[str, str], list[Any]]
    """(aggregate name, drift kind) → the first few ids."""


class Applier:
    """Applies change events to the aggregates of their tables."""

    def __init__(
        self,
        store: Store,
        definitions: Iterable[TableAggregate],
        physical: Mapping[str, str] | None = None,
        *,
        drift: bool = False,
    ) -> None:
        """``physical`` maps a definition's name to the physical aggregate (generation) it writes;
        ``drift`` turns on drift signals (`ApplyResult.drift`)."""
        self.store = store
        self.definitions = list(definitions)
        self.track_drift = drift
        self.by_table: dict[str, list[tuple[TableAggregate, Aggregate]]] = {}
        self.names: dict[Aggregate, str] = {}
        self.filtered: set[Aggregate] = set()
        self.sum_types: dict[tuple[Aggregate, bytes], type] = {}
        """(aggregate, encoded namespace) → float or Decimal: the non-int sum type planned
        there since the last flush (see the notes on sum types)."""
        physical = physical or {}
        for d in self.definitions:
            agg = store.aggregate(physical.get(d.name, d.name))
            self.by_table.setdefault(d.table, []).append((d, agg))
            self.names[agg] = d.name
            if d.has_filter:
                self.filtered.add(agg)

    def plan(self, events: Sequence[ChangeEvent]) -> tuple[list[Op], list[tuple[int, BadRecord]]]:
        """Ops for ``events`` in order, and (index, reason) of the events that cannot apply."""
        ops: list[Op] = []
        bad: list[tuple[int, BadRecord]] = []
        by_table = self.by_table
        for i, ev in enumerate(events):
            targets = by_table.get(ev.table)
            if not targets:
                continue  # a table whose aggregates another stream feeds
            kind = ev.kind
            evop = ev.op
            pos = None if ev.position is None else _position(ev.position)
            if kind == "upsert":
                d = None
                try:
                    eid = encode_key(ev.id)
                    planned: list[Op] = []
                    typed: list[tuple[Aggregate, bytes, type]] | None = None
                    row = ev.row
                    assert row is not None
                    for d, agg in targets:
                        it = d.item_tuple(row)
                        if it is None:
                            planned.append((DELETE, agg, eid, evop, pos))
                        else:
                            p = prepare(it[1], eid, it[2], it[0], pos)
                            if type(p[3]) is not int:
                                typed = self._check_sum_type(agg, p, typed)
                            planned.append((UPSERT, agg, p, evop, pos))
                    if typed:
                        for agg, ens, t in typed:
                            self.sum_types[agg, ens] = t
                except Exception as e:  # user code in sort_key/filter/... raised, or a bad key
                    bad.append((i, _unapplicable(ev, d, e)))
                    continue
                ops.extend(planned)
            elif kind == "delete":
                try:
                    eid = encode_key(ev.id)
                except TallyError as e:
                    bad.append((i, BadRecord("apply", f"{_where(ev)}: {e}")))
                    continue
                ops.extend((DELETE, agg, eid, evop, pos) for _, agg in targets)
            elif kind == "truncate":
                ops.extend((CLEAR, agg, pos, None, pos) for _, agg in targets)
        return ops, bad

    def _check_sum_type(
        self, agg: Aggregate, p: Prepared, typed: list[tuple[Aggregate, bytes, type]] | None
    ) -> list[tuple[Aggregate, bytes, type]] | None:
        """Refuse a float or Decimal sum that would join the other type in its namespace;
        return ``typed`` with the (aggregate, namespace, type) to record if the event passes."""
        t = type(p[3])
        ens = p[2]
        planned = self.sum_types.get((agg, ens))
        if planned is t:
            return typed
        if planned is not None:
            raise InvalidArgument(
                f"namespace {decode_key(ens)!r}: sum_value {p[3]!r}: {mixed_sums(t, planned)}"
                " (an earlier event of this batch gave it the other type)"
            )
        try:
            why = agg.sum_conflict(ens, p[3])
        except AggregateNotReady:
            why = None  # not this event's fault: applying it raises the same, as before
        if why is not None:
            raise InvalidArgument(why)
        if typed is None:
            typed = []
        typed.append((agg, ens, t))
        return typed

    def apply(self, ops: Iterable[Op]) -> ApplyResult:
        """Run planned ops; call inside `Store.batch()` so they commit with the offsets.

        Ops converge ids to states, so only the last op per (aggregate, id)
        matters and they are applied together per aggregate (sorted, or as a
        tree rebuild when they are many — see `Aggregate.apply_many`). A
        truncate discards the aggregate's earlier ops and clears it in order.
        """
        pending = self.new_pending()
        self.collect(ops, pending)
        return self.flush(pending)

    def new_pending(self) -> Pending:
        return Pending(self.track_drift)

    def collect(self, ops: Iterable[Op], pending: Pending) -> None:
        """Fold ops into ``pending``: the last state per id, truncates in source order.

        A truncate at position L (when the source gives positions) drops the pending changes
        from before it and keeps those after it, whatever order the partitions delivered
        them in; any change from before L that comes later (another partition lagging
        behind) is skipped. Without positions, arrival order decides.
        """
        changes = pending.changes
        checks = pending.checks
        positions = pending.positions
        watermarks = pending.watermarks
        for kind, agg, arg, evop, pos in ops:
            if kind == CLEAR:
                self._truncate(pending, agg, arg)
                continue
            if pos is not None:
                wm = watermarks.get(agg, _MISSING)
                if wm is _MISSING:
                    wm = watermarks[agg] = agg.watermark()
                if wm is not None and pos < wm:
                    pending.skipped += 1  # a change from before a truncate already applied
                    continue
            if kind == UPSERT:
                pending.upserts += 1
                eid, new = arg.id, arg
            else:
                pending.deletes += 1
                eid, new = arg, None
            per = changes.get(agg)
            if per is None:
                per = changes[agg] = {}
            if checks is not None and evop is not None and evop != "r":
                prior = per.get(eid, _MISSING)
                if prior is _MISSING and agg not in pending.cleared:
                    checks.setdefault(agg, {})[eid] = (evop, new)  # first sight: judged at flush
                else:
                    self._judge(pending, agg, eid, evop, new, None if prior is _MISSING else prior)
            per[eid] = new
            if pos is not None:
                ps = positions.get(agg)
                if ps is None:
                    ps = positions[agg] = {}
                ps[eid] = pos
            elif agg in positions:
                positions[agg].pop(eid, None)

    def _truncate(self, pending: Pending, agg: Aggregate, at: bytes | None) -> None:
        pending.clears += 1
        checks = pending.checks
        if checks is not None:
            first = checks.pop(agg, None)
            if first:  # judge them now, against the state the truncate discards
                for eid, prior in agg.entries(first).items():
                    self._judge(pending, agg, eid, *first[eid], prior)
        per = pending.changes.get(agg)
        ps = pending.positions.get(agg, {})
        if at is None or not per:
            pending.changes.pop(agg, None)
            pending.positions.pop(agg, None)
        else:
            keep = {eid for eid in per if (p := ps.get(eid)) is not None and p > at}
            pending.changes[agg] = {eid: v for eid, v in per.items() if eid in keep}
            pending.positions[agg] = {eid: p for eid, p in ps.items() if eid in keep}
        if agg in pending.cleared:
            prev = pending.cleared[agg]
            pending.cleared[agg] = None if prev is None or at is None else max(prev, at)
        else:
            pending.cleared[agg] = at
        if at is not None:
            wm = pending.watermarks.get(agg, _MISSING)
            if wm is _MISSING:
                wm = agg.watermark()
            pending.watermarks[agg] = at if wm is None or at > wm else wm

    def _judge(
        self,
        pending: Pending,
        agg: Aggregate,
        eid: bytes,
        evop: str,
        new: Prepared | None,
        prior: Prepared | IdEntry | None,
    ) -> None:
        if evop == "c":
            if prior is None:
                return
            if new is not None:
                if isinstance(prior, IdEntry):
                    same = prior.ns == new[2] and prior.key == new[0] and prior.sum == new[3]
                else:
                    same = prior[2] == new[2] and prior[0] == new[0] and prior[3] == new[3]
                if same:
                    return
            kind = "create_existing"
        else:
            kind = _UNKNOWN_KIND.get(evop, "")
            if not kind or prior is not None or agg in self.filtered:
                return
        key = (self.names.get(agg, agg.name), kind)
        pending.drift[key] = pending.drift.get(key, 0) + 1
        ids = pending.drift_ids.setdefault(key, [])
        if len(ids) < DRIFT_EXAMPLES:
            ids.append(decode_key(eid))

    def flush(self, pending: Pending) -> ApplyResult:
        """Write what ``pending`` holds (inside `Store.batch()`)."""
        self.sum_types.clear()  # the trees know them from now on
        changed = 0
        for agg, at in pending.cleared.items():
            agg.truncate(at)
            changed += 1
        checks = pending.checks or {}
        for agg, changes in pending.changes.items():
            first = checks.get(agg)
            if not first:
                changed += agg.apply_many(changes)
                continue
            before: dict[bytes, IdEntry | None] = {}
            changed += agg.apply_many(changes, before=before)
            for eid, (evop, new) in first.items():
                prior = before.get(eid)
                if (prior is None) is (evop == "c"):
                    continue  # the common, consistent case: an insert of a new id, an update of a held one
                self._judge(pending, agg, eid, evop, new, prior)
        return ApplyResult(
            pending.upserts,
            pending.deletes,
            pending.clears,
            changed,
            pending.drift,
            pending.drift_ids,
        )

    def apply_events(
        self, events: Sequence[ChangeEvent]
    ) -> tuple[ApplyResult, list[tuple[int, BadRecord]]]:
        """Plan and apply in one batch (no offsets): handy for tests and scripts."""
        ops, bad = self.plan(events)
        with self.store.batch():
            result = self.apply(ops)
        return result, bad


def _position(position: Any) -> bytes | None:
    """An event's source position as order-preserving bytes (None: not comparable)."""
    try:
        return encode_key(position)
    except TallyError:
        return None


def _unapplicable(ev: ChangeEvent, d: TableAggregate | None, e: Exception) -> BadRecord:
    """Why an upsert cannot apply: a value the source did not send, or the definition's error."""
    row = ev.row or {}
    missing = [c for c, v in row.items() if v is UNAVAILABLE]
    if missing:
        cols = ", ".join(repr(c) for c in missing)
        return BadRecord(
            "unavailable-value",
            f"{_where(ev, d)}: column(s) {cols} arrived as Debezium's unavailable-value placeholder "
            "(an unchanged TOASTed value under REPLICA IDENTITY DEFAULT) and the definition reads "
            "them, so tally cannot know the item. Fix it at the source: "
            f"ALTER TABLE {ev.table} REPLICA IDENTITY FULL, or Debezium's reselect post-processor "
            "(post.processors=reselector, reselector.type="
            "io.debezium.processors.reselect.ReselectColumnsPostProcessor); then reconcile "
            "the aggregate",
        )
    if isinstance(e, TallyError):
        return BadRecord("apply", f"{_where(ev, d)}: {e}")
    return BadRecord("apply", f"{_where(ev, d)}: {type(e).__name__}: {e}")


def _where(ev: ChangeEvent, definition: TableAggregate | None = None) -> str:
    where = f"table {ev.table!r} id {ev.id!r}"
    return where if definition is None else f"{where}, aggregate {definition.name!r}"
