"""Example-based tests of the engine's public contract (see DESIGN.md "Semantics")."""

from __future__ import annotations

import glob
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tally.engine import (
    Bound,
    Bounds,
    InvalidArgument,
    InvalidKey,
    Item,
    ItemExists,
    ItemNotFound,
    OffsetOutOfRange,
    Page,
    Query,
    ReadOnlyStore,
    Store,
    TableAggregate,
    TallyError,
    encode_key,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store.open(tmp_path / "store", max_node_size=4)
    yield s
    s.close()


def snapshot(agg: Any) -> Any:
    """Everything observable about an aggregate, for "store unchanged" checks."""
    out = []
    for ns in agg.namespaces():
        items = [(i.key, i.id, i.sum_value) for i in agg.iter(namespace=ns)]
        out.append((ns, items, agg.count(namespace=ns), agg.sum(namespace=ns)))
    return out


def wal_bytes(path: Path) -> int:
    """Bytes in RocksDB's write-ahead logs: grows with every committed write."""
    return sum(os.path.getsize(p) for p in glob.glob(str(path / "*.log")))


def fill(agg: Any) -> None:
    agg.insert(1, "a", 10)
    agg.insert(2, "b", 20)
    agg.insert(2, "c", 5, namespace="other")
    agg.insert((1, "x"), "t", 1)


# ---------------------------------------------------------------------------
# Empty and unknown namespaces / aggregates


@pytest.mark.parametrize("which", ["unknown-aggregate", "unknown-namespace", "emptied-namespace"])
def test_reads_of_empty_or_unknown_namespace(store: Any, which: str) -> None:
    agg = store.aggregate("agg")
    ns: Any = None
    if which == "unknown-namespace":
        agg.insert(1, 1, 5)
        ns = "nope"
    elif which == "emptied-namespace":
        agg.insert(1, 1, 5, namespace="gone")
        agg.delete(1)
        ns = "gone"
    bounds_list: list[Any] = [None, {"lower": {"key": 0}}, Bounds(eq=1)]
    for bounds in bounds_list:
        assert agg.count(namespace=ns, bounds=bounds) == 0
        assert agg.sum(namespace=ns, bounds=bounds) == 0
        assert agg.min(namespace=ns, bounds=bounds) is None
        assert agg.max(namespace=ns, bounds=bounds) is None
        assert agg.random(namespace=ns, bounds=bounds) is None
        assert list(agg.iter(namespace=ns, bounds=bounds)) == []
        assert agg.index_of(1, namespace=ns, bounds=bounds) == 0
        assert agg.index_of(1, order="desc", namespace=ns, bounds=bounds) == 0
        for order in ("asc", "desc"):
            page = agg.paginate(None, 10, order=order, namespace=ns, bounds=bounds)
            assert isinstance(page, Page)
            assert page.items == [] and page.is_done is True
        with pytest.raises(OffsetOutOfRange, match=r"\b0 items"):
            agg.at(0, namespace=ns, bounds=bounds)
    assert agg.count_batch([Query(namespace=ns), {"namespace": ns}]) == [0, 0]
    assert agg.sum_batch([Query(namespace=ns)]) == [0]
    if which != "unknown-namespace":
        assert agg.namespaces() == []
    else:
        assert agg.namespaces() == [None]


def test_get_of_unknown_id_is_none(store: Any) -> None:
    agg = store.aggregate("agg")
    assert agg.get(1) is None
    agg.insert(1, 1)
    assert agg.get(2) is None


# ---------------------------------------------------------------------------
# at / offsets


def test_at_positive_and_negative(store: Any) -> None:
    agg = store.aggregate("agg")
    for i in range(10):
        agg.insert(i % 3, i, i)
    order = sorted(range(10), key=lambda i: (i % 3, i))
    for off in range(10):
        assert agg.at(off).id == order[off]
        assert agg.at(-off - 1).id == order[-off - 1]


def test_at_out_of_range_names_the_count(store: Any) -> None:
    agg = store.aggregate("agg")
    for i in range(7):
        agg.insert(i, i)
    for off in (7, 8, -8, 100):
        with pytest.raises(OffsetOutOfRange) as exc_info:
            agg.at(off)
        assert "7" in str(exc_info.value)
        assert isinstance(exc_info.value, TallyError)
    with pytest.raises(OffsetOutOfRange) as exc_info:
        agg.at(3, bounds={"lower": {"key": 5}})  # holds 5 and 6
    assert "2" in str(exc_info.value)


@pytest.mark.parametrize("offset", [1.0, "1", None, [1]])
def test_at_non_int_offset_is_invalid_argument(store: Any, offset: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(1, 1)
    agg.insert(2, 2)
    with pytest.raises(InvalidArgument):
        agg.at(offset)
    with pytest.raises(InvalidArgument):
        agg.at_batch([Query(offset=offset)])


# ---------------------------------------------------------------------------
# Argument validation


@pytest.mark.parametrize("page_size", [0, -1, -100])
def test_page_size_must_be_positive(store: Any, page_size: int) -> None:
    agg = store.aggregate("agg")
    agg.insert(1, 1)
    with pytest.raises(InvalidArgument):
        agg.paginate(None, page_size)
    with pytest.raises(InvalidArgument):
        agg.paginate(None, page_size, namespace="unknown")


@pytest.mark.parametrize(
    "bounds",
    [
        "abc",
        5,
        {"lower": 5},
        {"lower": {"inclusive": True}},
        {"upper": {"key": 1, "inclusive": "yes"}},
        {"lower": {"key": 1, "bogus": 2}},
        {"bogus": 1},
        {"prefix": 5},
    ],
    ids=[
        "string",
        "int",
        "bound-not-a-dict",
        "bound-without-key",
        "inclusive-not-bool",
        "bound-unknown-field",
        "unknown-field",
        "prefix-not-a-sequence",
    ],
)
def test_malformed_bounds_are_invalid_argument(store: Any, bounds: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(1, 1)
    for read in (
        lambda: agg.count(bounds=bounds),
        lambda: agg.sum(bounds=bounds),
        lambda: agg.min(bounds=bounds),
        lambda: agg.paginate(None, 10, bounds=bounds),
        lambda: list(agg.iter(bounds=bounds)),
        lambda: agg.count_batch([{"bounds": bounds}]),
    ):
        with pytest.raises(InvalidArgument):
            read()


def test_bounds_with_invalid_key_are_rejected(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(1, 1)
    for bounds in ({"lower": {"key": math.nan}}, {"eq": {"a": 1}}, {"prefix": [math.nan]}):
        with pytest.raises((InvalidKey, InvalidArgument)):
            agg.count(bounds=bounds)


@pytest.mark.parametrize("cursor", ["not a cursor!!", "", "AAAA", "////", 123, b"abc"])
def test_bad_cursor_is_invalid_argument(store: Any, cursor: Any) -> None:
    agg = store.aggregate("agg")
    for i in range(5):
        agg.insert(i, i)
    with pytest.raises(InvalidArgument):
        agg.paginate(cursor, 2)


def test_bad_order_is_invalid_argument(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(1, 1)
    with pytest.raises(InvalidArgument):
        agg.paginate(None, 2, order="up")
    with pytest.raises(InvalidArgument):
        agg.index_of(1, order="sideways")


# ---------------------------------------------------------------------------
# Bad keys on every write: InvalidKey, store unchanged

NAN = math.nan
BAD_WRITES = {
    "insert-nan-key": lambda a: a.insert(NAN, "new"),
    "insert-dict-key": lambda a: a.insert({"k": 1}, "new"),
    "insert-nan-id": lambda a: a.insert(1, NAN),
    "insert-set-id": lambda a: a.insert(1, {1, 2}),
    "insert-nan-namespace": lambda a: a.insert(1, "new", 0, namespace=NAN),
    "insert-dict-namespace": lambda a: a.insert(1, "new", 0, namespace={"a": 1}),
    "insert-nested-nan-key": lambda a: a.insert((1, NAN), "new"),
    "upsert-nan-key": lambda a: a.upsert(NAN, "a"),
    "upsert-dict-key-existing-id": lambda a: a.upsert({"k": 1}, "a"),
    "upsert-nan-id": lambda a: a.upsert(1, NAN),
    "upsert-nan-namespace": lambda a: a.upsert(1, "a", 0, namespace=NAN),
    "replace-nan-key": lambda a: a.replace("a", NAN),
    "replace-dict-key": lambda a: a.replace("a", {"k": 1}),
    "replace-nan-namespace": lambda a: a.replace("a", 1, 0, namespace=NAN),
    "replace-object-id": lambda a: a.replace(object(), 1),
    "delete-nan-id": lambda a: a.delete(NAN),
    "delete-dict-id": lambda a: a.delete({"a": 1}),
    "delete_if_exists-nan-id": lambda a: a.delete_if_exists(NAN),
    "delete_if_exists-list-of-dict-id": lambda a: a.delete_if_exists([{}]),
    "insert_if_does_not_exist-nan": lambda a: a.insert_if_does_not_exist(NAN, "z"),
    "replace_or_insert-nan": lambda a: a.replace_or_insert(1, NAN),
}


@pytest.mark.parametrize("write", list(BAD_WRITES.values()), ids=list(BAD_WRITES))
def test_bad_keys_on_writes_raise_invalid_key_and_change_nothing(
    tmp_path: Path, write: Any
) -> None:
    path = tmp_path / "store"
    with Store.open(path, max_node_size=4) as s:
        agg = s.aggregate("agg")
        fill(agg)
        before = snapshot(agg)
        wal = wal_bytes(path)
        with pytest.raises(InvalidKey):
            write(agg)
        assert snapshot(agg) == before
        assert wal_bytes(path) == wal
        agg.validate()
        # Inside a batch the bad write raises too and the rest of the batch still commits.
        with s.batch():
            agg.upsert(9, "in-batch")
            with pytest.raises(InvalidKey):
                write(agg)
        assert agg.get("in-batch") == Item(9, "in-batch", 0, None)
        agg.validate()
    with Store.open(path, max_node_size=4) as s:
        agg = s.aggregate("agg")
        assert agg.get("new") is None
        agg.validate()


@pytest.mark.parametrize(
    "write",
    [
        lambda a: a.insert(1, None),
        lambda a: a.upsert(1, None),
        lambda a: a.replace(None, 1),
        lambda a: a.delete(None),
        lambda a: a.delete_if_exists(None),
    ],
    ids=["insert", "upsert", "replace", "delete", "delete_if_exists"],
)
def test_none_is_not_an_id(store: Any, write: Any) -> None:
    agg = store.aggregate("agg")
    fill(agg)
    before = snapshot(agg)
    with pytest.raises((InvalidKey, InvalidArgument)):
        write(agg)
    assert snapshot(agg) == before
    agg.validate()


def test_none_is_a_valid_key_and_namespace(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(None, 1, 3, namespace=None)
    agg.insert(0, 2, 4)
    assert agg.at(0).key is None
    assert agg.count(bounds={"eq": None}) == 1


# ---------------------------------------------------------------------------
# Strict and idempotent writes


def test_strict_write_errors_change_nothing(store: Any) -> None:
    agg = store.aggregate("agg")
    fill(agg)
    before = snapshot(agg)
    with pytest.raises(ItemExists):
        agg.insert(99, "a", 1)
    with pytest.raises(ItemExists):
        agg.insert(2, "c", 5, namespace="elsewhere")  # ids are unique across namespaces
    with pytest.raises(ItemNotFound):
        agg.delete("zz")
    with pytest.raises(ItemNotFound):
        agg.replace("zz", 1, 1)
    assert snapshot(agg) == before
    assert isinstance(ItemExists("x"), TallyError) and isinstance(ItemNotFound("x"), TallyError)
    agg.validate()


def test_idempotent_writes_report_changes(store: Any) -> None:
    agg = store.aggregate("agg")
    assert agg.upsert(1, "a", 5) is True
    assert agg.upsert(1, "a", 5) is False
    assert agg.insert_if_does_not_exist(1, "a", 5) is False
    assert agg.replace_or_insert(1, "a", 5) is False
    assert agg.upsert(1.0, "a", 5) is False  # 1.0 is the key 1
    assert agg.upsert(1, "a", 6) is True
    assert agg.upsert(2, "a", 6) is True
    assert agg.upsert(2, "a", 6, namespace="n") is True
    assert agg.get("a") == Item(2, "a", 6, "n")
    assert agg.delete_if_exists("a") is True
    assert agg.delete_if_exists("a") is False
    assert agg.count(namespace="n") == 0
    agg.validate()


def test_a_write_that_changes_nothing_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store.open(path) as s:
        agg = s.aggregate("agg")
        fill(agg)
        wal = wal_bytes(path)
        assert agg.upsert(1, "a", 10) is False
        assert agg.upsert([1, "x"], "t", 1) is False
        assert agg.delete_if_exists("missing") is False
        with s.batch():
            assert agg.upsert(2, "b", 20) is False
            assert agg.delete_if_exists("missing-too") is False
        assert wal_bytes(path) == wal
        assert agg.upsert(1, "a", 11) is True
        assert wal_bytes(path) > wal


def test_writes_outside_a_batch_commit_one_by_one(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(1, "a")
    with pytest.raises(ItemExists):
        agg.insert(2, "a")
    assert agg.count() == 1
    assert agg.get("a").key == 1


def test_replace_moves_across_namespaces(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(1, "a", 5, namespace="x")
    agg.replace("a", 3, 7, namespace="y")
    assert agg.count(namespace="x") == 0
    assert agg.get("a") == Item(3, "a", 7, "y")
    assert agg.namespaces() == ["y"]
    assert agg.at(0, namespace="y") == Item(3, "a", 7, "y")
    agg.validate()


def test_keys_decode_by_value(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(1.0, "f")
    agg.insert([1, [2.0, "x"]], "l")
    agg.insert(2.5, (1.0, "x"))
    items = list(agg.iter())
    assert items[0].key == 1 and type(items[0].key) is int
    assert items[1].key == 2.5 and items[1].id == (1, "x") and type(items[1].id[0]) is int
    assert items[2].key == (1, (2, "x")) and type(items[2].key) is tuple
    assert agg.get("l").key == (1, (2, "x"))


def test_int_and_float_sums(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(1, 1, 2**53 + 1)
    agg.insert(2, 2, 1)
    assert agg.sum() == 2**53 + 2 and type(agg.sum()) is int
    agg.insert(3, 3, 0.5)
    # Added in key order: the ints exactly (2**53 + 2, which a float holds: floats are 2
    # apart there), then + 0.5 rounds to even, to 2**53 + 2.0 (the exact 2**53 + 2.5
    # rounded). Had the int item 1 been lost, float(2**53 + 1) + 0.5 rounds to 2**53.
    total = agg.sum()
    assert total == 2**53 + 2 and type(total) is float
    assert agg.sum(bounds={"upper": {"key": 2}}) == 2**53 + 2
    assert agg.sum(bounds={"lower": {"key": 2}}) == 1.5
    agg.delete(3)  # without the float item the sum is an exact int again
    assert agg.sum() == 2**53 + 2 and type(agg.sum()) is int


def test_int_sums_are_exact_beyond_64_bits(tmp_path: Path) -> None:
    """Item sums are int64, but node and range sums are exact Python ints of any size."""
    path = tmp_path / "store"
    with Store.open(path, max_node_size=4, cache_nodes=16) as s:
        agg = s.aggregate("agg")
        for i in range(12):  # internal nodes hold child sums beyond 2**64
            agg.insert(i, i, 2**62)
        for i in range(12, 212):  # enough writes to force checkpoints of those nodes
            agg.insert(i, i, 1)
        for i in range(212, 224):
            agg.insert(i, i, -(2**63))
        assert agg.sum() == 12 * 2**62 + 200 - 12 * 2**63
        assert agg.sum(bounds={"upper": {"key": 11}}) == 12 * 2**62
        assert agg.sum(bounds={"lower": {"key": 212}}) == -12 * 2**63
        agg.validate()
    with Store.open(path, max_node_size=4) as s:
        agg = s.aggregate("agg")
        assert agg.count() == 224
        assert agg.sum() == 12 * 2**62 + 200 - 12 * 2**63
        agg.validate()


def test_aborted_batch_after_metadata_only_batch_keeps_committed_items(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.upsert(1, "x")
    with store.batch() as b:  # commits metadata only
        b.put_meta(b"offset", b"1")
    with pytest.raises(RuntimeError), store.batch():
        agg.upsert(2, "y")
        raise RuntimeError("abort")
    assert agg.count() == 1
    assert agg.get("x") == Item(1, "x", 0, None)
    assert store.get_meta(b"offset") == b"1"
    agg.validate()


def test_float_sums_do_not_drift(store: Any) -> None:
    agg = store.aggregate("agg")
    agg.insert(0, "small", 0.1)
    for i in range(300):
        agg.upsert(1, "big", 1e17 if i % 2 == 0 else 0.3)
    # A running total would have lost 0.1 and 0.3 against 1e17 many times over; recomputed
    # from the two items left it is 0.1 + 0.3, exactly 0.4.
    assert agg.sum() == 0.1 + 0.3 == 0.4
    agg.delete("big")
    assert agg.sum() == 0.1


# ---------------------------------------------------------------------------
# Bounds semantics


def test_bounds_forms(store: Any) -> None:
    agg = store.aggregate("agg")
    for i, k in enumerate([1, 2, 2, 2, 3, (1, "a"), (1, "b"), (1,), (2,)]):
        agg.insert(k, i, 1)
    assert agg.count(bounds={"lower": {"key": 2}}) == 8
    assert agg.count(bounds={"lower": {"key": 2, "inclusive": False}}) == 5
    assert agg.count(bounds=Bounds(upper=Bound(2, inclusive=False))) == 1
    assert agg.count(bounds=Bounds(lower=Bound(2), upper=Bound(2))) == 3
    # id cuts the tie group of key 2 (ids 1, 2, 3)
    assert agg.count(bounds=Bounds(lower=Bound(2, True, 2), upper=Bound(2))) == 2
    assert agg.count(bounds=Bounds(lower=Bound(2, False, 2), upper=Bound(2))) == 1
    assert agg.count(bounds={"upper": {"key": 2, "inclusive": True, "id": 2}}) == 3
    assert agg.count(bounds={"upper": {"key": 2, "inclusive": False, "id": 2}}) == 2
    assert agg.count(bounds={"eq": 2.0}) == 3
    assert agg.count(bounds=Bounds(eq=(1,))) == 1
    # prefix: tuples starting with 1, the tuple (1,) itself included
    assert agg.count(bounds={"prefix": [1]}) == 3
    assert agg.count(bounds=Bounds(prefix=(1, "a"))) == 1
    assert agg.count(bounds=Bounds(prefix=())) == 4
    assert [i.key for i in agg.iter(bounds={"prefix": (1,)})] == [(1,), (1, "a"), (1, "b")]
    # lower > upper: empty everywhere
    inverted = {"lower": {"key": 3}, "upper": {"key": 1}}
    assert agg.count(bounds=inverted) == 0
    assert agg.sum(bounds=inverted) == 0
    assert agg.min(bounds=inverted) is None
    assert agg.paginate(None, 5, bounds=inverted).is_done
    assert agg.index_of(2, bounds=inverted) == 0
    with pytest.raises(OffsetOutOfRange):
        agg.at(0, bounds=inverted)


def test_index_of(store: Any) -> None:
    agg = store.aggregate("agg")
    for i, k in enumerate([1, 2, 2, 2, 3]):
        agg.insert(k, i)
    assert agg.index_of(2) == 1
    assert agg.index_of(2, order="desc") == 1
    assert agg.index_of(2, 2) == 2
    assert agg.index_of(2, 2, order="desc") == 2
    assert agg.index_of(2.5) == 4
    assert agg.index_of(0) == 0
    assert agg.index_of(9) == 5
    assert agg.index_of(9, order="desc") == 0
    assert agg.index_of(2, bounds={"lower": {"key": 2, "id": 2}}) == 0
    assert agg.index_of(3, bounds={"lower": {"key": 2, "id": 2}}) == 2


def test_pagination_is_done_is_exact(store: Any) -> None:
    agg = store.aggregate("agg")
    for i in range(6):
        agg.insert(i, i)
    p1 = agg.paginate(None, 3)
    assert [i.key for i in p1.items] == [0, 1, 2] and not p1.is_done
    p2 = agg.paginate(p1.cursor, 3)
    assert [i.key for i in p2.items] == [3, 4, 5] and p2.is_done
    d1 = agg.paginate(None, 4, order="desc")
    assert [i.key for i in d1.items] == [5, 4, 3, 2] and not d1.is_done
    d2 = agg.paginate(d1.cursor, 4, order="desc")
    assert [i.key for i in d2.items] == [1, 0] and d2.is_done


def test_pagination_survives_writes_between_pages(store: Any) -> None:
    agg = store.aggregate("agg")
    for i in range(10):
        agg.insert(i, i)
    p1 = agg.paginate(None, 4)
    agg.delete(3)  # the cursor's item disappears
    agg.insert(3.5, "new")
    agg.insert(-1, "before")
    rest: list[Any] = []
    cursor = p1.cursor
    while True:
        p = agg.paginate(cursor, 3)
        rest.extend(i.key for i in p.items)
        if p.is_done:
            break
        cursor = p.cursor
    assert rest == [3.5, 4, 5, 6, 7, 8, 9]


def test_batch_queries(store: Any) -> None:
    agg = store.aggregate("agg")
    for i in range(5):
        agg.insert(i, i, i, namespace="a")
        agg.insert(i, 10 + i, 2 * i, namespace="b")
    qs: list[Any] = [
        Query(namespace="a"),
        {"namespace": "b", "bounds": {"lower": {"key": 3}}},
        Query(namespace="c"),
    ]
    assert agg.count_batch(qs) == [5, 2, 0]
    assert agg.sum_batch(qs) == [10, 14, 0]
    got = agg.at_batch([Query(namespace="a", offset=-1), {"namespace": "b", "offset": 1}])
    assert got == [Item(4, 4, 4, "a"), Item(1, 11, 2, "b")]


# ---------------------------------------------------------------------------
# Batches and metadata


def test_batch_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store.open(path, max_node_size=4) as s:
        agg = s.aggregate("agg")
        fill(agg)
        before = snapshot(agg)
        with pytest.raises(RuntimeError), s.batch() as b:
            for i in range(50):
                agg.upsert(i, f"x{i}", i)
            agg.delete("a")
            b.put_meta(b"k", b"v")
            raise RuntimeError("midway")
        assert snapshot(agg) == before
        assert s.get_meta(b"k") is None
        agg.validate()
        with s.batch() as b:
            for i in range(50):
                agg.upsert(i, f"x{i}", i)
            b.put_meta(b"k", b"v2")
        assert agg.count() == 53
        assert s.get_meta(b"k") == b"v2"
    with Store.open(path, max_node_size=4) as s:
        agg = s.aggregate("agg")
        assert agg.count() == 53
        assert s.get_meta(b"k") == b"v2"
        agg.validate()


def test_persistence_across_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store"
    s = Store.open(path, max_node_size=4)
    agg = s.aggregate("scores")
    for i in range(200):
        agg.insert(i % 17, i, i, namespace=i % 3)
    for i in range(0, 200, 5):
        agg.delete(i)
    before = snapshot(agg)
    with s.batch() as b:
        b.put_meta(b"offset", b"42")
    s.aggregate("other").insert(1, 1)
    s.close()
    with Store.open(path) as s2:
        agg2 = s2.aggregate("scores")
        assert snapshot(agg2) == before
        assert s2.get_meta(b"offset") == b"42"
        assert sorted(s2.aggregates()) == ["other", "scores"]
        assert agg2.namespaces() == [0, 1, 2]
        agg2.validate()
        # writes keep working on the reopened trees
        for i in range(200, 260):
            agg2.upsert(i % 5, i, 1, namespace=1)
        agg2.validate()
        assert agg2.count() == 0  # default namespace unused
        assert agg2.count(namespace=1) == len([i for i in range(200) if i % 3 == 1 and i % 5]) + 60


def test_clear_with_node_size_then_many_inserts(store: Any) -> None:
    agg = store.aggregate("agg")
    for i in range(30):
        agg.insert(i, i, 1, namespace="big")
        agg.insert(i, 100 + i, 1, namespace="keep")
    agg.clear(namespace="big", max_node_size=5)
    assert agg.count(namespace="big") == 0
    assert agg.get(3) is None and agg.get(103) == Item(3, 103, 1, "keep")
    agg.insert(0, 3, 1)  # id 3 is free again
    for i in range(1000, 1600):
        agg.insert((i * 7919) % 613, i, i, namespace="big")
    agg.validate()
    assert agg.count(namespace="big") == 600
    assert agg.sum(namespace="big") == sum(range(1000, 1600))
    keys = [i.key for i in agg.iter(namespace="big")]
    assert keys == sorted((i * 7919) % 613 for i in range(1000, 1600))
    for i in range(1000, 1600, 2):
        agg.delete(i)
    agg.validate()
    assert agg.count(namespace="big") == 300
    assert agg.count(namespace="keep") == 30


def test_drop_namespace_and_clear_all(store: Any) -> None:
    agg = store.aggregate("agg")
    other = store.aggregate("other")
    for i in range(20):
        agg.insert(i, i, namespace=i % 2)
        other.insert(i, i)
    agg.drop_namespace(0)
    assert agg.namespaces() == [1]
    assert agg.get(0) is None and agg.get(1) == Item(1, 1, 0, 1)
    agg.insert(0, 0)  # id 0 can be reused
    agg.clear_all()
    assert agg.namespaces() == [] and agg.get(1) is None and agg.count(namespace=1) == 0
    assert other.count() == 20
    agg.insert(5, 1, namespace=1)
    assert agg.count(namespace=1) == 1
    agg.validate()
    other.validate()


# ---------------------------------------------------------------------------
# TableAggregate


def test_table_aggregate_field_names(store: Any) -> None:
    defn = TableAggregate(
        "scores", table="players", sort_key="score", sum_value="score", namespace="game"
    )
    t = defn.bind(store)
    t.insert({"id": 1, "score": 50, "game": "g1"})
    t.insert({"id": 2, "score": 70, "game": "g1"})
    t.upsert({"id": 3, "score": 60, "game": "g2"})
    assert t.count(namespace="g1") == 2
    assert t.sum(namespace="g1") == 120
    assert t.at(0, namespace="g1") == Item(50, 1, 50, "g1")
    with pytest.raises(ItemExists):
        t.insert({"id": 1, "score": 1, "game": "g1"})
    # namespace move
    assert t.upsert({"id": 1, "score": 55, "game": "g2"}) is True
    assert t.count(namespace="g1") == 1
    assert [i.id for i in t.iter(namespace="g2")] == [1, 3]
    assert t.upsert({"id": 1, "score": 55, "game": "g2"}) is False
    # replace(old, new)
    t.replace({"id": 2, "score": 70, "game": "g1"}, {"id": 2, "score": 10, "game": "g2"})
    assert t.namespaces() == ["g2"]
    assert t.min(namespace="g2") == Item(10, 2, 10, "g2")
    with pytest.raises(ItemNotFound):
        t.replace({"id": 99, "score": 1, "game": "g1"}, {"id": 99, "score": 2, "game": "g1"})
    # deletes by row and by id
    t.delete({"id": 3, "score": 60, "game": "g2"})
    with pytest.raises(ItemNotFound):
        t.delete({"id": 3, "score": 60, "game": "g2"})
    assert t.delete_if_exists({"id": 2, "score": 0, "game": "g2"}) is True
    assert t.delete_if_exists(1) is True
    assert t.delete_if_exists(1) is False
    assert t.count(namespace="g2") == 0
    t.validate()


def test_table_aggregate_callables_tuple_keys_and_composite_ids(store: Any) -> None:
    defn = TableAggregate(
        "by_team",
        table="players",
        sort_key=("team", "score"),
        sum_value=lambda r: r["score"] * 2,
        namespace=lambda r: r["league"].upper(),
        id_field=("tenant", "id"),
    )
    t = defn.bind(store)
    rows = [
        {"tenant": "t1", "id": 1, "team": "red", "score": 3, "league": "a"},
        {"tenant": "t2", "id": 1, "team": "red", "score": 5, "league": "a"},
        {"tenant": "t1", "id": 2, "team": "blue", "score": 4, "league": "a"},
    ]
    for r in rows:
        t.upsert(r)
    assert t.count(namespace="A") == 3
    assert t.count(namespace="A", bounds={"prefix": ["red"]}) == 2
    assert t.sum(namespace="A", bounds=Bounds(prefix=("red",))) == 16
    first = t.at(0, namespace="A")
    assert first == Item(("blue", 4), ("t1", 2), 8, "A")
    assert t.get(("t2", 1)) == Item(("red", 5), ("t2", 1), 10, "A")
    assert t.delete_if_exists(("t1", 1)) is True
    assert t.count(namespace="A") == 2
    t.validate()


def test_table_aggregate_callable_sort_key_and_default_sum(store: Any) -> None:
    defn = TableAggregate("desc_score", table="players", sort_key=lambda r: -r["score"])
    t = defn.bind(store)
    for i, score in enumerate([5, 9, 1]):
        t.upsert({"id": i, "score": score})
    assert [i.id for i in t.iter()] == [1, 0, 2]
    assert t.sum() == 0
    assert t.max() == Item(-1, 2, 0, None)


def test_table_aggregate_filter_removes_row_on_update(store: Any) -> None:
    defn = TableAggregate(
        "active", table="users", sort_key="age", sum_value="age", filter=lambda r: r["active"]
    )
    t = defn.bind(store)
    assert t.upsert({"id": 1, "age": 30, "active": True}) is True
    assert t.upsert({"id": 2, "age": 40, "active": False}) is False
    t.insert({"id": 3, "age": 20, "active": False})  # filtered out: nothing inserted
    assert t.count() == 1 and t.get(3) is None
    assert t.upsert({"id": 1, "age": 31, "active": False}) is True
    assert t.count() == 0 and t.get(1) is None
    assert t.upsert({"id": 1, "age": 31, "active": False}) is False
    t.upsert({"id": 4, "age": 50, "active": True})
    t.replace({"id": 4, "age": 50, "active": True}, {"id": 4, "age": 51, "active": False})
    assert t.count() == 0
    t.validate()


def test_table_aggregate_persists(tmp_path: Path) -> None:
    defn = TableAggregate("s", table="t", sort_key="k", sum_value="v")
    with Store.open(tmp_path / "st") as s:
        t = defn.bind(s)
        for i in range(50):
            t.upsert({"id": i, "k": i % 7, "v": i})
    with Store.open(tmp_path / "st") as s:
        t = defn.bind(s)
        assert t.count() == 50 and t.sum() == sum(range(50))
        t.validate()


# ---------------------------------------------------------------------------
# Read-only store in a second process

READER = textwrap.dedent(
    """
    import json, sys
    from tally.engine import ReadOnlyStore, Store
    s = Store.open(sys.argv[1], read_only=True)
    agg = s.aggregate("agg")
    def report():
        print(json.dumps({"count": agg.count(), "sum": agg.sum(),
                          "meta": (s.get_meta(b"m") or b"").decode(),
                          "keys": [i.key for i in agg.iter()]}), flush=True)
    report()
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "refresh":
            s.refresh()
            report()
        elif cmd == "write":
            errors = []
            for w in (lambda: agg.insert(1, "ro"), lambda: agg.upsert(1, "ro"),
                      lambda: agg.delete_if_exists(1), lambda: agg.clear(),
                      lambda: agg.delete(1)):
                try:
                    w()
                    errors.append("no error")
                except ReadOnlyStore as e:
                    errors.append("ReadOnlyStore" if str(e) else "empty message")
                except Exception as e:
                    errors.append(type(e).__name__)
            try:
                with s.batch():
                    pass
                errors.append("no error")
            except ReadOnlyStore:
                errors.append("ReadOnlyStore")
            print(json.dumps({"errors": errors}), flush=True)
        elif cmd == "quit":
            break
    s.close()
    """
)


def test_read_only_store_in_second_process(tmp_path: Path) -> None:
    path = tmp_path / "store"
    writer = Store.open(path, max_node_size=4)
    agg = writer.aggregate("agg")
    for i in range(10):
        agg.insert(i, i, i)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(REPO),
    )
    try:
        assert child.stdout is not None and child.stdin is not None

        def ask(cmd: str | None) -> dict[str, Any]:
            assert child.stdin is not None and child.stdout is not None
            if cmd is not None:
                child.stdin.write(cmd + "\n")
                child.stdin.flush()
            line = child.stdout.readline()
            assert line, child.stderr.read() if child.stderr else ""
            answer: dict[str, Any] = json.loads(line)
            return answer

        first = ask(None)
        assert first == {"count": 10, "sum": 45, "meta": "", "keys": list(range(10))}
        # the writer keeps writing while the reader has the store open
        with writer.batch() as b:
            for i in range(10, 40):
                agg.insert(i, i, i)
            agg.delete(0)
            b.put_meta(b"m", b"v1")
        # uncommitted (aborted) work must never be visible
        with pytest.raises(RuntimeError), writer.batch():
            agg.insert(1000, "never", 1)
            raise RuntimeError
        second = ask("refresh")
        assert second == {
            "count": 39,
            "sum": sum(range(1, 40)),
            "meta": "v1",
            "keys": list(range(1, 40)),
        }
        got = ask("write")
        assert got["errors"] == ["ReadOnlyStore"] * 6
        agg.upsert(-5, "late")
        third = ask("refresh")
        assert third["count"] == 40 and third["keys"][0] == -5
        child.stdin.write("quit\n")
        child.stdin.flush()
        assert child.wait(timeout=30) == 0, child.stderr.read() if child.stderr else ""
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        writer.close()
    # the writer's state is untouched by the reader
    with Store.open(path) as s:
        assert s.aggregate("agg").count() == 40
        s.aggregate("agg").validate()


def test_read_only_store_in_process_rejects_writes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with Store.open(path) as s:
        s.aggregate("agg").insert(1, 1)
    with Store.open(path, read_only=True) as ro:
        agg = ro.aggregate("agg")
        assert agg.count() == 1
        with pytest.raises(ReadOnlyStore):
            agg.upsert(2, 2)
        with pytest.raises(ReadOnlyStore):
            agg.clear_all()
        assert agg.count() == 1


def test_reader_refresh_tracks_writer_through_checkpoints(tmp_path: Path) -> None:
    """A read-only store sees exactly the writer's committed state after each refresh,
    whether the writer only logged changes or also checkpointed (small cache) meanwhile."""
    path = tmp_path / "store"
    rng = random.Random(7)
    writer = Store.open(path, max_node_size=4, cache_nodes=16)
    wagg = writer.aggregate("agg")
    wagg.upsert(0, 0)
    reader = Store.open(path, read_only=True)
    try:
        ragg = reader.aggregate("agg")
        for round_ in range(60):
            n_batches = rng.choice((0, 1, 1, 2, 5, 20))
            for _ in range(n_batches):
                with writer.batch() as b:
                    for _ in range(rng.choice((1, 3, 10))):
                        id_ = rng.randrange(150)
                        if rng.random() < 0.3:
                            wagg.delete_if_exists(id_)
                        else:
                            wagg.upsert(
                                rng.randrange(12), id_, rng.randrange(5), rng.choice((None, "n"))
                            )
                    b.put_meta(b"round", str(round_).encode())
            if round_ % 17 == 16:
                wagg.clear(namespace="n")
            if round_ % 23 == 22:
                writer.close()  # checkpoint on close; reader keeps reading
                writer = Store.open(path, max_node_size=4, cache_nodes=16)
                wagg = writer.aggregate("agg")
            reader.refresh()
            assert reader.get_meta(b"round") == writer.get_meta(b"round")
            for ns in (None, "n"):
                assert list(ragg.iter(namespace=ns)) == list(wagg.iter(namespace=ns)), (round_, ns)
                assert ragg.count(namespace=ns) == wagg.count(namespace=ns)
                assert ragg.sum(namespace=ns) == wagg.sum(namespace=ns)
            ragg.validate()
    finally:
        reader.close()
        writer.close()


def test_namespaces_are_any_key_value(store: Any) -> None:
    agg = store.aggregate("agg")
    spaces: list[Any] = [None, 2.0, ("a", 1), b"x", "s", -1.5, True]
    for i, ns in enumerate(spaces):
        agg.insert(i, i, 1, namespace=ns)
    assert agg.namespaces() == [None, -1.5, 2, True, "s", b"x", ("a", 1)]
    assert type(agg.namespaces()[2]) is int
    assert agg.count(namespace=2) == 1 and agg.count(namespace=["a", 1.0]) == 1
    assert agg.get(1).namespace == 2
    agg.drop_namespace(("a", 1))
    assert ("a", 1) not in agg.namespaces()
    agg.validate()


def test_keys_with_long_common_prefixes(store: Any) -> None:
    """Keys that differ late (and contain the escape bytes 00/FF) still order and route exactly."""
    rng = random.Random(3)
    agg = store.aggregate("agg")
    stems = ["", "a" * 300, "a" * 300 + "\x00", "a" * 299 + "\x00\x00", "\x00" * 50]
    keys: list[Any] = []
    for i in range(400):
        stem = rng.choice(stems)
        tail = "".join(rng.choice("\x00\x01a\xff\uffff") for _ in range(rng.randrange(4)))
        k: Any = stem + tail
        k = rng.choice([k, k.encode("utf-8"), (k, rng.randrange(3)), (b"\xff" * 40, k)])
        keys.append(k)
        agg.insert(k, i)
    agg.validate()

    order = sorted(range(400), key=lambda i: (encode_key(keys[i]), encode_key(i)))
    assert [it.id for it in agg.iter()] == order
    for _ in range(200):
        a, b = rng.choice(keys), rng.choice(keys)
        lo_inc, hi_inc = rng.random() < 0.5, rng.random() < 0.5
        ea, eb = encode_key(a), encode_key(b)
        expect = [
            i
            for i in order
            if (encode_key(keys[i]) >= ea if lo_inc else encode_key(keys[i]) > ea)
            and (encode_key(keys[i]) <= eb if hi_inc else encode_key(keys[i]) < eb)
        ]
        bounds = {
            "lower": {"key": a, "inclusive": lo_inc},
            "upper": {"key": b, "inclusive": hi_inc},
        }
        assert agg.count(bounds=bounds) == len(expect)
        assert [it.id for it in agg.iter(bounds=bounds)] == expect
        if expect:
            assert agg.at(-1, bounds=bounds).id == expect[-1]
        assert agg.index_of(a) == sum(1 for i in order if encode_key(keys[i]) < ea)
    for i in range(0, 400, 3):
        agg.delete(i)
    agg.validate()
    assert [it.id for it in agg.iter()] == [i for i in order if i % 3]


def test_a_second_writer_gets_store_locked(tmp_path: Path) -> None:
    from tally.engine import StoreLocked

    with Store.open(tmp_path / "s") as first:
        first.aggregate("a").insert(1, 1)
        with pytest.raises(StoreLocked, match="another process is writing this store"):
            Store.open(tmp_path / "s")
        with Store.open(tmp_path / "s", read_only=True) as reader:  # readers are never locked out
            assert reader.aggregate("a").count() == 1


def test_id_cache_is_bounded_and_a_bad_size_is_refused(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s", cache_ids=1000) as store:
        agg = store.aggregate("a")
        with store.batch():
            for i in range(5000):
                agg.upsert(i, i, i)
        store.checkpoint()  # the 5,000 entries move from dirty to the (bounded) clean cache
        assert store.stats()["dirty_ids"] == 0
        assert store.stats()["cached_ids"] <= 1000
        for i in range(0, 6000, 3):  # misses read RocksDB and are cached, absent ids too
            assert (agg.get(i) is None) is (i >= 5000)
        assert store.stats()["cached_ids"] <= 1000
    with pytest.raises(InvalidArgument, match="cache_ids must be an int >= 0"):
        Store.open(tmp_path / "t", cache_ids=-1)


def _set_format(path: Path, version: bytes) -> None:
    from tally.engine.state.db import Database
    from tally.engine.state.metadata import K_VERSION

    db = Database(str(path), read_only=False)
    try:
        db.meta[K_VERSION] = version
    finally:
        db.close()


def test_a_format_2_store_is_upgraded_in_place_by_a_writer(tmp_path: Path) -> None:
    """Format 2 wrote every id-index entry at commit: format 3 reads it as it is, and a
    writer marks it 3 so that a format-2 writer refuses it from then on."""
    from tally.engine.state.db import Database
    from tally.engine.state.metadata import FORMAT_VERSION, K_VERSION

    path = tmp_path / "s"
    with Store.open(path) as s:
        agg = s.aggregate("a")
        with s.batch():
            for i in range(20):
                agg.upsert(i, i, i)
    _set_format(path, b"2")
    with Store.open(path, read_only=True) as r:  # a reader reads it as it is
        assert r.aggregate("a").count() == 20
    with Store.open(path) as s:
        assert s.aggregate("a").get(7) is not None and s.aggregate("a").count() == 20
    db = Database(str(path), read_only=True)
    try:
        assert db.meta.get(K_VERSION) == FORMAT_VERSION == b"3"
    finally:
        db.close()


def test_a_store_of_an_unknown_format_is_refused_by_writers_and_readers(tmp_path: Path) -> None:
    path = tmp_path / "s"
    Store.open(path).close()
    _set_format(path, b"9")
    for read_only in (False, True):
        with pytest.raises(TallyError, match=r"has format b'9'.*rebuild it"):
            Store.open(path, read_only=read_only)
    _set_format(path, b"3")
    Store.open(path).close()  # the refusal left nothing locked behind
