"""Change-event shapes and their decoding into `ChangeEvent` (schemas/).

Debezium samples follow the shapes in the Debezium connector documentation
(Postgres, MySQL, SQL Server envelopes; tombstones; truncate and logical
decoding message events; the JSON converter's schema/payload wrapper; the
ExtractNewRecordState SMT's rewritten rows).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from typing import Any

import msgspec
import pytest
from budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.schemas import (
    BadRecord,
    ChangeEvent,
    ConfigError,
    DebeziumEnvelope,
    DecodeFormat,
    EventDecoder,
    NativeEvent,
    TallyError,
    decode_native,
    encode_native,
)

enc = msgspec.json.encode

# ----------------------------------------------------------------- samples

PG_TOPIC = "PostgreSQL_server.public.customers"
MYSQL_TOPIC = "mysql-server-1.inventory.customers"

PG_ROW = {"id": 1, "first_name": "Anne", "last_name": "Kretchmar", "email": "annek@noanswer.org"}


def pg_source(**changes: Any) -> dict[str, Any]:
    source = {
        "version": "2.7.3.Final",
        "connector": "postgresql",
        "name": "PostgreSQL_server",
        "ts_ms": 1559033904863,
        "ts_us": 1559033904863123,
        "ts_ns": 1559033904863123000,
        "snapshot": "false",
        "db": "postgres",
        "sequence": '["24023119","24023128"]',
        "schema": "public",
        "table": "customers",
        "txId": 555,
        "lsn": 24023128,
        "xmin": None,
    }
    source.update(changes)
    return source


def pg_envelope(
    op: str = "c", before: Any = None, after: Any = PG_ROW, **source: Any
) -> dict[str, Any]:
    return {
        "before": before,
        "after": after,
        "source": pg_source(**source),
        "op": op,
        "ts_ms": 1559033904900,
        "ts_us": 1559033904900456,
        "ts_ns": 1559033904900456000,
        "transaction": None,
    }


MYSQL_DELETE = {
    "before": {
        "id": 1004,
        "first_name": "Anne Marie",
        "last_name": "Kretchmar",
        "email": "annek@noanswer.org",
    },
    "after": None,
    "source": {
        "version": "2.5.0.Final",
        "connector": "mysql",
        "name": "mysql-server-1",
        "ts_ms": 1465581029100,
        "snapshot": False,  # a bool in older connectors, a string in newer ones
        "db": "inventory",
        "table": "customers",
        "server_id": 223344,
        "gtid": None,
        "file": "mysql-bin.000003",
        "pos": 805,
        "row": 0,
        "thread": 7,
        "query": None,
    },
    "op": "d",
    "ts_ms": 1465581902461,
    "transaction": None,
}

PG_TRUNCATE = {"source": pg_source(lsn=46523128), "op": "t", "ts_ms": 1559033904961}

PG_MESSAGE = {
    "source": pg_source(schema="", table="", lsn=46523128, txId=None),
    "op": "m",
    "ts_ms": 1559033904961,
    "message": {"prefix": "foo", "content": "Ymfy"},
}

_ROW_FIELDS = [
    {"type": "int32", "optional": False, "default": 0, "field": "id"},
    {"type": "string", "optional": False, "field": "first_name"},
    {"type": "string", "optional": False, "field": "last_name"},
    {"type": "string", "optional": False, "field": "email"},
]
KEY_SCHEMA = {
    "type": "struct",
    "fields": _ROW_FIELDS[:1],
    "optional": False,
    "name": "PostgreSQL_server.public.customers.Key",
}
VALUE_SCHEMA = {
    "type": "struct",
    "fields": [
        {
            "type": "struct",
            "fields": _ROW_FIELDS,
            "optional": True,
            "name": "PostgreSQL_server.public.customers.Value",
            "field": "before",
        },
        {
            "type": "struct",
            "fields": _ROW_FIELDS,
            "optional": True,
            "name": "PostgreSQL_server.public.customers.Value",
            "field": "after",
        },
        {
            "type": "struct",
            "fields": [
                {"type": "string", "optional": False, "field": "version"},
                {"type": "string", "optional": False, "field": "connector"},
                {"type": "string", "optional": False, "field": "name"},
                {"type": "int64", "optional": False, "field": "ts_ms"},
                {"type": "string", "optional": False, "field": "db"},
                {"type": "string", "optional": False, "field": "schema"},
                {"type": "string", "optional": False, "field": "table"},
                {"type": "int64", "optional": True, "field": "lsn"},
            ],
            "optional": False,
            "name": "io.debezium.connector.postgresql.Source",
            "field": "source",
        },
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
    ],
    "optional": False,
    "name": "PostgreSQL_server.public.customers.Envelope",
    "version": 2,
}


def wrap(payload: Any, schema: Any = VALUE_SCHEMA) -> bytes:
    """What Kafka Connect's JsonConverter writes with schemas.enable=true."""
    return enc({"schema": schema, "payload": payload})


def key(id_: Any = 1) -> bytes:
    return enc({"id": id_})


def wrapped_key(id_: Any = 1) -> bytes:
    return enc({"schema": KEY_SCHEMA, "payload": {"id": id_}})


