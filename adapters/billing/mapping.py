"""Canonical ⇄ Stripe, as pure functions.

Decisions that the field names do not show:

- Our objects are found again by metadata, not by Stripe ids: a customer
  carries ``metadata[q2c_account_id]``, a subscription carries the
  canonical subscription, deal, order and account ids. Stripe copies a
  subscription's metadata onto each invoice it generates
  (``parent.subscription_details.metadata``), which is how an
  ``invoice.paid`` webhook finds its deal without a lookup.
- A customer is created with its metadata only, so the create request is
  the same for the account's whole life (its idempotency key can be derived
  from the account id alone); name, address and e-mail follow as an update.
- Products are keyed by SKU through a caller-chosen product id
  (`product_id`); prices are inline (``price_data``) on each item.
- Money: canonical `Decimal` major units and upper-case ISO codes, Stripe
  integer minor units and lower-case codes. A unit amount finer than the
  minor unit travels as ``unit_amount_decimal`` (fractions of a cent are
  allowed there); Stripe rounds each line to a whole minor unit, so the
  per-period amount reported back is Stripe's rounded figure.
- Stripe quantities are whole numbers; a fractional canonical quantity is
  refused rather than rounded. All items of a Stripe subscription bill on
  one interval, so items with different ``interval_months`` are refused too.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal

from adapters.billing.form import FormValue
from adapters.billing.views import (
    Customer,
    Invoice,
    Price,
    Subscription,
    SubscriptionItem,
    canonical_currency,
    from_minor,
    from_minor_decimal,
    minor_unit_exponent,
    wire_currency,
)
from adapters.fieldmap import FieldMapping
from canonical.commerce import Account
from canonical.commerce import Invoice as CanonicalInvoice
from canonical.commerce import SubscriptionItem as CanonicalSubscriptionItem
from canonical.q2c import InvoicePaid, SubscriptionCreated, SubscriptionRequested
from canonical.scalars import Money

__all__ = [
    "FIELD_MAP",
    "META_ACCOUNT",
    "META_SUBSCRIPTION",
    "META_DEAL",
    "META_ORDER",
    "PRODUCT_PREFIX",
    "product_id",
    "sku_of_product",
    "customer_create_params",
    "customer_update_params",
    "product_params",
    "subscription_params",
    "canonical_items",
    "amount_per_period",
    "subscription_created",
    "invoice_id",
    "invoice_paid",
]

META_ACCOUNT = "q2c_account_id"
META_SUBSCRIPTION = "q2c_subscription_id"
META_DEAL = "q2c_deal_id"
META_ORDER = "q2c_order_id"
#: Stripe product ids the broker creates: the prefix, then the SKU.
PRODUCT_PREFIX = "q2c-sku-"

_MONTHS_PER_YEAR = 12

FIELD_MAP: tuple[FieldMapping, ...] = (
    FieldMapping("account.id", f"customer.metadata.{META_ACCOUNT}", "lookup key"),
    FieldMapping("account.name", "customer.name"),
    FieldMapping("account.billing_address.street", "customer.address.line1"),
    FieldMapping("account.billing_address.city", "customer.address.city"),
    FieldMapping("account.billing_address.postal_code", "customer.address.postal_code"),
    FieldMapping("account.billing_address.region", "customer.address.state"),
    FieldMapping("account.billing_address.country", "customer.address.country"),
    FieldMapping("subscription.id", f"subscription.metadata.{META_SUBSCRIPTION}"),
    FieldMapping("deal_id", f"subscription.metadata.{META_DEAL}"),
    FieldMapping("subscription.order_id", f"subscription.metadata.{META_ORDER}"),
    FieldMapping("subscription.currency", "items[].price_data.currency", "lower-case"),
    FieldMapping(
        "subscription.items[].sku",
        "items[].price_data.product",
        f"product id = {PRODUCT_PREFIX}<sku>",
    ),
    FieldMapping(
        "subscription.items[].quantity", "items[].quantity", "whole number only"
    ),
    FieldMapping(
        "subscription.items[].unit_amount",
        "items[].price_data.unit_amount | unit_amount_decimal",
        "major units → minor units (per-currency exponent)",
    ),
    FieldMapping(
        "subscription.items[].interval_months",
        "items[].price_data.recurring.interval + interval_count",
        "12·n months → year/n, else month/n",
    ),
    FieldMapping("SubscriptionCreated.native_id", "subscription.id", "sub_…"),
    FieldMapping(
        "SubscriptionCreated.amount_per_period",
        "sum of items[].price.unit_amount_decimal * quantity",
        "each line rounded to a minor unit, then minor → major",
    ),
    FieldMapping("SubscriptionCreated.status", "subscription.status"),
    FieldMapping("InvoicePaid.native_id", "invoice.id", "in_…"),
    FieldMapping("invoice.id", "invoice.id", "invoice-<in_…>"),
    FieldMapping(
        "invoice.order_id",
        f"invoice.parent.subscription_details.metadata.{META_ORDER}",
    ),
    FieldMapping(
        "InvoicePaid.deal_id",
        f"invoice.parent.subscription_details.metadata.{META_DEAL}",
    ),
    FieldMapping("invoice.number", "invoice.number", "the id while a draft"),
    FieldMapping("invoice.amount", "invoice.amount_paid + currency", "minor → major"),
    FieldMapping(
        "invoice.issued_at", "invoice.status_transitions.finalized_at", "unix s → UTC"
    ),
)


def product_id(sku: str) -> str:
    """The Stripe product id the broker uses for *sku*."""
    return f"{PRODUCT_PREFIX}{sku}"


def sku_of_product(product: str) -> str | None:
    """The SKU behind a product id from `product_id`; None for other products."""
    return (
        product.removeprefix(PRODUCT_PREFIX)
        if product.startswith(PRODUCT_PREFIX)
        else None
    )


def customer_create_params(account: Account) -> dict[str, FormValue]:
    """The customer's create request: the account id only, stable for its life."""
    return {"metadata": {META_ACCOUNT: account.id}}


