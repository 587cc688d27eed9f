"""Group-membership user data: what a member tells the group when it joins, and the ownership
map the group leader hands back to every member.

They are the two opaque ``user_data`` byte strings of Kafka's consumer protocol (the same
places Kafka Streams puts its ``SubscriptionInfo``, with ``application.server``, and its
``AssignmentInfo``, with ``partitionsByHost``), encoded as msgspec JSON.

Versioning. Each payload carries ``protocol`` (the version its writer speaks) and ``compat``
(the oldest reader version that can read it). A reader accepts a payload when
``compat <= PROTOCOL_VERSION``: later versions only ever *add* fields (unknown fields are
ignored), so a v1 member reads a v2 payload whose writer kept ``compat = 1``; a change an
old reader would misread must raise ``compat``. Anything unreadable (empty, not JSON, not
tally's, a ``compat`` above ours, a wrong field) raises `UnreadableUserData`, whose message
says what was wrong and what to do; callers decide the safe fallback (see
``tally.consumers.cluster``).
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from tally.schemas.errors import TallyError

__all__ = [
    "PROTOCOL_VERSION",
    "MemberSubscription",
    "OwnerEntry",
    "OwnershipMap",
    "Partitions",
    "UnreadableUserData",
    "decode_map",
    "decode_subscription",
    "encode_map",
    "encode_subscription",
]

PROTOCOL_VERSION = 1
"""The version of these payloads this code writes, and the newest ``compat`` it reads."""

PartitionNumber = Annotated[int, Meta(ge=0)]
Partitions = dict[str, list[PartitionNumber]]
"""Topic → sorted partition numbers (compact: one topic name per topic, not per partition)."""


class MemberSubscription(msgspec.Struct, frozen=True, kw_only=True):
    """What a member advertises in its JoinGroup metadata."""

    url: str
    """Where the other members reach this member's HTTP API (``--advertise``)."""
    held: Partitions = {}
    """The partitions whose state this member has on disk: the sticky assignor keeps them here."""
    seen: Annotated[int, Meta(ge=0)] = 0
    """The newest ownership-map version this member was given (0: none); the leader numbers
    the next map above every member's ``seen``."""
    protocol: Annotated[int, Meta(ge=1)] = PROTOCOL_VERSION
    compat: Annotated[int, Meta(ge=1)] = 1


class OwnerEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One member in the ownership map."""

    url: str | None
    """Its advertised URL; None when its subscription was unreadable (it then owns nothing
    unless no readable member could take a partition)."""
    partitions: Partitions = {}


class OwnershipMap(msgspec.Struct, frozen=True, kw_only=True):
    """The leader's answer, the same map in every member's assignment (only ``you`` differs)."""

    map_version: Annotated[int, Meta(ge=1)]
    """Above every ``seen`` the members reported: newer maps have higher numbers while at
    least one member survives from one generation to the next."""
    you: str
    """The member id this copy was addressed to (a member does not otherwise learn its id)."""
    members: dict[str, OwnerEntry]
    problems: list[str] = []
    """What the leader could not use (unreadable subscriptions, duplicate URLs, topics without
    metadata): shown on /status, logged by the leader."""
    protocol: Annotated[int, Meta(ge=1)] = PROTOCOL_VERSION
    compat: Annotated[int, Meta(ge=1)] = 1


class UnreadableUserData(TallyError):
    """A member's subscription or the leader's map cannot be read by this version of tally."""


class _Header(msgspec.Struct):
    protocol: int
    compat: int


_ENCODER = msgspec.json.Encoder()
_HEADER = msgspec.json.Decoder(_Header)
_SUBSCRIPTION = msgspec.json.Decoder(MemberSubscription)
_MAP = msgspec.json.Decoder(OwnershipMap)


def encode_subscription(sub: MemberSubscription) -> bytes:
    """The JoinGroup ``user_data`` bytes for ``sub``."""
    return _ENCODER.encode(sub)


def encode_map(owners: OwnershipMap) -> bytes:
    """The assignment ``user_data`` bytes for ``owners``."""
    return _ENCODER.encode(owners)


def decode_subscription(data: bytes) -> MemberSubscription:
    """Read a member's JoinGroup ``user_data``; `UnreadableUserData` says why it cannot be."""
    _check_header(data, "subscription", "the member that sent it")
    try:
        return _SUBSCRIPTION.decode(data)
    except msgspec.ValidationError as e:
        raise UnreadableUserData(
            f"tally subscription is malformed ({e})",
            advice="run the same tally version on every member of the group",
        ) from e


def decode_map(data: bytes) -> OwnershipMap:
    """Read the leader's assignment ``user_data``; `UnreadableUserData` says why it cannot be."""
    _check_header(data, "ownership map", "the group leader")
    try:
        return _MAP.decode(data)
    except msgspec.ValidationError as e:
        raise UnreadableUserData(
            f"tally ownership map is malformed ({e})",
            advice="run the same tally version on every member of the group",
        ) from e


def _check_header(data: bytes, what: str, writer: str) -> None:
    if not data:
        raise UnreadableUserData(
            f"empty {what}: {writer} does not run tally's group assignor",
            advice="every member of a tally group must be a `tally consume` with the same "
            "--group-id; give other consumers another group id",
        )
    try:
        head = _HEADER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise UnreadableUserData(
            f"{what} is not tally's ({e}): {writer} is not a tally member",
            advice="give consumers that are not `tally consume` another group id",
        ) from e
    if head.compat > PROTOCOL_VERSION:
        raise UnreadableUserData(
            f"{what} needs a reader of group protocol v{head.compat} or newer (written as "
            f"v{head.protocol}); this member reads up to v{PROTOCOL_VERSION}",
            advice="upgrade this member to the tally version the others run",
        )
    if head.protocol < 1 or head.compat < 1:
        raise UnreadableUserData(
            f"{what} has protocol v{head.protocol}/compat v{head.compat}; versions start at 1",
            advice="run the same tally version on every member of the group",
        )
