"""How the sandbox builds prices and invoices from request parameters.

Pure functions (ids and the time are passed in) used by
`adapters.billing.account.StripeAccount`: reading a price or a
subscription item's inline ``price_data``, the first invoice of a
subscription, invoice lines from invoice items, and totals. Each line is
unit amount times quantity rounded half up to a whole minor unit, as Stripe
rounds ``unit_amount_decimal`` prices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import ROUND_HALF_UP, Decimal

import msgspec

from adapters.billing.form import FormNode
from adapters.billing.params import (
    Params,
    Refusal,
    check_known,
    missing_param,
    read_decimal,
    read_dict,
    read_enum,
    read_int,
    read_metadata,
    read_str,
)
from adapters.billing.views import (
    Invoice,
    InvoiceItem,
    InvoiceLineItem,
    InvoiceParent,
    LineItemInvoiceItemDetails,
    LineItemParent,
    LineItemSubscriptionItemDetails,
    Period,
    Price,
    Recurring,
    StatusTransitions,
    StripeList,
    Subscription,
    SubscriptionDetails,
)

__all__ = [
    "INTERVAL_S",
    "ItemSpec",
    "price_from_params",
    "item_spec",
    "subscription_invoice",
    "with_item_lines",
    "totalled",
    "line_amount",
    "period_s",
]

#: Seconds per billing interval (a sandbox month is 30 days).
INTERVAL_S = {
    "day": 86_400,
    "week": 7 * 86_400,
    "month": 30 * 86_400,
    "year": 365 * 86_400,
}

#: One subscription item as requested: price (id or inline), quantity, metadata.
ItemSpec = tuple[str | Price, int, dict[str, str]]


def price_from_params(params: Params, prefix: str, *, price_id: str, now: int) -> Price:
    """A price from ``/v1/prices`` params or an item's ``price_data`` (*prefix*)."""

    def name(n: str) -> str:
        return f"{prefix}[{n}]" if prefix else n

    currency = read_str(params, "currency", required=True, param=name("currency")) or ""
    unit_amount = read_int(params, "unit_amount", param=name("unit_amount"))
    unit_decimal = read_decimal(
        params, "unit_amount_decimal", param=name("unit_amount_decimal")
    )
    if unit_amount is None and unit_decimal is None:
        raise missing_param(name("unit_amount"))
    if unit_amount is not None and unit_amount < 0:
        raise Refusal(
            400,
            f"Invalid non-negative integer: {unit_amount}",
            code="parameter_invalid_integer",
            param=name("unit_amount"),
        )
    if unit_amount is not None and unit_decimal is not None:
        raise Refusal(
            400,
            "You may only specify one of these parameters: unit_amount, "
            "unit_amount_decimal.",
            param=name("unit_amount_decimal"),
        )
    recurring = read_dict(params, "recurring", param=name("recurring"))
    recurring_view: Recurring | None = None
    if recurring is not None:
        check_known(
            recurring,
            {"interval", "interval_count", "usage_type"},
            name("recurring"),
        )
        interval = read_enum(
            recurring,
            "interval",
            tuple(INTERVAL_S),
            param=f"{name('recurring')}[interval]",
            required=True,
        )
        count = read_int(
            recurring,
            "interval_count",
            param=f"{name('recurring')}[interval_count]",
        )
        recurring_view = Recurring(
            interval=interval or "month", interval_count=count or 1
        )
    exact = unit_decimal if unit_decimal is not None else Decimal(unit_amount or 0)
    return Price(
        id=price_id,
        currency=currency.lower(),
        unit_amount=int(exact) if exact == exact.to_integral_value() else None,
        unit_amount_decimal=format(exact.normalize(), "f") if exact else "0",
        product=read_str(params, "product"),
        recurring=recurring_view,
        type="recurring" if recurring_view is not None else "one_time",
        nickname=read_str(params, "nickname"),
        lookup_key=read_str(params, "lookup_key"),
        metadata=read_metadata(params, {}),
        created=now,
    )


