"""Apply posted ledger entries to per-account balances.

Each instance is one account (the correlation id). Redelivery is safe: the
engine claims the entry's idempotency key in the transaction that saves the
new balance, so an entry is applied once however often it arrives. A
malformed amount never gets here (the event's schema refuses it and the
message is dead-lettered); nothing else can fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, final

import msgspec

from broker import Applied, Emit
from canonical import Envelope, LedgerEntryApplied, LedgerEntryPosted

__all__ = ["LedgerState", "LedgerWorkflow"]


class LedgerState(msgspec.Struct, frozen=True, kw_only=True):
    """One account: its balance and how many distinct entries made it."""

    balance: Decimal = Decimal(0)
    entries: int = 0


@final
class LedgerWorkflow:
    """``ledger.entry.posted`` → new balance → ``ledger.entry.applied``."""

    name = "ledger"
    state_type = LedgerState

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """The one event type this workflow handles."""
        return {"ledger.entry.posted": LedgerEntryPosted}

    def initial(self, correlation_id: str) -> LedgerState:
        """An account with no entries."""
        return LedgerState()

    def apply(
        self, state: LedgerState, event: Any, envelope: Envelope
    ) -> Applied[LedgerState]:
        """Add the entry's amount; announce the new balance."""
        match event:
            case LedgerEntryPosted(account=account, entry_id=entry_id, amount=amount):
                new = LedgerState(
                    balance=state.balance + amount, entries=state.entries + 1
                )
                applied = LedgerEntryApplied(
                    account=account,
                    entry_id=entry_id,
                    amount=amount,
                    balance=new.balance,
                    entries=new.entries,
                )
                return Applied(new, [Emit(event=applied, subject=entry_id)])
            case _:
                raise TypeError(f"ledger cannot apply {type(event).__name__}")
