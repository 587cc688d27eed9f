"""`tally consume`'s settings for Debezium topics, against the real broker.

* ``--topic-pattern`` maps every table to Debezium's ``<prefix>.<schema>.<table>`` (a
  ``--topic TABLE=TOPIC`` still wins for its table); a pattern without ``{table}`` is refused.
* While a table's topic does not exist, the waiting warning lists the existing topics that
  look like it and the flag that would map them.
* ``--decimal-handling``, ``--time-precision`` and ``--unavailable-placeholder`` (flag,
  ``TALLY_*`` environment, TOML) reach the decoder: the same schemaless records decode as
  the connector's settings say, or are dead-lettered when the settings disagree with them.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from consumer_util import (
    TALLY,
    child_env,
    json_logs,
    open_store,
    tail,
    wait_exit,
    wait_for,
)
from kafka_util import create_topic, produce, read_all, unique_topic

from tally.consumers.cli.settings import load_settings
from tally.consumers.runtime.topicmap import mapping_hint, similar_topics
from tally.schemas import ConfigError

pytestmark = pytest.mark.timeout(300)


def consume(
    defs: Path, data_dir: Path, bootstrap: str, *flags: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`tally consume --until-caught-up` (no HTTP), the result whatever its exit code."""
    return subprocess.run(
        [
            TALLY,
            "consume",
            str(defs),
            "--data-dir",
            str(data_dir),
            "--bootstrap-servers",
            bootstrap,
            "--log-format",
            "json",
            "--until-caught-up",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(**(env or {})),
        cwd=str(data_dir.parent),
        check=False,
    )


def envelope(table: str, row: dict[str, Any], op: str = "c") -> bytes:
    """A schemaless Debezium envelope, as the connector writes it with schemas.enable=false."""
    return json.dumps(
        {
            "before": None,
            "after": row,
            "op": op,
            "ts_ms": 1,
            "source": {"table": table, "lsn": 100 + row["id"]},
        }
    ).encode()


# ---------------------------------------------------------------- topic mapping


def test_topic_pattern_maps_every_table_and_a_topic_flag_wins(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = unique_topic("dbz")
    a, b = f"ta_{prefix[-12:]}", f"tb_{prefix[-12:]}"
    for table in (a, b):
        create_topic(kafka_bootstrap, f"{prefix}.public.{table}")
        produce(
            kafka_bootstrap,
            f"{prefix}.public.{table}",
            [
                (json.dumps({"id": i}).encode(), envelope(table, {"id": i, "v": i}))
                for i in range(1, 4)
            ],
        )
    other = unique_topic("elsewhere")  # b's changes really live here
    create_topic(kafka_bootstrap, other)
    produce(kafka_bootstrap, other, [(b"9", envelope(b, {"id": 9, "v": 9}))])
    defs = tmp_path / "defs.py"
    defs.write_text(
        textwrap.dedent(f"""
        from tally.engine import TableAggregate
        agg_a = TableAggregate("agg_a", table={a!r}, sort_key="v")
        agg_b = TableAggregate("agg_b", table={b!r}, sort_key="v")
    """)
    )
    res = consume(
        defs,
        tmp_path / "data",
        kafka_bootstrap,
        "--no-http",
        "--topic-pattern",
        f"{prefix}.public.{{table}}",
        "--topic",
        f"{b}={other}",
    )
    assert res.returncode == 0, res.stderr
    with open_store(tmp_path / "data") as store:
        assert [it.id for it in store.aggregate("agg_a").iter()] == [1, 2, 3]
        assert [it.id for it in store.aggregate("agg_b").iter()] == [9]
    # the same from the environment
    res = consume(
        defs,
        tmp_path / "data-env",
        kafka_bootstrap,
        "--no-http",
        env={"TALLY_TOPIC_PATTERN": f"{prefix}.public.{{table}}"},
    )
    assert res.returncode == 0, res.stderr
    with open_store(tmp_path / "data-env") as store:
        assert store.aggregate("agg_b").count() == 3


def test_a_topic_pattern_without_the_table_is_refused(tmp_path: Path) -> None:
    defs = tmp_path / "defs.py"
    defs.write_text(
        "from tally.engine import TableAggregate\n"
        "x = TableAggregate('x', table='t', sort_key='v')\n"
    )
    res = consume(defs, tmp_path / "data", "127.0.0.1:1", "--topic-pattern", "dbz.public.orders")
    assert res.returncode == 2
    assert "--topic-pattern 'dbz.public.orders' has no {table}" in res.stderr
    assert "dbz.public.{table}" in res.stderr
    assert not (tmp_path / "data").exists()  # refused before the store opens


def test_waiting_for_a_topic_names_the_look_alikes_and_the_flag(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    prefix = unique_topic("dbz")
    orders, users, lonely = (f"{t}_{prefix[-12:]}" for t in ("orders", "users", "lonely"))
    for table in (orders, users):
        create_topic(kafka_bootstrap, f"{prefix}.public.{table}")
    defs = tmp_path / "defs.py"
    defs.write_text(
        textwrap.dedent(f"""
        from tally.engine import TableAggregate
        o = TableAggregate("o", table={orders!r}, sort_key="v")
        u = TableAggregate("u", table={users!r}, sort_key="v")
        n = TableAggregate("n", table={lonely!r}, sort_key="v")
    """)
    )
    log = tmp_path / "consume.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                TALLY,
                "consume",
                str(defs),
                "--data-dir",
                str(tmp_path / "data"),
                "--bootstrap-servers",
                kafka_bootstrap,
                "--log-format",
                "json",
                "--no-http",
            ],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=child_env(),
            cwd=str(tmp_path),
        )
    try:

        def waiting() -> list[dict[str, Any]]:
            return [
                d
                for d in json_logs(log.read_text())
                if d.get("event") == "waiting for topics to exist"
            ]

        (line,) = wait_for(waiting, lambda: f"the waiting warning:\n{tail(log)}", timeout=60)
    finally:
        proc.terminate()
        wait_exit(proc, "tally consume after SIGTERM", 30, log)
    assert line["topics"] == sorted([orders, users, lonely])
    assert line["similar"] == {
        orders: [f"{prefix}.public.{orders}"],
        users: [f"{prefix}.public.{users}"],
    }
    assert f"--topic-pattern '{prefix}.public.{{table}}'" in line["hint"]
    assert f"no similar topic for {lonely}" in line["hint"]


def test_mapping_hint_picks_the_pattern_that_maps_most_tables() -> None:
    existing = [
        "a.public.orders",
        "a.public.users",
        "b.public.orders",
        "orders.dlq",
        "__consumer_offsets",
        "x.public.Items",
        "ordersx",
    ]
    assert similar_topics("orders", existing) == ["a.public.orders", "b.public.orders"]
    assert similar_topics("items", existing) == ["x.public.Items"]  # another case
    hint = mapping_hint({"orders": "orders", "users": "users", "items": "items"}, existing)
    assert hint["similar"] == {
        "items": ["x.public.Items"],
        "orders": ["a.public.orders", "b.public.orders"],
        "users": ["a.public.users"],
    }
    assert "--topic-pattern 'a.public.{table}'" in hint["hint"]
    assert "--topic TABLE=TOPIC for items" in hint["hint"]
    assert mapping_hint({"orders": "orders"}, ["other", "orders.dlq"]) == {}
    # a pattern that maps to the wrong name: the right one is suggested
    hint = mapping_hint({"orders": "dbz.orders"}, ["dbz.public.orders"])
    assert "--topic-pattern 'dbz.public.{table}'" in hint["hint"]


# ---------------------------------------------------------------- Debezium's wire settings


def test_debezium_settings_come_from_flags_environment_and_toml(tmp_path: Path) -> None:
    cfg = tmp_path / "tally.toml"
    cfg.write_text(
        '[consume]\ndecimal_handling = "string"\ntime_precision = "connect"\n'
        'unavailable_placeholder = "<toml>"\ntopic_pattern = "t.{table}"\n'
    )
    s = load_settings({}, str(cfg), env={})
    assert (s.decimal_handling, s.time_precision, s.unavailable_placeholder) == (
        "string",
        "connect",
        "<toml>",
    )
    assert s.topic_for("orders") == "t.orders"
    s = load_settings(
        {},
        str(cfg),
        env={"TALLY_DECIMAL_HANDLING": "double", "TALLY_UNAVAILABLE_PLACEHOLDER": "<env>"},
    )
    assert (s.decimal_handling, s.unavailable_placeholder) == ("double", "<env>")
    s = load_settings(
        {"decimal_handling": "precise", "topics": {"orders": "o"}},
        str(cfg),
        env={"TALLY_DECIMAL_HANDLING": "double"},
    )
    assert s.decimal_handling == "precise" and s.topic_for("orders") == "o"
    assert s.topic_for("users") == "t.users"
    with pytest.raises(ConfigError, match="decimal_handling"):
        load_settings({"decimal_handling": "exact"}, None, env={})


WIRE_DEFS = """
from tally.engine import TableAggregate

COLUMNS = {"amount": "numeric(12,2)", "t": "time"}
amount_text = TableAggregate("amount_text", table=TABLE, sort_key=lambda r: str(r["amount"]),
                             columns=COLUMNS)
t_text = TableAggregate("t_text", table=TABLE, sort_key=lambda r: r["t"].isoformat(),
                        columns=COLUMNS)
note_len = TableAggregate("note_len", table=TABLE, sort_key=lambda r: len(r["note"]),
                          columns=COLUMNS)
"""


@pytest.fixture
def wire_topic(kafka_bootstrap: str, tmp_path: Path) -> tuple[Path, str]:
    """A topic of schemaless envelopes as Debezium writes them with
    decimal.handling.mode=string, time.precision.mode=connect and
    unavailable.value.placeholder=<toast>: row 1 has a TOASTed note left out."""
    topic = unique_topic("dbz-wire")
    table = "wire"
    create_topic(kafka_bootstrap, topic)
    rows = [
        {"id": 1, "amount": "7.00", "t": 5, "note": "<toast>"},
        {"id": 2, "amount": "-0.01", "t": 45296789, "note": "abc"},
        {"id": 3, "amount": "1234.50", "t": 1000, "note": "xy"},
    ]
    produce(kafka_bootstrap, topic, [(str(r["id"]).encode(), envelope(table, r)) for r in rows])
    defs = tmp_path / "wire_defs.py"
    defs.write_text(f"TABLE = {table!r}\n" + textwrap.dedent(WIRE_DEFS))
    return defs, topic


@pytest.mark.parametrize("source", ["flags", "environment", "toml"])
def test_wire_settings_reach_the_decoder(
    kafka_bootstrap: str, tmp_path: Path, wire_topic: tuple[Path, str], source: str
) -> None:
    defs, topic = wire_topic
    settings = {
        "decimal_handling": "string",
        "time_precision": "connect",
        "unavailable_placeholder": "<toast>",
    }
    flags: list[str] = ["--topic", f"wire={topic}", "--no-http"]
    env: dict[str, str] = {}
    if source == "flags":
        for k, v in settings.items():
            flags += [f"--{k.replace('_', '-')}", v]
    elif source == "environment":
        env = {f"TALLY_{k.upper()}": v for k, v in settings.items()}
    else:
        toml = tmp_path / "wire.toml"
        toml.write_text("".join(f'{k} = "{v}"\n' for k, v in settings.items()))
        flags += ["--config", str(toml)]
    res = consume(defs, tmp_path / "data", kafka_bootstrap, *flags, env=env)
    assert res.returncode == 0, res.stderr
    with open_store(tmp_path / "data") as store:
        # the decimal text and the milliseconds read as the connector wrote them
        assert [(it.key, it.id) for it in store.aggregate("amount_text").iter()] == [
            ("-0.01", 2),
            ("1234.50", 3),
        ]
        assert [(it.key, it.id) for it in store.aggregate("t_text").iter()] == [
            ("00:00:01", 3),
            ("12:34:56.789000", 2),
        ]
        assert [(it.key, it.id) for it in store.aggregate("note_len").iter()] == [(2, 3), (3, 2)]
    # The placeholder never became data: row 1 cannot be keyed by len(note), so its record is
    # dead-lettered with the reason, for every aggregate of the table (an event applies to
    # all of them or to none).
    dlq = read_all(kafka_bootstrap, f"{topic}.dlq")
    assert [dict(h)["tally.reason"] for *_, h in dlq] == [b"unavailable-value"]
    assert [dict(h)["tally.source.offset"] for *_, h in dlq] == [b"0"]


def test_wire_settings_that_disagree_with_the_connector_dead_letter(
    kafka_bootstrap: str, tmp_path: Path, wire_topic: tuple[Path, str]
) -> None:
    """With the defaults (precise: a string is base64) the decimal text cannot be read:
    every record is dead-lettered, none is applied wrong; the placeholder is data then."""
    defs, topic = wire_topic
    res = consume(defs, tmp_path / "data", kafka_bootstrap, "--topic", f"wire={topic}", "--no-http")
    assert res.returncode == 0, res.stderr
    with open_store(tmp_path / "data") as store:
        assert store.aggregate("amount_text").count() == 0
    dlq = read_all(kafka_bootstrap, f"{topic}.dlq")
    reasons = [dict(h)["tally.reason"] for *_, h in dlq]
    errors = [dict(h)["tally.error"].decode() for *_, h in dlq]
    assert reasons == [b"decode"] * 3
    assert all("base64 unscaled decimal" in e for e in errors), errors
