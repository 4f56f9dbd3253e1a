"""The bound on vendor numbers: finite, 40 digits at most, exponents within ±30."""

from __future__ import annotations

from decimal import Decimal

import pytest

from adapters.decimals import MAX_DIGITS, MAX_EXPONENT, bounded


@pytest.mark.parametrize(
    "text",
    ["0", "-12.50", "1e30", "9.99e30", "1e-30", "1" * 20 + "." + "1" * 20, "-0.5"],
)
def test_sane_numbers_pass_unchanged(text: str) -> None:
    """Whatever a quantity, a price or a line number can be passes as it is."""
    value = Decimal(text)
    assert bounded(value, "Qty") is value


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("NaN", "Qty NaN is not a finite number"),
        ("-sNaN", "Qty -sNaN is not a finite number"),
        ("Infinity", "Qty Infinity is not a finite number"),
        ("1e31", r"Qty 1E\+31 is out of range \(1e31 or more\)"),
        ("-1e999999", r"Qty -1E\+999999 is out of range"),
        ("0e1000000", "out of range"),
        ("1e-31", "Qty 1E-31 has more than 30 decimal places"),
        ("1" * (MAX_DIGITS + 1), "Qty has 41 significant digits, more than 40"),
    ],
)
def test_absurd_numbers_are_refused_naming_the_field(text: str, reason: str) -> None:
    """A ValueError each mapping turns into its module's invalid-data error."""
    with pytest.raises(ValueError, match=reason):
        bounded(Decimal(text), "Qty")


def test_what_passes_is_cheap_to_compute_with() -> None:
    """The largest value allowed has an integer part of MAX_EXPONENT + 1 digits."""
    whole = MAX_EXPONENT + 1
    biggest = bounded(Decimal("9" * whole + "." + "9" * (MAX_DIGITS - whole)), "x")
    assert len(str(int(biggest))) == whole
