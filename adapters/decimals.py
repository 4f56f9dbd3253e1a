"""Vendor numbers as Decimals: absurd ones are refused before any arithmetic.

A vendor may send any JSON number or numeric string where a quantity, a price
or a line number belongs: ``NaN``, ``Infinity``, ``1e999999``. Decimal
arithmetic on those raises errors no caller expects (``decimal.Overflow``,
``InvalidOperation``) or, worse, runs for seconds on the event loop: ``int()``
of ``Decimal("1e1000000")`` builds a million-digit integer. `bounded` checks
a value once, in constant time, where a mapping reads it; a value it passes
has at most `MAX_DIGITS` significant digits, is below ``10**(MAX_EXPONENT+1)``
and no finer than ``10**-MAX_EXPONENT``, so products, ``quantize`` and
``int()`` of it stay cheap.

The canonical model's own check (`canonical.scalars.check_amount`) is
stricter (below 1e15, at most 6 decimals) and speaks of amounts only; it
still applies when the canonical event is built. This check is the one that
fits any vendor number (quantities, line numbers, terms, minor-unit prices
with up to 12 decimals) and it names the vendor's field.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

__all__ = ["MAX_DIGITS", "MAX_EXPONENT", "bounded"]

#: Significant digits a vendor number may have.
MAX_DIGITS: Final = 40
#: Powers of ten a vendor number may reach, up (magnitude) or down (precision).
MAX_EXPONENT: Final = 30


def bounded(value: Decimal, field: str) -> Decimal:
    """*value*, if it is a finite number of a sane size.

    Args:
        value: a number as the vendor sent it.
        field: the vendor's name for it, for the message
            (``SBQQ__Quantity__c``, ``price price_1: unit_amount_decimal``).

    Raises:
        ValueError: *value* is NaN or infinite, has more than `MAX_DIGITS`
            significant digits, is ``10**(MAX_EXPONENT+1)`` or more, or is
            finer than ``10**-MAX_EXPONENT``; the message names *field*.
    """
    if not value.is_finite():
        raise ValueError(f"{field} {value} is not a finite number")
    digits = len(value.as_tuple().digits)
    if digits > MAX_DIGITS:
        raise ValueError(
            f"{field} has {digits} significant digits, more than {MAX_DIGITS}"
        )
    exponent = value.as_tuple().exponent
    if value.adjusted() > MAX_EXPONENT:
        raise ValueError(
            f"{field} {value} is out of range (1e{MAX_EXPONENT + 1} or more)"
        )
    if isinstance(exponent, int) and exponent < -MAX_EXPONENT:
        raise ValueError(f"{field} {value} has more than {MAX_EXPONENT} decimal places")
    return value
