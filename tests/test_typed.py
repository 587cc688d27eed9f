"""Typed values (`tally.schemas.typed`): Debezium's logical types and declared column types."""

from __future__ import annotations

import base64
import json
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from uuid import UUID

import pytest

from tally.engine import Store, TableAggregate
from tally.engine.triggers import Applier
from tally.schemas import ConfigError, EventDecoder
from tally.schemas.typed import UNAVAILABLE, UnavailableValue, parse_column_type


def _b64_unscaled(n: int) -> str:
    return base64.b64encode(n.to_bytes((n.bit_length() + 8) // 8 or 1, "big", signed=True)).decode()


SCHEMA_FIELDS = [
    {"type": "int32", "optional": False, "field": "id"},
    {
        "type": "bytes",
        "name": "org.apache.kafka.connect.data.Decimal",
        "parameters": {"scale": "2", "connect.decimal.precision": "12"},
        "field": "amount",
    },
    {
        "type": "struct",
        "name": "io.debezium.data.VariableScaleDecimal",
        "field": "ratio",
        "fields": [{"type": "int32", "field": "scale"}, {"type": "bytes", "field": "value"}],
    },
    {"type": "string", "name": "io.debezium.time.ZonedTimestamp", "field": "created_at"},
    {"type": "int64", "name": "io.debezium.time.MicroTimestamp", "field": "local_at"},
    {"type": "int64", "name": "io.debezium.time.Timestamp", "field": "ms_at"},
    {"type": "int32", "name": "io.debezium.time.Date", "field": "ship_date"},
    {"type": "int64", "name": "io.debezium.time.MicroTime", "field": "at_time"},
    {"type": "int64", "name": "io.debezium.time.MicroDuration", "field": "took"},
    {"type": "string", "name": "io.debezium.data.Json", "field": "attrs"},
    {"type": "string", "name": "io.debezium.data.Uuid", "field": "uid"},
    {"type": "bytes", "field": "blob"},
    {
        "type": "array",
        "items": {"type": "string", "name": "io.debezium.data.Uuid"},
        "field": "uids",
    },
    {"type": "string", "field": "note"},
]
ROW = {
    "id": 7,
    "amount": _b64_unscaled(-123456),
    "ratio": {"scale": 3, "value": _b64_unscaled(31416)},
    "created_at": "2024-03-09T23:30:00.123456Z",
    "local_at": 1710034200123456,
    "ms_at": 1710034200123,
    "ship_date": 19782,
    "at_time": 49556789012,
    "took": 90061000001,
    "attrs": '{"tier": "gold", "n": [1, 2.5]}',
    "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "blob": "AP8Q",
    "uids": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None],
    "note": "plain",
}
TYPED = {
    "id": 7,
    "amount": Decimal("-1234.56"),
    "ratio": Decimal("31.416"),
    "created_at": datetime(2024, 3, 9, 23, 30, 0, 123456, tzinfo=UTC),
    "local_at": datetime(2024, 3, 10, 1, 30, 0, 123456),
    "ms_at": datetime(2024, 3, 10, 1, 30, 0, 123000),
    "ship_date": date(2024, 2, 29),
    "at_time": time(13, 45, 56, 789012),
    "took": timedelta(days=1, hours=1, minutes=1, seconds=1, microseconds=1),
    "attrs": {"tier": "gold", "n": [1, 2.5]},
    "uid": UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
    "blob": b"\x00\xff\x10",
    "uids": [UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), None],
    "note": "plain",
}


def _envelope(after: dict[str, object], *, wrapped: bool, op: str = "c") -> bytes:
    payload = {"before": None, "after": after, "op": op, "source": {"table": "orders", "lsn": 10}}
    if not wrapped:
        return json.dumps(payload).encode()
    schema = {
        "type": "struct",
        "fields": [
            {"type": "struct", "fields": SCHEMA_FIELDS, "optional": True, "field": "before"},
            {"type": "struct", "fields": SCHEMA_FIELDS, "optional": True, "field": "after"},
            {"type": "string", "field": "op"},
        ],
    }
    return json.dumps({"schema": schema, "payload": payload}).encode()


