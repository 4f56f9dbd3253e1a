"""The sandbox org on the wire: ids, change log, replay, long-poll, signed push."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal

import anyio
import msgspec
import pytest
from aiohttp import web

from adapters import signing as signature
from adapters.cpq import views as cpq
from adapters.crm import soql
from adapters.crm import views as v
from adapters.crm.sandbox import call_options_client
from adapters.serving import serve
from broker.errors import UpstreamRejected
from tests.adapters.crm.harness import Org, running_org
from tests.polling import eventually

pytestmark = pytest.mark.anyio


async def test_records_get_18_character_ids_with_their_key_prefixes(org: Org) -> None:
    """001 Account, 003 Contact, 006 Opportunity, 00k line, a0Q/a0R for CPQ."""
    sb = org.sandbox
    account = sb.seed_account("Acme")
    opp = sb.create_opportunity(account, "Deal")
    quote = sb.create_quote(opp)
    line = sb.add_quote_line(
        quote, product_code="GW-1", quantity=Decimal(1), list_price=Decimal(10)
    )
    contact = await org.client.create(v.Contact(AccountId=account, LastName="Doe"))
    oli = await org.client.create(
        v.OpportunityLineItem(OpportunityId=opp, Quantity=Decimal(2))
    )
    ids = {
        "001": account,
        "003": contact,
        "006": opp,
        "00k": oli,
        "a0Q": quote,
        "a0R": line,
    }
    for prefix, record_id in ids.items():
        assert len(record_id) == 18
        assert v.to_id18(record_id) == record_id
        assert v.key_prefix(record_id) == prefix
    record = await org.client.get(v.Account, account)
    assert isinstance(record.LastModifiedDate, datetime)
    raw = sb.org.get("Account", account)
    assert raw["LastModifiedDate"].endswith("+0000")


async def test_every_write_appends_change_events_in_replay_order(org: Org) -> None:
    """CREATE with all fields, UPDATE with changed fields only, DELETE with none."""
    account_id = await org.client.create(
        v.Account(Name="Acme", BillingCity="Paris", BillingCountryCode="FR")
    )
    await org.client.update(account_id, v.Account(BillingCity="Lyon"))
    await org.client.delete(v.Account, account_id)
    created, updated, deleted = await org.client.replay("/data/ChangeEvents", -2)
    assert created.replay_id < updated.replay_id < deleted.replay_id
    assert [e.header.change_type for e in (created, updated, deleted)] == [
        v.ChangeType.CREATE,
        v.ChangeType.UPDATE,
        v.ChangeType.DELETE,
    ]
    body = created.record(v.Account)
    assert body.Name == "Acme"
    assert body.BillingAddress == v.Address(city="Paris", country_code="FR")
    assert body.BillingCity is None  # change events carry the compound field
    assert updated.header.changed_fields == ("LastModifiedDate", "BillingAddress.City")
    assert updated.record(v.Account).Name is None
    assert updated.header.commit_timestamp >= created.header.commit_timestamp
    assert deleted.header.changed_fields == ()


async def test_replay_after_an_id_returns_only_later_events_of_the_channel(
    org: Org,
) -> None:
    """Replay id n → events after n; an object channel filters; -1 → only new."""
    first = org.sandbox.seed_account("A")
    org.sandbox.create_opportunity(first, "Deal")
    org.sandbox.seed_account("B")
    everything = await org.client.replay("/data/ChangeEvents", -2)
    assert len(everything) == 3
    later = await org.client.replay("/data/ChangeEvents", everything[0].replay_id)
    assert later == everything[1:]
    accounts = await org.client.replay("/data/AccountChangeEvent", -2)
    assert [e.header.entity_name for e in accounts] == ["Account", "Account"]
    assert all(e.channel == "/data/AccountChangeEvent" for e in accounts)
    assert await org.client.replay("/data/ChangeEvents", -1) == ()
    limited = await org.client.replay("/data/ChangeEvents", -2, limit=2)
    assert limited == everything[:2]


async def test_a_waiting_replay_returns_when_a_change_commits(org: Org) -> None:
    """The long-poll stand-in answers as soon as an event arrives."""
    got: list[tuple[v.ChangeEvent, ...]] = []

    async def wait() -> None:
        got.append(await org.client.replay("/data/ChangeEvents", -1, wait_s=30))

    async def waiting() -> bool:
        return org.sandbox.counts["replay_waits"] == 1

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            await eventually(waiting)
            org.sandbox.seed_account("Late")
    assert [e.header.entity_name for e in got[0]] == ["Account"]


async def test_a_replay_id_older_than_the_log_is_refused() -> None:
    """A bounded log: asking from before its start is INVALID_REPLAY_ID."""
    async with running_org(retain_events=2) as org:
        first = org.sandbox.seed_account("A")
        oldest = (await org.client.replay("/data/ChangeEvents", -2))[0].replay_id
        org.sandbox.seed_account("B")
        org.sandbox.create_opportunity(first, "Deal")
        retained = await org.client.replay("/data/ChangeEvents", -2)
        assert len(retained) == 2
        with pytest.raises(UpstreamRejected) as caught:
            await org.client.replay("/data/ChangeEvents", oldest - 1)
        assert caught.value.code == "INVALID_REPLAY_ID"


async def test_making_a_quote_primary_demotes_the_other_in_one_transaction(
    org: Org,
) -> None:
    """One primary quote per opportunity; the opportunity points at it."""
    sb = org.sandbox
    opp = sb.create_opportunity(sb.seed_account("Acme"), "Deal")
    old = sb.create_quote(opp)
    before = sb.org.last_replay_id
    new = await org.client.create(
        cpq.Quote(SBQQ__Opportunity2__c=opp, SBQQ__Primary__c=True)
    )
    assert sb.org.get("SBQQ__Quote__c", old)["SBQQ__Primary__c"] is False
    assert sb.org.get("Opportunity", opp)["SBQQ__PrimaryQuote__c"] == new
    events = await org.client.replay("/data/ChangeEvents", before)
    assert [(e.header.entity_name, e.header.sequence_number) for e in events] == [
        ("SBQQ__Quote__c", 1),
        ("SBQQ__Quote__c", 2),
        ("Opportunity", 3),
    ]
    assert len({e.header.transaction_key for e in events}) == 1


async def test_quote_lines_are_priced_and_totalled_by_the_package(org: Org) -> None:
    """Net price defaults to the list price; the quote sums its lines."""
    sb = org.sandbox
    quote = sb.create_quote(sb.create_opportunity(sb.seed_account("Acme"), "Deal"))
    parent = sb.add_quote_line(
        quote, product_code="GW-1", quantity=Decimal(2), list_price=Decimal("100")
    )
    sb.add_quote_line(
        quote,
        product_code="OPT-1",
        quantity=Decimal(3),
        list_price=Decimal("10"),
        net_price=Decimal("9.50"),
        required_by=parent,
    )
    record = await org.client.get(cpq.Quote, quote)
    assert record.SBQQ__NetAmount__c == Decimal("228.50")
    assert record.SBQQ__LineItemCount__c == 2


@asynccontextmanager
async def receiver(
    statuses: list[int],
) -> AsyncIterator[tuple[str, anyio.abc.ObjectReceiveStream[tuple[str, bytes]]]]:
    """An HTTP endpoint that records pushes; answers *statuses* in turn, then 200."""
    send, receive = anyio.create_memory_object_stream[tuple[str, bytes]](100)

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        await send.send((request.headers.get(signature.HEADER, ""), body))
        return web.Response(status=statuses.pop(0) if statuses else 200)

    app = web.Application()
    app.router.add_post("/webhooks/crm", hook)
    runner, base = await serve(app, "127.0.0.1", 0)
    try:
        yield f"{base}/webhooks/crm", receive
    finally:
        await runner.cleanup()
        send.close()
        receive.close()


async def test_with_push_on_every_change_is_posted_signed_and_in_order(
    org: Org,
) -> None:
    """The relay POSTs CometD messages with X-Q2C-Signature, in commit order."""
    async with receiver([]) as (url, pushed):
        org.sandbox.knobs.push_url = url
        org.sandbox.knobs.push_secrets = ["old-secret", "new-secret"]
        sb = org.sandbox
        quote = sb.create_quote(sb.create_opportunity(sb.seed_account("Acme"), "Deal"))
        sb.approve_quote(quote)
        events: list[v.ChangeEvent] = []
        with anyio.fail_after(10):
            # Changes queued during a delivery travel together, as an array.
            while len(events) < 5:
                header, body = await pushed.receive()
                signature.verify(header, body, ["new-secret"], now=time.time())
                events.extend(v.decode_cometd(body))
    entities = [(e.header.entity_name, e.header.change_type) for e in events]
    assert entities == [
        ("Account", v.ChangeType.CREATE),
        ("Opportunity", v.ChangeType.CREATE),
        ("SBQQ__Quote__c", v.ChangeType.CREATE),
        ("Opportunity", v.ChangeType.UPDATE),  # its primary quote, same transaction
        ("SBQQ__Quote__c", v.ChangeType.UPDATE),
    ]
    approval = events[-1]
    assert approval.record(cpq.Quote).SBQQ__Status__c == "Approved"
    assert "SBQQ__Status__c" in approval.header.changed_fields
    assert approval.channel == "/data/SBQQ__Quote__ChangeEvent"


async def test_a_refused_push_is_retried_then_counted(org: Org) -> None:
    """A 500 from the receiver gets the same body again after a back-off."""
    async with receiver([500]) as (url, pushed):
        org.sandbox.knobs.push_url = url
        org.sandbox.knobs.push_backoff_s = 0.0
        org.sandbox.seed_account("Acme")
        with anyio.fail_after(10):
            (_, first), (_, second) = [await pushed.receive() for _ in range(2)]
    assert first == second
    state = org.sandbox.state()
    assert (state["push_failed_attempts"], state["push_sent"]) == (1, 1)


async def test_the_quote_reader_returns_the_model_as_a_json_string(org: Org) -> None:
    """The Apex REST endpoint double-encodes; bundle links are parentItemKey."""
    sb = org.sandbox
    quote = sb.create_quote(sb.create_opportunity(sb.seed_account("Acme"), "Deal"))
    parent = sb.add_quote_line(
        quote, product_code="GW-1", quantity=Decimal(1), list_price=Decimal(5)
    )
    sb.add_quote_line(
        quote,
        product_code="OPT-1",
        quantity=Decimal(1),
        list_price=Decimal(1),
        required_by=parent,
    )
    body = await org.client.apex_get(
        "SBQQ/ServiceRouter", {"reader": cpq.QUOTE_READER, "uid": quote}
    )
    model = msgspec.json.decode(
        msgspec.json.decode(body, type=str), type=cpq.QuoteModel
    )
    assert model.record.Id == quote
    assert [(i.key, i.parent_item_key) for i in model.line_items] == [(1, None), (2, 1)]
    assert model.net_total == Decimal(6)


def test_the_call_options_client_is_read_from_the_header() -> None:
    """``client=`` among other options; absent → None."""
    assert call_options_client("client=SampleToken/100, defaultNamespace=x") == (
        "SampleToken/100"
    )
    assert call_options_client("defaultNamespace=x") is None
    assert call_options_client(None) is None


async def test_a_query_renders_parents_and_children_as_the_rest_api_does(
    org: Org,
) -> None:
    """Parents and children carry ``attributes``; empty ones are ``null``."""
    sb = org.sandbox
    account = sb.seed_account("Acme", country_code="DE")
    quote = sb.create_quote(sb.create_opportunity(account, "Deal"))
    first = sb.add_quote_line(
        quote, product_code="GW-1", quantity=Decimal(2), list_price=Decimal(10)
    )
    second = sb.add_quote_line(
        quote, product_code="OPT-1", quantity=Decimal(1), list_price=Decimal(5)
    )
    bare = await org.client.create(
        cpq.Quote(Name="no lines, no account", SBQQ__Status__c="Draft")
    )
    query = soql.parse(
        "SELECT Id, SBQQ__Account__r.Name, SBQQ__Account__r.BillingCountryCode,"
        " (SELECT SBQQ__ProductCode__c FROM SBQQ__LineItems__r"
        " ORDER BY SBQQ__Number__c DESC)"
        f" FROM SBQQ__Quote__c WHERE Id IN ('{quote}', '{bare}')"
    )
    rendered = {row["Id"]: sb.org.project(query, row) for row in sb.org.query(query)}
    with_lines, without = rendered[quote], rendered[bare]
    base = "/services/data/v60.0/sobjects"
    assert with_lines["SBQQ__Account__r"] == {
        "attributes": {"type": "Account", "url": f"{base}/Account/{account}"},
        "Name": "Acme",
        "BillingCountryCode": "DE",
    }
    assert with_lines["SBQQ__LineItems__r"] == {
        "totalSize": 2,
        "done": True,
        "records": [
            {
                "attributes": {
                    "type": "SBQQ__QuoteLine__c",
                    "url": f"{base}/SBQQ__QuoteLine__c/{line}",
                },
                "SBQQ__ProductCode__c": code,
            }
            for line, code in ((second, "OPT-1"), (first, "GW-1"))
        ],
    }
    assert without["Id"] == bare
    assert without["SBQQ__Account__r"] is None
    assert without["SBQQ__LineItems__r"] is None
    # Through the client the same answer decodes into the views.
    (record,) = await org.client.query(
        soql.select(
            "Opportunity",
            ["Id", "Account.Name", soql.subquery("OpportunityLineItems", ["Id"])],
            {"AccountId": account},
        ),
        v.Opportunity,
    )
    assert record.Account is not None
    assert (record.Account.Name, record.Account.Id) == ("Acme", None)


async def test_a_subquery_filters_and_leaves_deleted_children_out(org: Org) -> None:
    """The subquery's own WHERE applies, and the recycle bin is not read."""
    sb = org.sandbox
    quote = sb.create_quote(sb.create_opportunity(sb.seed_account("Acme"), "Deal"))
    kept = sb.add_quote_line(
        quote, product_code="GW-1", quantity=Decimal(2), list_price=Decimal(10)
    )
    sb.add_quote_line(
        quote, product_code="OPT-1", quantity=Decimal(1), list_price=Decimal(5)
    )
    gone = sb.add_quote_line(
        quote, product_code="GW-2", quantity=Decimal(1), list_price=Decimal(5)
    )
    await org.client.delete(cpq.QuoteLine, gone)
    (record,) = await org.client.query(
        soql.select(
            "SBQQ__Quote__c",
            [
                "Id",
                "(SELECT Id FROM SBQQ__LineItems__r"
                " WHERE SBQQ__ProductFamily__c = null AND SBQQ__Quantity__c = 2)",
            ],
            {"Id": quote},
        ),
        cpq.Quote,
    )
    assert record.SBQQ__LineItems__r is not None
    assert [line.Id for line in record.SBQQ__LineItems__r.records] == [kept]


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("SELECT Id, Owner.Name FROM Opportunity", "INVALID_FIELD"),
        ("SELECT Id, Account.NoSuchField FROM Opportunity", "INVALID_FIELD"),
        ("SELECT Id, AccountId__r.Name FROM Opportunity", "INVALID_FIELD"),
        ("SELECT Id, Account FROM Opportunity", "INVALID_FIELD"),
        ("SELECT Id, SBQQ__LineItems__r FROM SBQQ__Quote__c", "INVALID_FIELD"),
        ("SELECT Id, (SELECT Id FROM Lines) FROM SBQQ__Quote__c", "INVALID_TYPE"),
        (
            "SELECT Id, (SELECT NoSuchField FROM SBQQ__LineItems__r)"
            " FROM SBQQ__Quote__c",
            "INVALID_FIELD",
        ),
    ],
)
async def test_an_unknown_relationship_or_its_field_is_refused(
    org: Org, text: str, code: str
) -> None:
    """The org's own codes, not an empty answer: a typo fails loudly."""
    with pytest.raises(UpstreamRejected) as refused:
        await org.client.query(text, v.Opportunity)
    assert refused.value.code == code


async def test_a_relationship_is_not_a_writable_field(org: Org) -> None:
    """A create naming a parent record instead of its lookup is refused."""
    with pytest.raises(UpstreamRejected) as refused:
        await org.client.create(
            v.Opportunity(
                Name="Deal",
                StageName="Prospecting",
                CloseDate=datetime(2026, 3, 1).date(),
                Account=v.Account(Name="Acme"),
            )
        )
    assert refused.value.code == "INVALID_FIELD"
