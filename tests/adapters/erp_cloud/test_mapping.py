"""Canonical ⇄ SAP mapping, pinned by golden samples.

``tests/contract/golden/erp_cloud/`` holds project-written samples: inputs (a
canonical booking command, SAP's answer to a create, business events, a
product list) and what the mapping makes of them (pinned outputs). The round
trip goes canonical order → deep insert → canonical order. Regenerate the
pinned outputs after a deliberate change with ``Q2C_WRITE_GOLDEN=1``.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.erp_cloud import edm
from adapters.erp_cloud.mapping import (
    FIELD_MAP,
    MappingOptions,
    OrderContext,
    SalesArea,
    address_changes,
    catalogue_entry,
    from_sales_order,
    invoice_issued,
    order_booked,
    order_rejected,
    sales_area_of,
    sales_order_booked,
    search_term,
    shipment_dispatched,
    tax_changes,
    to_business_partner,
    to_partner_address,
    to_sales_order,
    to_tax_number,
)
from adapters.erp_cloud.views import (
    A_BusinessPartnerAddress,
    A_BusinessPartnerTaxNumber,
    A_Product,
    A_SalesOrder,
    BillingDocumentEventData,
    Collection,
    OutboundDeliveryEventData,
    SalesOrderEventData,
    SapNotice,
    Single,
    expanded,
)
from adapters.fieldmap import render
from canonical.commerce import Address, Order, OrderLine
from canonical.ids import DealRef, deal_ref
from canonical.q2c import OrderBookingRequested
from tests.adapters.erp_cloud.samples import ACCOUNT, BILLED, order

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "erp_cloud"
SOLD_TO = "1000001"
OPTIONS = MappingOptions(sales_areas={"DE01": SalesArea(sales_organization="1010")})
_encoder = msgspec.json.Encoder()


def golden_input(name: str, into: type[Any]) -> Any:
    return edm.decode((GOLDEN / name).read_bytes(), into)


def assert_golden(name: str, value: Any, *, sap: bool = False) -> None:
    """*value* encodes to the pinned file byte for byte (SAP views with edm)."""
    raw = edm.encode(value) if sap else _encoder.encode(value)
    encoded = msgspec.json.format(raw, indent=2) + b"\n"
    path = GOLDEN / name
    if os.environ.get("Q2C_WRITE_GOLDEN"):
        path.write_bytes(encoded)
    assert encoded == path.read_bytes(), f"{name} changed: see {path}"


def golden_order() -> Order:
    command: OrderBookingRequested = golden_input(
        "booking_requested.json", OrderBookingRequested
    )
    return command.order


def context_of(canonical: Order) -> OrderContext:
    return OrderContext(
        order_id=canonical.id,
        deal_id=canonical.deal_id,
        quote_id=canonical.quote_id,
        account=canonical.account,
        legal_entity=canonical.legal_entity,
        region=canonical.region,
        tax_country=canonical.tax_country,
        currency=canonical.currency,
        payment_terms=canonical.payment_terms,
    )


def test_an_order_becomes_the_pinned_deep_insert() -> None:
    """The booking command's order → ``A_SalesOrder`` deep insert, byte for byte."""
    insert = to_sales_order(golden_order(), sold_to=SOLD_TO, options=OPTIONS)
    assert_golden("sales_order_deep_insert.json", insert, sap=True)


def test_the_deep_insert_maps_back_to_the_order() -> None:
    """Round trip: everything SAP's order carries comes back unchanged.

    What the deep insert has no field for (a line's ``recurring``,
    ``term_months``, ``tax_code``, ``revenue_class``) comes back at its default,
    and a discounted line's ``unit_price`` comes back as the effective price
    SAP was given (net amount / quantity).
    """
    canonical = golden_order()
    insert = golden_input("sales_order_deep_insert.json", A_SalesOrder)
    back = from_sales_order(insert, context_of(canonical))
    lost = tuple(
        msgspec.structs.replace(
            line,
            unit_price=line.net_amount / line.quantity,
            recurring=False,
            term_months=None,
            tax_code="",
            revenue_class="",
        )
        for line in canonical.lines
    )
    assert back == msgspec.structs.replace(canonical, lines=lost)
    assert back.lines[1].unit_price == Decimal("42.75")


