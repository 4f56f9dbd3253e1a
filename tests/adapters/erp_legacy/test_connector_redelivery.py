"""A redelivered booking hands its ORDERS IDoc over once, whatever the ERP did with it.

A crash after the write, or a call that timed out while its worker thread
finished writing, redelivers the command (``first_attempt=False``). The ERP
may have taken the file by then, and its customer-reference check is only
a warning by default: a second file would be a second order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from adapters.erp_legacy.connector import LegacyErpConnector
from adapters.erp_legacy.mapping import docnum_for
from adapters.erp_legacy.sandbox import LegacyErpSandbox
from broker.errors import UpstreamUnavailable
from canonical.q2c import OrderBookingRequested, OrderSubmitted
from tests.adapters.erp_legacy import samples

pytestmark = pytest.mark.anyio

COMMAND = OrderBookingRequested(order=samples.order())


async def test_the_outbound_folder_holds_nothing_but_the_idoc(tmp_path: Path) -> None:
    """The hand-over record is kept beside the broker's inbound archive."""
    connector = LegacyErpConnector(samples.settings(tmp_path))
    envelope = samples.booking(COMMAND)
    await connector.handle(COMMAND, envelope, first_attempt=True)
    name = f"ORDERS_{docnum_for(envelope.idempotency_key)}"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [f"{name}.xml"]
    day = samples.NOW.strftime("%Y%m%d")
    assert (tmp_path / "in" / "sent" / day / f"{name}.sent").is_file()


def waiting(folder: Path) -> list[str]:
    """The IDoc files handed over and not yet taken."""
    return sorted(p.name for p in folder.glob("*.xml"))


async def test_a_redelivery_after_the_erp_took_the_file_hands_nothing_over(
    tmp_path: Path,
) -> None:
    """The ERP posted the order; the redelivery answers alike, writes nothing."""
    connector = LegacyErpConnector(samples.settings(tmp_path))
    erp = LegacyErpSandbox(tmp_path / "out", tmp_path / "in", now=lambda: samples.NOW)
    envelope = samples.booking(COMMAND)
    first = await connector.handle(COMMAND, envelope, first_attempt=True)
    await erp.process_once()  # first look
    await erp.process_once()  # stable: read, posted, answered
    assert waiting(tmp_path / "out") == []
    assert erp.state().orders_created == 1

    with capture_logs() as logs:
        again = await connector.handle(COMMAND, envelope, first_attempt=False)

    assert again == first
    assert waiting(tmp_path / "out") == []
    await erp.process_once()
    await erp.process_once()
    assert len(erp.orders) == 1
    state = erp.state()
    assert (state.idocs_read, state.duplicates, state.ordrsp_sent) == (1, 0, 1)
    docnum = docnum_for(envelope.idempotency_key)
    assert [(line["event"], line["idoc"]) for line in logs] == [
        ("idoc_already_handed_over", docnum)
    ]


async def test_a_redelivery_after_the_port_deleted_the_file_hands_nothing_over(
    tmp_path: Path,
) -> None:
    """An SAP file port deletes what it read: the broker's own record still knows."""
    connector = LegacyErpConnector(samples.settings(tmp_path))
    envelope = samples.booking(COMMAND)
    await connector.handle(COMMAND, envelope, first_attempt=True)
    (taken,) = (tmp_path / "out").glob("*.xml")
    taken.unlink()  # read and deleted by the ERP's port

    events = await connector.handle(COMMAND, envelope, first_attempt=False)

    assert [type(e) for e in events] == [OrderSubmitted]
    assert waiting(tmp_path / "out") == []


async def test_a_redelivery_of_a_file_still_waiting_leaves_it_alone(
    tmp_path: Path,
) -> None:
    """Unread yet: not rewritten (the ERP may be reading it), and not refused.

    A full outbound folder refuses new IDocs, but not one already handed over.
    """
    connector = LegacyErpConnector(samples.settings(tmp_path, max_pending_files=1))
    envelope = samples.booking(COMMAND)
    await connector.handle(COMMAND, envelope, first_attempt=True)
    (path,) = (tmp_path / "out").glob("*.xml")
    before = path.stat()
    (tmp_path / "out" / "someone-elses.xml").write_bytes(b"<x/>")  # now full

    events = await connector.handle(COMMAND, envelope, first_attempt=False)

    assert [type(e) for e in events] == [OrderSubmitted]
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


async def test_a_redelivery_of_a_command_never_handed_over_writes_it(
    tmp_path: Path,
) -> None:
    """The first attempt was refused (a full folder): the redelivery writes."""
    connector = LegacyErpConnector(samples.settings(tmp_path, max_pending_files=1))
    envelope = samples.booking(COMMAND)
    blocker = tmp_path / "out" / "someone-elses.xml"
    blocker.write_bytes(b"<x/>")
    with pytest.raises(UpstreamUnavailable, match="wait unread"):
        await connector.handle(COMMAND, envelope, first_attempt=True)
    blocker.unlink()  # the ERP read on

    await connector.handle(COMMAND, envelope, first_attempt=False)

    docnum = docnum_for(envelope.idempotency_key)
    assert waiting(tmp_path / "out") == [f"ORDERS_{docnum}.xml"]


async def test_hand_over_records_past_their_retention_are_pruned(
    tmp_path: Path,
) -> None:
    """A day's records go once none was written for ``sent_retention_days``."""
    settings = samples.settings(tmp_path, sent_dir=str(tmp_path / "sent"))
    old, recent = tmp_path / "sent" / "20240101", tmp_path / "sent" / "20240102"
    for day in (old, recent):
        day.mkdir(parents=True)
        (day / "ORDERS_0000000000000001.sent").touch()
    long_ago = time.time() - 31 * 86400
    os.utime(old, (long_ago, long_ago))
    connector = LegacyErpConnector(settings)

    await connector.handle(COMMAND, samples.booking(COMMAND), first_attempt=True)

    days = sorted(p.name for p in (tmp_path / "sent").iterdir())
    assert days == ["20240102", samples.NOW.strftime("%Y%m%d")]
    assert not (tmp_path / "in" / "sent").exists()


async def test_a_record_that_cannot_be_written_costs_the_booking_nothing(
    tmp_path: Path,
) -> None:
    """The IDoc is out: logged, answered as submitted (a retry would resend it)."""
    (tmp_path / "blocker").write_text("not a folder")
    settings = samples.settings(tmp_path, sent_dir=str(tmp_path / "blocker" / "sent"))
    connector = LegacyErpConnector(settings)

    with capture_logs() as logs:
        events = await connector.handle(
            COMMAND, samples.booking(COMMAND), first_attempt=True
        )

    assert [type(e) for e in events] == [OrderSubmitted]
    assert len(waiting(tmp_path / "out")) == 1
    (line,) = [line for line in logs if line["event"] == "handover_unrecorded"]
    assert line["log_level"] == "error"
