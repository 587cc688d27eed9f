"""The read API is declared once (`tally.schemas.reads.READ_OPS`) and every reader follows it.

Unit tests: the table agrees with `engine.Aggregate`'s methods (what makes
``getattr(aggregate, op)(**args)`` right), every reader offers every op, argument errors
name the argument and what it must be, the OpenAPI schemas are the Structs' own. One
subprocess test adds an op to the table, and only to the table, and reads it over HTTP,
through `TallyClient` and with `tally query`, local and remote.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tally.consumers.cli.main import build_parser, main
from tally.consumers.client.client import RemoteAggregate, TallyClient, _tuples
from tally.consumers.http.openapi import build_openapi
from tally.consumers.http.reads import MAX_PAGE_SIZE
from tally.engine import Aggregate, BoundTableAggregate, Store, TableAggregate
from tally.schemas.reads import KEY_SCHEMA, READ_OPS, REF_TEMPLATE, args_error

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("op", list(READ_OPS.values()), ids=list(READ_OPS))
def test_each_op_is_an_aggregate_method_whose_parameters_are_its_args_fields(op: Any) -> None:
    params = list(inspect.signature(getattr(Aggregate, op.name)).parameters.values())[1:]
    assert tuple(p.name for p in params) == op.fields
    assert tuple(p.name for p in params if p.default is inspect.Parameter.empty) == op.required
    defaults = dict(zip(op.fields[len(op.required) :], op.args.__struct_defaults__, strict=True))
    assert {p.name: p.default for p in params if p.name in defaults} == defaults


def test_every_reader_offers_every_op() -> None:
    for cls in (BoundTableAggregate, TallyClient, RemoteAggregate):
        missing = [op for op in READ_OPS if op not in cls.__dict__]
        assert not missing, (cls.__name__, missing)
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    query = commands.choices["query"]
    ops = next(a for a in query._actions if isinstance(a, argparse._SubParsersAction))
    assert {op.replace("_", "-") for op in READ_OPS} <= set(ops.choices)
    assert ops.choices["page"] is ops.choices["paginate"]  # the old name still works


def test_bound_table_aggregate_reads_are_the_aggregates_own(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        bound = TableAggregate("t", table="rows", sort_key="k").bind(store)
        for i in range(5):
            bound.upsert({"id": i, "k": i * 10})
        assert bound.count.__self__ is bound.aggregate  # type: ignore[attr-defined]
        assert bound.at(-1) == bound.aggregate.at(-1)
        assert bound.paginate(page_size=2, order="desc") == bound.aggregate.paginate(
            None, 2, "desc"
        )
        assert BoundTableAggregate.count.__doc__ == Aggregate.count.__doc__


ERRORS: list[tuple[str, bytes, str, str]] = [
    # op, JSON arguments, code, text of the message
    (
        "count",
        b'{"nmspace": 1}',
        "unknown_field",
        "count does not take nmspace; it takes namespace, bounds",
    ),
    ("namespaces", b'{"x": 1}', "unknown_field", "it takes no arguments"),
    ("at", b"{}", "missing_field", "at needs 'offset', e.g. {\"offset\":0}"),
    ("at", b'{"offset": "3"}', "invalid_argument", "offset must be an int, got a string"),
    ("at", b"[3]", "bad_request", "must be a JSON object, got an array"),
    ("paginate", b'{"page_size": 0}', "invalid_argument", "page_size must be a positive int"),
    (
        "paginate",
        b'{"order": "up"}',
        "invalid_argument",
        "order must be one of 'asc', 'desc', got 'up'",
    ),
    (
        "paginate",
        b'{"cursor": 7}',
        "invalid_argument",
        "cursor must be a string or null, got an int",
    ),
    (
        "count",
        b'{"bounds": 5}',
        "invalid_argument",
        "bounds must be an object {lower, upper, eq, prefix} or null",
    ),
    (
        "count",
        b'{"bounds": {"from": 5}}',
        "invalid_argument",
        "bounds has no field 'from'; it takes lower, upper, eq, prefix",
    ),
    (
        "count",
        b'{"bounds": {"lower": {}}}',
        "invalid_argument",
        "bounds.lower needs 'key' (it takes key, inclusive, id)",
    ),
    (
        "count",
        b'{"bounds": {"upper": {"key": 1, "inclusive": 0}}}',
        "invalid_argument",
        "bounds.upper.inclusive must be true or false, got an int",
    ),
    (
        "count_batch",
        b'{"queries": 5}',
        "invalid_argument",
        "queries must be an array of objects {namespace, bounds, offset}, got an int",
    ),
    (
        "at_batch",
        b'{"queries": [{}, {"offset": 1.5}]}',
        "invalid_argument",
        "queries[1].offset must be an int, got a number",
    ),
]


@pytest.mark.parametrize(
    ("op", "body", "code", "text"), ERRORS, ids=[f"{e[0]} {e[1].decode()}" for e in ERRORS]
)
def test_argument_errors_name_the_argument_and_what_it_must_be(
    op: str, body: bytes, code: str, text: str
) -> None:
    spec = READ_OPS[op]
    with pytest.raises(msgspec.ValidationError) as e:
        msgspec.json.decode(body, type=spec.args)
    got_code, message = args_error(spec, e.value)
    assert got_code == code and text in message, (got_code, message)


def test_openapi_schemas_are_the_structs_own() -> None:
    doc = build_openapi(aggregates=["a"], maximum={"page_size": MAX_PAGE_SIZE})
    schemas = doc["components"]["schemas"]
    assert schemas["Key"] == KEY_SCHEMA
    for op in READ_OPS.values():
        (ref, _), generated = msgspec.json.schema_components(
            [op.args, op.answer], ref_template=REF_TEMPLATE
        )
        for name, schema in generated.items():
            if name == "PaginateArgs":  # plus the HTTP limit
                schema["properties"]["page_size"]["maximum"] = MAX_PAGE_SIZE
            assert schemas[name] == schema, name
        post = doc["paths"][f"/v1/aggregates/{{name}}/{op.name}"]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"] == ref
        ok = post["responses"]["200"]["content"]["application/json"]["schema"]
        assert ok == {"$ref": REF_TEMPLATE.format(name=op.answer.__name__)}


def _run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_cli_paginate_and_its_old_name_page_answer_alike(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s") as store:
        agg = store.aggregate("lb")
        with store.batch():
            for i in range(30):
                agg.insert(i % 7, i, i)
        want = msgspec.json.decode(msgspec.json.encode(agg.paginate(None, 4, "desc")))
    for name in ("paginate", "page"):
        code, out, err = _run_cli(
            "query",
            "--data-dir",
            str(tmp_path / "s"),
            "lb",
            name,
            "--page-size",
            "4",
            "--order",
            "desc",
            "--json",
        )
        assert (code, err) == (0, "") and json.loads(out) == want


ADD_AN_OP = """
import asyncio, contextlib, io, json, sys, threading, types

