"""SapEventWebhook: signatures, and SAP's business events as canonical events."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from adapters import signing as signature
from adapters.erp_cloud import (
    MappingOptions,
    SalesArea,
    SapClient,
    SapConnector,
    SapEventWebhook,
    SapSandbox,
)
from broker.connector import Inbound
from broker.errors import SchemaInvalid, SignatureInvalid
from canonical.q2c import InvoiceIssued, OrderBooked, ShipmentDispatched
from canonical.scalars import Money
from tests.adapters.erp_cloud.samples import booking, order

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "erp_cloud"
SECRET = "event-mesh-secret"
T = 1_741_165_200


def golden(name: str) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode((GOLDEN / name).read_bytes())
    return decoded


def body_of(event: dict[str, Any]) -> bytes:
    return msgspec.json.encode(event)


def signed(body: bytes, *secrets: str, at: int = T) -> dict[str, str]:
    return {"x-q2c-signature": signature.sign(secrets or (SECRET,), body, timestamp=at)}


# --- verify -----------------------------------------------------------------------


def test_a_signed_delivery_verifies_with_the_header_in_any_case() -> None:
    """Header names are case-insensitive; the tolerance is 300 s."""
    hook = SapEventWebhook([SECRET])
    body = b"{}"
    hook.verify(
        {"X-Q2C-Signature": signature.sign([SECRET], body, timestamp=T)},
        body,
        now=T + 300,
    )
    hook.verify(signed(body), body, now=T - 300)


def test_rotation_accepts_old_and_new_secrets() -> None:
    """A webhook holding both secrets accepts a delivery signed with either."""
    hook = SapEventWebhook(["new", "old"])
    hook.verify(signed(b"x", "old"), b"x", now=T)
    hook.verify(signed(b"x", "new"), b"x", now=T)


@pytest.mark.parametrize(
    ("headers", "now", "reason"),
    [
        ({}, T, "missing"),
        (signed(b"{}", "wrong"), T, "does not match"),
        (signed(b"{}"), T + 301, "replayed"),
    ],
    ids=["missing", "wrong-secret", "stale"],
)
def test_bad_signatures_are_refused(
    headers: dict[str, str], now: float, reason: str
) -> None:
    """No header, another secret, or too old: SignatureInvalid naming the system."""
    with pytest.raises(SignatureInvalid, match=f"erp_cloud: .*{reason}"):
        SapEventWebhook([SECRET]).verify(headers, b"{}", now=now)


def test_a_webhook_needs_a_secret() -> None:
    """Unsigned deliveries are never accepted."""
    with pytest.raises(ValueError, match="secret"):
        SapEventWebhook([])
    with pytest.raises(ValueError, match="none empty"):
        SapEventWebhook(["new", ""])  # "" would verify a body signed with ""


# --- parse ------------------------------------------------------------------------


def test_a_delivery_event_becomes_shipment_dispatched() -> None:
    """OutboundDelivery.Created → erp.shipment.dispatched, keyed on the delivery."""
    event = golden("event_outbound_delivery_created.json")
    (inbound,) = SapEventWebhook([SECRET]).parse({}, body_of(event))
    assert isinstance(inbound, Inbound)
    assert isinstance(inbound.event, ShipmentDispatched)
    assert (inbound.id, inbound.source) == (event["id"], "/default/sap.s4.beh/S4H")
    assert inbound.correlation_id == "deal-006Hn00000A1b2cIAB"
    assert inbound.idempotency_key == "erp_cloud:outbound-delivery:80000001"
    assert inbound.subject == "shipment-cloud-80000001"
    assert [(line.sku, line.quantity) for line in inbound.event.shipment.lines] == [
        ("HW-GATEWAY-200", Decimal(4)),
        ("HW-MOUNT-KIT", Decimal(4)),
    ]


def test_a_billing_event_becomes_invoice_issued_with_its_trace() -> None:
    """BillingDocument.Created → erp.invoice.issued; traceparent passes through."""
    event = golden("event_billing_document_created.json")
    (inbound,) = SapEventWebhook([SECRET]).parse({}, body_of(event))
    assert isinstance(inbound.event, InvoiceIssued)
    assert inbound.event.invoice.amount.amount == Decimal("5471.00")
    assert inbound.event.invoice.order_id == "order-006Hn00000A1b2cIAB"
    assert inbound.idempotency_key == "erp_cloud:billing-document:90000002"
    assert inbound.traceparent == event["traceparent"]


def order_created(**data: Any) -> dict[str, Any]:
    """A SalesOrder.Created event of the deal's order, as the sandbox sends it."""
    event = golden("event_billing_document_created.json")
    event["type"] = "sap.s4.beh.salesorder.v1.SalesOrder.Created.v1"
    event["data"] = {
        "SalesOrder": "4711",
        "SalesOrganization": "1010",
        "SoldToParty": "1000001",
        "PurchaseOrderByCustomer": "Q2C-006Hn00000A1b2cIAB",
        "TotalNetAmount": "5471.00",
        "TransactionCurrency": "EUR",
        "OverallSDProcessStatus": "A",
        "EventRaisedDateTime": "2025-03-05T08:59:59Z",
    } | data
    return event


