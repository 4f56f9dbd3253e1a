"""The CloudEvents JSON event and batch formats: attributes, extensions, data."""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from adapters.cloudevents import (
    CloudEventView,
    MemberError,
    is_json_media_type,
    parse_batch,
    parse_structured,
)
from broker.errors import SchemaInvalid

REQUIRED: dict[str, Any] = {
    "specversion": "1.0",
    "id": "evt-1",
    "source": "/crm/acme",
    "type": "com.example.order.placed",
}


def event(**members: Any) -> bytes:
    return msgspec.json.encode({**REQUIRED, **members})


def parsed(**members: Any) -> CloudEventView:
    return parse_structured(event(**members))


def test_required_attributes_only_is_a_valid_event() -> None:
    """The four required attributes make a complete event with no data."""
    view = parsed()
    assert (view.specversion, view.id, view.source, view.type) == (
        "1.0",
        "evt-1",
        "/crm/acme",
        "com.example.order.placed",
    )
    assert view.data is None
    assert view.extensions == {}
    assert view.dedupe_key == ("/crm/acme", "evt-1")


@pytest.mark.parametrize("name", ["id", "source", "specversion", "type"])
def test_each_missing_required_attribute_is_named(name: str) -> None:
    """Leaving out a required attribute fails, naming it."""
    members = {k: v for k, v in REQUIRED.items() if k != name}
    with pytest.raises(SchemaInvalid, match=f"required attribute '{name}'"):
        parse_structured(msgspec.json.encode(members))


@pytest.mark.parametrize("name", ["id", "source", "type"])
def test_required_attributes_must_be_non_empty_strings(name: str) -> None:
    """An empty or non-string required attribute is refused."""
    with pytest.raises(SchemaInvalid, match=f"'{name}' must be a non-empty string"):
        parsed(**{name: ""})
    with pytest.raises(SchemaInvalid, match=f"'{name}' must be a non-empty string"):
        parsed(**{name: 7})


def test_a_null_required_attribute_is_unset_hence_missing() -> None:
    """``null`` means unset, so a null id is a missing id."""
    with pytest.raises(SchemaInvalid, match="required attribute 'id'"):
        parsed(id=None)


def test_other_spec_versions_are_refused() -> None:
    """Only CloudEvents 1.0 is read."""
    with pytest.raises(SchemaInvalid, match=r"specversion '0\.3'"):
        parsed(specversion="0.3")


def test_null_optional_and_extension_attributes_are_unset() -> None:
    """``subject: null`` and ``ext: null`` read as absent."""
    view = parsed(subject=None, time=None, unsetextension=None)
    assert view.subject is None
    assert view.time is None
    assert "unsetextension" not in view.extensions


def test_extensions_keep_their_json_types() -> None:
    """String, integer and boolean extensions survive with their types."""
    view = parsed(comexampleext="value", comexamplecount=5, comexampleflag=True)
    assert view.extensions == {
        "comexampleext": "value",
        "comexamplecount": 5,
        "comexampleflag": True,
    }


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (1.5, "not a string, integer or boolean"),
        ({"a": 1}, "not a string, integer or boolean"),
        ([1], "not a string, integer or boolean"),
        (2**31, "32-bit Integer range"),
        ("tab\there", "control character"),
    ],
)
def test_extension_values_outside_the_type_system_are_refused(
    value: object, reason: str
) -> None:
    """Attribute values must be CloudEvents Boolean, Integer or String."""
    with pytest.raises(SchemaInvalid, match=reason):
        parsed(comexampleext=value)


@pytest.mark.parametrize("name", ["camelCase", "with_underscore", "dash-ed"])
def test_attribute_names_must_be_lower_case_alphanumeric(name: str) -> None:
    """Attribute names are a-z and 0-9 only."""
    with pytest.raises(SchemaInvalid, match="lower-case letters and digits"):
        parsed(**{name: "x"})


def test_time_is_an_rfc3339_timestamp_with_an_offset() -> None:
    """``time`` is parsed; a timestamp without offset or garbage is refused."""
    assert parsed(time="2018-04-05T17:31:00Z").time == datetime(
        2018, 4, 5, 17, 31, tzinfo=UTC
    )
    with pytest.raises(SchemaInvalid, match="RFC 3339"):
        parsed(time="2018-04-05T17:31:00")
    with pytest.raises(SchemaInvalid, match="RFC 3339"):
        parsed(time="yesterday")


