"""Helpers for the `tally consume` integration tests (real broker, real subprocess).

* `write_definitions` — the test aggregates (a plain one, a namespaced one with
  a tuple key, a filtered one with a float sum, one with mixed-type keys).
* `RowStream` — a random stream of logical insert/update/delete events over a
  pool of ids, and encoders to native (JSON/msgpack) and Debezium records.
* `run_consume` / `start_consume` — the CLI as a subprocess; `json_logs`.
* `open_store`, `topic_end_offsets`, `offsets_of`, `dlq_records`.
* `Feeder` — a background producer thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from kafka_util import read_all
from oracle import Event, interpret_record

ROOT = Path(__file__).resolve().parent.parent
# The CLI of the venv running the tests (.venv, or .venv-latest under scripts/test-latest).
TALLY = str(Path(sys.executable).parent / "tally")
if not os.path.exists(TALLY):  # an interpreter outside any venv: the project's .venv
    TALLY = str(ROOT / ".venv" / "bin" / "tally")


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    cond: Callable[[], Any],
    what: str | Callable[[], str],
    timeout: float = 60.0,
    every: float = 0.05,
    swallow: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``cond`` until it returns something truthy (returned); fail naming ``what`` after
    ``timeout`` s. Exceptions of the ``swallow`` types count as "not yet". ``what`` may be a
    function, called only on a timeout (so the message can show e.g. a log's tail then)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
            if last:
                return last
        except swallow as e:
            last = e
        if time.monotonic() >= deadline:
            desc = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {desc} (last: {last!r})")
        time.sleep(every)


def tail(log: Path, n: int = 3000) -> str:
    """The end of a log file, for assertion messages."""
    return log.read_text()[-n:] if log.exists() else "(no log)"


def process_state(pid: int) -> str:
    """What a live process is doing, from /proc (state, and the kernel function it waits in)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            state = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("State:")), "?")
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read().strip() or "-"
    except OSError as e:
        return f"unknown ({e})"
    return f"{state}, waiting in {wchan}"


