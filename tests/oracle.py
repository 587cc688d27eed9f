"""A tiny, independent model of what a consumer must build from change events.

The oracle knows nothing of the engine or the decoder: it reads the shapes the
consumer tests produce with plain ``json``/``msgspec`` calls, keeps the latest
row image per id per table (deleted ids removed, a truncate clears the table),
and maps rows to items with the definitions' own functions (``filter``,
``sort_key``, ``sum_value``, ``namespace``). Order is the documented key order
(``None < numbers < bool < str < bytes < tuple/list``), implemented here on
plain Python values.

* `Event` — one logical change: ``("upsert", table, id, row)``,
  ``("delete", table, id, None)`` or ``("truncate", table, None, None)``.
* `interpret_record` — a Kafka record (key, value) as the tests produce it →
  an `Event`.
* `expected_items` — events + definitions → ``{aggregate: {namespace: [items]}}``.
* `assert_store_matches` — compare a `Store` with that, via validate / count /
  sum / iter / at / index_of / namespaces.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import msgspec


class Event(NamedTuple):
    kind: str  # "upsert" | "delete" | "truncate"
    table: str
    id: Any
    row: dict[str, Any] | None


class ExpectedItem(NamedTuple):
    key: Any
    id: Any
    sum_value: int | float


# aggregate name -> namespace -> items in (key, id) order
Expected = dict[str, dict[Any, list[ExpectedItem]]]


# ---------------------------------------------------------------- key order


def order_key(v: Any) -> tuple[Any, ...]:
    """Sort key realizing the documented total order on plain Python values."""
    if v is None:
        return (0,)
    if isinstance(v, bool):
        return (2, v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and math.isnan(v):
            raise ValueError("NaN has no place in the key order")
        return (1, v)  # int/float compare exactly in Python
    if isinstance(v, str):
        return (3, v)
    if isinstance(v, (bytes, bytearray)):
        return (4, bytes(v))
    if isinstance(v, (tuple, list)):
        return (5, tuple(order_key(e) for e in v))
    raise TypeError(f"value {v!r} has no key order")


def canon(v: Any) -> Any:
    """A type-aware canonical form for equality: True != 1, [1] == (1,), 1 == 1.0."""
    if v is None:
        return ("none",)
    if isinstance(v, bool):
        return ("bool", v)
    if isinstance(v, (int, float)):
        return ("num", v)
    if isinstance(v, str):
        return ("str", v)
    if isinstance(v, (bytes, bytearray)):
        return ("bytes", bytes(v))
    if isinstance(v, (tuple, list)):
        return ("seq", tuple(canon(e) for e in v))
    return ("other", repr(v))


def hashable(v: Any) -> Any:
    """JSON arrays → tuples (recursively), so ids can be dict keys."""
    if isinstance(v, list | tuple):
        return tuple(hashable(e) for e in v)
    return v


# ---------------------------------------------------------------- records

_MSGPACK = msgspec.msgpack.Decoder()


def _key_id(key: bytes | None) -> Any:
    """The id a test's Kafka key carries: a JSON value, a ``{"id": x}`` struct,
    or the converter's ``{"schema", "payload"}`` wrapper around either."""
    if not key:
        return None
    v = json.loads(key)
    if isinstance(v, dict) and set(v) == {"schema", "payload"}:
        v = v["payload"]
    if isinstance(v, dict):
        v = v.get("id")
    return hashable(v)


