"""content_hash: equal content, equal hash; different content, different hash."""

from __future__ import annotations

import unicodedata
from decimal import Decimal

import pytest

from canonical import Money
from canonical.hashing import content_hash
from tests.contract.canonical_samples import samples


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("100", "100.00"),
        ("100.0", "1E+2"),
        ("0", "-0"),
        ("0.00", "-0.000"),
        ("0", "0E+5"),
        ("1250.5", "1250.500000"),
    ],
)
def test_equal_decimals_hash_equal(a: str, b: str) -> None:
    """A Decimal counts by its value, not by how many zeros it was written with."""
    assert content_hash(Money(amount=Decimal(a), currency="EUR")) == content_hash(
        Money(amount=Decimal(b), currency="EUR")
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1.1", "1.01"),
        ("100", "10"),
        ("1", "-1"),
        ("1.2345678901234567890123456789012", "1.2345678901234567890123456789013"),
    ],
)
def test_different_decimals_hash_differently(a: str, b: str) -> None:
    """Normalising never rounds: 32 significant digits stay 32 (the context has 28)."""
    assert content_hash(Decimal(a)) != content_hash(Decimal(b))


def test_text_hashes_by_its_nfc_form() -> None:
    """A precomposed é and e + combining accent are one name."""
    composed = "Société Générale"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    assert content_hash({"name": decomposed}) == content_hash({"name": composed})
    assert content_hash({decomposed: 1}) == content_hash({composed: 1})


def test_huge_exponents_hash_without_overflow() -> None:
    """1E+1000000 is past the default context's range: normalised exactly anyway."""
    assert content_hash(Decimal("1E+1000000")) == content_hash(Decimal("10E+999999"))
    assert content_hash(Decimal("1E+1000000")) != content_hash(Decimal("1E+999999"))


def test_content_without_decimals_hashes_as_before() -> None:
    """Account hashes (text, codes, flags) are what earlier releases stored."""
    account = samples()["crm.account.changed"].account
    assert content_hash(account) == "2b1f0c0a0ef4571fb2e853b8"
    assert content_hash(("a", None, True, 3, frozenset({"b", "a"}))) == (
        "aaf5512c1088cd017e13275c"
    )
