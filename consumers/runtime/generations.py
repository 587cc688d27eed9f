"""Generations at run time: which physical aggregate each stream feeds.

`tally.engine.catalog` stores, per logical aggregate, the generation serving reads (``active``)
and the one being built by replay (``building``, with the replay stream's key in its
progress). This module makes the consumer's decisions on that catalog, each inside the
caller's batch so they commit with the streams' offsets:

* `plan` (at start): a definition whose fingerprint matches its active generation feeds
  live; anything else — new, changed, rebuild requested — gets a generation built by a
  replay (resumed when one of the same definition was in flight);
* `begin_rebuilds`: new generations for explicit rebuilds;
* `switch` (when a replay joins live): the built generation becomes active and the old one
  is dropped.

With ``stale_policy="drop"`` a changed definition stops serving its old generation at once
instead of serving it (``stale``) until the switch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tally.engine import Batch, Generation, Store, TableAggregate

__all__ = ["REPLAY_SEQ", "Targets", "begin_rebuilds", "plan", "serving", "switch"]

Targets = dict[str, tuple[TableAggregate, str]]
"""Logical name → (definition, physical aggregate it writes)."""

REPLAY_SEQ = b"replay-seq"
"""Store metadata: the counter behind replay stream keys (``replay-N``)."""


def _next_replay_key(store: Store, batch: Batch) -> str:
    """A new replay stream's key; its counter commits with ``batch``."""
    raw = store.get_meta(REPLAY_SEQ)
    n = int(raw) + 1 if raw else 1
    batch.put_meta(REPLAY_SEQ, str(n).encode())
    return f"replay-{n}"


def _drop(store: Store, phys: str) -> None:
    store.aggregate(phys).clear_all()


def plan(
    store: Store, definitions: Iterable[TableAggregate], stale_policy: str
) -> tuple[Targets, dict[str, Targets]]:
    """The live targets, and the targets of each replay stream (by key); persisted."""
    live: Targets = {}
    resumed: dict[str, Targets] = {}
    fresh: Targets = {}
    with store.batch() as b:
        for d in definitions:
            fp = d.fingerprint
            g = store.generation(d.name) or Generation()
            if g.active is not None and g.active_fingerprint == fp and not g.rebuild_requested:
                live[d.name] = (d, g.active)
                if g.building is not None:  # a rebuild of the same definition was in flight
                    stream = g.progress.get("stream")
                    if g.building_fingerprint == fp and isinstance(stream, str):
                        resumed.setdefault(stream, {})[d.name] = (d, g.building)
                        continue
                    _drop(store, g.building)
                    g.building = g.building_fingerprint = None
                    g.progress = {}
                    store.put_generation(d.name, g)
                continue
            stream = g.progress.get("stream")
            if g.building is not None and g.building_fingerprint == fp and isinstance(stream, str):
                resumed.setdefault(stream, {})[d.name] = (d, g.building)
            else:
                if g.building is not None:
                    _drop(store, g.building)
                g.building = g.new_generation(d.name)
                g.building_fingerprint = fp
                fresh[d.name] = (d, g.building)
            g.rebuild_requested = False
            if g.active is not None and stale_policy == "drop":
                _drop(store, g.active)
                g.active = g.active_fingerprint = None
            store.put_generation(d.name, g)
        if fresh:
            key = _next_replay_key(store, b)
            for name in fresh:
                fg = store.generation(name)
                assert fg is not None
                fg.progress = {"stream": key}
                store.put_generation(name, fg)
            resumed[key] = fresh
    return live, resumed


def begin_rebuilds(
    store: Store, definitions: Iterable[TableAggregate], stale_policy: str
) -> tuple[str, Targets]:
    """New generations of ``definitions`` fed by one new replay stream: (its key, targets)."""
    targets: Targets = {}
    with store.batch() as b:
        key = _next_replay_key(store, b)
        for d in definitions:
            g = store.generation(d.name) or Generation()
            g.building = g.new_generation(d.name)
            g.building_fingerprint = d.fingerprint
            g.progress = {"stream": key}
            if g.active is not None and stale_policy == "drop":
                _drop(store, g.active)
                g.active = g.active_fingerprint = None
            store.put_generation(d.name, g)
            targets[d.name] = (d, g.building)
    return key, targets


def switch(store: Store, names: Iterable[str]) -> None:
    """Inside the join's batch: each built generation becomes active, the old one is dropped."""
    for name in names:
        g = store.generation(name)
        assert g is not None
        old = g.active
        g.active, g.active_fingerprint = g.building, g.building_fingerprint
        g.building = g.building_fingerprint = None
        g.progress = {}
        store.put_generation(name, g)
        if old is not None and old != g.active:
            _drop(store, old)


def serving(store: Store, targets: Mapping[str, object]) -> list[str]:
    """The targets that still serve an older generation while they build (``stale``)."""
    return [n for n in targets if (store.generation(n) or Generation()).active is not None]
