"""Stripe views: money in minor units, tolerant decoding, event objects."""

from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.billing.views import (
    Customer,
    ErrorBody,
    Event,
    Invoice,
    Subscription,
    canonical_currency,
    event_object,
    from_minor,
    from_minor_decimal,
    minor_unit_exponent,
    to_minor,
    wire_currency,
)


@pytest.mark.parametrize(
    ("amount", "currency", "minor"),
    [
        ("10.50", "USD", 1050),
        ("0.01", "eur", 1),
        ("500", "JPY", 500),
        ("1200", "krw", 1200),
        ("5.124", "KWD", 5124),
        ("5", "ISK", 500),
        ("10", "HUF", 1000),
        ("0", "USD", 0),
    ],
)
def test_major_to_minor_units_per_currency(
    amount: str, currency: str, minor: int
) -> None:
    """Zero-, two- and three-decimal currencies use Stripe's own exponents."""
    assert to_minor(Decimal(amount), currency) == minor
    assert from_minor(minor, currency) == Decimal(amount)


def test_from_minor_keeps_the_currency_scale() -> None:
    """1050 cents read back as 10.50, not 10.5."""
    assert str(from_minor(1050, "usd")) == "10.50"
    assert str(from_minor(500, "jpy")) == "500"
    assert str(from_minor(5120, "kwd")) == "5.120"


@pytest.mark.parametrize(
    ("amount", "currency", "reason"),
    [
        ("10.505", "USD", "finer than the currency's minor unit"),
        ("500.5", "JPY", "finer than the currency's minor unit"),
        ("5.50", "ISK", "whole units only"),
        ("NaN", "USD", "not finite"),
    ],
)
def test_amounts_are_never_rounded(amount: str, currency: str, reason: str) -> None:
    """An amount Stripe cannot hold exactly is refused, not rounded."""
    with pytest.raises(ValueError, match=reason):
        to_minor(Decimal(amount), currency)


@given(
    minor=st.integers(min_value=-(10**12), max_value=10**12),
    currency=st.sampled_from(["usd", "jpy", "kwd", "isk", "eur", "clp", "bhd"]),
)
def test_minor_units_round_trip(minor: int, currency: str) -> None:
    """Minor → major → minor units is the identity (ISK: whole krónur only)."""
    if currency == "isk":
        minor -= minor % 100
    assert to_minor(from_minor(minor, currency), currency) == minor


def test_decimal_minor_amounts_keep_fractions_of_a_cent() -> None:
    """``unit_amount_decimal`` is in minor units and may hold fractions."""
    assert from_minor_decimal("1050.5", "usd") == Decimal("10.505")
    with pytest.raises(ValueError, match="not a decimal"):
        from_minor_decimal("ten", "usd")


def test_currency_codes_are_lower_case_on_the_wire() -> None:
    """Stripe wants ``usd``; the canonical model says ``USD``."""
    assert wire_currency("USD") == "usd"
    assert canonical_currency("jpy") == "JPY"
    assert minor_unit_exponent("JPY") == minor_unit_exponent("jpy") == 0
    with pytest.raises(ValueError, match="three-letter"):
        wire_currency("US")


def test_unknown_fields_are_ignored_and_missing_optionals_default() -> None:
    """Views are tolerant readers."""
    customer = msgspec.json.decode(
        b'{"id": "cus_1", "object": "customer", "shiny_new_field": {"x": 1}}',
        type=Customer,
    )
    assert customer.id == "cus_1"
    assert customer.email is None
    assert customer.metadata == {}


def invoice_json(**members: object) -> bytes:
    return msgspec.json.encode({"id": "in_1", "currency": "usd", **members})


def test_invoice_subscription_link_under_parent() -> None:
    """Current versions put the subscription under ``parent``, with metadata."""
    invoice = msgspec.json.decode(
        invoice_json(
            parent={
                "type": "subscription_details",
                "subscription_details": {
                    "subscription": "sub_1",
                    "metadata": {"q2c_deal_id": "deal-1"},
                },
            }
        ),
        type=Invoice,
    )
    assert invoice.subscription_id == "sub_1"
    assert invoice.subscription_metadata == {"q2c_deal_id": "deal-1"}


def test_invoice_subscription_link_of_older_versions() -> None:
    """Before 2025-03-31 the link was the top-level ``subscription``."""
    invoice = msgspec.json.decode(invoice_json(subscription="sub_old"), type=Invoice)
    assert invoice.subscription_id == "sub_old"
    assert invoice.subscription_metadata == {}


def test_expanded_customer_on_a_subscription() -> None:
    """``customer`` may be an id or an expanded object."""
    raw = {"id": "sub_1", "status": "active", "currency": "usd"}
    plain = msgspec.convert({**raw, "customer": "cus_1"}, Subscription)
    expanded = msgspec.convert({**raw, "customer": {"id": "cus_1"}}, Subscription)
    assert plain.customer_id == expanded.customer_id == "cus_1"


def event_json(obj: dict[str, object], **members: object) -> bytes:
    return msgspec.json.encode(
        {
            "id": "evt_1",
            "object": "event",
            "created": 1,
            "type": "x.y",
            "data": {"object": obj},
            **members,
        }
    )


def test_event_object_is_decoded_by_its_kind() -> None:
    """``data.object`` decodes to the view its ``object`` names."""
    event = msgspec.json.decode(
        event_json({"object": "invoice", "id": "in_1", "currency": "usd"}), type=Event
    )
    assert isinstance(event_object(event), Invoice)
    plan = msgspec.json.decode(event_json({"object": "plan", "id": "p"}), type=Event)
    assert event_object(plan) is None


def test_legacy_event_request_is_a_string() -> None:
    """Old API versions sent ``request`` as a bare id."""
    event = msgspec.json.decode(event_json({}, request="req_1"), type=Event)
    assert event.request == "req_1"


def test_error_body_decodes() -> None:
    """Every error is ``{"error": {type, code, message, param, …}}``."""
    body = msgspec.json.decode(
        b'{"error": {"type": "invalid_request_error", "code": "resource_missing",'
        b' "message": "No such customer", "param": "customer"}}',
        type=ErrorBody,
    )
    assert (body.error.code, body.error.param) == ("resource_missing", "customer")
    assert body.error.doc_url is None
