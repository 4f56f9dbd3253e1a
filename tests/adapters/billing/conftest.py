"""A running Stripe sandbox, a client on it, and a webhook receiver."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest
from aiohttp import web

from adapters.billing import StripeClient, StripeSandbox, StripeSettings

API_KEY = "sk_test_sandbox"


class Receiver:
    """An HTTP endpoint that records every webhook it is sent.

    The first ``fail_first`` requests are answered 500; after that, 200.
    """

    def __init__(self) -> None:
        self.fail_first = 0
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    @property
    def accepted(self) -> list[tuple[dict[str, str], bytes]]:
        """Requests answered 200, in arrival order."""
        return self.requests[self.fail_first :]

    def event_types(self) -> list[str]:
        """Types of the accepted events."""
        return [msgspec.json.decode(body)["type"] for _, body in self.accepted]

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append((dict(request.headers), await request.read()))
        if len(self.requests) <= self.fail_first:
            return web.Response(status=500)
        return web.Response(status=200)

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        app = web.Application()
        app.router.add_post("/hooks/stripe", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hooks/stripe"

    async def aclose(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def sandbox() -> AsyncIterator[StripeSandbox]:
    sb = StripeSandbox(api_keys=(API_KEY,))
    await sb.start()
    try:
        yield sb
    finally:
        await sb.aclose()


@pytest.fixture
async def client(sandbox: StripeSandbox) -> AsyncIterator[StripeClient]:
    assert sandbox.url is not None
    settings = StripeSettings(api_key=API_KEY, base_url=sandbox.url, timeout_s=5)
    async with StripeClient(settings) as c:
        yield c


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    try:
        yield r
    finally:
        await r.aclose()
