"""A cloud-ERP order fallout fixed by a clerk in SAP, from refusal to booking.

The deal's order is refused by the SAP sandbox (order fallout); a clerk
keys it in SAP by hand with the deal's customer reference; SAP announces
the order (``SalesOrder.Created``), the webhook reads it as the booking, and
the deal goes on from it. The connector, the webhook and the deal are the
real ones; the engine between them is left out (its delivery is tested on
its own).
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web

from actors.workflows.catalogue import demo_reference
from actors.workflows.deal import DealState, DealWorkflow
from actors.workflows.routing import RoutingRegistry
from adapters.erp_cloud import (
    MappingOptions,
    SalesArea,
    SapClient,
    SapConnector,
    SapEventWebhook,
    SapSandbox,
    SapSettings,
    to_sales_order,
)
from broker import Emit
from broker.codec import encode_event
from canonical import Envelope, Money
from canonical.commerce import Account, Opportunity, Quote, QuoteLine
from canonical.q2c import (
    BusinessException,
    OpportunityCreated,
    OpportunityUpdateRequested,
    OrderBooked,
    OrderBookingRequested,
    OrderRejected,
    QuoteApproved,
    QuoteUpdateRequested,
    SubscriptionRequested,
)
from tests.adapters.erp_cloud.test_ingress import Webhook

pytestmark = pytest.mark.anyio

ROUTING = Path(__file__).resolve().parents[2] / "config" / "routing.toml"
DEAL = "deal-006Hn00000A1b2cIAB"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
SECRET = "event-mesh-secret"
USER, PASSWORD = "Q2C_COMM_USER", "sandbox-password"
ACCOUNT = Account(
    id="acct-001Hn00000XyZ12IAF", name="Nordwind", country="DE", currency="EUR"
)
OPPORTUNITY = OpportunityCreated(
    opportunity=Opportunity(
        id="opp-006Hn00000A1b2cIAB", account=ACCOUNT, name="Rollout", stage="Won"
    )
)
#: SaaS for DE01: routed to the cloud ERP (wave 3).
QUOTE = Quote(
    id="quote-a0QHn000001AbCdMAK",
    opportunity_id="opp-006Hn00000A1b2cIAB",
    account_id=ACCOUNT.id,
    currency="EUR",
    lines=(
        QuoteLine(
            number=1,
            sku="SAAS-ANL",
            quantity=Decimal(10),
            list_price=Decimal("30.00"),
            unit_price=Decimal("30.00"),
            net_total=Decimal("300.00"),
            recurring=True,
            physical=False,
            term_months=1,
        ),
    ),
    net_total=Money(amount=Decimal("300.00"), currency="EUR"),
    status="approved",
    tax_country="DE",
)
OPTIONS = MappingOptions(sales_areas={"DE01": SalesArea(sales_organization="1010")})
_ids = itertools.count()


def envelope(event: Any) -> Envelope:
    n = next(_ids)
    return Envelope(
        id=f"m-{n}",
        source="/test",
        type=type(event).__struct_config__.tag,
        time=NOW,
        correlation_id=DEAL,
        idempotency_key=f"k-{n}",
        data=encode_event(event),
    )


class Deal:
    """The deal workflow applied fact by fact, keeping what it emitted."""

    def __init__(self) -> None:
        self.wf = DealWorkflow(
            routing=RoutingRegistry(ROUTING), reference=demo_reference
        )
        self.state: DealState = self.wf.initial(DEAL)
        self.emitted: list[Emit] = []

    def feed(self, *events: Any) -> list[Emit]:
        """Apply *events* in order; return what they emitted."""
        out: list[Emit] = []
        for event in events:
            applied = self.wf.apply(self.state, event, envelope(event))
            self.state = applied.state
            out.extend(applied.emits)
        self.emitted.extend(out)
        return out


@pytest.fixture
async def sap() -> AsyncIterator[tuple[SapSandbox, SapClient, Webhook]]:
    """The SAP sandbox pushing its events to the webhook, and a client of it."""
    webhook = Webhook(SapEventWebhook([SECRET]))
    runner = web.AppRunner(webhook.app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    sandbox = SapSandbox(username=USER, password=PASSWORD, seed=7)
    await sandbox.start()
    port = runner.addresses[0][1]
    sandbox.knobs.push_url = f"http://127.0.0.1:{port}/webhooks/erp_cloud"
    sandbox.knobs.push_secrets = [SECRET]
    assert sandbox.url is not None
    settings = SapSettings(base_url=sandbox.url, username=USER, password=PASSWORD)
    try:
        async with SapClient(settings) as client:
            yield sandbox, client, webhook
    finally:
        await sandbox.aclose()
        await runner.cleanup()
        webhook.send.close()
        webhook.received.close()


async def test_a_cloud_fallout_keyed_by_a_clerk_in_sap_resumes_the_deal(
    sap: tuple[SapSandbox, SapClient, Webhook],
) -> None:
    """Refused by SAP, keyed there by hand: the deal goes on from that booking.

    The order SAP announced is the deal's booking (its number, at the
    order's total): the fallout is lifted, and the CRM, the CPQ and billing
    are told, once each.
    """
    sandbox, client, webhook = sap
    deal = Deal()
    out = deal.feed(OPPORTUNITY, QuoteApproved(quote=QUOTE))
    (request,) = [e.event for e in out if isinstance(e.event, OrderBookingRequested)]
    order = request.order
    assert order.erp == "cloud"
    connector = SapConnector(client, options=OPTIONS)

    sandbox.knobs.refuse_refs = frozenset({order.customer_ref})
    (refused,) = await connector.handle(request, envelope(request))
    assert isinstance(refused, OrderRejected)
    deal.feed(refused)
    assert (deal.state.stage, deal.state.open_exceptions) == (
        "exception",
        ("order_fallout",),
    )

    # The clerk clears the credit block and keys the order by hand.
    sandbox.knobs.refuse_refs = frozenset()
    (customer,) = sandbox.partners.customers
    keyed = msgspec.structs.replace(
        to_sales_order(order, sold_to=customer, options=OPTIONS),
        SenderBusinessSystemName=None,
    )
    created, _ = await client.create_order(keyed)
    with anyio.fail_after(10):
        announced = await webhook.received.receive()

    assert announced.correlation_id == DEAL
    booked = announced.event
    assert isinstance(booked, OrderBooked)
    assert (booked.order_id, booked.erp_order_id) == (order.id, created.SalesOrder)
    out = deal.feed(booked)

    assert {e.routing_key: type(e.event) for e in out} == {
        "q2c.sys.crm": OpportunityUpdateRequested,
        "q2c.sys.cpq": QuoteUpdateRequested,
        "q2c.sys.billing": SubscriptionRequested,
    }
    state = deal.state
    assert (state.stage, state.open_exceptions) == ("fulfilling", ())
    assert (state.erp_order_id, state.booked_total) == (
        created.SalesOrder,
        order.net_total,
    )
    assert state.crm_wanted is not None
    assert state.crm_wanted.stage == "Closed Won"
    assert state.crm_wanted.order_number == created.SalesOrder
    assert [
        e.event.kind for e in deal.emitted if isinstance(e.event, BusinessException)
    ] == ["order_fallout"]
    # SAP announcing it again (Event Mesh redelivers) changes nothing.
    assert deal.feed(booked) == []
