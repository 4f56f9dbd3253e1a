"""Q2C Broker's engine: the public surface for ``actors/`` and ``adapters/``.

Everything the application needs from the runtime is imported from here;
the modules behind it are internal.
"""

from __future__ import annotations

# Actors and supervision
from broker.actor import Actor, ActorRef, Context
from broker.app import Daemon
from broker.config import Config, load_config

# Webhooks and the process API
from broker.connector import Inbound, WebhookSource

# Errors
from broker.errors import (
    BrokerError,
    ConfigError,
    PermanentError,
    RetryLater,
    SchemaInvalid,
    SignatureInvalid,
    TransientError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.http import ApiError, ApiRequest, ApiResponse, RouteHandler
from broker.runtime import Runtime
from broker.supervision import ChildSpec, Restart, Strategy, SupervisorSpec

# Workflows
from broker.workflow import Applied, Emit, Workflow
from broker.xref import XrefConflict, XrefEntry

__all__ = [
    # Actors and supervision
    "Actor",
    "ActorRef",
    "Context",
    "ChildSpec",
    "Restart",
    "Strategy",
    "SupervisorSpec",
    # Workflows and the runtime
    "Applied",
    "Emit",
    "Workflow",
    "Runtime",
    "XrefConflict",
    "XrefEntry",
    "Daemon",
    "Config",
    "load_config",
    # Webhooks and the process API
    "Inbound",
    "WebhookSource",
    "ApiError",
    "ApiRequest",
    "ApiResponse",
    "RouteHandler",
    # Errors
    "BrokerError",
    "ConfigError",
    "PermanentError",
    "RetryLater",
    "SchemaInvalid",
    "SignatureInvalid",
    "TransientError",
    "UpstreamRejected",
    "UpstreamUnavailable",
]
