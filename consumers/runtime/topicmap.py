"""Which topic feeds which table, and hints when a table's topic does not exist.

`tally consume` reads a table from ``--topic TABLE=TOPIC``, else from ``--topic-pattern``
with ``{table}`` replaced, else from the topic named like the table. Debezium names its
topics ``<topic.prefix>.<schema>.<table>``, so a user who maps nothing waits for a topic
``orders`` while ``dbz.public.orders`` fills up. `mapping_hint` finds the existing topics
that look like each missing table's and the one flag that would map them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from tally.schemas.config import TABLE_FIELD

__all__ = ["MAX_SIMILAR", "mapping_hint", "similar_topics"]

MAX_SIMILAR: Final = 5
"""Similar topics listed per table (a cluster may hold many connectors' topics)."""


def similar_topics(table: str, existing: Iterable[str], exclude: str | None = None) -> list[str]:
    """Existing topics that look like ``table``'s: ``<anything>.<table>`` (Debezium's
    ``<prefix>.<schema>.<table>``), or the table's name in another case. Internal topics
    (``__…``) and ``exclude`` (the topic being waited for) are left out."""
    low = table.lower()
    dotted = "." + low
    found = []
    for t in existing:
        if t == exclude or t.startswith("__"):
            continue
        lt = t.lower()
        if lt == low or lt.endswith(dotted):
            found.append(t)
    # Exact-case matches first, then by name; a few are enough to see the pattern.
    found.sort(key=lambda t: (not t.endswith("." + table) and t != table, t))
    return found[:MAX_SIMILAR]


def mapping_hint(missing: Mapping[str, str], existing: Iterable[str]) -> dict[str, Any]:
    """For ``missing`` (table → the topic tally waits for), the log fields that help:
    ``similar`` (table → existing topics that look like its) and ``hint`` (the flag that
    maps them). Empty when nothing looks like any of the tables."""
    names = list(existing)
    similar = {
        table: found
        for table, topic in sorted(missing.items())
        if (found := similar_topics(table, names, exclude=topic))
    }
    if not similar:
        return {}
    # A pattern explains a candidate when the candidate is the pattern with {table} filled in.
    covers: dict[str, set[str]] = {}
    for table, found in similar.items():
        for t in found:
            if t.endswith(table):
                covers.setdefault(t[: len(t) - len(table)] + TABLE_FIELD, set()).add(table)
    hint: str
    if covers:
        pattern, tables = max(covers.items(), key=lambda kv: (len(kv[1]), kv[0]))
        hint = f"map them with --topic-pattern '{pattern}'"
        rest = sorted(set(similar) - tables)
        if rest:
            hint += " and --topic TABLE=TOPIC for " + ", ".join(rest)
        elif len(missing) > len(tables):
            others = sorted(set(missing) - tables)
            hint += f" (no similar topic for {', '.join(others)} yet)"
    else:
        flags = " ".join(f"--topic {table}={found[0]}" for table, found in similar.items())
        hint = f"map them with {flags}"
    return {"similar": similar, "hint": "existing topics look like these tables': " + hint}
