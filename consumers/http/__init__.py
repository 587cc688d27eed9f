"""The HTTP JSON API of a consumer process (aiohttp, in the consumer's own event loop).

By role: `app` (the application, the server, the error envelope's middleware), `reads`
(the read routes of `tally.schemas.reads.READ_OPS`), `status` (/status, /readyz, /healthz),
`metrics` (/metrics), `maintenance` (token-protected rebuild and patch sessions),
`openapi` (the generated document), `limits` (connection caps and timeouts) and `common`
(what they share).
"""

from tally.consumers.http.app import create_app, parse_address, start_http

__all__ = ["create_app", "parse_address", "start_http"]