def test_an_order_created_with_our_reference_is_booked_for_its_deal() -> None:
    """SalesOrder.Created → erp.order.booked: number, status, total; keyed on it.

    A clerk keyed the deal's refused order in SAP by hand: the deal resumes
    from it. The number is SAP's external form, as the create answers it.
    """
    event = order_created(SalesOrder="0000004711")
    (inbound,) = SapEventWebhook([SECRET]).parse({}, body_of(event))
    booked = inbound.event
    assert isinstance(booked, OrderBooked)
    assert (booked.order_id, booked.deal_id, booked.erp) == (
        "order-006Hn00000A1b2cIAB",
        "deal-006Hn00000A1b2cIAB",
        "cloud",
    )
    assert (booked.erp_order_id, booked.status) == ("4711", "open")
    assert booked.net_total == Money(amount=Decimal("5471.00"), currency="EUR")
    assert booked.customer_ref == "Q2C-006Hn00000A1b2cIAB"
    assert booked.warnings == ()
    assert inbound.correlation_id == "deal-006Hn00000A1b2cIAB"
    assert inbound.idempotency_key == "erp_cloud:order.booked:4711"
    assert inbound.subject == "order-006Hn00000A1b2cIAB"
    assert inbound.time == datetime(2025, 3, 5, 9, tzinfo=UTC)
    assert (inbound.id, inbound.traceparent) == (event["id"], event["traceparent"])


@pytest.mark.parametrize(
    "change",
    [
        {
            "data": {
                "BillingDocument": "9",
                "PurchaseOrderByCustomer": "Holger Bruchelt",
            }
        },
        {"type": "sap.s4.beh.businesspartner.v1.BusinessPartner.Changed.v1"},
        {
            "type": "sap.s4.beh.salesorder.v1.SalesOrder.Created.v1",
            "data": {"SalesOrder": "4711", "PurchaseOrderByCustomer": "PO-77"},
        },
    ],
    ids=["not-our-reference", "unused-topic", "order-keyed-for-another-po"],
)
def test_events_no_deal_waits_for_parse_to_nothing(change: dict[str, Any]) -> None:
    """Documents without a Q2C reference, and topics the broker does not use."""
    event = golden("event_billing_document_created.json") | change
    assert SapEventWebhook([SECRET]).parse({}, body_of(event)) == []


def test_an_order_event_without_its_total_is_dropped_not_refused() -> None:
    """It cannot stand as a booking; for our own orders it is only the echo.

    Refused, it would dead-letter the echo of every order from a tenant
    whose events leave the total out.
    """
    body = body_of(
        golden("event_billing_document_created.json")
        | {
            "type": "sap.s4.beh.salesorder.v1.SalesOrder.Created.v1",
            "data": {"SalesOrder": "4711", "PurchaseOrderByCustomer": "Q2C-1"},
        }
    )
    with capture_logs() as logs:
        assert SapEventWebhook([SECRET]).parse({}, body) == []
    assert [e["event"] for e in logs] == ["sales_order_event_without_total"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not a JSON object"),
        (
            body_of(
                {"specversion": "1.0", "id": "1", "source": "/x", "type": "com.acme.x"}
            ),
            "not an SAP",
        ),
        (
            body_of(
                golden("event_billing_document_created.json")
                | {"data": {"BillingDocument": 9}}
            ),
            "BillingDocumentEventData",
        ),
        (
            body_of(
                golden("event_billing_document_created.json")
                | {
                    "data": {
                        "BillingDocument": "9",
                        "PurchaseOrderByCustomer": "Q2C-1",
                    }
                }
            ),
            "no amount",
        ),
        (
            body_of(
                golden("event_outbound_delivery_created.json")
                | {
                    "data": {
                        "OutboundDelivery": "8",
                        "PurchaseOrderByCustomer": "Q2C-1",
                        "Items": [
                            {"Material": "lower case", "ActualDeliveryQuantity": "1"}
                        ],
                    }
                }
            ),
            "does not fit ShipmentDispatched",
        ),
    ],
    ids=[
        "garbage",
        "foreign-type",
        "bad-data",
        "no-amount",
        "bad-sku",
    ],
)
def test_what_sap_does_not_send_is_schema_invalid(body: bytes, reason: str) -> None:
    """Not a CloudEvent, not SAP's, or data the canonical model refuses."""
    with pytest.raises(SchemaInvalid, match=reason):
        SapEventWebhook([SECRET]).parse({}, body)


