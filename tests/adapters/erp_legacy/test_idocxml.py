"""IDoc-XML: the tolerant reader, the writer, the fixed formats, hostile input."""

from __future__ import annotations

from datetime import date, datetime, time
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.erp_legacy import views as v
from adapters.erp_legacy.idocxml import (
    IdocInvalid,
    fmt_amount,
    fmt_date,
    fmt_docnum,
    fmt_quantity,
    fmt_time,
    parse_date,
    parse_decimal,
    parse_idoc,
    parse_idocs,
    parse_time,
    write_idoc,
)
from broker.errors import SchemaInvalid


def control(mestyp: str = "ORDERS", idoctyp: str = "ORDERS05") -> v.EdiDc40:
    return v.EdiDc40(
        mandt="100",
        docnum="0000000000000042",
        direct="2",
        idoctyp=idoctyp,
        mestyp=mestyp,
        credat="20250304",
        cretim="102030",
    )


ORDER = v.Orders05(
    edi_dc40=control(),
    e1edk01=v.E1EDK01(curcy="EUR", belnr="PO-1"),
    e1edk14=(v.E1EDK14(qualf=v.ORG_SALES_ORG, orgid="1010"),),
    e1edka1=(v.E1EDKA1(parvw="AG", partn="ACME", name1="Fish & Chips <Ltd>"),),
    e1edk02=(v.E1EDK02(qualf=v.REF_CUSTOMER_PO, belnr="PO-1"),),
    e1edp01=(
        v.E1EDP01(
            posex="000001",
            menge="5602.800",
            e1edp20=(v.E1EDP20(wmeng="5602.800"),),
            e1edp19=(v.E1EDP19(qualf=v.MATERIAL_OURS, idtnr="WIDGET-10"),),
        ),
    ),
    e1eds01=(v.E1EDS01(sumid=v.SUM_ITEMS, summe="10.00", sunit="EUR"),),
)

DELIVERY = v.Delvry03(
    edi_dc40=control("DESADV", "DELVRY03"),
    e1edl20=v.E1EDL20(
        vbeln="0080000001",
        e1edt13=(v.E1EDT13(qualf=v.DATE_GOODS_ISSUE, isdd="20250304"),),
        e1edl24=(
            v.E1EDL24(
                posnr="000010",
                matnr="WIDGET-10",
                lfimg="3.000",
                e1edl41=(v.E1EDL41(quali="001", bstnr="PO-1"),),
            ),
        ),
    ),
)

INVOICE = v.Invoic02(
    edi_dc40=control("INVOIC", "INVOIC02"),
    e1edk01=v.E1EDK01(curcy="EUR", belnr="0090000001"),
    e1edk02=(v.E1EDK02(qualf=v.REF_INVOICE, belnr="0090000001"),),
    e1edp01=(
        v.E1EDP01(posex="000001", e1edp02=(v.E1EDP02(qualf="001", belnr="PO-1"),)),
    ),
    e1eds01=(v.E1EDS01(sumid=v.SUM_INVOICE, summe="10.00"),),
)


@pytest.mark.parametrize(
    "idoc", [ORDER, DELIVERY, INVOICE], ids=lambda i: type(i).__name__
)
def test_what_the_writer_writes_the_reader_reads_back(idoc: v.Idoc) -> None:
    """Writer → parser is the identity for every IDoc type, escaping included."""
    assert parse_idoc(write_idoc(idoc)) == idoc


def test_the_writer_marks_idocs_and_segments_and_skips_absent_fields() -> None:
    """``BEGIN="1"`` on IDOC, ``SEGMENT="1"`` on segments, root = basic type."""
    text = write_idoc(ORDER).decode()
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>\n<ORDERS05>\n')
    assert '<IDOC BEGIN="1">' in text
    assert '<EDI_DC40 SEGMENT="1">' in text
    assert '<E1EDP20 SEGMENT="1">' in text
    assert "<TABNAM>EDI_DC40</TABNAM>" in text
    assert "<NAME1>Fish &amp; Chips &lt;Ltd&gt;</NAME1>" in text
    assert "<CIMTYP>" not in text  # None fields are left out
    assert text.index("<E1EDK14") < text.index("<E1EDKA1") < text.index("<E1EDK02")


def test_an_extension_names_the_root() -> None:
    """With ``CIMTYP`` set, the root element is the extension's name."""
    idoc = v.Orders05(
        edi_dc40=v.EdiDc40(
            docnum="1", idoctyp="ORDERS05", mestyp="ORDERS", cimtyp="ZORDERS05X"
        )
    )
    assert b"<ZORDERS05X>" in write_idoc(idoc)


