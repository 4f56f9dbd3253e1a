"""The Salesforce webhook and change-feed poller: signatures, echoes, gaps, mapping."""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from aiohttp import web

from adapters import signing as signature
from adapters.crm import views as v
from adapters.crm.ingress import SalesforceWebhook, inbound_from_change, poll_changes
from adapters.crm.views import ChangeType, decode_cometd, decode_pubsub
from broker.connector import Inbound
from broker.errors import SchemaInvalid, SignatureInvalid, UpstreamRejected
from canonical.commerce import Account, Address
from canonical.q2c import AccountChanged, RecordReadRequired
from tests.adapters.crm.harness import CLIENT_ID, Org, settings

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "crm"
NOW = 1_767_225_600.0
SECRET = "whsec-current"


def webhook(*secrets: str) -> SalesforceWebhook:
    return SalesforceWebhook(
        secrets=secrets or (SECRET,), client_id=CLIENT_ID, default_currency="EUR"
    )


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def message(header: dict[str, Any], **fields: Any) -> bytes:
    base: dict[str, Any] = {
        "entityName": "Account",
        "recordIds": ["0014H00002LbR7QQAV"],
        "changeType": "UPDATE",
        "changeOrigin": "",
        "transactionKey": "tk-1",
        "sequenceNumber": 1,
        "commitTimestamp": 1767225600000,
        "changedFields": [],
    }
    return msgspec.json.encode(
        {
            "data": {
                "schema": "s",
                "payload": {"ChangeEventHeader": {**base, **header}, **fields},
                "event": {"replayId": 7},
            },
            "channel": "/data/ChangeEvents",
        }
    )


BODY = fixture("cometd_account_create.json")


def signed(body: bytes, *secrets: str, at: float = NOW) -> dict[str, str]:
    return {
        signature.HEADER: signature.sign(secrets or (SECRET,), body, timestamp=int(at))
    }


# --- signatures ------------------------------------------------------------------


def test_a_valid_signature_is_accepted_whatever_the_header_case() -> None:
    """The relay's signature over the raw body verifies; header names ignore case."""
    header = signed(BODY)[signature.HEADER]
    webhook().verify({"x-q2c-signature": header}, BODY, now=NOW)


@pytest.mark.parametrize(
    ("headers", "body", "now", "reason"),
    [
        (signed(BODY), BODY + b" ", NOW, "does not match"),
        (signed(BODY, "another-secret"), BODY, NOW, "does not match"),
        (signed(BODY), BODY, NOW + 301, "301 s old"),
        (signed(BODY), BODY, NOW - 301, "301 s in the future"),
        ({}, BODY, NOW, "missing"),
        ({signature.HEADER: "v1=abc"}, BODY, NOW, "lacks"),
        ({signature.HEADER: "t=soon,v1=abc"}, BODY, NOW, "malformed"),
        ({signature.HEADER: "garbage"}, BODY, NOW, "malformed"),
    ],
    ids=[
        "tampered",
        "wrong-secret",
        "stale",
        "future",
        "missing",
        "no-t",
        "bad-t",
        "junk",
    ],
)
def test_bad_signatures_are_refused(
    headers: dict[str, str], body: bytes, now: float, reason: str
) -> None:
    """Tampered, wrong secret, 301 s either side, missing or malformed: refused."""
    with pytest.raises(SignatureInvalid, match=reason) as caught:
        webhook().verify(headers, body, now=now)
    assert SECRET not in str(caught.value)
    for value in headers.values():
        assert value not in str(caught.value)


def test_a_signature_exactly_at_the_tolerance_is_accepted() -> None:
    """300 s is inside the window; the bound is inclusive."""
    webhook().verify(signed(BODY), BODY, now=NOW + 300)


def test_the_webhook_is_built_from_the_org_settings() -> None:
    """Secrets, client id, currency and tolerance come from [systems.crm]."""
    hook = SalesforceWebhook.from_settings(
        settings("http://org", webhook_secrets=(SECRET,), webhook_tolerance_s=10)
    )
    hook.verify(signed(BODY), BODY, now=NOW + 10)
    with pytest.raises(SignatureInvalid, match="tolerance 10"):
        hook.verify(signed(BODY), BODY, now=NOW + 11)
    with pytest.raises(ValueError, match="secret"):
        SalesforceWebhook.from_settings(settings("http://org"))
    with pytest.raises(ValueError, match="none empty"):
        SalesforceWebhook(secrets=["new", ""], client_id="relay")


def test_during_rotation_either_secret_verifies() -> None:
    """Two v1 values (old and new secret) or two active secrets: both accepted."""
    both = signed(BODY, "whsec-old", SECRET)
    webhook(SECRET).verify(both, BODY, now=NOW)
    webhook("whsec-old").verify(both, BODY, now=NOW)
    webhook("whsec-old", SECRET).verify(signed(BODY, SECRET), BODY, now=NOW)
    with pytest.raises(SignatureInvalid):
        webhook("whsec-retired").verify(both, BODY, now=NOW)


