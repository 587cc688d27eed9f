"""Opening a consumer's data dir from a command: the missing, empty and locked cases said once."""

from __future__ import annotations

import os

from tally.engine import Store, StoreLocked, StoreNotFound

__all__ = ["open_store"]


def open_store(path: str, *, read_only: bool = True, locked_hint: str | None = None) -> Store:
    """The store in ``path`` (read-only: a RocksDB secondary, safe next to a running consumer).

    A command never creates a store: a missing or empty dir is `StoreNotFound` (exit 1),
    a store another process writes is `StoreLocked` with ``locked_hint`` for the CLI.
    """
    if not os.path.isdir(path):
        raise StoreNotFound(
            f"data dir {path!r} does not exist",
            hint="pass --data-dir DIR (or $TALLY_DATA_DIR) of a consumer's store, or --url of a "
            "running consumer",
        )
    if not os.path.exists(os.path.join(path, "CURRENT")):
        raise StoreNotFound(
            f"{path!r} is not a tally store (no RocksDB files in it)",
            hint="pass the --data-dir a consumer writes",
        )
    try:
        return Store.open(path, read_only=read_only)
    except StoreLocked as e:
        raise StoreLocked(
            f"data dir {path!r} is locked: a consumer (or another writer) is running on it",
            advice=e.advice,
            hint=locked_hint if locked_hint is not None else e.hint,
        ) from e
