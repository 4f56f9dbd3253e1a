"""Conformance: the published Salesforce change event parses with the CRM adapter.

Reads ``salesforce_cdc_account_update_pubsub.json`` (an AccountChangeEvent
UPDATE captured through the Pub/Sub API, decoded) from the shared payload
corpus, as it is. Skipped when the corpus is not next to the repository.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from adapters.crm import views as v
from adapters.crm.ingress import SalesforceWebhook, inbound_from_change
from canonical.q2c import RecordReadRequired

PAYLOADS = Path(__file__).resolve().parents[2] / ".." / "shared" / "payloads"
SAMPLE = PAYLOADS / "salesforce_cdc_account_update_pubsub.json"


@pytest.fixture(scope="module")
def body() -> bytes:
    if not SAMPLE.is_file():
        pytest.skip(f"shared payload corpus not found at {PAYLOADS}")
    return SAMPLE.read_bytes()


def test_the_pubsub_sample_parses_with_every_header_field(body: bytes) -> None:
    """Every ChangeEventHeader field of the table, with its documented type."""
    event = v.decode_pubsub(body)
    assert (event.event_id, event.schema_id, event.replay_id) == (
        "9b77cea1-a923-4766-ad50-a1797d9b39fd",
        "a01VpgrsZNJdn-7KStJcxQ",
        18098167,
    )
    h = event.header
    assert h.entity_name == "Account"
    assert h.record_ids == ("0014H00002LbR7QQAV",)
    assert h.change_type is v.ChangeType.UPDATE
    assert h.change_origin == "com/salesforce/api/soap/58.0;client=SfdcInternalAPI/"
    assert h.transaction_key == "000046c7-a642-11e2-c29b-229c6786473e"
    assert h.sequence_number == 1
    assert h.commit_timestamp == 1696444513000
    assert h.committed_at == datetime(2023, 10, 4, 18, 35, 13, tzinfo=UTC)
    assert h.commit_number == 11657372702432
    assert h.commit_user == "00558000000yFyDAAU"
    assert (h.nulled_fields, h.diff_fields) == ((), ())
    assert h.changed_fields == (
        "LastModifiedDate",
        "BillingAddress.City",
        "BillingAddress.State",
    )
    assert all(isinstance(f, str) for f in h.changed_fields)
    assert not v.is_bitmap_encoded(h.changed_fields)


def test_the_sample_ids_are_valid_18_character_ids(body: bytes) -> None:
    """Record and user ids carry a correct checksum suffix and their key prefixes."""
    h = v.decode_pubsub(body).header
    for record_id in (*h.record_ids, h.commit_user or ""):
        assert v.to_id18(record_id) == record_id
    assert v.key_prefix(h.record_ids[0]) == v.KEY_PREFIXES["Account"]
    assert v.key_prefix(h.commit_user or "") == v.KEY_PREFIXES["User"]


def test_the_sample_payload_reads_as_an_account_change(body: bytes) -> None:
    """Changed compound parts have values, the rest are null; epoch-ms dates."""
    event = v.decode_pubsub(body)
    account = event.record(v.Account)
    assert account.BillingAddress == v.Address(city="San Francisco", state="CA")
    assert account.Name is None
    assert v.as_datetime(account.LastModifiedDate) == event.header.committed_at
    assert v.parse_change_origin(event.header.change_origin) == v.ChangeOrigin(
        api="soap", version="58.0", client="SfdcInternalAPI/"
    )


def test_the_sample_is_a_read_back_unless_it_is_our_own_echo(body: bytes) -> None:
    """An account UPDATE is re-read; with our client id it is an echo: nothing."""
    hook = SalesforceWebhook(secrets=["s"], client_id="q2c-broker")
    (inbound,) = hook.parse({}, body)
    assert inbound.event == RecordReadRequired(
        entity="Account", native_ids=("0014H00002LbR7QQAV",), change_type="UPDATE"
    )
    assert inbound.id == "000046c7-a642-11e2-c29b-229c6786473e/1/0014H00002LbR7QQAV"
    echo = SalesforceWebhook(secrets=["s"], client_id="SfdcInternalAPI/")
    assert echo.parse({}, body) == []


def test_the_same_payload_in_cometd_form_reads_the_same(body: bytes) -> None:
    """Wrapped as the Streaming API wraps it, the event is the same event."""
    raw = msgspec.json.decode(body)
    cometd = msgspec.json.encode(
        {
            "data": {
                "schema": raw["schemaId"],
                "payload": raw["payload"],
                "event": {"replayId": raw["replayId"]},
            },
            "channel": "/data/AccountChangeEvent",
        }
    )
    (wrapped,) = v.decode_cometd(cometd)
    original = v.decode_pubsub(body)
    assert wrapped.header == original.header
    assert wrapped.replay_id == original.replay_id
    assert wrapped.record(v.Account) == original.record(v.Account)
    assert inbound_from_change(
        wrapped, client_id="q2c-broker", default_currency="USD"
    ) == inbound_from_change(original, client_id="q2c-broker", default_currency="USD")