# --- parsing ---------------------------------------------------------------------


def test_an_account_create_becomes_an_account_change_at_once() -> None:
    """CREATE carries every field: crm.account.changed, no read-back needed."""
    (inbound,) = webhook().parse({}, BODY)
    assert inbound.event == AccountChanged(
        account=Account(
            id="acct-0014H00002LbR7QQAV",
            name="Nordwind Logistik GmbH",
            country="DE",
            currency="EUR",
            billing_address=Address(
                street="Hafenstraße 12",
                city="Hamburg",
                postal_code="20457",
                country="DE",
            ),
            tax_id="DE123456789",
        ),
        change="created",
        native_id="0014H00002LbR7QQAV",
    )
    assert inbound.correlation_id == inbound.subject == "acct-0014H00002LbR7QQAV"
    assert inbound.source == "/crm/salesforce"
    assert inbound.id == "0002343d-9d90-e395-ed20-cf416ba652ad/1/0014H00002LbR7QQAV"
    assert inbound.time == datetime(2026, 1, 1, tzinfo=UTC)  # commitTimestamp


def test_the_same_change_delivered_twice_has_the_same_ids() -> None:
    """Dedupe id and idempotency key come from transactionKey and sequenceNumber."""
    first, second = webhook().parse({}, BODY), webhook().parse({}, BODY)
    assert [(i.id, i.idempotency_key) for i in first] == [
        (i.id, i.idempotency_key) for i in second
    ]


def test_echoes_of_our_own_writes_parse_to_nothing() -> None:
    """Our client id in changeOrigin → []; another client is not an echo."""
    ours = message({"changeOrigin": f"com/salesforce/api/rest/60.0;client={CLIENT_ID}"})
    theirs = message({"changeOrigin": "com/salesforce/api/rest/60.0;client=other"})
    assert webhook().parse({}, ours) == []
    assert len(webhook().parse({}, theirs)) == 1


def test_an_account_update_asks_for_a_read_back() -> None:
    """UPDATE carries only what changed: crm.record.read_required per record."""
    body = message(
        {"recordIds": ["0014H00002LbR7QQAV", "001000000000000"]}, Name="New name"
    )
    reads = webhook().parse({}, body)
    assert [i.event for i in reads] == [
        RecordReadRequired(entity="Account", native_ids=(rid,), change_type="UPDATE")
        for rid in ("0014H00002LbR7QQAV", "001000000000000AAA")
    ]
    assert [i.subject for i in reads] == [
        "acct-0014H00002LbR7QQAV",
        "acct-001000000000000AAA",
    ]
    assert len({i.id for i in reads}) == 2


def test_an_account_create_that_does_not_map_is_read_back() -> None:
    """No country code in the event: the connector reads it and decides."""
    body = message({"changeType": "CREATE"}, Name="No country")
    (inbound,) = webhook().parse({}, body)
    assert isinstance(inbound.event, RecordReadRequired)
    assert inbound.event.change_type == "CREATE"


@pytest.mark.parametrize(
    "kind", ["GAP_CREATE", "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW"]
)
def test_gaps_become_read_backs(kind: str) -> None:
    """A gap says only which records changed: re-read them."""
    (inbound,) = webhook().parse({}, message({"changeType": kind}))
    assert inbound.event == RecordReadRequired(
        entity="Account", native_ids=("0014H00002LbR7QQAV",), change_type=kind
    )


def test_an_overflow_without_record_ids_asks_for_the_whole_object() -> None:
    """No ids (or a wildcard): one read-back naming no record."""
    for ids in ([], ["001*"]):
        (inbound,) = webhook().parse(
            {}, message({"changeType": "GAP_OVERFLOW", "recordIds": ids})
        )
        assert inbound.event == RecordReadRequired(
            entity="Account", native_ids=(), change_type="GAP_OVERFLOW"
        )
        assert inbound.correlation_id == "crm.Account"
        assert inbound.subject is None


def test_a_gap_with_a_wildcard_beside_real_ids_reads_those_and_the_object() -> None:
    """Real ids keep their read-backs; the wildcard adds one naming no record."""
    ids = ["0014H00002LbR7QQAV", "001000000000000", "001*"]
    reads = webhook().parse({}, message({"changeType": "GAP_UPDATE", "recordIds": ids}))
    assert [i.event for i in reads] == [
        RecordReadRequired(entity="Account", native_ids=(), change_type="GAP_UPDATE"),
        RecordReadRequired(
            entity="Account",
            native_ids=("0014H00002LbR7QQAV",),
            change_type="GAP_UPDATE",
        ),
        RecordReadRequired(
            entity="Account",
            native_ids=("001000000000000AAA",),
            change_type="GAP_UPDATE",
        ),
    ]
    assert [i.subject for i in reads] == [
        None,
        "acct-0014H00002LbR7QQAV",
        "acct-001000000000000AAA",
    ]
    assert len({i.id for i in reads}) == len({i.idempotency_key for i in reads}) == 3


