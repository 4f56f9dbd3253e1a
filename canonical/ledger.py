"""The ledger: a deliberately simple workflow whose effects can be counted.

``ledger.entry.posted`` adds an entry to an account; the ledger workflow
applies each distinct entry once and answers ``ledger.entry.applied`` with the
new balance. Benchmarks and crash tests use it: after any run, every
account's balance equals the sum of its distinct entries.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from msgspec import Meta

from canonical.base import Event

__all__ = [
    "LedgerEntryPosted",
    "LedgerEntryApplied",
    "LedgerEvent",
    "AccountId",
    "check_amount",
]

AccountId = Annotated[str, Meta(min_length=1, max_length=64)]
EntryId = Annotated[str, Meta(min_length=1, max_length=128)]


def check_amount(amount: Decimal) -> None:
    """Refuse amounts that are not finite, or finer than 1e-6, or of 1e15 and more.

    Raises:
        ValueError: msgspec reports it as a validation error at the field.
    """
    if not amount.is_finite():
        raise ValueError(f"amount {amount} is not finite")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -6:
        raise ValueError(f"amount {amount} has more than 6 decimal places")
    if abs(amount) >= _AMOUNT_LIMIT:
        raise ValueError("amount is 1e15 or more")


_AMOUNT_LIMIT = Decimal("1e15")


class LedgerEntryPosted(Event, frozen=True, tag="ledger.entry.posted"):
    """An entry was posted to an account."""

    account: AccountId
    entry_id: EntryId
    amount: Decimal
    memo: Annotated[str, Meta(max_length=512)] = ""

    def __post_init__(self) -> None:
        check_amount(self.amount)


class LedgerEntryApplied(Event, frozen=True, tag="ledger.entry.applied"):
    """An entry was applied to its account exactly once."""

    account: AccountId
    entry_id: EntryId
    amount: Decimal
    balance: Decimal
    entries: int


LedgerEvent = LedgerEntryPosted | LedgerEntryApplied
