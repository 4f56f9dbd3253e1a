"""The simulated legacy ERP: posting, the customer-reference check, the knobs."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from adapters.erp_legacy import views as v
from adapters.erp_legacy.files import write_atomic
from adapters.erp_legacy.idocxml import parse_idoc, write_idoc
from adapters.erp_legacy.mapping import to_orders05
from adapters.erp_legacy.sandbox import Knobs, LegacyErpSandbox, SandboxState
from canonical.commerce import Order
from tests.adapters.erp_legacy import samples
from tests.polling import eventually

pytestmark = pytest.mark.anyio


def orders05(tmp_path: Path, order: Order, docnum: str) -> v.Orders05:
    return to_orders05(
        order,
        docnum=docnum,
        created_at=samples.NOW,
        settings=samples.settings(tmp_path),
    )


async def drop(tmp_path: Path, idoc: v.Orders05) -> None:
    await write_atomic(
        tmp_path / "out", f"ORDERS_{idoc.edi_dc40.docnum}", write_idoc(idoc)
    )


def sandbox(
    tmp_path: Path, *, number_block: int = 0, **knobs: object
) -> LegacyErpSandbox:
    samples.settings(tmp_path)
    return LegacyErpSandbox(
        tmp_path / "out",
        tmp_path / "in",
        knobs=msgspec.convert(knobs, Knobs) if knobs else None,
        now=lambda: samples.NOW,
        number_block=number_block,
    )


async def step(erp: LegacyErpSandbox) -> int:
    """Two looks: the first sees new files, the second takes them."""
    return await erp.process_once() + await erp.process_once()


def answers(tmp_path: Path) -> list[v.Idoc]:
    inbound = tmp_path / "in"
    assert not list(inbound.glob("*.tmp"))
    return [parse_idoc(p.read_bytes()) for p in sorted(inbound.glob("*.xml"))]


def state(**counts: int) -> SandboxState:
    zero = dict.fromkeys(SandboxState.__struct_fields__, 0)
    return SandboxState(**(zero | counts))


async def test_an_order_is_booked_shipped_and_invoiced(tmp_path: Path) -> None:
    """ORDRSP with a 10-digit number, then DESADV and INVOIC02, in that order."""
    erp = sandbox(tmp_path)
    await drop(tmp_path, orders05(tmp_path, samples.order(), "1"))
    assert await step(erp) == 1

    ordrsp, desadv, invoic = answers(tmp_path)
    assert isinstance(ordrsp, v.Orders05)
    assert ordrsp.edi_dc40.mestyp == "ORDRSP"
    assert ordrsp.e1edk01 is not None
    assert ordrsp.e1edk01.action == v.ACTION_ACCEPTED
    assert ordrsp.reference(v.REF_CUSTOMER_PO) == samples.CUSTOMER_REF
    number = ordrsp.reference(v.REF_ERP_ORDER)
    assert number is not None
    assert len(number) == 10
    assert number.isdigit()
    assert ordrsp.total(v.SUM_ITEMS) == "577.50"
    assert erp.orders == {("ACME-001", samples.CUSTOMER_REF): number}

    assert isinstance(desadv, v.Delvry03)
    assert desadv.edi_dc40.mestyp == "DESADV"
    assert desadv.e1edl20 is not None
    shipped = [(i.matnr, i.lfimg) for i in desadv.e1edl20.e1edl24]
    assert shipped == [("WIDGET-10", "3.000"), ("WIDGET-MOUNT", "3.000")]  # no service

    assert isinstance(invoic, v.Invoic02)
    assert invoic.reference(v.REF_ERP_ORDER) == number
    assert invoic.reference(v.REF_DELIVERY) == desadv.e1edl20.vbeln
    assert invoic.total(v.SUM_INVOICE) == "577.50"
    assert len(invoic.e1edp01) == 3
    assert erp.state() == state(
        idocs_read=1, orders_created=1, ordrsp_sent=1, desadv_sent=1, invoic_sent=1
    )
    assert [p.name for p in (tmp_path / "out" / "processed").iterdir()] == [
        "ORDERS_1.xml"
    ]


async def test_the_same_po_again_books_no_second_order(tmp_path: Path) -> None:
    """SD's customer-reference check: a resent order gets the existing number."""
    erp = sandbox(tmp_path)
    await drop(tmp_path, orders05(tmp_path, samples.order(), "1"))
    await step(erp)
    await drop(tmp_path, orders05(tmp_path, samples.order(), "2"))  # new DOCNUM
    await step(erp)

    responses = [
        idoc
        for idoc in answers(tmp_path)
        if isinstance(idoc, v.Orders05) and idoc.edi_dc40.mestyp == "ORDRSP"
    ]
    assert len(responses) == 2
    first, second = (r.reference(v.REF_ERP_ORDER) for r in responses)
    assert first == second
    assert len(erp.orders) == 1
    assert responses[1].texts(v.TEXT_STATUS) == (
        f"Order {first} already exists for customer reference {samples.CUSTOMER_REF}",
    )
    assert erp.state() == state(
        idocs_read=2,
        orders_created=1,
        duplicates=1,
        ordrsp_sent=2,
        desadv_sent=1,
        invoic_sent=1,
    )


