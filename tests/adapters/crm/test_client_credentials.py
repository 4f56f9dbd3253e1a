"""Refused credentials are an outage of the org, not a refusal of each command.

During a secret rotation (or with a wrong secret) every call fails alike; as
`UpstreamUnavailable` the system actor's breaker counts them and opens, and
commands wait for the fix instead of each being dead-lettered.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from adapters.crm import views as v
from adapters.crm.client import SalesforceClient
from adapters.serving import serve
from broker.errors import UpstreamUnavailable
from tests.adapters.crm.harness import Org, settings

pytestmark = pytest.mark.anyio


async def test_a_wrong_client_secret_is_unavailable_naming_the_system(
    org: Org,
) -> None:
    """400 invalid_client at login → UpstreamUnavailable, the secret unsaid."""
    secret = "wrong-secret-3f9a1c"
    client = SalesforceClient(settings(org.url, client_secret=secret), system="crm_eu")
    async with client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.get(v.Account, "001000000000000AAA")
    error = caught.value
    assert error.system == "crm_eu"
    assert str(error).startswith("crm_eu unavailable: its credentials were refused")
    assert "invalid_client" in str(error)
    assert secret not in str(error)
    assert org.sandbox.state()["auth_refused"] == 1


async def test_a_secret_rotated_under_a_running_client_is_unavailable(
    org: Org,
) -> None:
    """Session expired, new token refused: the commands wait; the fix heals it."""
    account_id = org.sandbox.seed_account("Acme")
    await org.client.get(v.Account, account_id)
    org.sandbox.rotate_client_secret("rotated-secret")
    org.sandbox.expire_tokens()

    with pytest.raises(UpstreamUnavailable, match="credentials were refused"):
        await org.client.get(v.Account, account_id)

    org.sandbox.rotate_client_secret("sandbox-client-secret")
    again = await org.client.get(v.Account, account_id)
    assert again.Id == account_id


@pytest.fixture
async def refusing_api() -> AsyncIterator[str]:
    """A login that grants tokens, and an API that answers 401 to every one."""

    async def token(request: web.Request) -> web.Response:
        instance = str(request.url.origin())
        return web.json_response(
            {"access_token": "t0k3n", "instance_url": instance, "token_type": "Bearer"}
        )

    async def api(request: web.Request) -> web.Response:
        return web.json_response(
            [
                {
                    "message": "Session expired or invalid",
                    "errorCode": "INVALID_SESSION_ID",
                }
            ],
            status=401,
        )

    app = web.Application()
    app.router.add_post("/services/oauth2/token", token)
    app.router.add_get("/services/data/{path:.*}", api)
    runner, url = await serve(app, "127.0.0.1", 0)
    try:
        yield url
    finally:
        await runner.cleanup()


async def test_a_401_that_a_new_token_does_not_cure_is_unavailable(
    refusing_api: str,
) -> None:
    """One new token and one more try, then UpstreamUnavailable: not a refusal."""
    async with SalesforceClient(settings(refusing_api), system="crm") as client:
        with pytest.raises(UpstreamUnavailable) as caught:
            await client.get(v.Account, "001000000000000AAA")
    assert "credentials were refused" in str(caught.value)
    assert "HTTP 401 INVALID_SESSION_ID" in str(caught.value)
