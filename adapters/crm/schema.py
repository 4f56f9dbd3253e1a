"""What the sandbox org knows about its objects: fields, rules, key prefixes, channels.

Internal to the sandbox (`adapters.crm.org`, `adapters.crm.sandbox`). The
fields of each object are those of its view in `adapters.crm.views` or
`adapters.cpq.views`, so the org refuses exactly what the views do not know.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from adapters.cpq.views import Pricebook2, PricebookEntry, Product2, Quote, QuoteLine
from adapters.crm.views import (
    Account,
    Contact,
    Opportunity,
    OpportunityLineItem,
    SObject,
)

__all__ = [
    "API_VERSION",
    "ALL_CHANGES",
    "Fields",
    "ObjectSpec",
    "SPECS",
    "OrgError",
    "entity_channel",
    "change_field_name",
    "compound_fields",
    "COMPOUND_OF",
    "relationship_name",
]

#: The REST API version the org renders in record urls.
API_VERSION: Final = "60.0"
#: The channel that carries the change events of every enabled object.
ALL_CHANGES: Final = "/data/ChangeEvents"

Fields = dict[str, Any]

_ALWAYS_READ_ONLY = frozenset(
    {"Id", "IsDeleted", "CreatedDate", "LastModifiedDate", "SystemModstamp"}
)
_COMPOUND_PARTS = (
    "Street",
    "City",
    "State",
    "PostalCode",
    "Country",
    "StateCode",
    "CountryCode",
    "Latitude",
    "Longitude",
    "GeocodeAccuracy",
)
#: A flat address component → its compound field and part (``BillingCity``).
COMPOUND_OF = {
    f"{prefix}{part}": (f"{prefix}Address", part)
    for prefix in ("Billing", "Shipping", "Mailing")
    for part in _COMPOUND_PARTS
}


@dataclass(frozen=True, kw_only=True)
class ObjectSpec:
    """What the org knows about one object: fields, rules and key prefix."""

    view: type[SObject]
    prefix: str
    required: tuple[str, ...] = ()
    read_only: frozenset[str] = frozenset()
    #: Lookup field → the object it must point at.
    references: Mapping[str, str] = field(default_factory=dict)
    #: Child relationship name → (child object, its lookup to this object).
    children: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    external_ids: tuple[str, ...] = ("Broker_Key__c",)

    @property
    def name(self) -> str:
        """The object's API name."""
        return self.view.sobject_type

    @functools.cached_property
    def parents(self) -> dict[str, tuple[str, str]]:
        """Parent relationship name → (lookup field, parent object).

        Salesforce's rule: ``AccountId`` is reached as ``Account``, a custom
        ``SBQQ__Account__c`` as ``SBQQ__Account__r``.
        """
        return {
            relationship_name(lookup): (lookup, target)
            for lookup, target in self.references.items()
        }

    @functools.cached_property
    def fields(self) -> frozenset[str]:
        """Every field a query may select (relationships are not fields)."""
        return _field_names(self.view) - set(self.parents) - set(self.children)

    @functools.cached_property
    def writable(self) -> frozenset[str]:
        """Fields a create or update may set."""
        return self.fields - _ALWAYS_READ_ONLY - self.read_only


@functools.cache
def _field_names(view: type[SObject]) -> frozenset[str]:
    """The view's wire names (resolving a Struct's annotations is slow: once)."""
    names = {f.encode_name for f in msgspec.structs.fields(view)}
    return frozenset(names - {"attributes"})


def relationship_name(lookup: str) -> str:
    """The relationship a lookup field is reached by: ``AccountId`` → ``Account``."""
    if lookup.endswith("__c"):
        return lookup[:-3] + "__r"
    return lookup.removesuffix("Id")


_ADDRESSES = frozenset({"BillingAddress", "ShippingAddress", "MailingAddress"})

