"""A system's rate limit counted across every daemon that shares the store.

DESIGN §9: many daemons consume one system's queue, and the vendor's limit
is the system's, not each daemon's. `SharedTokenBucket` spends tokens taken
from the store's bucket for the system (`Store.take_tokens`), a few at a
time so that a call costs a round trip only when the daemon's handful runs
out: about a tenth of a second's worth at the configured rate, at most the
burst.

Tokens in hand lapse after ``hold_s``: a daemon that went quiet does not
come back with a pocketful and start them all at once. Together, N daemons
never start more than ``burst`` calls back to back plus ``rate_per_s`` a
second, plus at most one handful each.

While the store is unreachable the bucket waits and asks again, as every
other write of the system actor does; the calls it would admit could not
be committed meanwhile either.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import final

import anyio
import structlog

from broker.errors import StoreUnavailable

__all__ = ["SharedTokenBucket"]

_log = structlog.get_logger(__name__)

#: Seconds' worth of the rate a daemon takes from the store at a time.
HANDFUL_S = 0.1


@final
class SharedTokenBucket:
    """Admits one call start per token taken from the store's bucket.

    Args:
        take: ``take(want) -> (granted, wait_s)``, the store's
            ``take_tokens`` for this system, rate and burst.
        rate_per_s: the system's rate, for sizing a handful.
        burst: the bucket's size, which a handful never exceeds.
        clock: monotonic seconds; inject a fake one in tests.
        sleep: how to wait for a token or for the store.
        hold_s: how long tokens taken may wait in hand before they lapse.
        retry_s: the wait before asking an unreachable store again.
    """

    __slots__ = (
        "_clock",
        "_expires",
        "_failing",
        "_handful",
        "_held",
        "_hold_s",
        "_retry_s",
        "_sleep",
        "_take",
    )

    def __init__(
        self,
        take: Callable[[int], Awaitable[tuple[int, float]]],
        *,
        rate_per_s: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        hold_s: float = 1.0,
        retry_s: float = 0.5,
    ) -> None:
        self._take = take
        handful = math.ceil(rate_per_s * HANDFUL_S)
        self._handful = max(1, min(math.floor(burst), handful))
        self._clock = clock
        self._sleep = sleep
        self._hold_s = hold_s
        self._retry_s = retry_s
        self._held = 0
        self._expires = 0.0
        self._failing = False

    @property
    def tokens(self) -> int:
        """Tokens in hand that have not lapsed."""
        return self._held if self._clock() < self._expires else 0

    async def take(self) -> None:
        """Wait until a call may start; spend one token on it.

        Callers take turns (the system actor holds a lock around this).
        """
        while True:
            if self.tokens:
                self._held -= 1
                return
            try:
                granted, wait_s = await self._take(self._handful)
            except StoreUnavailable as exc:
                if not self._failing:  # once per outage, not every retry
                    _log.warning("rate_tokens_unavailable", error=str(exc))
                self._failing = True
                await self._sleep(self._retry_s)
                continue
            if self._failing:
                self._failing = False
                _log.info("rate_tokens_available")
            if granted:
                self._held, self._expires = granted, self._clock() + self._hold_s
            else:
                await self._sleep(max(wait_s, 0.001))

    def __repr__(self) -> str:
        return f"<SharedTokenBucket {self.tokens} in hand, handful {self._handful}>"
