"""The `tally` command line: one module per command, dispatched by `consumers.cli.main`."""

from consumers.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