def test_the_reader_ignores_unknown_segments_fields_and_empty_values() -> None:
    """Z-segments, unknown fields and empty elements cost nothing."""
    xml = b"""<?xml version="1.0"?>
<ZEXT><IDOC BEGIN="1">
  <EDI_DC40 SEGMENT="1"><DOCNUM>7</DOCNUM><IDOCTYP>ORDERS05</IDOCTYP>
    <MESTYP>ORDERS</MESTYP><ZZFLAG>X</ZZFLAG></EDI_DC40>
  <Z1CUSTOM SEGMENT="1"><E1EDK01 SEGMENT="1"><CURCY>XXX</CURCY></E1EDK01></Z1CUSTOM>
  <E1EDK01 SEGMENT="1"><CURCY> USD </CURCY><ZTERM/></E1EDK01>
  <E1EDP01 SEGMENT="1"><POSEX>1</POSEX>
    <E1EDP20 SEGMENT="1"><WMENG>1.000</WMENG>
      <Z1WIN SEGMENT="1"><A>1</A></Z1WIN></E1EDP20>
  </E1EDP01>
</IDOC></ZEXT>"""
    idoc = parse_idoc(xml)
    assert isinstance(idoc, v.Orders05)
    assert idoc.e1edk01 == v.E1EDK01(curcy="USD")
    assert idoc.e1edp01[0].e1edp20 == (v.E1EDP20(wmeng="1.000"),)


def test_several_idocs_in_one_file_are_read_in_order() -> None:
    """One root may hold several ``IDOC`` elements; `parse_idoc` wants one."""
    one = write_idoc(ORDER)
    body = one.split(b"<ORDERS05>")[1].split(b"</ORDERS05>")[0]
    two = b"<ORDERS05>" + body + body + b"</ORDERS05>"
    assert parse_idocs(two) == (ORDER, ORDER)
    with pytest.raises(IdocInvalid, match="expected one IDoc, found 2"):
        parse_idoc(two)


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE ORDERS05 [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<ORDERS05><IDOC BEGIN="1"><EDI_DC40 SEGMENT="1"><DOCNUM>&lol4;</DOCNUM>
<IDOCTYP>ORDERS05</IDOCTYP><MESTYP>ORDERS</MESTYP></EDI_DC40></IDOC></ORDERS05>"""

EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE ORDERS05 [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<ORDERS05><IDOC BEGIN="1"><EDI_DC40 SEGMENT="1"><DOCNUM>&xxe;</DOCNUM>
<IDOCTYP>ORDERS05</IDOCTYP><MESTYP>ORDERS</MESTYP></EDI_DC40></IDOC></ORDERS05>"""

PARAMETER_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE ORDERS05 [<!ENTITY % remote SYSTEM "http://127.0.0.1:9/x.dtd"> %remote;]>
<ORDERS05/>"""

PLAIN_DOCTYPE = b"""<?xml version="1.0"?>
<!DOCTYPE ORDERS05 SYSTEM "orders05.dtd">
<ORDERS05/>"""


@pytest.mark.parametrize(
    "xml",
    [BILLION_LAUGHS, EXTERNAL_ENTITY, PARAMETER_ENTITY, PLAIN_DOCTYPE],
    ids=["billion-laughs", "external-entity", "parameter-entity", "doctype"],
)
def test_doctype_and_entity_declarations_are_refused(xml: bytes) -> None:
    """No DTD is ever processed, so no entity is expanded or fetched."""
    with pytest.raises(IdocInvalid, match=r"DOCTYPE declaration .* refused"):
        parse_idocs(xml)


def test_an_undeclared_entity_reference_is_not_well_formed() -> None:
    """Only XML's predefined entities are known."""
    xml = write_idoc(ORDER).replace(b"PO-1", b"&bogus;", 1)
    with pytest.raises(IdocInvalid, match="not well-formed"):
        parse_idocs(xml)


@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        ("shift_jis", "multi-byte encodings are not supported"),
        ("ebcdic", "unknown encoding: ebcdic"),
    ],
)
def test_an_encoding_expat_cannot_read_is_refused(encoding: str, message: str) -> None:
    """A multi-byte or unknown declared encoding is IdocInvalid, not a crash."""
    xml = (
        f'<?xml version="1.0" encoding="{encoding}"?>'
        '<ORDERS05><IDOC BEGIN="1"/></ORDERS05>'
    ).encode()
    with pytest.raises(IdocInvalid, match=f"encoding refused: {message}"):
        parse_idocs(xml)


