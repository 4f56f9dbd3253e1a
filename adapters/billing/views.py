"""Native views of Stripe's API objects, spelled as Stripe spells them.

Only the fields the broker reads or the sandbox serves are declared; every
other field is ignored on decode, and every field Stripe may leave out or
send as ``null`` defaults to None. Field placement follows the pinned API
version (`API_VERSION`): the subscription link of an invoice is
``parent.subscription_details.subscription`` and billing periods live on the
subscription items. Older payloads still decode: the legacy top-level
``invoice.subscription`` is kept and read as a fallback.

Money on the wire is an integer in the currency's minor unit, with a
lower-case ISO code; the canonical side uses a `Decimal` in major units with
an upper-case code. `to_minor` and `from_minor` convert, per Stripe's own
table of minor units (which differs from ISO 4217 for a few currencies).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Generic, TypeVar

import msgspec
from msgspec import Meta

from adapters.decimals import bounded

__all__ = [
    "API_VERSION",
    # Lists
    "StripeList",
    "SearchResult",
    # Objects
    "Address",
    "Customer",
    "Product",
    "Recurring",
    "Price",
    "SubscriptionItem",
    "Subscription",
    "Period",
    "LineItemSubscriptionItemDetails",
    "LineItemInvoiceItemDetails",
    "LineItemParent",
    "InvoiceLineItem",
    "SubscriptionDetails",
    "InvoiceParent",
    "StatusTransitions",
    "UnixTime",
    "Invoice",
    "InvoiceItem",
    # Events and errors
    "EventRequest",
    "EventData",
    "Event",
    "StripeObject",
    "event_object",
    "StripeError",
    "ErrorBody",
    # Money
    "minor_unit_exponent",
    "to_minor",
    "from_minor",
    "from_minor_decimal",
    "wire_currency",
    "canonical_currency",
]

#: The Stripe API version the broker pins on requests and its webhook endpoint.
API_VERSION = "2025-03-31.basil"

T = TypeVar("T")


class View(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every Stripe view: immutable, unknown fields ignored."""


class StripeList(View, Generic[T], frozen=True, kw_only=True):
    """A list object: ``{"object": "list", "data": [...], "has_more", "url"}``."""

    object: str = "list"
    data: tuple[T, ...] = ()
    has_more: bool = False
    url: str | None = None


class SearchResult(View, Generic[T], frozen=True, kw_only=True):
    """A search result page (``GET /v1/<objects>/search``)."""

    object: str = "search_result"
    data: tuple[T, ...] = ()
    has_more: bool = False
    next_page: str | None = None
    url: str | None = None


class Address(View, frozen=True, kw_only=True):
    """A postal address; ``country`` is ISO 3166-1 alpha-2."""

    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    postal_code: str | None = None
    state: str | None = None
    country: str | None = None


class Customer(View, frozen=True, kw_only=True):
    """A customer (``cus_…``); the broker finds its own by metadata."""

    id: str
    object: str = "customer"
    created: int = 0
    email: str | None = None
    name: str | None = None
    address: Address | None = None
    description: str | None = None
    metadata: dict[str, str] = {}
    livemode: bool = False


class Product(View, frozen=True, kw_only=True):
    """A product (``prod_…``); a price always belongs to one."""

    id: str
    object: str = "product"
    name: str = ""
    active: bool = True
    created: int = 0
    metadata: dict[str, str] = {}
    livemode: bool = False


class Recurring(View, frozen=True, kw_only=True):
    """The billing period of a recurring price."""

    interval: str
    interval_count: int = 1
    usage_type: str = "licensed"