def test_the_records_schema_types_every_logical_type() -> None:
    ev = EventDecoder(known_tables={"orders"}).decode(b"7", _envelope(dict(ROW), wrapped=True), "t")
    assert ev.row == TYPED
    assert {k: type(v) for k, v in ev.row.items()} == {k: type(v) for k, v in TYPED.items()}


def test_declared_columns_type_schemaless_records_the_same() -> None:
    declared = {
        "orders": {
            "amount": "numeric(12,2)",
            "ratio": "numeric",
            "created_at": "timestamptz",
            "local_at": "timestamp",
            "ms_at": "timestamp(3)",
            "ship_date": "date",
            "at_time": "time",
            "took": "interval",
            "attrs": "jsonb",
            "uid": "uuid",
            "blob": "bytea",
            "uids": "uuid[]",
        }
    }
    ev = EventDecoder(known_tables={"orders"}, column_types=declared).decode(
        b"7", _envelope(dict(ROW), wrapped=False), "t"
    )
    assert ev.row == TYPED


@pytest.mark.parametrize(
    ("mode", "wire", "want"),
    [
        ("double", 261016261.47, Decimal("261016261.47")),
        ("double", 0.1, Decimal("0.10")),
        ("string", "261016261.47", Decimal("261016261.47")),
        ("precise", _b64_unscaled(26101626147), Decimal("261016261.47")),
    ],
)
def test_each_decimal_handling_mode_gives_the_exact_decimal(
    mode: str, wire: object, want: Decimal
) -> None:
    dec = EventDecoder(
        known_tables={"orders"},
        column_types={"orders": {"amount": "numeric(12,2)"}},
        decimal_handling=mode,  # type: ignore[arg-type]
    )
    ev = dec.decode(b"1", _envelope({"id": 1, "amount": wire}, wrapped=False), "t")
    assert ev.row is not None and ev.row["amount"] == want and type(ev.row["amount"]) is Decimal


def test_native_events_read_decimal_text_and_iso_times_for_declared_columns() -> None:
    dec = EventDecoder(
        known_tables={"orders"},
        column_types={"orders": {"amount": "numeric(12,2)", "at": "timestamptz", "day": "date"}},
    )
    body = {
        "table": "orders",
        "op": "insert",
        "id": 1,
        "after": {
            "id": 1,
            "amount": "12.10",
            "at": "2024-01-01T10:00:00+02:00",
            "day": "2024-01-05",
        },
    }
    ev = dec.decode(b"1", json.dumps(body).encode(), "t")
    assert ev.row == {
        "id": 1,
        "amount": Decimal("12.10"),
        "at": datetime(2024, 1, 1, 8, tzinfo=UTC),
        "day": date(2024, 1, 5),
    }


def test_placeholders_become_unavailable_in_every_wire_form() -> None:
    ph = "__debezium_unavailable_value"
    after = {
        "id": 1,
        "n": 1,
        "note": ph,
        "blob": base64.b64encode(ph.encode()).decode(),
        "doc": ph,
        "arr": list(ph.encode()),
        "tags": [ph],
        "other": "x",
    }
    ev = EventDecoder(known_tables={"docs"}).decode(
        b"1", json.dumps({"op": "u", "after": after, "source": {"table": "docs"}}).encode(), "t"
    )
    assert ev.row is not None
    assert {k for k, v in ev.row.items() if v is UNAVAILABLE} == {
        "note",
        "blob",
        "doc",
        "arr",
        "tags",
    }
    assert ev.row["other"] == "x" and ev.row["n"] == 1


def test_a_configured_placeholder_is_recognised() -> None:
    dec = EventDecoder(known_tables={"docs"}, placeholder="<toast>")
    ev = dec.decode(
        b"1",
        json.dumps(
            {"op": "u", "after": {"id": 1, "note": "<toast>"}, "source": {"table": "docs"}}
        ).encode(),
        "t",
    )
    assert ev.row is not None and ev.row["note"] is UNAVAILABLE


