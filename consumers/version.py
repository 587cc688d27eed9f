"""Which tally this is: the distribution's name (one constant) and its installed version."""

from __future__ import annotations

from importlib import metadata
from typing import Final

__all__ = ["DISTRIBUTION", "version"]

DISTRIBUTION: Final = "tally-aggregates"
"""The distribution name in pyproject.toml's [project] (tests hold the two equal). Not
``tally``: that name on PyPI is an unrelated project. Versions are read by this name,
never by an import name: a distribution of another name could install a module called
like ours."""


def version() -> str:
    """The installed version of `DISTRIBUTION`, or a note saying it is not installed."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"