import msgspec
from tally.schemas.reads import READ_OPS, Key, ReadOp


class GetArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: Key


# The whole change: one entry in the table (engine.Aggregate.get exists already).
READ_OPS["get"] = ReadOp("get", GetArgs, READ_OPS["min"].result, "The item of an id, or null",
                         example={"id": 7})

from aiohttp import web
from tally.consumers.cli.main import main
from tally.consumers.client import TallyClient
from tally.consumers.http.app import create_app
from tally.consumers.runtime.stats import ConsumerStats
from tally.engine import Store, TableAggregate
from tally.schemas.config import ConsumerSettings

data = sys.argv[1]
out = {}
with Store.open(data) as store:
    agg = store.aggregate("scores")
    with store.batch():
        for i in range(10):
            agg.insert(i * 10, i, i, ("g", i % 2))


def cli(*argv):
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, buf.getvalue(), err.getvalue()


out["cli_local"] = cli("query", "--data-dir", data, "scores", "get", "3", "--json")
out["cli_local_absent"] = cli("query", "--data-dir", data, "scores", "get", "99", "--json")

store = Store.open(data)
process = types.SimpleNamespace(
    store=store, definitions=[TableAggregate("scores", table="t", sort_key="k")],
    stats=ConsumerStats(), settings=ConsumerSettings(), topics=["t"], table_topics={"t": "t"},
    assigned=[],
)
ready = threading.Event()
box = {}


