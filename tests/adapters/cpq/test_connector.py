"""CpqConnector against the sandbox org: quote status once, catalogue by upsert."""

from __future__ import annotations

from decimal import Decimal

import pytest

from adapters.cpq import views as v
from adapters.cpq.client import CpqClient
from adapters.cpq.connector import CpqConnector
from broker.errors import UnknownMessageType, UpstreamRejected
from canonical.commerce import PriceBookEntry, Product
from canonical.q2c import (
    ProductSynced,
    ProductSyncRequested,
    QuoteUpdated,
    QuoteUpdateRequested,
)
from tests.adapters.crm.harness import Org, envelope

pytestmark = pytest.mark.anyio


def connector(org: Org) -> CpqConnector:
    return CpqConnector(CpqClient(org.client))


def quote(org: Org) -> str:
    sb = org.sandbox
    return sb.create_quote(sb.create_opportunity(sb.seed_account("Acme"), "Deal"))


async def test_marking_a_quote_ordered_is_one_write_for_a_redelivery(org: Org) -> None:
    """Status ordered sets SBQQ__Ordered__c and the order number, written once.

    A first attempt writes without reading (one request); the redelivery
    reads the command key it finds stamped, and writes nothing.
    """
    quote_id = quote(org)
    org.sandbox.approve_quote(quote_id)
    command = QuoteUpdateRequested(
        quote_id=f"quote-{quote_id}", status="ordered", order_number="4711"
    )
    env = envelope("cpq.quote.update_requested", "q2c:deal-1:cpq-update")
    cpq = connector(org)
    before = org.sandbox.state()["updates"]
    requests = org.sandbox.counts["api_requests"]
    first = await cpq.handle(command, env, first_attempt=True)
    assert org.sandbox.counts["api_requests"] == requests + 1
    second = await cpq.handle(command, env)
    assert org.sandbox.counts["api_requests"] == requests + 2
    assert (
        first
        == second
        == [
            QuoteUpdated(
                quote_id=f"quote-{quote_id}", status="ordered", native_id=quote_id
            )
        ]
    )
    assert org.sandbox.state()["updates"] - before == 1
    record = await org.client.get(v.Quote, quote_id)
    assert (record.SBQQ__Ordered__c, record.SBQQ__Status__c) == (True, "Approved")
    assert (record.ERP_Order_Number__c, record.Broker_Status__c) == ("4711", "ordered")


async def test_a_missing_quote_is_refused(org: Org) -> None:
    """NOT_FOUND from the org is UpstreamRejected."""
    command = QuoteUpdateRequested(
        quote_id="quote-a0Q000000000001AAA", status="ordered"
    )
    with pytest.raises(UpstreamRejected) as caught:
        await connector(org).handle(
            command, envelope("cpq.quote.update_requested", "k")
        )
    assert caught.value.code == "NOT_FOUND"


PRODUCT = Product(sku="SAAS-FLEET-PRO", name="Fleet analytics Pro", family="saas")
PRICES = (
    PriceBookEntry(
        sku="SAAS-FLEET-PRO",
        currency="EUR",
        list_price=Decimal("40.00"),
        floor_price=Decimal("30.00"),
    ),
    PriceBookEntry(
        sku="SAAS-FLEET-PRO",
        currency="USD",
        list_price=Decimal("44.00"),
        floor_price=Decimal("33.00"),
    ),
)


async def test_a_product_sync_upserts_the_product_and_its_prices(org: Org) -> None:
    """Product2 keyed by SKU, a standard-book entry per currency; twice is once."""
    command = ProductSyncRequested(product=PRODUCT, prices=PRICES)
    env = envelope("cpq.product.sync_requested", "sync-1")
    cpq = connector(org)
    (synced,) = await cpq.handle(command, env)
    assert isinstance(synced, ProductSynced)
    assert synced.sku == "SAAS-FLEET-PRO"
    again = await cpq.handle(command, env)
    assert again == [synced]
    state = org.sandbox.state()
    assert state["records"]["Product2"] == 1
    assert state["records"]["PricebookEntry"] == 2
    assert state["upserts_created"] == 3
    product = await org.client.get(v.Product2, synced.native_id)
    assert (product.ProductCode, product.Broker_Key__c) == ("SAAS-FLEET-PRO",) * 2
    entry = await org.client.find(v.PricebookEntry, "SAAS-FLEET-PRO:USD")
    assert entry is not None
    assert (entry.UnitPrice, entry.Floor_Price__c) == (
        Decimal("44.00"),
        Decimal("33.00"),
    )
    assert entry.Pricebook2Id == org.sandbox.org.standard_pricebook_id
    assert entry.Product2Id == synced.native_id


async def test_a_price_change_updates_the_entry_in_place(org: Org) -> None:
    """A later sync with a new price changes the entry; no second entry."""
    cpq = connector(org)
    await cpq.handle(
        ProductSyncRequested(product=PRODUCT, prices=PRICES[:1]),
        envelope("cpq.product.sync_requested", "s1"),
    )
    cheaper = PriceBookEntry(
        sku="SAAS-FLEET-PRO",
        currency="EUR",
        list_price=Decimal("38.00"),
        floor_price=Decimal("30.00"),
    )
    await cpq.handle(
        ProductSyncRequested(product=PRODUCT, prices=(cheaper,)),
        envelope("cpq.product.sync_requested", "s2"),
    )
    entry = await org.client.find(v.PricebookEntry, "SAAS-FLEET-PRO:EUR")
    assert entry is not None
    assert entry.UnitPrice == Decimal("38.00")
    assert org.sandbox.state()["records"]["PricebookEntry"] == 1


async def test_a_command_of_another_system_is_unknown(org: Org) -> None:
    """Only its two commands are accepted."""
    cpq = connector(org)
    assert set(cpq.commands) == {
        "cpq.quote.update_requested",
        "cpq.product.sync_requested",
    }
    with pytest.raises(UnknownMessageType):
        await cpq.handle(object(), envelope("x", "k"))
