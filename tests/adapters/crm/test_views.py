"""Salesforce views: ids, change-event headers and origins, records, errors."""

from __future__ import annotations

import string
from datetime import UTC, date, datetime
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.crm import views as v

ALNUM = string.ascii_letters + string.digits


@pytest.mark.parametrize(
    ("id15", "id18"),
    [
        ("0014H00002LbR7Q", "0014H00002LbR7QQAV"),
        ("00558000000yFyD", "00558000000yFyDAAU"),
        ("001000000000000", "001000000000000AAA"),
    ],
)
def test_a_15_character_id_gains_its_checksum_suffix(id15: str, id18: str) -> None:
    """The suffix encodes, per 5-character chunk, which letters are upper-case."""
    assert v.to_id18(id15) == id18
    assert v.to_id18(id18) == id18
    assert v.is_id(id15)
    assert v.is_id(id18)


@pytest.mark.parametrize("lost", ["0014h00002lbr7qqav", "0014H00002LBR7QQAV"])
def test_an_18_character_id_that_lost_its_case_gets_it_back(lost: str) -> None:
    """An id passed through a case-insensitive system is restored from its suffix."""
    assert v.to_id18(lost) == "0014H00002LbR7QQAV"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "0014H00002LbR7",  # 14
        "0014H00002LbR7QQ",  # 16
        "0014H00002LbR7Q-AV",  # not alphanumeric
        "0014H00002LbR7QZZZ",  # suffix disagrees with a mixed-case id
        "0014h00002lbr7q999",  # 9 is not in the suffix alphabet
        "0014h00002lbr7qzzz",  # marks a digit as upper-case
    ],
)
def test_malformed_ids_are_refused(bad: str) -> None:
    """Wrong length, wrong characters and impossible suffixes are not ids."""
    assert not v.is_id(bad)
    with pytest.raises(ValueError, match=r"Salesforce id|suffix"):
        v.to_id18(bad)


@given(st.text(alphabet=ALNUM, min_size=15, max_size=15))
def test_every_15_character_id_round_trips_case_insensitively(id15: str) -> None:
    """Property: the 18-character form keeps the id and survives lower-casing."""
    id18 = v.to_id18(id15)
    assert id18[:15] == id15
    assert v.to_id18(id18.lower()) == id18
    assert v.to_id18(id18.upper()) == id18


def test_key_prefix_names_the_object() -> None:
    """The first three characters say the object: 001 is an Account."""
    assert v.key_prefix("0014H00002LbR7QQAV") == "001"
    assert v.KEY_PREFIXES["Opportunity"] == "006"
    assert v.KEY_PREFIXES["OpportunityLineItem"] == "00k"


@pytest.mark.parametrize(
    ("origin", "expected"),
    [
        (
            "com/salesforce/api/rest/60.0;client=q2c-broker",
            v.ChangeOrigin(api="rest", version="60.0", client="q2c-broker"),
        ),
        (
            "com/salesforce/api/soap/58.0;client=SfdcInternalAPI/",
            v.ChangeOrigin(api="soap", version="58.0", client="SfdcInternalAPI/"),
        ),
        (
            "com/salesforce/api/rest/60.0",
            v.ChangeOrigin(api="rest", version="60.0", client=None),
        ),
        ("", v.ChangeOrigin()),
    ],
)
def test_change_origin_yields_the_api_and_client(
    origin: str, expected: v.ChangeOrigin
) -> None:
    """``client=`` is what echo suppression compares; UI changes have no origin."""
    assert v.parse_change_origin(origin) == expected


def cometd(header: dict[str, object], replay_id: int = 42, **fields: object) -> bytes:
    return msgspec.json.encode(
        {
            "data": {
                "schema": "abc",
                "payload": {"ChangeEventHeader": header, **fields},
                "event": {"replayId": replay_id},
            },
            "channel": "/data/ChangeEvents",
        }
    )


HEADER: dict[str, object] = {
    "entityName": "Account",
    "recordIds": ["0014H00002LbR7QQAV"],
    "changeType": "UPDATE",
    "changeOrigin": "",
    "transactionKey": "0001-tk",
    "sequenceNumber": 3,
    "commitTimestamp": 1696444513000,
    "commitNumber": 1,
    "commitUser": "00558000000yFyDAAU",
    "changedFields": ["Name", "LastModifiedDate"],
    "diffFields": [],
    "nulledFields": [],
}


def test_a_cometd_message_decodes_into_a_change_event() -> None:
    """Header, replay id, channel and schema are read; fields stay raw until asked."""
    (event,) = v.decode_cometd(cometd(HEADER, Name="Acme", Unknown=1))
    assert event.replay_id == 42
    assert event.channel == "/data/ChangeEvents"
    assert event.schema_id == "abc"
    assert event.header.change_type is v.ChangeType.UPDATE
    assert event.header.sequence_number == 3
    assert event.header.committed_at == datetime(2023, 10, 4, 18, 35, 13, tzinfo=UTC)
    assert event.record(v.Account).Name == "Acme"


def test_an_array_of_cometd_messages_decodes_in_order() -> None:
    """The replay endpoint answers an array; order is commit order."""
    body = b"[" + cometd(HEADER, 1) + b"," + cometd(HEADER, 5) + b"]"
    assert [e.replay_id for e in v.decode_cometd(body)] == [1, 5]


@pytest.mark.parametrize(
    "kind", ["GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW"]
)
def test_gap_and_overflow_change_types_are_gaps(kind: str) -> None:
    """Gap kinds decode, and say that they carry no field values."""
    (event,) = v.decode_cometd(cometd({**HEADER, "changeType": kind}))
    assert event.header.change_type.is_gap
    assert not v.ChangeType.UPDATE.is_gap


