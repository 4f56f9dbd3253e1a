"""CloudEvents 1.0 as received: one view per event, whatever the content mode.

The view keeps the context attributes as the spec names them, the extension
attributes in their own mapping, and the event data as bytes in the format
``datacontenttype`` declares. That holds for all three ways data travels:

- structured JSON with ``data`` and a JSON content type (or none, which the
  JSON format reads as ``application/json``): the member's JSON text, exactly
  as sent (``null`` included: an explicit null payload is not absent data);
- structured JSON with ``data`` and any other content type: the string's UTF-8;
- structured JSON with ``data_base64``, or an HTTP binary-mode body: the bytes.

``from_attributes`` is where every content mode meets the spec's rules on
attribute names, types and the required attributes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

from broker.errors import SchemaInvalid

__all__ = [
    "AttributeValue",
    "CloudEventView",
    "MemberError",
    "SPECVERSION",
    "from_attributes",
    "is_json_media_type",
]

#: The only ``specversion`` this reader accepts.
SPECVERSION = "1.0"

#: What a context attribute can hold once decoded (CloudEvents type system).
AttributeValue = str | int | bool

_RFC3339 = Annotated[datetime, Meta(tz=True)]
_NAME = re.compile(r"[a-z0-9]+")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+\s*(;.*)?")
_URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# The spec forbids C0 and C1 control characters in attribute values.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_INT32 = range(-(2**31), 2**31)
_REQUIRED = ("id", "source", "specversion", "type")
_STRING_ATTRIBUTES = frozenset(
    {"id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject"}
)


class CloudEventView(msgspec.Struct, frozen=True, kw_only=True):
    """One CloudEvent, validated against the spec's attribute rules.

    Attributes:
        specversion: always ``"1.0"``.
        id: with ``source``, unique per distinct event: the dedupe key.
        source: URI-reference of the producer.
        type: the event type (reverse-DNS by convention).
        datacontenttype: as sent; None when absent.
        dataschema: absolute URI of the data's schema, if any.
        subject: what the event is about, within ``source``.
        time: when the occurrence happened (RFC 3339, with an offset).
        extensions: every other attribute; unset (``null``) ones are absent.
        data: the payload in ``datacontenttype``'s format; None when absent.
        data_is_json: ``data`` holds JSON text (decode it with `json_data`).
    """

    specversion: str
    id: str
    source: str
    type: str
    datacontenttype: str | None = None
    dataschema: str | None = None
    subject: str | None = None
    time: datetime | None = None
    extensions: dict[str, str | int | bool] = msgspec.field(default_factory=dict)
    data: bytes | None = None
    data_is_json: bool = False

    @property
    def dedupe_key(self) -> tuple[str, str]:
        """``(source, id)``: a resent duplicate keeps both."""
        return (self.source, self.id)

    @property
    def traceparent(self) -> str | None:
        """The distributed-tracing extension's ``traceparent``, unparsed."""
        value = self.extensions.get("traceparent")
        return value if isinstance(value, str) else None

    @property
    def tracestate(self) -> str | None:
        """The distributed-tracing extension's ``tracestate``, unparsed."""
        value = self.extensions.get("tracestate")
        return value if isinstance(value, str) else None

    def json_data(self) -> object:
        """Decode ``data`` as the JSON value it holds.

        Raises:
            SchemaInvalid: there is no JSON data, or it is not valid JSON.
        """
        if self.data is None or not self.data_is_json:
            raise SchemaInvalid(f"CloudEvent {self.id!r} carries no JSON data")
        try:
            return msgspec.json.decode(self.data)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise SchemaInvalid(
                f"CloudEvent {self.id!r}: data is not valid JSON: {exc}"
            ) from exc


class MemberError(msgspec.Struct, frozen=True, kw_only=True):
    """A batch member that is not a valid CloudEvent; its siblings still count.

    Attributes:
        index: position in the batch array.
        id: the member's ``id`` when it had a readable one.
        reason: what is wrong, naming the attribute.
    """

    index: int
    id: str | None
    reason: str