class Price(View, frozen=True, kw_only=True):
    """A price (``price_…``): a unit amount in minor units, one-off or recurring.

    ``unit_amount_decimal`` is the exact amount in minor units as a decimal
    string (it may have fractions of a cent); ``unit_amount`` is its integer
    form when there is one.
    """

    id: str
    object: str = "price"
    currency: str
    unit_amount: int | None = None
    unit_amount_decimal: str | None = None
    product: str | Product | None = None
    recurring: Recurring | None = None
    type: str = "one_time"
    active: bool = True
    billing_scheme: str = "per_unit"
    lookup_key: str | None = None
    nickname: str | None = None
    metadata: dict[str, str] = {}
    created: int = 0
    livemode: bool = False

    def minor_amount(self) -> Decimal | None:
        """The exact unit amount in minor units, if the price has one.

        Raises:
            ValueError: ``unit_amount_decimal`` is not a decimal number, or
                one no arithmetic should touch (`adapters.decimals.bounded`:
                ``NaN``, ``1e999999``); the message names the price and field.
        """
        if self.unit_amount_decimal is not None:
            field = f"price {self.id}: unit_amount_decimal"
            try:
                value = Decimal(self.unit_amount_decimal)
            except ArithmeticError as exc:
                raise ValueError(
                    f"{field} {self.unit_amount_decimal[:40]!r} is not a decimal number"
                ) from exc
            return bounded(value, field)
        if self.unit_amount is not None:
            return Decimal(self.unit_amount)
        return None


class SubscriptionItem(View, frozen=True, kw_only=True):
    """One item (``si_…``) of a subscription; periods live here."""

    id: str
    object: str = "subscription_item"
    price: Price
    quantity: int | None = None
    subscription: str | None = None
    current_period_start: int | None = None
    current_period_end: int | None = None
    metadata: dict[str, str] = {}
    created: int = 0


class Subscription(View, frozen=True, kw_only=True):
    """A subscription (``sub_…``)."""

    id: str
    object: str = "subscription"
    customer: str | Customer
    status: str
    items: StripeList[SubscriptionItem] = StripeList()
    currency: str
    latest_invoice: str | Invoice | None = None
    collection_method: str = "charge_automatically"
    days_until_due: int | None = None
    cancel_at_period_end: bool = False
    description: str | None = None
    metadata: dict[str, str] = {}
    created: int = 0
    start_date: int = 0
    livemode: bool = False

    @property
    def customer_id(self) -> str:
        """The customer's id, whether or not it was expanded."""
        return self.customer if isinstance(self.customer, str) else self.customer.id


class Period(View, frozen=True, kw_only=True):
    """A billing period in unix seconds."""

    start: int
    end: int


class LineItemSubscriptionItemDetails(View, frozen=True, kw_only=True):
    """Where a subscription-generated invoice line came from."""

    subscription: str | None = None
    subscription_item: str | None = None
    invoice_item: str | None = None
    proration: bool = False


class LineItemInvoiceItemDetails(View, frozen=True, kw_only=True):
    """Where an invoice-item-generated invoice line came from."""

    invoice_item: str | None = None
    subscription: str | None = None
    proration: bool = False


class LineItemParent(View, frozen=True, kw_only=True):
    """The origin of an invoice line (``type`` names the populated member)."""

    type: str
    subscription_item_details: LineItemSubscriptionItemDetails | None = None
    invoice_item_details: LineItemInvoiceItemDetails | None = None


class InvoiceLineItem(View, frozen=True, kw_only=True):
    """An invoice line (``il_…``); ``amount`` is in minor units."""

    id: str
    object: str = "line_item"
    amount: int
    currency: str
    description: str | None = None
    quantity: int | None = None
    period: Period | None = None
    parent: LineItemParent | None = None
    invoice: str | None = None
    metadata: dict[str, str] = {}


class SubscriptionDetails(View, frozen=True, kw_only=True):
    """An invoice's subscription, with the subscription's metadata at invoicing."""

    subscription: str | None = None
    metadata: dict[str, str] | None = None


class InvoiceParent(View, frozen=True, kw_only=True):
    """What an invoice was generated for (``type`` names the populated member)."""

    type: str
    subscription_details: SubscriptionDetails | None = None