def test_a_new_opportunity_is_read_back_for_its_account() -> None:
    """Opportunity CREATE → read-back under the deal's correlation id; UPDATE → []."""
    create = message(
        {
            "entityName": "Opportunity",
            "recordIds": ["006000000000001AAA"],
            "changeType": "CREATE",
        },
        Name="Deal",
    )
    (inbound,) = webhook().parse({}, create)
    assert inbound.correlation_id == "deal-006000000000001AAA"
    assert inbound.subject == "opp-006000000000001AAA"
    update = message({"entityName": "Opportunity", "recordIds": ["006000000000001AAA"]})
    assert webhook().parse({}, update) == []


def test_a_quote_approval_is_read_back_and_other_quote_changes_are_not() -> None:
    """Status → Approved or Denied is a read-back; anything else is no fact."""
    (inbound,) = webhook().parse({}, fixture("cometd_quote_approved.json"))
    assert inbound.event == RecordReadRequired(
        entity="SBQQ__Quote__c",
        native_ids=("a0Q8c000009lLs1EAE",),
        change_type="UPDATE",
    )
    assert inbound.subject == "quote-a0Q8c000009lLs1EAE"
    header = {"entityName": "SBQQ__Quote__c", "recordIds": ["a0Q8c000009lLs1EAE"]}
    assert webhook().parse({}, message(header, SBQQ__Status__c="In Review")) == []
    denied = webhook().parse(
        {},
        message(
            header, SBQQ__Status__c="Denied", SBQQ__Opportunity2__c="006000000000001"
        ),
    )
    assert denied[0].correlation_id == "deal-006000000000001AAA"


def test_objects_no_canonical_event_speaks_of_parse_to_nothing() -> None:
    """Contacts and line items change without a canonical fact."""
    for entity in ("Contact", "OpportunityLineItem", "SBQQ__QuoteLine__c"):
        assert webhook().parse({}, message({"entityName": entity})) == []


def test_the_pubsub_form_is_accepted_too() -> None:
    """A decoded Pub/Sub event parses; bitmap field lists do not get in the way."""
    body = fixture("pubsub_quote_update_bitmap.json")
    assert webhook().parse({}, body) == []  # our own write: an echo
    other = SalesforceWebhook(secrets=[SECRET], client_id="someone-else")
    assert other.parse({}, body) == []  # status unchanged (null): no fact
    event = decode_pubsub(body)
    assert event.header.changed_fields == ("0x400000", "4-0x01")


@pytest.mark.parametrize(
    "body", [b"not json", b"{}", b'{"data": {"payload": {}}}', b"[1, 2]"]
)
def test_a_body_that_is_not_a_change_event_is_schema_invalid(body: bytes) -> None:
    """Garbage is refused as SchemaInvalid, not silently ignored."""
    with pytest.raises(SchemaInvalid):
        webhook().parse({}, body)


@pytest.mark.parametrize("stamp", [253402300800000, 10**20])
def test_a_commit_timestamp_past_year_9999_is_schema_invalid(stamp: int) -> None:
    """No datetime holds it: refused by name (a 400 and a dead letter), not a 500."""
    with pytest.raises(SchemaInvalid, match="commitTimestamp"):
        webhook().parse({}, message({"commitTimestamp": stamp}))


def test_json_nested_too_deep_is_schema_invalid() -> None:
    """~2 KB nested 1,000 deep makes msgspec recurse out: refused, not a 500."""
    deep = b"[" * 1000 + b"]" * 1000
    body = b'{"channel": "/data/ChangeEvents", "data": {"payload": ' + deep + b"}}"
    with pytest.raises(SchemaInvalid, match="not a change event: maximum recursion"):
        webhook().parse({}, body)


def test_inbound_from_change_applies_the_same_rules_to_one_event() -> None:
    """The shared rule set, called directly on a decoded event."""
    (event,) = decode_cometd(message({"changeType": "DELETE"}))
    assert event.header.change_type is ChangeType.DELETE
    (inbound,) = inbound_from_change(event, client_id=CLIENT_ID, default_currency="EUR")
    assert inbound.event == RecordReadRequired(
        entity="Account", native_ids=("0014H00002LbR7QQAV",), change_type="DELETE"
    )


# --- the change-feed poller and the push, against the sandbox ------------------