def interpret_record(key: bytes | None, value: bytes | None, table: str) -> Event | None:
    """The change a well-formed test record stands for; None for a logical message.

    Handles the shapes the consumer tests produce (it is a model, not a
    decoder): native JSON/msgpack, the Debezium envelope bare or inside the
    schema/payload wrapper, ExtractNewRecordState rows with ``__deleted``,
    tombstones. ``table`` is the topic's table (tombstones name none).
    """
    if value is None:
        return Event("delete", table, _key_id(key), None)
    doc = _MSGPACK.decode(value) if value[0] >= 0x80 else json.loads(value)
    if doc is None:
        return Event("delete", table, _key_id(key), None)
    if set(doc) == {"schema", "payload"}:
        doc = doc["payload"]
        if doc is None:
            return Event("delete", table, _key_id(key), None)
    op = doc.get("op")
    if op in ("insert", "update", "delete", "truncate"):  # native
        tbl = doc.get("table") or table
        if op == "truncate":
            return Event("truncate", tbl, None, None)
        rid = doc.get("id")
        if rid is None:
            rid = _key_id(key)
        if rid is None:
            rid = (doc.get("after") or doc.get("before") or {}).get("id")
        if op == "delete":
            return Event("delete", tbl, hashable(rid), None)
        return Event("upsert", tbl, hashable(rid), doc["after"])
    if op is not None and ("source" in doc or "after" in doc or "before" in doc):  # envelope
        tbl = (doc.get("source") or {}).get("table") or table
        if op == "m":
            return None
        if op == "t":
            return Event("truncate", tbl, None, None)
        rid = _key_id(key)
        if op == "d":
            if rid is None:
                rid = (doc.get("before") or {}).get("id")
            return Event("delete", tbl, hashable(rid), None)
        row = doc["after"]
        return Event("upsert", tbl, hashable(rid if rid is not None else row["id"]), row)
    # ExtractNewRecordState row
    row = {k: v for k, v in doc.items() if not k.startswith("__")}
    tbl = doc.get("__table") or table
    rid = _key_id(key)
    if rid is None:
        rid = hashable(row["id"])
    if doc.get("__op") == "t":
        return Event("truncate", tbl, None, None)
    if doc.get("__deleted") in ("true", True) or doc.get("__op") == "d":
        return Event("delete", tbl, rid, None)
    return Event("upsert", tbl, rid, row)


def interpret_all(
    records: Iterable[tuple[int, int, bytes | None, bytes | None, Any]], table: str
) -> list[tuple[int, int, Event | None]]:
    """`interpret_record` over ``read_all`` output: ``[(partition, offset, event)]``."""
    return [
        (part, off, interpret_record(key, value, table)) for part, off, key, value, _h in records
    ]


def cut(
    parsed: Iterable[tuple[int, int, Event | None]], upto: Mapping[int, int] | None
) -> list[Event]:
    """The events of partition ``p`` below offset ``upto[p]`` (none of a partition
    missing from ``upto``; all when ``upto`` is None), in (partition, offset) order."""
    return [
        ev
        for part, off, ev in parsed
        if ev is not None and (upto is None or off < upto.get(part, 0))
    ]


def events_from_records(
    records: Iterable[tuple[int, int, bytes | None, bytes | None, Any]],
    table: str,
    upto: Mapping[int, int] | None = None,
) -> list[Event]:
    """`cut` of `interpret_all`: the changes of the records below ``upto``."""
    return cut(interpret_all(records, table), upto)


# ---------------------------------------------------------------- the model


def table_state(events: Iterable[Event]) -> dict[str, dict[Any, dict[str, Any]]]:
    """table → id → latest row image, after deletes and truncates."""
    tables: dict[str, dict[Any, dict[str, Any]]] = {}
    for ev in events:
        rows = tables.setdefault(ev.table, {})
        if ev.kind == "upsert":
            assert ev.row is not None
            rows[ev.id] = ev.row
        elif ev.kind == "delete":
            rows.pop(ev.id, None)
        elif ev.kind == "truncate":
            rows.clear()
        else:  # pragma: no cover - the model only builds the kinds above
            raise ValueError(f"unknown event kind {ev.kind!r}")
    return tables


def expected_items(events: Iterable[Event], definitions: Sequence[Any]) -> Expected:
    """What every aggregate must hold: ``{name: {namespace: [ExpectedItem, ...]}}``.

    Rows map to items through the definition's public `item(row, id)` (its
    filter and extractors: the user's functions). Empty namespaces are absent.
    """
    tables = table_state(events)
    out: Expected = {}
    for d in definitions:
        per_ns: dict[Any, list[ExpectedItem]] = {}
        ns_of: dict[Any, Any] = {}
        for rid, row in tables.get(d.table, {}).items():
            it = d.item(row, rid)
            if it is None:
                continue
            # group namespaces by canonical form (1 and 1.0 are one namespace)
            cn = canon(it.namespace)
            ns = ns_of.setdefault(cn, hashable(it.namespace))
            per_ns.setdefault(ns, []).append(ExpectedItem(hashable(it.key), rid, it.sum_value))
        for items in per_ns.values():
            items.sort(key=lambda i: (order_key(i.key), order_key(i.id)))
        out[d.name] = per_ns
    return out


