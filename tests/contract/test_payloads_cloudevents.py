"""Conformance with the published CloudEvents and W3C Trace Context examples.

Reads the spec examples kept in ``../shared/payloads`` (skipped when that
folder is absent). Expectations come from the files themselves and the
spec text around them, never from a list typed in here: every attribute of
a JSON example must come back from the parser with its value, and every
traceparent example is valid or invalid as its caption in the spec says.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.cloudevents import (
    CloudEventView,
    MemberError,
    parse_batch,
    parse_binary,
    parse_structured,
    parse_traceparent,
    parse_tracestate,
)

PAYLOADS = Path(__file__).resolve().parents[2] / ".." / "shared" / "payloads"

pytestmark = pytest.mark.skipif(
    not PAYLOADS.is_dir(), reason="shared payload corpus not present"
)


def payload(name: str) -> bytes:
    return (PAYLOADS / name).read_bytes()


ATTRIBUTES = frozenset(CloudEventView.__struct_fields__) - {"extensions", "data"}


def assert_matches_json(view: CloudEventView, members: dict[str, Any]) -> None:
    """Every member is an attribute, an extension or the data; null is unset."""
    for name, value in members.items():
        if name == "data":
            continue
        if value is None:
            assert name not in view.extensions
            assert getattr(view, name, None) is None
        elif name == "time":
            assert view.time == msgspec.convert(value, datetime)
        elif name in ATTRIBUTES:
            assert getattr(view, name) == value, name
        else:
            assert view.extensions[name] == value, name


def test_cloudevent_json_with_json_data() -> None:
    """The C234 example: null subject unset, two extensions, JSON object data."""
    body = payload("cloudevent.json")
    members = msgspec.json.decode(body)
    view = parse_structured(body)
    assert_matches_json(view, members)
    assert view.subject is None
    assert view.data_is_json
    assert view.json_data() == members["data"]


def test_cloudevent_with_xml_string_data_and_a_null_extension() -> None:
    """The B234 example: string data for an XML content type; null = unset."""
    body = payload("cloudevent_xml_string_data.json")
    members = msgspec.json.decode(body)
    view = parse_structured(body)
    assert_matches_json(view, members)
    assert "unsetextension" in members
    assert "unsetextension" not in view.extensions
    assert view.data == members["data"].encode()
    assert not view.data_is_json


def test_batch_with_the_specs_placeholder_base64() -> None:
    """The batch example: the placeholder member fails alone, clearly."""
    body = payload("cloudevent_batch.json")
    members = msgspec.json.decode(body)
    results = parse_batch(body)
    assert len(results) == len(members)
    for member, result in zip(members, results, strict=True):
        if "data_base64" in member:
            # The spec's "... base64 encoded string ..." is not base64.
            assert isinstance(result, MemberError)
            assert result.id == member["id"]
            assert "'data_base64' is not valid base64" in result.reason
        else:
            assert isinstance(result, CloudEventView)
            assert_matches_json(result, member)
            assert result.json_data() == member["data"]


def split_http_message(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Header lines, a blank line, then the body (no request line)."""
    head, sep, body = raw.partition(b"\n\n")
    assert sep, "no blank line between headers and body"
    headers: dict[str, str] = {}
    for line in head.decode("ascii").splitlines():
        name, colon, value = line.partition(":")
        assert colon, f"not a header line: {line!r}"
        headers[name.strip()] = value.strip()
    return headers, body


def test_binary_mode_message_is_the_json_example_re_encoded() -> None:
    """Same event as cloudevent.json, with extensions as their string forms."""
    headers, body = split_http_message(payload("cloudevent_http_binary_mode.txt"))
    view = parse_binary(headers, body)
    structured = parse_structured(payload("cloudevent.json"))
    for name in ("specversion", "id", "source", "type", "time", "datacontenttype"):
        assert getattr(view, name) == getattr(structured, name), name
    assert view.extensions == {k: str(v) for k, v in structured.extensions.items()}
    assert view.json_data() == structured.json_data()


CAPTION = re.compile(r"^\*(?P<caption>.+)\*$")


def traceparent_examples(text: str) -> list[tuple[str, dict[str, str]]]:
    """(caption, fields) for each captioned code block of the examples section."""
    examples: list[tuple[str, dict[str, str]]] = []
    caption: str | None = None
    block: dict[str, str] | None = None
    for line in text.splitlines():
        if block is None and (m := CAPTION.match(line.strip())):
            caption = m["caption"]
        elif line.startswith("```"):
            if block is None:
                block = {}
            else:
                assert caption is not None, "code block without a caption"
                examples.append((caption, block))
                caption, block = None, None
        elif block is not None and "=" in line:
            name, _, value = line.partition("=")
            block[name.strip()] = value.strip()
    return examples


def test_every_traceparent_example_is_classified_as_its_caption_says() -> None:
    """Captions say Valid/Invalid; the decomposition lines must match the parse."""
    examples = traceparent_examples(payload("w3c_traceparent_examples.txt").decode())
    assert examples, "no examples found"
    for caption, fields in examples:
        expected_valid = caption.lower().startswith("valid")
        assert expected_valid or caption.lower().startswith("invalid"), caption
        value = fields["Value"]
        if not expected_valid:
            with pytest.raises(ValueError, match=r"\S"):
                parse_traceparent(value)
            continue
        parsed = parse_traceparent(value)
        assert f"{parsed.version:02x}" == fields["base16(version)"]
        assert parsed.trace_id == fields["base16(trace-id)"]
        assert parsed.parent_id == fields["base16(parent-id)"]
        flags, _, comment = fields["base16(trace-flags)"].partition("//")
        assert f"{parsed.trace_flags:02x}" == flags.strip()
        assert parsed.sampled is (comment.strip() == "sampled"), comment
        assert parsed.header() == value


def header_lines(text: str) -> list[tuple[str, str]]:
    lines = []
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if colon:
            lines.append((name.strip().lower(), value.strip()))
    return lines


def test_every_header_line_of_the_spec_is_valid() -> None:
    """The spec's header examples all conform to its own grammar."""
    lines = header_lines(payload("w3c_traceparent_tracestate_headers.txt").decode())
    assert {name for name, _ in lines} == {"traceparent", "tracestate"}
    for name, value in lines:
        if name == "traceparent":
            assert parse_traceparent(value).header() == value
        else:
            assert parse_tracestate(value).header() == value


def test_left_most_tracestate_entry_belongs_to_the_traceparent_writer() -> None:
    """In the walk-through the writer's entry encodes its parent-id.

    Rojo, a generic system, stores the parent-id as is; Congo stores it
    Base64-encoded (the spec's notes say so). Either way, the left-most
    entry of each tracestate decodes to the parent-id of the traceparent
    sent with it.
    """
    lines = header_lines(payload("w3c_traceparent_tracestate_headers.txt").decode())
    pairs = [
        (value, lines[i + 1][1])
        for i, (name, value) in enumerate(lines[:-1])
        if name == "traceparent" and lines[i + 1][0] == "tracestate"
    ]
    assert pairs
    for traceparent, tracestate in pairs:
        parent_id = parse_traceparent(traceparent).parent_id
        _, left_most = parse_tracestate(tracestate).entries[0]
        as_base64 = base64.b64encode(bytes.fromhex(parent_id)).decode().rstrip("=")
        assert left_most in {parent_id, as_base64}, (traceparent, tracestate)
