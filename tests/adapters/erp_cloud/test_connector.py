"""SapConnector against the sandbox: customers, check-before-create, fallout."""

from __future__ import annotations

from decimal import Decimal

import anyio
import msgspec
import pytest

from adapters.erp_cloud import (
    MappingOptions,
    SalesArea,
    SapClient,
    SapConnector,
    SapSandbox,
    search_term,
)
from adapters.erp_cloud.views import A_SalesOrder, SapNotice
from broker.errors import UnknownMessageType, UpstreamUnavailable
from broker.keyed_lock import SharedKeyedLock
from broker.store import Store
from canonical import Envelope
from canonical.commerce import OrderLine
from canonical.q2c import (
    CustomerSynced,
    CustomerSyncRequested,
    OrderBooked,
    OrderRejected,
    QuoteUpdateRequested,
)
from tests.adapters.erp_cloud.conftest import settings_for
from tests.adapters.erp_cloud.samples import (
    ACCOUNT,
    CUSTOMER_REF,
    PASSWORD,
    USER,
    area,
    booking,
    order,
    products,
)

pytestmark = pytest.mark.anyio

OPTIONS = MappingOptions(sales_areas={"DE01": SalesArea(sales_organization="1010")})


class LosesCreateAnswers:
    """A client whose first order create reaches SAP but whose answer is lost."""

    def __init__(self, client: SapClient) -> None:
        self._client = client
        self.lost = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)

    async def create_order(
        self, order: A_SalesOrder
    ) -> tuple[A_SalesOrder, tuple[SapNotice, ...]]:
        """Create in SAP; lose the first answer on the way back."""
        created = await self._client.create_order(order)
        if self.lost == 0:
            self.lost += 1
            raise UpstreamUnavailable("erp_cloud", "connection reset before the answer")
        return created


@pytest.fixture
def connector(client: SapClient) -> SapConnector:
    return SapConnector(
        client,
        options=OPTIONS,
        customer_areas=[SalesArea(sales_organization="1010")],
    )


