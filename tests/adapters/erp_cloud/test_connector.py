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
from adapters.erp_cloud.views import A_BusinessPartner, A_SalesOrder, SapNotice
from broker.errors import UnknownMessageType, UpstreamRejected, UpstreamUnavailable
from broker.keyed_lock import SharedKeyedLock
from broker.store import Store
from canonical import Envelope
from canonical.commerce import Account, OrderLine
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
    BILLED,
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


# --- address and tax number ----------------------------------------------------------

#: The sandbox's counters of writes to business-partner data.
WRITES = (
    "business_partners_created",
    "business_partners_changed",
    "sales_areas_created",
    "partner_addresses_created",
    "partner_addresses_changed",
    "tax_numbers_created",
    "tax_numbers_changed",
)


class Writes:
    """The writes a stretch of a test made in the sandbox, by kind, and its requests."""

    def __init__(self, sandbox: SapSandbox) -> None:
        self._sandbox = sandbox
        self._before = sandbox.state()

    def made(self) -> dict[str, int]:
        """Writes since this was made, the kinds with none left out."""
        after = self._sandbox.state()
        changed = {k: after[k] - self._before[k] for k in WRITES}
        return {k: n for k, n in changed.items() if n}

    def requests(self) -> int:
        """Requests since this was made, reads included."""
        return self._sandbox.state()["requests"] - self._before["requests"]


async def sync(connector: SapConnector, account: Account) -> str:
    """Sync *account*; the customer number it has in SAP."""
    command = CustomerSyncRequested(account=account, content_hash="h")
    (synced,) = await connector.handle(
        command, _envelope("erp.customer.sync_requested", account.id)
    )
    assert isinstance(synced, CustomerSynced)
    return synced.native_id


def moved(account: Account, **changes: str) -> Account:
    """*account* with its billing address changed."""
    assert account.billing_address is not None
    address = msgspec.structs.replace(account.billing_address, **changes)
    return msgspec.structs.replace(account, billing_address=address)