async def test_a_different_po_is_a_different_order(tmp_path: Path) -> None:
    """Two customer references, two order numbers."""
    erp = sandbox(tmp_path)
    await drop(tmp_path, orders05(tmp_path, samples.order(), "1"))
    await drop(
        tmp_path, orders05(tmp_path, samples.order(customer_ref="Q2C-OTHER"), "2")
    )
    await step(erp)
    assert sorted(erp.orders.values()) == ["0000000001", "0000000002"]


async def test_a_number_block_is_a_fresh_range_for_every_number(
    tmp_path: Path,
) -> None:
    """Block 7: orders, deliveries and invoices all start seven million higher."""
    erp = sandbox(tmp_path, number_block=7)
    await drop(tmp_path, orders05(tmp_path, samples.order(), "1"))
    await step(erp)
    ordrsp, desadv, invoic = answers(tmp_path)
    assert isinstance(ordrsp, v.Orders05)
    assert isinstance(invoic, v.Invoic02)
    assert ordrsp.reference(v.REF_ERP_ORDER) == "0007000001"
    assert invoic.reference(v.REF_DELIVERY) == "0087000001"
    assert invoic.reference(v.REF_INVOICE) == "0097000001"
    assert [int(i.edi_dc40.docnum) for i in (ordrsp, desadv, invoic)] == [
        7_000_001,
        7_000_002,
        7_000_003,
    ]
    with pytest.raises(ValueError, match="number_block"):
        sandbox(tmp_path, number_block=1000)


async def test_a_service_only_order_is_not_delivered(tmp_path: Path) -> None:
    """No physical item (all PSTYV TAD): ORDRSP and INVOIC02, no DESADV."""
    erp = sandbox(tmp_path)
    await drop(tmp_path, orders05(tmp_path, samples.order(service_only=True), "1"))
    await step(erp)
    assert [i.edi_dc40.mestyp for i in answers(tmp_path)] == ["ORDRSP", "INVOIC"]


async def test_error_rate_refuses_orders_with_a_rejecting_ordrsp(
    tmp_path: Path,
) -> None:
    """A business refusal: ACTION 003, reason Z1, no order number, no order."""
    erp = sandbox(tmp_path, error_rate=1.0)
    await drop(tmp_path, orders05(tmp_path, samples.order(), "1"))
    await step(erp)
    (ordrsp,) = answers(tmp_path)
    assert isinstance(ordrsp, v.Orders05)
    assert ordrsp.e1edk01 is not None
    assert (ordrsp.e1edk01.action, ordrsp.e1edk01.augru) == (v.ACTION_REJECTED, "Z1")
    assert ordrsp.reference(v.REF_ERP_ORDER) is None
    assert {item.abgru for item in ordrsp.e1edp01} == {"Z1"}
    assert ordrsp.texts(v.TEXT_STATUS) == ("Order refused by the ERP",)
    assert erp.orders == {}
    assert erp.state() == state(idocs_read=1, rejected=1, ordrsp_sent=1)


async def test_error_rate_is_a_seeded_fraction(tmp_path: Path) -> None:
    """error_rate 0.5 refuses some orders and books the others, repeatably."""
    erp = sandbox(tmp_path, error_rate=0.5)
    for n in range(1, 21):
        await drop(
            tmp_path, orders05(tmp_path, samples.order(customer_ref=f"PO-{n}"), str(n))
        )
    await step(erp)
    counts = erp.state()
    assert counts.rejected + counts.orders_created == 20
    assert 0 < counts.rejected < 20


