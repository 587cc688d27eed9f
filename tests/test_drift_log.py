"""The drift warning's throttle (`tally.consumers.runtime.drift.DriftLog`), with structlog's capture."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from tally.consumers.runtime.drift import DriftLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _drift_log(clock: Clock, totals: dict[tuple[str, str], int]) -> DriftLog:
    return DriftLog(structlog.get_logger(), totals, interval=10.0, clock=clock)


def test_first_signal_logs_at_once_then_at_most_every_interval_summed() -> None:
    clock = Clock()
    totals: dict[tuple[str, str], int] = {}
    dl = _drift_log(clock, totals)
    with capture_logs() as logs:
        dl.report({("scores", "update_unknown"): 2}, {("scores", "update_unknown"): [7, 8]})
        dl.flush()
        assert [e["update_unknown"] for e in logs] == [2]
        for _ in range(5):  # 5 batches within the interval: counted, not logged
            clock.now += 1.0
            dl.report({("scores", "update_unknown"): 3}, {("scores", "update_unknown"): [9]})
            dl.flush()
        assert len(logs) == 1
        clock.now += 5.0  # 10 s after the first warning
        dl.flush()
    assert len(logs) == 2
    assert logs[1]["update_unknown"] == 15  # the five batches, summed
    assert logs[1]["total"] == 17 == totals[("scores", "update_unknown")]
    assert logs[1]["example_ids"] == {"update_unknown": [9, 9, 9, 9, 9]}
    assert logs[1]["aggregate"] == "scores" and logs[1]["log_level"] == "warning"
    assert "tally reconcile scores" in logs[1]["hint"]


def test_force_logs_the_rest_at_stop_and_nothing_twice() -> None:
    clock = Clock()
    dl = _drift_log(clock, {})
    with capture_logs() as logs:
        dl.report({("a", "delete_unknown"): 1}, {})
        dl.flush()
        dl.report({("a", "delete_unknown"): 1, ("b", "create_existing"): 4}, {})
        dl.flush()  # within the interval: held
        dl.flush(force=True)
        dl.flush(force=True)  # nothing new: no line
    assert [(e["aggregate"], e.get("delete_unknown"), e.get("create_existing")) for e in logs] == [
        ("a", 1, None),
        ("a", 1, None),
        ("b", None, 4),
    ]


def test_examples_stop_at_the_limit_per_window() -> None:
    clock = Clock()
    dl = _drift_log(clock, {})
    with capture_logs() as logs:
        dl.report({("a", "update_unknown"): 20}, {("a", "update_unknown"): list(range(20))})
        dl.flush()
    assert logs[0]["example_ids"]["update_unknown"] == [0, 1, 2, 3, 4]
