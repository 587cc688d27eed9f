"""Shapes of the answers of the token-protected routes (rebuild, live patch sessions).

The OpenAPI document is generated from these (`tally.consumers.http.openapi`); the patch chunk's
request body (msgpack, keys as encoded bytes) is the one shape described by hand there.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "MemberRebuild",
    "PatchChunkAnswer",
    "PatchChunkApplied",
    "PatchSession",
    "PatchSessionAnswer",
    "PatchTotals",
    "PatchTotalsAnswer",
    "RebuildAnswer",
    "RebuildRequested",
]


class MemberRebuild(msgspec.Struct, frozen=True):
    """One member's outcome of a deployment-wide rebuild."""

    url: str
    status: Literal["rebuild requested", "failed"]
    error: str | None = None


class RebuildRequested(msgspec.Struct, frozen=True):
    """A rebuild by replay was requested; /status shows its progress."""

    aggregate: str
    status: Literal["rebuild requested"]
    members: (
        Annotated[
            list[MemberRebuild],
            Meta(
                description="A member of a deployment asks every member to rebuild its "
                "partitions: each one's outcome."
            ),
        ]
        | None
    ) = None


class RebuildAnswer(msgspec.Struct, frozen=True):
    """``POST /v1/aggregates/{name}/rebuild``."""

    result: RebuildRequested


class PatchSession(msgspec.Struct, frozen=True):
    """An open patch session: its id and what it patches."""

    session: Annotated[str, Meta(description="Pass it to the chunk and close routes.")]
    aggregate: str
    generation: Annotated[str, Meta(description="The physical aggregate being patched.")]
    fingerprint: Annotated[str, Meta(description="The definition's fingerprint.")]


class PatchSessionAnswer(msgspec.Struct, frozen=True):
    """``POST /v1/aggregates/{name}/patch-sessions``."""

    result: PatchSession


class PatchChunkApplied(msgspec.Struct, frozen=True):
    """What one chunk of fixes did."""

    received: int
    changed: int
    skipped_live: Annotated[int, Meta(description="Ids written live since the session began.")]


class PatchChunkAnswer(msgspec.Struct, frozen=True):
    """``POST /v1/aggregates/{name}/patch-sessions/{session}``."""

    result: PatchChunkApplied


class PatchTotals(msgspec.Struct, frozen=True):
    """A closed session's totals."""

    session: str
    aggregate: str
    generation: str
    chunks: int
    received: int
    changed: int
    skipped_live: int
    touched_live: Annotated[int, Meta(description="Ids the live stream wrote meanwhile.")]
    truncated: Annotated[bool, Meta(description="The table was truncated meanwhile.")]


class PatchTotalsAnswer(msgspec.Struct, frozen=True):
    """``DELETE /v1/aggregates/{name}/patch-sessions/{session}``."""

    result: PatchTotals