def test_the_created_order_becomes_the_pinned_booking() -> None:
    """SAP's 201 answer, with a duplicate warning, → ``erp.order.booked``."""
    created = golden_input("sales_order_created.json", Single[A_SalesOrder]).d
    warning = SapNotice(code="V4/115", message="PO already exists", severity="warning")
    booked = order_booked(golden_order(), created, (warning,))
    assert_golden("order_booked.json", booked)
    assert booked.erp_order_id == "4711"
    assert booked.net_total == golden_order().net_total
    assert booked.warnings == ("V4/115: PO already exists",)


def test_a_zero_padded_number_names_the_order_alike_in_create_and_event() -> None:
    """SAP sends ``0000004711``: the create's answer and its echo both say ``4711``.

    Otherwise the deal would take the echo of its own create for a second
    booking under another number (a duplicate to cancel).
    """
    order = golden_order()
    created = golden_input("sales_order_created.json", Single[A_SalesOrder]).d
    padded = msgspec.structs.replace(created, SalesOrder="0000004711")
    event = SalesOrderEventData(
        SalesOrder="0000004711",
        PurchaseOrderByCustomer=order.customer_ref,
        TotalNetAmount=order.net_total.amount,
        TransactionCurrency=order.net_total.currency,
    )
    ref = DealRef(deal_id=order.deal_id, order_id=order.id)

    from_create = order_booked(order, padded)
    from_event = sales_order_booked(event, ref)

    assert from_create.erp_order_id == from_event.erp_order_id == "4711"
    keyed = msgspec.structs.replace(created, SalesOrder="SO-17")
    assert order_booked(order, keyed).erp_order_id == "SO-17"


def test_a_refusal_becomes_the_pinned_rejection() -> None:
    """SAP's error code and text → ``erp.order.rejected`` with the order's total."""
    rejected = order_rejected(
        golden_order(), code="V1/302", message="Sold-to party 1000001 is blocked"
    )
    assert_golden("order_rejected.json", rejected)


def test_an_account_becomes_the_pinned_business_partner() -> None:
    """An organisation with the customer role in the sales area, address and VAT id."""
    partner = to_business_partner(
        BILLED,
        areas=[SalesArea(sales_organization="1010")],
        payment_terms="NT30",
        options=MappingOptions(partner_grouping="BP02"),
    )
    assert_golden("business_partner.json", partner, sap=True)


def test_the_delivery_event_becomes_the_pinned_shipment() -> None:
    """``OutboundDelivery.Created`` data → ``erp.shipment.dispatched``."""
    event = msgspec.json.decode(
        (GOLDEN / "event_outbound_delivery_created.json").read_bytes()
    )
    data = msgspec.convert(event["data"], OutboundDeliveryEventData)
    ref = deal_ref(data.PurchaseOrderByCustomer)
    assert ref is not None
    assert_golden("shipment_dispatched.json", shipment_dispatched(data, ref, at=None))


def test_the_billing_event_becomes_the_pinned_invoice() -> None:
    """``BillingDocument.Created`` → ``erp.invoice.issued``, the billed amount."""
    event = msgspec.json.decode(
        (GOLDEN / "event_billing_document_created.json").read_bytes()
    )
    data = msgspec.convert(event["data"], BillingDocumentEventData)
    ref = deal_ref(data.PurchaseOrderByCustomer)
    assert ref is not None
    issued = invoice_issued(data, ref, at=None)
    assert_golden("invoice_issued.json", issued)
    assert issued.invoice.amount == golden_order().net_total


def test_the_product_list_becomes_the_pinned_catalogue() -> None:
    """``A_Product`` rows → products and price book entries (unpriced: none)."""
    rows = golden_input("products.json", Collection[A_Product]).d.results
    entries = [catalogue_entry(row, default_currency="EUR") for row in rows]
    assert_golden("catalogue.json", entries)
    (_, hardware_price), (saas, _), (legacy, legacy_price) = entries
    assert hardware_price is not None
    assert hardware_price.floor_price == Decimal("950.00")
    assert not saas.physical
    assert (legacy.family, legacy.active, legacy_price) == ("UNGROUPED", False, None)


