"""The CloudEvents HTTP protocol binding, binary content mode, read side.

In binary mode each context attribute is a ``ce-<name>`` header, the
``Content-Type`` header is ``datacontenttype`` and the body is the data.
Header values are the attributes' canonical string forms, so extension
attributes read back as strings (``ce-comexampleothervalue: 5`` is ``"5"``);
a consumer that knows an extension's type converts it. Values are
unquoted (RFC 7230 quoted-string, for older senders) and then percent-decoded
once, refusing byte sequences that are not UTF-8, as HTTP binding 3.1.3.2
requires.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from adapters.cloudevents.views import (
    AttributeValue,
    CloudEventView,
    from_attributes,
    is_json_media_type,
)
from broker.errors import SchemaInvalid

__all__ = ["parse_binary", "content_mode"]

_PREFIX = "ce-"
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_QUOTED_PAIR = re.compile(r"\\(.)")


def content_mode(headers: Mapping[str, str]) -> str:
    """Which content mode an HTTP message uses: by its ``Content-Type`` prefix.

    Returns:
        ``"structured"``, ``"batch"`` or ``"binary"``, per HTTP binding 3.
    """
    content_type = _lowered(headers).get("content-type", "").strip().lower()
    if content_type.startswith("application/cloudevents-batch"):
        return "batch"
    if content_type.startswith("application/cloudevents"):
        return "structured"
    return "binary"


def parse_binary(headers: Mapping[str, str], body: bytes) -> CloudEventView:
    """Read an event sent in binary content mode.

    *headers* may be any mapping (an aiohttp ``CIMultiDictProxy`` or a plain
    dict); names are matched case-insensitively. An empty body means the
    event has no data.

    Raises:
        SchemaInvalid: the message uses another content mode, a header value
            is not decodable, ``ce-datacontenttype`` is present, or the
            attributes are not a valid CloudEvent.
    """
    lowered = _lowered(headers)
    mode = content_mode(lowered)
    if mode != "binary":
        raise SchemaInvalid(f"HTTP message uses {mode} content mode, not binary")
    if f"{_PREFIX}datacontenttype" in lowered:
        raise SchemaInvalid(
            "binary mode carries datacontenttype in Content-Type; "
            "a ce-datacontenttype header must not be present"
        )
    attributes: dict[str, AttributeValue | None] = {}
    for name, value in lowered.items():
        if name.startswith(_PREFIX):
            attributes[name.removeprefix(_PREFIX)] = _header_value(name, value)
    content_type = lowered.get("content-type")
    if content_type is not None:
        attributes["datacontenttype"] = content_type.strip()
    return from_attributes(
        attributes,
        data=body if body else None,
        data_is_json=bool(body) and is_json_media_type(content_type),
    )


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        if key in lowered and key.startswith(_PREFIX):
            raise SchemaInvalid(f"header {key!r} appears more than once")
        lowered[key] = value
    return lowered


def _header_value(name: str, value: str) -> str:
    text = value.strip(" \t")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = _QUOTED_PAIR.sub(r"\1", text[1:-1])
    try:
        raw = _PERCENT.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("ascii"))
        return raw.decode("utf-8")
    except UnicodeError as exc:
        raise SchemaInvalid(
            f"header {name!r} is not percent-encoded UTF-8: {exc}"
        ) from exc
