"""Conformance: SAP's sales-order requests and contracts (WIRE-FORMATS §6, §7).

Read from the shared corpus beside the repository, never copied into it:

- the two deep-insert request bodies (``to_Item`` as ``{"results": [...]}``
  and as a bare array) parse into the views, map to a canonical order and
  back, and are accepted by the sandbox over HTTP;
- SAP's OpenAPI description of ``API_SALES_ORDER_SRV``: every field the
  sales-order views declare exists there, with the ``maxLength`` (or decimal
  scale) the views enforce;
- the ``$metadata`` of ``API_BUSINESS_PARTNER`` (read with ``xml.etree``):
  the same for the business-partner views, against ``MaxLength``.
"""

from __future__ import annotations

import types
import typing
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Union

import aiohttp
import msgspec
import pytest

from adapters.erp_cloud import (
    MappingOptions,
    OrderContext,
    SapSandbox,
    edm,
    from_sales_order,
    to_sales_order,
)
from adapters.erp_cloud.edm import EdmDateTime, EdmDateTimeOffset
from adapters.erp_cloud.views import (
    A_BusinessPartner,
    A_BusinessPartnerRole,
    A_Customer,
    A_CustomerSalesArea,
    A_SalesOrder,
    A_SalesOrderHeaderPartner,
    A_SalesOrderHeaderPrElement,
    A_SalesOrderItem,
    A_SalesOrderItemPartner,
    A_SalesOrderItemPrElement,
    Navigation,
    ODataError,
    Single,
    expanded,
    field_limits,
)
from canonical.commerce import Account

PAYLOADS = Path(__file__).resolve().parents[2] / ".." / "shared" / "payloads"
RESULTS_FORM = "sap_a_salesorder_create_request.json"
ARRAY_FORM = "sap_a_salesorder_create_request_array_form.json"
OPENAPI = "sap_op_api_sales_order_srv_0001.openapi.json"
EDMX = "sap_api_business_partner.edmx"
EDM = "{http://schemas.microsoft.com/ado/2008/09/edm}"

SALES_ORDER_VIEWS = {
    A_SalesOrder: "A_SalesOrderType",
    A_SalesOrderItem: "A_SalesOrderItemType",
    A_SalesOrderHeaderPartner: "A_SalesOrderHeaderPartnerType",
    A_SalesOrderItemPartner: "A_SalesOrderItemPartnerType",
    A_SalesOrderHeaderPrElement: "A_SalesOrderHeaderPrElementType",
    A_SalesOrderItemPrElement: "A_SalesOrderItemPrElementType",
}
PARTNER_VIEWS = {
    A_BusinessPartner: "A_BusinessPartnerType",
    A_BusinessPartnerRole: "A_BusinessPartnerRoleType",
    A_Customer: "A_CustomerType",
    A_CustomerSalesArea: "A_CustomerSalesAreaType",
}


def payload(name: str) -> bytes:
    path = PAYLOADS / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared payload corpus is not here)")
    return path.read_bytes()


def view_fields(view: type[msgspec.Struct]) -> Iterator[msgspec.structs.FieldInfo]:
    """The view's SAP properties (``__metadata`` is protocol, not a property)."""
    return (f for f in msgspec.structs.fields(view) if f.encode_name != "__metadata")


