"""Conformance with Stripe's own published fixtures (``../shared/payloads``).

The files are Stripe's OpenAPI fixtures for an Event, an Invoice and a
Subscription. Values are machine-generated, so no business rule is asserted
on them; what is checked is that the views read them, field for field, with
Stripe's spelling, and that the broker's readers treat them sanely.
Skipped when the corpus folder is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.billing import StripeWebhook
from adapters.billing.mapping import amount_per_period, canonical_items, invoice_paid
from adapters.billing.signature import sign
from adapters.billing.views import (
    Event,
    EventRequest,
    Invoice,
    Subscription,
    canonical_currency,
    event_object,
    from_minor,
)

PAYLOADS = Path(__file__).resolve().parents[2] / ".." / "shared" / "payloads"

pytestmark = pytest.mark.skipif(
    not PAYLOADS.is_dir(), reason="shared payload corpus not present"
)


def load(name: str) -> tuple[bytes, Any]:
    raw = (PAYLOADS / name).read_bytes()
    return raw, msgspec.json.decode(raw)


def matched_fields(view: Any, raw: Any, path: str = "$") -> int:
    """Compare every view field present in *raw*; return how many matched.

    Nested views recurse; lists compare member by member; a field the file
    does not have keeps its default and is not counted.
    """
    if isinstance(view, msgspec.Struct):
        assert isinstance(raw, dict), path
        count = 0
        for name in view.__struct_fields__:
            if name in raw:
                count += 1 + matched_fields(
                    getattr(view, name), raw[name], f"{path}.{name}"
                )
        return count
    if isinstance(view, tuple | list):
        assert isinstance(raw, list), path
        assert len(view) == len(raw), path
        return sum(
            matched_fields(v, r, f"{path}[{i}]")
            for i, (v, r) in enumerate(zip(view, raw, strict=True))
        )
    if isinstance(view, msgspec.Raw):
        assert msgspec.json.decode(view) == raw, path
        return 0
    assert view == raw, path
    return 0


def test_event_fixture_reads_as_an_event_envelope() -> None:
    """Every envelope field the view declares is read with Stripe's spelling."""
    body, raw = load("stripe_event_fixture.json")
    event = msgspec.json.decode(body, type=Event)
    assert matched_fields(event, raw) >= 10
    assert event.id.startswith("evt_")
    assert event.object == "event"
    assert isinstance(event.request, EventRequest)
    assert event.request.idempotency_key == raw["request"]["idempotency_key"]


def test_event_fixture_object_kind_is_not_one_we_map() -> None:
    """``plan`` objects are outside the views; the event still parses."""
    body, raw = load("stripe_event_fixture.json")
    assert raw["data"]["object"]["object"] == "plan"
    assert event_object(msgspec.json.decode(body, type=Event)) is None


def test_event_fixture_through_the_webhook_source() -> None:
    """Signed over its raw bytes it verifies; its type needs no canonical event."""
    body, raw = load("stripe_event_fixture.json")
    hook = StripeWebhook(["whsec_conformance"])
    now = raw["created"]
    hook.verify(
        {"Stripe-Signature": sign(body, "whsec_conformance", now)}, body, now=now
    )
    assert hook.parse({}, body) == []


def test_invoice_fixture_reads_field_for_field() -> None:
    """Amounts are integers in minor units; the subscription link is under parent."""
    body, raw = load("stripe_invoice_fixture.json")
    invoice = msgspec.json.decode(body, type=Invoice)
    assert matched_fields(invoice, raw) >= 30
    assert (
        invoice.subscription_id == raw["parent"]["subscription_details"]["subscription"]
    )
    for name in ("amount_due", "amount_paid", "amount_remaining", "subtotal", "total"):
        assert isinstance(raw[name], int)
    assert from_minor(invoice.amount_due, invoice.currency) * 100 == raw["amount_due"]
    assert canonical_currency(invoice.currency) == raw["currency"].upper()
    line = invoice.lines.data[0]
    assert line.object == "line_item"
    assert line.parent is not None
    assert line.parent.type == raw["lines"]["data"][0]["parent"]["type"]


def test_invoice_fixture_is_not_one_of_ours() -> None:
    """No deal metadata: as an ``invoice.paid`` it maps to nothing, no crash."""
    body, _ = load("stripe_invoice_fixture.json")
    invoice = msgspec.json.decode(body, type=Invoice)
    assert invoice_paid(invoice) is None
    _, event_raw = load("stripe_event_fixture.json")
    event_raw["type"] = "invoice.paid"
    event_raw["data"]["object"] = msgspec.json.decode(body)
    assert StripeWebhook(["whsec_x"]).parse({}, msgspec.json.encode(event_raw)) == []


def test_subscription_fixture_reads_field_for_field() -> None:
    """Items embed their price; billing periods sit on the items."""
    body, raw = load("stripe_subscription_fixture.json")
    sub = msgspec.json.decode(body, type=Subscription)
    assert matched_fields(sub, raw) >= 30
    item, raw_item = sub.items.data[0], raw["items"]["data"][0]
    assert item.current_period_start == raw_item["current_period_start"]
    assert item.price.recurring is not None
    assert item.price.recurring.interval == raw_item["price"]["recurring"]["interval"]
    assert sub.customer_id == raw["customer"]


def test_subscription_fixture_amount_and_foreign_products() -> None:
    """Per-period amount is quantity times unit amount; the product is not ours."""
    body, raw = load("stripe_subscription_fixture.json")
    sub = msgspec.json.decode(body, type=Subscription)
    expected_minor = sum(
        i["price"]["unit_amount"] * i["quantity"] for i in raw["items"]["data"]
    )
    assert amount_per_period(sub).amount == from_minor(expected_minor, sub.currency)
    with pytest.raises(ValueError, match="not one the broker created"):
        canonical_items(sub)
