"""Salesforce CPQ (SBQQ package) records and the CPQ API's QuoteModel.

Quotes and quote lines are custom-object records with the REST envelope of
`adapters.crm.views`, their fields named with the ``SBQQ__`` namespace.
Numbers that CPQ keeps as ``Number`` fields (line number, term, option
level) are Decimals here because the REST API may render ``3`` as ``3.0``.

A bundle is a parent line plus option lines whose ``SBQQ__RequiredBy__c``
points at it. Inside a `QuoteModel`, before records have ids, the same link
is ``parentItemKey`` → the parent's ``key``.

The catalogue objects CPQ prices from (``Product2``, ``PricebookEntry``) are
here as well, with the broker's fields: ``Broker_Key__c`` (the SKU, or
``<sku>:<currency>`` for a price), ``Floor_Price__c`` and ``Physical__c``.
"""

from __future__ import annotations

import enum
from decimal import Decimal
from typing import ClassVar

import msgspec

from adapters.crm.views import Account, QueryResult, SfDate, SObject

__all__ = [
    "QuoteStatus",
    "Quote",
    "QuoteLine",
    "QuoteLineGroup",
    "QuoteLineModel",
    "QuoteLineGroupModel",
    "QuoteModel",
    "Product2",
    "Pricebook2",
    "PricebookEntry",
    "QUOTE_READER",
]

#: The ServiceRouter ``reader`` that returns a QuoteModel.
QUOTE_READER = "SBQQ.QuoteAPI.QuoteReader"


class QuoteStatus(enum.StrEnum):
    """The default values of the ``SBQQ__Status__c`` picklist (orgs may add more)."""

    DRAFT = "Draft"
    IN_REVIEW = "In Review"
    APPROVED = "Approved"
    DENIED = "Denied"
    PRESENTED = "Presented"
    ACCEPTED = "Accepted"
    REJECTED = "Rejected"


class QuoteLine(SObject, frozen=True, kw_only=True):
    """``SBQQ__QuoteLine__c``; ``SBQQ__RequiredBy__c`` names its bundle parent line."""

    sobject_type: ClassVar[str] = "SBQQ__QuoteLine__c"

    Name: str | None = None
    SBQQ__Quote__c: str | None = None
    SBQQ__Product__c: str | None = None
    SBQQ__ProductName__c: str | None = None
    SBQQ__ProductCode__c: str | None = None
    SBQQ__ProductFamily__c: str | None = None
    SBQQ__Description__c: str | None = None
    SBQQ__Number__c: Decimal | None = None
    SBQQ__Quantity__c: Decimal | None = None
    SBQQ__ListPrice__c: Decimal | None = None
    SBQQ__CustomerPrice__c: Decimal | None = None
    SBQQ__NetPrice__c: Decimal | None = None
    SBQQ__NetTotal__c: Decimal | None = None
    SBQQ__Discount__c: Decimal | None = None
    SBQQ__AdditionalDiscountAmount__c: Decimal | None = None
    SBQQ__SubscriptionTerm__c: Decimal | None = None
    SBQQ__SubscriptionPricing__c: str | None = None
    SBQQ__StartDate__c: SfDate | None = None
    SBQQ__EndDate__c: SfDate | None = None
    SBQQ__RequiredBy__c: str | None = None
    SBQQ__Bundle__c: bool | None = None
    SBQQ__ProductOption__c: str | None = None
    SBQQ__OptionLevel__c: Decimal | None = None
    SBQQ__Group__c: str | None = None
    Physical__c: bool | None = None
    CurrencyIsoCode: str | None = None
    Broker_Key__c: str | None = None


