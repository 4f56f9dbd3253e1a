"""Stripe billing: views, signatures, a client, a sandbox, mapping and the connector.

The broker provisions subscriptions for an order's recurring lines
(`BillingConnector`) and learns of paid invoices from Stripe's webhooks
(`StripeWebhook`). `StripeSandbox` behaves like Stripe on the wire for
tests, the demo and the bench.
"""

from __future__ import annotations

from adapters.billing.client import (
    ReplayedServerError,
    StripeApi,
    StripeClient,
    StripeSettings,
    idempotency_key,
)
from adapters.billing.connector import BillingConnector
from adapters.billing.delivery import WebhookEndpoint
from adapters.billing.ingress import SOURCE, StripeWebhook
from adapters.billing.mapping import FIELD_MAP
from adapters.billing.sandbox import Knobs, StripeSandbox
from adapters.billing.signature import sign, verify
from adapters.billing.views import (
    API_VERSION,
    Customer,
    ErrorBody,
    Event,
    Invoice,
    Price,
    Subscription,
    from_minor,
    to_minor,
)

__all__ = [
    # Connector and ingress
    "BillingConnector",
    "StripeWebhook",
    "SOURCE",
    "FIELD_MAP",
    # Client
    "StripeApi",
    "StripeClient",
    "StripeSettings",
    "ReplayedServerError",
    "idempotency_key",
    # Sandbox
    "StripeSandbox",
    "Knobs",
    "WebhookEndpoint",
    # Signatures
    "sign",
    "verify",
    # Views and money
    "API_VERSION",
    "Customer",
    "ErrorBody",
    "Event",
    "Invoice",
    "Price",
    "Subscription",
    "from_minor",
    "to_minor",
]
