"""The sandbox's business events: order → delivery → billing, signed, retried."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal

import anyio
import msgspec
import pytest
from aiohttp import web
from anyio.streams.memory import MemoryObjectSendStream

from adapters import signing as signature
from adapters.erp_cloud import SapClient, SapSandbox
from adapters.erp_cloud.views import (
    BILLING_DOCUMENT_CREATED,
    OUTBOUND_DELIVERY_CREATED,
    SALES_ORDER_CREATED,
    A_SalesOrder,
    A_SalesOrderItem,
    BillingDocumentEventData,
    OutboundDeliveryEventData,
    SalesOrderEventData,
)
from tests.adapters.erp_cloud.samples import area
from tests.polling import eventually

pytestmark = pytest.mark.anyio

SECRET = "webhook-secret"


class Delivery(msgspec.Struct, frozen=True):
    """One accepted push: its signature header, content type and body."""

    signature: str
    content_type: str
    body: bytes

    @property
    def event(self) -> dict[str, object]:
        """The CloudEvent, decoded."""
        decoded: dict[str, object] = msgspec.json.decode(self.body)
        return decoded


class Receiver:
    """A webhook endpoint that fails its first *failures* calls, then accepts."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls = 0
        #: The CloudEvent id of every call, accepted or not.
        self.ids: list[str] = []
        self._send: MemoryObjectSendStream[Delivery]
        self._send, self.received = anyio.create_memory_object_stream[Delivery](100)
        self.app = web.Application()
        self.app.router.add_post("/hook", self._hook)

    async def _hook(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.read()
        self.ids.append(msgspec.json.decode(body)["id"])
        if self.calls <= self.failures:
            return web.Response(status=503)
        await self._send.send(
            Delivery(
                request.headers[signature.HEADER],
                request.headers["Content-Type"],
                body,
            )
        )
        return web.Response(status=204)

    def close(self) -> None:
        """Close both ends of the stream of accepted pushes."""
        self._send.close()
        self.received.close()

    async def next(self) -> Delivery:
        """The next accepted push (within 10 s)."""
        with anyio.fail_after(10):
            return await self.received.receive()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hook = Receiver()
    runner = web.AppRunner(hook.app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield hook, f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()
        hook.close()


def order(*materials: str) -> A_SalesOrder:
    return A_SalesOrder(
        SalesOrderType="OR",
        SalesOrganization="1010",
        DistributionChannel="10",
        OrganizationDivision="00",
        SoldToParty="17100001",
        PurchaseOrderByCustomer="Q2C-006Hn00000A1b2cIAB",
        to_Item=tuple(
            A_SalesOrderItem(Material=m, RequestedQuantity=Decimal(2))
            for m in materials
        ),
    )


def wire(sandbox: SapSandbox, url: str, **knobs: object) -> None:
    sandbox.seed_customer("17100001", name="Nordwind", sales_areas=[area()])
    sandbox.knobs.push_url = url
    sandbox.knobs.push_secrets = [SECRET]
    for name, value in knobs.items():
        setattr(sandbox.knobs, name, value)


async def test_an_order_pushes_created_delivery_and_billing_in_order(
    sandbox: SapSandbox, client: SapClient, receiver: tuple[Receiver, str]
) -> None:
    """Structured CloudEvents, signed; the order and billing events carry amounts.

    The order event carries the order's total, currency and status: what
    books an order keyed in SAP for its deal.
    """
    hook, url = receiver
    wire(sandbox, url)
    created, _ = await client.create_order(order("HW-GATEWAY-200", "SAAS-FLEET-PRO"))
    first, second, third = [await hook.next() for _ in range(3)]
    assert [d.event["type"] for d in (first, second, third)] == [
        SALES_ORDER_CREATED,
        OUTBOUND_DELIVERY_CREATED,
        BILLING_DOCUMENT_CREATED,
    ]
    for delivery in (first, second, third):
        assert delivery.content_type == "application/cloudevents+json"
        signature.verify(delivery.signature, delivery.body, [SECRET], now=time.time())
        assert delivery.event["specversion"] == "1.0"
        assert delivery.event["source"] == "/default/sap.s4.beh/S4H"
    ordered = msgspec.convert(first.event["data"], SalesOrderEventData)
    assert ordered.SalesOrder == created.SalesOrder
    assert ordered.PurchaseOrderByCustomer == "Q2C-006Hn00000A1b2cIAB"
    assert (ordered.TotalNetAmount, ordered.TransactionCurrency) == (
        Decimal("2480"),
        "EUR",
    )
    assert ordered.OverallSDProcessStatus == "A"
    shipped = msgspec.convert(second.event["data"], OutboundDeliveryEventData)
    assert [i.Material for i in shipped.Items] == ["HW-GATEWAY-200"]
    billed = msgspec.convert(third.event["data"], BillingDocumentEventData)
    assert billed.SalesOrder == created.SalesOrder
    assert billed.TotalNetAmount == created.TotalNetAmount == Decimal("2480")
    assert billed.PurchaseOrderByCustomer == "Q2C-006Hn00000A1b2cIAB"


async def test_a_service_only_order_has_no_delivery_and_the_delta_shows(
    sandbox: SapSandbox, client: SapClient, receiver: tuple[Receiver, str]
) -> None:
    """No shipped item, no delivery; ``invoice_delta`` changes the billed amount."""
    hook, url = receiver
    wire(sandbox, url, invoice_delta=Decimal("10.50"))
    await client.create_order(order("SAAS-FLEET-PRO"))
    first, second = await hook.next(), await hook.next()
    assert [d.event["type"] for d in (first, second)] == [
        SALES_ORDER_CREATED,
        BILLING_DOCUMENT_CREATED,
    ]
    billed = msgspec.convert(second.event["data"], BillingDocumentEventData)
    assert billed.TotalNetAmount == Decimal("90.5")


async def test_a_failing_receiver_gets_the_same_event_again(
    sandbox: SapSandbox, client: SapClient, receiver: tuple[Receiver, str]
) -> None:
    """Non-2xx answers are retried with back-off; the event keeps its id."""
    hook, url = receiver
    hook.failures = 2
    wire(sandbox, url, push_backoff_s=0.01)
    await client.create_order(order("SAAS-FLEET-PRO"))
    first = await hook.next()
    assert first.event["type"] == SALES_ORDER_CREATED
    assert hook.ids[:3] == [first.event["id"]] * 3
    await hook.next()

    async def settled() -> dict[str, int] | None:
        state = sandbox.state()
        return state if state["pushes_pending"] == 0 else None

    state = await eventually(settled)
    assert state is not None
    assert (state["events_delivered"], state["event_attempts_failed"]) == (2, 2)
    assert state["events_dropped"] == 0


async def test_an_event_is_dropped_after_the_last_attempt(
    sandbox: SapSandbox, client: SapClient, receiver: tuple[Receiver, str]
) -> None:
    """Bounded: after ``push_max_attempts`` failures the event is dropped."""
    hook, url = receiver
    hook.failures = 3
    wire(sandbox, url, push_backoff_s=0.01, push_max_attempts=3)
    await client.create_order(order("SAAS-FLEET-PRO"))
    billing = await hook.next()
    assert billing.event["type"] == BILLING_DOCUMENT_CREATED
    assert hook.ids[0] == hook.ids[1] == hook.ids[2] != billing.event["id"]
    assert sandbox.state()["events_dropped"] == 1


async def test_delivery_waits_do_not_hold_up_requests(
    sandbox: SapSandbox, client: SapClient, receiver: tuple[Receiver, str]
) -> None:
    """A delivery backing off for a minute holds up no request; close cancels it."""
    hook, url = receiver
    hook.failures = 1
    wire(sandbox, url, push_backoff_s=60.0)
    with anyio.fail_after(5):
        await client.create_order(order("SAAS-FLEET-PRO"))

        async def first_attempt_failed() -> bool:
            return hook.calls >= 1

        await eventually(first_attempt_failed)
        await client.list_products()
    assert sandbox.pushes_pending == 1
    await sandbox.aclose()
    assert sandbox.pushes_pending == 0
