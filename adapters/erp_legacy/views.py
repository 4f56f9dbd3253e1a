"""The legacy ERP's IDocs: ORDERS05 (ORDERS, ORDRSP), INVOIC02, DELVRY03.

One Struct per segment type, fields in the segment's definition order (the
writer emits them in that order), values as the fixed-format strings the IDoc
carries (``20141217``, ``5602.800``); `adapters.erp_legacy.idocxml` reads and
writes them and converts the formats. Field names are the vendor's, lower-cased
in Python (``rename="upper"`` restores ``RECIPNT_NO`` on the wire). Every field
and segment is optional except what identifies an IDoc (``DOCNUM``,
``IDOCTYP``, ``MESTYP``): the reader is tolerant, and the mapping checks what
it needs.

Provenance. ORDERS05 is read from a real ECC output (WIRE-FORMATS §9). ORDRSP,
INVOIC02 and DESADV (on basic type DELVRY03) have no public verbatim sample:
their shape here is defined from the documented segment grammar (segment and
field names of the SAP basic types). Qualifier values marked [M] below come
from general knowledge of SAP, not from a saved source; check them in WE60 /
the partner agreement of the customer's system before relying on them.

Project conventions (not SAP standard, stated once here):

* ORDRSP carries the customer PO in ``E1EDK02 QUALF 001`` and the ERP order
  number in ``E1EDK02 QUALF 002`` (SAP's "vendor order number" [M]).
* ORDRSP status is ``E1EDK01 ACTION``: ``000`` accepted, ``003`` rejected. A
  rejection has no ``QUALF 002`` reference, gives its reason code in each
  item's ``ABGRU`` and in ``E1EDK01 AUGRU``, and its text in ``E1EDKT1`` /
  ``E1EDKT2`` (``TDID`` ``Z001``).
* An item whose sales item category ``E1EDP01 PSTYV`` is ``TAD`` (service item
  [M]) is not delivered; every other item is physical.
"""

from __future__ import annotations

import msgspec

__all__ = [
    # the control record and the segments
    "Segment",
    "EdiDc40",
    "E1EDK01",
    "E1EDK14",
    "E1EDK03",
    "E1EDKA1",
    "E1EDK02",
    "E1EDKT1",
    "E1EDKT2",
    "E1EDP01",
    "E1EDP02",
    "E1EDP20",
    "E1EDPA1",
    "E1EDP19",
    "E1EDP26",
    "E1EDS01",
    "E1EDL20",
    "E1ADRM1",
    "E1EDT13",
    "E1EDL24",
    "E1EDL41",
    "E1EDL43",
    # the IDocs
    "Orders05",
    "Invoic02",
    "Delvry03",
    "Idoc",
    # qualifiers and codes
    "ORG_DIVISION",
    "ORG_DISTRIBUTION_CHANNEL",
    "ORG_SALES_ORG",
    "ORG_COMPANY_CODE",
    "REF_CUSTOMER_PO",
    "REF_ERP_ORDER",
    "REF_INVOICE",
    "REF_DELIVERY",
    "DATE_DOCUMENT",
    "DATE_GOODS_ISSUE",
    "PARTNER_SOLD_TO",
    "PARTNER_SHIP_TO",
    "PARTNER_BILL_TO",
    "PARTNER_PAYER",
    "MATERIAL_CUSTOMER",
    "MATERIAL_OURS",
    "SUM_ITEMS",
    "SUM_INVOICE",
    "ACTION_NEW",
    "ACTION_ACCEPTED",
    "ACTION_REJECTED",
    "TEXT_STATUS",
    "SERVICE_ITEM",
    "DELIVERY_REF_ORDER",
    "DELIVERY_REF_PO",
]

