"""`Store`: a directory of named aggregates (the engine's entry point).

The state underneath — RocksDB, node cache, transactions, checkpoints — is
`tally.engine.state`; this class adds the aggregate handles.
"""

from __future__ import annotations

from typing import Any

from .aggregate import Aggregate
from .errors import InvalidArgument
from .state import StateStore

__all__ = ["Store"]


class Store(StateStore):
    """A directory of named aggregates. One writer process; any number of readers.

    Open with `Store.open(path)` (``read_only=True`` next to a running writer). Not
    thread-safe: use it from one thread (the consumer's event loop thread), or guard it
    with a lock.
    """

    def __init__(self, path: str, **options: Any) -> None:
        super().__init__(path, **options)
        self._handles: dict[tuple[str, bool], Aggregate] = {}

    def aggregate(self, name: str, *, partial: bool = False) -> Aggregate:
        """The handle of a named aggregate (created on its first write). O(1).

        For an aggregate with generations (see `tally.engine.catalog`), the handle
        follows the active generation; with none ready its reads raise
        `AggregateNotReady`, unless ``partial=True`` (read the one being built).
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"aggregate name must be a non-empty string, got {name!r}")
        h = self._handles.get((name, partial))
        if h is None:
            h = self._handles[(name, partial)] = Aggregate(self, name, partial=partial)
        return h

    def validate(self) -> None:
        """Check every stored aggregate and generation (see `Aggregate.validate`). O(n)."""
        gens = self.generations()
        for name in sorted(self.physical_names()):
            if name in gens:
                continue  # a logical name resolves to one of the physical generations
            self.aggregate(name).validate()
