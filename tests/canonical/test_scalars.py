"""Constrained scalars and amounts: a bad value is a validation error, nothing else."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from canonical import LedgerEntryApplied, LedgerEntryPosted, Money
from canonical.commerce import Id, Product
from canonical.q2c import DealCompleted
from canonical.scalars import CountryCode, CurrencyCode, Sku
from tests.contract.canonical_samples import samples


@pytest.mark.parametrize("amount", ["1E+1000000", "-1E+1000000", "1E+999999"])
@pytest.mark.parametrize(
    ("type_", "fields"),
    [
        (Money, {"currency": "EUR"}),
        (LedgerEntryPosted, {"account": "a", "entry_id": "e"}),
    ],
    ids=["money", "ledger-entry"],
)
def test_an_amount_past_the_decimal_context_is_a_validation_error(
    type_: type[Any], fields: dict[str, str], amount: str
) -> None:
    """An exponent beyond the context's Emax fails at the field, not with Overflow."""
    raw = msgspec.json.encode({**fields, "amount": amount})
    with pytest.raises(msgspec.ValidationError, match="amount is 1e15 or more"):
        msgspec.json.decode(raw, type=type_)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", "NaN"),
        ("amount", "Infinity"),
        ("amount", "1E+1000000"),
        ("balance", "NaN"),
        ("balance", "-Infinity"),
        ("balance", "sNaN"),
    ],
)
def test_an_applied_entry_refuses_amounts_that_are_not_finite(
    field: str, value: str
) -> None:
    """``ledger.entry.applied`` checks its amount and its balance like a posting."""
    fields = {"account": "a", "entry_id": "e", "amount": "1", "balance": "1"}
    raw = msgspec.json.encode({**fields, field: value, "entries": 1})
    with pytest.raises(msgspec.ValidationError, match=rf"^{field} "):
        msgspec.json.decode(raw, type=LedgerEntryApplied)


def test_an_applied_entry_may_carry_a_balance_of_1e15_and_more() -> None:
    """A balance is a sum of entries: only finite, not bounded like one amount."""
    raw = b'{"account":"a","entry_id":"e","amount":"1","balance":"1E+16","entries":9}'
    assert msgspec.json.decode(raw, type=LedgerEntryApplied).balance == Decimal("1E16")


@pytest.mark.parametrize(
    ("type_", "good"),
    [(Sku, "SKU-1"), (Id, "deal-1"), (CurrencyCode, "EUR"), (CountryCode, "DE")],
    ids=["sku", "id", "currency", "country"],
)
def test_patterns_refuse_a_trailing_newline(type_: Any, good: str) -> None:
    """``$`` would match before a final newline; the patterns anchor at the very end."""
    assert msgspec.convert(good, type_) == good
    with pytest.raises(msgspec.ValidationError, match="regex"):
        msgspec.convert(good + "\n", type_)


def test_a_product_with_a_newline_after_its_sku_is_refused() -> None:
    """The same through a canonical Struct: a SKU and a newline is no SKU."""
    raw = msgspec.json.encode(samples()["erp.product.changed"].product)
    assert b'"sku":"SAAS-FLEET-PRO"' in raw
    with pytest.raises(msgspec.ValidationError, match=r"\$\.sku"):
        msgspec.json.decode(
            raw.replace(b'"SAAS-FLEET-PRO"', b'"SAAS-FLEET-PRO\\n"'), type=Product
        )


def test_a_completed_deal_says_when_in_an_aware_time() -> None:
    """``completed_at`` is a UtcDatetime like every other canonical instant."""
    deal = samples()["q2c.deal.completed"]
    raw = msgspec.json.encode(deal)
    naive = raw.replace(b'.250000Z"', b'.250000"')
    assert naive != raw
    with pytest.raises(msgspec.ValidationError, match=r"\$\.completed_at"):
        msgspec.json.decode(naive, type=DealCompleted)
    assert isinstance(
        msgspec.json.decode(raw, type=DealCompleted).completed_at, datetime
    )
