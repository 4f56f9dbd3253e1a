"""When to try again, and how long to wait.

Two kinds of retry live here. A message that failed transiently goes back
to the broker through a retry tier (`RetryPolicy`): a TTL queue per delay,
so nothing waits in the daemon's memory and a restart loses no timer. An
operation the daemon itself repeats (a batch commit while Postgres restarts,
a reconnect) backs off in process (`Backoff`): exponential, capped, with
jitter so that many shards do not retry in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

__all__ = ["Backoff", "RetryPolicy"]


class RetryPolicy:
    """Which retry tier a failed delivery goes to, given its attempt number.

    Attempt *n* (1 for the first delivery) that fails goes to tier
    ``min(n - 1, last)``: the tiers grow (5 s, 60 s, 600 s by default), so
    the delay is exponential in spirit. After ``max_attempts`` failed
    attempts the message is dead-lettered with reason ``attempts_exhausted``.
    """

    def __init__(
        self,
        tiers_s: Sequence[float],
        *,
        max_attempts: int,
        wait_max_s: float = 7 * 86_400.0,
    ) -> None:
        if not tiers_s:
            raise ValueError("at least one retry tier is needed")
        self._tiers = tuple(tiers_s)
        self.max_attempts = max_attempts
        #: How long a message may keep failing without spending attempts
        #: (`TransientError.spends_attempts` false) before it is dead-lettered.
        self.wait_max_s = wait_max_s

    def tier_for(self, attempt: int) -> float | None:
        """The delay tier after failed *attempt*; None once attempts are exhausted."""
        if attempt >= self.max_attempts:
            return None
        return self.delay_for(attempt)

    def delay_for(self, attempt: int) -> float:
        """The delay tier after failed *attempt*, however many there were."""
        return self._tiers[min(max(attempt, 1) - 1, len(self._tiers) - 1)]

    def wait_for(self, waits: int, since: int, now: int) -> float | None:
        """The delay tier for the *waits*-th failure in a run that spends time.

        *since* is when (epoch seconds) the run of such failures began, *now*
        the present; None once the run is older than `wait_max_s`.
        """
        if now - since > self.wait_max_s:
            return None
        return self.delay_for(waits)

    def __repr__(self) -> str:
        return f"<RetryPolicy tiers={self._tiers} max_attempts={self.max_attempts}>"


class Backoff:
    """Exponential back-off with full jitter, for loops the daemon runs itself."""

    def __init__(
        self,
        initial_s: float,
        cap_s: float,
        *,
        jitter: float = 0.2,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._initial_s = initial_s
        self._cap_s = cap_s
        self._jitter = jitter
        self._rand = rand
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next try; grows until the cap."""
        # The exponent stops growing long before float overflow (2.0**1024)
        # would: a breaker or a loop that has waited days keeps its cap.
        base = min(self._cap_s, self._initial_s * 2.0 ** min(self.attempt, 64))
        self.attempt += 1
        return base * (1 - self._jitter * self._rand())

    def reset(self) -> None:
        """Start over after a success."""
        self.attempt = 0
