"""Pure mapping between canonical accounts and deals and Salesforce records.

Decisions that are not obvious from the field names:

* The CRM is the master of accounts, opportunities and quotes, so their
  canonical ids embed the record's 18-character id (`canonical.ids`):
  ``acct-<Account.Id>``, ``opp-<Opportunity.Id>`` (deal
  ``deal-<Opportunity.Id>``), ``quote-<SBQQ__Quote__c.Id>``. `native_id`
  takes the prefix off again; a 15-character id gains its suffix, an
  18-character one is kept as it is.
* An account's country is its billing country code (State and Country
  Picklists), else its shipping country code; an account with neither is
  refused, as is one whose ``BillingCountry`` is not a code.
* A single-currency org has no ``CurrencyIsoCode``: its currency comes from
  the settings (``default_currency``).
* The broker's command key is stamped on the record it writes
  (``Broker_Command_Key__c``), so a redelivered command can see that it was
  applied already; keys longer than the field are hashed (`command_key`).
"""

from __future__ import annotations

import hashlib
from typing import TypeVar

import msgspec

from adapters.crm import views as v
from adapters.fieldmap import FieldMapping
from broker.errors import SchemaInvalid
from canonical.commerce import Account, Address, Opportunity
from canonical.ids import ACCOUNT, OPPORTUNITY
from canonical.q2c import OpportunityUpdateRequested
from canonical.scalars import Money

__all__ = [
    "FIELD_MAP",
    "canonical_id",
    "native_id",
    "command_key",
    "checked",
    "account_from_sf",
    "account_to_sf",
    "opportunity_from_sf",
    "opportunity_to_sf",
    "opportunity_update",
    "ACCOUNT_FIELDS",
    "OPPORTUNITY_FIELDS",
]


#: What the connector selects of an account and of an opportunity.
ACCOUNT_FIELDS = (
    "Id",
    "Name",
    "IsDeleted",
    "BillingStreet",
    "BillingCity",
    "BillingState",
    "BillingStateCode",
    "BillingPostalCode",
    "BillingCountry",
    "BillingCountryCode",
    "ShippingCountryCode",
    "CurrencyIsoCode",
    "Tax_Id__c",
)
OPPORTUNITY_FIELDS = (
    "Id",
    "AccountId",
    "Name",
    "StageName",
    "CloseDate",
    "Amount",
    "CurrencyIsoCode",
    "Broker_Command_Key__c",
)

FIELD_MAP: tuple[FieldMapping, ...] = (
    FieldMapping("account.id", "Account.Id", "acct- + 18-character id"),
    FieldMapping("account.name", "Account.Name"),
    FieldMapping(
        "account.country",
        "Account.BillingCountryCode",
        "else ShippingCountryCode; required",
    ),
    FieldMapping(
        "account.currency", "Account.CurrencyIsoCode", "else default-currency"
    ),
    FieldMapping("account.billing_address.street", "Account.BillingStreet"),
    FieldMapping("account.billing_address.city", "Account.BillingCity"),
    FieldMapping("account.billing_address.postal_code", "Account.BillingPostalCode"),
    FieldMapping(
        "account.billing_address.region",
        "Account.BillingStateCode",
        "else BillingState",
    ),
    FieldMapping(
        "account.billing_address.country",
        "Account.BillingCountryCode",
        "address only when the code is set",
    ),
    FieldMapping("account.tax_id", "Account.Tax_Id__c"),
    FieldMapping("account.deleted", "Account.IsDeleted", "queryAll sees the bin"),
    FieldMapping("opportunity.id", "Opportunity.Id", "opp- + 18-character id"),
    FieldMapping("opportunity.account", "Opportunity.AccountId", "account read too"),
    FieldMapping("opportunity.name", "Opportunity.Name"),
    FieldMapping("opportunity.stage", "Opportunity.StageName", "picklist value as is"),
    FieldMapping("opportunity.close_date", "Opportunity.CloseDate"),
    FieldMapping(
        "opportunity.amount",
        "Opportunity.Amount + CurrencyIsoCode",
        "Decimal; currency else default-currency",
    ),
    FieldMapping("update.stage", "Opportunity.StageName"),
    FieldMapping("update.order_number", "Opportunity.ERP_Order_Number__c"),
    FieldMapping(
        "update.status_note", "Opportunity.Broker_Status__c", "when not empty"
    ),
    FieldMapping(
        "(idempotency key)",
        "Opportunity.Broker_Command_Key__c",
        "sha256 when > 80 chars",
    ),
)

_KEY_LIMIT = 80
C = TypeVar("C", bound=msgspec.Struct)


def _id18(record_id: str) -> str:
    # Shape only: the org is the judge of its own 18-character ids.
    if len(record_id) == 18 and record_id.isascii() and record_id.isalnum():
        return record_id
    try:
        return v.to_id18(record_id)
    except ValueError as exc:
        raise SchemaInvalid(f"crm: {exc}") from exc


def canonical_id(prefix: str, record_id: str) -> str:
    """``<prefix><18-character id>``.

    Raises:
        SchemaInvalid: *record_id* is not shaped like a Salesforce id.
    """
    return prefix + _id18(record_id)


def native_id(canonical: str, prefix: str) -> str:
    """The 18-character record id inside a canonical id.

    Raises:
        SchemaInvalid: *canonical* does not start with *prefix* followed by an id.
    """
    if not canonical.startswith(prefix):
        raise SchemaInvalid(f"crm: {canonical!r} is not a {prefix}… id")
    return _id18(canonical.removeprefix(prefix))