def reason(excinfo: pytest.ExceptionInfo[BadRecord]) -> str:
    return excinfo.value.reason


@pytest.fixture
def dec() -> EventDecoder:
    return EventDecoder()


# ========================================================== native events


def test_native_json_round_trip_decodes_to_the_same_event() -> None:
    event = NativeEvent(
        table="scores",
        op="update",
        id=7,
        after={"id": 7, "score": 67.5},
        position="0/16B3748",
        ts_ms=1700000000000,
    )
    data = encode_native(event, "json")
    assert data.startswith(b"{")
    assert decode_native(data) == event
    out = EventDecoder().decode(None, data, "scores")
    assert out == ChangeEvent(
        "scores", "upsert", 7, {"id": 7, "score": 67.5}, "0/16B3748", 1700000000000, "u"
    )


def test_native_msgpack_round_trip_decodes_to_the_same_event() -> None:
    event = NativeEvent(
        table="scores",
        op="insert",
        id=b"\x00raw-id",
        after={"id": 1, "tags": ["a", "b"]},
        position=99,
    )
    data = encode_native(event, "msgpack")
    assert data[0] >= 0x80  # a msgpack map, never mistaken for JSON text
    assert decode_native(data) == event
    out = EventDecoder().decode(None, data, "scores")
    assert out == ChangeEvent(
        "scores", "upsert", b"\x00raw-id", {"id": 1, "tags": ["a", "b"]}, 99, None, "c"
    )


def test_native_encoding_omits_unset_fields() -> None:
    data = encode_native(NativeEvent(table="t", op="truncate"))
    assert msgspec.json.decode(data) == {"table": "t", "op": "truncate"}


def test_encode_native_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="msgpack"):
        encode_native(NativeEvent(table="t", op="truncate"), "yaml")  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
@pytest.mark.parametrize(
    ("op", "kind"),
    [("insert", "upsert"), ("update", "upsert"), ("delete", "delete"), ("truncate", "truncate")],
)
def test_native_ops_map_to_change_kinds(fmt: str, op: str, kind: str) -> None:
    after = {"id": 3, "v": 1} if op in ("insert", "update") else None
    event = NativeEvent(table="t", op=op, id=None if op == "truncate" else 3, after=after)  # type: ignore[arg-type]
    out = EventDecoder().decode(None, encode_native(event, fmt), "topic")  # type: ignore[arg-type]
    assert out.kind == kind
    assert out.table == "t"
    assert out.id == (None if op == "truncate" else 3)
    assert out.row == after


def test_native_composite_id_array_becomes_a_tuple() -> None:
    data = enc({"table": "lines", "op": "update", "id": [7, "b", [1, 2]], "after": {"x": 1}})
    out = EventDecoder().decode(None, data, "lines")
    assert out.id == (7, "b", (1, 2))
    assert hash(out.id) == hash((7, "b", (1, 2)))


def test_native_id_takes_precedence_over_key_and_row() -> None:
    data = enc({"table": "t", "op": "insert", "id": 5, "after": {"id": 6}})
    assert EventDecoder().decode(b"7", data, "t").id == 5


def test_native_without_id_uses_the_key_then_the_row() -> None:
    data = enc({"table": "t", "op": "insert", "after": {"id": 6}})
    assert EventDecoder().decode(b"7", data, "t").id == 7
    assert EventDecoder().decode(None, data, "t").id == 6


def test_native_delete_without_id_or_key_reads_the_before_image() -> None:
    data = enc({"table": "t", "op": "delete", "before": {"id": 9, "v": 1}})
    out = EventDecoder().decode(None, data, "t")
    assert (out.kind, out.id, out.row) == ("delete", 9, None)


def test_native_upsert_without_after_is_missing_after() -> None:
    data = enc({"table": "t", "op": "update", "id": 1})
    with pytest.raises(BadRecord) as exc:
        EventDecoder().decode(None, data, "t")
    assert reason(exc) == "missing-after"
    assert "'after'" in str(exc.value)


@pytest.mark.parametrize("fmt", ["auto", "native"])
def test_native_unknown_op_is_unsupported_op(fmt: str) -> None:
    data = enc({"table": "t", "op": "upsert", "id": 1, "after": {}})
    with pytest.raises(BadRecord) as exc:
        EventDecoder(format=fmt).decode(None, data, "t")  # type: ignore[arg-type]
    assert reason(exc) == "unsupported-op"
    assert "`$.op`" in str(exc.value)


def test_native_fields_in_any_order_are_detected() -> None:
    data = b'{"op":"insert","after":{"id":1},"ts_ms":5,"table":"t"}'
    out = EventDecoder().decode(None, data, "x")
    assert (out.table, out.kind, out.id, out.ts_ms) == ("t", "upsert", 1, 5)


def test_native_wrong_type_reports_msgspec_path() -> None:
    data = b'{"table":"t","op":"insert","id":1,"after":{"id":1},"ts_ms":"yesterday"}'
    with pytest.raises(BadRecord) as exc:
        EventDecoder().decode(None, data, "t")
    assert reason(exc) == "decode"
    assert "Expected `int | null`, got `str` - at `$.ts_ms`" in str(exc.value)


