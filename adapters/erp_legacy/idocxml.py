"""IDoc-XML: a defused, tolerant reader and a writer for the views in `views`.

The shape (WIRE-FORMATS §9): a root element named after the basic type (or
the customer extension), one ``<IDOC BEGIN="1">`` per IDoc, the control record
``EDI_DC40`` first, then one element per segment with ``SEGMENT="1"`` whose
children are the segment's fields as text.

Reading is driven by the view Structs: a child element whose name is a field
of the segment is read (text, or a nested segment), anything else is skipped,
so customer extension segments and fields we do not map cost nothing. The
file comes from another system's disk, so the parser is defused: it refuses
any DOCTYPE (and with it every entity declaration, internal or external, so
no entity expansion can happen), and refuses input above a size limit before
parsing it. Field values keep the IDoc's fixed formats; the ``fmt_*`` and
``parse_*`` helpers convert them.
"""

from __future__ import annotations

import enum
import functools
import re
import xml.etree.ElementTree as ET
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any, NamedTuple, NoReturn
from xml.parsers import expat

import msgspec
import msgspec.inspect as mi

from adapters.erp_legacy.views import Delvry03, Idoc, Invoic02, Orders05, Segment
from broker.errors import SchemaInvalid

__all__ = [
    "IdocInvalid",
    "DEFAULT_MAX_BYTES",
    "BASIC_TYPES",
    "parse_idocs",
    "parse_idoc",
    "write_idoc",
    "fmt_docnum",
    "fmt_date",
    "fmt_time",
    "fmt_quantity",
    "fmt_amount",
    "parse_date",
    "parse_time",
    "parse_decimal",
]

#: Larger files are refused unread: an IDoc of a few thousand items is far smaller.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024

#: Basic type (``EDI_DC40 IDOCTYP``) → its view.
BASIC_TYPES: dict[str, type[Orders05 | Invoic02 | Delvry03]] = {
    "ORDERS05": Orders05,
    "INVOIC02": Invoic02,
    "DELVRY03": Delvry03,
}


class IdocInvalid(SchemaInvalid):
    """Bytes that are not an IDoc-XML document this adapter reads, or are hostile."""


# --- reading -------------------------------------------------------------------


def parse_idocs(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Idoc, ...]:
    """Every IDoc in an IDoc-XML document, in file order.

    Raises:
        IdocInvalid: oversize, not well-formed (truncated), an encoding
            expat cannot read (multi-byte or unknown), a DOCTYPE or
            entity declaration, no ``IDOC`` element, an unsupported basic
            type, or a segment that does not fit its view (naming the IDoc
            and the path, e.g. ``$.EDI_DC40``).
    """
    if len(data) > max_bytes:
        raise IdocInvalid(f"IDoc-XML of {len(data)} bytes exceeds {max_bytes} bytes")
    root = _tree(data)
    idocs = [child for child in root if child.tag == "IDOC"]
    if not idocs:
        raise IdocInvalid(f"no <IDOC> element under <{root.tag}>")
    return tuple(_read_idoc(element) for element in idocs)


