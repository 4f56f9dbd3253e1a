"""SAP S/4HANA Cloud: sales orders, business partners and products over OData V2.

Views of SAP's payloads (`views`, with the Edm codecs in `edm`), the pure
canonical ⇄ SAP mapping (`mapping`), an async client with SAP's CSRF
handshake (`SapClient`), the connector that books orders and syncs
customers (`SapConnector`), the webhook for SAP's business events
(`SapEventWebhook`) and a sandbox that behaves like SAP on the wire
(`SapSandbox`).
"""

from __future__ import annotations

from adapters.erp_cloud.client import (
    SapApi,
    SapClient,
    SapRejected,
    SapSettings,
)
from adapters.erp_cloud.connector import SapConnector
from adapters.erp_cloud.ingress import SapEventWebhook
from adapters.erp_cloud.mapping import (
    FIELD_MAP,
    MappingOptions,
    OrderContext,
    SalesArea,
    from_sales_order,
    search_term,
    to_business_partner,
    to_sales_order,
)
from adapters.erp_cloud.sandbox import Knobs, SapSandbox

__all__ = [
    # Client
    "SapApi",
    "SapClient",
    "SapRejected",
    "SapSettings",
    # Connector and webhook
    "SapConnector",
    "SapEventWebhook",
    # Mapping
    "FIELD_MAP",
    "MappingOptions",
    "OrderContext",
    "SalesArea",
    "from_sales_order",
    "search_term",
    "to_business_partner",
    "to_sales_order",
    # Sandbox
    "Knobs",
    "SapSandbox",
]