def test_native_empty_table_falls_back_to_the_topic_mapping() -> None:
    data = enc({"table": "", "op": "insert", "id": 1, "after": {"id": 1}})
    out = EventDecoder(topic_tables={"events.scores": "scores"}).decode(None, data, "events.scores")
    assert out.table == "scores"


def test_native_format_rejects_json_null_and_debezium_envelopes() -> None:
    native = EventDecoder(format="native")
    with pytest.raises(BadRecord) as exc:
        native.decode(key(), b"null", PG_TOPIC)
    assert reason(exc) == "decode"
    with pytest.raises(BadRecord) as exc:
        native.decode(key(), enc(pg_envelope()), PG_TOPIC)
    assert reason(exc) == "unsupported-op"
    assert "'c' - at `$.op`" in str(exc.value)
    assert "format" in str(exc.value)
    with pytest.raises(BadRecord) as exc:
        native.decode(key(), enc(PG_ROW), PG_TOPIC)
    assert reason(exc) == "decode"
    assert "missing required field `table`" in str(exc.value)


# ================================================================ Debezium


def test_postgres_create_envelope_is_an_upsert_with_lsn_and_source_time(dec: EventDecoder) -> None:
    out = dec.decode(key(1), enc(pg_envelope("c")), PG_TOPIC)
    assert out == ChangeEvent("customers", "upsert", 1, PG_ROW, 24023128, 1559033904863, "c")


@pytest.mark.parametrize("op", ["c", "u", "r"])
def test_debezium_create_update_read_are_upserts(dec: EventDecoder, op: str) -> None:
    before = {"id": 1} if op == "u" else None
    out = dec.decode(key(1), enc(pg_envelope(op, before=before)), PG_TOPIC)
    assert (out.kind, out.id, out.row) == ("upsert", 1, PG_ROW)


def test_mysql_delete_envelope_is_a_delete_at_binlog_position(dec: EventDecoder) -> None:
    out = dec.decode(enc({"id": 1004}), enc(MYSQL_DELETE), MYSQL_TOPIC)
    assert out == ChangeEvent(
        "customers", "delete", 1004, None, ("mysql-bin.000003", 805, 0), 1465581029100, "d"
    )


def test_debezium_delete_without_key_reads_the_before_image(dec: EventDecoder) -> None:
    out = dec.decode(None, enc(MYSQL_DELETE), MYSQL_TOPIC)
    assert (out.kind, out.id) == ("delete", 1004)


def test_sql_server_envelope_position_is_the_change_lsn(dec: EventDecoder) -> None:
    envelope = {
        "before": None,
        "after": {"id": 1005, "email": "john.doe@example.org"},
        "source": {
            "version": "2.5.0.Final",
            "connector": "sqlserver",
            "name": "server1",
            "ts_ms": 1559729468470,
            "snapshot": "false",
            "db": "testDB",
            "schema": "dbo",
            "table": "customers",
            "change_lsn": "00000027:00000758:0003",
            "commit_lsn": "00000027:00000758:0005",
            "event_serial_no": "1",
        },
        "op": "c",
        "ts_ms": 1559729471739,
    }
    out = dec.decode(enc({"id": 1005}), enc(envelope), "server1.testDB.dbo.customers")
    assert (out.table, out.position, out.ts_ms) == (
        "customers",
        "00000027:00000758:0003",
        1559729468470,
    )


def test_schema_wrapped_envelope_decodes_like_the_bare_one(dec: EventDecoder) -> None:
    bare = dec.decode(key(1), enc(pg_envelope("u", before={"id": 1})), PG_TOPIC)
    wrapped = dec.decode(wrapped_key(1), wrap(pg_envelope("u", before={"id": 1})), PG_TOPIC)
    assert wrapped == bare
    assert wrapped.id == 1


def test_schema_wrapped_envelope_errors_carry_the_payload_path(dec: EventDecoder) -> None:
    bad = pg_envelope()
    bad["source"]["table"] = 5
    with pytest.raises(BadRecord) as exc:
        dec.decode(wrapped_key(1), wrap(bad), PG_TOPIC)
    assert reason(exc) == "decode"
    assert "Expected `str | null`, got `int` - at `$.payload.source.table`" in str(exc.value)


def test_bare_envelope_errors_carry_the_path(dec: EventDecoder) -> None:
    bad = pg_envelope()
    bad["after"] = [1, 2]
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), enc(bad), PG_TOPIC)
    assert reason(exc) == "decode"
    assert "got `array` - at `$.after`" in str(exc.value)


def test_debezium_unknown_op_is_unsupported_op(dec: EventDecoder) -> None:
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), enc(pg_envelope("x")), PG_TOPIC)
    assert reason(exc) == "unsupported-op"
    with pytest.raises(BadRecord) as exc:
        dec.decode(wrapped_key(1), wrap(pg_envelope("x")), PG_TOPIC)
    assert reason(exc) == "unsupported-op"
    assert "`$.payload.op`" in str(exc.value)


def test_debezium_upsert_without_after_is_missing_after(dec: EventDecoder) -> None:
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), enc(pg_envelope("c", after=None)), PG_TOPIC)
    assert reason(exc) == "missing-after"


