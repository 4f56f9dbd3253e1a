"""StripeWebhook: an event's time is Stripe's ``created``, whenever it arrives.

Stripe retries a webhook for three days; the inbox dedups on the day of the
event's time, so a retry after midnight must claim the original's day.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.billing import StripeWebhook
from broker.connector import Inbound
from broker.errors import SchemaInvalid
from tests.adapters.arrival import inbox_key_on_arrival

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "billing"
PAYLOADS = Path(__file__).resolve().parents[3] / ".." / "shared" / "payloads"

#: ``created`` of the golden invoice.paid event: 2026-01-01T00:01:00Z.
CREATED = datetime(2026, 1, 1, 0, 1, tzinfo=UTC)
BEFORE_MIDNIGHT = datetime(2026, 1, 1, 23, 59, 59, tzinfo=UTC)
AFTER_MIDNIGHT = datetime(2026, 1, 2, 0, 0, 5, tzinfo=UTC)


def golden_event() -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode(
        (GOLDEN / "stripe_event_invoice_paid.json").read_bytes()
    )
    return decoded


def parse(event: dict[str, Any]) -> Inbound:
    (inbound,) = StripeWebhook(["whsec_test"]).parse({}, msgspec.json.encode(event))
    return inbound


def test_the_time_is_the_events_created_in_utc() -> None:
    """``created`` (unix seconds) is the fact's time, timezone-aware UTC."""
    inbound = parse(golden_event())
    assert inbound.time == CREATED  # a naive datetime never equals an aware one


def test_a_retry_after_midnight_claims_the_originals_day(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sent at 23:59:59 and again at 00:00:05: one inbox key, on Stripe's day."""
    event = golden_event()
    first = inbox_key_on_arrival(monkeypatch, BEFORE_MIDNIGHT, lambda: parse(event))
    again = inbox_key_on_arrival(monkeypatch, AFTER_MIDNIGHT, lambda: parse(event))
    assert (
        first
        == again
        == ("billing.invoice.paid:in_1QbSandboxInvoice01", date(2026, 1, 1))
    )


@pytest.mark.skipif(not PAYLOADS.is_dir(), reason="shared payload corpus not present")
def test_stripes_published_event_envelope_gives_its_created(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stripe's own Event fixture (``created`` 1234567890) carrying our invoice."""
    event = msgspec.json.decode((PAYLOADS / "stripe_event_fixture.json").read_bytes())
    event["type"] = "invoice.paid"
    event["data"]["object"] = golden_event()["data"]["object"]
    created = datetime(2009, 2, 13, 23, 31, 30, tzinfo=UTC)
    assert parse(event).time == created
    days = {
        inbox_key_on_arrival(monkeypatch, at, lambda: parse(event))[1]
        for at in (created, datetime(2009, 2, 16, 0, 0, 5, tzinfo=UTC))
    }
    assert days == {date(2009, 2, 13)}


@pytest.mark.parametrize("created", [-1, 253_402_300_800, 2**62, 10**20])
def test_a_created_no_datetime_holds_is_schema_invalid(created: int) -> None:
    """Negative or past year 9999: refused by name (a 400), not an OverflowError."""
    event = golden_event()
    event["created"] = created
    with pytest.raises(SchemaInvalid, match=r"\$\.created"):
        parse(event)


def test_the_last_second_a_datetime_holds_is_taken() -> None:
    """9999-12-31T23:59:59Z is the bound, and it converts."""
    event = golden_event()
    event["created"] = 253_402_300_799
    assert parse(event).time == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
