"""Status and probes: ``GET /status``, ``/readyz`` and ``/healthz``.

`aggregate_statuses` is also what ``GET /v1/aggregates`` lists (`tally.consumers.http.reads`)
and what /metrics counts (`tally.consumers.http.metrics`).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from tally.consumers.http.common import PROCESS, Served, Stats, json_response
from tally.consumers.runtime.deadletters import DeadLetterHealth
from tally.consumers.runtime.stats import beyond_end_problem
from tally.engine import AggregateNotReady
from tally.engine.triggers import DRIFT_KINDS

__all__ = ["add_routes", "aggregate_statuses", "readiness", "status"]


def aggregate_statuses(process: Served) -> list[dict[str, Any]]:
    """The aggregates' entries of /status and /v1/aggregates, in definition order.

    ``state`` is "ready" unless the process says otherwise: a process with an
    ``aggregate_states()`` method (name → {"state", "progress", ...}) supplies
    states such as "building" or "stale" and their progress. Independently, an
    aggregate whose reads raise `AggregateNotReady` is "backfilling" with the
    error's progress, and its item counts are null.
    """
    hook = getattr(process, "aggregate_states", None)
    states: dict[str, dict[str, Any]] = hook() if callable(hook) else {}
    drift: dict[tuple[str, str], int] = getattr(process.stats, "drift", {})
    out = []
    for d in process.definitions:
        info = states.get(d.name) or {}
        entry: dict[str, Any] = {
            "name": d.name,
            "table": d.table,
            "topic": process.table_topics.get(d.table, d.table),
            "state": info.get("state", "ready"),
            "items": None,
            "namespaces": None,
            "progress": info.get("progress"),
            "fingerprint": d.fingerprint,
            "drift": {k: drift.get((d.name, k), 0) for k in DRIFT_KINDS},
        }
        counts = getattr(process, "item_counts", None)
        if counts is not None:  # a member: its own partitions' items
            own = counts(d.name)
            if own is not None:
                entry["items"], entry["namespaces"] = own
            out.append(entry)
            continue
        store = process.store
        assert store is not None  # only a member has none, and it counts above
        agg = store.aggregate(d.name)
        try:
            namespaces = agg.namespaces()
            entry["items"] = sum(agg.count(ns) for ns in namespaces)
            entry["namespaces"] = len(namespaces)
        except AggregateNotReady as e:
            if entry["state"] == "ready":
                entry["state"] = "backfilling"
            if entry["progress"] is None:
                entry["progress"] = e.progress
        out.append(entry)
    return out


def _partitions(process: Served) -> list[dict[str, Any]]:
    st = process.stats
    lag = st.lag()
    tps = sorted(
        set(process.assigned) | set(st.end_offsets), key=lambda tp: (tp.topic, tp.partition)
    )
    return [
        {
            "topic": tp.topic,
            "partition": tp.partition,
            "offset": st.offsets.get(tp),
            "end_offset": st.end_offsets.get(tp),
            "lag": lag.get(tp),
            "problem": (
                beyond_end_problem(tp, *st.beyond_end[tp]) if tp in st.beyond_end else None
            ),
        }
        for tp in tps
    ]


def status(process: Served) -> dict[str, Any]:
    """The /status document."""
    st = process.stats
    caught_up = getattr(process, "caught_up", None)
    return {
        "aggregates": aggregate_statuses(process),
        "partitions": _partitions(process),
        "events": st.events,
        "replayed": int(getattr(st, "replayed", 0)),
        "batches": st.batches,
        "changed": st.changed,
        "dead_letters": st.dead_letters,
        "lag": sum(st.lag().values()),
        "caught_up": bool(caught_up is not None and caught_up.is_set()),
        "uptime_seconds": round(time.time() - st.started, 3),
        "broker_reachable": st.broker_ok,
        "dead_letter": _dead_letter(st).status(),
        "warnings": list(getattr(process, "warnings", ())),
        **({"member": member()} if (member := getattr(process, "member_status", None)) else {}),
    }


def _dead_letter(st: Stats) -> DeadLetterHealth:
    return getattr(st, "dead_letter", None) or DeadLetterHealth()


def readiness(process: Served) -> tuple[bool, str, int]:
    """(ready, reason if not, total lag) for /readyz."""
    st = process.stats
    lag = sum(st.lag().values())
    max_lag = process.settings.ready_max_lag
    held = _dead_letter(st).problem()
    if held and st.broker_ok:  # (with the broker gone, that is the reason to give)
        return False, held, lag
    if not process.assigned:
        return (
            False,
            f"no partitions assigned yet: waiting for the broker at {process.settings.bootstrap_servers} "
            f"or for topics {', '.join(process.topics)} to exist",
            lag,
        )
    moving = getattr(process, "aggregate_states", None)
    if moving is not None and getattr(process, "member_status", None) is not None:
        for name, info in moving().items():
            if info.get("state") != "ready":
                p = info.get("progress") or {}
                return (
                    False,
                    f"partition {p.get('topic')}[{p.get('partition')}] of {name} is "
                    f"{p.get('state', 'moving')} on this member (see /status member.tasks)",
                    lag,
                )
    if not st.broker_ok:
        return (
            False,
            "broker unreachable (the last end-offset refresh failed); reads serve the last committed state",
            lag,
        )
    if st.beyond_end:
        tp = min(st.beyond_end, key=lambda tp: (tp.topic, tp.partition))
        return False, beyond_end_problem(tp, *st.beyond_end[tp]), lag
    if lag > max_lag:
        return (
            False,
            f"lag {lag} events is over ready_max_lag {max_lag}: catching up (see /status for each partition)",
            lag,
        )
    return True, "", lag


async def _status(request: web.Request) -> web.StreamResponse:
    process = request.app[PROCESS]
    doc = status(process)
    cluster = getattr(process, "cluster_status", None)
    if cluster is not None and request.query.get("scope") != "member":
        doc["member"] = await cluster()  # with every member's partitions
    return json_response(doc)


async def _healthz(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.StreamResponse:
    process = request.app[PROCESS]
    ready, reason, lag = readiness(process)
    body: dict[str, Any] = {
        "status": "ready" if ready else "not_ready",
        "lag": lag,
        "max_lag": process.settings.ready_max_lag,
    }
    if not ready:
        body["reason"] = reason
    return json_response(body, 200 if ready else 503)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register /status, /healthz and /readyz."""
    router.add_get("/status", _status, allow_head=False)
    router.add_get("/healthz", _healthz, allow_head=False)
    router.add_get("/readyz", _readyz, allow_head=False)
