"""``GET /metrics``: the process's counters in the Prometheus text format (0.0.4)."""

from __future__ import annotations

import math
import time

from aiohttp import web

from tally.consumers.http.common import CONNECTIONS, PROCESS, Served
from tally.consumers.http.limits import ConnectionStats
from tally.consumers.http.status import aggregate_statuses
from tally.consumers.runtime.stats import LATENCY_BUCKETS
from tally.engine.triggers import DRIFT_KINDS

__all__ = ["add_routes", "render_metrics"]


def _num(v: float) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "+Inf" if v > 0 else "-Inf"
        return repr(v)
    return str(v)


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(process: Served, connections: ConnectionStats | None = None) -> str:
    """Prometheus text exposition format 0.0.4 (``connections``: the HTTP guards' counters)."""
    st = process.stats
    out: list[str] = []

    def family(name: str, kind: str, help: str) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")

    def sample(name: str, value: float, **labels: object) -> None:
        if labels:
            ls = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{ls}}} {_num(value)}")
        else:
            out.append(f"{name} {_num(value)}")

    family(
        "tally_events_applied_total",
        "counter",
        "Records consumed live and committed (dead letters included).",
    )
    sample("tally_events_applied_total", st.events)
    family(
        "tally_events_replayed_total",
        "counter",
        "Records consumed by replays (backfills, rebuilds) and committed.",
    )
    sample("tally_events_replayed_total", int(getattr(st, "replayed", 0)))
    family(
        "tally_batches_total",
        "counter",
        "Consumer batches committed (one RocksDB WriteBatch each).",
    )
    sample("tally_batches_total", st.batches)
    family("tally_items_changed_total", "counter", "Item writes that changed an aggregate.")
    sample("tally_items_changed_total", st.changed)
    family("tally_dead_letters_total", "counter", "Records sent to a dead-letter topic.")
    sample("tally_dead_letters_total", st.dead_letters)
    family(
        "tally_drift_events_total",
        "counter",
        "Live events implying the aggregate was out of step with its table (kind: update_unknown, "
        "delete_unknown, create_existing); reconcile when it grows.",
    )
    drift: dict[tuple[str, str], int] = getattr(st, "drift", {})
    for d in process.definitions:
        for kind in DRIFT_KINDS:
            sample(
                "tally_drift_events_total",
                drift.get((d.name, kind), 0),
                aggregate=d.name,
                kind=kind,
            )

    name = "tally_batch_apply_seconds"
    family(
        name,
        "histogram",
        "Seconds to decode, apply and commit one live batch (for a replay: to apply and commit one gathered chunk).",
    )
    cumulative = 0
    for le, n in zip(LATENCY_BUCKETS, st.latency_buckets, strict=False):
        cumulative += n
        sample(f"{name}_bucket", cumulative, le=_num(float(le)))
    total = sum(st.latency_buckets)
    sample(f"{name}_bucket", total, le="+Inf")
    sample(f"{name}_sum", st.latency_sum)
    sample(f"{name}_count", total)

    family(
        "tally_lag",
        "gauge",
        "Events between the committed offset and the end offset, per partition.",
    )
    lag = st.lag()
    for tp in sorted(lag, key=lambda tp: (tp.topic, tp.partition)):
        sample("tally_lag", lag[tp], topic=tp.topic, partition=tp.partition)

    statuses = aggregate_statuses(process)
    family("tally_items", "gauge", "Items held per aggregate, over all namespaces.")
    for s in statuses:
        if s["items"] is not None:
            sample("tally_items", s["items"], aggregate=s["name"])
    family(
        "tally_aggregate_ready",
        "gauge",
        "1 when the aggregate's state is ready, else 0 (see /status).",
    )
    for s in statuses:
        sample("tally_aggregate_ready", int(s["state"] == "ready"), aggregate=s["name"])

    family("tally_broker_reachable", "gauge", "1 when the last broker request succeeded.")
    sample("tally_broker_reachable", int(st.broker_ok))
    family("tally_uptime_seconds", "gauge", "Seconds since the consumer process started.")
    sample("tally_uptime_seconds", round(time.time() - st.started, 3))
    if connections is not None:
        family(
            "tally_http_connections",
            "gauge",
            "Open HTTP connections (capped by http_max_connections).",
        )
        sample("tally_http_connections", connections.open)
        family(
            "tally_http_connections_accepted_total",
            "counter",
            "HTTP connections accepted (within the cap).",
        )
        sample("tally_http_connections_accepted_total", connections.accepted)
        family(
            "tally_http_connections_refused_total",
            "counter",
            "HTTP connections answered 503 and closed at once: the connection limit was reached.",
        )
        sample("tally_http_connections_refused_total", connections.refused)
        family(
            "tally_http_timeouts_total",
            "counter",
            "HTTP requests whose headers or body did not arrive in time (answered 408, closed).",
        )
        for kind in sorted(connections.timeouts):
            sample("tally_http_timeouts_total", connections.timeouts[kind], kind=kind)
    return "\n".join(out) + "\n"


async def _metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(
        text=render_metrics(request.app[PROCESS], request.app.get(CONNECTIONS)),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Prometheus-Format": "0.0.4"},
    )


def add_routes(router: web.UrlDispatcher) -> None:
    """Register /metrics."""
    router.add_get("/metrics", _metrics, allow_head=False)
