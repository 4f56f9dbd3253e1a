"""SalesforceClient against the sandbox org, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import socket
from datetime import date
from decimal import Decimal

import aiohttp
import pytest

from adapters.crm import views as v
from adapters.crm.client import SalesforceClient, SalesforceSettings
from adapters.crm.soql import select
from broker.config import convert_table
from broker.errors import ConfigError, UpstreamRejected, UpstreamUnavailable
from tests.adapters.crm.harness import Org, running_org, settings

pytestmark = pytest.mark.anyio


async def test_the_first_call_logs_in_and_later_calls_reuse_the_token(org: Org) -> None:
    """Client credentials → one token; the instance_url is the API base."""
    account_id = org.sandbox.seed_account("Acme", country_code="FR")
    first = await org.client.get(v.Account, account_id)
    second = await org.client.get(v.Account, account_id, fields=["Name"])
    assert first.Name == second.Name == "Acme"
    assert first.attributes is not None
    assert first.attributes.type == "Account"
    assert second.BillingCountryCode is None  # only the fields asked for
    assert org.sandbox.state()["tokens_issued"] == 1


async def test_an_expired_session_is_renewed_once(org: Org) -> None:
    """401 INVALID_SESSION_ID → a new token and the same call again."""
    account_id = org.sandbox.seed_account("Acme")
    await org.client.get(v.Account, account_id)
    org.sandbox.expire_tokens()
    again = await org.client.get(v.Account, account_id)
    assert again.Id == account_id
    assert org.sandbox.state()["tokens_issued"] == 2


async def test_an_upsert_twice_with_one_key_has_one_effect(org: Org) -> None:
    """Upsert by Broker_Key__c: 201 created, then 204 updated, one record."""
    record = v.Account(Name="Acme", BillingCountryCode="DE")
    first = await org.client.upsert(record, key="acct-key-1")
    second = await org.client.upsert(record, key="acct-key-1")
    assert first.created
    assert first.id is not None
    assert second == second.__class__(id=None, created=False)
    found = await org.client.find(v.Account, "acct-key-1")
    assert found is not None
    assert found.Id == first.id
    state = org.sandbox.state()
    assert state["records"]["Account"] == 1
    assert (state["upserts_created"], state["upserts_updated"]) == (1, 1)


async def test_an_external_id_is_one_path_segment_whatever_it_holds(org: Org) -> None:
    """Slashes, spaces and percent signs in a key are escaped, not interpreted."""
    key = "q2c:deal/1 100%"
    first = await org.client.upsert(v.Account(Name="A"), key=key)
    await org.client.upsert(v.Account(Name="B"), key=key)
    found = await org.client.find(v.Account, key)
    assert found is not None
    assert (found.Id, found.Name, found.Broker_Key__c) == (first.id, "B", key)


async def test_find_answers_none_for_an_unknown_key(org: Org) -> None:
    """No record with that external id is an answer, not an error."""
    assert await org.client.find(v.Account, "nobody") is None


async def test_a_refusal_carries_the_salesforce_error_code(org: Org) -> None:
    """The REST error array's errorCode becomes UpstreamRejected.code."""
    with pytest.raises(UpstreamRejected) as missing:
        await org.client.create(v.Opportunity(Name="No stage"))
    assert missing.value.code == "REQUIRED_FIELD_MISSING"
    assert "StageName" in missing.value.detail
    await org.client.create(v.Account(Name="A", Broker_Key__c="dup"))
    with pytest.raises(UpstreamRejected) as duplicate:
        await org.client.create(v.Account(Name="B", Broker_Key__c="dup"))
    assert duplicate.value.code == "DUPLICATE_VALUE"
    with pytest.raises(UpstreamRejected) as not_found:
        await org.client.get(v.Account, "001000000000000AAA")
    assert not_found.value.code == "NOT_FOUND"
    with pytest.raises(UpstreamRejected) as malformed:
        await org.client.query("SELECT Id FROM Account WHERE A = 1 OR B = 2", v.Account)
    assert malformed.value.code == "MALFORMED_QUERY"


