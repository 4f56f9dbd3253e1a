"""The SAP views: navigation forms, envelopes, errors, messages, limits."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from adapters.erp_cloud import edm
from adapters.erp_cloud.views import (
    A_BusinessPartner,
    A_BusinessPartnerAddress,
    A_BusinessPartnerTaxNumber,
    A_SalesOrder,
    A_SalesOrderItem,
    Collection,
    FieldLimit,
    Navigation,
    ODataError,
    SapNotice,
    Single,
    expanded,
    field_limits,
)

ITEM = b'{"SalesOrderItem":"10","Material":"HW-1","RequestedQuantity":"2"}'


@pytest.mark.parametrize(
    "to_item",
    [b'{"results":[' + ITEM + b"]}", b"[" + ITEM + b"]"],
    ids=["results", "bare-array"],
)
def test_a_deep_insert_reads_both_navigation_forms(to_item: bytes) -> None:
    """``to_Item`` as ``{"results": [...]}`` and as a bare array give the same items."""
    order = edm.decode(
        b'{"SoldToParty":"17100001","to_Item":' + to_item + b"}", A_SalesOrder
    )
    (item,) = expanded(order.to_Item)
    assert (item.SalesOrderItem, item.Material, item.RequestedQuantity) == (
        "10",
        "HW-1",
        Decimal(2),
    )


def test_a_deferred_navigation_has_no_entities() -> None:
    """``__deferred`` keeps its URI and expands to nothing."""
    order = edm.decode(
        b'{"SalesOrder":"1","to_Item":{"__deferred":{"uri":"https://h/A_SalesOrder(\'1\')/to_Item"}}}',
        A_SalesOrder,
    )
    assert isinstance(order.to_Item, Navigation)
    assert order.to_Item.deferred is not None
    assert order.to_Item.deferred.uri.endswith("/to_Item")
    assert expanded(order.to_Item) == ()
    assert expanded(None) == ()


def test_single_and_collection_envelopes_with_metadata() -> None:
    """``{"d": ...}`` and ``{"d": {"results", "__count"}}``, with ``__metadata``."""
    entity = (
        b'{"__metadata":{"id":"u","uri":"u","type":"API_SALES_ORDER_SRV.A_SalesOrderType",'
        b'"etag":"W/\\"x\\""},"SalesOrder":"1","TotalNetAmount":"52.650",'
        b'"LastChangeDateTime":"/Date(1492098664000+0000)/","Unknown":"ignored"}'
    )
    one = edm.decode(b'{"d":' + entity + b"}", Single[A_SalesOrder])
    assert one.d.metadata is not None
    assert one.d.metadata.etag == 'W/"x"'
    assert one.d.TotalNetAmount == Decimal("52.650")
    many = edm.decode(
        b'{"d":{"results":[' + entity + b'],"__count":"1"}}', Collection[A_SalesOrder]
    )
    assert many.d.count == "1"
    assert [o.SalesOrder for o in many.d.results] == ["1"]


def test_a_view_encodes_as_a_request_body_without_nulls() -> None:
    """Unset fields are left out; ``__metadata`` only when present."""
    body = edm.encode(
        A_SalesOrder(SalesOrderType="OR", to_Item=(A_SalesOrderItem(Material="X"),))
    )
    assert body == b'{"SalesOrderType":"OR","to_Item":[{"Material":"X"}]}'


def test_the_error_body_reads_with_its_details() -> None:
    """SAP's error body: code, message, innererror with errordetails."""
    body = (
        b'{"error":{"code":"V1/302","message":{"lang":"en","value":"Sold-to missing"},'
        b'"innererror":{"application":{"component_id":"SD-SLS-API","service_namespace":"/SAP/",'
        b'"service_id":"API_SALES_ORDER_SRV","service_version":"0001"},'
        b'"transactionid":"ABC","timestamp":"20250101120000.1234567",'
        b'"Error_Resolution":{"SAP_Transaction":"x","SAP_Note":"y"},'
        b'"errordetails":[{"code":"V1/302","message":"Sold-to missing",'
        b'"propertyref":"","severity":"error","target":"","transition":false}]}}}'
    )
    error = edm.decode(body, ODataError).error
    assert (error.code, error.message.value) == ("V1/302", "Sold-to missing")
    assert error.innererror is not None
    assert [d.code for d in error.innererror.errordetails] == ["V1/302"]


def test_sap_message_flattens_its_details() -> None:
    """The ``sap-message`` header: one message with more in ``details``."""
    notice = msgspec.json.decode(
        b'{"code":"A/1","message":"first","severity":"warning","target":"",'
        b'"details":[{"code":"B/2","message":"second","severity":"info","target":"X"}]}',
        type=SapNotice,
    )
    assert [(n.code, n.severity) for n in notice.flatten()] == [
        ("A/1", "warning"),
        ("B/2", "info"),
    ]


def test_field_limits_follow_the_annotations() -> None:
    """Strings carry maxLength, decimals their scale; other types none."""
    limits = field_limits(A_SalesOrder)
    assert limits["PurchaseOrderByCustomer"] == FieldLimit(max_length=35)
    assert limits["TotalNetAmount"] == FieldLimit(scale=3)
    assert "LastChangeDateTime" not in limits
    assert field_limits(A_BusinessPartner)["SearchTerm1"] == FieldLimit(max_length=20)
    assert field_limits(A_BusinessPartner)["BusinessPartnerUUID"] == FieldLimit()


EDMX = (
    Path(__file__).resolve().parents[3]
    / ".."
    / "shared"
    / "payloads"
    / "sap_api_business_partner.edmx"
)
EDM = "{http://schemas.microsoft.com/ado/2008/09/edm}"


@pytest.mark.parametrize(
    ("view", "entity_type", "keys"),
    [
        (
            A_BusinessPartnerAddress,
            "A_BusinessPartnerAddressType",
            ["BusinessPartner", "AddressID"],
        ),
        (
            A_BusinessPartnerTaxNumber,
            "A_BusinessPartnerTaxNumberType",
            ["BusinessPartner", "BPTaxType"],
        ),
    ],
    ids=["address", "tax-number"],
)
def test_address_and_tax_number_views_match_the_metadata(
    view: type[msgspec.Struct], entity_type: str, keys: list[str]
) -> None:
    """Keys, names and MaxLength as in SAP's ``$metadata`` of API_BUSINESS_PARTNER."""
    if not EDMX.is_file():
        pytest.skip(f"{EDMX} is absent (the shared payload corpus is not here)")
    root = ET.fromstring(EDMX.read_bytes())
    (entity,) = (
        e for e in root.iter(f"{EDM}EntityType") if e.attrib["Name"] == entity_type
    )
    assert [k.attrib["Name"] for k in entity.iter(f"{EDM}PropertyRef")] == keys
    lengths = {
        p.attrib["Name"]: int(p.attrib["MaxLength"])
        for p in entity.iter(f"{EDM}Property")
        if "MaxLength" in p.attrib
    }
    limits = field_limits(view)
    assert set(limits) <= set(lengths)
    assert {name: limits[name].max_length for name in limits} == {
        name: lengths[name] for name in limits
    }
    assert set(keys) <= set(limits)