def wait_exit(
    proc: subprocess.Popen[Any], what: str, timeout: float, log: Path | None = None
) -> int:
    """Wait for ``proc`` to exit; its exit code. After ``timeout`` s fail naming ``what``, with
    what the process was doing (its /proc state and the tail of ``log``, or of its stderr
    when that is a pipe), and kill it."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        state = process_state(proc.pid)
        last = tail(log) if log is not None else None
        proc.kill()
        proc.wait()
        if last is None:
            err = proc.stderr.read() if proc.stderr is not None else "(no log)"
            last = (err.decode(errors="replace") if isinstance(err, bytes) else err)[-3000:]
        raise AssertionError(
            f"{what}: pid {proc.pid} still running after {timeout}s ({state}); killed it. "
            f"Its last log lines:\n{last}"
        ) from None


TABLE = "players"
TEAMS = ("red", "blue", "green", "gold", "white")

DEFINITIONS = '''
"""Aggregates for the consumer integration tests (written by tests/consumer_util.py)."""
from tally.engine import TableAggregate

# default namespace, int sum
scores = TableAggregate("scores", table="players", sort_key="score", sum_value="score")

# one namespace per team, tuple key
by_team = TableAggregate(
    "by_team", table="players", namespace="team", sort_key=("level", "score"), sum_value="level"
)

# filtered, float sum, many ties on the key
active_names = TableAggregate(
    "active_names", table="players", sort_key="name", sum_value="weight",
    filter=lambda row: row["active"],
)

# mixed-type keys (None, numbers, bools, strings, arrays), int namespaces
by_tag = TableAggregate(
    "by_tag", table="players", namespace=lambda row: row["score"] % 3, sort_key="tag",
    sum_value=lambda row: 1,
)
'''


def write_definitions(directory: Path) -> tuple[str, list[Any]]:
    """Write the definitions file; returns (path, the loaded TableAggregates)."""
    from tally.consumers import load_definitions

    path = directory / "defs_consumer_tests.py"
    path.write_text(textwrap.dedent(DEFINITIONS))
    return str(path), load_definitions(str(path))


# ---------------------------------------------------------------- events


def random_tag(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.1:
        return None
    if r < 0.3:
        return rng.randint(-5, 5)
    if r < 0.4:
        return rng.choice([0.5, -2.25, 3.0, 1e20, -0.0])
    if r < 0.5:
        return rng.random() < 0.5
    if r < 0.8:
        return rng.choice(["", "a", "ab", "b", "é", "Z", "\u00ff", "zz"])
    return [rng.randint(0, 2), rng.choice(["x", "y"])][: rng.randint(1, 2)]


def random_row(rng: random.Random, rid: int) -> dict[str, Any]:
    return {
        "id": rid,
        "team": rng.choice(TEAMS),
        "score": rng.randint(0, 1000),
        "level": rng.randint(1, 5),
        "name": f"n{rng.randint(0, 40)}",
        "active": rng.random() < 0.7,
        "weight": round(rng.uniform(0, 100), 2),
        "tag": random_tag(rng),
    }


class RowStream:
    """Random logical events over ids ``0 .. n_ids-1`` (updates/deletes of live ids,
    inserts of absent ones, now and then a delete of an absent id)."""

    def __init__(self, seed: int, n_ids: int = 300) -> None:
        self.rng = random.Random(seed)
        self.n_ids = n_ids
        self.live: set[int] = set()

    def next(self) -> Event:
        rng = self.rng
        rid = rng.randrange(self.n_ids)
        if rid in self.live:
            if rng.random() < 0.25:
                self.live.discard(rid)
                return Event("delete", TABLE, rid, None)
            return Event("upsert", TABLE, rid, random_row(rng, rid))
        if rng.random() < 0.05:
            return Event("delete", TABLE, rid, None)  # absent: a no-op
        self.live.add(rid)
        return Event("upsert", TABLE, rid, random_row(rng, rid))

    def take(self, n: int) -> list[Event]:
        return [self.next() for _ in range(n)]


_JSON = msgspec.json.Encoder()
_MSGPACK = msgspec.msgpack.Encoder()


def id_key(rid: Any) -> bytes:
    return json.dumps(rid).encode()


def native_record(ev: Event, rng: random.Random, msgpack_share: float = 0.2) -> tuple[bytes, bytes]:
    """A native event (JSON, or msgpack with probability ``msgpack_share``); keyed by
    the JSON of the id. Sometimes the id is left out of the value (the key gives it)."""
    doc: dict[str, Any] = {"table": ev.table}
    if ev.kind == "upsert":
        doc["op"] = "insert" if rng.random() < 0.5 else "update"
        doc["after"] = ev.row
    elif ev.kind == "delete":
        doc["op"] = "delete"
    else:
        raise ValueError("native_record encodes row events only")
    if rng.random() < 0.9:
        doc["id"] = ev.id
    doc["position"] = rng.randrange(1 << 40)
    enc = _MSGPACK if rng.random() < msgpack_share else _JSON
    rec = (id_key(ev.id), enc.encode(doc))
    assert interpret_record(*rec, TABLE) == ev, (rec, ev)  # the model reads what we wrote
    return rec


def native_records(
    events: Sequence[Event], seed: int, msgpack_share: float = 0.2
) -> list[tuple[bytes, bytes]]:
    rng = random.Random(seed)
    return [native_record(ev, rng, msgpack_share) for ev in events]


_KEY_SCHEMA = {
    "type": "struct",
    "name": "app.public.players.Key",
    "optional": False,
    "fields": [{"field": "id", "type": "int64", "optional": False}],
}
_VALUE_SCHEMA = {
    "type": "struct",
    "name": "app.public.players.Envelope",
    "optional": False,
    "fields": [{"field": "op", "type": "string", "optional": False}],
}


def debezium_key(rid: int) -> bytes:
    """The key's shape depends on the id only: equal ids, equal key bytes, one partition."""
    if rid % 4 < 2:
        return _JSON.encode({"id": rid})
    if rid % 4 == 2:
        return _JSON.encode({"schema": _KEY_SCHEMA, "payload": {"id": rid}})
    return _JSON.encode(rid)


def _source(rng: random.Random, lsn: int) -> dict[str, Any]:
    return {
        "version": "2.7.0.Final",
        "connector": "postgresql",
        "name": "app",
        "ts_ms": 1_700_000_000_000 + lsn,
        "snapshot": "false",
        "db": "app",
        "schema": "public",
        "table": TABLE,
        "txId": lsn // 3,
        "lsn": lsn,
    }