async def test_a_dangling_lookup_is_refused(org: Org) -> None:
    """A reference to a record that does not exist is INVALID_CROSS_REFERENCE_KEY."""
    with pytest.raises(UpstreamRejected) as caught:
        await org.client.create(
            v.Contact(LastName="Doe", AccountId="001000000000000AAA")
        )
    assert caught.value.code == "INVALID_CROSS_REFERENCE_KEY"


async def test_beyond_the_rate_limit_the_call_is_unavailable_with_retry_after(
    org: Org,
) -> None:
    """429 with Retry-After → UpstreamUnavailable.retry_after_s."""
    account_id = org.sandbox.seed_account("Acme")
    org.sandbox.knobs.rate_limit_per_s = 0.01  # one call, then 100 s to wait
    await org.client.get(v.Account, account_id)
    with pytest.raises(UpstreamUnavailable) as caught:
        await org.client.get(v.Account, account_id)
    assert caught.value.retry_after_s is not None
    assert caught.value.retry_after_s >= 50
    assert org.sandbox.state()["rate_limited"] == 1


async def test_server_errors_on_writes_are_unavailable_not_refused(org: Org) -> None:
    """error_rate = 1: every write answers 500/503, reads still work."""
    account_id = org.sandbox.seed_account("Acme")
    org.sandbox.knobs.error_rate = 1.0
    with pytest.raises(UpstreamUnavailable):
        await org.client.update(account_id, v.Account(Name="Acme 2"))
    assert (await org.client.get(v.Account, account_id)).Name == "Acme"
    assert org.sandbox.state()["injected_errors"] == 1


async def test_a_locked_record_is_unavailable_then_written(org: Org) -> None:
    """UNABLE_TO_LOCK_ROW (400) passes with time: retried, not refused."""
    account_id = org.sandbox.seed_account("Acme")
    org.sandbox.knobs.locked_writes = 1
    with pytest.raises(UpstreamUnavailable, match="UNABLE_TO_LOCK_ROW"):
        await org.client.update(account_id, v.Account(Name="Acme 2"))
    await org.client.update(account_id, v.Account(Name="Acme 2"))
    assert (await org.client.get(v.Account, account_id)).Name == "Acme 2"
    assert org.sandbox.state()["locked"] == 1


async def test_an_outage_is_unavailable_and_ends_when_the_knob_is_off(org: Org) -> None:
    """outage: every call (the token endpoint too) answers 503."""
    account_id = org.sandbox.seed_account("Acme")
    org.sandbox.knobs.outage = True
    with pytest.raises(UpstreamUnavailable) as caught:
        await org.client.get(v.Account, account_id)
    assert "503" in str(caught.value)
    org.sandbox.knobs.outage = False
    assert (await org.client.get(v.Account, account_id)).Name == "Acme"


async def test_a_slow_org_times_out_as_unavailable() -> None:
    """No answer within timeout_s → UpstreamUnavailable, not an aiohttp error."""
    async with running_org() as org:
        org.sandbox.knobs.latency_s = 0.5
        async with SalesforceClient(settings(org.url, timeout_s=0.05)) as client:
            with pytest.raises(UpstreamUnavailable, match="no answer within"):
                await client.get(v.Account, "001000000000000AAA")


