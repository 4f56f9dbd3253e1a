"""The quote-to-cash entities every system is mapped to and from.

Ids are the broker's canonical ids (``acct-…``, ``deal-…``, ``quote-…``,
``order-…``); each system's own ids are kept in the xref registry, never in
these Structs, so one entity reads the same whichever system it came from.
Quantities and prices are Decimals; every amount that leaves a document is
`Money`.
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from typing import Annotated, Literal

from msgspec import Meta

from canonical.base import Canonical, UtcDatetime
from canonical.scalars import (
    CountryCode,
    CurrencyCode,
    Money,
    Sku,
    check_amount,
    check_country,
    check_currency,
)

__all__ = [
    "Id",
    "Address",
    "Account",
    "Contact",
    "Product",
    "PriceBookEntry",
    "Opportunity",
    "QuoteLine",
    "Quote",
    "QuoteStatus",
    "OrderLine",
    "Order",
    "ErpKind",
    "Contract",
    "SubscriptionItem",
    "Subscription",
    "Invoice",
    "ShipmentLine",
    "Shipment",
]

#: A canonical id: lower-case kind prefix, a dash, then letters, digits, ``-``/``_``.
Id = Annotated[str, Meta(pattern=r"^[a-z]+-[A-Za-z0-9_-]{1,64}\Z")]
Name = Annotated[str, Meta(min_length=1, max_length=255)]
Quantity = Decimal
LineNumber = Annotated[int, Meta(ge=1, le=999_999)]


def _check_quantity(quantity: Decimal) -> None:
    check_amount(quantity)
    if quantity <= 0:
        raise ValueError(f"quantity {quantity} is not positive")


QuoteStatus = Literal["draft", "in_review", "approved", "denied", "accepted", "ordered"]
ErpKind = Literal["cloud", "legacy"]


class Address(Canonical, frozen=True, kw_only=True):
    """A postal address."""

    street: str = ""
    city: str = ""
    postal_code: str = ""
    region: str | None = None
    country: CountryCode

    def __post_init__(self) -> None:
        check_country(self.country)


class Account(Canonical, frozen=True, kw_only=True):
    """A customer: the CRM account, the ERP business partner / sold-to."""

    id: Id
    name: Name
    country: CountryCode
    currency: CurrencyCode
    billing_address: Address | None = None
    tax_id: str | None = None
    #: Set when the account is closed or merged away.
    deleted: bool = False

    def __post_init__(self) -> None:
        check_country(self.country)
        check_currency(self.currency)


class Contact(Canonical, frozen=True, kw_only=True):
    """A person at an account."""

    id: Id
    account_id: Id
    first_name: str = ""
    last_name: Name
    email: str | None = None


class Product(Canonical, frozen=True, kw_only=True):
    """A sellable product, mastered in the ERP and synced to the CPQ."""

    sku: Sku
    name: Name
    family: Annotated[str, Meta(min_length=1, max_length=40)]
    #: Billed per period through the billing platform (a subscription line).
    recurring: bool = False
    #: Shipped by the ERP (a shipment follows the order).
    physical: bool = True
    active: bool = True


class PriceBookEntry(Canonical, frozen=True, kw_only=True):
    """A product's list price and the floor below which no quote may go."""

    sku: Sku
    currency: CurrencyCode
    list_price: Decimal
    floor_price: Decimal

    def __post_init__(self) -> None:
        check_currency(self.currency)
        check_amount(self.list_price)
        check_amount(self.floor_price)


class Opportunity(Canonical, frozen=True, kw_only=True):
    """A CRM opportunity: where a deal starts."""

    id: Id
    account: Account
    name: Name
    stage: str
    close_date: date | None = None
    amount: Money | None = None


