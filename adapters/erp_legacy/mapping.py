"""Pure mapping between canonical documents and the legacy ERP's IDocs.

Out: a canonical `Order` becomes an ORDERS05 IDoc (message ORDERS). Back: an
ORDRSP becomes `OrderBooked` or `OrderRejected`, a DESADV `ShipmentDispatched`,
an INVOIC02 `InvoiceIssued`. No I/O here; the connector writes, the ingress
reads.

Decisions that are not obvious from the field names:

* The customer PO reference (``E1EDK02 QUALF 001``, and ``E1EDK01 BELNR``) is
  the order's ``customer_ref``: what SD's customer-reference check dedupes on,
  echoed by every answer, so it is also how an answer finds its deal again
  (through a `canonical.ids.DealRef` the caller looks up).
* The sold-to / ship-to number (``E1EDKA1 PARTN``, 17 characters) is an
  *external* partner number that the ERP converts to its customer number
  (EDPAR, transaction VOE4 [M]); by default it is derived from the canonical
  account id (`partner_number`).
* ``DOCNUM`` is derived from the command's idempotency key and ``CREDAT`` /
  ``CRETIM`` from the envelope's time, so a redelivered command produces the
  very same bytes.
* The unit of measure is ``PCE`` (ISO piece [M]): canonical lines have none.
* Times in the ERP's answers are taken as UTC (the ERP's system time zone is
  not in these IDocs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, date, datetime, time, tzinfo
from typing import Any, TypeVar

import msgspec

from adapters.erp_legacy import views as v
from adapters.erp_legacy.idocxml import (
    fmt_amount,
    fmt_date,
    fmt_docnum,
    fmt_quantity,
    fmt_time,
    parse_date,
    parse_decimal,
    parse_time,
)
from adapters.erp_legacy.settings import LegacyErpSettings
from adapters.fieldmap import FieldMapping
from broker.errors import SchemaInvalid
from canonical.commerce import Invoice, Order, OrderLine, Shipment, ShipmentLine
from canonical.ids import DealRef
from canonical.q2c import InvoiceIssued, OrderBooked, OrderRejected, ShipmentDispatched
from canonical.scalars import Money

__all__ = [
    "FIELD_MAP",
    "UNIT",
    "partner_number",
    "docnum_for",
    "outbound_name",
    "to_orders05",
    "customer_po",
    "booking_from_ordrsp",
    "shipment_from_desadv",
    "invoice_from_invoic",
    "local_moment",
]

UNIT = "PCE"

E = TypeVar("E")


FIELD_MAP: tuple[FieldMapping, ...] = (
    FieldMapping("(idempotency key)", "EDI_DC40.DOCNUM", "sha256 → 16 digits"),
    FieldMapping(
        "(envelope time)", "EDI_DC40.CREDAT/CRETIM", "ERP time zone, YYYYMMDD/HHMMSS"
    ),
    FieldMapping("order.currency", "E1EDK01.CURCY"),
    FieldMapping("order.payment_terms", "E1EDK01.ZTERM"),
    FieldMapping("order.customer_ref", "E1EDK01.BELNR"),
    FieldMapping("order.customer_ref", "E1EDK02[QUALF=001].BELNR", "the dedupe key"),
    FieldMapping("order.sales_org", "E1EDK14[QUALF=008].ORGID"),
    FieldMapping("order.distribution_channel", "E1EDK14[QUALF=007].ORGID"),
    FieldMapping("order.division", "E1EDK14[QUALF=006].ORGID"),
    FieldMapping("order.legal_entity", "E1EDK14[QUALF=011].ORGID", "company code"),
    FieldMapping("(envelope time)", "E1EDK03[IDDAT=012].DATUM", "document date"),
    FieldMapping("order.account.id", "E1EDKA1[PARVW=AG|WE].PARTN", "partner_number"),
    FieldMapping("order.account.name", "E1EDKA1[PARVW=AG|WE].NAME1", "first 35"),
    FieldMapping("order.account.billing_address", "E1EDKA1[PARVW=AG].STRAS/…"),
    FieldMapping("order.tax_country", "E1EDKA1[PARVW=WE].LAND1"),
    FieldMapping("order.lines[].number", "E1EDP01.POSEX", "6 digits"),
    FieldMapping("order.lines[].quantity", "E1EDP01.MENGE, E1EDP20.WMENG", "0.000"),
    FieldMapping("(none)", "E1EDP01.MENEE", f"always {UNIT}"),
    FieldMapping("order.lines[].unit_price", "E1EDP01.VPREI", "PEINH 1"),
    FieldMapping("order.lines[].net_amount", "E1EDP01.NETWR"),
    FieldMapping("order.lines[].parent", "E1EDP01.UEPOS", "6 digits"),
    FieldMapping("order.lines[].physical", "E1EDP01.PSTYV", "False → TAD"),
    FieldMapping("order.lines[].plant", "E1EDP01.WERKS", "omitted when empty"),
    FieldMapping("order.lines[].sku", "E1EDP19[QUALF=002].IDTNR"),
    FieldMapping("order.net_total", "E1EDS01[SUMID=002].SUMME/SUNIT"),
    FieldMapping("order.id, order.deal_id", "(not sent)", "DealRef, looked up by PO"),
    FieldMapping(
        "order.lines[].recurring/term_months/tax_code/revenue_class",
        "(not sent)",
        "billing and tax are decided outside the legacy ERP",
    ),
    FieldMapping("booked.erp_order_id", "ORDRSP E1EDK02[QUALF=002].BELNR"),
    FieldMapping(
        "booked/rejected", "ORDRSP E1EDK01.ACTION", "000 booked, 003 rejected"
    ),
    FieldMapping("rejected.code", "ORDRSP E1EDK01.AUGRU | E1EDP01.ABGRU"),
    FieldMapping("booked.warnings, rejected.message", "ORDRSP E1EDKT1[TDID=Z001]"),
    FieldMapping("*.net_total", "ORDRSP E1EDS01[SUMID=002] + E1EDK01.CURCY"),
    FieldMapping("shipment.number", "DESADV E1EDL20.VBELN", "id shipment-legacy-…"),
    FieldMapping("shipment.lines[].sku/quantity", "DESADV E1EDL24.MATNR/LFIMG"),
    FieldMapping("shipment.dispatched_at", "DESADV E1EDT13[QUALF=006].ISDD/ISDZ"),
    FieldMapping("invoice.number", "INVOIC E1EDK02[QUALF=009] | E1EDK01.BELNR"),
    FieldMapping("invoice.amount", "INVOIC E1EDS01[SUMID=011] | [SUMID=002]"),
    FieldMapping("invoice.issued_at", "INVOIC E1EDK03[IDDAT=012].DATUM", "00:00 UTC"),
)


# --- out: canonical → ORDERS05 ---------------------------------------------------


def partner_number(account_id: str) -> str:
    """The external partner number for an account: its id without the kind prefix.

    ``acct-ACME-001`` → ``ACME-001``. An id whose rest is longer than the 17
    characters ``PARTN`` holds becomes ``Q`` + 16 hex digits of its SHA-256,
    still unique per account and stable, for the ERP's EDPAR table.
    """
    _, _, rest = account_id.partition("-")
    rest = rest or account_id
    if len(rest) <= 17:
        return rest
    return "Q" + hashlib.sha256(account_id.encode()).hexdigest()[:16].upper()


def docnum_for(idempotency_key: str) -> str:
    """A 16-digit IDoc number that is the same for every delivery of one command."""
    digest = int.from_bytes(hashlib.sha256(idempotency_key.encode()).digest()[:8])
    return fmt_docnum(digest % (10**16 - 1) + 1)


def outbound_name(docnum: str) -> str:
    """The outbound file name (without ``.xml``) of the ORDERS IDoc *docnum*."""
    return f"ORDERS_{docnum}"


def to_orders05(
    order: Order,
    *,
    docnum: str,
    created_at: datetime,
    settings: LegacyErpSettings,
    sold_to: str | None = None,
) -> v.Orders05:
    """The ORDERS IDoc that asks the ERP to book *order*.

    Args:
        order: the canonical order.
        docnum: its IDoc number (`docnum_for` the command's idempotency key).
        created_at: the command's time; the control record and document date,
            written in the ERP's time zone (``settings.zone``).
        settings: ports and partners for the control record.
        sold_to: the ERP's partner number for the account; `partner_number`
            of the account id when not given.
    """
    at = created_at.astimezone(settings.zone)
    partner = sold_to or partner_number(order.account.id)
    address = order.account.billing_address
    name = order.account.name[:35]
    return v.Orders05(
        edi_dc40=v.EdiDc40(
            mandt=settings.client,
            docnum=docnum,
            direct="2",
            idoctyp="ORDERS05",
            mestyp="ORDERS",
            sndpor=settings.sender_port,
            sndprt=settings.sender_partner_type,
            sndprn=settings.sender_partner,
            rcvpor=settings.receiver_port,
            rcvprt=settings.receiver_partner_type,
            rcvprn=settings.receiver_partner,
            credat=fmt_date(at),
            cretim=fmt_time(at),
            serial=fmt_date(at) + fmt_time(at),
        ),
        e1edk01=v.E1EDK01(
            curcy=order.currency,
            zterm=order.payment_terms,
            belnr=order.customer_ref,
        ),
        e1edk14=(
            v.E1EDK14(qualf=v.ORG_COMPANY_CODE, orgid=order.legal_entity),
            v.E1EDK14(qualf=v.ORG_SALES_ORG, orgid=order.sales_org),
            v.E1EDK14(
                qualf=v.ORG_DISTRIBUTION_CHANNEL, orgid=order.distribution_channel
            ),
            v.E1EDK14(qualf=v.ORG_DIVISION, orgid=order.division),
        ),
        e1edk03=(v.E1EDK03(iddat=v.DATE_DOCUMENT, datum=fmt_date(at)),),
        e1edka1=(
            v.E1EDKA1(
                parvw=v.PARTNER_SOLD_TO,
                partn=partner,
                name1=name,
                stras=_text(address.street, 35) if address else None,
                ort01=_text(address.city, 35) if address else None,
                pstlz=address.postal_code or None if address else None,
                land1=address.country if address else order.account.country,
                regio=address.region if address else None,
            ),
            v.E1EDKA1(
                parvw=v.PARTNER_SHIP_TO,
                partn=partner,
                name1=name,
                land1=order.tax_country,
            ),
        ),
        e1edk02=(
            v.E1EDK02(
                qualf=v.REF_CUSTOMER_PO,
                belnr=order.customer_ref,
                datum=fmt_date(at),
                uzeit=fmt_time(at),
            ),
        ),
        e1edp01=tuple(_item(line) for line in order.lines),
        e1eds01=(
            v.E1EDS01(
                sumid=v.SUM_ITEMS,
                summe=fmt_amount(order.net_total.amount),
                sunit=order.net_total.currency,
            ),
        ),
    )


def _item(line: OrderLine) -> v.E1EDP01:
    quantity = fmt_quantity(line.quantity)
    return v.E1EDP01(
        posex=f"{line.number:06d}",
        action=v.ACTION_NEW,
        menge=quantity,
        menee=UNIT,
        vprei=fmt_amount(line.unit_price),
        peinh="1",
        netwr=fmt_amount(line.net_amount),
        uepos=f"{line.parent:06d}" if line.parent is not None else None,
        pstyv=None if line.physical else v.SERVICE_ITEM,
        werks=line.plant or None,
        e1edp20=(v.E1EDP20(wmeng=quantity),),
        e1edp19=(v.E1EDP19(qualf=v.MATERIAL_OURS, idtnr=line.sku),),
    )


# --- back: ORDRSP / DESADV / INVOIC02 → canonical ----------------------------------


def customer_po(idoc: v.Idoc) -> str | None:
    """The customer PO reference of an IDoc (``E1EDK02 001``, ``E1EDL41 BSTNR``)."""
    if isinstance(idoc, v.Delvry03):
        items = idoc.e1edl20.e1edl24 if idoc.e1edl20 else ()
        return next(
            (
                ref.bstnr
                for item in items
                for ref in item.e1edl41
                if ref.quali == v.DELIVERY_REF_PO and ref.bstnr
            ),
            None,
        )
    return idoc.reference(v.REF_CUSTOMER_PO)


def booking_from_ordrsp(
    ordrsp: v.Orders05, key: DealRef
) -> OrderBooked | OrderRejected:
    """An ORDRSP as the ERP's verdict: booked (with its order number) or rejected.

    Raises:
        SchemaInvalid: not an ORDRSP, or missing the PO, the currency, the
            total, or (when accepted) the order number.
    """
    what = _what(ordrsp)
    if ordrsp.edi_dc40.mestyp != "ORDRSP":
        raise SchemaInvalid(f"{what} is not an ORDRSP")
    header = ordrsp.e1edk01 or v.E1EDK01()
    net_total = _money(ordrsp.total(v.SUM_ITEMS), header.curcy, what)
    notes = ordrsp.texts(v.TEXT_STATUS)
    number = ordrsp.reference(v.REF_ERP_ORDER)
    if header.action == v.ACTION_REJECTED:
        code = header.augru or next(
            (item.abgru for item in ordrsp.e1edp01 if item.abgru), "ORDRSP"
        )
        return _checked(
            what,
            lambda: OrderRejected(
                order_id=key.order_id,
                deal_id=key.deal_id,
                erp="legacy",
                code=code,
                message="; ".join(notes) or "the ERP rejected the order",
                net_total=net_total,
            ),
        )
    if not number:
        raise SchemaInvalid(f"{what}: accepted without an order number (E1EDK02 002)")
    po = _required(ordrsp.reference(v.REF_CUSTOMER_PO), "PO", what)
    return _checked(
        what,
        lambda: OrderBooked(
            order_id=key.order_id,
            deal_id=key.deal_id,
            erp="legacy",
            erp_order_id=number,
            status="booked",
            net_total=net_total,
            customer_ref=po,
            warnings=notes,
        ),
    )


def shipment_from_desadv(
    desadv: v.Delvry03, key: DealRef, *, zone: tzinfo = UTC
) -> ShipmentDispatched:
    """A DESADV as the shipment of the order's physical lines.

    Its goods-issue date and time are the ERP's local time in *zone*.

    Raises:
        SchemaInvalid: no delivery header or number, an item without
            material or quantity, or a value that is not a SKU / quantity.
    """
    what = _what(desadv)
    header = desadv.e1edl20
    if header is None:
        raise SchemaInvalid(f"{what}: no delivery header (E1EDL20)")
    number = _required(header.vbeln, "delivery number (E1EDL20 VBELN)", what)
    goods_issue = next(
        (d for d in header.e1edt13 if d.qualf == v.DATE_GOODS_ISSUE), None
    )
    dispatched_at = (
        _moment(goods_issue.isdd, goods_issue.isdz, what, zone)
        if goods_issue is not None and goods_issue.isdd
        else None
    )
    quantities = [
        (
            _required(item.matnr, "E1EDL24 MATNR", what),
            parse_decimal(
                _required(item.lfimg, "E1EDL24 LFIMG", what), field=f"{what} LFIMG"
            ),
        )
        for item in header.e1edl24
    ]
    return _checked(
        what,
        lambda: ShipmentDispatched(
            shipment=Shipment(
                id=f"shipment-legacy-{number}",
                order_id=key.order_id,
                number=number,
                lines=tuple(
                    ShipmentLine(sku=sku, quantity=quantity)
                    for sku, quantity in quantities
                ),
                dispatched_at=dispatched_at,
            ),
            deal_id=key.deal_id,
            erp="legacy",
        ),
    )


#: INVOIC02 document types (E1EDK01.BSART) that are not an invoice.
DOCUMENT_KINDS = {"CRME": "credit_memo", "DEBI": "debit_memo", "STOR": "cancellation"}


def _document_status(bsart: str | None) -> str:
    """``Invoice.status`` for a BSART: ``issued`` for an invoice (INVO, none)."""
    if not bsart or bsart == "INVO":
        return "issued"
    return DOCUMENT_KINDS.get(bsart, f"other:{bsart}")


def invoice_from_invoic(
    invoic: v.Invoic02, key: DealRef, *, zone: tzinfo = UTC
) -> InvoiceIssued:
    """An INVOIC02 as the invoice of the order (``status`` from BSART).

    Its document date is the ERP's local day in *zone*.

    Raises:
        SchemaInvalid: no invoice number, currency or amount.
    """
    what = _what(invoic)
    header = invoic.e1edk01 or v.E1EDK01()
    number = _required(
        invoic.reference(v.REF_INVOICE) or header.belnr, "invoice number", what
    )
    # The net total of the items, as the order's total is net; the invoice
    # amount (011, with tax) only when an ERP sends no item total.
    amount = _money(
        invoic.total(v.SUM_ITEMS) or invoic.total(v.SUM_INVOICE), header.curcy, what
    )
    issued = invoic.date(v.DATE_DOCUMENT)
    issued_at = _moment(issued, None, what, zone) if issued else None
    return _checked(
        what,
        lambda: InvoiceIssued(
            invoice=Invoice(
                id=f"invoice-legacy-{number}",
                order_id=key.order_id,
                number=number,
                amount=amount,
                status=_document_status(header.bsart),
                issued_at=issued_at,
            ),
            deal_id=key.deal_id,
            erp="legacy",
        ),
    )


def _text(value: str, length: int) -> str | None:
    """*value* cut to the IDoc field's *length*; None (left out) when empty."""
    return value[:length] or None


def _what(idoc: v.Idoc) -> str:
    return f"{idoc.edi_dc40.mestyp} IDoc {idoc.edi_dc40.docnum}"


def _required(value: str | None, name: str, what: str) -> str:
    if not value:
        raise SchemaInvalid(f"{what}: no {name}")
    return value


def _money(amount: str | None, currency: str | None, what: str) -> Money:
    value = parse_decimal(_required(amount, "total (E1EDS01)", what), field=what)
    try:
        return Money(amount=value, currency=_required(currency, "currency", what))
    except ValueError as exc:
        raise SchemaInvalid(f"{what}: {exc}") from exc


def local_moment(
    day: str, clock: str | None, zone: tzinfo, *, date_field: str, time_field: str
) -> datetime:
    """An IDoc date (and time: midnight without one) in the ERP's *zone*, as UTC.

    IDoc dates and times carry no offset; SAP writes its system time. In the
    hour a clock change repeats, the earlier reading is taken.

    Raises:
        SchemaInvalid: *day* or *clock* is not a date or time.
    """
    d: date = parse_date(day, field=date_field)
    t: time = parse_time(clock, field=time_field) if clock else time()
    return datetime.combine(d, t, tzinfo=zone).astimezone(UTC)


def _moment(day: str, clock: str | None, what: str, zone: tzinfo) -> datetime:
    return local_moment(
        day, clock, zone, date_field=f"{what} date", time_field=f"{what} time"
    )


def _checked(what: str, build: Callable[[], E]) -> E:
    """*build*'s event, refused unless it also survives a decode of its encoding.

    Canonical constructors check amounts, currencies and quantities in
    ``__post_init__``; the decode adds the declared constraints (SKU and id
    patterns), so whatever is published here decodes downstream.
    """
    try:
        event = build()
        decoded: Any = msgspec.json.decode(msgspec.json.encode(event), type=type(event))
    except ValueError as exc:  # msgspec.ValidationError is one too
        raise SchemaInvalid(f"{what}: {exc}") from exc
    return decoded  # type: ignore[no-any-return]  # decoded as type(event)