def parse_idoc(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Idoc:
    """The one IDoc in an IDoc-XML document.

    Raises:
        IdocInvalid: as `parse_idocs`, or the document holds several IDocs.
    """
    idocs = parse_idocs(data, max_bytes=max_bytes)
    if len(idocs) != 1:
        raise IdocInvalid(f"expected one IDoc, found {len(idocs)}")
    return idocs[0]


def _refuse_doctype(name: str, *_: object) -> NoReturn:
    raise IdocInvalid(f"DOCTYPE declaration ({name}) refused: IDoc-XML has none")


def _refuse_entity(name: str, *_: object) -> NoReturn:
    raise IdocInvalid(f"entity declaration ({name}) refused")


def _tree(data: bytes) -> ET.Element:
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.buffer_text = True
    # The DOCTYPE handler fires before any declaration inside it is read, so
    # neither internal entities (billion laughs) nor external ones (file or
    # network reads) are ever defined; the entity handlers are a second net.
    parser.StartDoctypeDeclHandler = _refuse_doctype
    parser.EntityDeclHandler = _refuse_entity
    parser.UnparsedEntityDeclHandler = _refuse_entity
    parser.ExternalEntityRefHandler = _refuse_entity
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise IdocInvalid(f"not well-formed XML (truncated?): {exc}") from exc
    except (ValueError, LookupError) as exc:
        # pyexpat refuses a multi-byte encoding declaration (``shift_jis``)
        # with ValueError and an unknown one (``ebcdic``) with LookupError.
        raise IdocInvalid(f"XML declaration's encoding refused: {exc}") from exc
    return builder.close()


def _read_idoc(element: ET.Element) -> Idoc:
    control = element.find("EDI_DC40")
    if control is None:
        raise IdocInvalid("IDoc without control record EDI_DC40")
    idoctyp = (control.findtext("IDOCTYP") or "").strip()
    docnum = (control.findtext("DOCNUM") or "").strip() or "?"
    view = BASIC_TYPES.get(idoctyp)
    if view is None:
        raise IdocInvalid(
            f"IDoc {docnum}: basic type {idoctyp!r} is not one of {sorted(BASIC_TYPES)}"
        )
    try:
        return msgspec.convert(_builtins(element, view), view)
    except msgspec.ValidationError as exc:
        raise IdocInvalid(f"{idoctyp} IDoc {docnum}: {exc}") from exc


def _builtins(element: ET.Element, view: type[Segment]) -> dict[str, Any]:
    slots = _slots(view)
    out: dict[str, Any] = {}
    for child in element:
        slot = slots.get(child.tag)
        if slot is None:
            continue  # a segment or field we do not map, e.g. a Z-extension
        if slot.kind is _Kind.FIELD:
            text = (child.text or "").strip()
            if text:
                out[slot.encode_name] = text
        elif slot.kind is _Kind.ONE:
            out.setdefault(slot.encode_name, _builtins(child, _segment(slot)))
        else:
            out.setdefault(slot.encode_name, []).append(
                _builtins(child, _segment(slot))
            )
    return out


# --- writing -------------------------------------------------------------------


def write_idoc(idoc: Idoc) -> bytes:
    """IDoc-XML for *idoc*: root named after its basic type (or extension), indented.

    Fields that are None and segments that are absent are left out; values are
    written as they are in the view, so build views with the ``fmt_*`` helpers,
    except for characters XML 1.0 cannot carry at all (control characters
    such as a vertical tab pasted into a street name), which are written as
    spaces: the file port must be able to read every file we write.
    The output is deterministic: equal views give equal bytes.
    """
    control = idoc.edi_dc40
    root = ET.Element(control.cimtyp or control.idoctyp)
    _write(ET.SubElement(root, "IDOC", BEGIN="1"), idoc)
    ET.indent(root, space="  ")
    return _DECLARATION + ET.tostring(root, encoding="unicode").encode() + b"\n"


_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'
#: What XML 1.0 cannot carry (its Char production, inverted).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _write(parent: ET.Element, segment: Segment) -> None:
    for slot in _slots(type(segment)).values():
        value = getattr(segment, slot.name)
        if slot.kind is _Kind.FIELD:
            if value is not None:
                ET.SubElement(parent, slot.encode_name).text = _NOT_XML.sub(" ", value)
        elif slot.kind is _Kind.ONE:
            if value is not None:
                _write(ET.SubElement(parent, slot.encode_name, SEGMENT="1"), value)
        else:
            for item in value:
                _write(ET.SubElement(parent, slot.encode_name, SEGMENT="1"), item)


# --- the plan: which child element is which field ------------------------------


class _Kind(enum.Enum):
    FIELD = "field"
    ONE = "one segment"
    MANY = "repeated segment"


class _Slot(NamedTuple):
    name: str
    encode_name: str
    kind: _Kind
    segment: type[Segment] | None


def _segment(slot: _Slot) -> type[Segment]:
    assert slot.segment is not None  # set for every ONE / MANY slot by _slots
    return slot.segment


@functools.cache
def _slots(view: type[Segment]) -> dict[str, _Slot]:
    """Encoded name → slot, in declaration order (the order the writer emits)."""
    info = mi.type_info(view)
    assert isinstance(info, mi.StructType)
    slots: dict[str, _Slot] = {}
    for field in info.fields:
        kind, segment = _classify(field.type)
        slots[field.encode_name] = _Slot(field.name, field.encode_name, kind, segment)
    return slots


def _classify(t: mi.Type) -> tuple[_Kind, type[Segment] | None]:
    if isinstance(t, mi.UnionType):
        (t,) = (member for member in t.types if not isinstance(member, mi.NoneType))
    if isinstance(t, mi.StrType):
        return _Kind.FIELD, None
    if isinstance(t, mi.StructType) and issubclass(t.cls, Segment):
        return _Kind.ONE, t.cls
    if (
        isinstance(t, mi.VarTupleType)
        and isinstance(t.item_type, mi.StructType)
        and issubclass(t.item_type.cls, Segment)
    ):
        return _Kind.MANY, t.item_type.cls
    raise TypeError(f"a segment field must be str, a Segment or a tuple of them: {t}")


# --- fixed formats ---------------------------------------------------------------

_QUANTITY = Decimal("0.001")


def fmt_docnum(number: int) -> str:
    """A 16-digit IDoc number."""
    if not 0 < number < 10**16:
        raise ValueError(f"IDoc number {number} does not fit 16 digits")
    return f"{number:016d}"


def fmt_date(value: date) -> str:
    """``YYYYMMDD``."""
    return f"{value.year:04d}{value.month:02d}{value.day:02d}"


def fmt_time(value: time | datetime) -> str:
    """``HHMMSS``."""
    return f"{value.hour:02d}{value.minute:02d}{value.second:02d}"


def fmt_quantity(value: Decimal) -> str:
    """Three decimals, like ``5602.800``; a negative value gets SAP's trailing minus."""
    return _signed(value.quantize(_QUANTITY))


def fmt_amount(value: Decimal) -> str:
    """Plain decimal notation (never an exponent); negative with a trailing minus."""
    return _signed(value)


def _signed(value: Decimal) -> str:
    if not value.is_finite():
        raise ValueError(f"{value} is not a finite number")
    return f"{-value:f}-" if value < 0 else f"{value:f}"


def parse_date(text: str, *, field: str = "date") -> date:
    """``YYYYMMDD`` → `date`.

    Raises:
        IdocInvalid: not eight digits, or not a calendar date.
    """
    if len(text) != 8 or not text.isdigit():
        raise IdocInvalid(f"{field}: {text!r} is not a date (expected YYYYMMDD)")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError as exc:
        raise IdocInvalid(f"{field}: {text!r} is not a date ({exc})") from exc


def parse_time(text: str, *, field: str = "time") -> time:
    """``HHMMSS`` → `time`.

    Raises:
        IdocInvalid: not six digits, or not a time of day.
    """
    if len(text) != 6 or not text.isdigit():
        raise IdocInvalid(f"{field}: {text!r} is not a time (expected HHMMSS)")
    try:
        return time(int(text[:2]), int(text[2:4]), int(text[4:]))
    except ValueError as exc:
        raise IdocInvalid(f"{field}: {text!r} is not a time ({exc})") from exc


def parse_decimal(text: str, *, field: str = "number") -> Decimal:
    """An IDoc number (``5602.800``, ``12.50-``, ``-12.50``) → `Decimal`.

    Raises:
        IdocInvalid: not a finite decimal number.
    """
    raw = text.strip()
    negative = raw.endswith("-")
    try:
        value = Decimal(raw[:-1] if negative else raw)
    except InvalidOperation as exc:
        raise IdocInvalid(f"{field}: {text!r} is not a number") from exc
    if not value.is_finite() or (negative and value < 0):
        raise IdocInvalid(f"{field}: {text!r} is not a number")
    return -value if negative else value