def test_an_unknown_change_type_is_refused() -> None:
    """A change type Salesforce does not define is not silently accepted."""
    with pytest.raises(msgspec.ValidationError, match="changeType"):
        v.decode_cometd(cometd({**HEADER, "changeType": "MERGE"}))


def test_bitmap_encoded_field_lists_are_recognised_and_kept() -> None:
    """Pub/Sub sends ``0x…`` bitmaps; they stay strings and are flagged."""
    header = {**HEADER, "changedFields": ["0x400000", "4-0x01"]}
    (event,) = v.decode_cometd(cometd(header))
    assert event.header.changed_fields == ("0x400000", "4-0x01")
    assert v.is_bitmap_encoded(event.header.changed_fields)
    assert not v.is_bitmap_encoded(("Name", "BillingAddress.City"))


def test_dates_come_as_iso_text_or_epoch_numbers() -> None:
    """REST and CometD send ISO text; Pub/Sub sends epoch ms and epoch days."""
    assert v.as_datetime(1696444513000) == datetime(2023, 10, 4, 18, 35, 13, tzinfo=UTC)
    iso = msgspec.json.decode(b'"2024-01-15T10:30:00.000+0000"', type=v.SfDateTime)
    assert v.as_datetime(iso) == datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert v.as_date(19723) == date(2024, 1, 1)
    assert v.as_date(date(2024, 3, 31)) == date(2024, 3, 31)
    assert v.format_datetime(datetime(2024, 1, 15, 10, 30, 0, 123456, tzinfo=UTC)) == (
        "2024-01-15T10:30:00.123+0000"
    )


@pytest.mark.parametrize(
    "stamp", [253402300800000, 10**20, -62135596800001], ids=["y10000", "huge", "y0"]
)
def test_a_commit_timestamp_no_datetime_holds_is_refused_by_name(stamp: int) -> None:
    """Outside years 1 to 9999 the header does not decode (no OverflowError later)."""
    with pytest.raises(msgspec.ValidationError, match="commitTimestamp"):
        v.decode_cometd(cometd({**HEADER, "commitTimestamp": stamp}))
    (edge,) = v.decode_cometd(cometd({**HEADER, "commitTimestamp": 253402300799999}))
    assert edge.header.committed_at.year == 9999


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("LastModifiedDate", 253402300800000),
        ("LastModifiedDate", -(10**20)),
        ("CloseDate", 2932897),
        ("CloseDate", -(10**12)),
    ],
)
def test_epoch_numbers_no_date_holds_are_refused_by_name(
    field: str, value: int
) -> None:
    """Pub/Sub epoch ms or days past year 9999: a ValidationError naming the field."""
    body = msgspec.json.encode({"Name": "Deal", field: value})
    with pytest.raises(msgspec.ValidationError, match=field):
        msgspec.json.decode(body, type=v.Opportunity)


def test_a_rest_record_decodes_with_its_attributes() -> None:
    """The ``attributes`` block, ``+0000`` times, Decimals and compound addresses."""
    body = b"""{
        "attributes": {"type": "Opportunity",
                       "url": "/services/data/v60.0/sobjects/Opportunity/006x"},
        "Id": "006x", "Name": "Deal", "StageName": "Prospecting",
        "CloseDate": "2026-06-30", "Amount": 5300.10, "IsWon": false,
        "LastModifiedDate": "2024-01-15T10:30:00.000+0000", "Custom__c": "ignored"
    }"""
    opp = msgspec.json.decode(body, type=v.Opportunity)
    assert opp.attributes == v.Attributes(
        type="Opportunity", url="/services/data/v60.0/sobjects/Opportunity/006x"
    )
    assert opp.Amount == Decimal("5300.10")
    assert opp.CloseDate == date(2026, 6, 30)
    assert opp.IsWon is False
    assert v.as_datetime(opp.LastModifiedDate) == datetime(
        2024, 1, 15, 10, 30, tzinfo=UTC
    )


def test_a_write_body_carries_only_the_fields_set() -> None:
    """None fields are omitted, so a PATCH leaves everything else alone."""
    body = msgspec.json.encode(
        v.Opportunity(StageName="Closed Won", Amount=Decimal("1.50"))
    )
    assert msgspec.json.decode(body) == {"StageName": "Closed Won", "Amount": "1.50"}


def test_query_results_and_error_arrays_decode() -> None:
    """``{totalSize, done, nextRecordsUrl, records}`` and ``[{message, errorCode}]``."""
    page = msgspec.json.decode(
        b'{"totalSize": 3, "done": false, "nextRecordsUrl": "/q/01g-2",'
        b' "records": [{"attributes": {"type": "Account"}, "Id": "001x"}]}',
        type=v.QueryResult[v.Account],
    )
    assert page.total_size == 3
    assert not page.done
    assert page.next_records_url == "/q/01g-2"
    assert page.records[0].Id == "001x"
    errors = msgspec.json.decode(
        b'[{"message": "Required fields are missing: [Name]",'
        b' "errorCode": "REQUIRED_FIELD_MISSING", "fields": ["Name"]}]',
        type=v.ApiErrors,
    )
    assert errors == (
        v.ApiError(
            message="Required fields are missing: [Name]",
            error_code="REQUIRED_FIELD_MISSING",
            fields=("Name",),
        ),
    )
    saved = msgspec.json.decode(
        b'{"id": "001x", "success": true, "errors": []}', type=v.SaveResult
    )
    assert saved == v.SaveResult(id="001x", success=True)