def test_unavailable_refuses_every_use() -> None:
    for use in (
        len,
        str,
        bool,
        hash,
        abs,
        lambda v: v + 1,
        lambda v: v < 2,
        lambda v: v == "x",
        lambda v: v["k"],
        lambda v: list(v),
        lambda v: v.upper(),
    ):
        with pytest.raises(UnavailableValue):
            use(UNAVAILABLE)
    assert UNAVAILABLE is not None and repr(UNAVAILABLE) == "<unavailable>"


def test_a_definition_that_reads_an_unavailable_column_dead_letters_and_others_apply(
    tmp_path: object,
) -> None:
    ph = "__debezium_unavailable_value"
    by_len = TableAggregate("by_len", table="docs", sort_key=lambda r: len(r["note"]))
    by_n = TableAggregate("by_n", table="docs", sort_key="n")
    as_key = TableAggregate("as_key", table="docs", sort_key="note")
    dec = EventDecoder(known_tables={"docs"})
    ev = dec.decode(
        b"1",
        json.dumps(
            {"op": "u", "after": {"id": 1, "n": 5, "note": ph}, "source": {"table": "docs"}}
        ).encode(),
        "t",
    )
    with Store.open(str(tmp_path)) as store:
        for d, applies in ((by_len, False), (by_n, True), (as_key, False)):
            _, bad = Applier(store, [d]).apply_events([ev])
            if applies:
                assert bad == [] and store.aggregate(d.name).count() == 1
            else:
                assert [b.reason for _, b in bad] == ["unavailable-value"]
                msg = str(bad[0][1])
                assert (
                    "'note'" in msg
                    and "REPLICA IDENTITY FULL" in msg
                    and "ReselectColumnsPostProcessor" in msg
                )
                assert store.aggregate(d.name).count() == 0


def test_column_type_specs() -> None:
    assert parse_column_type("NUMERIC( 12 , 2 )").scale == 2
    assert parse_column_type("money").scale == 2
    assert parse_column_type("timestamp with time zone").name == "timestamptz"
    assert parse_column_type("int[]").array
    with pytest.raises(ConfigError, match="unknown type 'geometry'"):
        parse_column_type("geometry")
    with pytest.raises(ValueError, match="column 'x'"):
        TableAggregate("a", table="t", sort_key="x", columns={"x": "nope"})


def test_declared_columns_change_the_fingerprint_only_when_given() -> None:
    plain = TableAggregate("a", table="t", sort_key="x")
    typed = TableAggregate("a", table="t", sort_key="x", columns={"x": "numeric(12,2)"})
    assert plain.fingerprint == TableAggregate("a", table="t", sort_key="x", columns={}).fingerprint
    assert plain.fingerprint != typed.fingerprint


def test_a_rewritten_delete_is_a_delete_whatever_its_not_null_defaults_hold() -> None:
    """Under REPLICA IDENTITY DEFAULT the unwrap SMT's rewrite mode sends a delete as the key
    columns plus Connect's defaults for NOT NULL columns ("" for uuid/jsonb/text, 0, epoch),
    measured with Debezium 3.6.1: not data, and not typeable. Only the id matters."""
    row = {
        "id": 1,
        "u": "",
        "a": "AA==",
        "ts": "1970-01-01T00:00:00Z",
        "d": 0,
        "j": "",
        "s": "",
        "n": 0,
        "__deleted": "true",
    }
    cols = {
        "nn": {"u": "uuid", "a": "numeric(12,2)", "ts": "timestamptz", "d": "date", "j": "jsonb"}
    }
    ev = EventDecoder(known_tables={"nn"}, column_types=cols, topic_tables={"t": "nn"}).decode(
        b'{"id":1}', json.dumps(row).encode(), "t"
    )
    assert (ev.table, ev.kind, ev.id, ev.row) == ("nn", "delete", 1, None)
