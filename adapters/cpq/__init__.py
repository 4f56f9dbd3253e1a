"""Salesforce CPQ (the SBQQ package): quotes, quote lines, QuoteModel, catalogue.

It lives in the same org as `adapters.crm` and shares its client, sandbox
and change feed.
"""

from __future__ import annotations

# The CRM package first: its sandbox and connector import CPQ modules, so
# loading it here, before any of ours, keeps the two from importing each
# other half-initialised.
import adapters.crm  # noqa: F401
from adapters.cpq.client import CpqClient
from adapters.cpq.connector import CpqConnector
from adapters.cpq.mapping import (
    FIELD_MAP,
    quote_from_model,
    quote_from_records,
    quote_to_model,
    quote_update,
)
from adapters.cpq.views import (
    Pricebook2,
    PricebookEntry,
    Product2,
    Quote,
    QuoteLine,
    QuoteLineModel,
    QuoteModel,
    QuoteStatus,
)

__all__ = [
    "Quote",
    "QuoteLine",
    "QuoteLineModel",
    "QuoteModel",
    "QuoteStatus",
    "Pricebook2",
    "PricebookEntry",
    "Product2",
    "CpqClient",
    "FIELD_MAP",
    "quote_from_model",
    "quote_from_records",
    "quote_to_model",
    "quote_update",
    "CpqConnector",
]
