"""The one place the `tally` command turns an error into its output and exit status.

Every subcommand raises; `run_command` catches: a `TallyError` becomes one line on
stderr, ``tally COMMAND: error: MESSAGE`` (its CLI ``hint`` when it has one) and the exit
code of its kind (`tally.schemas.errors.EXIT_CODES`); Ctrl-C becomes ``tally COMMAND:
interrupted`` and 130. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from typing import Final

from tally.schemas.errors import (
    EXIT_CODES,
    EXIT_DRIFT,
    EXIT_INTERRUPTED,
    Interrupted,
    TallyError,
)

__all__ = ["DriftFound", "exit_codes_text", "report", "run_command"]

_LABELS: Final = {EXIT_DRIFT: "drift", EXIT_INTERRUPTED: "interrupted"}


class DriftFound(TallyError):
    """`tally reconcile --fail-on-drift` found differences (exit 3); the report is on stdout."""

    exit_code = EXIT_DRIFT


def report(prog: str, error: TallyError) -> int:
    """Print ``error`` as the command's one line on stderr; returns its exit code."""
    text = " ".join(error.cli_text().split()) or type(error).__name__
    label = _LABELS.get(error.exit_code, "error")
    if isinstance(error, Interrupted) and text == "interrupted":
        print(f"{prog}: interrupted", file=sys.stderr)
    else:
        print(f"{prog}: {label}: {text}", file=sys.stderr)
    return error.exit_code


def run_command(
    prog: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace
) -> int:
    """Run one subcommand: its exit code, or the one of the error it raised."""
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return report(prog, Interrupted("interrupted"))
    except TallyError as e:
        return report(prog, e)


def exit_codes_text(indent: str = "  ", width: int = 78) -> str:
    """The exit-code table for ``--help`` epilogs, wrapped to ``width`` columns."""
    return "\n".join(
        textwrap.fill(
            meaning,
            width,
            initial_indent=f"{indent}{code:<5}",
            subsequent_indent=indent + " " * 5,
            break_on_hyphens=False,
            break_long_words=False,
        )
        for code, meaning in EXIT_CODES.items()
    )
