"""The legacy ERP's inbound folder as the daemon reads it (`actors.systems`).

One file (a packet) may hold IDocs of several deals: each is handled on its
own. The transport and the store are stand-ins that record what they are
given; the poller and the IDoc reader are the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from actors.systems import _IdocInbound
from adapters.erp_legacy import views as v
from adapters.erp_legacy.idocxml import parse_idocs, write_idoc
from broker.codec import decode_envelope
from broker.store import OutboxRow
from broker.transport.topology import DEAD_EXCHANGE
from tests.adapters.erp_legacy import samples
from tests.fakes import ConfirmingTransport as Transport
from tests.fakes import KeepingStore as Store

pytestmark = pytest.mark.anyio

OURS = "Q2C-5C0FFEE0DDBA11AB1E00"
OTHER_DEAL = "Q2C-0000000000000000000B"


def invoic(
    docnum: str, po: str, number: str, *, total: str | None = "500.00"
) -> v.Invoic02:
    """An INVOIC of the order with customer PO *po* (no total: unmappable)."""
    return v.Invoic02(
        edi_dc40=v.EdiDc40(docnum=docnum, idoctyp="INVOIC02", mestyp="INVOIC"),
        e1edk01=v.E1EDK01(curcy="EUR"),
        e1edk02=(
            v.E1EDK02(qualf=v.REF_INVOICE, belnr=number),
            v.E1EDK02(qualf=v.REF_CUSTOMER_PO, belnr=po),
        ),
        e1edk03=(v.E1EDK03(iddat=v.DATE_DOCUMENT, datum="20250306"),),
        e1eds01=() if total is None else (v.E1EDS01(sumid=v.SUM_ITEMS, summe=total),),
    )


def packet(*idocs: v.Invoic02) -> bytes:
    """One IDoc-XML file holding every one of *idocs*."""
    bodies = [
        write_idoc(i).split(b"<INVOIC02>")[1].split(b"</INVOIC02>")[0] for i in idocs
    ]
    return b"<INVOIC02>" + b"".join(bodies) + b"</INVOIC02>"


class Feed:
    """The relay's hand-over, taking anything."""

    def offer(self, rows: list[OutboxRow]) -> bool:
        """Taken."""
        return True


class Rt:
    """The parts of the runtime the inbound poller uses."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.store = Store()
        self.feed = Feed()

    def takes_event(self, event_type: str) -> bool:
        """Every event type has a reader."""
        return True


async def read_folder(tmp_path: Path, data: bytes) -> tuple[Rt, Any, list[Any]]:
    """Drop *data* as one file and let the daemon's poller take it."""
    rt = Rt()
    settings = samples.settings(tmp_path, settle_s=0)
    inbound = _IdocInbound(rt, "erp_legacy", settings)  # type: ignore[arg-type]
    (settings.inbound / "packet_INVOIC.xml").write_bytes(data)
    poller = inbound._poller
    with capture_logs() as logs:
        await poller.poll_once()  # first look
        report = await poller.poll_once()
    return rt, report, logs


async def test_one_bad_idoc_in_a_packet_costs_the_others_nothing(
    tmp_path: Path,
) -> None:
    """Ours published; a foreign PO skipped, logged; an unmappable one dead-lettered."""
    good = invoic("0000000000000001", OURS, "0090000001")
    foreign = invoic("0000000000000002", "MANUAL-4711", "0090000002")
    broken = invoic("0000000000000003", OTHER_DEAL, "0090000003", total=None)
    data = packet(good, foreign, broken)
    assert len(parse_idocs(data)) == 3

    rt, report, logs = await read_folder(tmp_path, data)

    assert (report.processed, report.failed) == (1, 0)
    moved = [f.relative_to(tmp_path / "in") for f in (tmp_path / "in").rglob("*.*")]
    assert moved == [Path("processed/packet_INVOIC.xml")]
    published = [
        decode_envelope(m.body, max_bytes=1 << 20) for m in rt.transport.published
    ]
    assert [(e.correlation_id, e.idempotency_key) for e in published] == [
        ("deal-5C0FFEE0DDBA11AB1E00", "erp-legacy:invoice.issued:0090000001")
    ]
    skipped = [e for e in logs if e["event"] == "idoc_not_ours"]
    assert [(e["idoc"], e["customer_po"]) for e in skipped] == [
        ("0000000000000002", "MANUAL-4711")
    ]

    (write,) = rt.store.writes
    (letter,) = write.dead_letters
    assert letter.queue == "/inbound/erp_legacy"
    assert letter.reason == "schema_invalid"
    assert "0000000000000003" in letter.detail
    assert "total" in letter.detail
    assert letter.correlation_id == "deal-0000000000000000000B"
    assert letter.headers["x-q2c-file"] == "packet_INVOIC.xml"
    assert letter.headers["x-q2c-idoc"] == "0000000000000003"
    # Its bytes: the one IDoc, readable again once fixed.
    assert parse_idocs(letter.body) == (broken,)
    (copy,) = write.outbox
    assert copy.exchange == DEAD_EXCHANGE
    assert copy.body == letter.body
    assert [j.stage for j in write.journal] == ["dead_lettered"]


async def test_a_packet_of_good_idocs_writes_no_dead_letter(tmp_path: Path) -> None:
    """Every deal's IDoc published, in file order; the store is not written."""
    data = packet(
        invoic("0000000000000001", OURS, "0090000001"),
        invoic("0000000000000002", OTHER_DEAL, "0090000002"),
    )

    rt, report, _ = await read_folder(tmp_path, data)

    assert report.processed == 1
    published = [
        decode_envelope(m.body, max_bytes=1 << 20) for m in rt.transport.published
    ]
    assert [e.correlation_id for e in published] == [
        "deal-5C0FFEE0DDBA11AB1E00",
        "deal-0000000000000000000B",
    ]
    assert rt.store.writes == []
