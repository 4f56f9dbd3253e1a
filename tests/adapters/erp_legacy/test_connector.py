"""The connector: one ORDERS05 file per command, whatever the redeliveries."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.erp_legacy import views as v
from adapters.erp_legacy.connector import LegacyErpConnector
from adapters.erp_legacy.idocxml import parse_idoc
from adapters.erp_legacy.mapping import docnum_for
from adapters.erp_legacy.sandbox import LegacyErpSandbox
from broker.connector import Connector
from broker.errors import UnknownMessageType, UpstreamUnavailable
from canonical.q2c import OrderBookingRequested, OrderSubmitted, QuoteUpdateRequested
from tests.adapters.erp_legacy import samples

pytestmark = pytest.mark.anyio

COMMAND = OrderBookingRequested(order=samples.order())


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file())


async def test_booking_writes_one_orders05_and_reports_it_submitted(
    tmp_path: Path,
) -> None:
    """The file is named from the idempotency key; the event names its DOCNUM."""
    connector: Connector = LegacyErpConnector(samples.settings(tmp_path))
    assert connector.system == "erp-legacy"
    assert connector.commands == {"erp.order.booking_requested": OrderBookingRequested}
    envelope = samples.booking(COMMAND)

    events = await connector.handle(COMMAND, envelope)

    docnum = docnum_for(envelope.idempotency_key)
    assert events == [
        OrderSubmitted(
            order_id="order-1001", deal_id="deal-1001", erp="legacy", document=docnum
        )
    ]
    assert files(tmp_path / "out") == [f"ORDERS_{docnum}.xml"]
    idoc = parse_idoc((tmp_path / "out" / f"ORDERS_{docnum}.xml").read_bytes())
    assert isinstance(idoc, v.Orders05)
    assert idoc.edi_dc40.docnum == docnum
    assert idoc.reference(v.REF_CUSTOMER_PO) == samples.CUSTOMER_REF


async def test_a_redelivered_command_leaves_one_file_of_the_same_bytes(
    tmp_path: Path,
) -> None:
    """Same envelope twice: one file, byte-identical; another key, another file."""
    connector = LegacyErpConnector(samples.settings(tmp_path))
    envelope = samples.booking(COMMAND)
    await connector.handle(COMMAND, envelope)
    (path,) = (tmp_path / "out").iterdir()
    first = path.read_bytes()
    await connector.handle(COMMAND, envelope)
    assert files(tmp_path / "out") == [path.name]
    assert path.read_bytes() == first
    await connector.handle(COMMAND, samples.booking(COMMAND, key="book:other"))
    assert len(files(tmp_path / "out")) == 2


async def test_a_redelivery_after_the_erp_read_it_books_no_second_order(
    tmp_path: Path,
) -> None:
    """The hand-over record keeps the IDoc from going out again at all."""
    connector = LegacyErpConnector(samples.settings(tmp_path))
    erp = LegacyErpSandbox(tmp_path / "out", tmp_path / "in", now=lambda: samples.NOW)
    envelope = samples.booking(COMMAND)
    for _ in range(2):
        await connector.handle(COMMAND, envelope)
        await erp.process_once()
        await erp.process_once()
    assert len(erp.orders) == 1
    assert erp.state().ordrsp_sent == 1
    assert erp.state().duplicates == 0


async def test_a_full_outbound_folder_pushes_back(tmp_path: Path) -> None:
    """max_pending_files unread IDocs: UpstreamUnavailable, nothing written."""
    connector = LegacyErpConnector(samples.settings(tmp_path, max_pending_files=2))
    for n in range(2):
        (tmp_path / "out" / f"waiting{n}.xml").write_bytes(b"<x/>")
    (tmp_path / "out" / "ignored.tmp").write_bytes(b"<x/>")
    with pytest.raises(UpstreamUnavailable, match="2 IDocs wait unread") as caught:
        await connector.handle(COMMAND, samples.booking(COMMAND))
    assert caught.value.retry_after_s == 10.0
    assert len(files(tmp_path / "out")) == 3


async def test_its_own_pending_file_does_not_count_against_the_limit(
    tmp_path: Path,
) -> None:
    """A redelivery may always rewrite the file it wrote before."""
    connector = LegacyErpConnector(samples.settings(tmp_path, max_pending_files=1))
    envelope = samples.booking(COMMAND)
    await connector.handle(COMMAND, envelope)
    await connector.handle(COMMAND, envelope)
    assert len(files(tmp_path / "out")) == 1


async def test_an_unwritable_folder_is_upstream_unavailable(tmp_path: Path) -> None:
    """OSError is translated at the boundary, naming the file and folder."""
    settings = samples.settings(tmp_path)
    (tmp_path / "out").rmdir()
    connector = LegacyErpConnector(settings)
    with pytest.raises(UpstreamUnavailable, match=r"erp-legacy unavailable: .*out"):
        await connector.handle(COMMAND, samples.booking(COMMAND))


async def test_the_sold_to_lookup_is_used(tmp_path: Path) -> None:
    """An xref lookup can supply the ERP's customer number."""
    connector = LegacyErpConnector(
        samples.settings(tmp_path), sold_to=lambda account: "0000100131"
    )
    await connector.handle(COMMAND, samples.booking(COMMAND))
    (path,) = (tmp_path / "out").iterdir()
    idoc = parse_idoc(path.read_bytes())
    assert isinstance(idoc, v.Orders05)
    assert {p.partn for p in idoc.e1edka1} == {"0000100131"}


async def test_other_commands_are_refused(tmp_path: Path) -> None:
    """Only booking requests; anything else is a routing mistake."""
    connector = LegacyErpConnector(samples.settings(tmp_path))
    command = QuoteUpdateRequested(quote_id="quote-1", status="ordered")
    with pytest.raises(UnknownMessageType, match="QuoteUpdateRequested"):
        await connector.handle(command, samples.booking(COMMAND))
