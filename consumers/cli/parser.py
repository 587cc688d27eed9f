"""The one argument parser class of the `tally` command, and the flags of settings.

`Parser` reports a usage error as one line (exit 2); every subcommand's parser is one
(argparse makes sub-parsers of the parent's class). `add_setting` adds the flag of a
setting of `tally.schemas.config` with its environment variable and default in the help, taken
from the Struct, so a default is written once.
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn

import msgspec

from tally.consumers.cli.settings import ENV_CONFIG, env_name
from tally.schemas.config import Settings
from tally.schemas.errors import EXIT_USAGE

__all__ = ["Parser", "add_config", "add_setting", "default_of", "given_settings"]


class Parser(argparse.ArgumentParser):
    """Usage errors as a single line (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def default_of(kind: type[Settings], field: str) -> Any:
    """The default of ``kind.field`` as declared in `tally.schemas.config`."""
    for f in msgspec.structs.fields(kind):
        if f.name == field:
            if f.default is not msgspec.NODEFAULT:
                return f.default
            if f.default_factory is not msgspec.NODEFAULT:
                return f.default_factory()
            return None
    raise KeyError(f"{kind.__name__} has no setting {field!r}")


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def add_setting(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    kind: type[Settings],
    field: str,
    *flags: str,
    help: str,
    default_text: str | None = None,
    **kwargs: Any,
) -> argparse.Action:
    """The flag of setting ``field`` (``--field-name`` unless ``flags``), help naming its
    environment variable and default; the parsed value is None when the flag is not given
    (pass ``default=argparse.SUPPRESS`` for a flag repeated on a sub-parser)."""
    default = default_of(kind, field)
    if default_text is None:
        default_text = "none" if default is None else _shown(default)
    text = f"{help} (env {env_name(field)}; default {default_text})"
    names = flags or (f"--{field.replace('_', '-')}",)
    kwargs.setdefault("default", None)
    return p.add_argument(*names, dest=field, help=text, **kwargs)


def add_config(p: argparse.ArgumentParser) -> None:
    """``--config FILE``: the TOML settings file."""
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML settings file (default ${ENV_CONFIG}, else ./tally.toml if it exists)",
    )


def given_settings(args: argparse.Namespace, kind: type[Settings]) -> dict[str, Any]:
    """The settings of ``kind`` given as flags (None where not given)."""
    return {f.name: getattr(args, f.name, None) for f in msgspec.structs.fields(kind)}
