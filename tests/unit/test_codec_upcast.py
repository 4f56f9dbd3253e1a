"""Schema versions: writers stamp the current one, readers upcast only older ones.

Each test registers a v1 → v2 upcaster for a type and removes it afterwards
(`REGISTRY` is process-wide). In its v2 the ledger entry's ``memo`` was
called ``note``; the upcaster renames it, and fails on data already in v2's
shape, so a v2 message read as v1 shows up as an error.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from broker.codec import Decoders, decode_envelope, encode_event
from broker.connector import Inbound
from broker.errors import SchemaInvalid
from broker.http.ingress import inbound_message
from broker.letters import follow_up
from canonical import Envelope, LedgerEntryPosted
from canonical.upcast import REGISTRY, current_version, upcaster

TAG = "ledger.entry.posted"
LIMIT = 1 << 20
AT = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def v2() -> Iterator[None]:
    """``ledger.entry.posted`` is at version 2 while the test runs."""

    @upcaster(TAG, 1)
    def _rename_note(data: dict[str, Any]) -> dict[str, Any]:
        data["memo"] = data.pop("note")  # KeyError on data in v2's shape
        return data

    try:
        yield
    finally:
        del REGISTRY[(TAG, 1)]


def envelope(data: bytes, version: int) -> Envelope:
    return Envelope(
        id="m-1",
        source="/test",
        type=TAG,
        time=AT,
        correlation_id="acc-1",
        idempotency_key="ledger:e-1",
        schema_version=version,
        data=msgspec.Raw(data),
    )


ENTRY = LedgerEntryPosted(
    account="acc-1", entry_id="e-1", amount=Decimal("10.25"), memo="rent"
)


def test_decoders_built_before_an_upcaster_is_registered_use_it() -> None:
    """The current version is looked up per message, not when Decoders is built."""
    decoders = Decoders({TAG: LedgerEntryPosted})
    old = b'{"account":"acc-1","entry_id":"e-1","amount":"10.25","note":"rent"}'

    @upcaster(TAG, 1)
    def _rename_note(data: dict[str, Any]) -> dict[str, Any]:
        data["memo"] = data.pop("note")
        return data

    try:
        assert decoders.decode_data(envelope(old, 1)) == ENTRY
        assert decoders.decode_data(envelope(encode_event(ENTRY), 2)) == ENTRY
    finally:
        del REGISTRY[(TAG, 1)]


@pytest.mark.usefixtures("v2")
def test_a_follow_up_is_stamped_with_its_types_current_version() -> None:
    """A message written now is in the current shape, and says so: never upcast."""
    cause = envelope(b"null", 1)
    row = follow_up(
        cause,
        ENTRY,
        tag=TAG,
        key="ledger:e-1",
        source="/test",
        now=AT,
        exchange="q2c.events",
        routing_key=TAG,
        correlation_id="acc-1",
        subject=None,
    )
    env = decode_envelope(row.body, max_bytes=LIMIT)
    assert env.schema_version == current_version(TAG) == 2
    assert Decoders({TAG: LedgerEntryPosted}).decode_data(env) == ENTRY


@pytest.mark.usefixtures("v2")
def test_an_ingress_event_is_stamped_with_its_types_current_version() -> None:
    """Vendor events become envelopes in the current shape, and say so."""
    message = inbound_message(
        Inbound(
            event=ENTRY,
            id="vendor-1",
            source="/vendor",
            correlation_id="acc-1",
            idempotency_key="ledger:e-1",
            time=AT,
        )
    )
    env = decode_envelope(message.body, max_bytes=LIMIT)
    assert env.schema_version == 2
    assert Decoders({TAG: LedgerEntryPosted}).decode_data(env) == ENTRY


@pytest.mark.usefixtures("v2")
def test_upcast_data_keeps_its_decimals_exact() -> None:
    """Numbers in old data become Decimals as written, never floats: 1.10 stays 1.10."""
    decoders = Decoders({TAG: LedgerEntryPosted})
    for number in (b"1.10", b"12345678901234.123456", b"-0.000001"):
        old = b'{"account":"a","entry_id":"e","amount":' + number + b',"note":""}'
        event = decoders.decode_data(envelope(old, 1))
        assert str(event.amount) == number.decode()


@pytest.mark.usefixtures("v2")
def test_an_upcaster_that_fails_makes_the_message_schema_invalid() -> None:
    """Whatever an upcaster raises (here KeyError), the message is dead-lettered."""
    decoders = Decoders({TAG: LedgerEntryPosted})
    with pytest.raises(SchemaInvalid, match=r"v1: KeyError") as info:
        decoders.decode_data(envelope(encode_event(ENTRY), 1))
    assert isinstance(info.value.__cause__, KeyError)


@pytest.mark.usefixtures("v2")
def test_a_version_this_reader_does_not_know_is_schema_invalid() -> None:
    """Newer than the reader, or below 1: schema_invalid, never an escape."""
    decoders = Decoders({TAG: LedgerEntryPosted})
    for version in (0, 3):
        with pytest.raises(SchemaInvalid, match=f"version {version} is not readable"):
            decoders.decode_data(envelope(encode_event(ENTRY), version))