async def test_an_incomplete_order_is_rejected_with_what_is_missing(
    tmp_path: Path,
) -> None:
    """No PO reference and no material: reason Z2 and a readable list."""
    idoc = orders05(tmp_path, samples.order(), "1")
    broken = msgspec.structs.replace(
        idoc,
        e1edk02=(),
        e1edp01=tuple(msgspec.structs.replace(i, e1edp19=()) for i in idoc.e1edp01),
    )
    erp = sandbox(tmp_path)
    await drop(tmp_path, broken)
    await step(erp)
    (ordrsp,) = answers(tmp_path)
    assert isinstance(ordrsp, v.Orders05)
    assert ordrsp.e1edk01 is not None
    assert ordrsp.e1edk01.augru == "Z2"
    (text,) = ordrsp.texts(v.TEXT_STATUS)
    assert text.startswith("Missing: customer PO (E1EDK02 QUALF 001); a material")


async def test_invoice_delta_changes_the_invoiced_amount(tmp_path: Path) -> None:
    """The invoice disagrees with the order by exactly the delta, items included."""
    erp = sandbox(tmp_path, invoice_delta=Decimal("12.34"))
    await drop(tmp_path, orders05(tmp_path, samples.order(), "1"))
    await step(erp)
    invoic = answers(tmp_path)[-1]
    assert isinstance(invoic, v.Invoic02)
    assert invoic.total(v.SUM_INVOICE) == "589.84"
    items = sum(Decimal(i.netwr or "0") for i in invoic.e1edp01)
    assert items == Decimal("589.84")


async def test_in_an_outage_files_wait_in_the_outbound_folder(tmp_path: Path) -> None:
    """outage=True: nothing is read or answered; switched off, all is processed."""
    erp = sandbox(tmp_path, outage=True)
    await drop(tmp_path, orders05(tmp_path, samples.order(), "1"))
    assert await step(erp) == 0
    assert (tmp_path / "out" / "ORDERS_1.xml").exists()
    assert answers(tmp_path) == []
    erp.knobs.outage = False
    assert await step(erp) == 1
    assert len(answers(tmp_path)) == 3


async def test_files_that_are_not_orders_fail_with_a_reason(tmp_path: Path) -> None:
    """An INVOIC in the ERP's inbound port, or garbage, goes to failed/."""
    erp = sandbox(tmp_path)
    idoc = orders05(tmp_path, samples.order(), "1")
    wrong = msgspec.structs.replace(
        idoc, edi_dc40=msgspec.structs.replace(idoc.edi_dc40, mestyp="ORDRSP")
    )
    await drop(tmp_path, wrong)
    (tmp_path / "out" / "junk.xml").write_bytes(b"<not-an-idoc/>")
    await step(erp)
    failed = tmp_path / "out" / "failed"
    assert sorted(p.name for p in failed.iterdir()) == [
        "ORDERS_1.xml",
        "ORDERS_1.xml.reason.txt",
        "junk.xml",
        "junk.xml.reason.txt",
    ]
    assert (
        "takes ORDERS IDocs, not ORDERS05/ORDRSP"
        in (failed / "ORDERS_1.xml.reason.txt").read_text()
    )
    assert erp.state().failed_files == 2
    assert answers(tmp_path) == []


async def test_start_and_aclose_run_the_loop_and_it_restarts(tmp_path: Path) -> None:
    """Started, it answers files as they come; closed and started again, it resumes."""
    erp = sandbox(tmp_path)
    erp.knobs.latency_s = 0.001
    await drop(tmp_path, orders05(tmp_path, samples.order(), "1"))
    async with erp:

        async def invoiced() -> bool:
            return erp.state().invoic_sent == 1

        await eventually(invoiced)
    await drop(tmp_path, orders05(tmp_path, samples.order(), "2"))
    await erp.start()
    try:

        async def answered_again() -> bool:
            return erp.state().duplicates == 1

        await eventually(answered_again)
    finally:
        await erp.aclose()
    assert erp.state().orders_created == 1