async def test_a_new_account_is_created_with_its_address_and_tax_number(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """One deep insert: the partner with its billing address and VAT number."""
    writes = Writes(sandbox)
    number = await sync(connector, BILLED)
    assert writes.made() == {"business_partners_created": 1}
    details = sandbox.partners.details
    (address,) = (r.entity for r in details.addresses[number].values())
    assert (
        address.StreetName,
        address.CityName,
        address.PostalCode,
        address.Region,
        address.Country,
    ) == ("Hafenstraße 12", "Hamburg", "20457", "HH", "DE")
    (tax,) = (r.entity for r in details.tax_numbers[number].values())
    assert (tax.BPTaxType, tax.BPTaxNumber) == ("DE0", "DE123456789")


async def test_a_changed_address_patches_the_address_and_nothing_else(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """A move in the CRM: one PATCH of the address, with If-Match; name, tax kept."""
    number = await sync(connector, BILLED)
    writes = Writes(sandbox)
    await sync(connector, moved(BILLED, street="Am Sandtorkai 1", postal_code="20457"))
    assert writes.made() == {"partner_addresses_changed": 1}
    assert writes.requests() == 2  # the lookup, the PATCH
    assert sandbox.counters.precondition_failed == 0
    (record,) = sandbox.partners.details.addresses[number].values()
    assert (record.entity.StreetName, record.entity.CityName) == (
        "Am Sandtorkai 1",
        "Hamburg",
    )
    partner = sandbox.partners.partners[number].entity
    assert partner.OrganizationBPName1 == BILLED.name


async def test_a_changed_tax_id_patches_the_tax_number_and_nothing_else(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """A corrected VAT number: one PATCH of the DE0 tax number; the address kept."""
    number = await sync(connector, BILLED)
    writes = Writes(sandbox)
    await sync(connector, msgspec.structs.replace(BILLED, tax_id="DE987654321"))
    assert writes.made() == {"tax_numbers_changed": 1}
    (tax,) = sandbox.partners.details.tax_numbers[number].values()
    assert tax.entity.BPTaxNumber == "DE987654321"


async def test_the_same_sync_twice_writes_nothing_the_second_time(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """Everything changed at once is written once; the repeat only looks."""
    await sync(connector, ACCOUNT)
    changed = msgspec.structs.replace(
        moved(BILLED, street="Am Sandtorkai 1", postal_code="20457"),
        name="Nordwind Logistik AG",
        tax_id="de 987 654 321",
    )
    writes = Writes(sandbox)
    await sync(connector, changed)
    assert writes.made() == {
        "business_partners_changed": 1,
        "partner_addresses_changed": 1,
        "tax_numbers_created": 1,
    }
    again = Writes(sandbox)
    await sync(connector, changed)
    assert again.made() == {}
    assert again.requests() == 1


async def test_an_existing_partner_without_an_address_gets_one(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """A partner made in SAP without address or tax number: both added, once."""
    sandbox.seed_customer(
        "17100001",
        name=BILLED.name,
        sales_areas=[area()],
        search_term=search_term(BILLED.id),
    )
    writes = Writes(sandbox)
    assert await sync(connector, BILLED) == "17100001"
    assert writes.made() == {"partner_addresses_created": 1, "tax_numbers_created": 1}
    (address,) = sandbox.partners.details.addresses["17100001"].values()
    assert address.entity.StreetName == "Hafenstraße 12"
    again = Writes(sandbox)
    await sync(connector, BILLED)
    assert again.made() == {}


class ReadsWithoutDetails:
    """A client whose partner reads come back without addresses and tax numbers.

    As a proxy or a changed service might answer: not expanded, not empty.
    """

    def __init__(self, client: SapClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> object:
        return getattr(self._client, name)

    async def find_business_partners(
        self, search_term: str
    ) -> tuple[A_BusinessPartner, ...]:
        """The partners found, their addresses and tax numbers not read."""
        found = await self._client.find_business_partners(search_term)
        return tuple(
            msgspec.structs.replace(
                p, to_BusinessPartnerAddress=None, to_BusinessPartnerTax=None
            )
            for p in found
        )


async def test_a_partner_read_without_its_details_gets_none_added(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Not expanded is not "has none": syncing adds no second address or tax number."""
    connector = SapConnector(
        ReadsWithoutDetails(client),  # type: ignore[arg-type]
        options=OPTIONS,
        customer_areas=[SalesArea(sales_organization="1010")],
    )
    number = await sync(connector, BILLED)
    writes = Writes(sandbox)
    await sync(connector, moved(BILLED, city="Bremen"))
    assert writes.made() == {}
    assert len(sandbox.partners.details.addresses[number]) == 1
    assert len(sandbox.partners.details.tax_numbers[number]) == 1


async def test_what_the_account_lacks_is_not_deleted_in_sap(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """No tax id, no billing address: SAP's tax number and street stay as they are."""
    number = await sync(connector, BILLED)
    writes = Writes(sandbox)
    await sync(connector, ACCOUNT)
    assert writes.made() == {}
    (tax,) = sandbox.partners.details.tax_numbers[number].values()
    assert tax.entity.BPTaxNumber == "DE123456789"
    (address,) = sandbox.partners.details.addresses[number].values()
    assert address.entity.StreetName == "Hafenstraße 12"


async def test_a_tax_id_sap_cannot_hold_is_refused_before_any_write(
    sandbox: SapSandbox, connector: SapConnector
) -> None:
    """Over 60 characters: the sync is refused, a booking is fallout; SAP untouched."""
    absurd = msgspec.structs.replace(BILLED, tax_id="DE" + "1" * 59)
    writes = Writes(sandbox)
    with pytest.raises(UpstreamRejected, match="61 characters") as caught:
        await sync(connector, absurd)
    assert caught.value.code == "Q2C/MAPPING"
    command, envelope = booking(msgspec.structs.replace(order(), account=absurd))
    (rejected,) = await connector.handle(command, envelope)
    assert isinstance(rejected, OrderRejected)
    assert rejected.code == "Q2C/MAPPING"
    assert "tax id" in rejected.message
    await sync(connector, BILLED)
    renamed = msgspec.structs.replace(absurd, name="Nordwind Logistik AG")
    with pytest.raises(UpstreamRejected, match="61 characters"):
        await sync(connector, renamed)
    assert writes.made() == {"business_partners_created": 1}


def _envelope(type_: str, correlation: str) -> Envelope:
    _, envelope = booking(order())
    return msgspec.structs.replace(envelope, type=type_, correlation_id=correlation)
