"""The sandbox's webhooks end to end: signed, retried, duplicated, verified."""

from __future__ import annotations

import time
from collections import Counter

import msgspec
import pytest

from adapters.billing import StripeClient, StripeSandbox, StripeWebhook
from adapters.billing.signature import HEADER
from tests.adapters.billing.conftest import Receiver
from tests.polling import eventually

pytestmark = pytest.mark.anyio


async def subscribe(client: StripeClient, key: str = "sub-1") -> str:
    """Create a customer, a product and a subscription; return its id."""
    customer = await client.create_customer(
        idempotency_key=f"{key}-cus", params={"name": "Acme"}
    )
    await client.create_product(
        idempotency_key=f"{key}-prod", params={"id": f"prod-{key}", "name": "Seat"}
    )
    sub = await client.create_subscription(
        idempotency_key=key,
        params={
            "customer": customer.id,
            "items": [
                {
                    "price_data": {
                        "currency": "eur",
                        "product": f"prod-{key}",
                        "unit_amount": 1250,
                        "recurring": {"interval": "month"},
                    },
                    "quantity": 3,
                }
            ],
            "metadata": {"q2c_deal_id": "deal-1", "q2c_order_id": "order-1"},
        },
    )
    return sub.id


async def delivered(receiver: Receiver, n: int) -> None:
    async def enough() -> bool:
        return len(receiver.accepted) >= n

    await eventually(enough)


async def test_subscription_events_arrive_signed(
    sandbox: StripeSandbox, client: StripeClient, receiver: Receiver
) -> None:
    """Creation, finalization and payment are each POSTed with a valid signature."""
    sandbox.webhook.url = receiver.url
    sandbox.webhook.secrets = ["whsec_endpoint"]
    await subscribe(client)
    await delivered(receiver, 3)
    assert sorted(receiver.event_types()) == [
        "customer.subscription.created",
        "invoice.finalized",
        "invoice.paid",
    ]
    hook = StripeWebhook(["whsec_endpoint"])
    for headers, body in receiver.accepted:
        assert headers["Content-Type"].startswith("application/json")
        hook.verify(headers, body, now=time.time())
        event = msgspec.json.decode(body)
        assert event["object"] == "event"
        assert event["id"].startswith("evt_")
        assert event["pending_webhooks"] == 1
        assert event["request"]["idempotency_key"] == "sub-1"


async def test_invoice_paid_webhook_parses_to_the_canonical_event(
    sandbox: StripeSandbox, client: StripeClient, receiver: Receiver
) -> None:
    """The paid invoice finds its deal through the subscription's metadata."""
    sandbox.webhook.url = receiver.url
    sub_id = await subscribe(client)
    await delivered(receiver, 3)
    hook = StripeWebhook(sandbox.webhook.secrets)
    inbound = [i for h, b in receiver.accepted for i in hook.parse(h, b)]
    assert len(inbound) == 1
    paid = inbound[0].event
    assert paid.deal_id == "deal-1"
    assert paid.invoice.order_id == "order-1"
    assert str(paid.invoice.amount) == "37.50 EUR"
    assert sandbox.account.invoices[paid.native_id].subscription_id == sub_id


async def test_rotation_signs_with_both_secrets(
    sandbox: StripeSandbox, client: StripeClient, receiver: Receiver
) -> None:
    """Mid-rotation, receivers holding either secret accept the delivery."""
    sandbox.webhook.url = receiver.url
    sandbox.webhook.secrets = ["whsec_new", "whsec_old"]
    await subscribe(client)
    await delivered(receiver, 3)
    for headers, body in receiver.accepted:
        assert headers[HEADER].count("v1=") == 2
        for secrets in (["whsec_old"], ["whsec_new"], ["whsec_new", "whsec_old"]):
            StripeWebhook(secrets).verify(headers, body, now=time.time())


async def test_failed_deliveries_are_retried_until_accepted(
    sandbox: StripeSandbox, client: StripeClient, receiver: Receiver
) -> None:
    """Non-2xx answers are retried with back-off; nothing is lost."""
    sandbox.webhook.url = receiver.url
    sandbox.webhook.backoff_s = 0.01
    receiver.fail_first = 4
    await subscribe(client)
    await delivered(receiver, 3)
    assert sandbox.counts["webhook_attempts_failed"] == 4
    assert sandbox.counts["webhooks_delivered"] == 3
    assert sorted(receiver.event_types()) == [
        "customer.subscription.created",
        "invoice.finalized",
        "invoice.paid",
    ]


async def test_deliveries_give_up_after_max_attempts(
    sandbox: StripeSandbox, client: StripeClient, receiver: Receiver
) -> None:
    """Retries are bounded; the give-up is counted."""
    sandbox.webhook.url = receiver.url
    sandbox.webhook.backoff_s = 0.01
    sandbox.webhook.max_attempts = 2
    receiver.fail_first = 1000
    await subscribe(client)

    async def gave_up() -> bool:
        return sandbox.counts["webhooks_gave_up"] == 3

    await eventually(gave_up)
    assert len(receiver.requests) == 6
    assert sandbox.counts["webhooks_delivered"] == 0


async def test_duplicate_rate_delivers_events_twice_with_the_same_id(
    sandbox: StripeSandbox, client: StripeClient, receiver: Receiver
) -> None:
    """At-least-once: a duplicate keeps its event id (the dedupe key)."""
    sandbox.webhook.url = receiver.url
    sandbox.knobs.duplicate_rate = 1.0
    await subscribe(client)
    await delivered(receiver, 6)
    ids = Counter(msgspec.json.decode(body)["id"] for _, body in receiver.accepted)
    assert len(ids) == 3
    assert set(ids.values()) == {2}
    assert sandbox.counts["webhook_duplicates_sent"] == 3


async def test_no_webhook_url_means_no_delivery(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Events are still recorded (and retrievable) without an endpoint."""
    await subscribe(client)
    assert len(sandbox.account.events) == 3
    event_id = next(iter(sandbox.account.events))
    event = await client.retrieve_event(event_id)
    assert event.pending_webhooks == 0
    assert sandbox.counts["webhooks_delivered"] == 0
