"""The system actor's run: intake, calls and the breaker's sessions.

`broker.gateway` holds what outlives an incarnation (settings, token bucket,
breaker, counters: `SystemGateway`) and explains the whole; this module is
the actor a `SystemGateway` starts, one incarnation at a time. What it is
finished with goes to its `SystemCommit` (`broker.system_commit`), which
writes the outcomes and acknowledges the deliveries. Internal.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, final

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from broker.actor import Actor, Context
from broker.codec import (
    Decoders,
    decode_envelope,
)
from broker.errors import (
    MessageTooLarge,
    PermanentError,
    RetryLater,
    StoreUnavailable,
    TransientError,
    TransportUnavailable,
    UndecodableMessage,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.letters import WAITS_HEADER
from broker.limits import BreakerState
from broker.store import REPLAY_HEADER, OutboxRecord
from broker.system_commit import (
    Done,
    Kind,
    SystemCommit,
    attempt_of,
    follow_ups,
    inbox_key,
)
from broker.transport import Delivery, Subscription
from canonical.envelope import Envelope

if TYPE_CHECKING:
    from broker.gateway import SystemGateway

__all__ = ["SystemActor"]

#: Calls still running when a stop begins get this share of the shutdown
#: grace; the rest is for committing and acknowledging what finished.
_CALL_SHARE_OF_GRACE = 0.8


@final
class _Command:
    """A decoded command on its way to a call. Internal."""

    __slots__ = ("attempt", "command", "delivery", "envelope", "received")

    def __init__(
        self, delivery: Delivery, envelope: Envelope, command: Any, received: float
    ) -> None:
        self.delivery = delivery
        self.envelope = envelope
        self.command = command
        self.received = received
        self.attempt = attempt_of(delivery)

    @property
    def first_attempt(self) -> bool:
        """No earlier attempt can have reached the system.

        Not redelivered (a crash or a nack), not back from a retry tier
        (after a failure, or a wait: a call that timed out may have landed),
        not sent back from the dead letters by an operator.
        """
        d = self.delivery
        return (
            self.attempt == 1
            and not d.redelivered
            and not (
                d.headers and (REPLAY_HEADER in d.headers or WAITS_HEADER in d.headers)
            )
        )

    def done(self, kind: Kind, **kw: Any) -> Done:
        """This command, finished as *kind*, on its way into a commit."""
        return Done(kind, self.delivery, self.envelope, self.received, **kw)


@final
class _Session:
    """One subscription's life: from subscribe to close. Internal."""

    __slots__ = ("ending", "half_open", "probe_sent", "sub")

    def __init__(self, sub: Subscription, half_open: bool) -> None:
        self.sub = sub
        self.half_open = half_open
        self.probe_sent = False
        #: Why the session ends: stopping, breaker_open, recovered, probe_failed,
        #: subscription_lost, paused. None while it runs.
        self.ending: str | None = None