def base_type(annotation: Any) -> Any:
    """``Str10 | None`` → ``str``; ``ToMany[X] | None`` → ``Navigation``."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return base_type(args[0])
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return typing.get_origin(annotation) or annotation


# --- the saved create requests ----------------------------------------------------


@pytest.mark.parametrize("name", [RESULTS_FORM, ARRAY_FORM])
def test_each_saved_request_parses_with_every_field_kept(name: str) -> None:
    """Both navigation forms decode; every property of the sample is a view field."""
    raw = payload(name)
    order = edm.decode(raw, A_SalesOrder)
    plain = msgspec.json.decode(raw)
    items = plain["to_Item"]
    entries = items["results"] if isinstance(items, dict) else items
    header_names = {f.encode_name for f in view_fields(A_SalesOrder)}
    item_names = {f.encode_name for f in view_fields(A_SalesOrderItem)}
    assert set(plain) <= header_names
    assert all(set(entry) <= item_names for entry in entries)
    parsed = expanded(order.to_Item)
    assert [i.Material for i in parsed] == [e["Material"] for e in entries]
    assert [i.RequestedQuantity for i in parsed] == [
        Decimal(e["RequestedQuantity"]) for e in entries
    ]
    assert isinstance(order.to_Item, Navigation) == isinstance(items, dict)


@pytest.mark.parametrize("name", [RESULTS_FORM, ARRAY_FORM])
def test_each_saved_request_maps_to_canonical_and_back(name: str) -> None:
    """Sample → canonical order → deep insert: the sample's mapped fields survive."""
    sample = edm.decode(payload(name), A_SalesOrder)
    context = OrderContext(
        order_id="order-X1",
        deal_id="deal-X1",
        quote_id="quote-X1",
        account=Account(id="acct-X1", name="Demo", country="DE", currency="EUR"),
        legal_entity="DE01",
        region="EMEA",
        tax_country="DE",
        currency="EUR",
        payment_terms="0001",
    )
    canonical = from_sales_order(sample, context)
    assert canonical.sales_org == sample.SalesOrganization
    assert canonical.customer_ref == (sample.PurchaseOrderByCustomer or "Q2C-X1")
    assert [line.sku for line in canonical.lines] == [
        i.Material for i in expanded(sample.to_Item)
    ]
    back = to_sales_order(
        canonical,
        sold_to=sample.SoldToParty or "",
        options=MappingOptions(order_type=sample.SalesOrderType or "OR"),
    )
    header = (
        "SalesOrderType",
        "SalesOrganization",
        "DistributionChannel",
        "OrganizationDivision",
        "SoldToParty",
    )
    assert [getattr(back, f) for f in header] == [getattr(sample, f) for f in header]
    if sample.PurchaseOrderByCustomer:
        assert back.PurchaseOrderByCustomer == sample.PurchaseOrderByCustomer
    item = ("SalesOrderItem", "Material", "RequestedQuantity")
    assert [[getattr(i, f) for f in item] for i in expanded(back.to_Item)] == [
        [getattr(i, f) for f in item] for i in expanded(sample.to_Item)
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("name", [RESULTS_FORM, ARRAY_FORM])
async def test_the_sandbox_books_each_saved_request(name: str) -> None:
    """Posted as published (after the CSRF handshake), each sample is created 201."""
    raw = payload(name)
    sample = edm.decode(raw, A_SalesOrder)
    sap = SapSandbox(username="U", password="P")
    sap.seed_customer(
        sample.SoldToParty or "",
        name="Demo",
        sales_areas=[
            A_CustomerSalesArea(
                SalesOrganization=sample.SalesOrganization or "",
                DistributionChannel=sample.DistributionChannel or "",
                Division=sample.OrganizationDivision or "",
            )
        ],
    )
    url = await sap.start()
    service = f"{url}/sap/opu/odata/sap/API_SALES_ORDER_SRV"
    auth = {"Authorization": aiohttp.encode_basic_auth("U", "P")}
    try:
        async with aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True), headers=auth
        ) as http:
            async with http.head(service, headers={"X-CSRF-Token": "fetch"}) as r:
                token = r.headers["x-csrf-token"]
            async with http.post(
                f"{service}/A_SalesOrder",
                data=raw,
                headers={"X-CSRF-Token": token, "Content-Type": "application/json"},
            ) as r:
                assert r.status == 201, await r.text()
                created = edm.decode(await r.read(), Single[A_SalesOrder]).d
    finally:
        await sap.aclose()
    assert [i.Material for i in expanded(created.to_Item)] == [
        i.Material for i in expanded(sample.to_Item)
    ]
    if sample.SalesOrder:
        assert created.SalesOrder == sample.SalesOrder.lstrip("0")


# --- SAP's OpenAPI description -------------------------------------------------


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    spec: dict[str, Any] = msgspec.json.decode(payload(OPENAPI))
    return spec


