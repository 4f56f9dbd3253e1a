from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.codec import Decoders, decode_envelope, encode_envelope, encode_event
from broker.errors import (
    MessageTooLarge,
    SchemaInvalid,
    UndecodableMessage,
    UnknownMessageType,
)
from canonical import Envelope, LedgerEntryPosted

LIMIT = 1 << 20
DECODERS = Decoders({"ledger.entry.posted": LedgerEntryPosted})


def envelope_bytes(
    data: bytes = b'{"account":"a","entry_id":"e","amount":"1.5"}',
) -> bytes:
    return (
        b'{"specversion":"1.0","id":"m1","source":"/t","type":"ledger.entry.posted",'
        b'"time":"2026-01-01T00:00:00Z","correlationid":"a","idempotencykey":"k1",'
        b'"data":' + data + b"}"
    )


def test_envelope_and_event_round_trip() -> None:
    """An encoded envelope decodes to the same attributes and the same event."""
    event = LedgerEntryPosted(account="acc-1", entry_id="e-1", amount=Decimal("10.25"))
    env = Envelope(
        id="m-1",
        source="/test",
        type="ledger.entry.posted",
        time=datetime(2026, 1, 1, tzinfo=UTC),
        correlation_id="acc-1",
        idempotency_key="ledger:e-1",
        data=encode_event(event),
    )
    body = encode_envelope(env)
    assert b'"correlationid":"acc-1"' in body  # CloudEvents extension naming
    decoded = decode_envelope(body, max_bytes=LIMIT)
    assert decoded.idempotency_key == "ledger:e-1"
    assert DECODERS.decode_data(decoded) == event


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xfe\x00",
        b"{not json",
        envelope_bytes()[:-5],
        b'{"id":"1","id":"2"}',
        b"[" * 10_000 + b"]" * 10_000,
        envelope_bytes(b'{"amount":' + b"9" * 5000 + b"}"),
        envelope_bytes(b'{"amount":NaN}'),
        b'{"specversion":"1.0"}',
        b"[]",
    ],
    ids=[
        "not-utf8",
        "not-json",
        "truncated",
        "duplicate-keys",
        "deep-nesting",
        "5000-digit-number",
        "nan",
        "not-an-envelope",
        "array",
    ],
)
def test_malformed_bodies_are_undecodable(body: bytes) -> None:
    """Every malformed shape raises UndecodableMessage ("malformed"), never a crash."""
    with pytest.raises(UndecodableMessage) as info:
        decode_envelope(body, max_bytes=LIMIT)
    assert info.value.reason == "malformed"


def test_oversize_is_refused_before_parsing() -> None:
    """A body over the limit is refused with reason "oversize" even if it is valid."""
    with pytest.raises(MessageTooLarge) as info:
        decode_envelope(envelope_bytes(), max_bytes=20)
    assert info.value.reason == "oversize"


def test_unknown_type_and_schema_invalid_are_told_apart() -> None:
    """Unhandled type: unknown_type; bad data for a known type: schema_invalid."""
    env = decode_envelope(envelope_bytes(), max_bytes=LIMIT)
    with pytest.raises(UnknownMessageType):
        Decoders({}).decode_data(env)
    bad = decode_envelope(
        envelope_bytes(b'{"account":"a","amount":"x"}'), max_bytes=LIMIT
    )
    with pytest.raises(SchemaInvalid, match=r"ledger\.entry\.posted"):
        DECODERS.decode_data(bad)


@pytest.mark.parametrize("amount", ['"Infinity"', '"1e20"', '"0.0000001"'])
def test_absurd_amounts_are_schema_invalid(amount: str) -> None:
    """Non-finite, huge or too-fine amounts fail validation at the field."""
    env = decode_envelope(
        envelope_bytes(
            b'{"account":"a","entry_id":"e","amount":' + amount.encode() + b"}"
        ),
        max_bytes=LIMIT,
    )
    with pytest.raises(SchemaInvalid, match="amount"):
        DECODERS.decode_data(env)


def test_unknown_envelope_fields_are_tolerated() -> None:
    """A newer producer's extra attributes do not break an older reader."""
    body = envelope_bytes().replace(
        b'"specversion"', b'"comexampleext":5,"specversion"'
    )
    assert decode_envelope(body, max_bytes=LIMIT).id == "m1"


@given(
    account=st.text(min_size=1, max_size=64),
    cents=st.integers(min_value=-(10**12), max_value=10**12),
)
def test_any_valid_entry_round_trips(account: str, cents: int) -> None:
    """Property: every valid ledger entry survives encode → decode unchanged."""
    event = LedgerEntryPosted(
        account=account, entry_id="e", amount=Decimal(cents) / 100
    )
    raw = encode_event(event)
    assert msgspec.json.decode(raw, type=LedgerEntryPosted) == event


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        (None, True),
        ("application/cloudevents+json", True),
        ("application/json; charset=utf-8", True),
        ("text/plain", False),
        ("application/xml", False),
    ],
)
def test_only_json_content_types_are_read(content_type: str | None, ok: bool) -> None:
    """A body declared as anything but JSON is malformed, whatever it contains."""
    if ok:
        decode_envelope(envelope_bytes(), max_bytes=LIMIT, content_type=content_type)
    else:
        with pytest.raises(UndecodableMessage, match="content type"):
            decode_envelope(
                envelope_bytes(), max_bytes=LIMIT, content_type=content_type
            )


@pytest.mark.parametrize("attribute", [b'"id":"m1"', b'"correlationid":"a"'])
@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"c" * 255, True),
        (b"c" * 256, False),
        ("\u00e9".encode() * 127, True),  # 254 bytes
        ("\u00e9".encode() * 128, False),  # 128 characters, 256 bytes
    ],
    ids=["255-ascii", "256-ascii", "254-bytes", "256-bytes"],
)
def test_attributes_sent_as_amqp_short_strings_fit_in_255_bytes(
    attribute: bytes, value: bytes, ok: bool
) -> None:
    """Too long, it would fail every publish of what it causes: malformed now."""
    name = attribute.split(b":")[0]
    body = envelope_bytes().replace(attribute, name + b':"' + value + b'"')
    if ok:
        decode_envelope(body, max_bytes=LIMIT)
    else:
        with pytest.raises(UndecodableMessage, match="over 255 bytes"):
            decode_envelope(body, max_bytes=LIMIT)


def test_a_type_too_long_for_a_routing_key_is_undecodable() -> None:
    body = envelope_bytes().replace(b"ledger.entry.posted", b"x." * 128)
    with pytest.raises(UndecodableMessage, match="envelope type is over 255 bytes"):
        decode_envelope(body, max_bytes=LIMIT)


@pytest.mark.parametrize(
    "attribute",
    [b'"id":"m1"', b'"source":"/t"', b'"correlationid":"a"', b'"idempotencykey":"k1"'],
)
def test_a_nul_in_an_attribute_is_undecodable(attribute: bytes) -> None:
    """PostgreSQL's text cannot hold NUL: refused here, where its bytes are kept."""
    name, _, value = attribute.partition(b":")
    body = envelope_bytes().replace(attribute, name + b":" + value[:-1] + b'\\u0000"')
    with pytest.raises(UndecodableMessage, match="contains a NUL character"):
        decode_envelope(body, max_bytes=LIMIT)