@final
class SystemActor(Actor[None]):
    """Carry out the commands on one system's queue through its connector.

    Owns: the subscription to ``q2c.sys.<system>``, the calls in flight and
    their commits. Takes no messages of its own: ``ask`` it anything for
    its status. See the module docs for why redelivery is safe and what
    happens on failure.
    """

    def __init__(self, gateway: SystemGateway) -> None:
        rt = gateway.rt
        self._gw = gateway
        self._rt = rt
        self._transport = rt.transport
        self._core = rt.cfg.core
        self._shutdown_s = rt.cfg.daemon.shutdown_s
        self._decoders = Decoders(gateway.connector.commands)
        self._source = f"/q2c/sys/{gateway.system}"
        self._token_lock = anyio.Lock()  # one token waiter sleeps at a time, FIFO
        # Keys called or being called and not yet committed; bounded by prefetch.
        self._in_flight_keys: set[str] = set()
        self._commits = SystemCommit(gateway, self._in_flight_keys)
        self._waits: set[anyio.CancelScope] = set()  # interrupted by a session end
        self._calls: set[anyio.CancelScope] = set()  # cut short at the stop deadline
        self._session: _Session | None = None
        self._stopping = False
        self._resumed: anyio.Event | None = None  # set when a pause ends
        # The work survives the stop request (a cancellation of the actor's
        # background tasks): it drains, within its own deadline.
        self._work_scope = anyio.CancelScope(shield=True)

    async def on_start(self, ctx: Context[None]) -> None:
        """Start consuming in the background, and watching for a pause."""
        self._gw.on_pause_change = self._pause_changed
        ctx.start_soon(self._work, ctx, name=f"{ctx.id}.work")
        ctx.start_soon(self._watch_for_stop, name=f"{ctx.id}.stop")
        ctx.start_soon(self._poll_pause, ctx, name=f"{ctx.id}.pause")

    async def handle(self, msg: None, ctx: Context[None]) -> dict[str, Any]:
        """Answer with the system's status (for ``ask``)."""
        return self._gw.status()

    def __repr__(self) -> str:
        return f"<SystemActor {self._gw!r}>"

    # -- stopping ------------------------------------------------------------

    async def _watch_for_stop(self) -> None:
        """Turn the cancellation of the background tasks into a drain."""
        try:
            await anyio.sleep_forever()
        finally:
            self._request_stop()

    def _request_stop(self) -> None:
        self._stopping = True
        now = anyio.current_time()
        self._work_scope.deadline = min(
            self._work_scope.deadline, now + self._shutdown_s
        )
        cut = now + self._shutdown_s * _CALL_SHARE_OF_GRACE
        for scope in self._calls:
            scope.deadline = min(scope.deadline, cut)
        self._end_session("stopping")
        self._interrupt()

    def _stopped(self) -> bool:
        return self._stopping

    def _end_session(self, reason: str) -> None:
        s = self._session
        if s is not None and s.ending is None:
            s.ending = reason
            self._interrupt()

    def _interrupt(self) -> None:
        for scope in self._waits:
            scope.cancel()

    @contextmanager
    def _interruptible(self, s: _Session | None = None) -> Iterator[anyio.CancelScope]:
        """A wait that a stop (or the end of session *s*) cancels."""
        with anyio.CancelScope() as scope:
            if self._stopping or (s is not None and s.ending is not None):
                scope.cancel()
            self._waits.add(scope)
            try:
                yield scope
            finally:
                self._waits.discard(scope)

    # -- pauses ------------------------------------------------------------------

    async def _poll_pause(self, ctx: Context[None]) -> None:
        """Read the store for this system's pause every ``pause_poll_s``."""
        while True:
            await anyio.sleep(self._gw.settings.pause_poll_s)
            await self._read_pause(ctx)

    async def _read_pause(self, ctx: Context[None]) -> None:
        """Take the stored pause; on a store outage keep the last one read."""
        gw = self._gw
        generation = gw.pause_generation
        try:
            pauses = await self._rt.store.system_pauses()
        except StoreUnavailable as exc:
            ctx.log.warning(
                "pause_poll_failed",
                system=gw.system,
                paused=gw.pause is not None,
                error=str(exc),
            )
            return
        if gw.pause_generation == generation:  # else the daemon applied a newer one
            gw.set_pause(pauses.get(gw.system))

    def _pause_changed(self) -> None:
        if self._gw.pause is not None:
            self._end_session("paused")
        elif self._resumed is not None:
            self._resumed.set()

    async def _wait_for_resume(self) -> None:
        with self._interruptible():
            while self._gw.pause is not None:
                self._resumed = anyio.Event()
                await self._resumed.wait()

    # -- the consumer's life ---------------------------------------------------

    async def _work(self, ctx: Context[None]) -> None:
        with self._work_scope:
            with self._interruptible():
                await self._read_pause(ctx)
            while not self._stopping:
                if self._gw.pause is not None:
                    await self._wait_for_resume()
                    continue
                breaker = self._gw.breaker
                if breaker.state is BreakerState.OPEN:
                    await self._wait_for_reset()
                    if self._stopped() or self._gw.pause is not None:
                        continue
                    breaker.half_open()
                    self._gw.breaker_changed()
                    ctx.log.info("breaker_half_open", system=self._gw.system)
                half_open = breaker.state is BreakerState.HALF_OPEN
                prefetch = 1 if half_open else self._gw.settings.prefetch
                with self._interruptible() as scope:
                    sub = await self._transport.subscribe(
                        self._gw.queue, prefetch=prefetch
                    )
                if scope.cancelled_caught:
                    break
                self._gw.prefetch = prefetch
                try:
                    await self._session_on(sub, half_open, ctx)
                finally:
                    with anyio.CancelScope(shield=True):
                        await sub.close()
                    # Every delivery was acknowledged or has just gone back.
                    self._gw.prefetch = self._gw.held = 0
                    self._in_flight_keys.clear()

    async def _wait_for_reset(self) -> None:
        breaker = self._gw.breaker
        with self._interruptible():
            while (delay := breaker.retry_in_s()) > 0:
                await self._gw.sleep(delay)

    async def _session_on(
        self, sub: Subscription, half_open: bool, ctx: Context[None]
    ) -> None:
        """Consume *sub* until the session ends; settle or give back every delivery."""
        s = _Session(sub, half_open)
        self._session = s
        if self._stopping:
            s.ending = "stopping"
        elif self._gw.pause is not None:
            s.ending = "paused"
        size = 1 if half_open else self._gw.settings.prefetch
        workers = min(self._gw.settings.concurrency, size)
        work_send, work_recv = anyio.create_memory_object_stream[_Command](size)
        done_send, done_recv = anyio.create_memory_object_stream[Done](size)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._commits.run, sub, done_recv, ctx)
                for _ in range(workers):
                    tg.start_soon(
                        self._worker, s, work_recv.clone(), done_send.clone(), ctx
                    )
                work_recv.close()
                async with work_send, done_send:
                    await self._intake(s, work_send, done_send, ctx)
        except ExceptionGroup as group:
            # One failure (a store outage past its deadline, a bug) crashes the
            # actor as itself, not wrapped in the session's task group.
            if len(group.exceptions) == 1:
                raise group.exceptions[0]  # noqa: B904 - the group is the context
            raise
        finally:
            self._session = None
        ending = s.ending or "stopping"
        if ending not in ("stopping", "recovered"):
            ctx.log.info(
                "system_consumer_cancelled",
                system=self._gw.system,
                reason=ending,
                breaker=self._gw.breaker.state.value,
                retry_in_s=round(self._gw.breaker.retry_in_s(), 3),
            )

    # -- intake -----------------------------------------------------------------

    async def _intake(
        self,
        s: _Session,
        work: MemoryObjectSendStream[_Command],
        done: MemoryObjectSendStream[Done],
        ctx: Context[None],
    ) -> None:
        size = 1 if s.half_open else self._gw.settings.prefetch
        while s.ending is None:
            with self._interruptible(s) as scope:
                try:
                    deliveries = await s.sub.batch(size)
                except TransportUnavailable as exc:
                    ctx.log.warning(
                        "subscription_lost", queue=self._gw.queue, error=str(exc)
                    )
                    self._end_session("subscription_lost")
                    return
            if scope.cancelled_caught:
                return
            await self._admit(s, deliveries, work, done)

    async def _admit(
        self,
        s: _Session,
        deliveries: list[Delivery],
        work: MemoryObjectSendStream[_Command],
        done: MemoryObjectSendStream[Done],
    ) -> None:
        gw = self._gw
        gw.held += len(deliveries)
        m = self._rt.metrics
        m.received.labels(gw.queue).inc(len(deliveries))
        redelivered = sum(1 for d in deliveries if d.redelivered)
        if redelivered:
            m.redelivered.labels(gw.queue).inc(redelivered)
        received = time.perf_counter()
        commands: list[_Command] = []
        for d in deliveries:
            try:
                if d.oversize is not None:
                    raise MessageTooLarge(d.oversize)
                if d.unreadable is not None:
                    raise UndecodableMessage(d.unreadable)
                envelope = decode_envelope(
                    d.body,
                    max_bytes=self._core.max_message_bytes,
                    content_type=d.content_type,
                )
                command = self._decoders.decode_data(envelope)
            except PermanentError as exc:
                await done.send(Done("bad", d, None, received, error=exc))
                continue
            commands.append(_Command(d, envelope, command, received))
        if not commands:
            return
        claimed = await self._commits.claimed([inbox_key(c.envelope) for c in commands])
        for c in commands:
            key = c.envelope.idempotency_key
            if key in claimed or key in self._in_flight_keys:
                await done.send(c.done("duplicate"))
            elif s.ending is not None or s.probe_sent:
                self._give_back(c)
            else:
                self._in_flight_keys.add(key)
                s.probe_sent = s.half_open
                await work.send(c)

    def _give_back(self, c: _Command) -> None:
        """Leave *c* unacknowledged: it returns to the queue when the session closes."""
        self._in_flight_keys.discard(c.envelope.idempotency_key)
        self._gw.held -= 1
        self._gw.count_commands("returned")

    # -- calls ------------------------------------------------------------------

    async def _worker(
        self,
        s: _Session,
        work: MemoryObjectReceiveStream[_Command],
        done: MemoryObjectSendStream[Done],
        ctx: Context[None],
    ) -> None:
        async with work, done:
            async for c in work:
                if s.ending is None:
                    with self._interruptible(s):
                        await self._take_token()
                if s.ending is not None:
                    self._give_back(c)
                    continue
                outcome = await self._call(s, c, ctx)
                if outcome is None:
                    self._give_back(c)
                else:
                    await done.send(outcome)

    async def _take_token(self) -> None:
        async with self._token_lock:
            await self._gw.take_token()

    async def _call(self, s: _Session, c: _Command, ctx: Context[None]) -> Done | None:
        """Call the system for *c*; None if a stop cut the call short."""
        gw = self._gw
        timeout_s = gw.settings.call_timeout_s
        error: Exception | None = None
        results: list[OutboxRecord] = []
        gw.calling(+1)
        started = time.perf_counter()
        with anyio.CancelScope() as cut:
            self._calls.add(cut)
            try:
                with anyio.fail_after(timeout_s):
                    events = await gw.connector.handle(
                        c.command, c.envelope, first_attempt=c.first_attempt
                    )
                results = follow_ups(
                    c.envelope, events, system=gw.system, source=self._source
                )
                outcome = "ok"
            except TimeoutError as exc:
                outcome = "timeout"
                error = UpstreamUnavailable(
                    gw.system, f"no answer within {timeout_s:g}s"
                )
                error.__cause__ = exc
            except RetryLater as exc:
                # The connector's own wait (another daemon holds the key it
                # needs), not the system failing: the breaker does not count it.
                outcome, error = "deferred", exc
            except TransientError as exc:
                outcome, error = "unavailable", exc
            except UpstreamRejected as exc:
                outcome, error = "rejected", exc
            except PermanentError as exc:
                outcome, error = "invalid", exc
            except Exception as exc:
                # A connector bug fails this command (retried, then dead-lettered),
                # not the system actor.
                outcome, error = "error", exc
                ctx.log.exception(
                    "connector_failed",
                    system=gw.system,
                    type=c.envelope.type,
                    message_id=c.envelope.id,
                    correlation_id=c.envelope.correlation_id,
                )
            finally:
                self._calls.discard(cut)
                gw.calling(-1)
        if cut.cancelled_caught:
            return None
        gw.count_call(outcome)
        self._breaker_saw(s, outcome, ctx)
        call_ms = (time.perf_counter() - started) * 1000
        if error is not None:
            return c.done("failed", error=error, call_ms=call_ms)
        return c.done("ok", results=results, call_ms=call_ms)

    def _breaker_saw(self, s: _Session, outcome: str, ctx: Context[None]) -> None:
        gw = self._gw
        breaker = gw.breaker
        if outcome in ("ok", "rejected"):  # the system answered
            if breaker.record_success():
                gw.breaker_changed()
                ctx.log.info("breaker_closed", system=gw.system)
                self._end_session("recovered")
        elif outcome in ("unavailable", "timeout", "error"):
            if breaker.record_failure():
                gw.breaker_changed(opened=True)
                ctx.log.warning(
                    "breaker_opened",
                    system=gw.system,
                    consecutive_failures=breaker.consecutive_failures,
                    opened=breaker.opened,
                    reset_s=round(breaker.reset_s, 3),
                )
                self._end_session("probe_failed" if s.half_open else "breaker_open")
        else:
            # The command was refused before it reached the system: the probe
            # told nothing, so the next command is the probe.
            s.probe_sent = False
