"""CRM mapping: accounts and opportunities ⇄ canonical, pinned by golden samples."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.crm import mapping as m
from adapters.crm import views as v
from adapters.fieldmap import render
from broker.errors import SchemaInvalid
from canonical import ids
from canonical.commerce import Account, Opportunity
from canonical.q2c import OpportunityUpdateRequested

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "crm"


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def as_json(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))


def test_a_rest_account_maps_to_the_golden_canonical_account() -> None:
    """Golden: the REST record of an account → its canonical account."""
    record = msgspec.json.decode(golden("account.native.json"), type=v.Account)
    expected = msgspec.json.decode(golden("account.canonical.json"), type=Account)
    assert m.account_from_sf(record, default_currency="USD") == expected


def test_a_canonical_account_round_trips_through_its_record() -> None:
    """Canonical → record → canonical is the identity; the record is the golden."""
    account = msgspec.json.decode(golden("account.canonical.json"), type=Account)
    record = m.account_to_sf(account)
    again = m.account_from_sf(
        msgspec.structs.replace(record, Id="001Hn00000XyZ12IAF"), default_currency="USD"
    )
    assert again == account
    native = msgspec.json.decode(golden("account.native.json"))
    for field, value in as_json(record).items():
        if field != "ShippingCountryCode":
            assert native[field] == value, field


def test_an_opportunity_maps_with_its_account() -> None:
    """Golden: opportunity record + account record → canonical opportunity."""
    record = msgspec.json.decode(golden("opportunity.native.json"), type=v.Opportunity)
    account = m.account_from_sf(
        msgspec.json.decode(golden("account.native.json"), type=v.Account),
        default_currency="USD",
    )
    expected = msgspec.json.decode(
        golden("opportunity.canonical.json"), type=Opportunity
    )
    deal = m.opportunity_from_sf(record, account, default_currency="USD")
    assert deal == expected
    assert deal.amount is not None
    assert deal.amount.amount == Decimal("5300.00")
    back = m.opportunity_to_sf(deal)
    assert m.opportunity_from_sf(back, account, default_currency="USD") == deal


def test_the_opportunity_update_body_is_the_golden_patch() -> None:
    """Golden: the command → the PATCH body, stamped with the command key."""
    command = msgspec.json.decode(
        golden("opportunity_update.command.json"), type=OpportunityUpdateRequested
    )
    body = m.opportunity_update(
        command, key=m.command_key("q2c:deal-006Hn00000A1b2cIAB:crm-update:1")
    )
    assert as_json(body) == msgspec.json.decode(
        golden("opportunity_update.native.json")
    )


def test_an_empty_status_note_is_not_written() -> None:
    """An empty note leaves Broker_Status__c as it is; no order number, no write."""
    command = OpportunityUpdateRequested(opportunity_id="opp-x", stage="Negotiation")
    assert as_json(m.opportunity_update(command, key="k")) == {
        "StageName": "Negotiation",
        "Broker_Command_Key__c": "k",
    }


def test_long_command_keys_are_hashed_to_fit_the_field() -> None:
    """A key longer than 80 characters is stored as a stable sha256."""
    short = "q2c:" + "x" * 76
    assert m.command_key(short) == short
    long_key = "q2c:" + "x" * 77
    hashed = m.command_key(long_key)
    assert hashed.startswith("sha256:")
    assert hashed == m.command_key(long_key)
    assert len(hashed) <= 80


def test_the_country_falls_back_to_shipping_and_the_currency_to_the_default() -> None:
    """No billing code: the shipping code; no CurrencyIsoCode: the org's currency."""
    record = v.Account(Id="001Hn00000XyZ12IAF", Name="A", ShippingCountryCode="fr")
    account = m.account_from_sf(record, default_currency="CHF")
    assert (account.country, account.currency, account.billing_address) == (
        "FR",
        "CHF",
        None,
    )


def test_a_change_event_payload_maps_with_the_id_from_the_header() -> None:
    """Compound BillingAddress (change events) is read like the flat fields."""
    record = v.Account(
        Name="A",
        BillingAddress=v.Address(city="Lyon", state_code="69", country_code="FR"),
    )
    account = m.account_from_sf(
        record, default_currency="EUR", record_id="001Hn00000XyZ12"
    )
    assert account.id == "acct-001Hn00000XyZ12IAF"
    assert account.billing_address is not None
    assert (account.billing_address.city, account.billing_address.region) == (
        "Lyon",
        "69",
    )


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (v.Account(Name="No id", BillingCountryCode="DE"), "Id"),
        (v.Account(Id="001Hn00000XyZ12IAF", Name="Nowhere"), "country"),
        (
            v.Account(Id="001Hn00000XyZ12IAF", Name="X", BillingCountryCode="ZZ"),
            "ISO 3166",
        ),
        (
            v.Account(
                Id="001Hn00000XyZ12IAF",
                Name="X",
                BillingCountryCode="DE",
                CurrencyIsoCode="EURO",
            ),
            "currency",
        ),
    ],
)
def test_accounts_that_cannot_be_canonical_are_schema_invalid(
    record: v.Account, reason: str
) -> None:
    """Missing or invalid values are refused with the reason, not half-mapped."""
    with pytest.raises(SchemaInvalid, match=reason):
        m.account_from_sf(record, default_currency="EUR")


def test_canonical_ids_embed_the_record_id() -> None:
    """acct-/opp-/quote- + 18-character id; 15 characters gain the suffix."""
    assert m.canonical_id(ids.ACCOUNT, "001Hn00000XyZ12") == "acct-001Hn00000XyZ12IAF"
    assert (
        m.native_id("opp-006Hn00000A1b2cIAB", ids.OPPORTUNITY) == "006Hn00000A1b2cIAB"
    )
    with pytest.raises(SchemaInvalid, match="opp-"):
        m.native_id("deal-006Hn00000A1b2cIAB", ids.OPPORTUNITY)
    with pytest.raises(SchemaInvalid):
        m.native_id("opp-not-an-id", ids.OPPORTUNITY)


def test_the_field_map_renders() -> None:
    """The field map prints as a table naming both sides."""
    table = render("CRM", m.FIELD_MAP)
    assert "Account.BillingCountryCode" in table
    assert "opportunity.stage" in table