class QuoteLine(Canonical, frozen=True, kw_only=True):
    """One priced line; a bundle's options name their parent line."""

    number: LineNumber
    sku: Sku
    product_name: str = ""
    family: str = ""
    quantity: Quantity
    list_price: Decimal
    unit_price: Decimal
    net_total: Decimal
    recurring: bool = False
    physical: bool = True
    #: Months per billing period for a recurring line.
    term_months: Annotated[int, Meta(ge=1, le=120)] | None = None
    #: The bundle line this option belongs to (``SBQQ__RequiredBy__c``).
    parent: LineNumber | None = None

    def __post_init__(self) -> None:
        _check_quantity(self.quantity)
        for value in (self.list_price, self.unit_price, self.net_total):
            check_amount(value)


class Quote(Canonical, frozen=True, kw_only=True):
    """A configured, priced quote (the primary one orders)."""

    id: Id
    opportunity_id: Id
    account_id: Id
    currency: CurrencyCode
    lines: tuple[QuoteLine, ...]
    net_total: Money
    status: QuoteStatus
    primary: bool = True
    #: Where tax is due: the ship-to country.
    tax_country: CountryCode
    start_date: date | None = None

    def __post_init__(self) -> None:
        check_currency(self.currency)
        check_country(self.tax_country)


class OrderLine(Canonical, frozen=True, kw_only=True):
    """A quote line enriched for the ERP."""

    number: LineNumber
    sku: Sku
    quantity: Quantity
    unit_price: Decimal
    net_amount: Decimal
    recurring: bool = False
    physical: bool = True
    term_months: int | None = None
    parent: LineNumber | None = None
    plant: str = ""
    tax_code: str = ""
    revenue_class: str = ""

    def __post_init__(self) -> None:
        _check_quantity(self.quantity)
        check_amount(self.unit_price)
        check_amount(self.net_amount)


class Order(Canonical, frozen=True, kw_only=True):
    """A sales order as the broker sends it to an ERP."""

    id: Id
    deal_id: Id
    quote_id: Id
    account: Account
    currency: CurrencyCode
    lines: tuple[OrderLine, ...]
    net_total: Money
    payment_terms: str
    legal_entity: str
    sales_org: str
    distribution_channel: str = "10"
    division: str = "00"
    region: str
    erp: ErpKind
    #: The customer reference the ERP dedupes on (≤ 35 characters).
    customer_ref: Annotated[str, Meta(min_length=1, max_length=35)]
    tax_country: CountryCode


class Contract(Canonical, frozen=True, kw_only=True):
    """The commitment behind recurring lines."""

    id: Id
    account_id: Id
    order_id: Id
    start_date: date
    term_months: int


class SubscriptionItem(Canonical, frozen=True, kw_only=True):
    """One recurring line of a subscription."""

    sku: Sku
    quantity: Quantity
    unit_amount: Decimal
    interval_months: Annotated[int, Meta(ge=1, le=120)] = 1

    def __post_init__(self) -> None:
        _check_quantity(self.quantity)
        check_amount(self.unit_amount)


class Subscription(Canonical, frozen=True, kw_only=True):
    """What the billing platform charges per period for an order's recurring lines."""

    id: Id
    account: Account
    order_id: Id
    currency: CurrencyCode
    items: tuple[SubscriptionItem, ...]
    amount_per_period: Money
    status: str = "requested"


class Invoice(Canonical, frozen=True, kw_only=True):
    """An invoice for an order, from whichever system bills it."""

    id: Id
    order_id: Id
    number: str
    amount: Money
    status: str = "issued"
    issued_at: UtcDatetime | None = None


class ShipmentLine(Canonical, frozen=True, kw_only=True):
    """What left the warehouse for one order line."""

    sku: Sku
    quantity: Quantity

    def __post_init__(self) -> None:
        _check_quantity(self.quantity)


class Shipment(Canonical, frozen=True, kw_only=True):
    """A delivery for an order's physical lines."""

    id: Id
    order_id: Id
    number: str
    lines: tuple[ShipmentLine, ...] = ()
    dispatched_at: UtcDatetime | None = None
