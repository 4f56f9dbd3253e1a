"""Salesforce CPQ calls: quotes with their lines, status and ordered flag, catalogue.

`CpqClient` rides on a `SalesforceClient` (same org, same session and
token). A quote is read either through the CPQ API's QuoteReader (a
QuoteModel, with bundle links as keys) or with one SOQL query (records, its
lines through the ``SBQQ__LineItems__r`` child relationship, bundle links as
``SBQQ__RequiredBy__c`` ids, and optionally its account's fields).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from adapters.cpq.views import (
    QUOTE_READER,
    PricebookEntry,
    Product2,
    Quote,
    QuoteLine,
    QuoteModel,
)
from adapters.crm import soql
from adapters.crm.client import SalesforceClient, UpsertResult
from adapters.crm.views import is_id
from broker.errors import UpstreamRejected

__all__ = ["CpqClient", "QUOTE_FIELDS", "LINE_FIELDS", "decode_quote_model"]

#: What `CpqClient.quote_with_lines` selects of a quote.
QUOTE_FIELDS = (
    "Id",
    "Name",
    "SBQQ__Account__c",
    "SBQQ__Opportunity2__c",
    "SBQQ__Primary__c",
    "SBQQ__Status__c",
    "SBQQ__Type__c",
    "SBQQ__StartDate__c",
    "SBQQ__SubscriptionTerm__c",
    "SBQQ__NetAmount__c",
    "SBQQ__Ordered__c",
    "SBQQ__BillingCountry__c",
    "SBQQ__ShippingCountry__c",
    "CurrencyIsoCode",
    "ERP_Order_Number__c",
    "Broker_Command_Key__c",
    "LastModifiedDate",
)
#: What `CpqClient.quote_with_lines` selects of each line.
LINE_FIELDS = (
    "Id",
    "SBQQ__Quote__c",
    "SBQQ__Number__c",
    "SBQQ__ProductCode__c",
    "SBQQ__ProductName__c",
    "SBQQ__ProductFamily__c",
    "SBQQ__Quantity__c",
    "SBQQ__ListPrice__c",
    "SBQQ__CustomerPrice__c",
    "SBQQ__NetPrice__c",
    "SBQQ__NetTotal__c",
    "SBQQ__SubscriptionPricing__c",
    "SBQQ__SubscriptionTerm__c",
    "SBQQ__RequiredBy__c",
    "SBQQ__Bundle__c",
    "Physical__c",
)

_MODEL = msgspec.json.Decoder(QuoteModel)
_STRING = msgspec.json.Decoder(str)


def decode_quote_model(body: bytes) -> QuoteModel:
    """A QuoteModel from the ServiceRouter's body: a JSON string holding it, or it.

    Raises:
        msgspec.DecodeError: neither form, or not a QuoteModel.
    """
    if body.lstrip().startswith(b'"'):
        body = _STRING.decode(body).encode()
    return _MODEL.decode(body)


class CpqClient:
    """The CPQ package of the org *crm* talks to.

    Args:
        crm: the org's client; its session and token are shared.
    """

    def __init__(self, crm: SalesforceClient) -> None:
        self.crm = crm

    async def read_quote(self, quote_id: str) -> QuoteModel:
        """The quote as ``SBQQ.QuoteAPI.QuoteReader`` returns it.

        The Apex REST endpoint returns the model as a JSON string holding
        the JSON; a plain JSON object is accepted too.

        Raises:
            UpstreamRejected: ``NOT_FOUND``, ``APEX_ERROR`` or a malformed model.
            UpstreamUnavailable: the org is down, slow or limiting us.
        """
        body = await self.crm.apex_get(
            "SBQQ/ServiceRouter", {"reader": QUOTE_READER, "uid": quote_id}
        )
        try:
            return decode_quote_model(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamRejected(
                self.crm.system,
                f"QuoteReader {quote_id}: unexpected response: {exc}",
                code="MALFORMED_RESPONSE",
            ) from exc

    async def quote_with_lines(
        self, quote_id: str, *, account_fields: Sequence[str] = ()
    ) -> tuple[Quote, tuple[QuoteLine, ...]]:
        """The quote record and its lines (in ``SBQQ__Number__c`` order).

        One request: the lines come through the ``SBQQ__LineItems__r`` child
        relationship, and *account_fields* of the quote's account, if any,
        as ``SBQQ__Account__r``. Only when the org pages the lines (a quote
        of hundreds) are they read with a query of their own.

        Raises:
            UpstreamRejected: ``NOT_FOUND`` when there is no such live quote.
            UpstreamUnavailable: the org is down, slow or limiting us.
        """
        if not is_id(quote_id):
            raise UpstreamRejected(
                self.crm.system, f"no quote {quote_id!r}", code="NOT_FOUND"
            )
        fields = [
            *QUOTE_FIELDS,
            *(f"SBQQ__Account__r.{name}" for name in account_fields),
            soql.subquery(
                "SBQQ__LineItems__r", LINE_FIELDS, order_by="SBQQ__Number__c"
            ),
        ]
        found = await self.crm.query(
            soql.select(Quote.sobject_type, fields, {"Id": quote_id}), Quote
        )
        if not found:
            raise UpstreamRejected(
                self.crm.system, f"no quote {quote_id!r}", code="NOT_FOUND"
            )
        quote = found[0]
        page = quote.SBQQ__LineItems__r
        if page is None:
            lines: tuple[QuoteLine, ...] = ()
        elif page.done:
            lines = page.records
        else:
            lines = await self.crm.select(
                QuoteLine, LINE_FIELDS, {"SBQQ__Quote__c": quote.Id or quote_id}
            )
        ordered = sorted(lines, key=lambda line: line.SBQQ__Number__c or 0)
        return quote, tuple(ordered)

    async def update_quote(self, quote_id: str, changes: Quote) -> None:
        """PATCH the fields set on *changes* (status, ordered flag, order number).

        Raises:
            UpstreamRejected: ``NOT_FOUND``, a validation rule, …
            UpstreamUnavailable: the org is down, slow or limiting us.
        """
        await self.crm.update(quote_id, changes)

    async def upsert_product(self, product: Product2, *, sku: str) -> UpsertResult:
        """Create or update the product whose ``Broker_Key__c`` is *sku*."""
        return await self.crm.upsert(product, key=sku)

    async def upsert_price(self, entry: PricebookEntry, *, key: str) -> UpsertResult:
        """Create or update the price book entry whose ``Broker_Key__c`` is *key*."""
        return await self.crm.upsert(entry, key=key)