SPECS: dict[str, ObjectSpec] = {
    s.name: s
    for s in (
        ObjectSpec(
            view=Account, prefix="001", required=("Name",), read_only=_ADDRESSES
        ),
        ObjectSpec(
            view=Contact,
            prefix="003",
            required=("LastName",),
            read_only=_ADDRESSES,
            references={"AccountId": "Account"},
        ),
        ObjectSpec(
            view=Opportunity,
            prefix="006",
            required=("Name", "StageName", "CloseDate"),
            read_only=frozenset({"IsClosed", "IsWon", "HasOpportunityLineItem"}),
            references={
                "AccountId": "Account",
                "SBQQ__PrimaryQuote__c": "SBQQ__Quote__c",
            },
            children={"OpportunityLineItems": ("OpportunityLineItem", "OpportunityId")},
        ),
        ObjectSpec(
            view=OpportunityLineItem,
            prefix="00k",
            required=("OpportunityId", "Quantity"),
            read_only=frozenset({"ListPrice", "ProductCode", "Name"}),
            references={
                "OpportunityId": "Opportunity",
                "PricebookEntryId": "PricebookEntry",
                "Product2Id": "Product2",
            },
        ),
        ObjectSpec(view=Product2, prefix="01t", required=("Name",)),
        ObjectSpec(
            view=Pricebook2,
            prefix="01s",
            required=("Name",),
            read_only=frozenset({"IsStandard"}),
        ),
        ObjectSpec(
            view=PricebookEntry,
            prefix="01u",
            required=("Pricebook2Id", "Product2Id", "UnitPrice"),
            read_only=frozenset({"ProductCode"}),
            references={"Product2Id": "Product2", "Pricebook2Id": "Pricebook2"},
        ),
        ObjectSpec(
            view=Quote,
            prefix="a0Q",
            read_only=frozenset(
                {
                    "SBQQ__NetAmount__c",
                    "SBQQ__CustomerAmount__c",
                    "SBQQ__ListAmount__c",
                    "SBQQ__LineItemCount__c",
                }
            ),
            references={
                "SBQQ__Account__c": "Account",
                "SBQQ__Opportunity2__c": "Opportunity",
            },
            children={"SBQQ__LineItems__r": ("SBQQ__QuoteLine__c", "SBQQ__Quote__c")},
        ),
        ObjectSpec(
            view=QuoteLine,
            prefix="a0R",
            required=("SBQQ__Quote__c",),
            read_only=frozenset({"SBQQ__NetTotal__c"}),
            references={
                "SBQQ__Quote__c": "SBQQ__Quote__c",
                "SBQQ__RequiredBy__c": "SBQQ__QuoteLine__c",
                "SBQQ__Product__c": "Product2",
            },
        ),
    )
}


def entity_channel(entity: str) -> str:
    """The object's channel: ``/data/AccountChangeEvent``, ``/data/X__ChangeEvent``."""
    if entity.endswith("__c"):
        return f"/data/{entity[:-3]}__ChangeEvent"
    return f"/data/{entity}ChangeEvent"


class OrgError(Exception):
    """A refusal, as the REST API words it: HTTP status, ``errorCode``, message."""

    def __init__(
        self, status: int, code: str, message: str, fields: tuple[str, ...] = ()
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields

    def body(self) -> list[dict[str, Any]]:
        """The REST error array."""
        entry: dict[str, Any] = {"message": self.message, "errorCode": self.code}
        if self.fields:
            entry["fields"] = list(self.fields)
        return [entry]


def change_field_name(name: str) -> str:
    """A flat address component as change events name it: ``BillingAddress.City``."""
    if name in COMPOUND_OF:
        compound, part = COMPOUND_OF[name]
        return f"{compound}.{part}"
    return name


def compound_fields(fields: Fields) -> Fields:
    """*fields* with flat address components folded into compound addresses.

    Change events carry ``BillingAddress: {City: ...}``, never ``BillingCity``.
    """
    out: Fields = {}
    for name, value in fields.items():
        if name in COMPOUND_OF:
            compound, part = COMPOUND_OF[name]
            out.setdefault(compound, {})[part] = value
        else:
            out[name] = value
    return out