def test_debezium_envelope_with_op_first_is_still_detected(dec: EventDecoder) -> None:
    envelope = pg_envelope("c")
    reordered = {"op": envelope.pop("op"), **envelope}
    out = dec.decode(key(1), enc(reordered), PG_TOPIC)
    assert (out.kind, out.table, out.id) == ("upsert", "customers", 1)


def test_debezium_format_reads_envelopes_and_rejects_msgpack() -> None:
    deb = EventDecoder(format="debezium")
    assert deb.decode(key(1), enc(pg_envelope()), PG_TOPIC).kind == "upsert"
    with pytest.raises(BadRecord) as exc:
        deb.decode(None, encode_native(NativeEvent(table="t", op="truncate"), "msgpack"), "t")
    assert reason(exc) == "decode"
    assert "JSON" in str(exc.value)


def test_debezium_format_does_not_accept_native_ops() -> None:
    native_json = enc({"table": "t", "op": "insert", "id": 1, "after": {"id": 1}})
    with pytest.raises(BadRecord) as exc:
        EventDecoder(format="debezium").decode(None, native_json, "t")
    assert reason(exc) == "unsupported-op"


def test_truncate_event_is_a_truncate_of_the_source_table(dec: EventDecoder) -> None:
    out = dec.decode(None, enc(PG_TRUNCATE), PG_TOPIC)
    assert out == ChangeEvent("customers", "truncate", None, None, 46523128, 1559033904863)
    assert dec.decode(None, wrap(PG_TRUNCATE), PG_TOPIC) == out


def test_logical_decoding_message_is_ignored_without_table_errors() -> None:
    strict = EventDecoder(known_tables={"customers"})
    out = strict.decode(enc({"prefix": "foo"}), enc(PG_MESSAGE), "PostgreSQL_server.message")
    assert out == ChangeEvent("", "ignore", None, None, 46523128, 1559033904863)
    assert (
        strict.decode(enc({"prefix": "foo"}), wrap(PG_MESSAGE), "PostgreSQL_server.message").kind
        == "ignore"
    )


# ============================================================== tombstones


def test_tombstone_is_a_delete_of_the_key_on_the_mapped_table() -> None:
    d = EventDecoder(topic_tables={PG_TOPIC: "customers"})
    assert d.decode(key(1), None, PG_TOPIC) == ChangeEvent("customers", "delete", 1, None)
    assert d.decode(wrapped_key(1), None, PG_TOPIC) == ChangeEvent("customers", "delete", 1, None)


def test_tombstone_table_is_inferred_from_the_single_matching_known_table() -> None:
    d = EventDecoder(known_tables={"customers", "orders"})
    assert d.decode(key(1), None, PG_TOPIC).table == "customers"


def test_tombstone_with_ambiguous_or_no_known_table_is_missing_table() -> None:
    for known in ({"customers", "public.customers"}, None, {"orders"}):
        with pytest.raises(BadRecord) as exc:
            EventDecoder(known_tables=known).decode(key(1), None, PG_TOPIC)
        assert reason(exc) == "missing-table"
        assert f"--topic TABLE={PG_TOPIC}" in str(exc.value)


@pytest.mark.parametrize(
    "k", [None, b"", b"null", b"{}", enc({"schema": KEY_SCHEMA, "payload": None})]
)
def test_tombstone_without_a_usable_key_is_missing_id(k: bytes | None) -> None:
    with pytest.raises(BadRecord) as exc:
        EventDecoder(topic_tables={PG_TOPIC: "customers"}).decode(k, None, PG_TOPIC)
    assert reason(exc) == "missing-id"
    assert "tombstone" in str(exc.value)


def test_json_null_value_and_null_payload_act_as_tombstones() -> None:
    d = EventDecoder(topic_tables={PG_TOPIC: "customers"})
    expected = ChangeEvent("customers", "delete", 1, None)
    assert d.decode(key(1), b"null", PG_TOPIC) == expected
    # ExtractNewRecordState's default delete.tombstone.handling.mode=tombstone with schemas
    # enabled writes a null payload (tests/data/debezium: unwrap_tombstone_schemas_on).
    assert (
        d.decode(wrapped_key(1), wrap(None, schema={"type": "struct", "optional": True}), PG_TOPIC)
        == expected
    )


# ============================================ ExtractNewRecordState (unwrapped)


def test_unwrapped_rewrite_delete_is_a_delete() -> None:
    d = EventDecoder(topic_tables={"dbserver1.public.t": "t"})
    out = d.decode(
        enc({"pk": 2}), enc({"pk": 2, "cola": None, "__deleted": "true"}), "dbserver1.public.t"
    )
    assert (out.table, out.kind, out.id, out.row, out.op) == ("t", "delete", 2, None, "d")
    # without __op an unwrapped row does not say whether it was an insert or an update
    out = d.decode(enc({"pk": 2}), enc({"pk": 2, "cola": 1}), "dbserver1.public.t")
    assert (out.kind, out.op) == ("upsert", None)