def total_items(expected: Expected) -> int:
    return sum(len(v) for per_ns in expected.values() for v in per_ns.values())


# ---------------------------------------------------------------- comparison


def _sum_equal(got: int | float, want: int | float) -> bool:
    if isinstance(want, float) or isinstance(got, float):
        return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
    return got == want and type(got) is type(want)


def validate_all(store: Any) -> None:
    """Every physical aggregate's invariants: `Store.validate()` plus each generation
    (active and building) of the catalog, which a logical name cannot reach while
    another generation serves it."""
    gens = store.generations() if hasattr(store, "generations") else {}
    if all(g.active is not None for g in gens.values()):
        store.validate()
    for g in gens.values():
        for phys in (g.active, g.building):
            if phys is not None:
                store.aggregate(phys).validate()


def assert_store_matches(
    store: Any, definitions: Sequence[Any], expected: Expected, *, partial: bool = False
) -> None:
    """The store holds exactly ``expected``: validate(), namespaces, count, sum and
    the full ordered item list of every namespace of every definition.
    ``partial=True`` reads the generations being built (replay) where none is ready."""
    validate_all(store)
    for d in definitions:
        agg = store.aggregate(d.name, partial=True) if partial else store.aggregate(d.name)
        want_ns = expected.get(d.name, {})
        got_ns = agg.namespaces()
        assert sorted(map(canon, got_ns)) == sorted(map(canon, want_ns)), (
            f"aggregate {d.name!r}: namespaces {sorted(got_ns, key=order_key)!r} "
            f"!= expected {sorted(want_ns, key=order_key)!r}"
        )
        for ns, items in want_ns.items():
            where = f"aggregate {d.name!r} namespace {ns!r}"
            got = list(agg.iter(namespace=ns))
            got_c = [(canon(i.key), canon(i.id)) for i in got]
            want_c = [(canon(i.key), canon(i.id)) for i in items]
            if got_c != want_c:
                got_ids = {canon(i.id) for i in got}
                want_ids = {canon(i.id) for i in items}
                diff = [i for i, (a, b) in enumerate(zip(got_c, want_c, strict=False)) if a != b]
                raise AssertionError(
                    f"{where}: item order/keys differ: {len(got)} items vs {len(items)} expected; "
                    f"missing ids {sorted(want_ids - got_ids)[:10]}, extra ids "
                    f"{sorted(got_ids - want_ids)[:10]}, first differing position "
                    f"{diff[:1]}: got {got[diff[0]] if diff else None!r} "
                    f"want {items[diff[0]] if diff else None!r}"
                )
            for g, w in zip(got, items, strict=True):
                assert _sum_equal(g.sum_value, w.sum_value), (
                    f"{where}: id {w.id!r} sum value {g.sum_value!r} != {w.sum_value!r}"
                )
                assert canon(g.namespace) == canon(ns), f"{where}: item namespace {g.namespace!r}"
            assert agg.count(namespace=ns) == len(items), f"{where}: count"
            want_sum = sum(i.sum_value for i in items)
            assert _sum_equal(agg.sum(namespace=ns), want_sum), (
                f"{where}: sum {agg.sum(namespace=ns)!r} != {want_sum!r}"
            )
            if items:
                assert canon(agg.at(0, namespace=ns).id) == canon(items[0].id), f"{where}: at(0)"
                assert canon(agg.at(-1, namespace=ns).id) == canon(items[-1].id), f"{where}: at(-1)"
                mid = items[len(items) // 2]
                assert agg.index_of(mid.key, mid.id, namespace=ns) == len(items) // 2, (
                    f"{where}: index_of middle item"
                )
        # a namespace the model never saw reads as empty
        assert agg.count(namespace="no-such-namespace-zz") == 0
