"""Generations: which physical aggregate answers for a logical name.

A definition that changes (or a rebuild) is built as a new *generation* — a
separate physical aggregate named ``name#N`` — while the previous one keeps
serving. The switch is one metadata write in the same batch that makes the new
generation current, so readers see either the old answers or the new ones,
never a half-built mix. With no ready generation, reads raise
`AggregateNotReady` carrying the build progress (unless asked for a partial
answer).

Aggregates written without a catalog entry (plain library use) are their own
single generation: ``store.aggregate(name)`` reads and writes ``name``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from .errors import AggregateNotReady

__all__ = ["GEN_SEP", "Generation", "not_ready", "physical_name"]

GEN_SEP = "#"


def physical_name(name: str, gen: int) -> str:
    """The physical aggregate holding generation ``gen`` of ``name``."""
    return f"{name}{GEN_SEP}{gen}"


class Generation(msgspec.Struct, kw_only=True):
    """Catalog entry of a logical aggregate (persisted in store metadata)."""

    active: str | None = None
    """Physical aggregate serving reads (None: not ready)."""
    active_fingerprint: str | None = None
    building: str | None = None
    """Physical aggregate being built by replay, if any."""
    building_fingerprint: str | None = None
    progress: dict[str, Any] = msgspec.field(default_factory=dict)
    """Replay progress of ``building``: events, total, percent, events_per_s, eta_s, started."""
    rebuild_requested: bool = False
    next_gen: int = 1

    @property
    def state(self) -> str:
        """``ready``, ``stale`` (serving while a newer generation builds) or ``building``."""
        if self.active is None:
            return "building"
        if self.building is not None:
            return "stale"
        return "ready"

    def new_generation(self, name: str) -> str:
        phys = physical_name(name, self.next_gen)
        self.next_gen += 1
        return phys

    def resolve(self, name: str, partial: bool) -> str:
        """The physical aggregate a read should use, or raise `AggregateNotReady`."""
        if self.active is not None:
            return self.active
        if partial and self.building is not None:
            return self.building
        raise not_ready(name, self.progress)


def not_ready(name: str, progress: dict[str, Any]) -> AggregateNotReady:
    """The error for reads of ``name`` while it is built, saying how far the build is.

    A consumer serving reads passes its in-memory progress (the chunk being gathered
    included); the catalog's own is what the last commit stored.
    """
    p = progress
    pct, read, total = p.get("percent"), p.get("read"), p.get("total")
    if isinstance(read, int) and isinstance(total, int) and isinstance(pct, (int, float)):
        detail = f"{read:,} of {total:,} events read, {pct:.1f}%"
    elif isinstance(pct, (int, float)):
        detail = f"{pct:.1f}% replayed"
    else:
        detail = "replay starting"
    eta = p.get("eta_s")
    if isinstance(eta, (int, float)):
        detail += f", about {eta:.0f}s left"
    return AggregateNotReady(
        f"aggregate {name!r} is being built by replaying its topics ({detail}); "
        "retry later, or ask for a partial answer (partial=True)",
        progress=dict(p),
    )
