"""Decode throughput of `schemas.EventDecoder`, per record shape, on one core.

Each shape is measured side by side with a plain untyped decode of the same
values into dicts (``msgspec.json.decode`` — ``msgspec.msgpack.decode`` for
the msgpack shape), which is the floor any decoder of these bytes pays; the
ratio says what detection, typing and normalization add on top.

Run from the repository root: ``.venv/bin/python scripts/bench/decode.py [--events N] [--rounds R]``
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import msgspec

from tally.schemas import EventDecoder, NativeEvent, encode_native

Record = tuple[bytes | None, bytes, str]


def _row(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "player": f"player-{i % 977}",
        "score": (i * 7919) % 1000 / 10,
        "level": i % 40,
    }


def _source(i: int) -> dict[str, Any]:
    return {
        "version": "2.7.0.Final",
        "connector": "postgresql",
        "name": "pg",
        "ts_ms": 1_700_000_000_000 + i,
        "snapshot": "false",
        "db": "game",
        "sequence": f'["{24023000 + i}","{24023128 + i}"]',
        "schema": "public",
        "table": "scores",
        "txId": 500 + i,
        "lsn": 24023128 + i,
        "xmin": None,
    }


_FIELD_SCHEMA = [
    {"type": "int32", "optional": False, "field": "id"},
    {"type": "string", "optional": True, "field": "player"},
    {"type": "double", "optional": True, "field": "score"},
    {"type": "int32", "optional": True, "field": "level"},
]
_VALUE_SCHEMA = {
    "type": "struct",
    "optional": False,
    "name": "pg.public.scores.Envelope",
    "version": 2,
    "fields": [
        {
            "type": "struct",
            "fields": _FIELD_SCHEMA,
            "optional": True,
            "name": "pg.public.scores.Value",
            "field": f,
        }
        for f in ("before", "after")
    ]
    + [
        {
            "type": "struct",
            "optional": False,
            "name": "io.debezium.connector.postgresql.Source",
            "field": "source",
            "fields": [
                {"type": "string", "optional": False, "field": n}
                for n in ("version", "connector", "name")
            ],
        },
        {"type": "string", "optional": False, "field": "op"},
        {"type": "int64", "optional": True, "field": "ts_ms"},
    ],
}
_KEY_SCHEMA = {
    "type": "struct",
    "optional": False,
    "name": "pg.public.scores.Key",
    "fields": _FIELD_SCHEMA[:1],
}


def make_records(n: int) -> dict[str, list[Record]]:
    """``n`` distinct records of each shape, as a consumer would receive them."""
    enc = msgspec.json.encode
    shapes: dict[str, list[Record]] = {
        "native JSON": [],
        "native JSON, other field order": [],
        "native msgpack": [],
        "Debezium envelope": [],
        "Debezium envelope + schema wrapper": [],
        "unwrapped (ExtractNewRecordState)": [],
    }
    for i in range(n):
        event = NativeEvent(
            table="scores",
            op="update",
            id=i,
            after=_row(i),
            position=24023128 + i,
            ts_ms=1_700_000_000_000 + i,
        )
        key = str(i).encode()
        shapes["native JSON"].append((key, encode_native(event, "json"), "scores"))
        # Another producer's field order misses the fast path and goes through detection.
        reordered = {
            "op": "update",
            "id": i,
            "after": _row(i),
            "table": "scores",
            "ts_ms": 1_700_000_000_000 + i,
        }
        shapes["native JSON, other field order"].append((key, enc(reordered), "scores"))
        shapes["native msgpack"].append((key, encode_native(event, "msgpack"), "scores"))
        envelope = {
            "before": None,
            "after": _row(i),
            "source": _source(i),
            "op": "u",
            "ts_ms": 1_700_000_000_100 + i,
        }
        shapes["Debezium envelope"].append((enc({"id": i}), enc(envelope), "pg.public.scores"))
        shapes["Debezium envelope + schema wrapper"].append(
            (
                enc({"schema": _KEY_SCHEMA, "payload": {"id": i}}),
                enc({"schema": _VALUE_SCHEMA, "payload": envelope}),
                "pg.public.scores",
            )
        )
        unwrapped = {
            **_row(i),
            "__deleted": "false",
            "__op": "u",
            "__table": "scores",
            "__lsn": 24023128 + i,
            "__source_ts_ms": 1_700_000_000_000 + i,
        }
        shapes["unwrapped (ExtractNewRecordState)"].append(
            (enc({"id": i}), enc(unwrapped), "pg.public.scores")
        )
    return shapes


def rates(
    fns: dict[str, Callable[[list[Record]], None]], records: list[Record], rounds: int
) -> dict[str, float]:
    """Best-of-``rounds`` events per second of each function over ``records``.

    The functions take turns within every round, so a noisy neighbour slows
    them alike and the ratios stay meaningful on a shared machine.
    """
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn(records[: min(len(records), 1000)])  # warm up
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(records)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(records) / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--events", type=int, default=50_000, help="distinct records per shape (default 50000)"
    )
    parser.add_argument(
        "--rounds", type=int, default=7, help="timed passes per measurement, best kept (default 7)"
    )
    args = parser.parse_args()

    shapes = make_records(args.events)
    decoders = {
        "auto": EventDecoder(format="auto"),
        "native": EventDecoder(format="native"),
        "debezium": EventDecoder(format="debezium"),
    }
    explicit = {
        "native JSON": "native",
        "native JSON, other field order": "native",
        "native msgpack": "native",
    }

    def reference_json(records: list[Record]) -> None:
        decode = msgspec.json.decode
        for _key, value, _topic in records:
            decode(value)

    def reference_msgpack(records: list[Record]) -> None:
        decode = msgspec.msgpack.decode
        for _key, value, _topic in records:
            decode(value)

    def run_with(decoder: EventDecoder) -> Callable[[list[Record]], None]:
        def run(records: list[Record]) -> None:
            decode = decoder.decode
            for key, value, topic in records:
                decode(key, value, topic)

        return run

    print(
        f"decode throughput, {args.events} distinct records per shape, best of {args.rounds}, one core"
    )
    header = f"{'shape':36} {'format':9} {'tally ev/s':>12} {'dict ev/s':>12} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, records in shapes.items():
        formats = ("auto", explicit.get(name, "debezium"))
        fns = {"dict": reference_msgpack if "msgpack" in name else reference_json}
        fns.update({fmt: run_with(decoders[fmt]) for fmt in formats})
        result = rates(fns, records, args.rounds)
        for fmt in formats:
            ratio = result[fmt] / result["dict"]
            print(f"{name:36} {fmt:9} {result[fmt]:12,.0f} {result['dict']:12,.0f} {ratio:7.2f}")
    print(
        "dict ev/s: plain msgspec.json.decode(value) (msgspec.msgpack.decode for msgpack) into dicts"
    )
    print("ratio: tally / dict (1.00 = as fast as the untyped decode alone)")


if __name__ == "__main__":
    main()
