"""The root of tally's error tree, its kinds and the exit code of each.

It lives in `schemas` because `schemas` is the bottom layer (it imports
nothing else of ours), so every package derives from the same base. The
tree has one root and a few *kinds*; every concrete error (in `engine`,
`consumers`, ...) derives from the kind that says what the caller should do
about it, and the kind fixes the `tally` command's exit status:

=========  ====================  ===================================================
exit code  kind                  meaning
=========  ====================  ===================================================
0          —                     done (for reconcile: in sync, or patched)
1          `TallyError`          runtime: the command was right but failed while it ran
           `Unreachable`         (a broker, server or database did not answer, a store
                                 is missing, locked or broken, an aggregate not ready)
2          `UsageError`          usage: fix the command — an option, argument or name
           `ConfigError`         (settings, TOML, definitions are invalid)
           `InputError`          (a line of an input file or a record is malformed)
3          (``DriftFound``)      drift: `tally reconcile --fail-on-drift` found differences
130        `Interrupted`         interrupted (Ctrl-C, SIGINT)
=========  ====================  ===================================================

Messages say what went wrong, and what to do, for the reader who sees them:
``str(error)`` is the message plus ``advice`` for a library caller, while the
command line prints the message plus ``hint`` (what to do at the shell: which
flag or environment variable) when the error has one — see `TallyError.cli_text`.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "EXIT_CODES",
    "EXIT_DRIFT",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RUNTIME",
    "EXIT_USAGE",
    "BadRecord",
    "ConfigError",
    "InputError",
    "Interrupted",
    "InvalidEvent",
    "TallyError",
    "Unreachable",
    "UsageError",
]

EXIT_OK: Final = 0
EXIT_RUNTIME: Final = 1
EXIT_USAGE: Final = 2
EXIT_DRIFT: Final = 3
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final[dict[int, str]] = {
    EXIT_OK: "done (reconcile: in sync or patched)",
    EXIT_RUNTIME: "runtime failure: a broker, server or database did not answer, a delivery "
    "failed, a store is missing, locked or damaged, an aggregate is not ready",
    EXIT_USAGE: "bad usage: an option, argument, setting, definition or input line is wrong "
    "(the message names it)",
    EXIT_DRIFT: "drift: `tally reconcile --fail-on-drift` found differences",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
"""Every exit status of the `tally` command and what it means (`tally --help`, README)."""


class TallyError(Exception):
    """Base class of every tally error; by itself a runtime failure (exit 1).

    ``message`` says what went wrong; ``advice`` what a library caller should do
    (part of ``str(error)``); ``hint`` what a command-line user should do (the
    CLI prints it instead of the advice). Both are optional.
    """

    exit_code: int = EXIT_RUNTIME
    """The `tally` command's exit status for this error (see `EXIT_CODES`)."""

    def __init__(
        self, message: str = "", *, advice: str | None = None, hint: str | None = None
    ) -> None:
        super().__init__(_joined(message, advice))
        self.message = message
        self.advice = advice
        self.hint = hint

    def cli_text(self) -> str:
        """The message as the command line shows it: with the CLI's hint when there is one."""
        if self.hint is None:
            return str(self)
        return _joined(self.message, self.hint)


def _joined(message: str, tail: str | None) -> str:
    if not tail:
        return message
    return f"{message.rstrip('.;: ')}; {tail}" if message else tail


class UsageError(TallyError):
    """The caller asked for something wrong: an option, an argument, a name (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError, ValueError):
    """Configuration (definitions, CLI options, TOML) is invalid; the message says how to fix it."""


class InputError(UsageError, ValueError):
    """Data read from a file, a pipe or a record is malformed; the message names where (exit 2)."""


class Unreachable(TallyError):
    """A broker, server or database did not answer (exit 1): start it, or point at the right one."""

    exit_code = EXIT_RUNTIME


class Interrupted(TallyError):
    """The user interrupted the command (Ctrl-C): exit 130."""

    exit_code = EXIT_INTERRUPTED


class BadRecord(InputError):
    """A Kafka record cannot be turned into a change event.

    `reason` is a short machine-friendly code (e.g. ``"decode"``, ``"missing-id"``,
    ``"unknown-table"``); the message explains it for humans. Consumers send such
    records to the dead-letter topic and keep going.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidEvent(InputError):
    """An event cannot be published as given: no row id, no row image, an unknown op, a bad id …"""
