"""`DriftLog`: count drift signals and log them without flooding.

The live stream's applier reports, per batch, events whose source op contradicts what the
aggregate holds (`tally.engine.triggers`: ``update_unknown``, ``delete_unknown``,
``create_existing``). They are counted at once (/status, /metrics) and logged as one warning
per aggregate: the first at once, then at most every `DRIFT_LOG_INTERVAL` seconds with the
signals in between summed, and whatever is left at stop — a table that drifts all the time
must not flood the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from tally.engine.triggers import DRIFT_EXAMPLES

__all__ = ["DRIFT_LOG_INTERVAL", "DriftLog"]

DRIFT_LOG_INTERVAL: Final = 10.0
"""Seconds between drift warnings (signals in between are summed into the next one)."""

Key = tuple[str, str]
"""(aggregate, drift kind)."""


class DriftLog:
    """Drift counters (``totals``, shared with the stats) and the throttled warning."""

    def __init__(
        self,
        log: Any,
        totals: dict[Key, int],
        *,
        interval: float = DRIFT_LOG_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.totals = totals
        self.interval = interval
        self._clock = clock
        self._window: dict[Key, int] = {}
        self._examples: dict[Key, list[Any]] = {}
        self._logged_at = -float("inf")

    def report(self, drift: dict[Key, int], ids: dict[Key, list[Any]]) -> None:
        """Count one batch's signals (``ids``: their first few ids per key). O(keys)."""
        totals, window = self.totals, self._window
        for key, n in drift.items():
            totals[key] = totals.get(key, 0) + n
            window[key] = window.get(key, 0) + n
            ex = self._examples.setdefault(key, [])
            ex.extend(ids.get(key, [])[: max(0, DRIFT_EXAMPLES - len(ex))])

    def flush(self, force: bool = False) -> None:
        """Log what was counted since the last warning, if the interval allows (or ``force``)."""
        if not self._window:
            return
        now = self._clock()
        if not force and now - self._logged_at < self.interval:
            return
        per_agg: dict[str, dict[str, int]] = {}
        for (name, kind), n in self._window.items():
            per_agg.setdefault(name, {})[kind] = n
        for name, kinds in sorted(per_agg.items()):
            self.log.warning(
                "drift: events imply the aggregate was out of step with its table",
                aggregate=name,
                **kinds,
                example_ids={k: self._examples.get((name, k), []) for k in kinds},
                total=sum(n for (a, _), n in self.totals.items() if a == name),
                hint=f"compare and repair with `tally reconcile {name} --source ...`",
            )
        self._window = {}
        self._examples = {}
        self._logged_at = now
