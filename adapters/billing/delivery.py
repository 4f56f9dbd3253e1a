"""Webhook delivery as Stripe does it, for the sandbox.

Each event is POSTed as JSON to the endpoint URL with a ``Stripe-Signature``
header signed at send time (one ``v1`` per active endpoint secret, so a
rotation shows several). A non-2xx answer, a timeout or a refused connection
is retried with exponential back-off up to ``max_attempts`` times, then given
up. Deliveries run on a few concurrent workers, so events may arrive out of
order, and with ``duplicate_rate`` an event is delivered a second time (same
``id``, fresh signature), as Stripe's at-least-once delivery can.

The queue is bounded: when it is full the event is dropped and counted,
rather than buffering without end.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

import aiohttp
import anyio
import msgspec
from anyio.abc import ObjectReceiveStream

from adapters.billing.signature import HEADER, sign
from adapters.billing.views import Event

__all__ = ["WebhookEndpoint", "WebhookSender"]


class WebhookEndpoint(msgspec.Struct, kw_only=True):
    """Where and how to deliver; mutable so a test can rotate secrets mid-run.

    Attributes:
        url: the receiver; None delivers nothing.
        secrets: the active signing secrets, newest first.
        max_attempts: tries per delivery before giving up.
        backoff_s: pause after the first failure; doubles each time.
        backoff_cap_s: longest pause between tries.
        timeout_s: per attempt.
    """

    url: str | None = None
    secrets: list[str] = msgspec.field(default_factory=lambda: ["whsec_sandbox"])
    max_attempts: int = 5
    backoff_s: float = 0.05
    backoff_cap_s: float = 2.0
    timeout_s: float = 5.0


class WebhookSender:
    """Background delivery of events to a `WebhookEndpoint`.

    Start it inside the event loop with `start`; `aclose` cancels pending
    deliveries (retries included) and closes its HTTP session.
    """

    def __init__(
        self,
        endpoint: WebhookEndpoint,
        *,
        counts: Counter[str],
        duplicate_rate: Callable[[], float],
        clock: Callable[[], float],
        seed: int = 0,
        queue_size: int = 1000,
        workers: int = 4,
    ) -> None:
        self.endpoint = endpoint
        self._counts = counts
        self._duplicate_rate = duplicate_rate
        self._clock = clock
        self._rng = random.Random(f"stripe-webhooks-{seed}")
        self._send, self._receive = anyio.create_memory_object_stream[Event](queue_size)
        self._workers = workers
        self._scope = anyio.CancelScope()
        self._done = anyio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    def submit(self, event: Event) -> None:
        """Queue *event* for delivery; drop (and count) it if the queue is full."""
        if self.endpoint.url is None:
            return
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self._counts["webhooks_dropped"] += 1

    async def start(self) -> None:
        """Start the workers; must run inside the event loop."""
        self._session = aiohttp.ClientSession()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def aclose(self) -> None:
        """Cancel deliveries in progress and release the session."""
        self._scope.cancel()
        if self._task is not None:
            await self._done.wait()
        self._send.close()
        self._receive.close()
        if self._session is not None:
            await self._session.close()

    async def _run(self) -> None:
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    for _ in range(self._workers):
                        tg.start_soon(self._worker, self._receive.clone())
        finally:
            self._done.set()

    async def _worker(self, receive: ObjectReceiveStream[Event]) -> None:
        async with receive:
            async for event in receive:
                body = msgspec.json.encode(event)
                await self._attempts(body)
                if self._rng.random() < self._duplicate_rate():
                    self._counts["webhook_duplicates_sent"] += 1
                    await self._attempts(body)

    async def _attempts(self, body: bytes) -> None:
        endpoint = self.endpoint
        for attempt in range(1, endpoint.max_attempts + 1):
            if await self._post(body):
                self._counts["webhooks_delivered"] += 1
                return
            self._counts["webhook_attempts_failed"] += 1
            if attempt < endpoint.max_attempts:
                pause = endpoint.backoff_s * 2 ** (attempt - 1)
                await anyio.sleep(min(pause, endpoint.backoff_cap_s))
        self._counts["webhooks_gave_up"] += 1

    async def _post(self, body: bytes) -> bool:
        endpoint, session = self.endpoint, self._session
        if endpoint.url is None or session is None or not endpoint.secrets:
            return False
        first, *others = endpoint.secrets
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            HEADER: sign(body, first, int(self._clock()), extra_secrets=others),
        }
        try:
            with anyio.fail_after(endpoint.timeout_s):
                async with session.post(
                    endpoint.url, data=body, headers=headers
                ) as resp:
                    await resp.read()
                    return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False