# E1EDK14 QUALF (SAP Help [V]); 011 company code [M].
ORG_DIVISION = "006"
ORG_DISTRIBUTION_CHANNEL = "007"
ORG_SALES_ORG = "008"
ORG_COMPANY_CODE = "011"
# E1EDK02 / E1EDP02 QUALF: 001 customer PO [V]; the others [M].
REF_CUSTOMER_PO = "001"
REF_ERP_ORDER = "002"
REF_INVOICE = "009"
REF_DELIVERY = "012"
# E1EDK03 IDDAT and E1EDT13 QUALF [M].
DATE_DOCUMENT = "012"
DATE_GOODS_ISSUE = "006"
# E1EDKA1 / E1EDPA1 PARVW (AG and LF [V], the rest [M]).
PARTNER_SOLD_TO = "AG"
PARTNER_SHIP_TO = "WE"
PARTNER_BILL_TO = "RE"
PARTNER_PAYER = "RG"
# E1EDP19 QUALF [M]: 001 the customer's material number, 002 ours.
MATERIAL_CUSTOMER = "001"
MATERIAL_OURS = "002"
# E1EDS01 SUMID: 002 total item value, net [V fixture]; 011 invoice amount,
# tax included [M].
SUM_ITEMS = "002"
SUM_INVOICE = "011"
# E1EDP01 ACTION 001 new item [V fixture]; E1EDK01 ACTION in ORDRSP: ours.
ACTION_NEW = "001"
ACTION_ACCEPTED = "000"
ACTION_REJECTED = "003"
TEXT_STATUS = "Z001"
SERVICE_ITEM = "TAD"
# E1EDL43 QUALF C = sales order; E1EDL41 QUALI 001 = customer PO [M].
DELIVERY_REF_ORDER = "C"
DELIVERY_REF_PO = "001"


class Segment(msgspec.Struct, frozen=True, kw_only=True, rename="upper"):
    """Base of every segment: vendor field names on the wire, unknown fields ignored."""


class EdiDc40(Segment, frozen=True, kw_only=True):
    """The control record: who sent which IDoc type and message to whom, when."""

    tabnam: str = "EDI_DC40"
    mandt: str | None = None
    #: 16-digit IDoc number, unique per client and sender.
    docnum: str
    docrel: str | None = None
    status: str | None = None
    #: ``1`` outbound from the SAP system, ``2`` inbound to it.
    direct: str | None = None
    outmod: str | None = None
    test: str | None = None
    idoctyp: str
    cimtyp: str | None = None
    mestyp: str
    mescod: str | None = None
    mesfct: str | None = None
    sndpor: str | None = None
    sndprt: str | None = None
    sndpfc: str | None = None
    sndprn: str | None = None
    rcvpor: str | None = None
    rcvprt: str | None = None
    rcvpfc: str | None = None
    rcvprn: str | None = None
    credat: str | None = None
    cretim: str | None = None
    refint: str | None = None
    serial: str | None = None


class E1EDK01(Segment, frozen=True, kw_only=True):
    """Document header general data."""

    action: str | None = None
    curcy: str | None = None
    hwaer: str | None = None
    wkurs: str | None = None
    zterm: str | None = None
    bsart: str | None = None
    belnr: str | None = None
    ntgew: str | None = None
    brgew: str | None = None
    gewei: str | None = None
    recipnt_no: str | None = None
    augru: str | None = None
    augru_bez: str | None = None


class E1EDK14(Segment, frozen=True, kw_only=True):
    """Header organisational data: one ``QUALF`` / ``ORGID`` pair."""

    qualf: str | None = None
    orgid: str | None = None


class E1EDK03(Segment, frozen=True, kw_only=True):
    """Header date segment, by ``IDDAT`` qualifier."""

    iddat: str | None = None
    datum: str | None = None
    uzeit: str | None = None


class E1EDKA1(Segment, frozen=True, kw_only=True):
    """Header partner, by ``PARVW`` role."""

    parvw: str | None = None
    partn: str | None = None
    lifnr: str | None = None
    name1: str | None = None
    name2: str | None = None
    stras: str | None = None
    ort01: str | None = None
    pstlz: str | None = None
    land1: str | None = None
    telf1: str | None = None
    telfx: str | None = None
    spras: str | None = None
    ort02: str | None = None
    regio: str | None = None
    ihrez: str | None = None
    bname: str | None = None
    paorg: str | None = None
    orgtx: str | None = None
    pagru: str | None = None
    spras_iso: str | None = None


class E1EDPA1(E1EDKA1, frozen=True, kw_only=True):
    """Item partner: the header partner's fields, for one item."""


class E1EDK02(Segment, frozen=True, kw_only=True):
    """Header reference document, by ``QUALF``."""

    qualf: str | None = None
    belnr: str | None = None
    posnr: str | None = None
    datum: str | None = None
    uzeit: str | None = None


class E1EDKT2(Segment, frozen=True, kw_only=True):
    """One line of a header text."""

    tdline: str | None = None
    tdformat: str | None = None