def is_json_media_type(content_type: str | None) -> bool:
    """Whether *content_type* declares JSON (``*/json`` or ``*/*+json``)."""
    if content_type is None:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    _, _, subtype = media.partition("/")
    return subtype == "json" or subtype.endswith("+json")


def from_attributes(
    attributes: Mapping[str, AttributeValue | None],
    *,
    data: bytes | None,
    data_is_json: bool,
) -> CloudEventView:
    """Check decoded context attributes and build the view.

    ``None`` values mean "unset" and are dropped, as the JSON format requires
    of ``null``. ``time`` arrives as a string in every content mode and is
    parsed here.

    Raises:
        SchemaInvalid: a required attribute is missing or empty, an attribute
            name is not lower-case alphanumeric, a value has the wrong type,
            or ``specversion`` is not 1.0.
    """
    attrs = {k: v for k, v in attributes.items() if v is not None}
    label = attrs.get("id")
    where = f"CloudEvent {label!r}" if isinstance(label, str) else "CloudEvent"
    for name in _REQUIRED:
        if name not in attrs:
            raise SchemaInvalid(f"{where}: required attribute {name!r} is missing")
    strings: dict[str, str] = {}
    extensions: dict[str, str | int | bool] = {}
    time: datetime | None = None
    for name, value in attrs.items():
        if not _NAME.fullmatch(name):
            raise SchemaInvalid(
                f"{where}: attribute name {name!r} is not lower-case letters and digits"
            )
        if isinstance(value, str) and _CONTROL.search(value):
            raise SchemaInvalid(f"{where}: attribute {name!r} has a control character")
        if name == "time":
            time = _timestamp(where, value)
        elif name in _STRING_ATTRIBUTES:
            if not isinstance(value, str) or not value:
                raise SchemaInvalid(
                    f"{where}: attribute {name!r} must be a non-empty string"
                )
            strings[name] = value
        elif isinstance(value, int) and not isinstance(value, bool):
            if value not in _INT32:
                raise SchemaInvalid(
                    f"{where}: attribute {name!r} is outside the 32-bit Integer range"
                )
            extensions[name] = value
        else:
            extensions[name] = value
    if strings["specversion"] != SPECVERSION:
        raise SchemaInvalid(
            f"{where}: specversion {strings['specversion']!r} is not {SPECVERSION!r}"
        )
    _check_formats(where, strings)
    return CloudEventView(
        specversion=strings["specversion"],
        id=strings["id"],
        source=strings["source"],
        type=strings["type"],
        datacontenttype=strings.get("datacontenttype"),
        dataschema=strings.get("dataschema"),
        subject=strings.get("subject"),
        time=time,
        extensions=extensions,
        data=data,
        data_is_json=data_is_json,
    )


def _timestamp(where: str, value: AttributeValue) -> datetime:
    if not isinstance(value, str):
        raise SchemaInvalid(f"{where}: attribute 'time' must be an RFC 3339 string")
    try:
        return msgspec.convert(value, _RFC3339)
    except msgspec.ValidationError as exc:
        raise SchemaInvalid(
            f"{where}: attribute 'time' {value!r} is not an RFC 3339 timestamp: {exc}"
        ) from exc


def _check_formats(where: str, strings: Mapping[str, str]) -> None:
    if any(c.isspace() for c in strings["source"]):
        raise SchemaInvalid(
            f"{where}: source {strings['source']!r} is not a URI-reference"
        )
    content_type = strings.get("datacontenttype")
    if content_type is not None and not _MEDIA_TYPE.fullmatch(content_type):
        raise SchemaInvalid(
            f"{where}: datacontenttype {content_type!r} is not an RFC 2046 media type"
        )
    schema = strings.get("dataschema")
    if schema is not None and not _URI_SCHEME.match(schema):
        raise SchemaInvalid(f"{where}: dataschema {schema!r} is not an absolute URI")
