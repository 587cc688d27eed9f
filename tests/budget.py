"""How much work the property and stress tests do: one knob for the whole suite.

- default (CI, ``scripts/test``): the example counts written in the tests;
- ``TALLY_TEST_BUDGET=dev`` (``scripts/test-fast``): a tenth of them, at least 5, for a loop
  of about a minute while editing — the same properties, searched less deeply;
- ``TALLY_STRESS=1`` (or an integer N > 1): twenty times (or N times) as many, for a soak.
"""

from __future__ import annotations

import os

STRESS = int(os.environ.get("TALLY_STRESS", "0") or 0)
"""0: off; 1: the default stress factor; N > 1: that factor."""
DEV = os.environ.get("TALLY_TEST_BUDGET", "") == "dev"


def factor(stress_default: int = 20) -> int:
    """The multiplier of work under ``TALLY_STRESS`` (1 when it is off)."""
    return 1 if STRESS <= 0 else (stress_default if STRESS == 1 else STRESS)


def examples(n: int, stress_default: int = 20) -> int:
    """The number of Hypothesis examples a test written for ``n`` runs under this budget."""
    if STRESS > 0:
        return n * factor(stress_default)
    return max(5, n // 10) if DEV else n


def steps(n: int) -> int:
    """Steps per stateful Hypothesis example: half under the dev budget, double under stress."""
    if STRESS > 0:
        return n * 2
    return max(5, n // 2) if DEV else n


def rounds(n: int, stress_default: int = 10) -> int:
    """How many times a stress loop (kills, restarts) runs: a quarter, at least 1, under dev."""
    if STRESS > 0:
        return n * factor(stress_default)
    return max(1, n // 4) if DEV else n