def debezium_records(
    events: Sequence[Event],
    seed: int,
    *,
    snapshot: bool = False,
    tombstones: float = 0.7,
    first_lsn: int = 10_000,
) -> list[tuple[bytes | None, bytes | None]]:
    """Debezium records for logical events: envelopes (bare or in the schema/payload
    wrapper) and ExtractNewRecordState rows; a delete envelope is followed by a
    tombstone with probability ``tombstones``. ``snapshot`` makes creates op "r".
    Positions (``source.lsn``) grow from ``first_lsn`` in event order: a later call
    continues the history only with a larger ``first_lsn``."""
    rng = random.Random(seed)
    out: list[tuple[bytes | None, bytes | None]] = []
    seen: set[Any] = set()
    last_row: dict[Any, dict[str, Any]] = {}
    for n, ev in enumerate(events):
        lsn = first_lsn + n * 8
        if ev.kind == "truncate":
            env = {
                "before": None,
                "after": None,
                "source": _source(rng, lsn),
                "op": "t",
                "ts_ms": 1_700_000_000_500 + n,
            }
            out.append((None, _JSON.encode(env)))
            continue
        key = debezium_key(ev.id)
        shape = rng.random()
        if ev.kind == "upsert":
            assert ev.row is not None
            op = "r" if snapshot else ("u" if ev.id in seen else "c")
            seen.add(ev.id)
            last_row[ev.id] = ev.row
            if shape < 0.3:
                row = dict(ev.row, __deleted="false")
                if rng.random() < 0.5:
                    row.update(
                        __op=op, __table=TABLE, __lsn=lsn, __source_ts_ms=1_700_000_000_000 + n
                    )
                value = _JSON.encode(row)
            else:
                env = {
                    "before": None,
                    "after": ev.row,
                    "source": _source(rng, lsn),
                    "op": op,
                    "ts_ms": 1_700_000_000_500 + n,
                }
                value = _JSON.encode(
                    {"schema": _VALUE_SCHEMA, "payload": env} if shape < 0.5 else env
                )
            out.append((key, value))
        else:
            before = last_row.get(ev.id, {"id": ev.id})
            if shape < 0.3:
                # ExtractNewRecordState with delete.tombstone.handling.mode=rewrite
                out.append((key, _JSON.encode(dict(before, __deleted="true"))))
            else:
                env = {
                    "before": before,
                    "after": None,
                    "source": _source(rng, lsn),
                    "op": "d",
                    "ts_ms": 1_700_000_000_500 + n,
                }
                value = _JSON.encode(
                    {"schema": _VALUE_SCHEMA, "payload": env} if shape < 0.5 else env
                )
                out.append((key, value))
                if rng.random() < tombstones:
                    out.append((key, None))
        for rec in out[-2:] if out[-1][1] is None else out[-1:]:
            assert interpret_record(rec[0], rec[1], TABLE) == ev, (rec, ev)
    return out


# ---------------------------------------------------------------- the CLI


def consume_args(
    defs: str,
    topic: str,
    data_dir: Path | str,
    bootstrap: str,
    *extra: str,
    until_caught_up: bool = True,
    http: str | None = None,
) -> list[str]:
    """The `tally consume` command line of the tests (JSON logs; no HTTP unless ``http``)."""
    args = [
        TALLY,
        "consume",
        defs,
        "--topic",
        f"{TABLE}={topic}",
        "--data-dir",
        str(data_dir),
        "--bootstrap-servers",
        bootstrap,
        "--log-format",
        "json",
        *(("--http", http) if http else ("--no-http",)),
        *extra,
    ]
    if until_caught_up:
        args.append("--until-caught-up")
    return args


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(extra)
    return env


