"""The root of tally's error tree.

It lives in `schemas` because `schemas` is the bottom layer (it imports
nothing else of ours), so every package can derive from the same base.
"""

from __future__ import annotations

__all__ = ["BadRecord", "ConfigError", "InvalidEvent", "TallyError"]


class TallyError(Exception):
    """Base class of every tally error."""


class ConfigError(TallyError, ValueError):
    """Configuration (definitions, CLI options, TOML) is invalid; the message says how to fix it."""


class BadRecord(TallyError, ValueError):
    """A Kafka record cannot be turned into a change event.

    `reason` is a short machine-friendly code (e.g. ``"decode"``, ``"missing-id"``,
    ``"unknown-table"``); the message explains it for humans. Consumers send such
    records to the dead-letter topic and keep going.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidEvent(TallyError, ValueError):
    """An event cannot be published as given: no row id, no row image, an unknown op, a bad id …"""