class E1EDKT1(Segment, frozen=True, kw_only=True):
    """Header text identification; its lines follow as `E1EDKT2`."""

    tdid: str | None = None
    tsspras: str | None = None
    tsspras_iso: str | None = None
    e1edkt2: tuple[E1EDKT2, ...] = ()


class E1EDP02(Segment, frozen=True, kw_only=True):
    """Item reference document, by ``QUALF`` (INVOIC02: the PO and the order)."""

    qualf: str | None = None
    belnr: str | None = None
    zeile: str | None = None
    datum: str | None = None
    uzeit: str | None = None


class E1EDP20(Segment, frozen=True, kw_only=True):
    """Item schedule line: quantity and date."""

    wmeng: str | None = None
    ameng: str | None = None
    edatu: str | None = None
    ezeit: str | None = None


class E1EDP19(Segment, frozen=True, kw_only=True):
    """Item object identification: a material number, by ``QUALF``."""

    qualf: str | None = None
    idtnr: str | None = None
    ktext: str | None = None


class E1EDP26(Segment, frozen=True, kw_only=True):
    """Item amount, by ``QUALF`` (INVOIC02)."""

    qualf: str | None = None
    betrg: str | None = None


class E1EDP01(Segment, frozen=True, kw_only=True):
    """Document item general data, with its child segments (ORDERS05 and INVOIC02)."""

    posex: str | None = None
    action: str | None = None
    pstyp: str | None = None
    menge: str | None = None
    menee: str | None = None
    bmng2: str | None = None
    pmene: str | None = None
    vprei: str | None = None
    peinh: str | None = None
    netwr: str | None = None
    ntgew: str | None = None
    gewei: str | None = None
    curcy: str | None = None
    matkl: str | None = None
    #: The higher-level item (a bundle's parent line).
    uepos: str | None = None
    bpumn: str | None = None
    bpumz: str | None = None
    #: Reason for rejection of the item.
    abgru: str | None = None
    abgrt: str | None = None
    brgew: str | None = None
    #: Sales document item category.
    pstyv: str | None = None
    werks: str | None = None
    lgort: str | None = None
    vstel: str | None = None
    matnr: str | None = None
    e1edp02: tuple[E1EDP02, ...] = ()
    e1edp20: tuple[E1EDP20, ...] = ()
    e1edpa1: tuple[E1EDPA1, ...] = ()
    e1edp19: tuple[E1EDP19, ...] = ()
    e1edp26: tuple[E1EDP26, ...] = ()

    def material(self, qualf: str) -> str | None:
        """The ``IDTNR`` of the first `E1EDP19` with *qualf*, if any."""
        return next((m.idtnr for m in self.e1edp19 if m.qualf == qualf), None)


class E1EDS01(Segment, frozen=True, kw_only=True):
    """Summary segment: one total, by ``SUMID``."""

    sumid: str | None = None
    summe: str | None = None
    sunit: str | None = None
    waerq: str | None = None


class E1ADRM1(Segment, frozen=True, kw_only=True):
    """Delivery partner, by ``PARTNER_Q`` role."""

    partner_q: str | None = None
    partner_id: str | None = None
    name1: str | None = None
    street1: str | None = None
    postl_cod1: str | None = None
    city1: str | None = None
    country1: str | None = None


class E1EDT13(Segment, frozen=True, kw_only=True):
    """Delivery deadline, by ``QUALF``: planned (``NTANF``) and actual (``ISDD``)."""

    qualf: str | None = None
    ntanf: str | None = None
    ntanz: str | None = None
    isdd: str | None = None
    isdz: str | None = None


class E1EDL43(Segment, frozen=True, kw_only=True):
    """Delivery item reference to an SD document (``QUALF C``: the sales order)."""

    qualf: str | None = None
    belnr: str | None = None
    posnr: str | None = None
    datum: str | None = None


class E1EDL41(Segment, frozen=True, kw_only=True):
    """Delivery item reference to the customer's PO (``QUALI 001``)."""

    quali: str | None = None
    bstnr: str | None = None
    bstdt: str | None = None
    posex: str | None = None


class E1EDL24(Segment, frozen=True, kw_only=True):
    """Delivery item: material and delivered quantity."""

    posnr: str | None = None
    matnr: str | None = None
    arktx: str | None = None
    matkl: str | None = None
    werks: str | None = None
    lgort: str | None = None
    lfimg: str | None = None
    vrkme: str | None = None
    e1edl43: tuple[E1EDL43, ...] = ()
    e1edl41: tuple[E1EDL41, ...] = ()


