"""Canonical ⇄ IDoc mapping: ORDERS05 out, ORDRSP / DESADV / INVOIC02 back."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from adapters.erp_legacy import views as v
from adapters.erp_legacy.mapping import (
    FIELD_MAP,
    booking_from_ordrsp,
    customer_po,
    docnum_for,
    invoice_from_invoic,
    partner_number,
    shipment_from_desadv,
    to_orders05,
)
from adapters.fieldmap import render
from broker.errors import SchemaInvalid
from canonical.q2c import OrderBooked, OrderRejected
from canonical.scalars import Money
from tests.adapters.erp_legacy import samples


@pytest.fixture
def idoc(tmp_path: Path) -> v.Orders05:
    return to_orders05(
        samples.order(),
        docnum="0000000000000042",
        created_at=datetime(2025, 3, 4, 9, 0, 0, tzinfo=UTC),
        settings=samples.settings(tmp_path),
    )


def test_control_record_names_both_partners_and_the_message(idoc: v.Orders05) -> None:
    """ORDERS05/ORDERS, inbound to the ERP, from our port to the ERP's."""
    c = idoc.edi_dc40
    assert (c.idoctyp, c.mestyp, c.direct, c.mandt) == (
        "ORDERS05",
        "ORDERS",
        "2",
        "100",
    )
    assert (c.sndpor, c.sndprt, c.sndprn) == ("Q2CBROKER", "LS", "Q2CBROKER")
    assert (c.rcvpor, c.rcvprt, c.rcvprn) == ("SAPLEG", "LS", "LEGACYERP")
    assert (c.credat, c.cretim, c.docnum) == ("20250304", "090000", "0000000000000042")


def test_header_carries_sales_area_partners_and_the_po(idoc: v.Orders05) -> None:
    """E1EDK14 sales area, E1EDKA1 AG/WE, E1EDK02 001 = customer_ref, totals."""
    assert idoc.org(v.ORG_SALES_ORG) == "1010"
    assert idoc.org(v.ORG_DISTRIBUTION_CHANNEL) == "10"
    assert idoc.org(v.ORG_DIVISION) == "00"
    assert idoc.org(v.ORG_COMPANY_CODE) == "1000"
    assert idoc.reference(v.REF_CUSTOMER_PO) == samples.CUSTOMER_REF
    assert idoc.e1edk01 == v.E1EDK01(
        curcy="EUR", zterm="NT30", belnr=samples.CUSTOMER_REF
    )
    sold_to = idoc.partner(v.PARTNER_SOLD_TO)
    ship_to = idoc.partner(v.PARTNER_SHIP_TO)
    assert sold_to is not None
    assert ship_to is not None
    assert (sold_to.partn, sold_to.name1, sold_to.ort01, sold_to.land1) == (
        "ACME-001",
        "Acme Maschinenbau GmbH",
        "Berlin",
        "DE",
    )
    assert (ship_to.partn, ship_to.land1) == ("ACME-001", "DE")
    assert idoc.total(v.SUM_ITEMS) == "577.50"


def test_items_carry_material_quantity_price_plant_and_structure(
    idoc: v.Orders05,
) -> None:
    """One E1EDP01 per line; the service line is TAD, the option names its parent."""
    widget, mount, service = idoc.e1edp01
    assert (widget.posex, widget.menge, widget.menee, widget.vprei, widget.netwr) == (
        "000001",
        "3.000",
        "PCE",
        "100.00",
        "300.00",
    )
    assert widget.material(v.MATERIAL_OURS) == "WIDGET-10"
    assert widget.werks == "1000"
    assert widget.e1edp20 == (v.E1EDP20(wmeng="3.000"),)
    assert (widget.pstyv, widget.uepos) == (None, None)
    assert mount.uepos == "000001"
    assert (service.pstyv, service.werks) == (v.SERVICE_ITEM, "1100")


def test_partner_numbers_fit_partn() -> None:
    """The id's rest when it fits 17 characters, else a stable hash."""
    assert partner_number("acct-ACME-001") == "ACME-001"
    long_one = partner_number("acct-" + "x" * 40)
    assert len(long_one) == 17
    assert long_one == partner_number("acct-" + "x" * 40)
    assert long_one != partner_number("acct-" + "y" * 40)


