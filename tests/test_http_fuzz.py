"""A real HTTP fuzzer against a real consumer: schemathesis on ``/openapi.json``.

A `tally consume` subprocess (real broker, real RocksDB, a token in TALLY_TOKEN so the
state-changing routes are served and fuzzed too) holds a few hundred rows over four
aggregates with mixed-type keys. The schemathesis CLI then runs its coverage, fuzzing and
stateful phases over every operation, positive and negative data, with a fixed seed and a
bounded number of examples per operation (`FUZZ_EXAMPLES`; about 30-60 s here), and every
check but ``positive_data_acceptance`` — a schema cannot say that an offset past the end
(400 ``offset_out_of_range``) or a well-formed but unknown cursor (400) is refused, and the
API is right to refuse them. Asserted: schemathesis reports no failure and no error, every
operation was tested, no response is a 5xx, and the consumer logged no error and still
serves. The run's request count and status distribution are printed (``-s``) for the record.

Reproduce or dig deeper: ``TALLY_FUZZ_SEED=N TALLY_FUZZ_EXAMPLES=M pytest tests/test_http_fuzz.py -s``
(the schemathesis command is printed too).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import types
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from consumer_util import (
    RowStream,
    child_env,
    consume_args,
    free_port,
    json_logs,
    native_records,
    tail,
    wait_for,
    write_definitions,
)
from kafka_util import create_topic, produce, unique_topic

from tally.consumers.client import TallyClient
from tally.consumers.http.app import create_app
from tally.consumers.http.common import MAX_BODY
from tally.consumers.runtime.patches import PatchError
from tally.consumers.runtime.stats import ConsumerStats
from tally.engine import InvalidArgument, Store, TableAggregate, TallyError
from tally.schemas.config import ConsumerSettings

FUZZ_EXAMPLES = int(os.environ.get("TALLY_FUZZ_EXAMPLES") or 15)
"""Examples per operation in schemathesis' fuzzing phase (its coverage phase is fixed)."""
FUZZ_SEED = int(os.environ.get("TALLY_FUZZ_SEED") or 10)
FUZZ_TIMEOUT = 240
"""Seconds the fuzzer may take before the test fails saying so (it takes well under that)."""
TOKEN = "fuzz-token"
HOOKS = Path(__file__).resolve().parent / "schemathesis_hooks.py"


def test_http_fuzzer_finds_no_server_error_and_no_response_off_the_documented_schema(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    pytest.importorskip(
        "schemathesis", reason="schemathesis is a dev dependency: pip install -e '.[dev]'"
    )
    topic = unique_topic("http-fuzz")
    create_topic(kafka_bootstrap, topic, partitions=2)
    defs, _ = write_definitions(tmp_path)
    stream = RowStream(seed=77)
    produce(kafka_bootstrap, topic, native_records(stream.take(400), seed=77))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "consumer.log"
    args = consume_args(
        defs,
        topic,
        tmp_path / "data",
        kafka_bootstrap,
        until_caught_up=False,
        http=f"127.0.0.1:{port}",
    )
    with open(log, "ab") as f:
        proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=child_env(TALLY_TOKEN=TOKEN),
            cwd=tmp_path,
        )
    try:
        client = TallyClient(url, timeout=10)

        def ready() -> bool:
            assert proc.poll() is None, f"the consumer exited {proc.returncode}:\n{tail(log)}"
            return client.count("scores") == len(stream.live)

        wait_for(ready, "the consumer to apply the rows", swallow=(TallyError,))
        reports = tmp_path / "fuzz-reports"
        cmd = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{url}/openapi.json",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            str(FUZZ_EXAMPLES),
            "--seed",
            str(FUZZ_SEED),
            "--report",
            "json,har",
            "--report-dir",
            str(reports),
            "--no-color",
        ]
        env = child_env(SCHEMATHESIS_HOOKS=HOOKS.stem)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(HOOKS.parent), env.get("PYTHONPATH")) if p
        )
        print("\nfuzzer:", " ".join(cmd[2:]))
        try:
            run = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=env,
                cwd=tmp_path,
                timeout=FUZZ_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(
                f"the fuzzer did not finish within {FUZZ_TIMEOUT}s (lower TALLY_FUZZ_EXAMPLES?):\n"
                f"{(e.stdout or b'')[-4000:]!r}"
            )
        out = run.stdout + run.stderr
        (report_file,) = reports.glob("json-*.json")
        (har_file,) = reports.glob("har-*.json")
        report = json.loads(report_file.read_text())
        entries = json.loads(har_file.read_text())["log"]["entries"]
        statuses = collections.Counter(e["response"]["status"] for e in entries)
        print(
            f"fuzzer: {len(entries)} requests, {report['test_cases']['generated']} test cases, "
            f"statuses {dict(sorted(statuses.items()))}, seed {FUZZ_SEED}, {FUZZ_EXAMPLES} examples/operation"
        )
        assert run.returncode == 0 and not report["failures"] and not report["errors"], out[-8000:]
        assert report["operations"]["tested"] == report["operations"]["selected"] >= 30, report[
            "operations"
        ]
        server_errors = [
            (e["request"]["method"], e["request"]["url"][:200], e["response"]["status"])
            for e in entries
            if e["response"]["status"] >= 500
        ]
        assert not server_errors, server_errors[:20]
        assert len(entries) >= 1000 and statuses[200] and statuses[400], (
            statuses
        )  # it really fuzzed
        assert proc.poll() is None, tail(log)
        assert client.healthz() == {"status": "ok"}
        errors = [e for e in json_logs(log.read_text()) if e.get("level") in ("error", "critical")]
        assert not errors, errors[:5]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"the consumer did not stop within 30 s of SIGTERM:\n{tail(log)}")
    assert proc.returncode == 0, tail(log)


