"""Schemathesis hooks for tests/test_http_fuzz.py (loaded through SCHEMATHESIS_HOOKS).

The patch-chunk route takes application/msgpack, which schemathesis cannot encode by
itself: encode generated bodies with msgspec, as `tally reconcile --patch --url` does.
"""

from __future__ import annotations

from typing import Any

import msgspec
import schemathesis


@schemathesis.serializer("application/msgpack")
def msgpack_body(ctx: Any, value: Any) -> bytes:
    try:
        return msgspec.msgpack.encode(value)
    except (OverflowError, TypeError):  # e.g. an int msgpack cannot hold: send it as JSON bytes,
        return msgspec.json.encode(value)  # a body the server must reject with a 4xx