# --- the decisions --------------------------------------------------------------


def test_items_carry_bundle_parents_plants_and_categories() -> None:
    """Line n is item n*10; a bundle child names its parent; services are TAD."""
    insert = to_sales_order(order(), sold_to=SOLD_TO, options=OPTIONS)
    rows = [
        (
            i.SalesOrderItem,
            i.HigherLevelItem,
            i.SalesOrderItemCategory,
            i.ProductionPlant,
        )
        for i in expanded(insert.to_Item)
    ]
    assert rows == [
        ("10", None, "TAN", "DE10"),
        ("20", "10", "TAN", "DE10"),
        ("30", None, "TAD", None),
    ]


def test_a_discounted_line_is_priced_at_its_effective_unit_price() -> None:
    """4 x 45.00 listed but 171.00 net: the condition rate is 42.75."""
    items = expanded(to_sales_order(order(), sold_to=SOLD_TO, options=OPTIONS).to_Item)
    rates = [expanded(i.to_PricingElement)[0].ConditionRateValue for i in items]
    assert rates == [Decimal("1100"), Decimal("42.75"), Decimal("36")]
    thirds = OrderLine(
        number=1,
        sku="HW-1",
        quantity=Decimal(3),
        unit_price=Decimal("33.34"),
        net_amount=Decimal("100.00"),
    )
    (item,) = expanded(
        to_sales_order(order(lines=(thirds,)), sold_to="1", options=OPTIONS).to_Item
    )
    (price,) = expanded(item.to_PricingElement)
    assert price.ConditionRateValue == Decimal("33.333333333")


def test_the_customer_reference_is_the_orders_and_fits_sap() -> None:
    """``PurchaseOrderByCustomer`` is ``customer_ref``; the id goes along if ≤ 40."""
    insert = to_sales_order(order(), sold_to=SOLD_TO, options=OPTIONS)
    assert insert.PurchaseOrderByCustomer == "Q2C-006Hn00000A1b2cIAB"
    assert insert.ExternalDocumentID == "order-006Hn00000A1b2cIAB"
    long_id = msgspec.structs.replace(order(), id="order-" + "x" * 40)
    assert (
        to_sales_order(long_id, sold_to="1", options=OPTIONS).ExternalDocumentID is None
    )


def test_the_sales_area_comes_from_the_legal_entity_when_configured() -> None:
    """A configured legal entity wins; otherwise the order's own fields."""
    options = MappingOptions(
        sales_areas={
            "US01": SalesArea(sales_organization="1710", distribution_channel="20")
        }
    )
    assert sales_area_of(order(legal_entity="US01"), options) == SalesArea(
        sales_organization="1710", distribution_channel="20"
    )
    assert sales_area_of(order(legal_entity="FR01"), options) == SalesArea(
        sales_organization="1010"
    )


def test_payment_terms_are_mapped_or_refused() -> None:
    """A mapped term is sent as SAP's key; an unmapped one over 4 is refused."""
    mapped = MappingOptions(payment_terms={"net-30": "NT30"})
    insert = to_sales_order(order(payment_terms="net-30"), sold_to="1", options=mapped)
    assert insert.CustomerPaymentTerms == "NT30"
    with pytest.raises(ValueError, match="payment terms 'net-45'"):
        to_sales_order(order(payment_terms="net-45"), sold_to="1", options=mapped)


def test_the_search_term_is_short_upper_case_and_case_sensitive_to_the_id() -> None:
    """≤ 20 upper-case characters; ids differing only in case get different terms."""
    term = search_term("acct-001Hn00000XyZ12IAF")
    assert len(term) == 20
    assert term == term.upper()
    assert term == search_term("acct-001Hn00000XyZ12IAF")
    assert term != search_term("acct-001hn00000xyz12iab")


def test_only_q2c_references_lead_to_a_deal() -> None:
    """``Q2C-X`` → deal-X / order-X; anything else belongs to no deal."""
    assert deal_ref("Q2C-006Hn00000A1b2cIAB") == DealRef(
        deal_id="deal-006Hn00000A1b2cIAB", order_id="order-006Hn00000A1b2cIAB"
    )
    assert deal_ref("Holger Bruchelt") is None
    assert deal_ref(None) is None