def test_oversize_input_is_refused_before_parsing() -> None:
    """The size limit applies to the raw bytes, even to hostile ones."""
    with pytest.raises(IdocInvalid, match=r"of \d+ bytes exceeds 100 bytes"):
        parse_idocs(BILLION_LAUGHS, max_bytes=100)


@pytest.mark.parametrize("cut", [0, 10, 200, -20])
def test_truncated_input_is_refused(cut: int) -> None:
    """A half-written file is not taken for a (shorter) document."""
    data = write_idoc(ORDER)
    with pytest.raises(IdocInvalid, match="not well-formed"):
        parse_idocs(data[:cut])


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (b"<ORDERS05/>", "no <IDOC> element under <ORDERS05>"),
        (b"<X><IDOC BEGIN='1'/></X>", "without control record"),
        (
            b"<X><IDOC><EDI_DC40><DOCNUM>9</DOCNUM><IDOCTYP>WMMBID01</IDOCTYP>"
            b"<MESTYP>WMMBXY</MESTYP></EDI_DC40></IDOC></X>",
            "IDoc 9: basic type 'WMMBID01' is not one of",
        ),
        (
            b"<X><IDOC><EDI_DC40><IDOCTYP>ORDERS05</IDOCTYP>"
            b"<MESTYP>ORDERS</MESTYP></EDI_DC40></IDOC></X>",
            r"missing required field `DOCNUM` - at `\$.EDI_DC40`",
        ),
    ],
)
def test_documents_that_are_not_idocs_we_read_are_refused_by_name(
    xml: bytes, message: str
) -> None:
    """Each refusal says what is wrong; all are `SchemaInvalid` (permanent)."""
    with pytest.raises(SchemaInvalid, match=message):
        parse_idocs(xml)


def test_fixed_formats() -> None:
    """Dates YYYYMMDD, times HHMMSS, quantities with three decimals, 16-digit DOCNUM."""
    assert fmt_date(date(2014, 12, 17)) == "20141217"
    assert fmt_time(time(14, 33, 1)) == "143301"
    assert fmt_time(datetime(2025, 1, 1, 9, 5, 7)) == "090507"
    assert fmt_quantity(Decimal("5602.8")) == "5602.800"
    assert fmt_quantity(Decimal("1.0005")) == "1.000"
    assert fmt_amount(Decimal("10365.18")) == "10365.18"
    assert fmt_amount(Decimal("-12.50")) == "12.50-"
    assert fmt_amount(Decimal("1E+3")) == "1000"
    assert fmt_docnum(64132944) == "0000000064132944"
    with pytest.raises(ValueError, match="16 digits"):
        fmt_docnum(10**16)


def test_fixed_formats_parse_back_and_refuse_garbage() -> None:
    """Both sign conventions read; malformed values name their field."""
    assert parse_date("20141217") == date(2014, 12, 17)
    assert parse_time("143321") == time(14, 33, 21)
    assert parse_decimal("12.50-") == Decimal("-12.50")
    assert parse_decimal("-12.50") == Decimal("-12.50")
    for bad in ("20141317", "2014121", "2014-12-17"):
        with pytest.raises(IdocInvalid, match=r"E1EDK03\.DATUM"):
            parse_date(bad, field="E1EDK03.DATUM")
    with pytest.raises(IdocInvalid, match="not a time"):
        parse_time("256000")
    for bad in ("", "1,5", "NaN", "Infinity", "--1", "-1-"):
        with pytest.raises(IdocInvalid, match="not a number"):
            parse_decimal(bad)


@given(st.decimals(min_value=-(10**12), max_value=10**12, places=3))
def test_quantities_survive_the_fixed_format(value: Decimal) -> None:
    """fmt_quantity → parse_decimal keeps any three-decimal quantity."""
    assert parse_decimal(fmt_quantity(value)) == value


def test_characters_xml_cannot_carry_are_written_as_spaces() -> None:
    """A vertical tab or a NUL in a name: the file still parses, the rest intact."""
    control = msgspec.structs.replace(
        ORDER.e1edka1[0], name1="Fish\x0b& Chips\x00 \u00e9\U0001f41f"
    )
    idoc = msgspec.structs.replace(ORDER, e1edka1=(control, *ORDER.e1edka1[1:]))
    (party, *_) = parse_idoc(write_idoc(idoc)).e1edka1  # type: ignore[union-attr]
    assert party.name1 == "Fish & Chips  \u00e9\U0001f41f"
