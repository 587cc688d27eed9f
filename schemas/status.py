"""Shapes of the HTTP API's other answers: errors, /status, /readyz, /healthz.

The OpenAPI document is generated from these Structs (`tally.consumers.http.openapi`), and
``tests/test_http_fuzz.py`` holds the server's answers to them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

__all__ = [
    "AggregateStatus",
    "DeadLetterStatus",
    "Error",
    "ErrorDetail",
    "Health",
    "PartitionStatus",
    "Ready",
    "Status",
]

_CODES = (
    "Machine-readable: not_found, unknown_aggregate, unknown_op, method_not_allowed, bad_json, "
    "bad_request, unknown_field, missing_field, invalid_argument, invalid_key, "
    "offset_out_of_range, payload_too_large, unauthorized, not_ready, internal; from the HTTP "
    "layer bad_http, bad_body, request_too_large, request_timeout, expectation_failed, "
    "too_many_connections; on the token routes also not_supported, unsupported_media_type and "
    "the patch-session codes not_live, rebuilding, too_many_sessions, broker_unreachable, "
    "unknown_session, catching_up, truncated, generation_switched, busy."
)


def _doc(description: str) -> Meta:
    return Meta(description=description)


class ErrorDetail(msgspec.Struct, frozen=True):
    """What went wrong: a code for programs, a message for people (what to do)."""

    code: Annotated[str, _doc(_CODES)]
    message: Annotated[str, _doc("What was wrong and what to do.")]
    known: Annotated[list[str] | UnsetType, _doc("The known aggregates or ops (404).")] = UNSET
    progress: Annotated[Any, _doc("not_ready only: the build's progress.")] = UNSET


class Error(msgspec.Struct, frozen=True):
    """Every error answer (4xx, 5xx): ``{"error": {"code", "message", ...}}``."""

    error: ErrorDetail


class AggregateStatus(msgspec.Struct, frozen=True):
    """One aggregate of the process (/status, /v1/aggregates)."""

    name: str
    table: str
    topic: str
    state: Annotated[
        str,
        _doc(
            "ready; otherwise the process's state while a generation is being built by "
            "replay (e.g. building, stale, backfilling), with `progress`."
        ),
    ]
    items: Annotated[int | None, _doc("Items over all namespaces.")]
    namespaces: int | None
    progress: Annotated[Any, _doc("Build progress while not ready, else null.")]
    fingerprint: Annotated[
        str, _doc("Hash of the definition this process runs (table, functions' source, version).")
    ]
    drift: Annotated[
        dict[str, int],
        _doc(
            "Live events that imply the aggregate was out of step with its table, per kind: "
            "update_unknown / delete_unknown (an id it does not hold; not counted with a "
            "filter), create_existing (an insert of an id it holds with other values). "
            "Reconcile when they grow."
        ),
    ]


class PartitionStatus(msgspec.Struct, frozen=True):
    """One partition the process consumes."""

    topic: str
    partition: int
    offset: Annotated[int | None, _doc("Next offset to read (committed).")]
    end_offset: int | None
    lag: Annotated[int | None, _doc("None when unknown (broker unreachable, or a problem).")]
    problem: Annotated[
        str | None,
        _doc(
            "Why this partition's offsets cannot be trusted, and what to do: e.g. a stored "
            "offset past the partition's end (the topic was deleted and recreated)."
        ),
    ] = None


class DeadLetterStatus(msgspec.Struct, frozen=True):
    """Whether dead letters can be written. `failing`: the batch holding bad records is not
    committed (nothing after it applies) until the write succeeds."""

    state: Literal["ok", "failing"]
    written: Annotated[int, _doc("Dead letters acknowledged.")]
    topic: str | UnsetType = UNSET
    reason: str | UnsetType = UNSET
    since: datetime | UnsetType = UNSET
    attempts: int | UnsetType = UNSET
    records: Annotated[int | UnsetType, _doc("Dead letters the held batch waits to write.")] = UNSET


class Status(msgspec.Struct, frozen=True):
    """/status: aggregates, partitions, counters, uptime, broker."""

    aggregates: list[AggregateStatus]
    partitions: list[PartitionStatus]
    events: Annotated[int, _doc("Records consumed live and committed.")]
    replayed: Annotated[
        int, _doc("Records consumed by replays (backfills, rebuilds) and committed.")
    ]
    batches: int
    changed: int
    dead_letters: int
    lag: Annotated[int, _doc("Total lag over all partitions.")]
    caught_up: bool
    uptime_seconds: float
    broker_reachable: bool
    dead_letter: DeadLetterStatus
    warnings: Annotated[
        list[str],
        _doc(
            "Problems with the configuration, each logged once as a warning too: topics that "
            "cannot hold every row (a replay would not be a backfill), topics on which no "
            "truncate can arrive (Debezium's unwrap SMT)."
        ),
    ]


class Health(msgspec.Struct, frozen=True):
    """/healthz: the process runs."""

    status: Literal["ok"]


class Ready(msgspec.Struct, frozen=True):
    """/readyz: partitions assigned, broker reachable, total lag <= ready_max_lag."""

    status: Literal["ready", "not_ready"]
    lag: int
    max_lag: int
    reason: Annotated[str | UnsetType, _doc("Why not ready (503 only).")] = UNSET