def test_docnum_is_a_stable_function_of_the_idempotency_key() -> None:
    """16 digits; the same key gives the same number, another key another."""
    first = docnum_for("book:order-1")
    assert first == docnum_for("book:order-1")
    assert len(first) == 16
    assert first.isdigit()
    assert first != docnum_for("book:order-2")


def ordrsp(idoc: v.Orders05, **header: str | None) -> v.Orders05:
    return msgspec.structs.replace(
        idoc,
        edi_dc40=msgspec.structs.replace(idoc.edi_dc40, mestyp="ORDRSP"),
        e1edk01=v.E1EDK01(**({"curcy": "EUR"} | header)),
        e1edk02=(
            *idoc.e1edk02,
            v.E1EDK02(qualf=v.REF_ERP_ORDER, belnr="0000004711"),
        ),
    )


def test_an_accepted_ordrsp_books_the_order(idoc: v.Orders05) -> None:
    """ACTION 000: the ERP number, the total, the PO and the warnings."""
    event = booking_from_ordrsp(ordrsp(idoc, action="000"), samples.KEY)
    assert event == OrderBooked(
        order_id="order-1001",
        deal_id="deal-1001",
        erp="legacy",
        erp_order_id="0000004711",
        status="booked",
        net_total=Money(amount=Decimal("577.50"), currency="EUR"),
        customer_ref=samples.CUSTOMER_REF,
    )


def test_a_rejecting_ordrsp_is_order_fallout(idoc: v.Orders05) -> None:
    """ACTION 003: the reason code and the texts become OrderRejected."""
    rejected = msgspec.structs.replace(
        ordrsp(idoc, action="003", augru="Z1"),
        e1edkt1=(
            v.E1EDKT1(
                tdid=v.TEXT_STATUS,
                e1edkt2=(v.E1EDKT2(tdline="Credit"), v.E1EDKT2(tdline="limit")),
            ),
        ),
    )
    event = booking_from_ordrsp(rejected, samples.KEY)
    assert isinstance(event, OrderRejected)
    assert (event.code, event.message) == ("Z1", "Credit limit")


def test_an_accepted_ordrsp_without_a_number_is_refused(idoc: v.Orders05) -> None:
    """Booked without an order number cannot be told apart from garbage."""
    broken = msgspec.structs.replace(ordrsp(idoc, action="000"), e1edk02=idoc.e1edk02)
    with pytest.raises(SchemaInvalid, match="without an order number"):
        booking_from_ordrsp(broken, samples.KEY)


def test_an_ordrsp_without_currency_or_with_a_bad_one_is_refused(
    idoc: v.Orders05,
) -> None:
    """Money needs an ISO currency."""
    with pytest.raises(SchemaInvalid, match="no currency"):
        booking_from_ordrsp(ordrsp(idoc, curcy=None), samples.KEY)
    with pytest.raises(SchemaInvalid, match="ISO 4217"):
        booking_from_ordrsp(ordrsp(idoc, curcy="EUX"), samples.KEY)


def test_only_an_ordrsp_is_a_verdict(idoc: v.Orders05) -> None:
    """Our own ORDERS is not mistaken for the ERP's answer."""
    with pytest.raises(SchemaInvalid, match="is not an ORDRSP"):
        booking_from_ordrsp(idoc, samples.KEY)


DESADV = v.Delvry03(
    edi_dc40=v.EdiDc40(docnum="0000000000000007", idoctyp="DELVRY03", mestyp="DESADV"),
    e1edl20=v.E1EDL20(
        vbeln="0080000001",
        e1edt13=(v.E1EDT13(qualf="006", isdd="20250305", isdz="081500"),),
        e1edl24=(
            v.E1EDL24(
                matnr="WIDGET-10",
                lfimg="3.000",
                e1edl41=(v.E1EDL41(quali="001", bstnr="PO-9"),),
            ),
        ),
    ),
)