class E1EDL20(Segment, frozen=True, kw_only=True):
    """Delivery header; every other delivery segment nests under it."""

    vbeln: str | None = None
    vstel: str | None = None
    vkorg: str | None = None
    inco1: str | None = None
    inco2: str | None = None
    btgew: str | None = None
    ntgew: str | None = None
    gewei: str | None = None
    anzpk: str | None = None
    bolnr: str | None = None
    #: Means-of-transport id: the carrier's tracking number.
    traid: str | None = None
    e1adrm1: tuple[E1ADRM1, ...] = ()
    e1edt13: tuple[E1EDT13, ...] = ()
    e1edl24: tuple[E1EDL24, ...] = ()


class _HeaderLookups:
    """Look-ups shared by the IDocs with header references, partners and totals.

    A slot-less mixin rather than a Struct base: a Struct subclass that
    redeclares a field keeps the base's position for it, and the writer emits
    fields in declaration order, so each IDoc declares its own segment order.
    """

    __slots__ = ()

    e1edka1: tuple[E1EDKA1, ...]
    e1edk02: tuple[E1EDK02, ...]
    e1edk03: tuple[E1EDK03, ...]
    e1eds01: tuple[E1EDS01, ...]

    def reference(self, qualf: str) -> str | None:
        """The ``BELNR`` of the first `E1EDK02` with *qualf*, if any."""
        return next((r.belnr for r in self.e1edk02 if r.qualf == qualf), None)

    def partner(self, parvw: str) -> E1EDKA1 | None:
        """The first header partner in role *parvw*, if any."""
        return next((p for p in self.e1edka1 if p.parvw == parvw), None)

    def date(self, iddat: str) -> str | None:
        """The ``DATUM`` of the first `E1EDK03` with *iddat*, if any."""
        return next((d.datum for d in self.e1edk03 if d.iddat == iddat), None)

    def total(self, sumid: str) -> str | None:
        """The ``SUMME`` of the first `E1EDS01` with *sumid*, if any."""
        return next((s.summe for s in self.e1eds01 if s.sumid == sumid), None)


class Orders05(Segment, _HeaderLookups, frozen=True, kw_only=True):
    """Basic type ORDERS05: message ORDERS (an order) or ORDRSP (its response)."""

    edi_dc40: EdiDc40
    e1edk01: E1EDK01 | None = None
    e1edk14: tuple[E1EDK14, ...] = ()
    e1edk03: tuple[E1EDK03, ...] = ()
    e1edka1: tuple[E1EDKA1, ...] = ()
    e1edk02: tuple[E1EDK02, ...] = ()
    e1edkt1: tuple[E1EDKT1, ...] = ()
    e1edp01: tuple[E1EDP01, ...] = ()
    e1eds01: tuple[E1EDS01, ...] = ()

    def org(self, qualf: str) -> str | None:
        """The ``ORGID`` of the first `E1EDK14` with *qualf*, if any."""
        return next((o.orgid for o in self.e1edk14 if o.qualf == qualf), None)

    def texts(self, tdid: str) -> tuple[str, ...]:
        """The header texts with id *tdid*, each one's ``TDLINE`` lines joined."""
        return tuple(
            " ".join(line.tdline for line in text.e1edkt2 if line.tdline)
            for text in self.e1edkt1
            if text.tdid == tdid
        )


class Invoic02(Segment, _HeaderLookups, frozen=True, kw_only=True):
    """Basic type INVOIC02, message INVOIC: an invoice, in segment order."""

    edi_dc40: EdiDc40
    e1edk01: E1EDK01 | None = None
    e1edka1: tuple[E1EDKA1, ...] = ()
    e1edk02: tuple[E1EDK02, ...] = ()
    e1edk03: tuple[E1EDK03, ...] = ()
    e1edk14: tuple[E1EDK14, ...] = ()
    e1edp01: tuple[E1EDP01, ...] = ()
    e1eds01: tuple[E1EDS01, ...] = ()


class Delvry03(Segment, frozen=True, kw_only=True):
    """Basic type DELVRY03, message DESADV: a shipped delivery (minimal subset)."""

    edi_dc40: EdiDc40
    e1edl20: E1EDL20 | None = None


#: Every IDoc the adapter reads or writes; tell them apart by ``edi_dc40.mestyp``.
Idoc = Orders05 | Invoic02 | Delvry03