#: Unix seconds a `datetime` holds (up to year 9999): a value outside is
#: refused when decoded, not an OverflowError or OSError when converted.
UnixTime = Annotated[int, Meta(ge=0, le=253_402_300_799)]


class StatusTransitions(View, frozen=True, kw_only=True):
    """When an invoice changed status (unix seconds, within `UnixTime`)."""

    finalized_at: UnixTime | None = None
    paid_at: UnixTime | None = None
    voided_at: UnixTime | None = None
    marked_uncollectible_at: UnixTime | None = None


class Invoice(View, frozen=True, kw_only=True):
    """An invoice (``in_…``); every amount is an integer in minor units.

    ``status`` is ``draft``, ``open``, ``paid``, ``uncollectible`` or ``void``.
    """

    id: str
    object: str = "invoice"
    customer: str | Customer | None = None
    currency: str
    status: str | None = None
    amount_due: int = 0
    amount_paid: int = 0
    amount_remaining: int = 0
    subtotal: int = 0
    total: int = 0
    lines: StripeList[InvoiceLineItem] = StripeList()
    parent: InvoiceParent | None = None
    #: Before API version 2025-03-31 the subscription link was here.
    subscription: str | None = None
    number: str | None = None
    billing_reason: str | None = None
    collection_method: str = "charge_automatically"
    auto_advance: bool | None = None
    description: str | None = None
    due_date: int | None = None
    period_start: int = 0
    period_end: int = 0
    status_transitions: StatusTransitions | None = None
    metadata: dict[str, str] = {}
    created: int = 0
    livemode: bool = False

    @property
    def subscription_id(self) -> str | None:
        """The subscription this invoice bills, wherever the version put it."""
        details = self.parent.subscription_details if self.parent else None
        if details is not None and details.subscription is not None:
            return details.subscription
        return self.subscription

    @property
    def subscription_metadata(self) -> dict[str, str]:
        """The subscription's metadata as copied onto the invoice (may be empty)."""
        details = self.parent.subscription_details if self.parent else None
        return dict(details.metadata or {}) if details is not None else {}


class InvoiceItem(View, frozen=True, kw_only=True):
    """A pending or attached invoice item (``ii_…``); ``amount`` in minor units."""

    id: str
    object: str = "invoiceitem"
    customer: str
    amount: int
    currency: str
    description: str | None = None
    invoice: str | None = None
    quantity: int = 1
    unit_amount_decimal: str | None = None
    period: Period | None = None
    metadata: dict[str, str] = {}
    date: int = 0
    livemode: bool = False


class EventRequest(View, frozen=True, kw_only=True):
    """The API request behind an event; ids are null for automatic events."""

    id: str | None = None
    idempotency_key: str | None = None


class EventData(View, frozen=True, kw_only=True):
    """The object snapshot at event time, still encoded; decode with `event_object`."""

    object: msgspec.Raw
    previous_attributes: msgspec.Raw | None = None


class Event(View, frozen=True, kw_only=True):
    """The webhook envelope (``evt_…``); ``created`` is in unix seconds.

    ``created`` is when Stripe created the event, the same on every retry of
    its delivery; it is the time of the fact (`adapters.billing.ingress`).
    """

    id: str
    object: str = "event"
    api_version: str | None = None
    created: UnixTime
    data: EventData
    livemode: bool = False
    pending_webhooks: int = 0
    #: An object since API version 2017-05-25, a bare request id before.
    request: EventRequest | str | None = None
    type: str


class StripeError(View, frozen=True, kw_only=True):
    """The ``error`` member of an error response."""

    type: str
    code: str | None = None
    message: str | None = None
    param: str | None = None
    doc_url: str | None = None
    request_log_url: str | None = None
    decline_code: str | None = None


class ErrorBody(View, frozen=True, kw_only=True):
    """Every 4xx/5xx body: ``{"error": {...}}``."""

    error: StripeError


StripeObject = Customer | Product | Price | Subscription | Invoice | InvoiceItem

