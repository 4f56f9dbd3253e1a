"""CrmConnector against the sandbox org: progress written once, records read back."""

from __future__ import annotations

from decimal import Decimal

import pytest
from structlog.testing import capture_logs

from adapters.cpq.client import CpqClient
from adapters.crm import views as v
from adapters.crm.connector import CrmConnector, ResyncRequired
from broker.errors import PermanentError, UnknownMessageType, UpstreamRejected
from canonical.q2c import (
    AccountChanged,
    OpportunityCreated,
    OpportunityUpdated,
    OpportunityUpdateRequested,
    QuoteApproved,
    QuoteDenied,
    RecordReadRequired,
)
from tests.adapters.crm.harness import Org, envelope

pytestmark = pytest.mark.anyio

UPDATE = "crm.opportunity.update_requested"


def connector(org: Org) -> CrmConnector:
    return CrmConnector(org.client, cpq=CpqClient(org.client))


def opportunity(org: Org) -> str:
    account = org.sandbox.seed_account("Acme", country_code="DE", currency="EUR")
    return org.sandbox.create_opportunity(account, "Deal", amount=Decimal("100.00"))


async def test_an_opportunity_update_is_written_once_for_a_redelivery(org: Org) -> None:
    """Same envelope twice → one PATCH (one change event), the same answer twice.

    A first attempt writes without reading (one request); the redelivery
    reads the command key it finds stamped, and writes nothing.
    """
    opp = opportunity(org)
    command = OpportunityUpdateRequested(
        opportunity_id=f"opp-{opp}", stage="Closed Won", order_number="4711"
    )
    env = envelope(UPDATE, "q2c:deal-1:crm-update")
    crm = connector(org)
    before = org.sandbox.state()["updates"]
    requests = org.sandbox.counts["api_requests"]
    first = await crm.handle(command, env, first_attempt=True)
    assert org.sandbox.counts["api_requests"] == requests + 1
    second = await crm.handle(command, env)
    assert org.sandbox.counts["api_requests"] == requests + 2
    assert (
        first
        == second
        == [
            OpportunityUpdated(
                opportunity_id=f"opp-{opp}", stage="Closed Won", native_id=opp
            )
        ]
    )
    assert org.sandbox.state()["updates"] - before == 1
    record = await org.client.get(v.Opportunity, opp)
    assert (record.StageName, record.ERP_Order_Number__c, record.IsWon) == (
        "Closed Won",
        "4711",
        True,
    )
    assert record.Broker_Command_Key__c == "q2c:deal-1:crm-update"


async def test_a_new_command_for_the_same_opportunity_writes_again(org: Org) -> None:
    """A different idempotency key is a different command."""
    opp = opportunity(org)
    crm = connector(org)
    await crm.handle(
        OpportunityUpdateRequested(opportunity_id=f"opp-{opp}", stage="Negotiation"),
        envelope(UPDATE, "k-1"),
    )
    await crm.handle(
        OpportunityUpdateRequested(opportunity_id=f"opp-{opp}", stage="Closed Lost"),
        envelope(UPDATE, "k-2"),
    )
    assert (await org.client.get(v.Opportunity, opp)).StageName == "Closed Lost"


async def test_our_own_update_is_an_echo_on_the_change_feed(org: Org) -> None:
    """The write carries client=<our id>, so the feed can drop it."""
    opp = opportunity(org)
    await connector(org).handle(
        OpportunityUpdateRequested(opportunity_id=f"opp-{opp}", stage="Won"),
        envelope(UPDATE, "k"),
    )
    last = (await org.client.replay("/data/OpportunityChangeEvent", -2))[-1]
    assert last.header.origin.client == "q2c-broker"


async def test_a_missing_opportunity_is_refused(org: Org) -> None:
    """The org's NOT_FOUND surfaces as UpstreamRejected: there is no fallout event."""
    command = OpportunityUpdateRequested(
        opportunity_id="opp-006000000000001AAA", stage="Won"
    )
    with pytest.raises(UpstreamRejected) as caught:
        await connector(org).handle(command, envelope(UPDATE, "k"))
    assert caught.value.code == "NOT_FOUND"


async def test_an_account_read_back_reports_the_account(org: Org) -> None:
    """crm.record.read_required for an account → crm.account.changed."""
    account = org.sandbox.seed_account("Acme", country_code="DE", currency="EUR")
    read = RecordReadRequired(
        entity="Account", native_ids=(account,), change_type="UPDATE"
    )
    (changed,) = await connector(org).handle(
        read, envelope("crm.record.read_required", "r")
    )
    assert isinstance(changed, AccountChanged)
    assert (changed.change, changed.native_id) == ("updated", account)
    assert changed.account.id == f"acct-{account}"
    assert changed.account.currency == "EUR"


async def test_a_deleted_account_is_read_from_the_recycle_bin(org: Org) -> None:
    """DELETE → queryAll still sees it: crm.account.changed with deleted set."""
    account = org.sandbox.seed_account("Gone", country_code="FR")
    await org.client.delete(v.Account, account)
    read = RecordReadRequired(
        entity="Account", native_ids=(account,), change_type="DELETE"
    )
    (changed,) = await connector(org).handle(
        read, envelope("crm.record.read_required", "r")
    )
    assert isinstance(changed, AccountChanged)
    assert changed.change == "deleted"
    assert changed.account.deleted
    assert changed.account.currency == "EUR"  # the org's default currency


