"""SapClient against SapSandbox over real HTTP: auth, CSRF, orders, errors, knobs."""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.erp_cloud import SapClient, SapRejected, SapSandbox, SapSettings
from adapters.erp_cloud.views import (
    A_BusinessPartner,
    A_BusinessPartnerAddress,
    A_BusinessPartnerRole,
    A_BusinessPartnerTaxNumber,
    A_Customer,
    A_SalesOrder,
    A_SalesOrderItem,
    A_SalesOrderItemPrElement,
    expanded,
)
from broker.config import convert_table
from broker.errors import ConcurrencyConflict, ConfigError, UpstreamUnavailable
from tests.adapters.erp_cloud.conftest import settings_for
from tests.adapters.erp_cloud.samples import PASSWORD, USER, area, products

pytestmark = pytest.mark.anyio

SO = "/sap/opu/odata/sap/API_SALES_ORDER_SRV"
BP = "/sap/opu/odata/sap/API_BUSINESS_PARTNER"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


class Raw(msgspec.Struct, frozen=True):
    """An answer as it came over the wire."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body, decoded."""
        return msgspec.json.decode(self.body)


async def raw(
    sandbox: SapSandbox,
    method: str,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    session: aiohttp.ClientSession | None = None,
) -> Raw:
    """One request as it goes over the wire, without the client's handshake."""
    own = session is None
    http = session or aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        async with http.request(
            method,
            f"{sandbox.url}{path}",
            headers={"Authorization": AUTH, **(headers or {})},
            data=None if body is None else msgspec.json.encode(body),
        ) as response:
            return Raw(response.status, dict(response.headers), await response.read())
    finally:
        if own:
            await http.close()


def seed_customer(sandbox: SapSandbox, number: str = "17100001") -> str:
    sandbox.seed_customer(number, name="Nordwind Logistik", sales_areas=[area()])
    return number


def bundle(sold_to: str, ref: str = "Q2C-1") -> A_SalesOrder:
    """A gateway with a bundled mounting kit at a manual price, and a service."""
    return A_SalesOrder(
        SalesOrderType="OR",
        SalesOrganization="1010",
        DistributionChannel="10",
        OrganizationDivision="00",
        SoldToParty=sold_to,
        PurchaseOrderByCustomer=ref,
        to_Item=(
            A_SalesOrderItem(
                SalesOrderItem="10",
                Material="HW-GATEWAY-200",
                RequestedQuantity=Decimal(4),
                to_PricingElement=(
                    A_SalesOrderItemPrElement(
                        ConditionType="PMP0",
                        ConditionRateValue=Decimal("1100.00"),
                        ConditionQuantity=Decimal(1),
                    ),
                ),
            ),
            A_SalesOrderItem(
                SalesOrderItem="20",
                HigherLevelItem="10",
                Material="HW-MOUNT-KIT",
                RequestedQuantity=Decimal(4),
            ),
            A_SalesOrderItem(
                SalesOrderItem="30",
                Material="SAAS-FLEET-PRO",
                RequestedQuantity=Decimal("2.5"),
            ),
        ),
    )


# --- auth and CSRF ---------------------------------------------------------------


async def test_a_wrong_password_is_refused_401(sandbox: SapSandbox) -> None:
    """Basic auth is checked on every call; a refusal is permanent, not retried."""
    async with SapClient(settings_for(sandbox, password="wrong")) as sap:
        with pytest.raises(SapRejected) as caught:
            await sap.list_products()
    assert (caught.value.status, caught.value.code) == (401, "HTTP401")
    assert sandbox.counters.auth_refused == 1


async def test_a_write_without_a_token_is_refused_403_required(
    sandbox: SapSandbox,
) -> None:
    """No token, or a token without its cookie: 403 ``x-csrf-token: Required``."""
    reply = await raw(sandbox, "POST", f"{SO}/A_SalesOrder", body={})
    assert reply.status == 403
    assert reply.headers["x-csrf-token"] == "Required"
    assert reply.body == b"CSRF token validation failed"
    fetched = await raw(sandbox, "HEAD", f"{SO}/", headers={"X-CSRF-Token": "Fetch"})
    token = fetched.headers["x-csrf-token"]
    assert "SAP_SESSIONID_S4H_100=" in fetched.headers["Set-Cookie"]
    cookieless = await raw(
        sandbox, "POST", f"{SO}/A_SalesOrder", headers={"X-CSRF-Token": token}, body={}
    )
    assert cookieless.status == 403


