"""The HTTP binding's binary content mode: ce-* headers, Content-Type, body."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from adapters.cloudevents import content_mode, parse_binary
from broker.errors import SchemaInvalid

HEADERS = {
    "ce-specversion": "1.0",
    "ce-id": "evt-1",
    "ce-source": "/crm/acme",
    "ce-type": "com.example.order.placed",
}


def test_attributes_come_from_ce_headers_in_any_case() -> None:
    """Header names are case-insensitive; Content-Type is datacontenttype."""
    view = parse_binary(
        {
            "CE-SpecVersion": "1.0",
            "Ce-Id": "evt-1",
            "ce-source": "/crm/acme",
            "CE-TYPE": "t",
            "ce-time": "2018-04-05T17:31:00Z",
            "Content-Type": "application/json",
            "Host": "example.com",
        },
        b'{"a": 1}',
    )
    assert (view.id, view.source, view.type) == ("evt-1", "/crm/acme", "t")
    assert view.datacontenttype == "application/json"
    assert view.time is not None
    assert view.json_data() == {"a": 1}
    assert "host" not in view.extensions


def test_extension_values_are_their_canonical_strings() -> None:
    """Binary mode carries every attribute as a string."""
    view = parse_binary({**HEADERS, "ce-comexampleothervalue": "5"}, b"")
    assert view.extensions == {"comexampleothervalue": "5"}


def test_an_empty_body_is_no_data() -> None:
    """No body, no data."""
    view = parse_binary({**HEADERS, "content-type": "application/json"}, b"")
    assert view.data is None
    assert not view.data_is_json


def test_non_json_bodies_are_kept_as_bytes() -> None:
    """Any content type travels as the raw body."""
    view = parse_binary({**HEADERS, "content-type": "application/xml"}, b"<a/>")
    assert view.data == b"<a/>"
    assert not view.data_is_json


def test_values_are_percent_decoded_as_utf8() -> None:
    """The spec's own example: "Euro € 😀" percent-encoded, any hex case."""
    view = parse_binary(
        {**HEADERS, "ce-subject": "Euro%20%E2%82%AC%20%f0%9f%98%80"}, b""
    )
    assert view.subject == "Euro \u20ac \U0001f600"


def test_overlong_utf8_sequences_are_refused() -> None:
    """``%C0%A0`` is an overlong U+0020 and must be rejected."""
    with pytest.raises(SchemaInvalid, match="percent-encoded UTF-8"):
        parse_binary({**HEADERS, "ce-subject": "a%C0%A0b"}, b"")


def test_quoted_string_values_are_unescaped_first() -> None:
    """Older senders quote values; quoted-pairs unescape before decoding."""
    view = parse_binary({**HEADERS, "ce-subject": '"a \\"b\\" c"'}, b"")
    assert view.subject == 'a "b" c'


def test_ce_datacontenttype_must_not_appear() -> None:
    """Binary mode carries the content type in Content-Type only."""
    with pytest.raises(SchemaInvalid, match="ce-datacontenttype"):
        parse_binary({**HEADERS, "ce-datacontenttype": "application/json"}, b"{}")


def test_required_attributes_are_checked() -> None:
    """A missing ce-id is a missing id."""
    headers = {k: v for k, v in HEADERS.items() if k != "ce-id"}
    with pytest.raises(SchemaInvalid, match="required attribute 'id'"):
        parse_binary(headers, b"")


def test_a_repeated_ce_header_is_refused() -> None:
    """Two values for one attribute cannot both be right."""
    headers = CIMultiDict(HEADERS)
    headers.add("CE-ID", "evt-2")
    with pytest.raises(SchemaInvalid, match="more than once"):
        parse_binary(CIMultiDictProxy(headers), b"")


@pytest.mark.parametrize(
    ("content_type", "mode"),
    [
        ("application/cloudevents+json; charset=utf-8", "structured"),
        ("application/cloudevents-batch+json", "batch"),
        ("application/json", "binary"),
        (None, "binary"),
    ],
)
def test_content_mode_follows_the_content_type(
    content_type: str | None, mode: str
) -> None:
    """The Content-Type prefix decides the mode (HTTP binding 3)."""
    headers = {"Content-Type": content_type} if content_type else {}
    assert content_mode(headers) == mode


def test_structured_messages_are_not_read_as_binary() -> None:
    """A structured-mode message is refused by the binary reader."""
    with pytest.raises(SchemaInvalid, match="structured content mode"):
        parse_binary({**HEADERS, "content-type": "application/cloudevents+json"}, b"{}")