def test_a_desadv_is_the_shipment() -> None:
    """Delivery number, lines by material, goods issue time (UTC)."""
    event = shipment_from_desadv(DESADV, samples.KEY)
    assert customer_po(DESADV) == "PO-9"
    shipment = event.shipment
    assert (shipment.id, shipment.number, shipment.order_id) == (
        "shipment-legacy-0080000001",
        "0080000001",
        "order-1001",
    )
    assert [(line.sku, line.quantity) for line in shipment.lines] == [
        ("WIDGET-10", Decimal("3.000"))
    ]
    assert shipment.dispatched_at == datetime(2025, 3, 5, 8, 15, tzinfo=UTC)
    assert event.deal_id == "deal-1001"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (v.E1EDL24(lfimg="1.000"), "no E1EDL24 MATNR"),
        (v.E1EDL24(matnr="widget lowercase", lfimg="1"), "sku"),
        (v.E1EDL24(matnr="WIDGET-10", lfimg="0.000"), "quantity"),
        (v.E1EDL24(matnr="WIDGET-10", lfimg="many"), "not a number"),
    ],
)
def test_a_desadv_item_that_is_not_a_shipment_line_is_refused(
    item: v.E1EDL24, message: str
) -> None:
    """Canonical constraints (SKU pattern, quantity > 0) hold for what we publish."""
    assert DESADV.e1edl20 is not None
    broken = msgspec.structs.replace(
        DESADV, e1edl20=msgspec.structs.replace(DESADV.e1edl20, e1edl24=(item,))
    )
    with pytest.raises(SchemaInvalid, match=message):
        shipment_from_desadv(broken, samples.KEY)


def test_an_invoic_is_the_invoice() -> None:
    """Invoice number (E1EDK02 009), net amount (SUMID 002, not 011 with tax), date.

    The order's total is net: its invoice is compared net to net.
    """
    invoic = v.Invoic02(
        edi_dc40=v.EdiDc40(docnum="8", idoctyp="INVOIC02", mestyp="INVOIC"),
        e1edk01=v.E1EDK01(curcy="EUR", belnr="ignored-when-009-present"),
        e1edk02=(v.E1EDK02(qualf=v.REF_INVOICE, belnr="0090000001"),),
        e1edk03=(v.E1EDK03(iddat=v.DATE_DOCUMENT, datum="20250306"),),
        e1eds01=(
            v.E1EDS01(sumid=v.SUM_ITEMS, summe="500.00"),
            v.E1EDS01(sumid=v.SUM_INVOICE, summe="595.00"),
        ),
    )
    invoice = invoice_from_invoic(invoic, samples.KEY).invoice
    assert (invoice.id, invoice.number, invoice.order_id) == (
        "invoice-legacy-0090000001",
        "0090000001",
        "order-1001",
    )
    assert invoice.amount == Money(amount=Decimal("500.00"), currency="EUR")
    assert invoice.issued_at == datetime(2025, 3, 6, tzinfo=UTC)
    # An ERP that sends only the invoice amount: that is what there is.
    only_011 = msgspec.structs.replace(invoic, e1eds01=invoic.e1eds01[1:])
    amount = invoice_from_invoic(only_011, samples.KEY).invoice.amount
    assert amount == Money(amount=Decimal("595.00"), currency="EUR")


def test_the_field_map_renders() -> None:
    """Every mapping decision is listed and printable."""
    table = render("legacy ERP (IDoc)", FIELD_MAP)
    assert "E1EDK02[QUALF=001].BELNR" in table
    assert "order.customer_ref" in table


@pytest.mark.parametrize(
    ("bsart", "status"),
    [("INVO", "issued"), (None, "issued"), ("CRME", "credit_memo"), ("XX", "other:XX")],
)
def test_an_invoic_says_whether_it_is_an_invoice(
    bsart: str | None, status: str
) -> None:
    """E1EDK01.BSART: a credit memo is not the order's invoice."""
    invoic = v.Invoic02(
        edi_dc40=v.EdiDc40(docnum="9", idoctyp="INVOIC02", mestyp="INVOIC"),
        e1edk01=v.E1EDK01(curcy="EUR", bsart=bsart, belnr="0090000002"),
        e1eds01=(v.E1EDS01(sumid=v.SUM_ITEMS, summe="-500.00"),),
    )
    assert invoice_from_invoic(invoic, samples.KEY).invoice.status == status
