"""structlog configuration: once, at the process edge.

JSON lines when stderr is not a terminal (production, CI), readable colored
lines on a terminal. Libraries' stdlib logging (aiokafka) is routed to the same
output at WARNING and above, or hushed entirely unless debugging.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

__all__ = ["configure_logging", "get_logger"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto"
) -> None:
    lvl = _LEVELS.get(level, logging.INFO)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # aiokafka logs every failed reconnect at ERROR; we log one clear line of
    # our own instead, so keep it quiet unless debugging.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.CRITICAL)


def get_logger(**context: object) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger("tally").bind(**context)  # type: ignore[no-any-return,unused-ignore]
