"""structlog configuration: once, at the process edge.

JSON lines when stderr is not a terminal (production, CI), readable colored lines on a
terminal. Standard-library records (aiohttp, asyncio, aiokafka) go through the same
renderer (structlog's `ProcessorFormatter`), so JSON mode is all JSON. aiokafka is hushed
unless debugging: it logs every failed reconnect at ERROR, and the consumer logs one clear
line of its own instead.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any, Literal

import structlog

__all__ = ["configure_logging", "get_logger", "quiet_kafka_logs"]

LOGGER_NAME = "tally"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_HANDLER_NAME = "tally"


def configure_logging(
    level: str = "info", fmt: Literal["auto", "json", "console"] = "auto", *, stream: Any = None
) -> None:
    """Route structlog and stdlib logging to ``stream`` (stderr) through one renderer."""
    lvl = _LEVELS.get(level, logging.INFO)
    stream = sys.stderr if stream is None else stream
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    final: list[structlog.types.Processor] = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta
    ]
    if use_json:
        final.append(structlog.processors.format_exc_info)
    final.append(renderer)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(stream)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()], processors=final
        )
    )
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if h.get_name() != _HANDLER_NAME] + [handler]
    root.setLevel(logging.WARNING)  # libraries: warnings and errors only
    logging.getLogger(LOGGER_NAME).setLevel(lvl)
    logging.getLogger("aiokafka").setLevel(
        logging.DEBUG if lvl <= logging.DEBUG else logging.CRITICAL
    )


def get_logger(**context: object) -> structlog.stdlib.BoundLogger:
    """The process logger, with ``context`` bound (topic, partition, aggregate ...)."""
    return structlog.get_logger(LOGGER_NAME).bind(**context)  # type: ignore[no-any-return,unused-ignore]


@contextlib.contextmanager
def quiet_kafka_logs() -> Iterator[None]:
    """Hush aiokafka for a command that reports failures itself (it logs every failed
    connection attempt). A level the process configured (`configure_logging`) is kept."""
    logger = logging.getLogger("aiokafka")
    if logger.level != logging.NOTSET:
        yield
        return
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(logging.NOTSET)