@pytest.mark.anyio
async def test_the_poller_reads_on_from_its_replay_id_and_drops_echoes(
    org: Org,
) -> None:
    """Events after the stored id, minus our own writes; nothing new keeps the id."""
    account = org.sandbox.seed_account("Acme", country_code="DE", currency="EUR")
    await org.client.update(account, v.Account(Name="Acme (echo)"))
    events, last, unreadable = await poll_changes(
        org.client, "/data/ChangeEvents", -2, 100
    )
    assert [type(i.event) for i in events] == [AccountChanged]
    assert last == org.sandbox.org.last_replay_id
    assert unreadable == []
    again = await poll_changes(org.client, "/data/ChangeEvents", last, 100)
    assert (again.inbound, again.resume_at) == ([], last)


@pytest.mark.anyio
async def test_the_poller_hands_back_an_event_with_an_impossible_timestamp(
    org: Org,
) -> None:
    """An event past year 9999 is one we cannot read: handed back, and passed.

    The feed follower keeps it as a dead letter and moves its cursor past
    it, instead of reading the same batch again forever (or crashing on an
    OverflowError at every restart); the other events are read as usual.
    """
    org.sandbox.seed_account("Acme", country_code="DE", currency="EUR")
    org.sandbox.seed_account("Initech", country_code="DE", currency="EUR")
    log = org.sandbox.org.log
    log[0] = dataclasses.replace(
        log[0],
        header=msgspec.structs.replace(log[0].header, commit_timestamp=10**20),
    )
    polled = await poll_changes(org.client, "/data/ChangeEvents", -2, 100)
    assert [i.event.account.name for i in polled.inbound] == ["Initech"]
    (bad,) = polled.undecodable
    assert "commitTimestamp" in bad.error
    assert bad.replay_id == log[0].replay_id
    assert msgspec.json.decode(bad.body) == msgspec.json.decode(
        msgspec.json.encode(log[0].cometd("/data/ChangeEvents"))
    )
    assert polled.resume_at == log[-1].replay_id
    with pytest.raises(UpstreamRejected, match="commitTimestamp") as caught:
        await org.client.replay("/data/ChangeEvents", -2)
    assert caught.value.code == "MALFORMED_RESPONSE"


@pytest.mark.anyio
async def test_the_sandbox_push_verifies_and_parses_at_the_webhook(org: Org) -> None:
    """Relay → webhook end to end: an approval arrives signed, as a quote read-back."""
    hook = SalesforceWebhook(secrets=["sandbox-push-secret"], client_id=CLIENT_ID)
    send, receive = anyio.create_memory_object_stream[Inbound](100)

    async def endpoint(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            hook.verify(request.headers, body, now=time.time())
        except SignatureInvalid:
            return web.Response(status=401)
        for inbound in hook.parse(request.headers, body):
            await send.send(inbound)
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/webhooks/crm", endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        org.sandbox.knobs.push_url = f"http://127.0.0.1:{port}/webhooks/crm"
        sb = org.sandbox
        quote = sb.create_quote(sb.create_opportunity(sb.seed_account("Acme"), "Deal"))
        sb.approve_quote(quote)
        with anyio.fail_after(10):
            created = await receive.receive()  # the account, created
            opened = await receive.receive()  # the opportunity, to be read back
            approval = await receive.receive()  # then the quote's approval
    finally:
        await runner.cleanup()
        send.close()
        receive.close()
    assert isinstance(created.event, AccountChanged)
    assert isinstance(opened.event, RecordReadRequired)
    assert opened.correlation_id.startswith("deal-")
    assert approval.event == RecordReadRequired(
        entity="SBQQ__Quote__c", native_ids=(quote,), change_type="UPDATE"
    )
    assert org.sandbox.state()["push_sent"] == 5


def test_a_batch_with_an_unreadable_event_takes_the_others_and_hands_it_back() -> None:
    """Part by part: the unknown changeType is refused alone, with its bytes."""
    first = message({"recordIds": ["0014H00002LbR7QQAV"]})
    bad = message({"changeType": "TELEPORT"})
    second = message({"recordIds": ["0014H00002LbR8QQAV"], "transactionKey": "tk-2"})
    body = b"[" + b",".join((first, bad, second)) + b"]"
    events, refused = webhook().parse_parts({}, body)
    assert len(events) == 2
    assert {e.subject for e in events} == {
        "acct-0014H00002LbR7QQAV",
        "acct-0014H00002LbR8QQAV",
    }
    (part,) = refused
    assert part.body == bad
    assert isinstance(part.error, SchemaInvalid)
    assert "TELEPORT" in str(part.error)
    with pytest.raises(SchemaInvalid):  # none readable: judged whole, as parse does
        webhook().parse_parts({}, b"[" + bad + b"]")
    events, refused = webhook().parse_parts({}, first)  # one message, not a list
    assert (events, list(refused)) == (webhook().parse({}, first), [])
