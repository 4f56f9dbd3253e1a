"""A running sandbox org with a client on it, for the CRM and CPQ tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from adapters.crm.client import SalesforceClient, SalesforceSettings
from adapters.crm.sandbox import SalesforceSandbox
from canonical import Envelope

CLIENT_ID = "q2c-broker"
CLIENT_SECRET = "sandbox-client-secret"


@dataclass(frozen=True)
class Org:
    """The sandbox, its base URL and a client logged in as the broker."""

    sandbox: SalesforceSandbox
    url: str
    client: SalesforceClient


def settings(url: str, **overrides: Any) -> SalesforceSettings:
    values: dict[str, Any] = {
        "login_url": url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "timeout_s": 5.0,
        "default_currency": "EUR",
        **overrides,
    }
    return SalesforceSettings(**values)


@asynccontextmanager
async def running_org(**sandbox_args: Any) -> AsyncIterator[Org]:
    sandbox = SalesforceSandbox(
        client_id=CLIENT_ID, client_secret=CLIENT_SECRET, **sandbox_args
    )
    url = await sandbox.start()
    try:
        async with SalesforceClient(settings(url)) as client:
            yield Org(sandbox=sandbox, url=url, client=client)
    finally:
        await sandbox.aclose()


def envelope(type_: str, key: str, correlation_id: str = "deal-x") -> Envelope:
    return Envelope(
        id=f"msg-{key}",
        source="/q2c/test",
        type=type_,
        time=datetime(2026, 3, 1, tzinfo=UTC),
        correlation_id=correlation_id,
        idempotency_key=key,
    )
