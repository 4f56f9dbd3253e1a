"""What the legacy ERP drops in the inbound folder, as canonical events.

The ERP does not push over HTTP; an inbound-poller actor runs an
`InboundPoller` over ``inbound_dir`` with `parse_idocs` and, for each IDoc,
calls `to_inbound` and publishes the result::

    async def handle(name: str, idocs: tuple[Idoc, ...]) -> None:
        for idoc in idocs:
            await publish(await to_inbound(idoc, resolve=xref.order_for_po))

    poller = InboundPoller(settings.inbound, parse=parse_idocs, handle=handle)

The event's id is the IDoc number (a resent IDoc keeps it), its time the
IDoc's creation (``CREDAT`` / ``CRETIM``), its correlation id the deal that
the customer PO reference belongs to, and its idempotency key the business
fact (the order, delivery or invoice number), so the second ORDRSP that a
re-sent order draws dedups against the first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, tzinfo

from adapters.erp_legacy import views as v
from adapters.erp_legacy.mapping import (
    booking_from_ordrsp,
    customer_po,
    invoice_from_invoic,
    local_moment,
    shipment_from_desadv,
)
from broker.connector import Inbound
from broker.errors import SchemaInvalid
from canonical.ids import DealRef
from canonical.q2c import OrderBooked

__all__ = ["SOURCE", "Resolve", "to_inbound", "inbound_for"]

#: The CloudEvents source of everything the legacy ERP reports.
SOURCE = "/erp/legacy"

#: Customer PO reference → the canonical order it stands for (None: not ours).
Resolve = Callable[[str], Awaitable[DealRef | None]]

# Message types we send ourselves; found in the inbound folder they are echoes.
_OURS = frozenset({"ORDERS", "ORDCHG"})


async def to_inbound(
    idoc: v.Idoc, *, resolve: Resolve, zone: tzinfo = UTC
) -> list[Inbound]:
    """The canonical events an IDoc from the ERP reports (none for an echo).

    Its dates and times are read in *zone*, the ERP's time zone.

    Raises:
        SchemaInvalid: a message type the ERP does not send us, no customer
            PO reference, a PO that *resolve* does not know, or an IDoc the
            mapping cannot read.
    """
    control = idoc.edi_dc40
    if control.mestyp in _OURS:
        return []
    po = customer_po(idoc)
    if not po:
        raise SchemaInvalid(
            f"{control.mestyp} IDoc {control.docnum}: no customer PO reference"
        )
    key = await resolve(po)
    if key is None:
        raise SchemaInvalid(
            f"{control.mestyp} IDoc {control.docnum}: customer PO {po!r} "
            "is not an order of ours"
        )
    return [inbound_for(idoc, key, zone=zone)]


def inbound_for(idoc: v.Idoc, key: DealRef, *, zone: tzinfo = UTC) -> Inbound:
    """The canonical event of one ORDRSP, DESADV or INVOIC IDoc of *key*'s order.

    Its dates and times are read in *zone*, the ERP's time zone.

    Raises:
        SchemaInvalid: another message type, or an IDoc the mapping cannot read.
    """
    control = idoc.edi_dc40
    event: object
    match idoc, control.mestyp:
        case v.Orders05(), "ORDRSP":
            event = booking_from_ordrsp(idoc, key)
            if isinstance(event, OrderBooked):
                subject = event.erp_order_id
                fact = f"order.booked:{subject}"
            else:
                # Every refusal of one PO is the same fact for the deal.
                subject = customer_po(idoc) or control.docnum
                fact = f"order.rejected:{subject}"
        case v.Delvry03(), "DESADV":
            event = shipment_from_desadv(idoc, key, zone=zone)
            subject = event.shipment.number
            fact = f"shipment.dispatched:{subject}"
        case v.Invoic02(), "INVOIC":
            event = invoice_from_invoic(idoc, key, zone=zone)
            subject = event.invoice.number
            fact = f"invoice.issued:{subject}"
        case _:
            raise SchemaInvalid(
                f"{control.idoctyp}/{control.mestyp} IDoc {control.docnum} "
                "is not a message the ERP sends us"
            )
    return Inbound(
        event=event,
        id=control.docnum,
        source=SOURCE,
        correlation_id=key.deal_id,
        idempotency_key=f"erp-legacy:{fact}",
        subject=subject,
        time=_created(control, zone),
    )


def _created(control: v.EdiDc40, zone: tzinfo) -> datetime | None:
    """When the ERP created the IDoc (``CREDAT`` / ``CRETIM`` in *zone*), in UTC.

    The same IDoc read again (its file dropped again, or read again after a
    crash) keeps its control record, so its inbox key falls on the original's
    day. Without ``CREDAT`` it is None and the publisher stamps the arrival
    time: a reading after midnight then claims another day. ``CREDAT``
    without ``CRETIM`` is that day's midnight.

    Raises:
        SchemaInvalid: ``CREDAT`` or ``CRETIM`` is not a date or time.
    """
    if not control.credat:
        return None
    what = f"{control.mestyp} IDoc {control.docnum}"
    return local_moment(
        control.credat,
        control.cretim,
        zone,
        date_field=f"{what} CREDAT",
        time_field=f"{what} CRETIM",
    )
