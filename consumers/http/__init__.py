"""The HTTP JSON API of a consumer process (aiohttp, in the consumer's own event loop)."""

from consumers.http.app import create_app, parse_address, start_http

__all__ = ["create_app", "parse_address", "start_http"]