def customer_update_params(account: Account, current: Customer) -> dict[str, FormValue]:
    """What must change on *current* to match *account*; empty when nothing."""
    params: dict[str, FormValue] = {}
    if current.name != account.name:
        params["name"] = account.name
    address = account.billing_address
    if address is not None:
        wanted = {
            "line1": address.street or None,
            "city": address.city or None,
            "postal_code": address.postal_code or None,
            "state": address.region or None,
            "country": address.country,
        }
        have = current.address
        if have is None or any(getattr(have, k) != v for k, v in wanted.items()):
            params["address"] = {k: v or "" for k, v in wanted.items()}
    return params


def product_params(sku: str) -> dict[str, FormValue]:
    """Create request of the product for *sku* (its id chosen by us)."""
    return {"id": product_id(sku), "name": sku, "metadata": {"q2c_sku": sku}}


def subscription_params(
    command: SubscriptionRequested, customer_id: str
) -> dict[str, FormValue]:
    """The ``POST /v1/subscriptions`` request for *command*.

    Raises:
        ValueError: a quantity is not a whole number, the items do not share
            one billing interval, or there are none.
    """
    sub = command.subscription
    if not sub.items:
        raise ValueError(f"subscription {sub.id} has no items")
    intervals = sorted({item.interval_months for item in sub.items})
    if len(intervals) > 1:
        raise ValueError(
            f"subscription {sub.id} bills items every {intervals} months; a Stripe "
            "subscription bills all its items on one interval"
        )
    currency = wire_currency(sub.currency)
    items: list[FormValue] = [_item(item, currency, sub.id) for item in sub.items]
    return {
        "customer": customer_id,
        "items": items,
        "metadata": {
            META_SUBSCRIPTION: sub.id,
            META_DEAL: command.deal_id,
            META_ORDER: sub.order_id,
            META_ACCOUNT: sub.account.id,
        },
    }


