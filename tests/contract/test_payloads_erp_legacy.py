"""Conformance: the public ORDERS05 IDoc-XML sample reads as is (WIRE-FORMATS §9).

The sample is real ECC output with a customer extension root and Z-segments;
the tolerant reader must take it unchanged. It is read from the shared corpus
beside the repository and never copied into it.
"""

from __future__ import annotations

from datetime import date, time
from decimal import Decimal
from pathlib import Path

import pytest

from adapters.erp_legacy import views as v
from adapters.erp_legacy.files import write_atomic
from adapters.erp_legacy.idocxml import (
    parse_date,
    parse_decimal,
    parse_idoc,
    parse_time,
    write_idoc,
)
from adapters.erp_legacy.sandbox import LegacyErpSandbox

PAYLOADS = Path(__file__).resolve().parents[2] / ".." / "shared" / "payloads"
SAMPLE = PAYLOADS / "idoc_orders05_purchase_order.xml"


@pytest.fixture(scope="module")
def raw() -> bytes:
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} is absent (the shared payload corpus is not here)")
    return SAMPLE.read_bytes()


@pytest.fixture(scope="module")
def idoc(raw: bytes) -> v.Orders05:
    parsed = parse_idoc(raw)
    assert isinstance(parsed, v.Orders05)
    return parsed


def test_the_control_record_reads_in_full(idoc: v.Orders05) -> None:
    """EDI_DC40: every field the sample has, in its fixed formats."""
    c = idoc.edi_dc40
    assert (c.tabnam, c.mandt, c.docnum, c.docrel, c.status, c.direct, c.outmod) == (
        "EDI_DC40",
        "100",
        "0000000064132944",
        "701",
        "30",
        "1",
        "4",
    )
    assert (c.idoctyp, c.cimtyp, c.mestyp) == ("ORDERS05", None, "/LUMBERL/VFI_ORDERS")
    assert (c.sndpor, c.sndprt, c.sndprn) == ("SAPEQ2", "LS", "EQ2CLNT100")
    assert (c.rcvpor, c.rcvprt, c.rcvpfc, c.rcvprn) == (
        "PIQCLNT001",
        "LS",
        "LS",
        "VFIDEV",
    )
    assert parse_date(c.credat or "") == date(2014, 12, 17)
    assert parse_time(c.cretim or "") == time(14, 33, 21)
    assert c.serial == "20141217143320"


def test_the_header_reads_belnr_references_org_data_and_dates(idoc: v.Orders05) -> None:
    """E1EDK01, E1EDK02 (QUALF 001 = the PO), E1EDK14, E1EDK03."""
    assert idoc.e1edk01 == v.E1EDK01(
        curcy="USD",
        hwaer="USD",
        wkurs="1.00000",
        zterm="NT00",
        bsart="ZMSP",
        belnr="4700000325",
        recipnt_no="0000100131",
    )
    assert idoc.reference(v.REF_CUSTOMER_PO) == "4700000325"
    assert idoc.e1edk02[0].datum == "20140805"
    assert [(o.qualf, o.orgid) for o in idoc.e1edk14] == [
        ("014", "1000"),
        ("009", "100"),
        ("013", "ZMSP"),
        ("011", "1000"),
    ]
    assert idoc.org(v.ORG_COMPANY_CODE) == "1000"
    assert idoc.date("012") == "20140805"


def test_the_partners_read_by_role(idoc: v.Orders05) -> None:
    """E1EDKA1: AG (the buyer), LF (the vendor), LS."""
    assert [(p.parvw, p.partn) for p in idoc.e1edka1] == [
        ("AG", "1000"),
        ("LF", "0000100131"),
        ("LS", "0000100131"),
    ]
    sold_to = idoc.partner(v.PARTNER_SOLD_TO)
    assert sold_to is not None
    assert (sold_to.bname, sold_to.paorg, sold_to.pagru) == (
        "Purchasing Grp 100",
        "1000",
        "100",
    )
    vendor = idoc.partner("LF")
    assert vendor is not None
    assert (vendor.spras, vendor.spras_iso) == ("E", "EN")