def test_unwrapped_row_metadata_fields_are_read_and_stripped(dec: EventDecoder) -> None:
    value = {
        **PG_ROW,
        "__op": "u",
        "__table": "customers",
        "__lsn": 24023128,
        "__source_ts_ms": 1559033904863,
        "__deleted": "false",
    }
    out = dec.decode(key(1), enc(value), PG_TOPIC)
    assert out == ChangeEvent("customers", "upsert", 1, PG_ROW, 24023128, 1559033904863, "u")
    assert not any(name.startswith("__") for name in out.row or {})


def test_unwrapped_row_strips_every_double_underscore_field(dec: EventDecoder) -> None:
    value = {
        "__db": "inventory",
        **PG_ROW,
        "__table": "customers",
        "__file": "mysql-bin.000003",
        "__pos": 805,
        "__ts_ms": 7,
    }
    out = dec.decode(None, enc(value), MYSQL_TOPIC)
    assert out.row == PG_ROW
    assert (out.position, out.ts_ms, out.id) == (("mysql-bin.000003", 805), 7, 1)


def test_unwrapped_row_without_table_uses_the_topic_mapping() -> None:
    d = EventDecoder(topic_tables={PG_TOPIC: "customers"})
    out = d.decode(key(1), enc(PG_ROW), PG_TOPIC)
    assert (out.table, out.kind, out.row) == ("customers", "upsert", PG_ROW)
    with pytest.raises(BadRecord) as exc:
        EventDecoder().decode(key(1), enc(PG_ROW), PG_TOPIC)
    assert reason(exc) == "missing-table"


def test_unwrapped_row_without_table_infers_the_single_matching_known_table() -> None:
    out = EventDecoder(known_tables={"customers", "orders"}).decode(key(1), enc(PG_ROW), PG_TOPIC)
    assert (out.table, out.kind, out.id) == ("customers", "upsert", 1)


def test_unwrapped_op_d_is_a_delete_even_without_deleted_flag(dec: EventDecoder) -> None:
    out = dec.decode(key(1), enc({**PG_ROW, "__op": "d", "__table": "customers"}), PG_TOPIC)
    assert (out.kind, out.id) == ("delete", 1)


def test_unwrapped_schema_wrapped_row_decodes_like_the_bare_row(dec: EventDecoder) -> None:
    value = {**PG_ROW, "__deleted": "true", "__table": "customers", "__db": "postgres"}
    row_schema = {
        "type": "struct",
        "fields": _ROW_FIELDS,
        "optional": False,
        "name": "PostgreSQL_server.public.customers.Value",
    }
    out = dec.decode(wrapped_key(1), wrap(value, schema=row_schema), PG_TOPIC)
    assert out == dec.decode(key(1), enc(value), PG_TOPIC)
    assert (out.kind, out.table, out.id) == ("delete", "customers", 1)


def test_unwrapped_bad_metadata_types_report_the_path(dec: EventDecoder) -> None:
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), enc({**PG_ROW, "__deleted": "yes"}), PG_TOPIC)
    assert reason(exc) == "decode"
    assert "`$.__deleted`" in str(exc.value)
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), enc({**PG_ROW, "__table": 3}), PG_TOPIC)
    assert "`$.__table`" in str(exc.value)
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), enc({**PG_ROW, "__op": "z", "__table": "customers"}), PG_TOPIC)
    assert reason(exc) == "unsupported-op"


def test_unwrapped_op_t_and_m_are_truncate_and_ignore(dec: EventDecoder) -> None:
    assert dec.decode(None, enc({"__op": "t", "__table": "customers"}), PG_TOPIC).kind == "truncate"
    assert dec.decode(None, enc({"__op": "m"}), "x.message") == ChangeEvent(
        "", "ignore", None, None
    )


def test_unwrapped_string_values_starting_with_underscores_are_kept(dec: EventDecoder) -> None:
    row = {"id": 1, "note": "__deleted", "path": '"__x'}
    out = dec.decode(None, enc({**row, "__table": "notes"}), "t")
    assert out.row == row


# ================================================================= row ids


def test_key_struct_with_one_field_gives_its_value(dec: EventDecoder) -> None:
    assert dec.decode(enc({"uuid": "a-b"}), enc(pg_envelope()), PG_TOPIC).id == "a-b"


def test_wrapped_key_struct_gives_its_value(dec: EventDecoder) -> None:
    assert dec.decode(wrapped_key(42), enc(pg_envelope()), PG_TOPIC).id == 42


def test_composite_key_struct_gives_a_tuple_in_struct_order(dec: EventDecoder) -> None:
    out = dec.decode(enc({"order_id": 7, "line_no": 2}), enc(pg_envelope()), PG_TOPIC)
    assert out.id == (7, 2)


def test_composite_key_struct_follows_configured_id_field_order() -> None:
    d = EventDecoder(id_fields={"customers": ["line_no", "order_id"]})
    out = d.decode(enc({"order_id": 7, "line_no": 2}), enc(pg_envelope()), PG_TOPIC)
    assert out.id == (2, 7)
    single = EventDecoder(id_fields={"customers": ["order_id"]})
    assert single.decode(enc({"order_id": 7, "line_no": 2}), enc(pg_envelope()), PG_TOPIC).id == 7


