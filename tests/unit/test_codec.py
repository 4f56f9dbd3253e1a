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


@pytest.mark.parametrize(
    "amount",
    [b'"1E+1000000"', b'"-1E+1000000"', b"1E+1000000"],
    ids=["string", "negative-string", "json-number"],
)
def test_an_amount_past_the_decimal_context_is_schema_invalid(amount: bytes) -> None:
    """decimal.Overflow from a check never escapes: the message is dead-lettered."""
    env = decode_envelope(
        envelope_bytes(b'{"account":"a","entry_id":"e","amount":' + amount + b"}"),
        max_bytes=LIMIT,
    )
    with pytest.raises(SchemaInvalid, match="amount"):
        DECODERS.decode_data(env)


class _Careless(msgspec.Struct, frozen=True):
    """A type whose own check does Decimal arithmetic that can overflow."""

    amount: Decimal

    def __post_init__(self) -> None:
        if abs(self.amount) > 10:  # abs() rounds: Overflow past Emax
            raise ValueError("too much")


def test_any_arithmetic_error_while_decoding_data_is_schema_invalid() -> None:
    """Whatever a type's own checks compute, ArithmeticError is schema_invalid."""
    env = decode_envelope(
        envelope_bytes(b'{"amount":"1E+1000000"}').replace(
            b"ledger.entry.posted", b"test.careless"
        ),
        max_bytes=LIMIT,
    )
    with pytest.raises(SchemaInvalid, match=r"test\.careless") as info:
        Decoders({"test.careless": _Careless}).decode_data(env)
    assert isinstance(info.value.__cause__, ArithmeticError)


@pytest.mark.parametrize(
    "time",
    [
        "2024-01-02T01:30:00Z",
        "2024-01-02T01:30:00+00:00",
        "2024-01-01T23:30:00-02:00",
        "2024-01-02T10:30:00+09:00",
    ],
)
def test_time_is_read_in_utc_whatever_its_offset(time: str) -> None:
    """One instant, one UTC time: its inbox day cannot depend on the sender's zone."""
    body = envelope_bytes().replace(b"2026-01-01T00:00:00Z", time.encode())
    env = decode_envelope(body, max_bytes=LIMIT)
    assert env.time == datetime(2024, 1, 2, 1, 30, tzinfo=UTC)
    assert env.time.tzinfo is UTC
    assert env.time.date().isoformat() == "2024-01-02"


@pytest.mark.parametrize(
    "time", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:30:00+01:00"]
)
def test_a_time_outside_the_calendar_in_utc_is_malformed(time: str) -> None:
    """Valid with its offset, but its UTC instant is no datetime: malformed."""
    body = envelope_bytes().replace(b"2026-01-01T00:00:00Z", time.encode())
    with pytest.raises(UndecodableMessage, match="out of range in UTC") as info:
        decode_envelope(body, max_bytes=LIMIT)
    assert info.value.reason == "malformed"


W3C_EXAMPLES = [
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01",
    "00-0af7651916cd43dd8448eb211c80319c-b9c7c989f97918e1-01",
]


def with_traceparent(value: str) -> bytes:
    return envelope_bytes().replace(
        b'"data"', b'"traceparent":' + msgspec.json.encode(value) + b',"data"'
    )


@pytest.mark.parametrize("value", W3C_EXAMPLES)
def test_a_valid_traceparent_is_kept_as_sent(value: str) -> None:
    """The W3C specification's own examples pass through unchanged."""
    env = decode_envelope(with_traceparent(value), max_bytes=LIMIT)
    assert env.traceparent == value


def test_a_later_traceparent_version_is_kept_as_its_version_00_fields() -> None:
    """Version cc: the first four fields are read and propagated as version 00."""
    later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future"
    env = decode_envelope(with_traceparent(later), max_bytes=LIMIT)
    assert env.traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "value",
    [
        "00-" + "a" * 1_000_000,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + "x" * 1_000_000,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01.",
        " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "",
    ],
    ids=[
        "1MB",
        "00-with-1MB-tail",
        "00-with-more-fields",
        "upper-case",
        "version-ff",
        "zero-trace-id",
        "zero-parent-id",
        "short-trace-id",
        "later-version-bad-separator",
        "leading-space",
        "empty",
    ],
)
def test_an_invalid_traceparent_is_dropped_not_refused(value: str) -> None:
    """W3C: an invalid traceparent is ignored; the message itself is fine."""
    env = decode_envelope(with_traceparent(value), max_bytes=4 * LIMIT)
    assert env.traceparent is None
    assert env.id == "m1"


@pytest.mark.parametrize(
    "attribute",
    [
        b'"id":"m1"',
        b'"source":"/t"',
        b'"type":"ledger.entry.posted"',
        b'"correlationid":"a"',
        b'"idempotencykey":"k1"',
    ],
)
def test_an_empty_required_attribute_is_malformed(attribute: bytes) -> None:
    """CloudEvents requires them non-empty; an empty idempotency key would collide."""
    name = attribute.partition(b":")[0]
    body = envelope_bytes().replace(attribute, name + b':""')
    with pytest.raises(UndecodableMessage, match=r"at `\$\." + name[1:-1].decode()):
        decode_envelope(body, max_bytes=LIMIT)


@pytest.mark.parametrize("version", [b'"0.3"', b'"1.0.2"', b'""', b"1.0"])
def test_a_specversion_other_than_1_0_is_malformed(version: bytes) -> None:
    """Only CloudEvents 1.0 is read."""
    body = envelope_bytes().replace(b'"1.0"', version)
    with pytest.raises(UndecodableMessage, match="specversion"):
        decode_envelope(body, max_bytes=LIMIT)


def test_envelopes_as_written_so_far_still_decode() -> None:
    """The encoder always wrote specversion "1.0"; one without it reads as 1.0."""
    written = encode_envelope(
        Envelope(
            id="m-1",
            source="/test",
            type="ledger.entry.posted",
            time=datetime(2026, 1, 1, tzinfo=UTC),
            correlation_id="acc-1",
            idempotency_key="ledger:e-1",
        )
    )
    assert b'"specversion":"1.0"' in written
    assert decode_envelope(written, max_bytes=LIMIT).specversion == "1.0"
    bare = envelope_bytes().replace(b'"specversion":"1.0",', b"")
    assert decode_envelope(bare, max_bytes=LIMIT).specversion == "1.0"
