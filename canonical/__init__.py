"""The shared language of Q2C Broker: envelopes and canonical events.

Imports only the standard library and msgspec.
"""

from __future__ import annotations

from canonical.base import Canonical, Event, UtcDatetime
from canonical.envelope import Envelope
from canonical.ledger import LedgerEntryApplied, LedgerEntryPosted, LedgerEvent
from canonical.scalars import CountryCode, CurrencyCode, Money, Sku

__all__ = [
    "Canonical",
    "Event",
    "UtcDatetime",
    "Envelope",
    "LedgerEntryApplied",
    "LedgerEntryPosted",
    "LedgerEvent",
    "CountryCode",
    "CurrencyCode",
    "Money",
    "Sku",
]