def test_key_struct_missing_configured_id_fields_is_missing_id() -> None:
    d = EventDecoder(id_fields={"customers": ["tenant", "id"]})
    with pytest.raises(BadRecord) as exc:
        d.decode(key(1), enc(pg_envelope()), PG_TOPIC)
    assert reason(exc) == "missing-id"
    assert "tenant" in str(exc.value)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (b"42", 42),
        (b'"user-7"', "user-7"),
        (b'[1, "a"]', (1, "a")),
        (b"user-7", "user-7"),  # not JSON: UTF-8 text
        ("héllo".encode(), "héllo"),
        (b"\xff\xfe\x00", b"\xff\xfe\x00"),  # not UTF-8: raw bytes
        (b"true", True),
        (b"2.5", 2.5),
    ],
)
def test_plain_keys(dec: EventDecoder, k: bytes, expected: Any) -> None:
    out = dec.decode(k, enc(pg_envelope()), PG_TOPIC)
    assert out.id == expected
    assert type(out.id) is type(expected)


def test_without_key_the_row_id_fields_give_the_id() -> None:
    assert EventDecoder().decode(None, enc(pg_envelope()), PG_TOPIC).id == 1
    composite = EventDecoder(id_fields={"customers": ("last_name", "first_name")})
    assert composite.decode(None, enc(pg_envelope()), PG_TOPIC).id == ("Kretchmar", "Anne")


def test_null_or_empty_key_falls_back_to_the_row(dec: EventDecoder) -> None:
    for k in (b"", b"null", b"{}", enc({"schema": KEY_SCHEMA, "payload": None})):
        assert dec.decode(k, enc(pg_envelope()), PG_TOPIC).id == 1


def test_missing_row_id_field_is_missing_id(dec: EventDecoder) -> None:
    with pytest.raises(BadRecord) as exc:
        dec.decode(None, enc(pg_envelope(after={"name": "x"})), PG_TOPIC)
    assert reason(exc) == "missing-id"
    assert "['id']" in str(exc.value)
    with pytest.raises(BadRecord) as exc:
        EventDecoder(id_fields={"customers": ["a", "b"]}).decode(
            None, enc(pg_envelope(after={"a": 1})), PG_TOPIC
        )
    assert reason(exc) == "missing-id"
    assert "['b']" in str(exc.value)


def test_delete_without_key_or_images_is_missing_id(dec: EventDecoder) -> None:
    with pytest.raises(BadRecord) as exc:
        dec.decode(None, enc(pg_envelope("d", before=None, after=None)), PG_TOPIC)
    assert reason(exc) == "missing-id"


@pytest.mark.parametrize(
    "bad_id",
    [{"a": 1}, [1, {"b": 2}], [], [None], float("nan"), [1, float("nan")]],
    ids=["object", "object-in-array", "empty-array", "null-in-array", "nan", "nan-in-array"],
)
def test_unusable_ids_are_missing_id(bad_id: Any) -> None:
    # msgpack carries NaN, which JSON cannot.
    data = encode_native(NativeEvent(table="t", op="insert", id=bad_id, after={"id": 1}), "msgpack")
    with pytest.raises(BadRecord) as exc:
        EventDecoder().decode(None, data, "t")
    assert reason(exc) == "missing-id"


def test_null_or_object_values_in_id_fields_are_missing_id(dec: EventDecoder) -> None:
    for bad in (None, {"nested": 1}):
        with pytest.raises(BadRecord) as exc:
            dec.decode(None, enc(pg_envelope(after={"id": bad})), PG_TOPIC)
        assert reason(exc) == "missing-id"
    with pytest.raises(BadRecord) as exc:
        dec.decode(enc({"id": {"$oid": "x"}}), enc(pg_envelope()), PG_TOPIC)
    assert reason(exc) == "missing-id"


def test_nan_id_field_is_missing_id() -> None:
    data = encode_native(NativeEvent(table="t", op="insert", after={"id": math.nan}), "msgpack")
    with pytest.raises(BadRecord) as exc:
        EventDecoder().decode(None, data, "t")
    assert reason(exc) == "missing-id"
    assert "NaN" in str(exc.value)


# ========================================================= table resolution


def test_table_comes_from_the_record_before_the_topic_mapping() -> None:
    d = EventDecoder(topic_tables={PG_TOPIC: "other"})
    assert d.decode(key(1), enc(pg_envelope()), PG_TOPIC).table == "customers"


def test_unknown_table_names_the_table_and_the_known_ones() -> None:
    d = EventDecoder(known_tables=["orders", "players"])
    with pytest.raises(BadRecord) as exc:
        d.decode(key(1), enc(pg_envelope()), PG_TOPIC)
    assert reason(exc) == "unknown-table"
    assert "'customers'" in str(exc.value)
    assert "orders, players" in str(exc.value)


def test_unknown_table_applies_to_mapped_topics_too() -> None:
    d = EventDecoder(topic_tables={"t1": "ghost"}, known_tables=["orders"])
    with pytest.raises(BadRecord) as exc:
        d.decode(key(1), None, "t1")
    assert reason(exc) == "unknown-table"
    assert "'ghost'" in str(exc.value)