def serve():
    async def run():
        runner = web.AppRunner(create_app(process, None))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["port"] = runner.addresses[0][1]
        box["loop"] = asyncio.get_running_loop()
        box["stop"] = asyncio.Event()
        ready.set()
        await box["stop"].wait()
        await runner.cleanup()

    asyncio.run(run())


thread = threading.Thread(target=serve, daemon=True)
thread.start()
ready.wait(30)
url = f"http://127.0.0.1:{box['port']}"
client = TallyClient(url)
out["client_read"] = msgspec.to_builtins(client.read("get", "scores", 3))
out["client_method"] = msgspec.to_builtins(client.get("scores", 3))
out["remote"] = msgspec.to_builtins(client.aggregate("scores").get(id=3))
out["absent"] = client.read("get", "scores", 99)
out["cli_remote"] = cli("query", "--url", url, "scores", "get", "3", "--json")
doc = client.openapi()
out["documented"] = sorted(doc["paths"]["/v1/aggregates/{name}/get"])
out["args_schema"] = doc["components"]["schemas"]["GetArgs"]
try:
    client.read("get", "scores", 3, nope=1)
except Exception as e:
    out["unknown_field"] = [e.code, str(e)]
try:
    client.read("get", "scores")
except Exception as e:
    out["missing_field"] = [e.code, str(e)]
box["loop"].call_soon_threadsafe(box["stop"].set)
thread.join(30)
store.close()
print(json.dumps(out))
"""


def test_a_read_op_added_to_the_table_only_is_served_documented_and_read_everywhere(
    tmp_path: Path,
) -> None:
    script = tmp_path / "add_an_op.py"
    script.write_text(textwrap.dedent(ADD_AN_OP))
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    item = {"key": 30, "id": 3, "sum_value": 3, "namespace": ["g", 1]}
    assert out["client_read"] == out["client_method"] == out["remote"] == item
    assert out["absent"] is None
    for where in ("cli_local", "cli_remote"):
        code, stdout, stderr = out[where]
        assert (code, stderr) == (0, "") and json.loads(stdout) == item, (where, out[where])
    assert out["cli_local_absent"][:2] == [0, "null\n"]
    assert out["documented"] == ["get", "parameters", "post"]
    assert (
        out["args_schema"]["required"] == ["id"]
        and out["args_schema"]["additionalProperties"] is False
    )
    assert (
        out["unknown_field"][0] == "unknown_field"
        and "get does not take nope; it takes id" in out["unknown_field"][1]
    )
    assert (
        out["missing_field"][0] == "missing_field"
        and "get needs 'id', e.g. {\"id\":7}" in out["missing_field"][1]
    )


def test_client_answers_keep_tuples_as_the_engine_gives_them() -> None:
    # The typed decoders give JSON arrays as lists; the client hands them back as tuples.
    page = msgspec.json.decode(
        b'{"result": {"items": [{"key": [1, [2, 3]], "id": [4], "sum_value": 1, "namespace": ["a"]}],'
        b' "cursor": null, "is_done": true}}',
        type=READ_OPS["paginate"].answer,
    )
    got = _tuples(page.result)
    assert (
        got.items[0].key == (1, (2, 3))
        and got.items[0].id == (4,)
        and got.items[0].namespace == ("a",)
    )
    assert _tuples([[1, 2], None, "x"]) == [(1, 2), None, "x"]
