"""Canonical ⇄ Stripe mapping, pinned by golden samples.

``tests/contract/golden/billing/`` holds project-written samples: a
canonical ``billing.subscription.requested`` and a Stripe ``invoice.paid``
event (inputs), and what the mapping makes of them (pinned outputs). The
round trip goes canonical items → Stripe request → the sandbox's Stripe
subscription → canonical items again. Regenerate pinned outputs after a
deliberate change with ``Q2C_WRITE_GOLDEN=1``.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.billing.account import StripeAccount
from adapters.billing.form import decode_form, encode_form
from adapters.billing.mapping import (
    FIELD_MAP,
    META_ACCOUNT,
    amount_per_period,
    canonical_items,
    customer_create_params,
    customer_update_params,
    invoice_paid,
    product_params,
    sku_of_product,
    subscription_created,
    subscription_params,
)
from adapters.billing.views import (
    Address,
    Customer,
    Event,
    EventRequest,
    Invoice,
    Subscription,
)
from adapters.fieldmap import render
from canonical.commerce import SubscriptionItem
from canonical.q2c import InvoicePaid, SubscriptionCreated, SubscriptionRequested

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "billing"
NOW = 1_767_225_600
_encoder = msgspec.json.Encoder()


def golden_input(name: str, into: type[Any]) -> Any:
    return msgspec.json.decode((GOLDEN / name).read_bytes(), type=into)


def assert_golden(name: str, value: Any) -> None:
    """*value* encodes to the pinned file byte for byte."""
    encoded = msgspec.json.format(_encoder.encode(value), indent=2) + b"\n"
    path = GOLDEN / name
    if os.environ.get("Q2C_WRITE_GOLDEN"):
        path.write_bytes(encoded)
    assert encoded == path.read_bytes(), f"{name} changed: see {path}"


def command() -> SubscriptionRequested:
    cmd: SubscriptionRequested = golden_input(
        "subscription_requested.json", SubscriptionRequested
    )
    return cmd


def created_in_sandbox(cmd: SubscriptionRequested) -> Subscription:
    """What Stripe answers to the mapped request (the sandbox's rules)."""
    account = StripeAccount(clock=lambda: NOW, seed=0)
    customer = account.create_customer(
        decode_form(encode_form(customer_create_params(cmd.subscription.account)))
    )
    for item in cmd.subscription.items:
        account.create_product(decode_form(encode_form(product_params(item.sku))))
    params = decode_form(encode_form(subscription_params(cmd, customer.id)))
    return account.create_subscription(params, EventRequest(id="req_golden"))


def test_subscription_request_maps_to_the_pinned_stripe_request() -> None:
    """Items become inline prices; ids ride along as metadata."""
    params = subscription_params(command(), "cus_golden")
    assert_golden(
        "stripe_subscription_create_form.json", decode_form(encode_form(params))
    )


def test_stripe_subscription_is_pinned() -> None:
    """The sandbox's answer to that request, as the connector reads it."""
    assert_golden("stripe_subscription.json", created_in_sandbox(command()))


def test_items_survive_the_round_trip_through_stripe() -> None:
    """SKU, quantity, unit amount and interval come back unchanged."""
    cmd = command()
    native = golden_input("stripe_subscription.json", Subscription)
    assert canonical_items(native) == cmd.subscription.items
    assert canonical_items(created_in_sandbox(cmd)) == cmd.subscription.items


def test_subscription_created_is_pinned() -> None:
    """The canonical outcome: Stripe's id, status and per-period amount."""
    cmd = command()
    created = subscription_created(
        golden_input("stripe_subscription.json", Subscription), cmd
    )
    assert_golden("subscription_created.json", created)
    decoded = golden_input("subscription_created.json", SubscriptionCreated)
    assert decoded == created
    # 2 x 49.00 + 120.00 + 3 x 0.125 (0.375 rounds to 0.38) per period.
    assert str(created.amount_per_period) == "218.38 EUR"
    assert created.amount_per_period == cmd.subscription.amount_per_period


def test_invoice_paid_event_is_pinned() -> None:
    """A paid invoice of our subscription maps to ``billing.invoice.paid``."""
    event = golden_input("stripe_event_invoice_paid.json", Event)
    invoice = msgspec.json.decode(event.data.object, type=Invoice)
    paid = invoice_paid(invoice)
    assert paid is not None
    assert_golden("invoice_paid.json", paid)
    assert golden_input("invoice_paid.json", InvoicePaid) == paid
    assert str(paid.invoice.amount) == "218.00 EUR"
    assert paid.invoice.number == "SBX-0042"


def test_zero_decimal_and_fractional_amounts() -> None:
    """JPY has no minor unit; fractions of a cent travel as unit_amount_decimal."""
    base = command()
    items = (
        SubscriptionItem(
            sku="SEAT-PRO", quantity=Decimal(1), unit_amount=Decimal(5000)
        ),
        SubscriptionItem(
            sku="ARCHIVE-TB", quantity=Decimal(1), unit_amount=Decimal("0.005")
        ),
    )
    jpy = msgspec.structs.replace(base.subscription, currency="JPY", items=items[:1])
    params = decode_form(
        encode_form(
            subscription_params(msgspec.structs.replace(base, subscription=jpy), "cus")
        )
    )
    assert params["items"] == [
        {
            "price_data": {
                "currency": "jpy",
                "product": "q2c-sku-SEAT-PRO",
                "unit_amount": "5000",
                "recurring": {"interval": "month", "interval_count": "1"},
            },
            "quantity": "1",
        }
    ]
    usd = msgspec.structs.replace(base.subscription, currency="USD", items=items[1:])
    params = decode_form(
        encode_form(
            subscription_params(msgspec.structs.replace(base, subscription=usd), "cus")
        )
    )
    assert isinstance(params["items"], list)
    item = params["items"][0]
    assert isinstance(item, dict)
    assert item["price_data"] == {
        "currency": "usd",
        "product": "q2c-sku-ARCHIVE-TB",
        "unit_amount_decimal": "0.5",
        "recurring": {"interval": "month", "interval_count": "1"},
    }


@pytest.mark.parametrize(
    ("months", "interval", "count"),
    [(1, "month", "1"), (6, "month", "6"), (12, "year", "1"), (24, "year", "2")],
)
def test_intervals_in_months_become_stripe_intervals(
    months: int, interval: str, count: str
) -> None:
    """Whole years bill yearly; anything else monthly."""
    base = command()
    items = tuple(
        msgspec.structs.replace(i, interval_months=months)
        for i in base.subscription.items
    )
    sub = msgspec.structs.replace(base.subscription, items=items)
    cmd = msgspec.structs.replace(base, subscription=sub)
    params = decode_form(encode_form(subscription_params(cmd, "cus")))
    assert isinstance(params["items"], list)
    for item in params["items"]:
        assert isinstance(item, dict)
        price_data = item["price_data"]
        assert isinstance(price_data, dict)
        assert price_data["recurring"] == {
            "interval": interval,
            "interval_count": count,
        }
    assert canonical_items(created_in_sandbox(cmd)) == items


def test_items_on_different_intervals_are_refused() -> None:
    """One Stripe subscription bills every item on the same interval."""
    base = command()
    first, *rest = base.subscription.items
    items = (msgspec.structs.replace(first, interval_months=12), *rest)
    sub = msgspec.structs.replace(base.subscription, items=items)
    with pytest.raises(ValueError, match=r"every \[1, 12\] months"):
        subscription_params(msgspec.structs.replace(base, subscription=sub), "cus")


def test_fractional_quantities_are_refused() -> None:
    """Stripe quantities are whole; 1.5 seats is not rounded."""
    base = command()
    items = (
        SubscriptionItem(
            sku="SEAT-PRO", quantity=Decimal("1.5"), unit_amount=Decimal(1)
        ),
    )
    sub = msgspec.structs.replace(base.subscription, items=items)
    with pytest.raises(ValueError, match="not a whole number"):
        subscription_params(msgspec.structs.replace(base, subscription=sub), "cus")


def test_customer_is_created_with_the_account_id_only() -> None:
    """The create request never changes over the account's life."""
    account = command().subscription.account
    assert customer_create_params(account) == {"metadata": {META_ACCOUNT: account.id}}
    renamed = msgspec.structs.replace(account, name="Renamed AG")
    assert customer_create_params(renamed) == customer_create_params(account)


def test_customer_update_carries_only_what_differs() -> None:
    """Name and address are updated when they differ, and only then."""
    account = command().subscription.account
    bare = Customer(id="cus_1", metadata={META_ACCOUNT: account.id})
    update = customer_update_params(account, bare)
    assert_golden("stripe_customer_update_form.json", decode_form(encode_form(update)))
    address = account.billing_address
    assert address is not None
    current = Customer(
        id="cus_1",
        name=account.name,
        address=Address(
            line1=address.street,
            city=address.city,
            postal_code=address.postal_code,
            state=address.region,
            country=address.country,
        ),
    )
    assert customer_update_params(account, current) == {}
    moved = msgspec.structs.replace(
        current, address=Address(city="Berlin", country="DE")
    )
    assert set(customer_update_params(account, moved)) == {"address"}


def test_product_ids_carry_the_sku() -> None:
    """``q2c-sku-<SKU>`` and back; foreign products have no SKU."""
    assert product_params("SEAT-PRO")["id"] == "q2c-sku-SEAT-PRO"
    assert sku_of_product("q2c-sku-SEAT-PRO") == "SEAT-PRO"
    assert sku_of_product("prod_QXg1hqf4jFNsqG") is None


def test_foreign_subscriptions_cannot_be_read_back() -> None:
    """A subscription on someone else's products is not ours to map."""
    native = golden_input("stripe_subscription.json", Subscription)
    item = native.items.data[0]
    foreign = msgspec.structs.replace(
        item, price=msgspec.structs.replace(item.price, product="prod_other")
    )
    with pytest.raises(ValueError, match="not one the broker created"):
        canonical_items(
            msgspec.structs.replace(
                native, items=msgspec.structs.replace(native.items, data=(foreign,))
            )
        )
    assert amount_per_period(native).currency == "EUR"


def with_unit_amount_decimal(native: Subscription, text: str) -> Subscription:
    item = native.items.data[0]
    price = msgspec.structs.replace(item.price, unit_amount_decimal=text)
    bad = msgspec.structs.replace(item, price=price)
    items = msgspec.structs.replace(native.items, data=(bad, *native.items.data[1:]))
    return msgspec.structs.replace(native, items=items)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("abc", "'abc' is not a decimal number"),
        ("NaN", "NaN is not a finite number"),
        ("1e999999", r"1E\+999999 is out of range"),  # was ~40 s of CPU
    ],
)
def test_an_absurd_unit_amount_decimal_is_refused_before_any_arithmetic(
    text: str, reason: str
) -> None:
    """A ValueError naming the price and field (the connector's SchemaInvalid)."""
    native = golden_input("stripe_subscription.json", Subscription)
    price_id = native.items.data[0].price.id
    with pytest.raises(ValueError, match=f"price {price_id}: unit_amount_decimal "):
        amount_per_period(with_unit_amount_decimal(native, text))
    with pytest.raises(ValueError, match=reason):
        subscription_created(with_unit_amount_decimal(native, text), command())


def test_field_map_renders_every_line() -> None:
    """The field map prints as a table with one row per mapping."""
    table = render("billing (Stripe)", FIELD_MAP)
    lines = table.splitlines()
    assert lines[0] == "billing (Stripe)"
    assert len(lines) == 4 + len(FIELD_MAP)
    for mapping in FIELD_MAP:
        assert mapping.native in table
