"""Group membership for scale-out: tally's sticky assignor and what it tells each member.

`make_assignor` gives a process its aiokafka assignor class (advertised URL, held
partitions); the ownership map the leader computes reaches every member's `Membership`.
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

__all__ = [
    "ASSIGNOR_NAME",
    "Candidate",
    "MemberInfo",
    "Membership",
    "MembershipUnknown",
    "OwnershipView",
    "TallyAssignor",
    "by_topic",
    "check_advertise_url",
    "make_assignor",
    "plan_assignment",
    "tps",
]
