"""The one progress display of the `tally` commands (produce, reconcile), on stderr.

``mode`` (the `progress` setting): ``auto`` draws a rich bar on a terminal and prints a
line every ``interval`` seconds otherwise (a log, CI); ``bar`` and ``lines`` force one;
``none`` shows nothing. A command calls ``update(done, **fields)`` as work advances and
gets its text from its own ``detail(tick)``, so the bar and the lines say the same.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from tally.schemas.config import ProgressMode

__all__ = ["Progress", "Tick", "progress"]


@dataclass
class Tick:
    """Where the work is: ``done`` of ``total`` (None: unknown), after ``elapsed`` seconds."""

    done: int
    total: int | None
    elapsed: float
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """``done`` per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def percent(self) -> float | None:
        return None if not self.total else min(100.0, 100.0 * self.done / self.total)


class Progress(Protocol):
    """What a command reports to."""

    def update(self, done: int, **fields: Any) -> None: ...
    def close(self) -> None: ...


class _None:
    def update(self, done: int, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Lines:
    """A line every ``interval`` seconds (the first one after ``interval``), and none at close."""

    def __init__(
        self,
        title: str,
        total: int | None,
        detail: Callable[[Tick], str],
        interval: float,
        stream: IO[str],
        clock: Callable[[], float],
    ) -> None:
        self._title = title
        self._total = total
        self._detail = detail
        self._interval = interval
        self._stream = stream
        self._clock = clock
        self._started = self._last = clock()

    def update(self, done: int, **fields: Any) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._last = now
        tick = Tick(done, self._total, now - self._started, fields)
        pct = tick.percent
        self._stream.write(
            f"{self._title}: {self._detail(tick)}"
            + ("" if pct is None else f" ({pct:.0f}%)")
            + "\n"
        )
        self._stream.flush()

    def close(self) -> None:
        pass


class _Bar:
    """A transient rich bar (it disappears when the command ends)."""

    def __init__(
        self,
        title: str,
        total: int | None,
        detail: Callable[[Tick], str],
        stream: IO[str],
        clock: Callable[[], float],
    ) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._total = total
        self._detail = detail
        self._clock = clock
        self._started = clock()
        self._bar = Progress(
            TextColumn(title),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream, force_terminal=True),
            transient=True,
        )
        self._bar.start()
        self._task = self._bar.add_task(title, total=total, detail="")

    def update(self, done: int, **fields: Any) -> None:
        if self._total is not None and done > self._total:
            self._total = done  # an estimate that was low
            self._bar.update(self._task, total=done)
        tick = Tick(done, self._total, self._clock() - self._started, fields)
        self._bar.update(self._task, completed=done, detail=self._detail(tick))

    def close(self) -> None:
        self._bar.stop()


@contextmanager
def progress(
    mode: ProgressMode,
    *,
    title: str,
    total: int | None,
    detail: Callable[[Tick], str],
    interval: float = 10.0,
    stream: IO[str] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[Progress]:
    """A progress display on ``stream`` (stderr) for the ``with`` block; see the module."""
    out = sys.stderr if stream is None else stream
    if mode == "auto":
        isatty = getattr(out, "isatty", None)
        mode = "bar" if isatty is not None and isatty() else "lines"
    shown: Progress
    if mode == "bar":
        shown = _Bar(title, total, detail, out, clock)
    elif mode == "lines":
        shown = _Lines(title, total, detail, interval, out, clock)
    else:
        shown = _None()
    try:
        yield shown
    finally:
        shown.close()
