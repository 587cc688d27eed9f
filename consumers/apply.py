"""Change events → engine writes: the trigger logic, with no Kafka in sight.

Per event and per aggregate bound to the event's table:

* create/read/update (kind ``upsert``) → upsert the row's item by id, or
  delete it when the row fails the aggregate's ``filter``;
* delete / tombstone → delete the id if present;
* truncate → clear every aggregate of that table;
* logical messages (``ignore``) → nothing.

Every trigger converges to a state, so duplicates and replays change nothing.
An event is *planned* first (user functions run, keys are validated and
encoded) and only then applied, so a bad event applies to none of its
aggregates and never half of them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from engine import Aggregate, Prepared, Store, TableAggregate, TallyError, encode_key
from engine.aggregate import prepare_encoded_id as prepare
from schemas import BadRecord, ChangeEvent

__all__ = ["Applier", "ApplyResult", "Op"]

UPSERT = 0
DELETE = 1
CLEAR = 2


Op = tuple[int, Aggregate, Any]
"""One engine write planned from an event: (kind, aggregate, arg) where arg is a
`Prepared` item for UPSERT, an encoded id for DELETE, None for CLEAR."""


class Pending:
    """Ops folded per aggregate, waiting for one commit (replays gather many batches)."""

    __slots__ = ("changes", "cleared", "clears", "deletes", "events", "upserts")

    def __init__(self) -> None:
        self.changes: dict[Aggregate, dict[bytes, Prepared | None]] = {}
        self.cleared: set[Aggregate] = set()
        self.upserts = self.deletes = self.clears = self.events = 0


class ApplyResult(NamedTuple):
    upserts: int
    deletes: int
    clears: int
    changed: int


class Applier:
    """Applies change events to the aggregates of their tables."""

    def __init__(
        self,
        store: Store,
        definitions: Iterable[TableAggregate],
        physical: Mapping[str, str] | None = None,
    ) -> None:
        """``physical`` maps a definition's name to the physical aggregate (generation) it writes."""
        self.store = store
        self.definitions = list(definitions)
        self.by_table: dict[str, list[tuple[TableAggregate, Aggregate]]] = {}
        physical = physical or {}
        for d in self.definitions:
            agg = store.aggregate(physical.get(d.name, d.name))
            self.by_table.setdefault(d.table, []).append((d, agg))

    @property
    def tables(self) -> set[str]:
        return set(self.by_table)

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
            if kind == "upsert":
                try:
                    eid = encode_key(ev.id)
                    planned: list[Op] = []
                    row = ev.row
                    assert row is not None
                    for d, agg in targets:
                        it = d.item_tuple(row, ev.id)
                        if it is None:
                            planned.append((DELETE, agg, eid))
                        else:
                            planned.append((UPSERT, agg, prepare(it[1], eid, it[2], it[0])))
                except TallyError as e:
                    bad.append((i, BadRecord("apply", f"{_where(ev)}: {e}")))
                    continue
                except Exception as e:  # user code in sort_key/filter/... raised
                    bad.append((i, BadRecord("apply", f"{_where(ev)}: {type(e).__name__}: {e}")))
                    continue
                ops.extend(planned)
            elif kind == "delete":
                try:
                    eid = encode_key(ev.id)
                except TallyError as e:
                    bad.append((i, BadRecord("apply", f"{_where(ev)}: {e}")))
                    continue
                ops.extend((DELETE, agg, eid) for _, agg in targets)
            elif kind == "truncate":
                ops.extend((CLEAR, agg, None) for _, agg in targets)
        return ops, bad

    def apply(self, ops: Iterable[Op]) -> ApplyResult:
        """Run planned ops; call inside `Store.batch()` so they commit with the offsets.

        Ops converge ids to states, so only the last op per (aggregate, id)
        matters and they are applied together per aggregate (sorted, or as a
        tree rebuild when they are many — see `Aggregate.apply_many`). A
        truncate discards the aggregate's earlier ops and clears it in order.
        """
        pending = Pending()
        self.collect(ops, pending)
        return self.flush(pending)

    @staticmethod
    def collect(ops: Iterable[Op], pending: Pending) -> None:
        """Fold ops into ``pending`` (last state per id; a truncate resets the aggregate)."""
        changes = pending.changes
        for kind, agg, arg in ops:
            if kind == UPSERT:
                pending.upserts += 1
                changes.setdefault(agg, {})[arg.id] = arg
            elif kind == DELETE:
                pending.deletes += 1
                changes.setdefault(agg, {})[arg] = None
            else:
                pending.clears += 1
                changes.pop(agg, None)
                pending.cleared.add(agg)

    @staticmethod
    def flush(pending: Pending) -> ApplyResult:
        """Write what ``pending`` holds (inside `Store.batch()`)."""
        changed = 0
        for agg in pending.cleared:
            agg.clear_all()
            changed += 1
        for agg, changes in pending.changes.items():
            changed += agg.apply_many(changes)
        return ApplyResult(pending.upserts, pending.deletes, pending.clears, changed)

    def apply_events(self, events: Sequence[ChangeEvent]) -> tuple[ApplyResult, list[tuple[int, BadRecord]]]:
        """Plan and apply in one batch (no offsets): handy for tests and scripts."""
        ops, bad = self.plan(events)
        with self.store.batch():
            result = self.apply(ops)
        return result, bad


def _where(ev: ChangeEvent) -> str:
    return f"table {ev.table!r} id {ev.id!r}"