def test_the_items_read_with_schedule_lines_partners_and_materials(
    idoc: v.Orders05,
) -> None:
    """Three E1EDP01 with E1EDP20 / E1EDPA1 / E1EDP19; the Z-segment is skipped."""
    assert [i.posex for i in idoc.e1edp01] == ["00001", "00002", "00003"]
    first = idoc.e1edp01[0]
    assert parse_decimal(first.menge or "") == Decimal("5602.800")
    assert (first.menee, first.vprei, first.peinh, first.netwr) == (
        "UOM",
        "1.85",
        "1",
        "10365.18",
    )
    assert (first.werks, first.lgort, first.matkl) == ("9444", "1000", "111408")
    assert first.e1edp20 == (
        v.E1EDP20(wmeng="5602.800", ameng="0.000", edatu="20141103"),
    )
    (ship_to,) = first.e1edpa1
    assert (ship_to.parvw, ship_to.lifnr, ship_to.name1, ship_to.regio) == (
        "WE",
        "9444",
        "LOS ANGELES CA 9444",
        "CA",
    )
    (material,) = first.e1edp19
    assert material.qualf == v.MATERIAL_CUSTOMER
    assert material.idtnr == "000000000010001547"
    assert material.ktext == 'SCH ENG Bamboo QC 9/16x5" Strand Nat'
    assert idoc.e1edp01[2].e1edp20[0].edatu == "20150316"


def test_the_total_is_the_sum_of_the_items(idoc: v.Orders05) -> None:
    """E1EDS01 SUMID 002 is the sum of NETWR; each NETWR is MENGE times VPREI."""
    assert idoc.e1eds01 == (v.E1EDS01(sumid="002", summe="40098.16", sunit="USD"),)
    items = [
        (
            parse_decimal(i.menge or ""),
            parse_decimal(i.vprei or ""),
            parse_decimal(i.netwr or ""),
        )
        for i in idoc.e1edp01
    ]
    for quantity, price, net in items:
        assert (quantity * price).quantize(Decimal("0.01")) == net
    assert sum(net for _, _, net in items) == parse_decimal(idoc.total("002") or "")


def test_what_was_read_writes_and_reads_back(idoc: v.Orders05) -> None:
    """The writer drops the extension root and Z-segments, keeps everything read."""
    written = write_idoc(idoc)
    assert written.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<ORDERS05>')
    assert b"_-LUMBERL_-" not in written  # the extension root and segment
    assert parse_idoc(written) == idoc


@pytest.mark.anyio
async def test_the_simulated_erp_reads_it_and_refuses_it_as_incomplete(
    raw: bytes, tmp_path: Path
) -> None:
    """A real ORDERS05 without our material numbers is order fallout, not a crash."""
    (tmp_path / "out").mkdir()
    (tmp_path / "in").mkdir()
    await write_atomic(
        tmp_path / "out", "sample", raw.replace(b"/LUMBERL/VFI_ORDERS", b"ORDERS")
    )
    erp = LegacyErpSandbox(tmp_path / "out", tmp_path / "in")
    await erp.process_once()
    await erp.process_once()
    (answer,) = (tmp_path / "in").glob("*_ORDRSP.xml")
    ordrsp = parse_idoc(answer.read_bytes())
    assert isinstance(ordrsp, v.Orders05)
    assert ordrsp.e1edk01 is not None
    assert (ordrsp.e1edk01.action, ordrsp.e1edk01.augru) == (v.ACTION_REJECTED, "Z2")
    assert ordrsp.reference(v.REF_CUSTOMER_PO) == "4700000325"
    assert ordrsp.texts(v.TEXT_STATUS) == (
        "Missing: a material on every item (E1EDP19 QUALF 002)",
    )