# ---------------------------------------------------------------- what the fuzzer found, one test each
# (in-process: `create_app` with a stand-in process, aiohttp's test client)


def _stand_in(store: Store, **attrs: Any) -> Any:
    return types.SimpleNamespace(
        store=store,
        definitions=[AGG],
        stats=ConsumerStats(),
        settings=ConsumerSettings(),
        topics=["players"],
        table_topics={"players": "players"},
        assigned=[],
        **attrs,
    )


AGG = TableAggregate("scores", table="players", sort_key="score", sum_value="score")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(tmp_path / "store")
    yield s
    s.close()


def _serve(app: web.Application, fn: Callable[[TestClient[Any, Any]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(app)) as c:
            await fn(c)

    asyncio.run(main())


def _documented(doc: dict[str, Any], method: str, path: str) -> set[int]:
    return {int(code) for code in doc["paths"][path][method.lower()]["responses"]}


@pytest.mark.parametrize("op", ["count_batch", "sum_batch", "at_batch"])
@pytest.mark.parametrize("offset", [{}, "3", 1.5, True, None, [1]])
def test_batch_queries_with_a_non_int_offset_are_a_400(store: Store, op: str, offset: Any) -> None:
    # Found by the fuzzer: count_batch/sum_batch ignored `offset` and answered 200 for {"offset": {}}.
    with pytest.raises(InvalidArgument, match="a query's offset must be an int"):
        getattr(store.aggregate("scores"), op)([{"offset": offset}])

    async def steps(c: TestClient[Any, Any]) -> None:
        r = await c.post(f"/v1/aggregates/scores/{op}", json={"queries": [{"offset": offset}]})
        body = await r.json()
        assert r.status == 400 and body["error"]["code"] == "invalid_argument", body
        assert "offset must be an int" in body["error"]["message"]
        r = await c.post(f"/v1/aggregates/scores/{op}", json={"queries": [{"offset": 0}, {}]})
        assert r.status == (400 if op == "at_batch" else 200)  # at_batch: the aggregate is empty

    _serve(create_app(_stand_in(store), None), steps)


class _RefusingPatches:
    """Patch sessions that refuse every call with the given status (as `PatchSessions` does)."""

    def __init__(self, status: int) -> None:
        self.status = status

    def _refuse(self, *a: Any) -> Any:
        raise PatchError(self.status, "refused", f"refused with {self.status}")

    async def begin(self, *a: Any) -> Any:
        return self._refuse()

    async def apply(self, *a: Any) -> Any:
        return self._refuse()

    def end(self, *a: Any) -> Any:
        return self._refuse()


def _patch_statuses() -> set[int]:
    """Every status consumers/runtime/patches.py can refuse a patch request with."""
    import tally.consumers.runtime.patches as lp

    return {int(s) for s in re.findall(r"PatchError\(\s*(\d{3})", inspect.getsource(lp))}


PATCH_SESSION = "/v1/aggregates/{name}/patch-sessions/{session}"


# What each session call can refuse with (consumers/runtime/patches.py): begin → _live_physical
# (404, 409), 429, 503; apply → get (404), _live_physical (404, 409), 409, 503; end → get (404).
PATCH_CALLS = [
    ("POST", "/v1/aggregates/{name}/patch-sessions", None, {404, 409, 429, 503}),
    ("POST", PATCH_SESSION, msgspec.msgpack.encode({"changes": []}), {404, 409, 503}),
    ("DELETE", PATCH_SESSION, None, {404}),
]


def test_protected_routes_document_every_status_they_answer(store: Store) -> None:
    # Found by the fuzzer: the token routes answered 404, 409, 415 and 429 (and DELETE a 404)
    # that /openapi.json did not list.
    raised = _patch_statuses()
    assert raised == set().union(*(codes for *_, codes in PATCH_CALLS)) == {404, 409, 429, 503}, (
        f"live_patch.py refuses with {sorted(raised)}: update PATCH_CALLS and the routes' documented errors"
    )
    headers = {"Authorization": "Bearer t"}

    async def steps(c: TestClient[Any, Any], status: int) -> None:
        doc = await (await c.get("/openapi.json")).json()
        for method, path, body, codes in PATCH_CALLS:
            if status not in codes:
                continue
            url = path.replace("{name}", "scores").replace("{session}", "abc")
            extra = {"Content-Type": "application/msgpack"} if body is not None else {}
            r = await c.request(method, url, data=body, headers={**headers, **extra})
            assert r.status == status and (await r.json())["error"]["code"] == "refused"
            assert status in _documented(doc, method, path), (method, path, status)

    for status in sorted(raised):
        proc = _stand_in(store, patches=_RefusingPatches(status), request_rebuild=lambda name: None)

        def refused_steps(c: TestClient[Any, Any], status: int = status) -> Awaitable[None]:
            return steps(c, status)

        _serve(create_app(proc, "t"), refused_steps)

    async def own(c: TestClient[Any, Any]) -> None:  # answers of the routes themselves
        doc = await (await c.get("/openapi.json")).json()
        r = await c.post("/v1/aggregates/nope/rebuild", headers=headers)
        assert r.status == 404 and 404 in _documented(doc, "POST", "/v1/aggregates/{name}/rebuild")
        r = await c.post("/v1/aggregates/scores/patch-sessions/abc", data=b"{}", headers=headers)
        assert r.status == 415 and (await r.json())["error"]["code"] == "unsupported_media_type"
        assert 415 in _documented(doc, "POST", PATCH_SESSION)
        msgpack = {**headers, "Content-Type": "application/msgpack"}
        r = await c.post(
            "/v1/aggregates/scores/patch-sessions/abc", data=b"x" * (MAX_BODY + 1), headers=msgpack
        )
        assert r.status == 413 and 413 in _documented(doc, "POST", PATCH_SESSION)
        r = await c.post("/v1/aggregates/scores/patch-sessions/abc", data=b"\xc1", headers=msgpack)
        assert r.status == 400 and 400 in _documented(doc, "POST", PATCH_SESSION)

    _serve(
        create_app(
            _stand_in(store, patches=_RefusingPatches(404), request_rebuild=lambda n: None), "t"
        ),
        own,
    )


def test_openapi_documents_the_http_layers_own_answers(store: Store) -> None:
    # Found by the fuzzer: aiohttp's 400 for an over-long request line was text/plain; every
    # operation may also meet the HTTP layer's 400 (malformed), 417 (an unknown Expect), 503
    # (connection limit) and, with a body, 408 (body timeout) and 413 — all in the envelope.
    async def steps(c: TestClient[Any, Any]) -> None:
        doc = await (await c.get("/openapi.json")).json()
        for path, item in doc["paths"].items():
            for method, op in item.items():
                if method not in ("get", "post", "delete"):
                    continue
                codes = _documented(doc, method, path)
                assert {400, 417, 500, 503} <= codes, (method, path, codes)
                if "requestBody" in op:
                    assert {408, 413} <= codes, (method, path, codes)
                for code, resp in op["responses"].items():
                    if int(code) >= 400 and not (path == "/readyz" and code == "503"):
                        assert resp["content"]["application/json"]["schema"] == {
                            "$ref": "#/components/schemas/Error"
                        }, (method, path, code)
        ready_503 = doc["paths"]["/readyz"]["get"]["responses"]["503"]["content"][
            "application/json"
        ]["schema"]
        assert ready_503 == {
            "oneOf": [
                {"$ref": "#/components/schemas/Ready"},
                {"$ref": "#/components/schemas/Error"},
            ]
        }

    _serve(create_app(_stand_in(store, patches=_RefusingPatches(404)), "t"), steps)
