"""The error tree: every error tally raises derives from `TallyError`.

Each message says what was wrong and, where it helps, what to do.
"""

from __future__ import annotations

from schemas.errors import TallyError

__all__ = [
    "AggregateNotReady",
    "InvalidArgument",
    "InvalidKey",
    "ItemExists",
    "ItemNotFound",
    "OffsetOutOfRange",
    "ReadOnlyStore",
    "StoreCorrupted",
    "StoreLocked",
    "TallyError",
]


class InvalidKey(TallyError, TypeError):
    """A key, id or namespace is not a supported value (or is NaN)."""


class InvalidArgument(TallyError, ValueError):
    """An argument has the wrong type or value (bounds, offsets, page sizes...)."""


class ItemExists(TallyError, KeyError):
    """A strict insert named an id the aggregate already holds."""

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that.
        return str(self.args[0]) if self.args else ""


class ItemNotFound(TallyError, KeyError):
    """A strict delete/replace named an id the aggregate does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OffsetOutOfRange(TallyError, IndexError):
    """`at(offset)` fell outside the items in range."""


class ReadOnlyStore(TallyError):
    """A write was attempted on a store opened with read_only=True."""


class StoreLocked(TallyError):
    """Another process holds the store open for writing (RocksDB's lock)."""


class StoreCorrupted(TallyError):
    """`validate()` found a broken invariant, or stored data cannot be decoded."""


class AggregateNotReady(TallyError):
    """The aggregate has no ready generation yet (it is being built by replay)."""

    def __init__(self, message: str, progress: object = None) -> None:
        super().__init__(message)
        self.progress = progress