def test_a_billing_event_without_an_amount_is_refused() -> None:
    """An invoice needs an amount and a currency."""
    ref = DealRef(deal_id="deal-1", order_id="order-1")
    with pytest.raises(ValueError, match="no amount"):
        invoice_issued(
            BillingDocumentEventData(BillingDocument="9"),
            ref,
            at=datetime(2025, 1, 1, tzinfo=UTC),
        )


def test_the_field_map_renders() -> None:
    """The field map prints as a table naming both sides."""
    table = render("SAP S/4HANA Cloud", FIELD_MAP)
    assert "order.customer_ref" in table
    assert "PurchaseOrderByCustomer" in table


def test_the_field_map_lists_the_address_and_the_tax_number() -> None:
    """Every canonical field of the partner's address and tax number is listed."""
    table = render("SAP S/4HANA Cloud", FIELD_MAP)
    for canonical, native in [
        ("account.billing_address.street", "A_BusinessPartnerAddress.StreetName"),
        ("account.billing_address.city", "A_BusinessPartnerAddress.CityName"),
        ("account.billing_address.postal_code", "A_BusinessPartnerAddress.PostalCode"),
        ("account.billing_address.region", "A_BusinessPartnerAddress.Region"),
        ("account.billing_address.country", "A_BusinessPartnerAddress.Country"),
        ("account.country", "A_BusinessPartnerTaxNumber.BPTaxType"),
        ("account.tax_id", "A_BusinessPartnerTaxNumber.BPTaxNumber"),
        ("account.tax_id", "A_BusinessPartnerTaxNumber.BPTaxLongNumber"),
    ]:
        assert any((m.canonical, m.native) == (canonical, native) for m in FIELD_MAP), (
            native
        )
        assert native in table


# --- the partner's address and tax number -----------------------------------------


def test_the_billing_address_becomes_the_partner_address() -> None:
    """The whole street line in StreetName; postal code and region upper case."""
    lower = msgspec.structs.replace(
        BILLED,
        billing_address=Address(
            street=" Hafenstraße 12 ",
            city="Hamburg",
            postal_code="sw1a 1aa",
            region="hh",
            country="GB",
        ),
    )
    assert to_partner_address(lower, language="EN") == A_BusinessPartnerAddress(
        StreetName="Hafenstraße 12",
        CityName="Hamburg",
        PostalCode="SW1A 1AA",
        Region="HH",
        Country="GB",
        Language="EN",
    )


def test_without_a_billing_address_the_address_is_the_accounts_country() -> None:
    """Country only: what the CRM does not know is not made up."""
    assert to_partner_address(ACCOUNT) == A_BusinessPartnerAddress(Country="DE")


def test_overlong_address_text_is_cut_and_overlong_codes_left_out() -> None:
    """Street and city cut like the name; a state name, a long postal code dropped."""
    assert BILLED.billing_address is not None
    long = msgspec.structs.replace(
        BILLED,
        billing_address=msgspec.structs.replace(
            BILLED.billing_address,
            street="x" * 59 + " Straße 1",
            city="C" * 45,
            postal_code="12345678901",
            region="Bavaria",
        ),
    )
    address = to_partner_address(long)
    # Cut at 60 ends in a blank, which SAP would drop: so is it here.
    assert address.StreetName == "x" * 59
    assert address.CityName == "C" * 40
    assert (address.PostalCode, address.Region, address.Country) == (None, None, "DE")


def test_the_tax_id_is_the_vat_number_of_the_accounts_country() -> None:
    """Category <country>0, upper case and without blanks; none without a tax id."""
    assert to_tax_number(BILLED) == A_BusinessPartnerTaxNumber(
        BPTaxType="DE0", BPTaxNumber="DE123456789"
    )
    spaced = msgspec.structs.replace(BILLED, country="AT", tax_id=" atu 123 456 78 ")
    assert to_tax_number(spaced) == A_BusinessPartnerTaxNumber(
        BPTaxType="AT0", BPTaxNumber="ATU12345678"
    )
    assert to_tax_number(ACCOUNT) is None
    assert to_tax_number(msgspec.structs.replace(ACCOUNT, tax_id="  ")) is None


