"""Members of a deployment (issue 13): `tally consume --group-id G`.

- `member`: `MemberProcess`, one per process: the group membership (`group`: in a thread of
  its own), one task per owned partition (a `ConsumerProcess` on its own store), and the reads
  of the whole aggregate merged from every partition's owner.
- `assignor`, `membership`: tally's sticky assignor gives each process its aiokafka assignor
  class (advertised URL, held partitions); the ownership map the group leader computes
  reaches every member's `Membership`.
- `merge`: partial answers of members holding disjoint parts, merged into the exact whole
  answer, and the coverage check of their partition claims. Transport-free.
- `transport`: the `Member` primitives of another member's partition over HTTP, one request
  per member per merge round (`Peers`, `RemoteTask`).
- `reconcile`: `tally reconcile --url` of a deployment, partition by partition.
- `processes`: ``--processes N``, N members on one machine.
"""

from tally.consumers.cluster.assignor import (
    ASSIGNOR_NAME,
    Candidate,
    TallyAssignor,
    check_advertise_url,
    make_assignor,
    plan_assignment,
)
from tally.consumers.cluster.membership import (
    MemberInfo,
    Membership,
    MembershipUnknown,
    OwnershipView,
    by_topic,
    tps,
)
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
    "ASSIGNOR_NAME",
    "BadMemberAnswer",
    "BoundsArg",
    "Candidate",
    "Claim",
    "Coverage",
    "CoverageError",
    "Entry",
    "LocalMember",
    "Member",
    "MemberInfo",
    "Membership",
    "MembershipUnknown",
    "MergedReads",
    "OwnershipView",
    "Partition",
    "RandomSource",
    "StateMoved",
    "TallyAssignor",
    "best_entry",
    "by_topic",
    "check_advertise_url",
    "check_coverage",
    "elementwise",
    "make_assignor",
    "merge_pages",
    "pick_weighted",
    "plan_assignment",
    "tps",
    "union_namespaces",
]
