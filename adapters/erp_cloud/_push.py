"""The sandbox's outbound side: business events pushed to a webhook, with retries.

Internal: used by `adapters.erp_cloud.sandbox` only. Each delivery is one
structured-mode CloudEvent POSTed with ``Content-Type:
application/cloudevents+json`` and signed with ``X-Q2C-Signature`` (see
`adapters.erp_cloud.signature`), like SAP Event Mesh's webhook deliveries to
the broker. A receiver that answers anything but 2xx (or cannot be reached)
gets the same event again, same ``id``, after an exponential back-off, up to
a bounded number of attempts; then the event is dropped and counted.
Deliveries run in background tasks so request handling never waits on them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import msgspec

from adapters import signing as signature
from adapters.erp_cloud import edm

__all__ = ["PushSettings", "PushStats", "Pusher"]

_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True, kw_only=True)
class PushSettings:
    """Where and how to deliver, read from the knobs at each attempt's start."""

    url: str
    secrets: tuple[str, ...]
    max_attempts: int
    backoff_s: float
    timeout_s: float = 5.0


@dataclass(kw_only=True)
class PushStats:
    """Counters for ``GET /_sandbox/state``."""

    delivered: int = 0
    failed_attempts: int = 0
    dropped: int = 0


class Pusher:
    """Runs delivery jobs in background tasks; `aclose` cancels what is left."""

    def __init__(self, settings: Callable[[], PushSettings | None]) -> None:
        self._settings = settings
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._crashed: list[asyncio.Task[None]] = []
        self.stats = PushStats()

    def spawn(self, job: Coroutine[Any, Any, None]) -> None:
        """Run *job* in the background; it is cancelled by `aclose`."""
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._crashed.append(task)

    @property
    def pending(self) -> int:
        """Jobs still running."""
        return len(self._tasks)

    async def deliver(self, event: msgspec.Struct) -> bool:
        """POST *event* until a 2xx answer or the attempts run out.

        Returns:
            Whether the receiver accepted it. False also when no push URL is set.
        """
        body = edm.encode(event)
        attempt = 0
        while True:
            settings = self._settings()
            if settings is None:
                return False
            attempt += 1
            if await self._attempt(settings, body):
                self.stats.delivered += 1
                return True
            self.stats.failed_attempts += 1
            if attempt >= settings.max_attempts:
                self.stats.dropped += 1
                return False
            delay = min(settings.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
            await anyio.sleep(delay)

    async def _attempt(self, settings: PushSettings, body: bytes) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {
            "Content-Type": "application/cloudevents+json",
            signature.HEADER: signature.sign(
                settings.secrets, body, timestamp=int(time.time())
            ),
        }
        try:
            async with self._session.post(
                settings.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=settings.timeout_s),
            ) as response:
                await response.read()
                return 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def aclose(self) -> None:
        """Cancel running jobs and close the HTTP session.

        Raises:
            Exception: the first error a job crashed with (a bug in the job),
                once everything is closed.
        """
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # Waits for the cancelled tasks to finish; their outcomes are read
        # through _finished, so nothing is lost by collecting them here.
        if tasks:
            await asyncio.wait(tasks)
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._crashed:
            crashed, self._crashed = self._crashed, []
            raise crashed[0].exception() or RuntimeError("push job crashed")