class Quote(SObject, frozen=True, kw_only=True):
    """``SBQQ__Quote__c``; the primary quote of an opportunity is the one that orders.

    ``SBQQ__NetAmount__c`` and ``SBQQ__LineItemCount__c`` are calculated by
    the package (read-only); ``SBQQ__LineItems__r`` is present when a query
    selects the child relationship, ``SBQQ__Account__r`` when it selects the
    account's fields (``SBQQ__Account__r.Name``).
    """

    sobject_type: ClassVar[str] = "SBQQ__Quote__c"

    Name: str | None = None
    SBQQ__Account__c: str | None = None
    SBQQ__Opportunity2__c: str | None = None
    SBQQ__Primary__c: bool | None = None
    SBQQ__Status__c: str | None = None
    SBQQ__Type__c: str | None = None
    SBQQ__StartDate__c: SfDate | None = None
    SBQQ__EndDate__c: SfDate | None = None
    SBQQ__ExpirationDate__c: SfDate | None = None
    SBQQ__SubscriptionTerm__c: Decimal | None = None
    SBQQ__NetAmount__c: Decimal | None = None
    SBQQ__CustomerAmount__c: Decimal | None = None
    SBQQ__ListAmount__c: Decimal | None = None
    SBQQ__PriceBook__c: str | None = None
    SBQQ__Ordered__c: bool | None = None
    SBQQ__LineItemCount__c: Decimal | None = None
    SBQQ__BillingCountry__c: str | None = None
    SBQQ__ShippingCountry__c: str | None = None
    CurrencyIsoCode: str | None = None
    SBQQ__LineItems__r: QueryResult[QuoteLine] | None = None
    SBQQ__Account__r: Account | None = None
    Broker_Key__c: str | None = None
    Broker_Command_Key__c: str | None = None
    Broker_Status__c: str | None = None
    ERP_Order_Number__c: str | None = None


class QuoteLineGroup(SObject, frozen=True, kw_only=True):
    """``SBQQ__QuoteLineGroup__c``: an optional grouping of lines on a quote."""

    sobject_type: ClassVar[str] = "SBQQ__QuoteLineGroup__c"

    Name: str | None = None
    SBQQ__Number__c: Decimal | None = None
    SBQQ__NetTotal__c: Decimal | None = None


class _Model(msgspec.Struct, frozen=True, kw_only=True, rename="camel"):
    pass


class QuoteLineModel(_Model, frozen=True, kw_only=True):
    """A line of a QuoteModel: the record plus the calculator's bookkeeping."""

    record: QuoteLine
    key: int
    parent_item_key: int | None = None
    parent_group_key: int | None = None
    amount_discount_prorated: bool | None = None
    product_quantity_editable: bool | None = None
    product_quantity_scale: int | None = None
    product_has_dimensions: bool | None = None
    description_locked: bool | None = None
    dimension_type: str | None = None
    configuration_type: str | None = None
    configuration_event: str | None = None
    reconfiguration_disabled: bool | None = None
    upliftable: bool | None = None
    target_customer_amount: Decimal | None = None
    target_customer_total: Decimal | None = None


class QuoteLineGroupModel(_Model, frozen=True, kw_only=True):
    """A line group of a QuoteModel."""

    record: QuoteLineGroup
    key: int
    net_non_segment_total: Decimal | None = None


class QuoteModel(_Model, frozen=True, kw_only=True):
    """What ``SBQQ.QuoteAPI.QuoteReader`` returns and ``QuoteSaver`` takes."""

    record: Quote
    line_items: tuple[QuoteLineModel, ...] = ()
    line_item_groups: tuple[QuoteLineGroupModel, ...] = ()
    next_key: int | None = None
    net_total: Decimal | None = None
    net_non_segment_total: Decimal | None = None
    customer_total: Decimal | None = None
    calculation_required: bool | None = None
    application_context: msgspec.Raw | None = None


class Product2(SObject, frozen=True, kw_only=True):
    """``Product2``: a product of the catalogue; ``Broker_Key__c`` holds the SKU."""

    sobject_type: ClassVar[str] = "Product2"

    Name: str | None = None
    ProductCode: str | None = None
    Family: str | None = None
    Description: str | None = None
    IsActive: bool | None = None
    SBQQ__SubscriptionPricing__c: str | None = None
    SBQQ__SubscriptionTerm__c: Decimal | None = None
    SBQQ__SubscriptionType__c: str | None = None
    Physical__c: bool | None = None
    Broker_Key__c: str | None = None


class Pricebook2(SObject, frozen=True, kw_only=True):
    """``Pricebook2``: a price book; the standard one has every list price."""

    sobject_type: ClassVar[str] = "Pricebook2"

    Name: str | None = None
    IsStandard: bool | None = None
    IsActive: bool | None = None


class PricebookEntry(SObject, frozen=True, kw_only=True):
    """``PricebookEntry``: a product's price in one price book and currency."""

    sobject_type: ClassVar[str] = "PricebookEntry"

    Pricebook2Id: str | None = None
    Product2Id: str | None = None
    UnitPrice: Decimal | None = None
    IsActive: bool | None = None
    UseStandardPrice: bool | None = None
    CurrencyIsoCode: str | None = None
    ProductCode: str | None = None
    Floor_Price__c: Decimal | None = None
    Broker_Key__c: str | None = None