def test_a_tax_id_over_20_goes_long_and_over_60_is_refused() -> None:
    """21..60 characters: BPTaxLongNumber only; beyond, SAP has no room: refused."""
    twenty = msgspec.structs.replace(BILLED, tax_id="D" * 20)
    assert to_tax_number(twenty) == A_BusinessPartnerTaxNumber(
        BPTaxType="DE0", BPTaxNumber="D" * 20
    )
    long = msgspec.structs.replace(BILLED, tax_id="D" * 60)
    assert to_tax_number(long) == A_BusinessPartnerTaxNumber(
        BPTaxType="DE0", BPTaxLongNumber="D" * 60
    )
    with pytest.raises(ValueError, match="61 characters"):
        to_tax_number(msgspec.structs.replace(BILLED, tax_id="D" * 61))
    with pytest.raises(ValueError, match="61 characters"):
        to_business_partner(
            msgspec.structs.replace(BILLED, tax_id="D" * 61),
            areas=[],
            payment_terms=None,
            options=OPTIONS,
        )


def test_address_changes_are_what_differs_and_only_that() -> None:
    """Equal → nothing; a new street → StreetName; a stray house number cleared."""
    held = msgspec.structs.replace(
        to_partner_address(BILLED, language="DE"), BusinessPartner="1", AddressID="7"
    )
    assert address_changes(held, BILLED) is None
    assert BILLED.billing_address is not None
    moved = msgspec.structs.replace(
        BILLED,
        billing_address=msgspec.structs.replace(
            BILLED.billing_address, street="Am Sandtorkai 1", region=None
        ),
    )
    split = msgspec.structs.replace(held, HouseNumber="12", Region="hh")
    assert address_changes(split, moved) == A_BusinessPartnerAddress(
        StreetName="Am Sandtorkai 1", HouseNumber="", Region=""
    )


def test_without_a_billing_address_only_the_country_is_compared() -> None:
    """An address kept in SAP is not wiped because the CRM has none."""
    held = A_BusinessPartnerAddress(
        AddressID="7", StreetName="Hafenstraße", HouseNumber="12", Country="DE"
    )
    assert address_changes(held, ACCOUNT) is None
    moved = msgspec.structs.replace(ACCOUNT, country="AT")
    assert address_changes(held, moved) == A_BusinessPartnerAddress(Country="AT")


def test_tax_changes_compare_the_number_sap_means() -> None:
    """A short number SAP mirrors into the long field is unchanged; a new one is set."""
    wanted = A_BusinessPartnerTaxNumber(BPTaxType="DE0", BPTaxNumber="DE1")
    mirrored = msgspec.structs.replace(wanted, BPTaxLongNumber="DE1")
    assert tax_changes(mirrored, wanted) is None
    assert tax_changes(wanted, wanted) is None
    longer = A_BusinessPartnerTaxNumber(BPTaxType="DE0", BPTaxLongNumber="D" * 30)
    assert tax_changes(mirrored, longer) == A_BusinessPartnerTaxNumber(
        BPTaxNumber="", BPTaxLongNumber="D" * 30
    )
    assert tax_changes(longer, wanted) == A_BusinessPartnerTaxNumber(
        BPTaxNumber="DE1", BPTaxLongNumber=""
    )


@pytest.mark.parametrize(
    ("document_type", "status"),
    [
        ("F2", "issued"),
        (None, "issued"),
        ("S1", "cancellation"),
        ("G2", "credit_memo"),
        ("ZX9", "other:ZX9"),
    ],
)
def test_a_billing_document_says_whether_it_is_an_invoice(
    document_type: str | None, status: str
) -> None:
    """A cancellation or credit memo is not the order's invoice: its status says so."""
    event = msgspec.json.decode(
        (GOLDEN / "event_billing_document_created.json").read_bytes()
    )
    data = msgspec.structs.replace(
        msgspec.convert(event["data"], BillingDocumentEventData),
        BillingDocumentType=document_type,
    )
    ref = deal_ref(data.PurchaseOrderByCustomer)
    assert ref is not None
    assert invoice_issued(data, ref, at=None).invoice.status == status