def _item(item: CanonicalSubscriptionItem, currency: str, sub_id: str) -> FormValue:
    quantity = item.quantity
    if quantity != quantity.to_integral_value():
        raise ValueError(
            f"subscription {sub_id}: quantity {quantity} of {item.sku} is not a "
            "whole number, and Stripe quantities are"
        )
    minor = item.unit_amount.scaleb(minor_unit_exponent(currency))
    amount: dict[str, FormValue] = (
        {"unit_amount": int(minor)}
        if minor == minor.to_integral_value()
        else {"unit_amount_decimal": minor.normalize()}
    )
    months = item.interval_months
    interval, count = (
        ("year", months // _MONTHS_PER_YEAR)
        if months % _MONTHS_PER_YEAR == 0
        else ("month", months)
    )
    return {
        "price_data": {
            "currency": currency,
            "product": product_id(item.sku),
            **amount,
            "recurring": {"interval": interval, "interval_count": count},
        },
        "quantity": int(quantity),
    }


def canonical_items(native: Subscription) -> tuple[CanonicalSubscriptionItem, ...]:
    """The canonical items of a Stripe subscription the broker created.

    Raises:
        ValueError: an item's price is not one of ours (product, recurring,
            unit amount) and cannot be read back.
    """
    return tuple(_canonical_item(item) for item in native.items.data)


def _canonical_item(item: SubscriptionItem) -> CanonicalSubscriptionItem:
    price = item.price
    product = price.product if isinstance(price.product, str) else None
    sku = sku_of_product(product or "")
    minor = price.minor_amount()
    if sku is None or minor is None or price.recurring is None:
        raise ValueError(f"subscription item {item.id} is not one the broker created")
    recurring = price.recurring
    months = recurring.interval_count * (
        _MONTHS_PER_YEAR if recurring.interval == "year" else 1
    )
    return CanonicalSubscriptionItem(
        sku=sku,
        quantity=Decimal(item.quantity or 0),
        unit_amount=from_minor_decimal(minor, price.currency),
        interval_months=months,
    )


def amount_per_period(native: Subscription) -> Money:
    """What Stripe will invoice per period: each line rounded to a minor unit.

    Raises:
        ValueError: a price's ``unit_amount_decimal`` is not a sane decimal
            number (checked before any arithmetic), or the total is not an
            amount the canonical model takes.
    """
    minor = sum(
        _line_minor(item.price, item.quantity or 0) for item in native.items.data
    )
    return Money(
        amount=from_minor(minor, native.currency),
        currency=canonical_currency(native.currency),
    )


def _line_minor(price: Price, quantity: int) -> int:
    unit = price.minor_amount() or Decimal(0)
    return int((unit * quantity).to_integral_value(rounding=ROUND_HALF_UP))


def subscription_created(
    native: Subscription, command: SubscriptionRequested
) -> SubscriptionCreated:
    """The canonical outcome of creating *command*'s subscription in Stripe.

    Raises:
        ValueError: see `amount_per_period`.
    """
    return SubscriptionCreated(
        subscription_id=command.subscription.id,
        deal_id=command.deal_id,
        order_id=command.subscription.order_id,
        native_id=native.id,
        amount_per_period=amount_per_period(native),
        status=native.status,
    )


def invoice_id(native_id: str) -> str:
    """The canonical id of Stripe invoice *native_id*."""
    return f"invoice-{native_id}"


def invoice_paid(invoice: Invoice) -> InvoicePaid | None:
    """The canonical ``billing.invoice.paid`` for a paid Stripe invoice.

    None when the invoice does not bill a subscription the broker created
    (no deal in its subscription metadata): nothing to report.
    """
    metadata = invoice.subscription_metadata
    deal, order = metadata.get(META_DEAL), metadata.get(META_ORDER)
    if deal is None or order is None:
        return None
    finalized = (
        invoice.status_transitions.finalized_at if invoice.status_transitions else None
    )
    return InvoicePaid(
        invoice=CanonicalInvoice(
            id=invoice_id(invoice.id),
            order_id=order,
            number=invoice.number or invoice.id,
            amount=Money(
                amount=from_minor(invoice.amount_paid, invoice.currency),
                currency=canonical_currency(invoice.currency),
            ),
            status="paid",
            issued_at=datetime.fromtimestamp(finalized, UTC) if finalized else None,
        ),
        deal_id=deal,
        native_id=invoice.id,
    )