async def test_the_token_is_fetched_once_per_session(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Two writes, one fetch: the token and its cookie are reused."""
    sold_to = seed_customer(sandbox)
    await client.create_order(bundle(sold_to, "Q2C-A"))
    await client.create_order(bundle(sold_to, "Q2C-B"))
    assert sandbox.counters.csrf_tokens_issued == 1
    assert sandbox.counters.csrf_refused == 0


async def test_an_expired_session_is_refetched_once(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """After 403 Required the client fetches a new token and repeats the call."""
    sold_to = seed_customer(sandbox)
    await client.create_order(bundle(sold_to, "Q2C-A"))
    sandbox.expire_sessions()
    created, _ = await client.create_order(bundle(sold_to, "Q2C-B"))
    assert created.SalesOrder == "2"
    assert sandbox.counters.csrf_refused == 1
    assert sandbox.counters.csrf_tokens_issued == 2
    assert sandbox.counters.orders_created == 2


# --- sales orders ------------------------------------------------------------------


async def test_a_deep_insert_is_priced_numbered_and_answered_201(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Item conditions (else list prices) price the items; the header sums them."""
    sold_to = seed_customer(sandbox)
    created, warnings = await client.create_order(bundle(sold_to))
    assert warnings == ()
    assert created.SalesOrder == "1"
    items = expanded(created.to_Item)
    assert [(i.SalesOrderItem, i.HigherLevelItem, i.NetAmount) for i in items] == [
        ("10", None, Decimal("4400.00")),
        ("20", "10", Decimal("180.00")),
        ("30", None, Decimal("100.00")),
    ]
    assert created.TotalNetAmount == Decimal("4680.00")
    assert (created.TransactionCurrency, created.CustomerPaymentTerms) == (
        "EUR",
        "0001",
    )
    assert created.metadata is not None
    assert created.metadata.type == "API_SALES_ORDER_SRV.A_SalesOrderType"
    read, etag = await client.get_order("1")
    assert etag == created.metadata.etag
    assert etag is not None
    assert etag.startswith("W/\"datetimeoffset'")
    assert read.TotalNetAmount == created.TotalNetAmount


async def test_leading_zeros_address_the_same_order(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """An external number ``0005200000`` is stored and read as ``5200000``."""
    sold_to = seed_customer(sandbox)
    created, _ = await client.create_order(
        msgspec.structs.replace(bundle(sold_to), SalesOrder="0005200000")
    )
    assert created.SalesOrder == "5200000"
    read, _ = await client.get_order("0005200000")
    assert read.SalesOrder == "5200000"


async def test_a_repeated_customer_reference_is_a_warning_by_default(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """As SAP does by default: the second order is created, with a warning."""
    sold_to = seed_customer(sandbox)
    first, _ = await client.create_order(bundle(sold_to))
    second, warnings = await client.create_order(bundle(sold_to))
    assert (first.SalesOrder, second.SalesOrder) == ("1", "2")
    (warning,) = warnings
    assert warning.severity == "warning"
    assert "Q2C-1" in warning.message
    assert sandbox.counters.duplicate_po_warnings == 1


async def test_a_repeated_customer_reference_is_refused_when_blocking(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """With ``block_duplicate_po`` the second create is a 400 naming the reference."""
    sold_to = seed_customer(sandbox)
    sandbox.knobs.block_duplicate_po = True
    await client.create_order(bundle(sold_to))
    with pytest.raises(SapRejected) as caught:
        await client.create_order(bundle(sold_to))
    assert (caught.value.status, caught.value.code) == (400, "ZQ2C_SANDBOX/030")
    assert sandbox.counters.orders_created == 1
    assert sandbox.counters.duplicate_po_refused == 1


async def test_find_orders_filters_on_sold_to_and_reference(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """``$filter=SoldToParty eq '..' and PurchaseOrderByCustomer eq '..'``."""
    first = seed_customer(sandbox, "17100001")
    other = seed_customer(sandbox, "17100002")
    await client.create_order(bundle(first, "Q2C-A"))
    await client.create_order(bundle(first, "Q2C-B"))
    await client.create_order(bundle(other, "Q2C-A"))
    found = await client.find_orders(first, "Q2C-A")
    assert [o.SalesOrder for o in found] == ["1"]
    assert await client.find_orders(first, "Q2C-C") == ()
    quoted = await client.find_orders(first, "it's")
    assert quoted == ()


async def test_top_skip_count_and_expand_shape_the_collection(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """``$top``/``$skip``/``$inlinecount`` page; unexpanded navigations defer."""
    sold_to = seed_customer(sandbox)
    for ref in ("Q2C-A", "Q2C-B", "Q2C-C"):
        await client.create_order(bundle(sold_to, ref))
    page = await raw(
        sandbox,
        "GET",
        f"{SO}/A_SalesOrder?$top=1&$skip=1&$inlinecount=allpages&$expand=to_Item",
    )
    d = page.json()["d"]
    assert d["__count"] == "3"
    (only,) = d["results"]
    assert only["PurchaseOrderByCustomer"] == "Q2C-B"
    assert len(only["to_Item"]["results"]) == 3
    assert "__deferred" in only["to_Partner"]
    assert only["to_Item"]["results"][0]["to_PricingElement"]["__deferred"][
        "uri"
    ].endswith("SalesOrderItem='10')/to_PricingElement")
    bad = await raw(sandbox, "GET", f"{SO}/A_SalesOrder?$filter=TotalNetAmount gt 5")
    assert bad.status == 400
    assert bad.json()["error"]["code"] == "ZQ2C_SANDBOX/002"


async def test_validation_errors_list_every_problem(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """SAP's maxLength and decimal places: each violation an errordetail."""
    sold_to = seed_customer(sandbox)
    bad = msgspec.structs.replace(
        bundle(sold_to),
        PurchaseOrderByCustomer="X" * 36,
        to_Item=(
            A_SalesOrderItem(
                SalesOrderItem="10",
                Material="HW-GATEWAY-200",
                RequestedQuantity=Decimal("1.2345"),
            ),
        ),
    )
    with pytest.raises(SapRejected) as caught:
        await client.create_order(bad)
    error = caught.value
    assert error.status == 400
    assert [(d.code, d.target) for d in error.details] == [
        ("ZQ2C_SANDBOX/010", "A_SalesOrder/PurchaseOrderByCustomer"),
        ("ZQ2C_SANDBOX/011", "A_SalesOrder/to_Item(1)/RequestedQuantity"),
    ]
    assert error.code == "ZQ2C_SANDBOX/010"
    assert sandbox.counters.orders_created == 0


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"SoldToParty": "99999999"}, "ZQ2C_SANDBOX/020"),
        ({"SalesOrganization": "1710"}, "ZQ2C_SANDBOX/021"),
        ({"SalesOrderType": None}, "ZQ2C_SANDBOX/012"),
        (
            {
                "to_Item": (
                    A_SalesOrderItem(Material="NOPE", RequestedQuantity=Decimal(1)),
                )
            },
            "ZQ2C_SANDBOX/022",
        ),
        (
            {
                "to_Item": (
                    A_SalesOrderItem(
                        SalesOrderItem="20",
                        HigherLevelItem="10",
                        Material="HW-MOUNT-KIT",
                        RequestedQuantity=Decimal(1),
                    ),
                )
            },
            "ZQ2C_SANDBOX/023",
        ),
        ({"to_Item": ()}, "ZQ2C_SANDBOX/012"),
    ],
    ids=[
        "unknown-sold-to",
        "not-in-sales-area",
        "no-type",
        "unknown-material",
        "no-parent",
        "no-items",
    ],
)
async def test_business_errors_are_400_with_sap_codes(
    sandbox: SapSandbox, client: SapClient, change: dict[str, Any], code: str
) -> None:
    """Master data and structure are checked as SAP checks them."""
    sold_to = seed_customer(sandbox)
    with pytest.raises(SapRejected) as caught:
        await client.create_order(msgspec.structs.replace(bundle(sold_to), **change))
    assert (caught.value.status, caught.value.code) == (400, code)


async def test_patch_needs_if_match_and_refuses_a_stale_one(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """If-Match current → 204 and a new ETag; stale → 412; absent → 428."""
    sold_to = seed_customer(sandbox)
    await client.create_order(bundle(sold_to))
    _, etag = await client.get_order("1")
    assert etag is not None
    change = A_SalesOrder(CustomerPaymentTerms="NT30")
    new_etag = await client.update_order("1", change, etag=etag)
    assert new_etag not in ("", etag)
    read, _ = await client.get_order("1")
    assert read.CustomerPaymentTerms == "NT30"
    with pytest.raises(ConcurrencyConflict, match="412"):
        await client.update_order("1", change, etag=etag)
    fetched = await raw(sandbox, "GET", f"{SO}/", headers={"X-CSRF-Token": "Fetch"})
    cookie = fetched.headers["Set-Cookie"].split(";")[0]
    headers = {"X-CSRF-Token": fetched.headers["x-csrf-token"], "Cookie": cookie}
    missing = await raw(
        sandbox, "PATCH", f"{SO}/A_SalesOrder('1')", headers=headers, body={"d": {}}
    )
    assert missing.status == 428
    read_only = await raw(
        sandbox,
        "PATCH",
        f"{SO}/A_SalesOrder('1')",
        headers={**headers, "If-Match": "*"},
        body={"TotalNetAmount": "1"},
    )
    assert read_only.status == 400
    assert sandbox.counters.precondition_failed == 1
    assert sandbox.counters.precondition_required == 1


# --- business partners and products -------------------------------------------------


async def test_a_business_partner_is_created_found_and_extended(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Deep create with role and area; found by SearchTerm1; extended; renamed."""
    created = await client.create_business_partner(
        A_BusinessPartner(
            BusinessPartnerCategory="2",
            OrganizationBPName1="Nordwind Logistik GmbH",
            SearchTerm1="q2cabc",
            to_BusinessPartnerRole=(
                A_BusinessPartnerRole(BusinessPartnerRole="FLCU01"),
            ),
            to_Customer=A_Customer(to_CustomerSalesArea=(area(),)),
        )
    )
    assert created.Customer == created.BusinessPartner == "1000001"
    (found,) = await client.find_business_partners("Q2CABC")
    assert found.SearchTerm1 == "Q2CABC"
    assert found.to_Customer is not None
    assert [
        a.SalesOrganization for a in expanded(found.to_Customer.to_CustomerSalesArea)
    ] == ["1010"]
    await client.create_sales_area(
        msgspec.structs.replace(area("1710"), Customer=created.Customer)
    )
    with pytest.raises(SapRejected, match="already"):
        await client.create_sales_area(
            msgspec.structs.replace(area("1710"), Customer=created.Customer)
        )
    partner, etag = await client.get_business_partner("1000001")
    assert partner.to_Customer is not None
    assert len(expanded(partner.to_Customer.to_CustomerSalesArea)) == 2
    assert etag is not None
    await client.update_business_partner(
        "1000001", A_BusinessPartner(OrganizationBPName1="Nordwind AG"), etag=etag
    )
    customer = await raw(sandbox, "GET", f"{BP}/A_Customer('1000001')")
    assert customer.json()["d"]["CustomerName"] == "Nordwind AG"


def billed_partner(*more_taxes: A_BusinessPartnerTaxNumber) -> A_BusinessPartner:
    """An organisation with the customer role, an address and a VAT number."""
    return A_BusinessPartner(
        BusinessPartnerCategory="2",
        OrganizationBPName1="Nordwind Logistik GmbH",
        SearchTerm1="Q2CABC",
        to_BusinessPartnerRole=(A_BusinessPartnerRole(BusinessPartnerRole="FLCU01"),),
        to_BusinessPartnerAddress=(
            A_BusinessPartnerAddress(
                StreetName="Hafenstraße 12",
                CityName="Hamburg",
                PostalCode="20457",
                Country="DE",
                Language="DE",
            ),
        ),
        to_BusinessPartnerTax=(
            A_BusinessPartnerTaxNumber(BPTaxType="DE0", BPTaxNumber="DE123456789"),
            *more_taxes,
        ),
        to_Customer=A_Customer(to_CustomerSalesArea=(area(),)),
    )


async def test_a_partner_is_created_with_address_and_tax_number_and_read_back(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Deep insert: both stamped with the partner; reads expand them with ETags."""
    created = await client.create_business_partner(billed_partner())
    (address,) = expanded(created.to_BusinessPartnerAddress)
    (tax,) = expanded(created.to_BusinessPartnerTax)
    assert (address.BusinessPartner, address.AddressID) == ("1000001", "1")
    assert (tax.BusinessPartner, tax.BPTaxType, tax.BPTaxNumber) == (
        "1000001",
        "DE0",
        "DE123456789",
    )
    (found,) = await client.find_business_partners("Q2CABC")
    partner, _ = await client.get_business_partner("1000001")
    for read in (found, partner):
        (address,) = expanded(read.to_BusinessPartnerAddress)
        (tax,) = expanded(read.to_BusinessPartnerTax)
        assert (address.StreetName, address.CityName, address.Country) == (
            "Hafenstraße 12",
            "Hamburg",
            "DE",
        )
        assert tax.BPTaxNumber == "DE123456789"
        assert address.metadata is not None
        assert address.metadata.etag
        assert tax.metadata is not None
        assert tax.metadata.etag
    one = await raw(
        sandbox,
        "GET",
        f"{BP}/A_BusinessPartnerAddress(BusinessPartner='1000001',AddressID='1')",
    )
    (address,) = expanded(partner.to_BusinessPartnerAddress)
    assert one.json()["d"]["PostalCode"] == "20457"
    assert address.metadata is not None
    assert one.json()["d"]["__metadata"]["etag"] == address.metadata.etag
    assert sandbox.state()["partner_addresses_created"] == 0  # the partner's create


async def test_an_address_patch_needs_a_current_etag(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Current ETag → 204 and a new one; stale → ConcurrencyConflict; absent → 428."""
    await client.create_business_partner(billed_partner())
    partner, _ = await client.get_business_partner("1000001")
    (address,) = expanded(partner.to_BusinessPartnerAddress)
    assert address.metadata is not None
    assert address.metadata.etag is not None
    etag = address.metadata.etag
    change = A_BusinessPartnerAddress(StreetName="Am Sandtorkai 1", PostalCode="20457")
    new_etag = await client.update_partner_address("1000001", "1", change, etag=etag)
    assert new_etag not in ("", etag)
    with pytest.raises(ConcurrencyConflict, match="412"):
        await client.update_partner_address("1000001", "1", change, etag=etag)
    partner, _ = await client.get_business_partner("1000001")
    (address,) = expanded(partner.to_BusinessPartnerAddress)
    assert (address.StreetName, address.CityName) == ("Am Sandtorkai 1", "Hamburg")
    fetched = await raw(sandbox, "GET", f"{BP}/", headers={"X-CSRF-Token": "Fetch"})
    cookie = fetched.headers["Set-Cookie"].split(";")[0]
    headers = {"X-CSRF-Token": fetched.headers["x-csrf-token"], "Cookie": cookie}
    path = f"{BP}/A_BusinessPartnerAddress(BusinessPartner='1000001',AddressID='1')"
    missing = await raw(sandbox, "PATCH", path, headers=headers, body={"CityName": "X"})
    assert missing.status == 428
    key = await raw(
        sandbox,
        "PATCH",
        path,
        headers={**headers, "If-Match": "*"},
        body={"AddressID": "2"},
    )
    assert key.status == 400
    counters = sandbox.counters
    assert (counters.partner_addresses_changed, counters.precondition_failed) == (1, 1)


async def test_addresses_and_tax_numbers_are_added_and_patched_on_their_own(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """POST numbers the next address; a tax number of a new category is added."""
    seed_customer(sandbox)
    added = await client.create_partner_address(
        A_BusinessPartnerAddress(
            BusinessPartner="17100001", Country="DE", PostalCode="sw1"
        )
    )
    assert (added.AddressID, added.PostalCode) == ("1", "SW1")
    tax = await client.create_tax_number(
        A_BusinessPartnerTaxNumber(
            BusinessPartner="17100001", BPTaxType="DE0", BPTaxLongNumber="de" + "1" * 25
        )
    )
    assert tax.BPTaxLongNumber == "DE" + "1" * 25
    partner, _ = await client.get_business_partner("17100001")
    (held,) = expanded(partner.to_BusinessPartnerTax)
    assert held.metadata is not None
    await client.update_tax_number(
        "17100001",
        "DE0",
        A_BusinessPartnerTaxNumber(BPTaxNumber="DE999", BPTaxLongNumber=""),
        etag=held.metadata.etag or "",
    )
    partner, _ = await client.get_business_partner("17100001")
    (held,) = expanded(partner.to_BusinessPartnerTax)
    assert (held.BPTaxNumber, held.BPTaxLongNumber) == ("DE999", "")
    counters = sandbox.counters
    assert (
        counters.partner_addresses_created,
        counters.tax_numbers_created,
        counters.tax_numbers_changed,
    ) == (1, 1, 1)


async def test_the_sandbox_refuses_what_sap_refuses_in_addresses_and_tax_numbers(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """A second number of a category, a bad country, an unknown partner: refused."""
    await client.create_business_partner(billed_partner())
    with pytest.raises(SapRejected) as caught:
        await client.create_tax_number(
            A_BusinessPartnerTaxNumber(
                BusinessPartner="1000001", BPTaxType="DE0", BPTaxNumber="DE2"
            )
        )
    assert (caught.value.status, caught.value.code) == (400, "ZQ2C_SANDBOX/026")
    assert caught.value.details[0].propertyref.endswith("BPTaxType")
    assert "DE0 already exists" in caught.value.detail
    with pytest.raises(SapRejected) as caught:
        await client.create_business_partner(
            billed_partner(
                A_BusinessPartnerTaxNumber(BPTaxType="de0", BPTaxNumber="DE3")
            )
        )
    assert caught.value.code == "ZQ2C_SANDBOX/026"
    for country in ("de", "D", "D1", None):
        with pytest.raises(SapRejected) as caught:
            await client.create_partner_address(
                A_BusinessPartnerAddress(BusinessPartner="1000001", Country=country)
            )
        assert (caught.value.status, caught.value.code) == (400, "ZQ2C_SANDBOX/029")
    with pytest.raises(SapRejected) as caught:
        await client.update_partner_address(
            "1000001", "1", A_BusinessPartnerAddress(Country="ge"), etag="*"
        )
    assert caught.value.code == "ZQ2C_SANDBOX/029"
    with pytest.raises(SapRejected) as caught:
        await client.create_partner_address(
            A_BusinessPartnerAddress(BusinessPartner="999", Country="DE")
        )
    assert (caught.value.status, caught.value.code) == (400, "ZQ2C_SANDBOX/028")
    with pytest.raises(SapRejected) as caught:
        await client.create_tax_number(
            A_BusinessPartnerTaxNumber(
                BusinessPartner="999", BPTaxType="DE0", BPTaxNumber="DE1"
            )
        )
    assert caught.value.code == "ZQ2C_SANDBOX/028"
    with pytest.raises(SapRejected) as caught:
        await client.update_tax_number(
            "999", "DE0", A_BusinessPartnerTaxNumber(BPTaxNumber="DE1"), etag="*"
        )
    assert caught.value.status == 404
    assert len(sandbox.partners.details.addresses["1000001"]) == 1


async def test_products_carry_their_prices_and_filter_by_group(
    client: SapClient,
) -> None:
    """The sandbox's API_PRODUCT_SRV: list price and floor per product."""
    everything = await client.list_products()
    assert len(everything) == 3
    (saas,) = await client.list_products(product_group="SAAS")
    assert (saas.Product, saas.ListPrice, saas.PriceFloor) == (
        "SAAS-FLEET-PRO",
        Decimal("40.00"),
        Decimal("30.00"),
    )
    assert len(await client.list_products(top=2)) == 2


async def test_a_large_product_list_comes_a_page_at_a_time_and_is_read_whole(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Server-driven paging: ``__next`` with a ``$skiptoken``, followed to the end."""
    sandbox.knobs.max_page_size = 2
    first = await raw(
        sandbox,
        "GET",
        "/sap/opu/odata/sap/API_PRODUCT_SRV/A_Product",
        headers={"Authorization": AUTH},
    )
    d = first.json()["d"]
    assert len(d["results"]) == 2
    assert "$skiptoken=2" in d["__next"]
    everything = await client.list_products()
    assert sorted(p.Product for p in everything) == sorted(
        p.Product for p in products()
    )
    assert len(await client.list_products(top=3)) == 3
    sandbox.knobs.max_page_size = 1
    assert len(await client.list_products(top=2)) == 2


async def test_a_next_link_that_does_not_advance_is_an_error_not_a_loop() -> None:
    """A server whose ``__next`` points back at the same page: refused at once."""
    calls = 0

    async def same_page(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        page = {"results": [{"Product": "P-1"}], "__next": str(request.url)}
        return web.json_response({"d": page})

    app = web.Application()
    app.router.add_get("/sap/opu/odata/sap/API_PRODUCT_SRV/A_Product", same_page)
    server = TestServer(app)
    await server.start_server()
    try:
        settings = SapSettings(
            base_url=str(server.make_url("/")).rstrip("/"), username=USER, password="x"
        )
        async with SapClient(settings) as sap:
            with pytest.raises(UpstreamUnavailable, match="does not advance"):
                await sap.list_products()
    finally:
        await server.close()
    assert calls == 1


# --- errors and knobs --------------------------------------------------------------


async def test_rate_limit_answers_429_with_retry_after(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Beyond the rate: 429, and the client reports Retry-After."""
    sandbox.knobs.rate_limit_per_s = 0.5
    await client.list_products()
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.list_products()
    assert caught.value.retry_after_s == 2.0
    assert sandbox.counters.rate_limited == 1


async def test_error_rate_answers_writes_with_5xx(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """Injected 500/503s on writes are transient; reads are unaffected."""
    sold_to = seed_customer(sandbox)
    sandbox.knobs.error_rate = 1.0
    with pytest.raises(
        UpstreamUnavailable, match=r"answered 50[03]: ZQ2C_SANDBOX/50[03]"
    ):
        await client.create_order(bundle(sold_to))
    assert await client.find_orders(sold_to, "Q2C-1") == ()
    assert sandbox.counters.injected_errors == 1


async def test_the_outage_knob_set_over_http_fails_every_call(
    sandbox: SapSandbox, client: SapClient
) -> None:
    """``POST /_sandbox/knobs`` turns the outage on; every call is 503."""
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{sandbox.url}/_sandbox/knobs", json={"outage": True}
        ) as r:
            assert r.status == 200
            assert (await r.json())["outage"] is True
        async with http.post(f"{sandbox.url}/_sandbox/knobs", json={"outrage": 1}) as r:
            assert r.status == 400
        with pytest.raises(UpstreamUnavailable, match="503"):
            await client.list_products()
        async with http.get(f"{sandbox.url}/_sandbox/state") as r:
            state = await r.json()
    assert sandbox.knobs.outage is True
    assert state["outage_refused"] == 1


async def test_a_timeout_is_unavailable(sandbox: SapSandbox) -> None:
    """Slower than the client's timeout: UpstreamUnavailable naming the timeout."""
    sandbox.knobs.latency_s = 2.0
    async with SapClient(settings_for(sandbox, timeout_s=0.2)) as sap:
        with pytest.raises(UpstreamUnavailable, match="timed out"):
            await sap.list_products()


async def test_a_refused_connection_is_unavailable() -> None:
    """Nobody listening: UpstreamUnavailable, not an aiohttp exception."""
    closed = SapSandbox()
    await closed.start()
    await closed.aclose()
    async with SapClient(settings_for(closed)) as sap:
        with pytest.raises(UpstreamUnavailable, match="ClientConnectorError"):
            await sap.list_products()


def test_settings_come_from_the_config_table_and_hide_the_password() -> None:
    """A ``[systems.erp_cloud]`` table converts; the password never prints."""
    settings = convert_table(
        SapSettings,
        {"base-url": "https://h", "username": "U", "password": "s3cret"},
        where="[systems.erp_cloud]",
    )
    assert settings.timeout_s == 10.0
    assert "s3cret" not in repr(settings)
    with pytest.raises(ConfigError, match="base-url"):
        convert_table(
            SapSettings,
            {"base-url": "ftp://h", "username": "U"},
            where="[systems.erp_cloud]",
        )