async def test_a_refused_connection_is_unavailable() -> None:
    """Nothing listening → UpstreamUnavailable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with SalesforceClient(settings(f"http://127.0.0.1:{port}")) as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.get(v.Account, "001000000000000AAA")
    assert isinstance(caught.value.__cause__, aiohttp.ClientError)


async def test_a_query_follows_next_records_url_within_its_bound() -> None:
    """Pages of 2 are followed to the end; more than max_records is refused."""
    async with running_org(query_batch_size=2) as org:
        for n in range(5):
            org.sandbox.seed_account(f"Acme {n}")
        text = select("Account", ["Id", "Name"], None, order_by="Name")
        records = await org.client.query(text, v.Account)
        assert [r.Name for r in records] == [f"Acme {n}" for n in range(5)]
        with pytest.raises(UpstreamRejected) as caught:
            await org.client.query(text, v.Account, max_records=3)
        assert caught.value.code == "QUERY_TOO_LARGE"


async def test_query_all_also_sees_deleted_records(org: Org) -> None:
    """A deleted record leaves query but stays in queryAll, flagged IsDeleted."""
    account_id = org.sandbox.seed_account("Gone")
    await org.client.delete(v.Account, account_id)
    text = select("Account", ["Id", "IsDeleted"], {"Id": account_id})
    assert await org.client.query(text, v.Account) == ()
    (gone,) = await org.client.query(text, v.Account, include_deleted=True)
    assert gone.IsDeleted is True


async def test_writes_are_marked_with_our_client_id(org: Org) -> None:
    """Sforce-Call-Options: client=<client_id> comes back in changeOrigin."""
    account_id = await org.client.create(v.Account(Name="Acme"))
    (event,) = await org.client.replay("/data/AccountChangeEvent", -2)
    assert event.header.record_ids == (account_id,)
    assert event.header.origin.client == "q2c-broker"
    assert event.header.origin.api == "rest"


@pytest.mark.parametrize("status", [200, 400])
async def test_an_answer_nested_too_deep_is_refused_not_a_crash(
    org: Org, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    """JSON 1,000 deep (msgspec's RecursionError) is an answer we cannot read."""
    deep = b'{"unknown": ' + b"[" * 1000 + b"]" * 1000 + b"}"
    await org.client.replay("/data/ChangeEvents", -1)  # logged in

    async def answer(
        *args: object, **kwargs: object
    ) -> tuple[int, dict[str, str], bytes]:
        return status, {}, deep

    monkeypatch.setattr(org.client, "_send", answer)
    with pytest.raises(UpstreamRejected) as replayed:
        await org.client.replay("/data/ChangeEvents", -2)
    with pytest.raises(UpstreamRejected) as queried:
        await org.client.query(select("Account", ["Id"], {}), v.Account)
    if status == 200:
        assert replayed.value.code == queried.value.code == "MALFORMED_RESPONSE"
        assert "maximum recursion" in str(replayed.value)
    else:
        assert replayed.value.code == queried.value.code == "HTTP_400"


async def test_knobs_and_state_are_reachable_over_http(org: Org) -> None:
    """POST /_sandbox/knobs changes the running sandbox; GET /_sandbox/state counts."""
    async with aiohttp.ClientSession() as http:
        async with http.post(org.url + "/_sandbox/knobs", json={"outage": True}) as r:
            assert r.status == 200
        assert org.sandbox.knobs.outage
        async with http.post(org.url + "/_sandbox/knobs", json={"outage": False}) as r:
            assert (await r.json())["outage"] is False
        org.sandbox.seed_account("Acme")
        async with http.get(org.url + "/_sandbox/state") as r:
            state = await r.json()
    assert state["records"]["Account"] == 1
    assert state["creates"] == 1


def test_settings_come_from_a_config_table_and_hide_the_secret() -> None:
    """Kebab-case keys convert; a bad value names its key; repr hides the secret."""
    parsed = convert_table(
        SalesforceSettings,
        {
            "login-url": "https://login",
            "client-id": "c",
            "client-secret": "s3cr3t",
            "webhook-secrets": ["whsec-old", "whsec-new"],
        },
        where="[systems.crm]",
    )
    assert parsed.client_secret == "s3cr3t"
    assert parsed.webhook_secrets == ("whsec-old", "whsec-new")
    for secret in ("s3cr3t", "whsec-old", "whsec-new"):
        assert secret not in repr(parsed)
    with pytest.raises(ConfigError, match="timeout-s"):
        convert_table(
            SalesforceSettings,
            {"login-url": "x", "client-id": "c", "timeout-s": 0},
            where="[systems.crm]",
        )


async def test_money_keeps_its_digits_both_ways(org: Org) -> None:
    """Amounts go out as JSON numbers from Decimals and come back as Decimals."""
    account_id = org.sandbox.seed_account("Acme")
    opp_id = await org.client.create(
        v.Opportunity(
            AccountId=account_id,
            Name="Deal",
            StageName="Prospecting",
            CloseDate=date(2026, 6, 30),
            Amount=Decimal("5300.10"),
        )
    )
    opp = await org.client.get(v.Opportunity, opp_id)
    assert opp.Amount == Decimal("5300.10")
    assert str(opp.Amount) == "5300.10"
    assert opp.CloseDate == date(2026, 6, 30)
