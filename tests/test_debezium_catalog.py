"""The recorded Debezium output (tests/data/debezium/) says what its README says.

No JVM: these read the catalog that tests/debezium_catalog.py recorded from the real
connector. Each test pins one fact the decoder will rely on, so a catalog regenerated
with another Debezium version that changes the fact fails here (and the README needs
updating) instead of silently feeding the decoder's tests different ground truth.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).resolve().parent / "data" / "debezium"
PLACEHOLDER = "__debezium_unavailable_value"
INDEX = json.loads((DATA / "index.json").read_text())
CONFIGS = list(INDEX["configs"])
UNWRAP = [c for c in CONFIGS if c.startswith("unwrap")]


@dataclass(frozen=True)
class Rec:
    table: str
    step: str
    partition: int
    offset: int
    key: Any  # parsed JSON, wrapper stripped (None: null key)
    value: Any  # parsed JSON, wrapper stripped (None: tombstone)
    headers: dict[str, str]
    raw_value: Any  # parsed JSON with the wrapper, if any


def unwrap(doc: Any) -> Any:
    if isinstance(doc, dict) and set(doc) == {"schema", "payload"}:
        return doc["payload"]
    return doc


def records(config: str) -> list[Rec]:
    out = []
    for line in (DATA / f"{config}.jsonl").read_text().splitlines():
        d = json.loads(line)
        key = None if d["key"] is None else json.loads(d["key"])
        value = None if d["value"] is None else json.loads(d["value"])
        out.append(
            Rec(
                d["table"],
                d["step"],
                d["partition"],
                d["offset"],
                unwrap(key),
                unwrap(value),
                dict(d["headers"]),
                value,
            )
        )
    return out


def of(config: str, table: str, step: str | None = None) -> list[Rec]:
    return [r for r in records(config) if r.table == table and (step is None or r.step == step)]


def streamed(recs: list[Rec]) -> Iterator[Rec]:
    """Envelope records (not tombstones, not unwrapped) made by streaming, not the snapshot."""
    for r in recs:
        if isinstance(r.value, dict) and "source" in r.value and r.value["op"] != "r":
            yield r


def test_every_configuration_has_its_records_and_every_line_is_bytes_as_text() -> None:
    for config in CONFIGS:
        lines = (DATA / f"{config}.jsonl").read_text().splitlines()
        assert lines, config
        for line in lines:
            d = json.loads(line)
            assert set(d) == {"table", "step", "partition", "offset", "key", "value", "headers"}
            assert d["key"] is None or isinstance(d["key"], str)
            assert d["value"] is None or isinstance(d["value"], str)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in UNWRAP])
def test_source_sequence_orders_the_stream_and_lsn_alone_does_not(config: str) -> None:
    """Per partition, (sequence[0] or -1, lsn) never goes down in topic order; sequence[1]
    is the lsn as a string. Ties are only the delete + create of one primary-key change."""
    by_partition: dict[tuple[str, int], list[Rec]] = {}
    for r in streamed(records(config)):
        by_partition.setdefault((r.table, r.partition), []).append(r)
    for (table, _), recs in by_partition.items():
        keys = []
        for r in recs:
            src = r.value["source"]
            last_commit, lsn = json.loads(src["sequence"])
            assert lsn == str(src["lsn"]), (config, table, src)
            keys.append((-1 if last_commit is None else int(last_commit), src["lsn"]))
        assert keys == sorted(keys), (config, table, keys)
        ties = [r.step for r, a, b in zip(recs[1:], keys, keys[1:], strict=False) if a == b]
        assert set(ties) <= {"update_pk"}, (config, table, ties)


def test_interleaved_transactions_stream_in_commit_order_with_lower_lsns_later() -> None:
    recs = list(streamed(of("defaults", "interleave")))
    assert [r.value["after"]["v"] for r in recs] == ["b1", "b2", "a1", "a2"]  # B committed first
    lsns = [r.value["source"]["lsn"] for r in recs]
    assert lsns != sorted(lsns)


def test_truncate_has_a_null_key_and_a_position_and_lands_on_any_partition() -> None:
    for config in ("schemas_off", "truncate_1p", "truncate_3p"):
        truncs = [
            r for r in records(config) if isinstance(r.value, dict) and r.value.get("op") == "t"
        ]
        assert [r.step for r in truncs] == ["truncate", "one_transaction"], config
        for r in truncs:
            assert r.key is None
            assert r.value["before"] is None and r.value["after"] is None
            assert r.value["source"]["table"] == "trunc" and r.value["source"]["lsn"] > 0
    # in one transaction: insert, truncate, insert -> the truncate sits between them by lsn
    txn = {
        r.value["op"] + str((r.value["after"] or {}).get("id", "")): r.value["source"]["lsn"]
        for r in of("truncate_3p", "trunc", "one_transaction")
    }
    assert txn["c100"] < txn["t"] < txn["c101"]


def test_truncates_are_dropped_by_default_and_by_the_unwrap_smt() -> None:
    assert of("defaults", "trunc", "truncate") == []  # skipped.operations defaults to "t"
    for config in UNWRAP:  # skipped.operations=none, and still nothing
        assert of(config, "trunc", "truncate") == [], config
        ops = [r.value.get("__op") for r in of(config, "trunc") if r.value]
        assert "t" not in ops, config


def test_toast_placeholder_per_type_under_replica_identity_default_only() -> None:
    (upd,) = of("defaults", "toast_default", "update_other_column")
    after = upd.value["after"]
    assert after["note"] == PLACEHOLDER  # text
    assert after["doc"] == PLACEHOLDER  # jsonb: the bare string, not valid JSON
    assert base64.b64decode(after["blob"]) == PLACEHOLDER.encode()  # bytea: its bytes
    assert after["arr"] == list(PLACEHOLDER.encode())  # int[]: its bytes as ints
    assert upd.value["before"] is None
    (changed,) = of("defaults", "toast_default", "update_note")
    assert changed.value["after"]["note"] != PLACEHOLDER
    assert changed.value["after"]["doc"] == PLACEHOLDER
    (delete, tomb) = of("defaults", "toast_default", "delete")
    assert delete.value["before"] == {
        "id": 1,
        "n": None,
        "note": None,
        "blob": None,
        "doc": None,
        "arr": None,
    }
    assert tomb.value is None
    for r in of("defaults", "toast_full"):
        assert PLACEHOLDER not in json.dumps(r.value)
        assert "X19kZWJleml1bV91bmF2YWlsYWJsZV92YWx1ZQ" not in json.dumps(r.value)


def test_primary_key_change_is_delete_tombstone_create_with_key_headers() -> None:
    for table, old, new in (
        ("pk_single", {"id": 1}, {"id": 2}),
        ("pk_composite", {"a": 1, "b": "x"}, {"a": 1, "b": "y"}),
    ):
        d, tomb, c = of("defaults", table, "update_pk")
        assert (d.value["op"], tomb.value, c.value["op"]) == ("d", None, "c")
        assert d.key == tomb.key == old and c.key == new
        assert json.loads(d.headers["__debezium.newkey"]) == new
        assert json.loads(tomb.headers["__debezium.newkey"]) == new
        assert json.loads(c.headers["__debezium.oldkey"]) == old
    # With the SMT dropping deletes, only the header says the old id is gone.
    (only,) = of("unwrap_drop", "pk_single", "update_pk")
    assert only.key == {"id": 2} and json.loads(only.headers["__debezium.oldkey"]) == {"id": 1}


def raw_lines(config: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (DATA / f"{config}.jsonl").read_text().splitlines()]


def test_unwrap_delete_modes() -> None:
    """What one DELETE becomes, per delete.tombstone.handling.mode (raw value bytes)."""

    def shape(config: str) -> list[str]:
        out = []
        for d in raw_lines(config):
            if d["table"] != "pk_single" or d["step"] != "delete":
                continue
            value = d["value"]
            if value is None:
                out.append("kafka tombstone")
            elif value == "null":
                out.append("JSON null")
            else:
                out.append(f"__deleted={unwrap(json.loads(value)).get('__deleted')}")
        return out

    assert shape("unwrap_rewrite") == ["__deleted=true"]
    assert shape("unwrap_rewrite_with_tombstone") == ["__deleted=true", "kafka tombstone"]
    assert shape("unwrap_tombstone") == ["JSON null"]  # the default: NOT a Kafka tombstone
    assert shape("unwrap_delete_to_tombstone") == ["kafka tombstone"]
    assert shape("unwrap_drop") == []


def test_decimal_encodings() -> None:
    def row(config: str, rid: int) -> dict[str, Any]:
        (r,) = [r for r in of(config, "types", "snapshot") if r.value["after"]["id"] == rid]
        after: dict[str, Any] = r.value["after"]
        return after

    precise = row("defaults", 1)
    unscaled = int.from_bytes(base64.b64decode(precise["c_numeric"]), "big", signed=True)
    assert unscaled == 123456789012  # scale 2 from the schema: 1234567890.12
    var = precise["c_numeric_var"]
    assert var["scale"] == 35
    assert int.from_bytes(base64.b64decode(var["value"]), "big", signed=True) == int(
        "314159265358979323846264338327950288"
    )
    assert row("decimal_string", 1)["c_numeric"] == "1234567890.12"
    assert row("decimal_string", 3)["c_money"] == "-0.50"
    assert row("decimal_double", 1)["c_numeric_var"] == 3.141592653589793  # precision lost
    nan = {
        c: next(r.value["after"]["nv"] for r in of(c, "specials") if r.value["after"]["id"] == 1)
        for c in ("defaults", "decimal_double", "decimal_string")
    }
    assert nan == {"defaults": None, "decimal_double": "NaN", "decimal_string": "NAN"}


def test_schemas_off_drops_the_wrapper_only() -> None:
    on = {r.offset: r for r in of("defaults", "types", "snapshot")}
    off = {r.offset: r for r in of("schemas_off", "types", "snapshot")}
    assert set(on[0].raw_value) == {"schema", "payload"}
    assert "schema" not in off[0].raw_value
    assert on[0].value["after"] == off[0].value["after"]


def test_compacted_topic_kills_the_task_at_the_first_truncate_and_again_after_restart() -> None:
    info = INDEX["configs"]["compacted"]
    assert info["task_state"] == "FAILED"
    assert "Compacted topic cannot accept message without key" in info["trace"][-1]
    assert info["after_restart"]["states"][-1] == "FAILED"
    steps = {s["step"]: s["records"] for s in info["steps"]}
    assert steps["update"] == 1 and steps["truncate"] == 0 and steps["insert_after"] is None


def test_smt_tombstone_with_schemas_on_is_not_a_kafka_tombstone() -> None:
    """In the default "tombstone" mode the delete becomes a null value that keeps its
    schema: JsonConverter writes {"schema": ..., "payload": null} (schemas off: `null`)."""
    (delete,) = [d for d in raw_lines("unwrap_tombstone_schemas_on") if d["step"] == "delete"]
    assert delete["value"] is not None
    assert json.loads(delete["value"])["payload"] is None


def test_removed_delete_handling_mode_is_silently_ignored() -> None:
    recs = records("unwrap_removed_option")
    assert (
        INDEX["configs"]["unwrap_removed_option"]["config"][
            "transforms.unwrap.delete.handling.mode"
        ]
        == "rewrite"
    )
    assert all("__deleted" not in (r.value or {}) for r in recs)
    deletes = [d["value"] for d in raw_lines("unwrap_removed_option") if d["step"] == "delete"]
    assert deletes == ["null"]  # what the default mode writes: the option did nothing
