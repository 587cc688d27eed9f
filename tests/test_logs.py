"""Logging at the process edge: one renderer for structlog and stdlib records."""

from __future__ import annotations

import io
import json
import logging

import structlog

from tally.consumers.logs import configure_logging, get_logger


def _lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_json_mode_renders_stdlib_records_as_json_too() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=buf)
    try:
        get_logger(topic="t").info("batch", events=3)
        logging.getLogger("aiohttp.server").error("client sent junk", extra={"peer": "1.2.3.4"})
        logging.getLogger("asyncio").warning("slow callback")
        logging.getLogger("aiohttp.access").info("GET / 200")  # below the libraries' level
    finally:
        structlog.reset_defaults()
    out = _lines(buf)  # every line is JSON, or json.loads raises
    assert [(r["event"], r["level"], r["logger"]) for r in out] == [
        ("batch", "info", "tally"),
        ("client sent junk", "error", "aiohttp.server"),
        ("slow callback", "warning", "asyncio"),
    ]
    assert out[0]["topic"] == "t" and out[0]["events"] == 3
    assert out[1]["peer"] == "1.2.3.4"
    assert all("timestamp" in r for r in out)


def test_level_filters_our_events_and_exceptions_render_in_json() -> None:
    buf = io.StringIO()
    configure_logging("warning", "json", stream=buf)
    try:
        log = get_logger()
        log.info("hidden")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        structlog.reset_defaults()
    out = _lines(buf)
    assert [r["event"] for r in out] == ["failed"]
    assert "ValueError: boom" in str(out[0]["exception"])


def test_configuring_twice_keeps_one_handler() -> None:
    buf = io.StringIO()
    configure_logging("info", "json", stream=io.StringIO())
    configure_logging("info", "json", stream=buf)
    try:
        logging.getLogger("asyncio").warning("once")
    finally:
        structlog.reset_defaults()
    assert [r["event"] for r in _lines(buf)] == ["once"]
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "tally"]
    assert len(ours) == 1