@pytest.mark.parametrize("view", list(SALES_ORDER_VIEWS), ids=lambda v: v.__name__)
def test_sales_order_views_match_the_openapi_spec(
    view: type[msgspec.Struct], openapi: dict[str, Any]
) -> None:
    """Every field exists in the entity type, with the same maxLength or scale."""
    schema = openapi["components"]["schemas"][
        f"API_SALES_ORDER_SRV.{SALES_ORDER_VIEWS[view]}"
    ]
    properties: dict[str, Any] = schema["properties"]
    limits = field_limits(view)
    for field in view_fields(view):
        name = field.encode_name
        assert name in properties, f"{view.__name__}.{name} is not in SAP's spec"
        spec = properties[name]
        kind = base_type(field.type)
        if kind is str:
            assert limits[name].max_length == spec.get("maxLength"), name
        elif kind is Decimal:
            assert spec["format"] == "decimal", name
            scale = limits[name].scale
            assert scale is not None, name
            assert Decimal(str(spec["multipleOf"])) == Decimal(1).scaleb(-scale), name
        elif kind in (EdmDateTime, EdmDateTimeOffset):
            assert spec["example"].startswith("/Date("), name
        elif kind is bool:
            assert spec["type"] == "boolean", name
        else:
            assert kind is Navigation, name
            target = spec["properties"]["results"]["items"]["$ref"]
            assert target.endswith("Type"), name


def test_the_error_view_matches_the_spec(openapi: dict[str, Any]) -> None:
    """``{"error": {"code", "message": {"lang", "value"}, "innererror"}}``."""
    error = openapi["components"]["schemas"]["error"]["properties"]["error"]
    assert set(error["required"]) == {"code", "message"}
    assert set(error["properties"]) == {"code", "message", "innererror"}
    assert set(error["properties"]["message"]["required"]) == {"lang", "value"}
    sample = {"error": {"code": "X/1", "message": {"lang": "en", "value": "v"}}}
    assert edm.convert(sample, ODataError).error.message.value == "v"


# --- API_BUSINESS_PARTNER's $metadata -------------------------------------------


@pytest.fixture(scope="module")
def edmx() -> dict[str, dict[str, dict[str, str]]]:
    """Entity type → property or navigation name → its attributes (local names)."""
    root = ET.fromstring(payload(EDMX))
    types_: dict[str, dict[str, dict[str, str]]] = {}
    for entity in root.iter(f"{EDM}EntityType"):
        members: dict[str, dict[str, str]] = {}
        for child in entity:
            if child.tag in (f"{EDM}Property", f"{EDM}NavigationProperty"):
                attributes = {k.rpartition("}")[2]: v for k, v in child.attrib.items()}
                attributes["kind"] = child.tag.removeprefix(EDM)
                members[child.attrib["Name"]] = attributes
        types_[entity.attrib["Name"]] = members
    return types_


@pytest.mark.parametrize("view", list(PARTNER_VIEWS), ids=lambda v: v.__name__)
def test_business_partner_views_match_the_metadata(
    view: type[msgspec.Struct], edmx: dict[str, dict[str, dict[str, str]]]
) -> None:
    """Every field exists in the entity type, with the same MaxLength and Edm type."""
    members = edmx[PARTNER_VIEWS[view]]
    limits = field_limits(view)
    edm_types = {
        bool: "Edm.Boolean",
        EdmDateTime: "Edm.DateTime",
        EdmDateTimeOffset: "Edm.DateTimeOffset",
    }
    for field in view_fields(view):
        name = field.encode_name
        assert name in members, f"{view.__name__}.{name} is not in the $metadata"
        member = members[name]
        kind = base_type(field.type)
        if kind is str:
            assert member["Type"] in ("Edm.String", "Edm.Guid"), name
            expected = member.get("MaxLength")
            assert limits[name].max_length == (int(expected) if expected else None), (
                name
            )
        elif kind in edm_types:
            assert member["Type"] == edm_types[kind], name
        else:
            assert member["kind"] == "NavigationProperty", name