async def test_a_booking_creates_the_customer_then_the_order(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """New account: a partner found by nobody is created, then the order is booked."""
    command, envelope = booking(order())
    (booked,) = await connector.handle(command, envelope)
    assert isinstance(booked, OrderBooked)
    assert (booked.erp, booked.erp_order_id, booked.customer_ref) == (
        "cloud",
        "1",
        CUSTOMER_REF,
    )
    assert booked.net_total.amount == Decimal("5471.00")
    assert booked.warnings == ()
    (partner,) = sandbox.partners.partners.values()
    assert partner.entity.SearchTerm1 == search_term(ACCOUNT.id)
    record = sandbox.orders.orders["1"]
    assert record.entity.SoldToParty == partner.entity.Customer
    assert record.entity.CustomerPaymentTerms == "NT30"


async def test_a_sync_and_a_booking_of_a_new_account_at_once_make_one_partner(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """Both look the partner up and find none: they take turns, not two creates."""
    sync = CustomerSyncRequested(account=ACCOUNT, content_hash="h1")
    command, envelope = booking(order())
    async with anyio.create_task_group() as tg:
        tg.start_soon(connector.handle, sync, envelope)
        tg.start_soon(connector.handle, command, envelope)
    (partner,) = sandbox.partners.partners.values()
    (record,) = sandbox.orders.orders.values()
    assert record.entity.SoldToParty == partner.entity.Customer


async def test_two_daemons_syncing_and_booking_a_new_account_make_one_partner(
    sandbox: SapSandbox, real_store: Store
) -> None:
    """Each daemon has its own connector and client; the store's lock is shared."""
    areas = [SalesArea(sales_organization="1010")]
    sync = CustomerSyncRequested(account=ACCOUNT, content_hash="h1")
    command, envelope = booking(order())
    async with (
        SapClient(settings_for(sandbox)) as one,
        SapClient(settings_for(sandbox)) as two,
    ):
        daemons = [
            SapConnector(
                client,
                options=OPTIONS,
                customer_areas=areas,
                locks=SharedKeyedLock(real_store, owner=name),
            )
            for client, name in ((one, "daemon-a"), (two, "daemon-b"))
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemons[0].handle, sync, envelope)
            tg.start_soon(daemons[1].handle, command, envelope)
    (partner,) = sandbox.partners.partners.values()
    (record,) = sandbox.orders.orders.values()
    assert record.entity.SoldToParty == partner.entity.Customer


async def test_a_number_block_is_a_fresh_range_for_partners_and_orders() -> None:
    """Block 7: the partner and the order number start seven million higher."""
    with pytest.raises(ValueError, match="number_block"):
        SapSandbox(number_block=-1)
    sandbox = SapSandbox(username=USER, password=PASSWORD, number_block=7)
    sandbox.seed_products(products())
    await sandbox.start()
    try:
        async with SapClient(settings_for(sandbox)) as client:
            connector = SapConnector(client, options=OPTIONS)
            (booked,) = await connector.handle(*booking(order()))
    finally:
        await sandbox.aclose()
    assert isinstance(booked, OrderBooked)
    assert booked.erp_order_id == "7000001"
    assert list(sandbox.partners.partners) == ["8000001"]


async def test_a_redelivered_booking_creates_one_order(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """The same command twice: one partner, one order, the same booking reported."""
    command, envelope = booking(order())
    first = await connector.handle(command, envelope)
    second = await connector.handle(command, envelope)
    assert first == second
    state = sandbox.state()
    assert (state["orders_created"], state["business_partners_created"]) == (1, 1)
    assert state["duplicate_po_warnings"] == 0


async def test_a_lost_answer_does_not_book_twice(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """SAP created the order but the answer was lost: the retry finds it."""
    lossy = LosesCreateAnswers(client)
    connector = SapConnector(lossy, options=OPTIONS)  # type: ignore[arg-type]  # duck-typed SapApi
    command, envelope = booking(order())
    with pytest.raises(UpstreamUnavailable, match="before the answer"):
        await connector.handle(command, envelope)
    (booked,) = await connector.handle(command, envelope)
    assert isinstance(booked, OrderBooked)
    assert booked.erp_order_id == "1"
    assert sandbox.state()["orders_created"] == 1
    assert lossy.lost == 1


async def test_an_outage_is_retried_and_books_once(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """A 503 on the create is transient; the redelivery books exactly once."""
    command, envelope = booking(order())
    sandbox.knobs.error_rate = 1.0
    with pytest.raises(UpstreamUnavailable):
        await connector.handle(command, envelope)
    sandbox.knobs.error_rate = 0.0
    (booked,) = await connector.handle(command, envelope)
    assert isinstance(booked, OrderBooked)
    assert sandbox.state()["orders_created"] == 1


async def test_an_existing_customer_is_extended_to_the_orders_sales_area(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """Found by its search term but not in 1010/10/00: the area is added first."""
    sandbox.seed_customer(
        "17100001",
        name=ACCOUNT.name,
        sales_areas=[area("1710")],
        search_term=search_term(ACCOUNT.id),
    )
    command, envelope = booking(order())
    (booked,) = await connector.handle(command, envelope)
    assert isinstance(booked, OrderBooked)
    assert sandbox.orders.orders["1"].entity.SoldToParty == "17100001"
    state = sandbox.state()
    assert (state["business_partners_created"], state["sales_areas_created"]) == (0, 1)


async def test_sap_validation_errors_become_order_fallout(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """An unknown material is SAP's 400: erp.order.rejected, not a dead letter."""
    unknown = OrderLine(
        number=1,
        sku="HW-UNKNOWN-9",
        quantity=Decimal(1),
        unit_price=Decimal("10.00"),
        net_amount=Decimal("10.00"),
    )
    command, envelope = booking(order(lines=(unknown,)))
    (rejected,) = await connector.handle(command, envelope)
    assert isinstance(rejected, OrderRejected)
    assert rejected.code == "ZQ2C_SANDBOX/022"
    assert "HW-UNKNOWN-9" in rejected.message
    assert rejected.net_total.amount == Decimal("10.00")
    assert sandbox.state()["orders_created"] == 0


async def test_an_order_the_mapping_cannot_express_is_fallout_before_any_call(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """Payment terms without an SAP key: rejected at once, SAP untouched."""
    command, envelope = booking(order(payment_terms="net-thirty"))
    (rejected,) = await connector.handle(command, envelope)
    assert isinstance(rejected, OrderRejected)
    assert rejected.code == "Q2C/MAPPING"
    assert sandbox.state()["business_partners_created"] == 0


async def test_a_duplicate_made_outside_is_reported_as_booked(
    sandbox: SapSandbox, client: SapClient, connector: SapConnector
) -> None:
    """An order with our reference already in SAP is ours: reported, not recreated."""
    command, envelope = booking(order())
    await connector.handle(command, envelope)
    other = msgspec.structs.replace(order(), id="order-other", customer_ref="Q2C-other")
    cmd2, env2 = booking(other)
    (booked,) = await connector.handle(cmd2, env2)
    assert isinstance(booked, OrderBooked)
    assert booked.erp_order_id == "2"
    again = await connector.handle(command, envelope)
    assert isinstance(again[0], OrderBooked)
    assert again[0].erp_order_id == "1"


async def test_a_customer_sync_creates_then_patches(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """Created in the configured areas; a rename is patched with If-Match."""
    command = CustomerSyncRequested(account=ACCOUNT, content_hash="h1")
    envelope = _envelope("erp.customer.sync_requested", ACCOUNT.id)
    (synced,) = await connector.handle(command, envelope)
    assert isinstance(synced, CustomerSynced)
    assert (synced.account_id, synced.system, synced.content_hash) == (
        ACCOUNT.id,
        "erp_cloud",
        "h1",
    )
    renamed = msgspec.structs.replace(ACCOUNT, name="Nordwind Logistik AG")
    (again,) = await connector.handle(
        CustomerSyncRequested(account=renamed, content_hash="h2"), envelope
    )
    assert isinstance(again, CustomerSynced)
    assert again.native_id == synced.native_id
    partner = sandbox.partners.partners[synced.native_id].entity
    assert partner.OrganizationBPName1 == "Nordwind Logistik AG"
    state = sandbox.state()
    assert (state["business_partners_created"], state["business_partners_changed"]) == (
        1,
        1,
    )
    before = sandbox.state()["requests"]
    await connector.handle(
        CustomerSyncRequested(account=renamed, content_hash="h2"), envelope
    )
    assert sandbox.state()["business_partners_changed"] == 1
    # Nothing to change: the partner is looked up once, and that is all.
    assert sandbox.state()["requests"] - before == 1


async def test_a_deleted_account_blocks_its_partner_and_is_ignored_if_unknown(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """Deleted: an existing partner is blocked; one SAP never knew is left alone."""
    envelope = _envelope("erp.customer.sync_requested", ACCOUNT.id)
    gone = msgspec.structs.replace(ACCOUNT, deleted=True)
    assert (
        await connector.handle(
            CustomerSyncRequested(account=gone, content_hash="x"), envelope
        )
        == []
    )
    assert sandbox.state()["business_partners_created"] == 0
    await connector.handle(
        CustomerSyncRequested(account=ACCOUNT, content_hash="y"), envelope
    )
    await connector.handle(
        CustomerSyncRequested(account=gone, content_hash="z"), envelope
    )
    (partner,) = sandbox.partners.partners.values()
    assert partner.entity.BusinessPartnerIsBlocked is True


async def test_it_names_its_commands_and_refuses_others(
    connector: SapConnector,
) -> None:
    """Two commands; anything else is an unknown message type."""
    assert set(connector.commands) == {
        "erp.order.booking_requested",
        "erp.customer.sync_requested",
    }
    assert connector.system == "erp_cloud"
    with pytest.raises(UnknownMessageType, match="QuoteUpdateRequested"):
        await connector.handle(
            QuoteUpdateRequested(quote_id="quote-1", status="ordered"),
            _envelope("cpq.quote.update_requested", "deal-1"),
        )


def _envelope(type_: str, correlation: str) -> Envelope:
    _, envelope = booking(order())
    return msgspec.structs.replace(envelope, type=type_, correlation_id=correlation)