def item_spec(raw: FormNode, index: int, *, new_price_id: str, now: int) -> ItemSpec:
    """Read ``items[index]``: a price id or inline price, quantity, metadata."""
    where = f"items[{index}]"
    if not isinstance(raw, dict):
        raise Refusal(400, f"Invalid object: {where}", param=where)
    check_known(raw, {"price", "price_data", "quantity", "metadata"}, where)
    quantity = read_int(raw, "quantity", param=f"{where}[quantity]")
    if quantity is not None and quantity < 0:
        raise Refusal(400, "Quantity must be non-negative.", param=f"{where}[quantity]")
    price_data = read_dict(raw, "price_data", param=f"{where}[price_data]")
    price_id = read_str(raw, "price", param=f"{where}[price]")
    source: str | Price
    if price_data is not None:
        check_known(
            price_data,
            {
                "currency",
                "product",
                "unit_amount",
                "unit_amount_decimal",
                "recurring",
            },
            f"{where}[price_data]",
        )
        read_str(
            price_data,
            "product",
            required=True,
            param=f"{where}[price_data][product]",
        )
        if read_dict(price_data, "recurring") is None:
            raise missing_param(f"{where}[price_data][recurring]")
        source = price_from_params(
            price_data, f"{where}[price_data]", price_id=new_price_id, now=now
        )
    elif price_id is not None:
        source = price_id
    else:
        raise missing_param(f"{where}[price]")
    return source, 1 if quantity is None else quantity, read_metadata(raw, {})


def subscription_invoice(
    subscription: Subscription, *, new_id: Callable[[str], str], now: int
) -> Invoice:
    """The first invoice of a new subscription, as a draft."""
    lines = tuple(
        InvoiceLineItem(
            id=new_id("il"),
            amount=line_amount(item.price, item.quantity or 0),
            currency=subscription.currency,
            description=f"{item.quantity} x {item.price.nickname or item.price.id}",
            quantity=item.quantity,
            period=Period(
                start=item.current_period_start or now,
                end=item.current_period_end or now,
            ),
            parent=LineItemParent(
                type="subscription_item_details",
                subscription_item_details=LineItemSubscriptionItemDetails(
                    subscription=subscription.id, subscription_item=item.id
                ),
            ),
            metadata=dict(item.metadata),
        )
        for item in subscription.items.data
    )
    invoice_id = new_id("in")
    return totalled(
        Invoice(
            id=invoice_id,
            customer=subscription.customer_id,
            currency=subscription.currency,
            status="draft",
            lines=StripeList(data=lines, url=f"/v1/invoices/{invoice_id}/lines"),
            parent=InvoiceParent(
                type="subscription_details",
                subscription_details=SubscriptionDetails(
                    subscription=subscription.id,
                    metadata=dict(subscription.metadata),
                ),
            ),
            billing_reason="subscription_create",
            collection_method=subscription.collection_method,
            auto_advance=True,
            period_start=now,
            period_end=now,
            status_transitions=StatusTransitions(),
            created=now,
        )
    )


def with_item_lines(invoice: Invoice, items: Iterable[InvoiceItem]) -> Invoice:
    """*invoice* with one line per invoice item attached to it, totals updated."""
    lines = tuple(
        InvoiceLineItem(
            id=f"il_{item.id}",
            amount=item.amount,
            currency=item.currency,
            description=item.description,
            quantity=item.quantity,
            invoice=invoice.id,
            parent=LineItemParent(
                type="invoice_item_details",
                invoice_item_details=LineItemInvoiceItemDetails(invoice_item=item.id),
            ),
            metadata=dict(item.metadata),
        )
        for item in items
        if item.invoice == invoice.id
    )
    return totalled(
        msgspec.structs.replace(
            invoice,
            lines=StripeList(data=lines, url=f"/v1/invoices/{invoice.id}/lines"),
        )
    )


def line_amount(price: Price, quantity: int) -> int:
    """Unit amount times quantity in minor units, rounded half up to an integer."""
    unit = price.minor_amount() or Decimal(0)
    return int((unit * quantity).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def period_s(price: Price) -> int:
    """Length of a recurring price's billing period in seconds."""
    recurring = price.recurring
    if recurring is None:
        return 0
    return INTERVAL_S[recurring.interval] * recurring.interval_count


def totalled(invoice: Invoice) -> Invoice:
    """*invoice* with subtotal, total and amounts due from its lines (unpaid)."""
    total = sum(line.amount for line in invoice.lines.data)
    return msgspec.structs.replace(
        invoice,
        subtotal=total,
        total=total,
        amount_due=total,
        amount_paid=0,
        amount_remaining=total,
    )
