"""A deployment's members answering for the whole aggregate (issue 13).

`merge`: partial answers of members holding disjoint parts, merged into the exact whole
answer, and the coverage check of their partition claims. Transport-free: the HTTP layer
implements `Member` for remote members.
"""

from tally.consumers.cluster.merge import (
    BadMemberAnswer,
    BoundsArg,
    Claim,
    Coverage,
    CoverageError,
    Entry,
    LocalMember,
    Member,
    MergedReads,
    Partition,
    RandomSource,
    StateMoved,
    best_entry,
    check_coverage,
    elementwise,
    merge_pages,
    pick_weighted,
    union_namespaces,
)

__all__ = [
    "BadMemberAnswer",
    "BoundsArg",
    "Claim",
    "Coverage",
    "CoverageError",
    "Entry",
    "LocalMember",
    "Member",
    "MergedReads",
    "Partition",
    "RandomSource",
    "StateMoved",
    "best_entry",
    "check_coverage",
    "elementwise",
    "merge_pages",
    "pick_weighted",
    "union_namespaces",
]