def run_consume(
    defs: str,
    topic: str,
    data_dir: Path | str,
    bootstrap: str,
    *extra: str,
    timeout: float = 90,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`tally consume ... --until-caught-up`; asserts exit 0 and returns the result."""
    res = subprocess.run(
        consume_args(defs, topic, data_dir, bootstrap, *extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or child_env(),
        cwd=str(data_dir.parent if isinstance(data_dir, Path) else "."),
        check=False,
    )
    assert res.returncode == 0, (
        f"tally consume exited {res.returncode}:\n{res.stdout}\n{res.stderr}"
    )
    return res


def start_consume(
    defs: str,
    topic: str,
    data_dir: Path,
    bootstrap: str,
    *extra: str,
    log: Path,
    until_caught_up: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`tally consume` in the background, stderr (JSON logs) to ``log``."""
    with open(log, "ab") as f:
        return subprocess.Popen(
            consume_args(defs, topic, data_dir, bootstrap, *extra, until_caught_up=until_caught_up),
            stdout=subprocess.DEVNULL,
            stderr=f,
            env=env or child_env(),
            cwd=str(data_dir.parent),
        )


def json_logs(text: str) -> list[dict[str, Any]]:
    """The JSON log lines of a consumer's stderr (other lines are ignored)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def log_events(text: str, event: str) -> list[dict[str, Any]]:
    return [d for d in json_logs(text) if d.get("event") == event]


# ---------------------------------------------------------------- store & topics


@contextlib.contextmanager
def open_store(data_dir: Path | str) -> Iterator[Any]:
    from tally.engine import Store

    store = Store.open(str(data_dir), read_only=True)
    try:
        yield store
    finally:
        store.close()


def offsets_of(store: Any, topic: str, stream: str = "live") -> dict[int, int]:
    """{partition: next offset} the store has committed for ``topic`` (live stream by default)."""
    from tally.consumers import stored_offsets

    return {
        tp.partition: off for tp, off in stored_offsets(store, stream).items() if tp.topic == topic
    }


class Position(NamedTuple):
    """Where a consumer's committed state stands: the stream that feeds the
    definitions' current generations and its offsets; ``building`` when they are
    being built by a replay (no generation ready: read them with partial=True)."""

    stream: str
    offsets: dict[int, int]
    building: bool


def position(store: Any, topic: str, definitions: Sequence[Any]) -> Position:
    """The committed position of the definitions of a consumer test (one topic,
    all definitions built together). Asserts the catalog is in one of the states
    a consumer of unchanged definitions can leave: nothing yet, all building in
    one replay stream, or all ready and fed live."""
    gens = {d.name: store.generation(d.name) for d in definitions}
    if all(g is None for g in gens.values()):
        assert offsets_of(store, topic) == {}, "offsets without a catalog"
        return Position("live", {}, False)
    assert all(g is not None for g in gens.values()), f"half a catalog: {gens}"
    if all(g.active is not None and g.building is None for g in gens.values()):
        return Position("live", offsets_of(store, topic), False)
    streams = {g.progress.get("stream") for g in gens.values()}
    assert all(g.active is None and g.building for g in gens.values()) and len(streams) == 1, (
        f"unexpected catalog for unchanged definitions: {gens}"
    )
    (key,) = streams
    assert isinstance(key, str) and key != "live", gens
    return Position(key, offsets_of(store, topic, key), True)


async def _end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    tps = [TopicPartition(topic, p["partition"]) for p in meta["partitions"]]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {tp.partition: off for tp, off in ends.items()}


def topic_end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    return asyncio.run(_end_offsets(bootstrap, topic))


async def _topic_exists(bootstrap: str, topic: str) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return topic in await admin.list_topics()
    finally:
        await admin.close()


def dlq_records(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic``'s dead-letter topic (``<topic>.dlq``); [] if it does not exist."""
    dlq = f"{topic}.dlq"
    if not asyncio.run(_topic_exists(bootstrap, dlq)):
        return []
    return read_all(bootstrap, dlq)


# ---------------------------------------------------------------- background producer


class Feeder(threading.Thread):
    """Keeps producing native events of a `RowStream` until stopped; records what was
    acknowledged, in order (one producer, sends awaited batch by batch)."""

    def __init__(self, bootstrap: str, topic: str, stream: RowStream, rate: float = 2000.0) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.stream, self.rate = bootstrap, topic, stream, rate
        self.sent: list[Event] = []
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None
        self.rng = random.Random(99)

    def run(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # surfaced by the test
            self.error = e

    async def _run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        await producer.start()
        enc = msgspec.json.Encoder()
        try:
            chunk = 100
            while not self.stop_flag.is_set():
                t0 = time.monotonic()
                events = self.stream.take(chunk)
                futures = []
                for ev in events:
                    doc = (
                        {"table": TABLE, "op": "update", "id": ev.id, "after": ev.row}
                        if ev.kind == "upsert"
                        else {"table": TABLE, "op": "delete", "id": ev.id}
                    )
                    futures.append(
                        await producer.send(self.topic, enc.encode(doc), key=id_key(ev.id))
                    )
                await asyncio.gather(*futures)
                self.sent.extend(events)
                await asyncio.sleep(max(0.0, chunk / self.rate - (time.monotonic() - t0)))
        finally:
            await producer.stop()

    def finish(self) -> list[Event]:
        self.stop_flag.set()
        self.join(30)
        assert not self.is_alive(), "feeder did not stop"
        if self.error is not None:
            raise self.error
        return self.sent
