"""Drift signals of the trigger path (`tally.engine.triggers`, ``Applier(drift=True)``), on a real store.

A live event whose source op contradicts what the aggregate holds says the
aggregate was out of step before it: an update/delete of an id it does not
hold, an insert of an id it holds with other values. The property test checks
the counts against a sequential oracle for any event sequence cut into any
batches (the in-batch folding must not hide or invent a signal).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.engine import Store, TableAggregate
from tally.engine.triggers import DRIFT_KINDS, Applier
from tally.schemas import ChangeEvent

PLAIN = TableAggregate("plain", table="t", sort_key="v", sum_value="v")
FILTERED = TableAggregate("positive", table="t", sort_key="v", filter=lambda r: r["v"] >= 0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "db")
    yield s
    s.close()


def up(id: int, v: int, op: str | None) -> ChangeEvent:
    return ChangeEvent("t", "upsert", id, {"id": id, "v": v}, None, None, op)


def rm(id: int, op: str | None = "d") -> ChangeEvent:
    return ChangeEvent("t", "delete", id, None, None, None, op)


def truncate() -> ChangeEvent:
    return ChangeEvent("t", "truncate", None, None)


def drift_of(applier: Applier, events: list[ChangeEvent]) -> dict[tuple[str, str], int]:
    result, bad = applier.apply_events(events)
    assert not bad
    return result.drift


def test_consistent_history_gives_no_signal(store: Store) -> None:
    a = Applier(store, [PLAIN], drift=True)
    assert drift_of(a, [up(1, 5, "c"), up(2, 6, "c")]) == {}
    assert drift_of(a, [up(1, 7, "u"), rm(2)]) == {}
    assert drift_of(a, [up(2, 1, "c"), up(2, 2, "u"), rm(2), up(2, 3, "c")]) == {}
    # a redelivered insert with the same values is not drift
    assert drift_of(a, [up(1, 7, "c")]) == {}


def test_each_kind_is_counted_with_its_ids(store: Store) -> None:
    a = Applier(store, [PLAIN], drift=True)
    drift_of(a, [up(1, 5, "c")])
    result, _ = a.apply_events([up(9, 1, "u"), rm(8), up(1, 6, "c"), up(10, 1, "u")])
    assert result.drift == {
        ("plain", "update_unknown"): 2,
        ("plain", "delete_unknown"): 1,
        ("plain", "create_existing"): 1,
    }
    assert result.drift_ids[("plain", "update_unknown")] == [9, 10]
    assert result.drift_ids[("plain", "delete_unknown")] == [8]
    assert result.drift_ids[("plain", "create_existing")] == [1]
    # the trigger itself is unchanged: the events converged the ids all the same
    agg = store.aggregate("plain")
    assert agg.get(1) is not None and agg.get(1).key == 6  # type: ignore[union-attr]
    assert agg.get(9) is not None and agg.get(8) is None


def test_prior_state_inside_one_batch_counts(store: Store) -> None:
    a = Applier(store, [PLAIN], drift=True)
    assert drift_of(a, [up(1, 1, "c"), rm(1), up(1, 2, "u")]) == {("plain", "update_unknown"): 1}
    assert drift_of(a, [up(3, 1, "c"), up(3, 2, "c")]) == {("plain", "create_existing"): 1}
    # a truncate empties the aggregate: an update after it in the same batch is unknown
    assert drift_of(a, [truncate(), up(3, 5, "u")]) == {("plain", "update_unknown"): 1}


def test_snapshot_reads_and_unknown_ops_are_never_signals(store: Store) -> None:
    a = Applier(store, [PLAIN], drift=True)
    drift_of(a, [up(1, 5, "c")])
    assert drift_of(a, [up(1, 9, "r"), up(2, 1, None), rm(7, None), up(3, 1, "r")]) == {}


def test_filtered_aggregate_skips_unknown_id_checks_but_not_creates(store: Store) -> None:
    a = Applier(store, [FILTERED], drift=True)
    # rows the filter keeps out are legitimately absent: updating or deleting them is not drift
    assert drift_of(a, [up(1, -5, "c"), up(1, -6, "u"), rm(1)]) == {}
    assert drift_of(a, [up(2, 4, "c")]) == {}
    # an insert of a held id is drift whatever the filter says about the new row
    assert drift_of(a, [up(2, -1, "c")]) == {("positive", "create_existing"): 1}


def test_off_by_default(store: Store) -> None:
    a = Applier(store, [PLAIN])
    assert drift_of(a, [up(1, 1, "u"), rm(2)]) == {}


def test_two_aggregates_count_separately(store: Store) -> None:
    a = Applier(store, [PLAIN, FILTERED], drift=True)
    # only the unfiltered one counts an update of an unknown id
    assert drift_of(a, [up(1, -3, "u")]) == {("plain", "update_unknown"): 1}
    # both hold id 2: an insert with other values counts once for each
    assert drift_of(a, [up(2, 4, "c")]) == {}
    assert drift_of(a, [up(2, 5, "c")]) == {
        ("plain", "create_existing"): 1,
        ("positive", "create_existing"): 1,
    }


# ---- property: any sequence, any batching, against a sequential oracle -------------------------

event = st.one_of(
    st.builds(up, st.integers(0, 5), st.integers(-2, 2), st.sampled_from(["c", "u", "r", None])),
    st.builds(rm, st.integers(0, 5), st.sampled_from(["d", None])),
    st.just(truncate()),
)


def oracle(events: list[ChangeEvent], filtered: bool) -> dict[tuple[str, str], int]:
    name = "positive" if filtered else "plain"
    held: dict[Any, int] = {}
    out: dict[tuple[str, str], int] = {}

    def hit(kind: str) -> None:
        out[(name, kind)] = out.get((name, kind), 0) + 1

    for ev in events:
        if ev.kind == "truncate":
            held.clear()
            continue
        new = None
        if ev.kind == "upsert":
            assert ev.row is not None
            v = ev.row["v"]
            new = v if not filtered or v >= 0 else None
        prior = held.get(ev.id)
        if ev.op == "c" and prior is not None and prior != new:
            hit("create_existing")
        elif ev.op in ("u", "d") and prior is None and not filtered:
            hit("update_unknown" if ev.op == "u" else "delete_unknown")
        if new is None:
            held.pop(ev.id, None)
        else:
            held[ev.id] = new
    return out


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    events=st.lists(event, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    filtered=st.booleans(),
)
def test_drift_counts_match_a_sequential_oracle(
    tmp_path_factory: pytest.TempPathFactory,
    events: list[ChangeEvent],
    cuts: list[int],
    filtered: bool,
) -> None:
    store = Store.open(tmp_path_factory.mktemp("drift") / "db")
    try:
        a = Applier(store, [FILTERED if filtered else PLAIN], drift=True)
        got: dict[tuple[str, str], int] = {}
        bounds = sorted({0, len(events), *(c for c in cuts if c <= len(events))})
        for lo, hi in itertools.pairwise(bounds):
            for k, n in drift_of(a, events[lo:hi]).items():
                got[k] = got.get(k, 0) + n
        assert got == oracle(events, filtered)
        assert all(k[1] in DRIFT_KINDS for k in got)
    finally:
        store.close()
