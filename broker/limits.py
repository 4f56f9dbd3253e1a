"""What a system actor uses to be a polite client: a token bucket and a circuit breaker.

Both are plain state machines over an injected monotonic clock, with no
I/O and no waiting of their own: the system actor (`broker.gateway`) asks
them what to do and does the waiting, so tests drive them with a fake clock
and never sleep.

* `TokenBucket` spaces out the *starts* of calls: ``burst`` calls at once,
  then ``rate_per_s`` on average.
* `CircuitBreaker` counts consecutive failed calls. At ``failures`` it
  opens: the actor stops consuming the system's queue for ``reset_s``, then
  lets one probe call through (half-open). A good probe closes it; a bad one
  opens it again for longer (exponential back-off with jitter, capped).
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable
from typing import Any, final

from broker.retry import Backoff

__all__ = ["BreakerState", "CircuitBreaker", "TokenBucket"]


@final
class TokenBucket:
    """Admits ``burst`` calls at once and ``rate_per_s`` calls per second on average.

    The bucket starts full. Each call takes one token; tokens come back at
    ``rate_per_s`` up to ``burst``.

    Args:
        rate_per_s: tokens added per second.
        burst: the bucket's size: how many calls may start back to back (a
            fractional size suits a rate below one call per second).
        clock: monotonic seconds; inject a fake one in tests.

    Raises:
        ValueError: a rate or burst that is not positive.
    """

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(
                f"a token bucket needs rate_per_s > 0 and burst >= 1, "
                f"not {rate_per_s} and {burst}"
            )
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    @property
    def tokens(self) -> float:
        """Tokens available now (fractional while refilling)."""
        self._refill()
        return self._tokens

    def try_take(self) -> float:
        """Take a token if one is there.

        Returns:
            0.0 when a token was taken; otherwise how many seconds until one
            will be there (nothing is reserved: ask again then).
        """
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._at
        if elapsed > 0:
            self._tokens = min(
                float(self.burst), self._tokens + elapsed * self.rate_per_s
            )
        self._at = now

    def __repr__(self) -> str:
        return f"<TokenBucket {self.tokens:.2f}/{self.burst} at {self.rate_per_s:g}/s>"


class BreakerState(enum.Enum):
    """Where a circuit breaker is."""

    CLOSED = "closed"  # calls flow; consecutive failures are counted
    OPEN = "open"  # no calls until the reset time has passed
    HALF_OPEN = "half_open"  # one probe call decides


@final
class CircuitBreaker:
    """Opens after ``failures`` consecutive failed calls; one probe closes it again.

    Args:
        failures: consecutive failures that open a closed breaker.
        reset_s: how long it stays open the first time.
        max_reset_s: the cap on how long it stays open after failed probes.
        clock: monotonic seconds; inject a fake one in tests.
        rand: ``[0, 1)`` for the jitter; inject a constant in tests.

    Raises:
        ValueError: ``failures`` below 1, or reset times that are not positive.
    """

    def __init__(
        self,
        failures: int,
        reset_s: float,
        max_reset_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if failures < 1 or reset_s <= 0 or max_reset_s < reset_s:
            raise ValueError(
                "a circuit breaker needs failures >= 1 and 0 < reset_s <= max_reset_s"
            )
        self.failures = failures
        self._clock = clock
        # Each failed probe waits about twice as long as the last one, with
        # jitter so that the daemons sharing a system do not probe in step.
        self._backoff = Backoff(reset_s, max_reset_s, rand=rand)
        self.state = BreakerState.CLOSED
        #: Failed calls in a row (any state); a success sets it back to 0.
        self.consecutive_failures = 0
        #: How often the breaker opened (including re-opens after a failed probe).
        self.opened = 0
        #: How long the current (or last) open period lasts.
        self.reset_s = 0.0
        self._opened_at = 0.0

    def record_success(self) -> bool:
        """Record a call the system answered; return True if that closed the breaker.

        A success while open (a call that started before it opened) counts
        for nothing but the failure streak: only a probe closes the breaker.
        """
        self.consecutive_failures = 0
        if self.state is BreakerState.HALF_OPEN:
            self.state = BreakerState.CLOSED
            self._backoff.reset()
            return True
        return False

    def record_failure(self) -> bool:
        """Record a failed call; return True if that opened the breaker."""
        self.consecutive_failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED
            and self.consecutive_failures >= self.failures
        ):
            self._open()
            return True
        return False

    def retry_in_s(self) -> float:
        """Seconds until a probe may go out: 0.0 unless open."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.reset_s - self._clock())

    def half_open(self) -> None:
        """Let one probe through: move an open breaker to half-open.

        Raises:
            RuntimeError: the breaker is not open.
        """
        if self.state is not BreakerState.OPEN:
            raise RuntimeError(f"a {self.state.value} breaker cannot go half-open")
        self.state = BreakerState.HALF_OPEN

    def status(self) -> dict[str, Any]:
        """The breaker as plain data, for status replies."""
        return {
            "state": self.state.value,
            "consecutive_failures": self.consecutive_failures,
            "failures_to_open": self.failures,
            "opened": self.opened,
            "reset_s": round(self.reset_s, 3),
            "retry_in_s": round(self.retry_in_s(), 3),
        }

    def _open(self) -> None:
        self.state = BreakerState.OPEN
        self.opened += 1
        self.reset_s = self._backoff.next_delay()
        self._opened_at = self._clock()

    def __repr__(self) -> str:
        return (
            f"<CircuitBreaker {self.state.value} "
            f"{self.consecutive_failures}/{self.failures} failures>"
        )
