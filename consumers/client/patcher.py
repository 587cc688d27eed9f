"""`RemotePatcher`: the client side of live patching (`tally reconcile --patch --url`).

A `tally.engine.reconcile.diff` sink: fixes are sent in chunks to a patch session of the running
consumer, which applies them between two of its batches (see `tally.consumers.runtime.patches`
for the rule that keeps a fix from overwriting a newer live change).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Final

from tally.consumers.client.client import ClientError, TallyClient
from tally.engine import Prepared, TallyError
from tally.engine.reconcile import Change, encode_fixes

__all__ = ["CHUNK_BYTES", "RemotePatcher"]

CHUNK_BYTES: Final = 512 << 10
"""Chunks stay under this many bytes (the API takes up to 1 MiB)."""


class RemotePatcher:
    """A `tally.engine.reconcile.diff` sink that sends fixes to a live consumer's patch session.

    ``begin()`` before the source is read; call it per fix; ``close()`` sends
    the rest and ends the session (``abort()`` ends it without sending).
    """

    def __init__(
        self,
        client: TallyClient,
        aggregate: str,
        batch_size: int = 5_000,
        catch_up_timeout: float = 600.0,
    ) -> None:
        self.client = client
        self.aggregate = aggregate
        self.batch_size = max(1, batch_size)
        self.catch_up_timeout = catch_up_timeout
        self.session: dict[str, Any] | None = None
        self.pending: list[Change] = []
        self.changed = 0
        self.skipped_live = 0
        self.totals: dict[str, Any] = {}

    def begin(self) -> dict[str, Any]:
        self.session = self.client.patch_begin(self.aggregate)
        return self.session

    def __call__(self, eid: bytes, item: Prepared | None) -> None:
        self.pending.append((eid, item))
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        assert self.session is not None, "begin() first"
        self._send(self.pending)
        self.pending = []

    def _send(self, changes: list[Change]) -> None:
        body = encode_fixes(changes)
        if len(body) > CHUNK_BYTES and len(changes) > 1:
            half = len(changes) // 2
            self._send(changes[:half])
            self._send(changes[half:])
            return
        assert self.session is not None
        deadline = time.monotonic() + self.catch_up_timeout
        while True:
            try:
                r = self.client.patch_chunk(self.aggregate, self.session["session"], body)
                break
            except ClientError as e:
                if e.code != "catching_up" or time.monotonic() >= deadline:
                    raise
        self.changed += int(r["changed"])
        self.skipped_live += int(r["skipped_live"])

    def close(self) -> int:
        self.flush()
        if self.session is not None:
            self.totals = self.client.patch_end(self.aggregate, self.session["session"])
            self.session = None
        return self.changed

    def abort(self) -> None:
        if self.session is not None:
            with contextlib.suppress(TallyError):
                self.client.patch_end(self.aggregate, self.session["session"])
            self.session = None
