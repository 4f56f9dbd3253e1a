"""The HTTP surface: webhook ingress, the process API, health and metrics.

`server` runs it (`HttpServer`, an actor child of the daemon's root), `api`
holds the process API's types and its OpenAPI document, `ingress` turns
vendor events into envelopes on ``q2c.events`` (for webhooks and pollers).
"""

from __future__ import annotations

from broker.http.api import (
    API_PREFIX,
    OPENAPI_PATH,
    WEBHOOK_PATH,
    ApiError,
    ApiRequest,
    ApiResponse,
    ApiRoute,
    ErrorBody,
    RouteHandler,
    WebhookAccepted,
    openapi_document,
)
from broker.http.ingress import (
    Refused,
    inbound_message,
    keep_refused,
    publish_inbound,
    webhook_message_id,
)
from broker.http.server import HttpServer

__all__ = [
    "API_PREFIX",
    "OPENAPI_PATH",
    "WEBHOOK_PATH",
    "ApiError",
    "ApiRequest",
    "ApiResponse",
    "ApiRoute",
    "ErrorBody",
    "HttpServer",
    "Refused",
    "RouteHandler",
    "WebhookAccepted",
    "inbound_message",
    "openapi_document",
    "keep_refused",
    "publish_inbound",
    "webhook_message_id",
]
