"""Truncates apply at their source position, whatever partition they arrive on.

A Debezium truncate has no key, so it lands on any partition; the rows it clears, and the
rows written after it, live on other partitions that the consumer reads at their own pace.
The contract: changes after the truncate (by source position) survive, changes before it do
not, and a change from before it that arrives later is not applied.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.engine import Store, TableAggregate
from tally.engine.triggers import Applier
from tally.schemas import ChangeEvent

AGG = TableAggregate("scores", table="scores", sort_key="score", sum_value="score")


def up(id: int, score: int, pos: int | None) -> ChangeEvent:
    return ChangeEvent("scores", "upsert", id, {"id": id, "score": score}, pos, None, "u")


def delete(id: int, pos: int | None) -> ChangeEvent:
    return ChangeEvent("scores", "delete", id, None, pos, None, "d")


def truncate(pos: int | None) -> ChangeEvent:
    return ChangeEvent("scores", "truncate", None, None, pos, None)


def items(store: Store) -> dict[Any, Any]:
    return {it.id: it.key for it in store.aggregate("scores").iter()}


def apply_batches(store: Store, batches: list[list[ChangeEvent]]) -> None:
    app = Applier(store, [AGG])
    for b in batches:
        _, bad = app.apply_events(b)
        assert bad == []
    store.aggregate("scores").validate()


def test_inserts_after_a_truncate_survive_it_even_when_applied_first(tmp_path: Path) -> None:
    with Store.open(str(tmp_path)) as store:
        apply_batches(store, [[up(1, 10, 1), up(2, 20, 2)]])
        # Partition B delivers the post-truncate insert (pos 9) before partition A's truncate (pos 5).
        apply_batches(store, [[up(3, 30, 9)], [truncate(5)]])
        assert items(store) == {3: 30}


def test_a_change_from_before_the_truncate_arriving_later_is_not_applied(tmp_path: Path) -> None:
    with Store.open(str(tmp_path)) as store:
        apply_batches(
            store, [[up(1, 10, 1)], [truncate(5)], [up(2, 20, 3), delete(7, 4), up(4, 40, 6)]]
        )
        assert items(store) == {4: 40}
        assert store.aggregate("scores").watermark() is not None


def test_in_one_batch_order_inside_the_batch_does_not_matter(tmp_path: Path) -> None:
    with Store.open(str(tmp_path)) as store:
        apply_batches(store, [[up(1, 10, 1), up(2, 20, 2)]])
        apply_batches(store, [[up(3, 30, 8), up(2, 21, 7), truncate(5), up(1, 11, 4)]])
        assert items(store) == {2: 21, 3: 30}


def test_an_unchanged_item_changed_after_the_truncate_survives(tmp_path: Path) -> None:
    with Store.open(str(tmp_path)) as store:
        # Row 1 is re-inserted after the truncate with the same values it had before.
        apply_batches(store, [[up(1, 10, 1)], [up(1, 10, 8)], [truncate(5)]])
        assert items(store) == {1: 10}


def test_without_positions_truncates_apply_in_arrival_order(tmp_path: Path) -> None:
    with Store.open(str(tmp_path)) as store:
        apply_batches(
            store, [[up(1, 10, None)], [up(2, 20, None), truncate(None), up(3, 30, None)]]
        )
        assert items(store) == {3: 30}


def test_positions_and_watermark_survive_a_reopen(tmp_path: Path) -> None:
    with Store.open(str(tmp_path)) as store:
        apply_batches(store, [[up(1, 10, 1), up(2, 20, 9)]])
    with Store.open(str(tmp_path)) as store:
        apply_batches(store, [[truncate(5)]])
    with Store.open(str(tmp_path)) as store:
        apply_batches(store, [[up(3, 30, 4)]])  # from before the truncate: skipped
        assert items(store) == {2: 20}


# ---------------------------------------------------------------- the property

Step = tuple[str, int, int]  # (kind, id, score)


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Step], int, int, list[int]]:
    steps = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("up"), st.integers(0, 9), st.integers(0, 50)),
                st.tuples(st.just("del"), st.integers(0, 9), st.just(0)),
                st.tuples(st.just("trunc"), st.just(-1), st.just(0)),
            ),
            min_size=1,
            max_size=40,
        )
    )
    partitions = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**32 - 1))
    cuts = draw(st.lists(st.integers(1, 6), min_size=1, max_size=20))
    return steps, partitions, seed, cuts


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(histories())
def test_any_interleaving_of_partitions_gives_the_source_order_state(
    tmp_path_factory: Any, history: tuple[list[Step], int, int, list[int]]
) -> None:
    steps, partitions, seed, cuts = history
    rng = random.Random(seed)
    # The truth: the history applied in source (position) order.
    oracle: dict[int, int] = {}
    events: list[tuple[int, ChangeEvent]] = []  # (partition, event)
    for pos, (kind, id, score) in enumerate(steps, start=1):
        if kind == "up":
            oracle[id] = score
            events.append((id % partitions, up(id, score, pos)))
        elif kind == "del":
            oracle.pop(id, None)
            events.append((id % partitions, delete(id, pos)))
        else:
            oracle.clear()
            events.append((rng.randrange(partitions), truncate(pos)))
    # Delivery: each partition in order, partitions interleaved at random, cut into batches.
    queues = [[ev for p, ev in events if p == q] for q in range(partitions)]
    delivered: list[ChangeEvent] = []
    while any(queues):
        q = rng.choice([i for i, qu in enumerate(queues) if qu])
        delivered.append(queues[q].pop(0))
    batches, i = [], 0
    for n in cuts * (len(delivered) // max(1, sum(cuts)) + 1):
        if i >= len(delivered):
            break
        batches.append(delivered[i : i + n])
        i += n
    with Store.open(str(tmp_path_factory.mktemp("t"))) as store:
        apply_batches(store, batches)
        assert items(store) == oracle