def test_datacontenttype_and_dataschema_formats_are_checked() -> None:
    """A content type must be a media type, a dataschema an absolute URI."""
    with pytest.raises(SchemaInvalid, match="RFC 2046"):
        parsed(datacontenttype="json")
    with pytest.raises(SchemaInvalid, match="absolute URI"):
        parsed(dataschema="/schemas/order")
    view = parsed(
        datacontenttype="application/json; charset=utf-8",
        dataschema="https://example.com/schemas/order",
    )
    assert view.dataschema == "https://example.com/schemas/order"


def test_json_data_is_kept_as_sent_and_decodes() -> None:
    """JSON data stays the member's exact JSON text; `json_data` decodes it."""
    body = (
        b'{"specversion":"1.0","id":"1","source":"/s","type":"t",'
        b'"datacontenttype":"application/json","data":{ "a" : [1, 2] }}'
    )
    view = parse_structured(body)
    assert view.data == b'{ "a" : [1, 2] }'
    assert view.data_is_json
    assert view.json_data() == {"a": [1, 2]}


def test_data_without_content_type_is_json() -> None:
    """An absent datacontenttype reads as application/json."""
    view = parsed(data="I'm just a string")
    assert view.data == b'"I\'m just a string"'
    assert view.json_data() == "I'm just a string"


def test_an_explicit_null_payload_is_not_absent_data() -> None:
    """``data: null`` is a null payload, distinct from no data."""
    view = parsed(data=None)
    assert view.data == b"null"
    assert view.json_data() is None


def test_string_data_with_a_non_json_content_type_is_its_text() -> None:
    """XML carried as a string is the string's UTF-8 bytes."""
    view = parsed(datacontenttype="application/xml", data='<much wow="xml"/>')
    assert view.data == b'<much wow="xml"/>'
    assert not view.data_is_json
    with pytest.raises(SchemaInvalid, match="no JSON data"):
        view.json_data()


def test_non_string_data_with_a_non_json_content_type_is_refused() -> None:
    """Only a string can carry data of a non-JSON content type."""
    with pytest.raises(SchemaInvalid, match="must be a string"):
        parsed(datacontenttype="application/xml", data={"a": 1})


def test_data_base64_is_decoded() -> None:
    """``data_base64`` holds binary data, decoded to bytes."""
    raw = bytes(range(256))
    view = parsed(
        datacontenttype="application/octet-stream",
        data_base64=base64.b64encode(raw).decode(),
    )
    assert view.data == raw
    assert not view.data_is_json


@pytest.mark.parametrize(
    "text", ["... base64 encoded string ...", "abc", "YWJj!", "YW Jj"]
)
def test_invalid_base64_is_refused_naming_the_member(text: str) -> None:
    """Characters outside the alphabet and bad padding are errors, not crashes."""
    with pytest.raises(SchemaInvalid, match="'data_base64' is not valid base64"):
        parsed(data_base64=text)


@pytest.mark.parametrize(
    "text",
    ["é", "YWJj\u00e9", "\u0661\u0662\u0663\u0664"],
    ids=["e-acute", "ascii-then-e-acute", "arabic-digits"],
)
def test_base64_outside_ascii_is_refused_and_spoils_only_its_member(text: str) -> None:
    """Non-ASCII ``data_base64`` is invalid base64, not a crash (a 500, retried).

    ``b64decode`` raises a plain ValueError for it, not ``binascii.Error``.
    """
    with pytest.raises(SchemaInvalid, match="'data_base64' is not valid base64"):
        parsed(data_base64=text)
    results = parse_batch(
        msgspec.json.encode(
            [{**REQUIRED, "id": "bad", "data_base64": text}, {**REQUIRED, "id": "ok"}]
        )
    )
    assert isinstance(results[0], MemberError)
    assert (results[0].index, results[0].id) == (0, "bad")
    assert "'data_base64' is not valid base64" in results[0].reason
    assert isinstance(results[1], CloudEventView)
    assert results[1].id == "ok"


def test_data_and_data_base64_are_mutually_exclusive() -> None:
    """An event may not carry both."""
    with pytest.raises(SchemaInvalid, match="mutually exclusive"):
        parsed(data={"a": 1}, data_base64="YWJj")


def test_a_null_data_base64_is_absent() -> None:
    """``data_base64: null`` does not clash with ``data``."""
    assert parsed(data_base64=None, data=1).data == b"1"


@pytest.mark.parametrize("body", [b"", b"[]", b"not json", b'"event"'])
def test_a_body_that_is_not_a_json_object_is_refused(body: bytes) -> None:
    """Structured mode needs one JSON object."""
    with pytest.raises(SchemaInvalid, match="not a JSON object"):
        parse_structured(body)