def command_key(idempotency_key: str) -> str:
    """The value stamped in ``Broker_Command_Key__c`` for a command."""
    if len(idempotency_key) <= _KEY_LIMIT:
        return idempotency_key
    return "sha256:" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:64]


def checked(value: C) -> C:
    """*value* after msgspec has validated it (constructors skip ``Meta`` checks).

    Raises:
        SchemaInvalid: naming the field that does not fit.
    """
    try:
        return msgspec.convert(msgspec.to_builtins(value), type(value))
    except (msgspec.ValidationError, ValueError) as exc:
        raise SchemaInvalid(f"crm: {type(value).__name__}: {exc}") from exc


def _code(value: str | None) -> str | None:
    return value if value and len(value) == 2 and value.isalpha() else None


def _country(record: v.Account) -> str | None:
    billing = record.BillingAddress or v.Address()
    shipping = record.ShippingAddress or v.Address()
    for candidate in (
        record.BillingCountryCode,
        billing.country_code,
        _code(record.BillingCountry),
        _code(billing.country),
        record.ShippingCountryCode,
        shipping.country_code,
    ):
        if candidate:
            return candidate.upper()
    return None


def _billing_address(record: v.Account) -> Address | None:
    compound = record.BillingAddress or v.Address()
    country = record.BillingCountryCode or compound.country_code
    if not country:
        return None
    return Address(
        street=record.BillingStreet or compound.street or "",
        city=record.BillingCity or compound.city or "",
        postal_code=record.BillingPostalCode or compound.postal_code or "",
        region=record.BillingStateCode
        or compound.state_code
        or record.BillingState
        or compound.state,
        country=country.upper(),
    )


def account_from_sf(
    record: v.Account, *, default_currency: str, record_id: str | None = None
) -> Account:
    """The canonical account of a REST record or of a change event's payload.

    Args:
        record: the record (``Id`` may be absent in a change event).
        default_currency: for single-currency orgs.
        record_id: the id when the record has none (``recordIds[0]``).

    Raises:
        SchemaInvalid: no id, no name, no country code, or invalid values.
    """
    rid = record.Id or record_id
    if not rid or not record.Name:
        raise SchemaInvalid("crm: Account needs an Id and a Name")
    country = _country(record)
    if country is None:
        raise SchemaInvalid(
            f"crm: Account {rid} has no billing or shipping country code"
        )
    try:
        account = Account(
            id=canonical_id(ACCOUNT, rid),
            name=record.Name,
            country=country,
            currency=record.CurrencyIsoCode or default_currency,
            billing_address=_billing_address(record),
            tax_id=record.Tax_Id__c,
            deleted=bool(record.IsDeleted),
        )
    except ValueError as exc:
        raise SchemaInvalid(f"crm: Account {rid}: {exc}") from exc
    return checked(account)


def account_to_sf(account: Account) -> v.Account:
    """The record (without ``Id``) whose `account_from_sf` is *account*."""
    address = account.billing_address
    return v.Account(
        Name=account.name,
        BillingStreet=(address.street or None) if address else None,
        BillingCity=(address.city or None) if address else None,
        BillingPostalCode=(address.postal_code or None) if address else None,
        BillingStateCode=address.region if address else None,
        BillingCountryCode=address.country if address else None,
        ShippingCountryCode=None if address else account.country,
        CurrencyIsoCode=account.currency,
        Tax_Id__c=account.tax_id,
        IsDeleted=True if account.deleted else None,
    )


def opportunity_from_sf(
    record: v.Opportunity, account: Account, *, default_currency: str
) -> Opportunity:
    """The canonical deal of an opportunity whose account is *account*.

    Raises:
        SchemaInvalid: no id, name or stage, or invalid values.
    """
    if not record.Id or not record.Name or not record.StageName:
        raise SchemaInvalid("crm: Opportunity needs an Id, a Name and a StageName")
    try:
        amount = (
            Money(
                amount=record.Amount,
                currency=record.CurrencyIsoCode or default_currency,
            )
            if record.Amount is not None
            else None
        )
        deal = Opportunity(
            id=canonical_id(OPPORTUNITY, record.Id),
            account=account,
            name=record.Name,
            stage=record.StageName,
            close_date=v.as_date(record.CloseDate),
            amount=amount,
        )
    except ValueError as exc:
        raise SchemaInvalid(f"crm: Opportunity {record.Id}: {exc}") from exc
    return checked(deal)


def opportunity_to_sf(deal: Opportunity) -> v.Opportunity:
    """The record whose `opportunity_from_sf` (with ``deal.account``) is *deal*."""
    return v.Opportunity(
        Id=native_id(deal.id, OPPORTUNITY),
        AccountId=native_id(deal.account.id, ACCOUNT),
        Name=deal.name,
        StageName=deal.stage,
        CloseDate=deal.close_date,
        Amount=deal.amount.amount if deal.amount else None,
        CurrencyIsoCode=deal.amount.currency if deal.amount else None,
    )


def opportunity_update(
    command: OpportunityUpdateRequested, *, key: str
) -> v.Opportunity:
    """The PATCH body that writes the deal's progress; *key* from `command_key`."""
    return v.Opportunity(
        StageName=command.stage,
        ERP_Order_Number__c=command.order_number,
        Broker_Status__c=command.status_note or None,
        Broker_Command_Key__c=key,
    )