@pytest.mark.parametrize(
    ("quantity", "reason"),
    [
        ("0", "quantity 0 is not positive"),
        ("-1", "quantity -1 is not positive"),
        ("NaN", "NaN is not finite"),
        ("1e999999", "1e15 or more"),
    ],
)
def test_a_delivered_quantity_the_model_refuses_is_schema_invalid(
    quantity: str, reason: str
) -> None:
    """Refused naming the delivery, item and field (a 400, not a 500)."""
    event = golden("event_outbound_delivery_created.json")
    event["data"]["Items"][0]["ActualDeliveryQuantity"] = quantity
    with pytest.raises(
        SchemaInvalid,
        match=f"erp_cloud: outbound delivery 80000001 item HW-GATEWAY-200: "
        f"ActualDeliveryQuantity: .*{reason}",
    ):
        SapEventWebhook([SECRET]).parse({}, body_of(event))


# --- end to end -------------------------------------------------------------------


class Webhook:
    """The broker's side: verify then parse every delivery, as the ingress does."""

    def __init__(self, hook: SapEventWebhook) -> None:
        self.hook = hook
        self.send, self.received = anyio.create_memory_object_stream[Inbound](10)
        self.app = web.Application()
        self.app.router.add_post("/webhooks/erp_cloud", self._post)

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.hook.verify(dict(request.headers), body, now=time.time())
        for inbound in self.hook.parse(dict(request.headers), body):
            await self.send.send(inbound)
        return web.Response(status=202)


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[Webhook, str]]:
    hook = Webhook(SapEventWebhook(["old-secret", SECRET]))
    runner = web.AppRunner(hook.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield hook, f"http://127.0.0.1:{runner.addresses[0][1]}/webhooks/erp_cloud"
    finally:
        await runner.cleanup()
        hook.send.close()
        hook.received.close()


async def test_a_booked_order_is_shipped_and_invoiced_back_to_its_deal(
    sandbox: SapSandbox, client: SapClient, webhook: tuple[Webhook, str]
) -> None:
    """Connector books; the sandbox's signed events come back as the deal's facts.

    The first is SalesOrder.Created, the echo of the connector's own create:
    the same booking (number, total, order, deal), which the deal takes as
    a repeat.
    """
    hook, url = webhook
    sandbox.knobs.push_url = url
    sandbox.knobs.push_secrets = [SECRET]
    sandbox.knobs.invoice_delta = Decimal("-1.00")
    connector = SapConnector(
        client,
        options=MappingOptions(
            sales_areas={"DE01": SalesArea(sales_organization="1010")}
        ),
    )
    command, envelope = booking(order())
    (booked,) = await connector.handle(command, envelope)
    assert isinstance(booked, OrderBooked)
    with anyio.fail_after(10):
        echo = await hook.received.receive()
        shipped = await hook.received.receive()
        invoiced = await hook.received.receive()
    assert isinstance(echo.event, OrderBooked)
    assert echo.correlation_id == booked.deal_id
    assert msgspec.structs.replace(echo.event, warnings=booked.warnings) == booked
    assert echo.idempotency_key == f"erp_cloud:order.booked:{booked.erp_order_id}"
    assert isinstance(shipped.event, ShipmentDispatched)
    assert isinstance(invoiced.event, InvoiceIssued)
    assert shipped.correlation_id == invoiced.correlation_id == order().deal_id
    assert [line.sku for line in shipped.event.shipment.lines] == [
        "HW-GATEWAY-200",
        "HW-MOUNT-KIT",
    ]
    assert invoiced.event.invoice.amount.amount == booked.net_total.amount - 1
