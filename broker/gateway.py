"""System actors: one per external system, running its connector for each command.

A system actor consumes ``q2c.sys.<system>`` and, for every command on it,
calls the system through its `Connector`, politely and durably:

1. **Intake.** Deliveries come in batches (never more unacknowledged than
   ``prefetch``). Each is decoded; anything malformed, oversize, of unknown
   type or schema-invalid is dead-lettered (original bytes, reason) and
   never reaches the connector. The batch's idempotency keys are looked up
   in the inbox (consumer ``sys.<system>``) in one read: a command already
   completed is acknowledged as a duplicate without calling the system.
2. **Calls.** ``concurrency`` workers take the commands in order. Each
   worker holds its slot, waits for a token (from the system's bucket in
   the store, shared by every daemon, `broker.shared_bucket`; or with
   ``shared-rate = false`` from this daemon's `TokenBucket`), and
   calls ``connector.handle`` under ``call_timeout_s``. The slot is taken
   before the token so that tokens never pile up behind busy slots: call
   *starts* keep to the rate even when the system is slow.
3. **Commit.** Outcomes that finish together are written in one
   ``commit_batch``: the inbox keys of completed commands with their result
   events (outbox rows to ``q2c.events``), retries (outbox rows to a
   ``q2c.retry.<delay>`` tier), dead letters and one journal row each. The
   rows go to the relay, then each delivery is acknowledged.
4. **Circuit breaker.** After ``breaker_failures`` failed calls in a row
   the actor cancels its consumer: commands not yet called return to the
   queue (RabbitMQ keeps them, memory stays flat), calls in flight finish
   and are committed. After the reset time it consumes again with prefetch
   1 and lets exactly one probe through: success closes the breaker, failure
   opens it again for longer.
5. **Pause.** An operator's ``brokerctl pause <system>`` stores a pause
   (`broker.store.SystemPause`) that every daemon sharing the store reads
   within ``pause_poll_s`` (the daemon that stored it at once). While it
   lasts the actor cancels its consumer, as an open breaker does, and does
   not subscribe again until ``brokerctl resume``. A store outage while
   polling keeps the last state read.

Redelivery is safe: a command's key is claimed in the transaction that
writes its results, so a crash after the call but before the commit calls
the system again *with the same idempotency key* (the vendor's facility
makes that one effect) and yields the same result ids (derived from the
key), which the readers' inboxes deduplicate. On failure: the system being
down or slow (`UpstreamUnavailable`, a timeout) and any unexpected
exception from the connector send the command through the retry tiers and
count against the breaker; a refusal (`UpstreamRejected`, any
`PermanentError`) dead-letters it at once; a store outage longer than
``commit-deadline-s`` crashes the actor, and the broker redelivers what it
had not acknowledged.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, final

import anyio
import structlog
from msgspec import Meta

from broker.config import Section
from broker.connector import Connector
from broker.errors import (
    ConfigError,
)
from broker.limits import BreakerState, CircuitBreaker, TokenBucket
from broker.shared_bucket import SharedTokenBucket
from broker.store import SystemPause
from broker.supervision import ChildSpec
from broker.system_actor import SystemActor

if TYPE_CHECKING:
    from broker.runtime import Runtime

__all__ = ["GatewaySettings", "SystemGateway", "SystemActor", "system_actor_spec"]

_BREAKER_GAUGE = {
    BreakerState.CLOSED: 0,
    BreakerState.HALF_OPEN: 1,
    BreakerState.OPEN: 2,
}

Positive = Annotated[float, Meta(gt=0)]

_log = structlog.get_logger(__name__)


class GatewaySettings(Section, frozen=True):
    """How a system actor treats its system; the gateway keys of ``[systems.<name>]``.

    Attributes:
        rate_per_s: calls started per second, on average (token bucket refill).
        burst: calls that may start back to back (token bucket size).
        concurrency: calls in flight at most.
        call_timeout_s: a call not answered by then counts as the system
            being unavailable.
        breaker_failures: failed calls in a row that open the breaker.
        breaker_reset_s: how long the breaker stays open the first time.
        breaker_reset_max_s: the cap on that time as failed probes double it.
        prefetch: unacknowledged deliveries at most. Keep it near
            ``concurrency``: the deliveries not called yet go back to the
            queue whenever the breaker opens, and on a quorum queue each
            return counts towards the ``delivery-limit`` backstop.
        batch_linger_s: how long a finished call waits for others still in
            flight, so that their outcomes share one commit.
        pause_poll_s: how often the actor reads the store for a pause
            (``brokerctl pause``), so that a pause stored by any daemon
            reaches it within this long.
        shared_rate: count ``rate_per_s`` and ``burst`` across every daemon
            sharing the store (`broker.shared_bucket`), as the vendor
            counts them; false gives each daemon a bucket of its own.
    """

    rate_per_s: Positive = 10.0
    burst: Annotated[int, Meta(ge=1)] = 10
    concurrency: Annotated[int, Meta(ge=1, le=1024)] = 4
    call_timeout_s: Positive = 30.0
    breaker_failures: Annotated[int, Meta(ge=1)] = 5
    breaker_reset_s: Positive = 30.0
    breaker_reset_max_s: Positive = 300.0
    prefetch: Annotated[int, Meta(ge=1, le=65_535)] = 8
    batch_linger_s: Annotated[float, Meta(ge=0, le=1)] = 0.005
    pause_poll_s: Annotated[float, Meta(gt=0, le=3600)] = 2.0
    shared_rate: bool = True

    def __post_init__(self) -> None:
        if self.breaker_reset_max_s < self.breaker_reset_s:
            raise ValueError("breaker-reset-max-s must be at least breaker-reset-s")


@final
class SystemGateway:
    """One system's actor spec, with what outlives the actor's restarts.

    The token bucket, the circuit breaker and the counters live here, so a
    restarted actor neither bursts past the rate nor forgets that the system
    is down. `status` reads them for ``brokerctl``.

    Args:
        rt: the daemon's runtime; its store and transport are read when the
            actor starts.
        connector: the system's connector.
        settings: rate, concurrency, timeout, breaker and batching.
        clock: monotonic seconds for the bucket and the breaker.
        sleep: how the actor waits for a token or for the breaker's reset;
            tests inject a fake clock's sleep.
        rand: ``[0, 1)`` for the breaker's jitter.

    Raises:
        ConfigError: the system is not in ``[topology] systems``, so its
            queue is not declared.
    """

    def __init__(
        self,
        rt: Runtime,
        connector: Connector,
        settings: GatewaySettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        system = connector.system
        if system not in rt.cfg.topology.systems:
            raise ConfigError(
                f"system {system!r} has a connector but is not in [topology] "
                f"systems, so its queue q2c.sys.{system} is not declared"
            )
        self.rt = rt
        self.connector = connector
        self.settings = settings
        self.system = system
        self.id = f"sys.{system}"
        self.queue = f"q2c.sys.{system}"
        self.sleep = sleep
        #: The system's call rate: its bucket in the store, shared by every
        #: daemon, or (``shared-rate = false``) this daemon's own.
        self.rate: SharedTokenBucket | TokenBucket
        if settings.shared_rate:

            async def take(want: int) -> tuple[int, float]:
                return await rt.store.take_tokens(
                    system, want, rate_per_s=settings.rate_per_s, burst=settings.burst
                )

            self.rate = SharedTokenBucket(
                take,
                rate_per_s=settings.rate_per_s,
                burst=settings.burst,
                clock=clock,
                sleep=sleep,
            )
        else:
            self.rate = TokenBucket(settings.rate_per_s, settings.burst, clock=clock)
        self.breaker = CircuitBreaker(
            settings.breaker_failures,
            settings.breaker_reset_s,
            settings.breaker_reset_max_s,
            clock=clock,
            rand=rand,
        )
        #: Calls by outcome: ok, rejected, invalid, unavailable, timeout, error.
        self.calls: dict[str, int] = {}
        #: Commands by outcome: completed, duplicate, retry_scheduled,
        #: dead_lettered, returned (given back to the queue uncalled).
        self.commands: dict[str, int] = {}
        self.in_flight = 0
        self.held = 0  # deliveries taken and not yet acknowledged or returned
        self.prefetch = 0  # of the current subscription; 0 while not consuming
        #: The operator's pause of this system, as last read; None: not paused.
        self.pause: SystemPause | None = None
        #: Counts `set_pause` calls: a poll that started before one of them
        #: read an older state and is dropped.
        self.pause_generation = 0
        #: Called when `pause` begins or ends; set by the running actor.
        self.on_pause_change: Callable[[], None] | None = None
        m = rt.metrics
        self._m_in_flight = m.gateway_in_flight.labels(system)
        self._m_breaker = m.gateway_breaker_state.labels(system)
        self._m_opened = m.gateway_breaker_opened.labels(system)
        rt.system_status[system] = self.status
        rt.system_pause[system] = self.set_pause

    def spec(self) -> ChildSpec:
        """The supervised child: id ``sys.<system>``, permanent, the daemon's grace."""
        return ChildSpec(
            id=self.id,
            start=lambda: SystemActor(self),
            shutdown_s=self.rt.cfg.daemon.shutdown_s,
        )

    def status(self) -> dict[str, Any]:
        """Breaker, pause, consumer, calls and counters as plain data."""
        return {
            "system": self.system,
            "queue": self.queue,
            "breaker": self.breaker.status(),
            "paused": _pause_view(self.pause),
            "consuming": self.prefetch > 0,
            "prefetch": self.prefetch,
            "in_flight": self.in_flight,
            "held": self.held,
            "tokens": round(self.rate.tokens, 2),
            "rate_shared": isinstance(self.rate, SharedTokenBucket),
            "calls": dict(self.calls),
            "commands": dict(self.commands),
        }

    async def take_token(self) -> None:
        """Wait until the rate admits one more call start, and take it."""
        if isinstance(self.rate, SharedTokenBucket):
            await self.rate.take()
            return
        while (delay := self.rate.try_take()) > 0:
            await self.sleep(delay)

    def count_call(self, outcome: str) -> None:
        """Count one call's outcome, here and in the metrics."""
        self.calls[outcome] = self.calls.get(outcome, 0) + 1
        self.rt.metrics.gateway_calls.labels(self.system, outcome).inc()

    def count_commands(self, outcome: str, n: int = 1) -> None:
        """Count *n* commands' outcome, here and in the metrics."""
        self.commands[outcome] = self.commands.get(outcome, 0) + n
        self.rt.metrics.gateway_commands.labels(self.system, outcome).inc(n)

    def calling(self, delta: int) -> None:
        """Track calls in flight."""
        self.in_flight += delta
        self._m_in_flight.set(self.in_flight)

    def set_pause(self, pause: SystemPause | None) -> None:
        """Take *pause* (None: not paused) as this system's state; tell the actor.

        The beginning and the end of a pause are logged, with who paused and why.
        """
        was, self.pause = self.pause, pause
        self.pause_generation += 1
        if (was is None) == (pause is None):
            return
        if pause is not None:
            _log.warning(
                "system_paused",
                system=self.system,
                reason=pause.reason,
                paused_by=pause.paused_by,
                since=pause.since.isoformat(),
            )
        else:
            _log.info("system_resumed", system=self.system)
        if self.on_pause_change is not None:
            self.on_pause_change()

    def breaker_changed(self, *, opened: bool = False) -> None:
        """Publish the breaker's state to the metrics."""
        self._m_breaker.set(_BREAKER_GAUGE[self.breaker.state])
        if opened:
            self._m_opened.inc()

    def __repr__(self) -> str:
        return (
            f"<SystemGateway {self.system} {self.breaker.state.value} "
            f"{self.in_flight}/{self.settings.concurrency} in flight>"
        )


def _pause_view(pause: SystemPause | None) -> dict[str, str] | None:
    if pause is None:
        return None
    return {
        "reason": pause.reason,
        "paused_by": pause.paused_by,
        "since": pause.since.isoformat(),
    }


def system_actor_spec(
    rt: Runtime, connector: Connector, settings: GatewaySettings
) -> ChildSpec:
    """The supervised system actor for *connector*'s system.

    Raises:
        ConfigError: the system is not in ``[topology] systems``.
    """
    return SystemGateway(rt, connector, settings).spec()
