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
from canonical.scalars import check_amount

__all__ = [
    "LedgerEntryPosted",
    "LedgerEntryApplied",
    "LedgerEvent",
    "AccountId",
    "check_amount",
    "check_balance",
]

AccountId = Annotated[str, Meta(min_length=1, max_length=64)]
EntryId = Annotated[str, Meta(min_length=1, max_length=128)]


def check_balance(balance: Decimal) -> None:
    """Refuse a balance that is not finite; a sum of entries has no upper bound.

    Raises:
        ValueError: msgspec reports it as a validation error at the field.
    """
    if not balance.is_finite():
        raise ValueError(f"balance {balance} is not finite")


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

    def __post_init__(self) -> None:
        check_amount(self.amount)
        check_balance(self.balance)


LedgerEvent = LedgerEntryPosted | LedgerEntryApplied
