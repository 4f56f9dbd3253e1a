"""SapEventWebhook: an event's time is SAP's own, whenever it arrives.

Event Mesh redelivers until the webhook answers; the inbox dedups on the day
of the event's time, so a redelivery after midnight must claim the
original's day. The time is the CloudEvent's ``time``, else the data's
``EventRaisedDateTime``, in UTC.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.erp_cloud import SapEventWebhook
from broker.connector import Inbound
from broker.errors import SchemaInvalid
from tests.adapters.arrival import inbox_key_on_arrival

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "erp_cloud"
PAYLOADS = Path(__file__).resolve().parents[3] / ".." / "shared" / "payloads"
DELIVERY = "event_outbound_delivery_created.json"
BILLING = "event_billing_document_created.json"


def golden(name: str) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.json.decode((GOLDEN / name).read_bytes())
    return decoded


def parse(event: dict[str, Any]) -> Inbound:
    (inbound,) = SapEventWebhook(["secret"]).parse({}, msgspec.json.encode(event))
    return inbound


@pytest.mark.parametrize(
    ("name", "at"),
    [
        (DELIVERY, datetime(2025, 3, 5, 8, tzinfo=UTC)),
        (BILLING, datetime(2025, 3, 5, 9, tzinfo=UTC)),
    ],
)
def test_the_time_is_the_cloudevents_time(name: str, at: datetime) -> None:
    """Both mapped types carry the CloudEvent ``time`` (not EventRaisedDateTime)."""
    assert parse(golden(name)).time == at


@pytest.mark.parametrize("name", [DELIVERY, BILLING])
def test_a_redelivery_after_midnight_claims_the_originals_day(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Delivered at 23:59:59 and again at 00:00:05: one inbox key, on SAP's day."""
    event = golden(name)
    moments = (
        datetime(2025, 3, 5, 23, 59, 59, tzinfo=UTC),
        datetime(2025, 3, 6, 0, 0, 5, tzinfo=UTC),
    )
    keys = {
        inbox_key_on_arrival(monkeypatch, at, lambda: parse(event)) for at in moments
    }
    assert len(keys) == 1
    ((_, day),) = keys
    assert day == date(2025, 3, 5)


def test_a_time_with_an_offset_is_taken_in_utc() -> None:
    """00:30+01:00 on the 6th is 23:30Z on the 5th: the day is UTC's."""
    event = golden(DELIVERY) | {"time": "2025-03-06T00:30:00+01:00"}
    at = parse(event).time
    assert at == datetime(2025, 3, 5, 23, 30, tzinfo=UTC)
    assert at.tzinfo is UTC
    assert at.date() == date(2025, 3, 5)


def test_without_a_time_the_data_says_when_sap_raised_it() -> None:
    """``time`` is optional in CloudEvents: EventRaisedDateTime stands in."""
    event = golden(BILLING)
    del event["time"]
    assert parse(event).time == datetime(2025, 3, 5, 8, 59, 59, tzinfo=UTC)


def test_with_neither_the_time_is_left_to_the_ingress() -> None:
    """No vendor time at all: None (the ingress stamps the arrival)."""
    event = golden(DELIVERY)
    del event["time"]
    del event["data"]["EventRaisedDateTime"]
    assert parse(event).time is None


def test_a_raised_time_without_an_offset_is_schema_invalid() -> None:
    """A naive EventRaisedDateTime is no instant: refused, not taken as local time."""
    event = golden(BILLING)
    del event["time"]
    event["data"]["EventRaisedDateTime"] = "2025-03-05T08:59:59"
    with pytest.raises(SchemaInvalid, match="does not fit InvoiceIssued"):
        parse(event)


def order_created(raised: str) -> dict[str, Any]:
    """A SalesOrder.Created of the deal's order without a CloudEvent ``time``."""
    event = golden(BILLING)
    del event["time"]
    event["type"] = "sap.s4.beh.salesorder.v1.SalesOrder.Created.v1"
    event["data"] = {
        "SalesOrder": "4711",
        "PurchaseOrderByCustomer": "Q2C-006Hn00000A1b2cIAB",
        "TotalNetAmount": "5471.00",
        "TransactionCurrency": "EUR",
        "EventRaisedDateTime": raised,
    }
    return event


def test_an_order_booked_is_dated_when_sap_raised_its_event() -> None:
    """Without ``time``, EventRaisedDateTime dates the booking, in UTC."""
    at = parse(order_created("2025-03-06T00:30:00+01:00")).time
    assert at == datetime(2025, 3, 5, 23, 30, tzinfo=UTC)


def test_an_order_raised_time_without_an_offset_is_schema_invalid() -> None:
    """The booking carries no time to check: a naive time is refused, not local."""
    with pytest.raises(SchemaInvalid, match="2025-03-05T08:59:59 has no UTC offset"):
        parse(order_created("2025-03-05T08:59:59"))


@pytest.mark.parametrize(
    "time", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:30:00+01:00"]
)
def test_a_time_outside_what_utc_holds_is_schema_invalid(time: str) -> None:
    """It parses with its offset, but its UTC instant is no datetime: a 400."""
    event = golden(DELIVERY) | {"time": time}
    with pytest.raises(SchemaInvalid, match="outside the years 1 to 9999 in UTC"):
        parse(event)


@pytest.mark.skipif(not PAYLOADS.is_dir(), reason="shared payload corpus not present")
def test_the_published_cloudevent_keeps_its_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CloudEvents spec's own example, carrying an SAP delivery event."""
    event = msgspec.json.decode((PAYLOADS / "cloudevent.json").read_bytes())
    sap = golden(DELIVERY)
    event |= {"type": sap["type"], "data": sap["data"]}
    published = datetime(2018, 4, 5, 17, 31, tzinfo=UTC)
    assert parse(event).time == published
    days = {
        inbox_key_on_arrival(monkeypatch, at, lambda: parse(event))[1]
        for at in (published, datetime(2018, 4, 6, 0, 0, 5, tzinfo=UTC))
    }
    assert days == {date(2018, 4, 5)}