def test_schema_qualified_known_table_matches_the_source() -> None:
    d = EventDecoder(known_tables=["public.customers"])
    assert d.decode(key(1), enc(pg_envelope()), PG_TOPIC).table == "public.customers"


def test_missing_table_message_says_how_to_map_the_topic(dec: EventDecoder) -> None:
    envelope = pg_envelope()
    envelope["source"]["table"] = None
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), enc(envelope), "raw-topic")
    assert reason(exc) == "missing-table"
    assert "--topic TABLE=raw-topic" in str(exc.value)


# ======================================================== malformed values


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"not json",
        b"{",
        b"[1, 2]",
        b'"text"',
        b"12",
        b"\xc1",
        b"\x92\x01\x02",
        b"{} trailing",
        b"\x00",
    ],
)
def test_malformed_values_are_decode_errors(dec: EventDecoder, value: bytes) -> None:
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), value, PG_TOPIC)
    assert reason(exc) == "decode"
    assert PG_TOPIC in str(exc.value)


def test_invalid_utf8_inside_a_json_string_is_a_decode_error(dec: EventDecoder) -> None:
    value = enc(pg_envelope()).replace(b"Anne", b"\x80nne")
    with pytest.raises(BadRecord) as exc:
        dec.decode(key(1), value, PG_TOPIC)
    assert reason(exc) == "decode"
    assert "UTF-8" in str(exc.value)


def test_json_key_with_invalid_utf8_is_used_as_raw_bytes(dec: EventDecoder) -> None:
    assert dec.decode(b'"\x80"', enc(pg_envelope()), PG_TOPIC).id == b'"\x80"'


def test_too_deeply_nested_values_are_decode_errors(dec: EventDecoder) -> None:
    with pytest.raises(BadRecord) as exc:
        dec.decode(None, b'{"id":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "t")
    assert reason(exc) == "decode"


def test_bad_record_is_a_tally_error_with_a_reason() -> None:
    with pytest.raises(TallyError) as exc:
        EventDecoder().decode(None, b"x", "t")
    assert isinstance(exc.value, BadRecord)
    assert isinstance(exc.value, ValueError)
    assert exc.value.reason == "decode"


def test_buffer_values_are_accepted(dec: EventDecoder) -> None:
    value = enc(pg_envelope())
    # Buffers beyond decode()'s bytes annotation: it copies them to bytes at run time.
    assert dec.decode(key(1), bytearray(value), PG_TOPIC) == dec.decode(  # type: ignore[arg-type]
        key(1),
        memoryview(value),  # type: ignore[arg-type]
        PG_TOPIC,
    )


# ============================================================ configuration


def test_invalid_configuration_raises_config_error() -> None:
    assert EventDecoder(format="debezium").format == "debezium"
    with pytest.raises(ConfigError, match="format"):
        EventDecoder(format="avro")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="id fields"):
        EventDecoder(id_fields={"t": []})
    with pytest.raises(ConfigError, match="--topic"):
        EventDecoder(topic_tables={"topic": ""})


def test_a_single_string_id_field_is_one_field() -> None:
    d = EventDecoder(id_fields={"customers": "email"})
    assert d.decode(None, enc(pg_envelope()), PG_TOPIC).id == "annek@noanswer.org"


def test_change_event_is_frozen() -> None:
    event = ChangeEvent("t", "delete", 1, None)
    with pytest.raises(AttributeError):
        event.table = "u"  # type: ignore[misc]


def test_debezium_envelope_struct_decodes_the_documented_shape() -> None:
    env = msgspec.json.decode(enc(MYSQL_DELETE), type=DebeziumEnvelope)
    assert env.op == "d"
    assert env.source is not None
    assert (env.source.table, env.source.file, env.source.pos) == (
        "customers",
        "mysql-bin.000003",
        805,
    )


# ================================================================== fuzzing

FORMATS: tuple[DecodeFormat, ...] = ("auto", "native", "debezium")
DECODERS = [
    EventDecoder(
        format=f, id_fields={"customers": ["id"]}, topic_tables={"t": "customers"}, known_tables=k
    )
    for f in FORMATS
    for k in (None, {"customers", "orders"})
]

KEYS = [
    "op", "table", "id", "after", "before", "source", "payload", "schema", "position", "ts_ms", "message",
    "lsn", "file", "pos", "__deleted", "__op", "__table", "__lsn", "__source_ts_ms", "__ts_ms", "__file", "__pos",
]  # fmt: skip
WORDS = [
    "c",
    "u",
    "d",
    "r",
    "t",
    "m",
    "insert",
    "update",
    "delete",
    "truncate",
    "true",
    "false",
    "customers",
    "",
]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(WORDS)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=25,
)
keys = st.none() | st.binary(max_size=24) | json_values.map(lambda v: json.dumps(v).encode())


