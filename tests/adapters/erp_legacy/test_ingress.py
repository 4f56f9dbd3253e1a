"""Inbound IDocs as canonical events: ids, correlation, dedupe keys, refusals."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from adapters.erp_legacy import views as v
from adapters.erp_legacy.connector import LegacyErpConnector
from adapters.erp_legacy.files import InboundPoller
from adapters.erp_legacy.idocxml import parse_idocs
from adapters.erp_legacy.ingress import SOURCE, inbound_for, to_inbound
from adapters.erp_legacy.mapping import to_orders05
from adapters.erp_legacy.sandbox import LegacyErpSandbox
from broker.connector import Inbound
from broker.errors import SchemaInvalid
from canonical.ids import DealRef
from canonical.q2c import (
    InvoiceIssued,
    OrderBooked,
    OrderBookingRequested,
    OrderRejected,
    ShipmentDispatched,
)
from tests.adapters.erp_legacy import samples

pytestmark = pytest.mark.anyio


async def known(po: str) -> DealRef | None:
    return samples.KEY if po == samples.CUSTOMER_REF else None


async def erp_answers(
    tmp_path: Path, *, orders: int = 1, error_rate: float = 0
) -> list[Inbound]:
    """Book the sample order *orders* times through connector and sandbox; read back."""
    connector = LegacyErpConnector(samples.settings(tmp_path))
    erp = LegacyErpSandbox(tmp_path / "out", tmp_path / "in", now=lambda: samples.NOW)
    erp.knobs.error_rate = error_rate
    command = OrderBookingRequested(order=samples.order())
    for n in range(orders):
        await connector.handle(command, samples.booking(command, key=f"book-{n}"))
        await erp.process_once()
        await erp.process_once()

    published: list[Inbound] = []

    async def handle(name: str, idocs: tuple[v.Idoc, ...]) -> None:
        for idoc in idocs:
            published.extend(await to_inbound(idoc, resolve=known))

    poller = InboundPoller(
        tmp_path / "in", parse=parse_idocs, handle=handle, settle_s=0
    )
    await poller.poll_once()
    await poller.poll_once()
    return published


async def test_the_erps_answers_become_booked_shipped_invoiced(tmp_path: Path) -> None:
    """Every event is the deal's: correlation id, source, DOCNUM ids, fact keys."""
    booked, shipped, invoiced = await erp_answers(tmp_path)
    assert isinstance(booked.event, OrderBooked)
    assert isinstance(shipped.event, ShipmentDispatched)
    assert isinstance(invoiced.event, InvoiceIssued)
    assert {e.correlation_id for e in (booked, shipped, invoiced)} == {"deal-1001"}
    assert {e.source for e in (booked, shipped, invoiced)} == {SOURCE}
    assert [e.id for e in (booked, shipped, invoiced)] == [
        "0000000000000001",
        "0000000000000002",
        "0000000000000003",
    ]
    assert booked.event.erp_order_id == "0000000001"
    assert booked.subject == "0000000001"
    assert booked.idempotency_key == "erp-legacy:order.booked:0000000001"
    assert shipped.idempotency_key == "erp-legacy:shipment.dispatched:0080000001"
    assert invoiced.idempotency_key == "erp-legacy:invoice.issued:0090000001"
    assert invoiced.event.invoice.amount == samples.order().net_total
    assert {e.time for e in (booked, shipped, invoiced)} == {samples.NOW}


async def test_a_resent_order_yields_a_second_booked_with_the_same_key(
    tmp_path: Path,
) -> None:
    """Two ORDRSPs, two DOCNUMs, one fact: downstream dedups on the key."""
    events = await erp_answers(tmp_path, orders=2)
    booked = [e for e in events if isinstance(e.event, OrderBooked)]
    assert len(booked) == 2
    assert booked[0].id != booked[1].id
    assert booked[0].idempotency_key == booked[1].idempotency_key
    second = booked[1].event
    assert isinstance(second, OrderBooked)
    ref = samples.CUSTOMER_REF
    assert second.warnings == (
        f"Order 0000000001 already exists for customer reference {ref}",
    )
    assert len(events) == 4  # no second shipment or invoice


async def test_a_refusal_becomes_order_rejected(tmp_path: Path) -> None:
    """The rejecting ORDRSP is order fallout for the deal, keyed by the PO."""
    (rejected,) = await erp_answers(tmp_path, error_rate=1.0)
    assert isinstance(rejected.event, OrderRejected)
    assert rejected.event.code == "Z1"
    assert rejected.event.net_total == samples.order().net_total
    assert rejected.correlation_id == "deal-1001"
    assert (
        rejected.idempotency_key == f"erp-legacy:order.rejected:{samples.CUSTOMER_REF}"
    )


def our_orders(tmp_path: Path) -> v.Orders05:
    return to_orders05(
        samples.order(),
        docnum="1",
        created_at=samples.NOW,
        settings=samples.settings(tmp_path),
    )


async def test_our_own_orders_echoed_back_are_no_events(tmp_path: Path) -> None:
    """An ORDERS IDoc in the inbound folder is our own write: nothing to publish."""
    assert await to_inbound(our_orders(tmp_path), resolve=known) == []


async def test_an_unknown_po_is_refused(tmp_path: Path) -> None:
    """An answer to an order that is not ours cannot be correlated: SchemaInvalid."""
    idoc = our_orders(tmp_path)
    ordrsp = msgspec.structs.replace(
        idoc,
        edi_dc40=msgspec.structs.replace(idoc.edi_dc40, mestyp="ORDRSP"),
        e1edk02=(v.E1EDK02(qualf="001", belnr="SOMEONE-ELSES"),),
    )
    with pytest.raises(
        SchemaInvalid, match="customer PO 'SOMEONE-ELSES' is not an order"
    ):
        await to_inbound(ordrsp, resolve=known)
    no_po = msgspec.structs.replace(ordrsp, e1edk02=())
    with pytest.raises(SchemaInvalid, match="no customer PO reference"):
        await to_inbound(no_po, resolve=known)


async def test_message_types_the_erp_does_not_send_are_refused(tmp_path: Path) -> None:
    """ORDERS05 with another message type is not guessed at."""
    idoc = our_orders(tmp_path)
    odd = msgspec.structs.replace(
        idoc, edi_dc40=msgspec.structs.replace(idoc.edi_dc40, mestyp="ORDCHGX")
    )
    with pytest.raises(SchemaInvalid, match="is not a message the ERP sends us"):
        await to_inbound(odd, resolve=known)
    with pytest.raises(SchemaInvalid, match="is not a message the ERP sends us"):
        inbound_for(odd, samples.KEY)
