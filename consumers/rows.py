"""The one rule for CSV cells: what `tally produce` sends and what `tally reconcile` compares.

A cell that is a JSON number becomes an int or a (finite) float, an empty cell
becomes None, anything else stays the string (``true``, ``null`` and ``1e400``
included). Both commands must read a CSV file the same way, or a file produced
and then reconciled would differ from itself.
"""

from __future__ import annotations

import math
import re
from typing import Any, Final

__all__ = ["infer_value"]

_NUMBER_RE: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?\Z")


def infer_value(text: str) -> Any:
    """JSON numbers become int/float, ``""`` becomes None, else the string."""
    if not text:
        return None
    if text[0] in "-0123456789":
        m = _NUMBER_RE.match(text)
        if m is not None:
            if m.group(1) is None and m.group(2) is None:
                return int(text)
            value = float(text)
            if math.isfinite(value):
                return value
    return text