def check(decoder: EventDecoder, k: bytes | None, value: bytes | None, topic: str = "t") -> None:
    """`decode` returns a well-formed ChangeEvent or raises BadRecord, nothing else."""
    try:
        out = decoder.decode(k, value, topic)
    except BadRecord as exc:
        assert exc.reason in {
            "decode",
            "missing-id",
            "unknown-table",
            "missing-table",
            "unsupported-op",
            "missing-after",
        }
        assert str(exc)
        # Only the last-resort handler chains a cause: none of the decoder's own
        # code paths may have failed with an unexpected exception.
        assert exc.__cause__ is None, f"unexpected internal error: {exc.__cause__!r}"
        return
    assert isinstance(out, ChangeEvent)
    assert isinstance(out.table, str)
    if out.kind in ("upsert", "delete"):
        assert out.table
        hash(out.id)
        assert out.id is not None
        assert (out.row is not None) == (out.kind == "upsert")
    else:
        assert out.kind in ("truncate", "ignore")
        assert out.id is None
        assert out.row is None


FUZZ = settings(
    max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(k=keys, value=st.none() | st.binary(max_size=64))
def test_fuzz_arbitrary_bytes_only_raise_bad_record(k: bytes | None, value: bytes | None) -> None:
    for decoder in DECODERS:
        check(decoder, k, value)


@FUZZ
@given(k=keys, doc=json_values, ascii_only=st.booleans())
def test_fuzz_arbitrary_json_only_raises_bad_record(
    k: bytes | None, doc: Any, ascii_only: bool
) -> None:
    data = json.dumps(doc, ensure_ascii=ascii_only).encode()
    wrapped = json.dumps({"schema": {"type": "struct"}, "payload": doc}).encode()
    for decoder in DECODERS:
        check(decoder, k, data)
        check(decoder, k, wrapped)


def encodings(doc: Any) -> list[bytes]:
    """The document as JSON, and as msgpack when msgpack can carry its integers."""
    out = [json.dumps(doc).encode()]
    with contextlib.suppress(OverflowError):  # ints beyond 64 bits: JSON only
        out.append(msgspec.msgpack.encode(doc))
    return out


@FUZZ
@given(doc=st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_values, max_size=5))
def test_fuzz_arbitrary_msgpack_maps_only_raise_bad_record(doc: dict[str, Any]) -> None:
    for data in encodings(doc):
        for decoder in DECODERS:
            check(decoder, b"1", data)


VALID: list[tuple[bytes | None, Any]] = [
    (key(1), pg_envelope("c")),
    (enc({"id": 1004}), MYSQL_DELETE),
    (None, PG_TRUNCATE),
    (enc({"prefix": "foo"}), PG_MESSAGE),
    (wrapped_key(1), {"schema": VALUE_SCHEMA, "payload": pg_envelope("u", before={"id": 1})}),
    (key(1), {**PG_ROW, "__deleted": "true", "__table": "customers", "__lsn": 5}),
    (
        None,
        {
            "table": "customers",
            "op": "update",
            "id": [1, "a"],
            "after": {"id": 1},
            "position": 3,
            "ts_ms": 4,
        },
    ),
    (None, {"table": "customers", "op": "delete", "before": {"id": 1}}),
]


def _mutate(doc: Any, data: st.DataObject, depth: int = 0) -> Any:
    """Delete, replace or add one field at some depth of a JSON document."""
    if not isinstance(doc, dict) or depth > 3:
        return data.draw(json_values)
    doc = dict(doc)
    action = data.draw(st.sampled_from(["delete", "replace", "add", "descend"]))
    names = list(doc)
    if action == "delete" and names:
        del doc[data.draw(st.sampled_from(names))]
    elif action == "replace" and names:
        doc[data.draw(st.sampled_from(names))] = data.draw(json_values)
    elif action == "descend" and names:
        name = data.draw(st.sampled_from(names))
        doc[name] = _mutate(doc[name], data, depth + 1)
    else:
        doc[data.draw(st.sampled_from(KEYS))] = data.draw(json_values)
    return doc


@FUZZ
@given(index=st.integers(0, len(VALID) - 1), rounds=st.integers(1, 3), data=st.data())
def test_fuzz_mutated_valid_events_only_raise_bad_record(
    index: int, rounds: int, data: st.DataObject
) -> None:
    k, doc = VALID[index]
    doc = copy.deepcopy(doc)
    for _ in range(rounds):
        doc = _mutate(doc, data)
    for data_bytes in encodings(doc):
        for decoder in DECODERS:
            check(decoder, k, data_bytes, PG_TOPIC)


@FUZZ
@given(index=st.integers(0, len(VALID) - 1), data=st.data())
def test_fuzz_byte_mutations_of_valid_events_only_raise_bad_record(
    index: int, data: st.DataObject
) -> None:
    k, doc = VALID[index]
    raw = bytearray(enc(doc))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[pos] = data.draw(st.integers(0, 255))
        elif action == "cut":
            del raw[pos:]
            if not raw:
                break
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=4))
    for decoder in DECODERS:
        check(decoder, k, bytes(raw), PG_TOPIC)


def test_valid_samples_all_decode() -> None:
    d = EventDecoder(topic_tables={PG_TOPIC: "customers"})
    kinds = [d.decode(k, enc(doc), PG_TOPIC).kind for k, doc in VALID]
    assert kinds == [
        "upsert",
        "delete",
        "truncate",
        "ignore",
        "upsert",
        "delete",
        "upsert",
        "delete",
    ]
