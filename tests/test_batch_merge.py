"""`Tree.apply_sorted`, the batch merge `Aggregate.apply_many` uses for incremental batches:
each touched node is visited once and fixed up once (splits into several pieces, merges of
underfull siblings, root growth and shrinkage by more than one level).

Random batches of inserts, deletes and replaces (many per leaf, whole leaves emptied,
hundreds of items into one leaf) against a dict oracle, at tiny node sizes so every
structural case happens; `validate()` checks every invariant after each batch.
"""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from budget import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.engine import Store, StoreCorrupted, encode_key
from tally.engine.aggregate import Prepared, prepare_encoded_id
from tally.engine.btree import DELETE, INSERT, REPLACE, Tree, TreeMeta

INCREMENTAL = 1e12
"""A rebuild ratio no batch reaches: apply_many always takes the incremental (merge) path."""


def _apply(agg: Any, oracle: dict[int, tuple[Any, Any]], batch: dict[int, Any]) -> None:
    changes: dict[bytes, Prepared | None] = {}
    for i, v in batch.items():
        eid = encode_key(i)
        if v is None:
            changes[eid] = None
            oracle.pop(i, None)
        else:
            key, s = v
            changes[eid] = prepare_encoded_id(key, eid, s, None)
            oracle[i] = (key, s)
    agg.apply_many(changes, rebuild_ratio=INCREMENTAL)


def _meta(store: Store, name: str) -> TreeMeta:
    """The meta of the (one) tree of aggregate ``name``."""
    aid = store.agg_id(name, False)
    assert aid is not None
    meta = store.tree_meta(store.tree_keys(aid)[0])
    assert meta is not None
    return meta


def _check(agg: Any, oracle: dict[int, tuple[Any, Any]]) -> None:
    agg.validate()
    expect = sorted((encode_key(k) + encode_key(i), s) for i, (k, s) in oracle.items())
    got = [(encode_key(it.key) + encode_key(it.id), it.sum_value) for it in agg.iter()]
    assert got == expect
    assert agg.count() == len(oracle)
    assert agg.sum() == sum(s for _, s in oracle.values())


@settings(max_examples=examples(60), deadline=None)
@given(
    seed=st.integers(0, 2**32),
    node=st.sampled_from([4, 5, 6, 16]),
    ids=st.sampled_from([20, 300, 3000]),
)
def test_batches_match_the_oracle_and_keep_every_invariant(
    tmp_path_factory: pytest.TempPathFactory, seed: int, node: int, ids: int
) -> None:
    rnd = random.Random(seed)
    path = tmp_path_factory.mktemp("merge")
    with Store.open(path / "s", max_node_size=node) as store:
        agg = store.aggregate("a")
        oracle: dict[int, tuple[Any, Any]] = {}
        for _ in range(12):
            shape = rnd.random()
            batch: dict[int, Any] = {}
            n = rnd.choice((1, 5, 50, 400))
            for _ in range(n):
                # a dense run of ids in some batches: one leaf gets hundreds of changes
                i = rnd.randrange(min(ids, 60)) if shape < 0.25 else rnd.randrange(ids)
                if rnd.random() < (0.6 if shape > 0.8 else 0.3):  # some batches mostly delete
                    batch[i] = None
                else:
                    # few keys: ties, and same-key sum changes (REPLACE in the tree)
                    batch[i] = (rnd.randrange(8), rnd.randrange(-5, 50))
            with store.batch():
                _apply(agg, oracle, batch)
            _check(agg, oracle)
        with store.batch():  # empty it in one batch: the root shrinks to a leaf
            _apply(agg, oracle, dict.fromkeys(list(oracle)))
        _check(agg, oracle)


def test_growth_by_several_levels_in_one_batch_then_back(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", max_node_size=4) as store:
        agg = store.aggregate("a")
        oracle: dict[int, tuple[Any, Any]] = {}
        with store.batch():
            _apply(agg, oracle, {i: (i % 7, i) for i in range(3)})
        with store.batch():  # 3 items → 2,000: the root leaf becomes a tree of many levels
            _apply(agg, oracle, {i: (i % 7, i) for i in range(2000)})
        _check(agg, oracle)
        assert _meta(store, "a").height >= 4  # one batch grew it by several levels
        with store.batch():  # all but two go: merges cascade up and the root shrinks
            _apply(agg, oracle, dict.fromkeys(range(2, 2000)))
        _check(agg, oracle)
        assert _meta(store, "a").height == 1


def test_decimal_and_float_sums_stay_exact_in_the_merge(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", max_node_size=4) as store:
        dec = store.aggregate("dec")
        with store.batch():
            _apply(dec, {}, {i: (i, Decimal(i) / 100) for i in range(300)})
        with store.batch():
            _apply(dec, {}, {i: (i, Decimal("0.10")) for i in range(0, 300, 3)})
        dec.validate()
        expect = sum(Decimal(i) / 100 for i in range(300) if i % 3) + 100 * Decimal("0.10")
        assert dec.sum() == expect and type(dec.sum()) is Decimal
        flt = store.aggregate("flt")
        with store.batch():
            _apply(flt, {}, {i: (i, i / 4) for i in range(300)})
        flt.validate()
        assert flt.sum() == sum(i / 4 for i in range(300))


def test_a_change_the_tree_does_not_allow_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", max_node_size=4) as store:
        agg = store.aggregate("a")
        with store.batch():
            agg.upsert(1, 1, 1)
        tree = Tree(store.nodes, _meta(store, "a"))
        present = encode_key(1) + encode_key(1)
        absent = encode_key(2) + encode_key(2)
        with pytest.raises(StoreCorrupted, match="already holds"):
            tree.apply_sorted([(present, INSERT, 1)])
        with pytest.raises(StoreCorrupted, match="lacks"):
            tree.apply_sorted([(absent, DELETE, 0)])
        with pytest.raises(StoreCorrupted, match="lacks"):
            tree.apply_sorted([(absent, REPLACE, 5)])
