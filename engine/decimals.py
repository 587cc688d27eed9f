"""Exact `decimal.Decimal` arithmetic for keys and sums, whatever the caller's context.

Python's Decimal operators round to the *current* context (28 digits by default), may
trap, and set flags on it. The engine never does Decimal arithmetic in the caller's
context: sums run inside `exact()` (a private context that cannot round — addition of
values within `check_decimal`'s range is exact in it, and any rounding would trap), and
the key codec passes `EXACT` explicitly. The caller's context is neither read nor changed.

Accepted Decimals are those PostgreSQL's ``numeric`` can hold: at most
`MAX_DIGITS_BEFORE_POINT` digits before the decimal point and `MAX_DIGITS_AFTER_POINT`
after. The bound keeps keys and exact sums of bounded size (``Decimal('1e-999999999')``
would otherwise make a billion-digit sum). A sum value counts its digits as written
(``Decimal('1.000')`` has 3 places); a key, which is a value, counts its value's
(``Decimal('1.000')`` is the key 1).
"""

from __future__ import annotations

import decimal
from contextlib import AbstractContextManager
from decimal import Decimal
from typing import Final

from .errors import InvalidArgument

__all__ = [
    "EXACT",
    "MAX_DIGITS_AFTER_POINT",
    "MAX_DIGITS_BEFORE_POINT",
    "check_decimal",
    "decimal_range_error",
    "exact",
]

MAX_DIGITS_BEFORE_POINT: Final = 131072
MAX_DIGITS_AFTER_POINT: Final = 16383

EXACT: Final = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[
        decimal.InvalidOperation,
        decimal.DivisionByZero,
        decimal.Overflow,
        decimal.Underflow,
        decimal.Inexact,
        decimal.Rounded,
    ],
)
"""A context in which the engine's Decimal operations are exact or raise."""


def exact() -> AbstractContextManager[decimal.Context]:
    """``with exact(): ...`` runs Decimal operators in a copy of `EXACT` (the caller's
    context is restored unchanged on exit)."""
    return decimal.localcontext(EXACT)


def decimal_range_error(d: Decimal) -> str | None:
    """Why a finite Decimal is outside the accepted range, or None if it is inside."""
    if d.adjusted() >= MAX_DIGITS_BEFORE_POINT:
        return f"it has more than {MAX_DIGITS_BEFORE_POINT} digits before the decimal point"
    if d.as_tuple().exponent < -MAX_DIGITS_AFTER_POINT:  # type: ignore[operator]
        return f"it has more than {MAX_DIGITS_AFTER_POINT} digits after the decimal point"
    return None


def check_decimal(d: Decimal, what: str) -> Decimal:
    """``d`` if it is a finite Decimal within range; else `InvalidArgument` naming ``what``."""
    if not d.is_finite():
        raise InvalidArgument(f"{what} must be a finite number, got {d!r}")
    why = decimal_range_error(d)
    if why is not None:
        raise InvalidArgument(
            f"{what} {str(d)[:40]!r} is out of range: {why} (PostgreSQL numeric's limits)"
        )
    return d