_OBJECT_TYPES: dict[str, type[StripeObject]] = {
    "customer": Customer,
    "product": Product,
    "price": Price,
    "subscription": Subscription,
    "invoice": Invoice,
    "invoiceitem": InvoiceItem,
}


class _Kind(msgspec.Struct):
    object: str = ""


def event_object(event: Event) -> StripeObject | None:
    """Decode ``event.data.object`` by its ``object`` kind; None for other kinds.

    Raises:
        msgspec.ValidationError: the object is of a known kind but malformed.
    """
    kind = msgspec.json.decode(event.data.object, type=_Kind).object
    view = _OBJECT_TYPES.get(kind)
    if view is None:
        return None
    return msgspec.json.decode(event.data.object, type=view)


# --- money -----------------------------------------------------------------------

# Stripe's minor units: zero-decimal and three-decimal currencies; the rest use
# two. ISK, HUF and TWD stay two-decimal in the API although their cash has no
# cents (ISK amounts must be whole krónur, i.e. multiples of 100).
_ZERO_DECIMAL = frozenset(
    "bif clp djf gnf jpy kmf krw mga pyg rwf ugx vnd vuv xaf xof xpf".split()  # noqa: SIM905
)
_THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})
_WHOLE_UNITS_ONLY = frozenset({"isk"})
_CURRENCY = re.compile(r"[A-Za-z]{3}")


def wire_currency(code: str) -> str:
    """An ISO 4217 code as Stripe wants it: lower case.

    Raises:
        ValueError: not three letters.
    """
    if not _CURRENCY.fullmatch(code):
        raise ValueError(f"{code!r} is not a three-letter currency code")
    return code.lower()


def canonical_currency(code: str) -> str:
    """A Stripe currency as the canonical model spells it: upper case.

    Raises:
        ValueError: not three letters.
    """
    return wire_currency(code).upper()


def minor_unit_exponent(currency: str) -> int:
    """Decimal places of *currency*'s minor unit in Stripe's API (0, 2 or 3)."""
    code = wire_currency(currency)
    if code in _ZERO_DECIMAL:
        return 0
    if code in _THREE_DECIMAL:
        return 3
    return 2


def to_minor(amount: Decimal, currency: str) -> int:
    """Major units → Stripe's integer minor units (10.50 USD → 1050, 500 JPY → 500).

    Never rounds: an amount finer than the minor unit is refused.

    Raises:
        ValueError: the amount is not finite, has more decimals than the
            currency's minor unit, or (ISK) is not a whole number of krónur.
    """
    if not amount.is_finite():
        raise ValueError(f"amount {amount} is not finite")
    exponent = minor_unit_exponent(currency)
    scaled = amount.scaleb(exponent)
    if scaled != scaled.to_integral_value():
        raise ValueError(
            f"{amount} {currency.upper()} is finer than the currency's minor unit "
            f"({exponent} decimals)"
        )
    if (
        wire_currency(currency) in _WHOLE_UNITS_ONLY
        and amount != amount.to_integral_value()
    ):
        raise ValueError(f"{amount} {currency.upper()}: Stripe takes whole units only")
    return int(scaled)


def from_minor(minor: int, currency: str) -> Decimal:
    """Stripe's integer minor units → major units (1050 usd → Decimal('10.50'))."""
    return Decimal(minor).scaleb(-minor_unit_exponent(currency))


def from_minor_decimal(minor: str | Decimal, currency: str) -> Decimal:
    """A ``*_decimal`` string in minor units → major units ("1050.5" usd → 10.505).

    Raises:
        ValueError: *minor* is not a finite decimal number.
    """
    try:
        value = Decimal(minor)
    except ArithmeticError as exc:
        raise ValueError(f"{minor!r} is not a decimal amount") from exc
    if not value.is_finite():
        raise ValueError(f"{minor!r} is not a finite amount")
    return value.scaleb(-minor_unit_exponent(currency))
