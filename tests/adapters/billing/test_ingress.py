"""StripeWebhook: verification with the configured secrets, parsing to events."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.billing import SOURCE, StripeWebhook
from adapters.billing.signature import sign
from broker.errors import ConfigError, SchemaInvalid, SignatureInvalid
from canonical.q2c import InvoicePaid

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "billing"
SECRET = "whsec_test"
NOW = 1_767_225_600


def invoice_paid_body() -> bytes:
    return (GOLDEN / "stripe_event_invoice_paid.json").read_bytes()


def with_object(event_type: str, obj: dict[str, Any]) -> bytes:
    event = msgspec.json.decode(invoice_paid_body())
    event["type"] = event_type
    event["data"]["object"] = obj
    return msgspec.json.encode(event)


def test_verify_accepts_the_signature_in_any_header_case() -> None:
    """Header names are case-insensitive."""
    body = invoice_paid_body()
    hook = StripeWebhook([SECRET])
    for name in ("Stripe-Signature", "stripe-signature", "STRIPE-SIGNATURE"):
        hook.verify({name: sign(body, SECRET, NOW)}, body, now=NOW)


def test_verify_refuses_a_missing_or_wrong_signature() -> None:
    """No header, or another secret: SignatureInvalid."""
    body = invoice_paid_body()
    hook = StripeWebhook([SECRET])
    with pytest.raises(SignatureInvalid, match="missing"):
        hook.verify({}, body, now=NOW)
    with pytest.raises(SignatureInvalid, match="no v1 signature matches"):
        hook.verify({"Stripe-Signature": sign(body, "whsec_x", NOW)}, body, now=NOW)


def test_verify_honours_the_configured_tolerance() -> None:
    """The tolerance is the webhook source's setting."""
    body = invoice_paid_body()
    header = {"Stripe-Signature": sign(body, SECRET, NOW)}
    StripeWebhook([SECRET]).verify(header, body, now=NOW + 200)
    with pytest.raises(SignatureInvalid, match="old"):
        StripeWebhook([SECRET], tolerance_s=60).verify(header, body, now=NOW + 200)


def test_a_source_without_secrets_is_a_configuration_error() -> None:
    """An endpoint that cannot verify anything must not start."""
    with pytest.raises(ConfigError, match="no webhook signing secret"):
        StripeWebhook([])
    with pytest.raises(ConfigError):
        StripeWebhook([""])


def test_invoice_paid_of_our_subscription_becomes_billing_invoice_paid() -> None:
    """The deal comes from the subscription metadata copied onto the invoice."""
    (inbound,) = StripeWebhook([SECRET]).parse({}, invoice_paid_body())
    assert isinstance(inbound.event, InvoicePaid)
    assert inbound.id == "evt_1QbSandboxInvoicePaid"
    assert inbound.source == SOURCE
    assert inbound.correlation_id == "deal-0061x00000AbCdE"
    assert inbound.idempotency_key == "billing.invoice.paid:in_1QbSandboxInvoice01"
    assert inbound.subject == "invoice-in_1QbSandboxInvoice01"


def test_a_redelivered_event_parses_the_same() -> None:
    """Duplicates are left to the dedupe on the event id: same id, same key."""
    hook = StripeWebhook([SECRET])
    assert hook.parse({}, invoice_paid_body()) == hook.parse({}, invoice_paid_body())


def test_invoices_of_foreign_subscriptions_need_nothing() -> None:
    """An invoice with no deal in its metadata parses to no events."""
    event = msgspec.json.decode(invoice_paid_body())
    event["data"]["object"]["parent"]["subscription_details"]["metadata"] = {}
    assert StripeWebhook([SECRET]).parse({}, msgspec.json.encode(event)) == []


@pytest.mark.parametrize(
    "event_type",
    ["customer.subscription.created", "invoice.finalized", "plan.created", "x.y"],
)
def test_other_event_types_need_nothing(event_type: str) -> None:
    """Echoes of our own writes and types we do not follow parse to []."""
    event = msgspec.json.decode(invoice_paid_body())
    event["type"] = event_type
    assert StripeWebhook([SECRET]).parse({}, msgspec.json.encode(event)) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not a Stripe event"),
        (b'{"id": "evt_1"}', "not a Stripe event"),
        (
            b'{"id": "x", "object": "invoice", "created": 1, "type": "invoice.paid",'
            b' "data": {"object": {}}}',
            "not 'event'",
        ),
    ],
)
def test_payloads_that_are_not_stripe_events_are_schema_invalid(
    body: bytes, reason: str
) -> None:
    """What Stripe would never send is refused."""
    with pytest.raises(SchemaInvalid, match=reason):
        StripeWebhook([SECRET]).parse({}, body)


def test_json_nested_too_deep_is_schema_invalid() -> None:
    """~2 KB nested 1,000 deep makes msgspec recurse out: refused, not a 500."""
    deep = b"[" * 1000 + b"]" * 1000
    body = (
        b'{"id": "evt_1", "object": "event", "created": 1, "type": "invoice.paid",'
        b' "data": {"object": ' + deep + b"}}"
    )
    with pytest.raises(SchemaInvalid, match="not a Stripe event: maximum recursion"):
        StripeWebhook([SECRET]).parse({}, body)


@pytest.mark.parametrize("stamp", [2**62, 10**20, 253402300800, -1])
def test_a_finalized_at_no_datetime_holds_is_schema_invalid(stamp: int) -> None:
    """Past year 9999 (OSError, OverflowError once converted): refused by name."""
    event = msgspec.json.decode(invoice_paid_body())
    event["data"]["object"]["status_transitions"] = {"finalized_at": stamp}
    with pytest.raises(SchemaInvalid, match=r"status_transitions\.finalized_at"):
        StripeWebhook([SECRET]).parse({}, msgspec.json.encode(event))


def test_invoice_paid_must_carry_an_invoice() -> None:
    """An ``invoice.paid`` whose object is a customer is refused."""
    with pytest.raises(SchemaInvalid, match="invoice"):
        StripeWebhook([SECRET]).parse(
            {}, with_object("invoice.paid", {"object": "customer", "id": "cus_1"})
        )
    with pytest.raises(SchemaInvalid, match="not an invoice"):
        StripeWebhook([SECRET]).parse(
            {},
            with_object(
                "invoice.paid", {"object": "charge", "id": "ch_1", "currency": "usd"}
            ),
        )


def test_an_invoice_with_an_unknown_currency_is_schema_invalid() -> None:
    """Canonical money refuses a non-ISO currency; the event is refused."""
    event = msgspec.json.decode(invoice_paid_body())
    event["data"]["object"]["currency"] = "xyz"
    with pytest.raises(SchemaInvalid, match="ISO 4217"):
        StripeWebhook([SECRET]).parse({}, msgspec.json.encode(event))
