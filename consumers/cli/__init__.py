"""The `tally` command line: one module per command, dispatched by `tally.consumers.cli.main`."""

from tally.consumers.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
