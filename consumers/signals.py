"""Stop on SIGINT/SIGTERM: the one signal-handler install of the consumer, the CLI and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from typing import Final

__all__ = ["STOP_SIGNALS", "on_stop_signals"]

STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


def on_stop_signals(
    loop: asyncio.AbstractEventLoop, callback: Callable[[signal.Signals], object]
) -> Callable[[], None]:
    """Call ``callback(signal)`` on the loop when SIGINT or SIGTERM arrives (where the platform
    lets a loop handle signals); returns the function that removes the handlers again."""
    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, callback, sig)

    def remove() -> None:
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    return remove
