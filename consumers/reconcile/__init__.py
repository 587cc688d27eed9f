"""Sources of truth for `tally reconcile`: a Postgres table, a compacted topic, a snapshot file,
each yielding ``(encoded id, row)`` in id order for `tally.engine.reconcile`."""

from tally.consumers.reconcile.sources import (
    SourceError,
    SourceUnreachable,
    postgres_row_estimate,
    postgres_source,
    snapshot_source,
    topic_source,
)

__all__ = [
    "SourceError",
    "SourceUnreachable",
    "postgres_row_estimate",
    "postgres_source",
    "snapshot_source",
    "topic_source",
]