def test_distributed_tracing_extension_is_exposed() -> None:
    """``traceparent`` and ``tracestate`` are extensions, with shortcuts."""
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    view = parsed(traceparent=tp, tracestate="rojo=1")
    assert view.traceparent == tp
    assert view.tracestate == "rojo=1"
    assert parsed().traceparent is None


def test_batch_reports_each_member_on_its_own() -> None:
    """A bad member becomes a MemberError; the others still parse."""
    body = msgspec.json.encode(
        [
            {**REQUIRED, "id": "a"},
            {**REQUIRED, "id": "b", "data_base64": "%%%"},
            "not an object",
            {k: v for k, v in REQUIRED.items() if k != "type"},
        ]
    )
    results = parse_batch(body)
    assert isinstance(results[0], CloudEventView)
    assert results[0].id == "a"
    assert isinstance(results[1], MemberError)
    assert (results[1].index, results[1].id) == (1, "b")
    assert "data_base64" in results[1].reason
    assert results[2] == MemberError(
        index=2, id=None, reason="member is not a JSON object"
    )
    assert isinstance(results[3], MemberError)
    assert results[3].id == "evt-1"
    assert "'type'" in results[3].reason


AMBIGUOUS = [
    pytest.param(
        b'{"specversion": "1.0", "id": "A", "id": "B", "source": "/s", "type": "t"}',
        "duplicate JSON key 'id'",
        id="duplicate-id",
    ),
    pytest.param(
        b'{"specversion": "1.0", "id": "A", "source": "/s", "type": "t",'
        b' "data": {"total": 1, "total": 2}}',
        "duplicate JSON key 'total'",
        id="duplicate-in-data",
    ),
    pytest.param(
        b'{"specversion": "1.0", "id": "A", "source": "/s", "type": "t",'
        b' "data": {"n": 1' + b"0" * 80 + b"}}",
        "JSON number of 81 characters",
        id="huge-number",
    ),
]


@pytest.mark.parametrize(("body", "reason"), AMBIGUOUS)
def test_ambiguous_json_is_refused_as_on_the_amqp_side(
    body: bytes, reason: str
) -> None:
    """A name given twice (last wins in msgspec, first in others) is invalid.

    The same check as an envelope's on the AMQP side (`check_json`), so an
    event the webhook accepts is never one the consumers dead-letter.
    """
    with pytest.raises(SchemaInvalid, match=f"CloudEvent is ambiguous JSON: {reason}"):
        parse_structured(body)


@pytest.mark.parametrize(("body", "reason"), AMBIGUOUS)
def test_an_ambiguous_batch_member_spoils_only_itself(body: bytes, reason: str) -> None:
    """Its error names no id (it may hold two); the other members still parse."""
    good = msgspec.json.encode({**REQUIRED, "id": "ok"})
    results = parse_batch(b"[" + good + b", " + body + b"]")
    assert isinstance(results[0], CloudEventView)
    assert results[0].id == "ok"
    assert isinstance(results[1], MemberError)
    assert (results[1].index, results[1].id) == (1, None)
    assert reason in results[1].reason


def test_an_empty_batch_is_valid() -> None:
    """``[]`` is a batch of no events."""
    assert parse_batch(b"[]") == []


@pytest.mark.parametrize("body", [b"{}", b"nope", b""])
def test_a_batch_body_must_be_an_array(body: bytes) -> None:
    """The batch format's outer element is an array."""
    with pytest.raises(SchemaInvalid, match="not a JSON array"):
        parse_batch(body)


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/cloudevents+json; charset=utf-8", True),
        ("text/json", True),
        ("application/xml", False),
        ("application/jsonx", False),
        (None, False),
    ],
)
def test_json_media_types(content_type: str | None, expected: bool) -> None:
    """``*/json`` and ``*/*+json`` declare JSON, parameters ignored."""
    assert is_json_media_type(content_type) is expected


#: ~2 KB of JSON nested deeper than msgspec decodes: it raises RecursionError.
DEEP = b"[" * 1000 + b"]" * 1000


def test_json_nested_too_deep_is_refused_not_a_crash() -> None:
    """The decoder's RecursionError is SchemaInvalid (a 400 and a dead letter)."""
    with pytest.raises(SchemaInvalid, match="not a JSON object: maximum recursion"):
        parse_structured(b'{"specversion": "1.0", "data": ' + DEEP + b"}")
    with pytest.raises(SchemaInvalid, match="not a JSON array: maximum recursion"):
        parse_batch(b"[" + DEEP + b"]")
