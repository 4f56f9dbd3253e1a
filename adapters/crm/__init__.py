"""Salesforce CRM: REST sObjects, Change Data Capture, the signed push, a sandbox org.

The CPQ package's part of the same org is `adapters.cpq`.
"""

from __future__ import annotations

from adapters.crm.client import (
    SalesforceClient,
    SalesforceSettings,
    UpsertResult,
)
from adapters.crm.connector import CrmConnector, ResyncRequired
from adapters.crm.ingress import SalesforceWebhook, inbound_from_change, poll_changes
from adapters.crm.mapping import (
    FIELD_MAP,
    account_from_sf,
    account_to_sf,
    opportunity_from_sf,
    opportunity_to_sf,
    opportunity_update,
)
from adapters.crm.sandbox import Knobs, SalesforceSandbox
from adapters.crm.views import (
    Account,
    ApiError,
    ChangeEvent,
    ChangeEventHeader,
    ChangeOrigin,
    ChangeType,
    CometdMessage,
    Contact,
    Opportunity,
    OpportunityLineItem,
    PubSubEvent,
    QueryResult,
    SaveResult,
    SObject,
    decode_cometd,
    decode_pubsub,
    is_id,
    parse_change_origin,
    to_id18,
)

__all__ = [
    # views
    "Account",
    "ApiError",
    "ChangeEvent",
    "ChangeEventHeader",
    "ChangeOrigin",
    "ChangeType",
    "CometdMessage",
    "Contact",
    "Opportunity",
    "OpportunityLineItem",
    "PubSubEvent",
    "QueryResult",
    "SaveResult",
    "SObject",
    "decode_cometd",
    "decode_pubsub",
    "is_id",
    "parse_change_origin",
    "to_id18",
    # client
    "SalesforceClient",
    "SalesforceSettings",
    "UpsertResult",
    # mapping
    "FIELD_MAP",
    "account_from_sf",
    "account_to_sf",
    "opportunity_from_sf",
    "opportunity_to_sf",
    "opportunity_update",
    # sandbox, ingress, connector
    "Knobs",
    "SalesforceSandbox",
    "SalesforceWebhook",
    "inbound_from_change",
    "poll_changes",
    "CrmConnector",
    "ResyncRequired",
]
