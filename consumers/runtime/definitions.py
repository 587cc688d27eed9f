"""Load the aggregates a consumer maintains from a Python file or module."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable

from tally.engine import TableAggregate
from tally.schemas import ConfigError
from tally.schemas.typed import ColumnType

__all__ = ["column_types_by_table", "id_fields_by_table", "load_definitions"]


def load_definitions(spec: str) -> list[TableAggregate]:
    """Module-level `TableAggregate` objects of a file (``defs.py``) or module (``pkg.defs``).

    A module may also list them in ``AGGREGATES``. Names must be unique.
    """
    if spec.endswith(".py") or os.sep in spec or os.path.exists(spec):
        path = os.path.abspath(spec)
        if not os.path.isfile(path):
            raise ConfigError(f"definitions file {spec!r} does not exist")
        name = "tally_definitions_" + os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"cannot load definitions from {spec!r}: not a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(
                f"definitions file {spec!r} failed to load: {type(e).__name__}: {e}"
            ) from e
    else:
        try:
            module = importlib.import_module(spec)
        except ImportError as e:
            raise ConfigError(f"cannot import definitions module {spec!r}: {e}") from e
    found: list[TableAggregate] = []
    candidates: Iterable[object] = list(vars(module).values())
    extra = getattr(module, "AGGREGATES", None)
    if isinstance(extra, (list, tuple)):
        candidates = [*candidates, *extra]
    seen_ids: set[int] = set()
    for obj in candidates:
        if isinstance(obj, TableAggregate) and id(obj) not in seen_ids:
            seen_ids.add(id(obj))
            found.append(obj)
    if not found:
        raise ConfigError(
            f"{spec!r} defines no TableAggregate: define e.g. "
            "`scores = TableAggregate('scores', table='scores', sort_key='score')` at module level"
        )
    names: dict[str, TableAggregate] = {}
    for d in found:
        if d.name in names:
            raise ConfigError(
                f"two aggregates in {spec!r} are named {d.name!r}: names must be unique"
            )
        names[d.name] = d
    id_fields_by_table(found)
    column_types_by_table(found)
    return sorted(found, key=lambda d: d.name)


def id_fields_by_table(defs: Iterable[TableAggregate]) -> dict[str, tuple[str, ...]]:
    """Each table's primary-key fields; aggregates of one table must agree."""
    out: dict[str, tuple[str, ...]] = {}
    for d in defs:
        prev = out.setdefault(d.table, d.id_fields)
        if prev != d.id_fields:
            raise ConfigError(
                f"aggregates on table {d.table!r} disagree on id_field ({prev} vs {d.id_fields} "
                f"in {d.name!r}): a table has one primary key"
            )
    return out


def column_types_by_table(defs: Iterable[TableAggregate]) -> dict[str, dict[str, ColumnType]]:
    """Each table's declared column types (``columns=``); aggregates of one table must agree."""
    out: dict[str, dict[str, ColumnType]] = {}
    for d in defs:
        cols = out.setdefault(d.table, {})
        for col, t in d.columns.items():
            prev = cols.setdefault(col, t)
            if prev != t:
                raise ConfigError(
                    f"aggregates on table {d.table!r} declare column {col!r} as {prev.name} and "
                    f"{t.name} (in {d.name!r}): a column has one type; declare it the same everywhere"
                )
    return {t: c for t, c in out.items() if c}