async def test_a_new_opportunity_is_read_back_with_its_account(org: Org) -> None:
    """Opportunity CREATE → crm.opportunity.created, the account inside."""
    opp = opportunity(org)
    read = RecordReadRequired(
        entity="Opportunity", native_ids=(opp,), change_type="CREATE"
    )
    before = org.sandbox.counts["api_requests"]
    (created,) = await connector(org).handle(
        read, envelope("crm.record.read_required", "r")
    )
    # One request against the org's API limit: the account rides along.
    assert org.sandbox.counts["api_requests"] == before + 1
    assert isinstance(created, OpportunityCreated)
    assert created.opportunity.id == f"opp-{opp}"
    assert created.opportunity.account.name == "Acme"
    assert created.opportunity.amount is not None
    assert created.opportunity.amount.amount == Decimal("100.00")
    update = RecordReadRequired(
        entity="Opportunity", native_ids=(opp,), change_type="UPDATE"
    )
    assert (
        await connector(org).handle(update, envelope("crm.record.read_required", "u"))
        == []
    )


async def test_an_approved_quote_is_read_back_with_its_bundle(org: Org) -> None:
    """Quote approval → cpq.quote.approved with lines; options name their parent."""
    sb = org.sandbox
    opp = opportunity(org)
    quote = sb.create_quote(opp, CurrencyIsoCode="EUR")
    parent = sb.add_quote_line(
        quote,
        product_code="HW-GATEWAY-200",
        quantity=Decimal(4),
        list_price=Decimal("1200.00"),
        net_price=Decimal("1100.00"),
    )
    sb.add_quote_line(
        quote,
        product_code="SAAS-FLEET-PRO",
        quantity=Decimal(25),
        list_price=Decimal("40.00"),
        net_price=Decimal("36.00"),
        required_by=parent,
        SBQQ__SubscriptionPricing__c="Fixed Price",
        SBQQ__SubscriptionTerm__c=Decimal(12),
    )
    sb.approve_quote(quote)
    read = RecordReadRequired(
        entity="SBQQ__Quote__c", native_ids=(quote,), change_type="UPDATE"
    )
    before = org.sandbox.counts["api_requests"]
    (approved,) = await connector(org).handle(
        read, envelope("crm.record.read_required", "q")
    )
    # One request: the lines and the account ride along with the quote.
    assert org.sandbox.counts["api_requests"] == before + 1
    assert isinstance(approved, QuoteApproved)
    q = approved.quote
    assert (q.id, q.opportunity_id, q.status, q.primary) == (
        f"quote-{quote}",
        f"opp-{opp}",
        "approved",
        True,
    )
    assert q.tax_country == "DE"  # the account's, the quote names none
    assert q.net_total.amount == Decimal("5300.00")
    assert [
        (line.number, line.sku, line.parent, line.recurring) for line in q.lines
    ] == [
        (1, "HW-GATEWAY-200", None, False),
        (2, "SAAS-FLEET-PRO", 1, True),
    ]
    assert q.lines[1].term_months == 12


async def test_a_denied_quote_is_reported_and_a_draft_is_not(org: Org) -> None:
    """Denied → cpq.quote.denied; a quote in another status yields nothing."""
    sb = org.sandbox
    quote = sb.create_quote(opportunity(org), SBQQ__ShippingCountry__c="AT")
    sb.add_quote_line(
        quote, product_code="GW-1", quantity=Decimal(1), list_price=Decimal(1)
    )
    read = RecordReadRequired(
        entity="SBQQ__Quote__c", native_ids=(quote,), change_type="UPDATE"
    )
    env = envelope("crm.record.read_required", "q")
    assert await connector(org).handle(read, env) == []
    sb.set_quote_status(quote, "Denied")
    (denied,) = await connector(org).handle(read, env)
    assert isinstance(denied, QuoteDenied)
    assert denied.quote.tax_country == "AT"


@pytest.mark.parametrize("ids", [(), ("001*",)], ids=["none", "wildcard"])
async def test_an_overflow_naming_no_record_is_dead_lettered_for_a_resync(
    org: Org, ids: tuple[str, ...]
) -> None:
    """A full resync is not the connector's to start, but must not pass unseen.

    ResyncRequired is a PermanentError: the command is dead-lettered with
    reason ``resync_required`` (not counted against the breaker), and the
    org is not asked anything.
    """
    read = RecordReadRequired(
        entity="Account", native_ids=ids, change_type="GAP_OVERFLOW"
    )
    before = org.sandbox.counts["api_requests"]
    with pytest.raises(ResyncRequired, match="GAP_OVERFLOW names no Account") as e:
        await connector(org).handle(read, envelope("crm.record.read_required", "o"))
    assert isinstance(e.value, PermanentError)
    assert e.value.reason == "resync_required"
    assert "resync Account" in str(e.value)
    assert org.sandbox.counts["api_requests"] == before


async def test_real_ids_beside_a_wildcard_are_still_read_back(org: Org) -> None:
    """The ids that are real are read; the wildcard is logged for a resync."""
    account = org.sandbox.seed_account("Acme", country_code="DE", currency="EUR")
    read = RecordReadRequired(
        entity="Account", native_ids=(account, "001*"), change_type="GAP_UPDATE"
    )
    with capture_logs() as logs:
        (changed,) = await connector(org).handle(
            read, envelope("crm.record.read_required", "g")
        )
    assert isinstance(changed, AccountChanged)
    assert changed.native_id == account
    (warning,) = [e for e in logs if e["event"] == "crm_resync_required"]
    assert warning["log_level"] == "warning"
    assert (warning["entity"], warning["change_type"]) == ("Account", "GAP_UPDATE")
    assert warning["ignored"] == ["001*"]


async def test_a_command_of_another_system_is_unknown(org: Org) -> None:
    """Anything but its two commands is UnknownMessageType."""
    crm = connector(org)
    assert set(crm.commands) == {
        "crm.opportunity.update_requested",
        "crm.record.read_required",
    }
    with pytest.raises(UnknownMessageType):
        await crm.handle(object(), envelope("x", "k"))
