"""The engine's errors, in the one tree rooted at `tally.schemas.errors.TallyError`.

Each derives from the kind that says what to do about it (and fixes the `tally`
command's exit status, see `tally.schemas.errors`): `UsageError` for a wrong call
(exit 2), plain `TallyError` for a store that cannot serve right now (exit 1).
Each message says what was wrong and, where it helps, what to do.
"""

from __future__ import annotations

from tally.schemas.errors import TallyError, UsageError

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
    "StoreNotFound",
    "TallyError",
]


class InvalidKey(UsageError, TypeError):
    """A key, id or namespace is not a supported value (or is NaN)."""


class InvalidArgument(UsageError, ValueError):
    """An argument has the wrong type or value (bounds, offsets, page sizes...)."""


class ItemExists(UsageError, KeyError):
    """A strict insert named an id the aggregate already holds."""

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that.
        return str(self.args[0]) if self.args else ""


class ItemNotFound(UsageError, KeyError):
    """A strict delete/replace named an id the aggregate does not hold."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OffsetOutOfRange(UsageError, IndexError):
    """`at(offset)` fell outside the items in range."""


class ReadOnlyStore(UsageError):
    """A write was attempted on a store opened with read_only=True."""


class StoreNotFound(TallyError):
    """No store at the path (a read-only open never creates one)."""


class StoreLocked(TallyError):
    """Another process holds the store open for writing (RocksDB's lock)."""


class StoreCorrupted(TallyError):
    """`validate()` found a broken invariant, or stored data cannot be decoded."""


class AggregateNotReady(TallyError):
    """The aggregate has no ready generation yet (it is being built by replay)."""

    def __init__(self, message: str, progress: object = None) -> None:
        super().__init__(message)
        self.progress = progress
