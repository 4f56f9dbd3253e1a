"""The system actor's run: intake, calls, commits and the breaker's sessions.

`broker.gateway` holds what outlives an incarnation (settings, token bucket,
breaker, counters: `SystemGateway`) and explains the whole; this module is
the actor a `SystemGateway` starts, one incarnation at a time. Internal.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, TypeVar, final

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from broker import letters
from broker.actor import Actor, Context
from broker.codec import (
    Decoders,
    decode_envelope,
    utcnow,
)
from broker.errors import (
    ConcurrencyConflict,
    PermanentError,
    TransientError,
    TransportUnavailable,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.letters import ATTEMPT_HEADER
from broker.limits import BreakerState
from broker.retry import Backoff
from broker.store import (
    BatchWrite,
    DeadLetterRecord,
    InboxKey,
    JournalRecord,
    OutboxRecord,
    OutboxRow,
)
from broker.transport import Delivery, Subscription
from broker.transport.topology import EVENTS_EXCHANGE
from canonical.base import Event
from canonical.envelope import Envelope

if TYPE_CHECKING:
    from broker.gateway import SystemGateway

__all__ = ["SystemActor"]

#: Calls still running when a stop begins get this share of the shutdown
#: grace; the rest is for committing and acknowledging what finished.
_CALL_SHARE_OF_GRACE = 0.8

T = TypeVar("T")
_log = structlog.get_logger(__name__)


Kind = Literal["ok", "failed", "bad", "duplicate"]


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
        self.attempt = _attempt(delivery)


@final
class _Done:
    """A delivery the actor is finished with, on its way into a commit. Internal."""

    __slots__ = (
        "attempt",
        "call_ms",
        "delivery",
        "envelope",
        "error",
        "kind",
        "outcome",
        "reason",
        "received",
        "results",
    )

    def __init__(
        self,
        kind: Kind,
        delivery: Delivery,
        envelope: Envelope | None,
        received: float,
        *,
        error: Exception | None = None,
        results: Sequence[OutboxRecord] = (),
        call_ms: float | None = None,
    ) -> None:
        self.kind = kind
        self.delivery = delivery
        self.envelope = envelope
        self.received = received
        self.error = error
        self.results = results
        self.call_ms = call_ms
        self.attempt = _attempt(delivery)
        #: Decided when the commit is built: completed, duplicate, ...
        self.outcome = ""
        self.reason = ""

    @classmethod
    def of(cls, kind: Kind, c: _Command, **kw: Any) -> _Done:
        return cls(kind, c.delivery, c.envelope, c.received, **kw)


@final
class _Session:
    """One subscription's life: from subscribe to close. Internal."""

    __slots__ = ("ending", "half_open", "probe_sent", "sub")

    def __init__(self, sub: Subscription, half_open: bool) -> None:
        self.sub = sub
        self.half_open = half_open
        self.probe_sent = False
        #: Why the session ends: stopping, breaker_open, recovered, probe_failed,
        #: subscription_lost. None while it runs.
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
        self._store = rt.store
        self._transport = rt.transport
        self._core = rt.cfg.core
        self._tiers = tuple(rt.cfg.topology.retry_tiers_s)
        self._shutdown_s = rt.cfg.daemon.shutdown_s
        self._decoders = Decoders(gateway.connector.commands)
        self._consumer = gateway.id
        self._source = f"/q2c/sys/{gateway.system}"
        self._token_lock = anyio.Lock()  # one token waiter sleeps at a time, FIFO
        # Keys called or being called and not yet committed; and, for each
        # read of the inbox in progress, the keys committed meanwhile (which
        # the read may have missed). Both are bounded by prefetch.
        self._in_flight_keys: set[str] = set()
        self._readers: list[set[str]] = []
        self._waits: set[anyio.CancelScope] = set()  # interrupted by a session end
        self._calls: set[anyio.CancelScope] = set()  # cut short at the stop deadline
        self._session: _Session | None = None
        self._stopping = False
        # The work survives the stop request (a cancellation of the actor's
        # background tasks): it drains, within its own deadline.
        self._work_scope = anyio.CancelScope(shield=True)

    async def on_start(self, ctx: Context[None]) -> None:
        """Start consuming in the background."""
        ctx.start_soon(self._work, ctx, name=f"{ctx.id}.work")
        ctx.start_soon(self._watch_for_stop, name=f"{ctx.id}.stop")

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

    # -- the consumer's life ---------------------------------------------------

    async def _work(self, ctx: Context[None]) -> None:
        with self._work_scope:
            while not self._stopping:
                breaker = self._gw.breaker
                if breaker.state is BreakerState.OPEN:
                    await self._wait_for_reset()
                    if self._stopped():
                        break
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
        size = 1 if half_open else self._gw.settings.prefetch
        workers = min(self._gw.settings.concurrency, size)
        work_send, work_recv = anyio.create_memory_object_stream[_Command](size)
        done_send, done_recv = anyio.create_memory_object_stream[_Done](size)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._commit_loop, s, done_recv, ctx)
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
        done: MemoryObjectSendStream[_Done],
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
        done: MemoryObjectSendStream[_Done],
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
                envelope = decode_envelope(
                    d.body,
                    max_bytes=self._core.max_message_bytes,
                    content_type=d.content_type,
                )
                command = self._decoders.decode_data(envelope)
            except PermanentError as exc:
                await done.send(_Done("bad", d, None, received, error=exc))
                continue
            commands.append(_Command(d, envelope, command, received))
        if not commands:
            return
        claimed = await self._claimed([_inbox_key(c.envelope) for c in commands])
        for c in commands:
            key = c.envelope.idempotency_key
            if key in claimed or key in self._in_flight_keys:
                await done.send(_Done.of("duplicate", c))
            elif s.ending is not None or s.probe_sent:
                self._give_back(c)
            else:
                self._in_flight_keys.add(key)
                s.probe_sent = s.half_open
                await work.send(c)

    async def _claimed(self, keys: list[InboxKey]) -> frozenset[str]:
        """Which of *keys* are claimed, including any claimed while we looked."""
        meanwhile: set[str] = set()
        self._readers.append(meanwhile)
        try:
            read = await self._with_store_retry(
                lambda: self._store.prepare_batch(
                    self._consumer, keys, self._consumer, ()
                )
            )
            return read.claimed | meanwhile
        finally:
            self._readers.remove(meanwhile)

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
        done: MemoryObjectSendStream[_Done],
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
            while (delay := self._gw.bucket.try_take()) > 0:
                await self._gw.sleep(delay)

    async def _call(self, s: _Session, c: _Command, ctx: Context[None]) -> _Done | None:
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
                    events = await gw.connector.handle(c.command, c.envelope)
                results = self._results(c.envelope, events)
                outcome = "ok"
            except TimeoutError as exc:
                outcome = "timeout"
                error = UpstreamUnavailable(
                    gw.system, f"no answer within {timeout_s:g}s"
                )
                error.__cause__ = exc
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
            return _Done.of("failed", c, error=error, call_ms=call_ms)
        return _Done.of("ok", c, results=results, call_ms=call_ms)

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

    def _results(self, env: Envelope, events: Sequence[Any]) -> list[OutboxRecord]:
        """Outbox rows for the events a call returned, with ids derived from the key."""
        now = utcnow()
        records: list[OutboxRecord] = []
        for n, event in enumerate(events):
            tag = _tag_of(event, self._gw.system)
            key = f"{env.idempotency_key}/{tag}/{n}"
            # A fact may belong to another instance than its cause (a quote
            # read back for a change event belongs to its opportunity's deal).
            own = event.correlation() if isinstance(event, Event) else None
            records.append(
                letters.follow_up(
                    env,
                    event,
                    tag=tag,
                    key=key,
                    source=self._source,
                    now=now,
                    exchange=EVENTS_EXCHANGE,
                    routing_key=tag,
                    correlation_id=own or env.correlation_id,
                    subject=env.subject,
                )
            )
        return records

    # -- commits ----------------------------------------------------------------

    async def _commit_loop(
        self, s: _Session, done: MemoryObjectReceiveStream[_Done], ctx: Context[None]
    ) -> None:
        linger_s = self._gw.settings.batch_linger_s
        limit = self._gw.settings.prefetch
        async with done:
            async for first in done:
                group = [first]
                while len(group) < limit:
                    try:
                        group.append(done.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                if linger_s and self._gw.in_flight:
                    # Calls still running may finish within the linger: their
                    # outcomes then share this commit instead of paying for one.
                    with anyio.move_on_after(linger_s):
                        while self._gw.in_flight and len(group) < limit:
                            try:
                                group.append(await done.receive())
                            except anyio.EndOfStream:
                                break
                await self._commit(s, group, ctx)

    async def _commit(
        self, s: _Session, group: list[_Done], ctx: Context[None]
    ) -> None:
        started = time.perf_counter()
        rows, write = await self._write(group)
        self._rt.crash.passed("after_commit_before_ack", len(group))
        for meanwhile in self._readers:
            meanwhile.update(k.key for k in write.keys)
        await self._rt.feed.put(rows)
        for d in group:
            s.sub.ack(d.delivery.tag)
        committed = time.perf_counter()
        gw = self._gw
        gw.held -= len(group)
        for d in group:
            if d.envelope is not None and d.kind != "duplicate":
                self._in_flight_keys.discard(d.envelope.idempotency_key)
        self._count(group)
        for d in group:
            env = d.envelope
            log = ctx.log.warning if d.outcome == "dead_lettered" else ctx.log.info
            log(
                "command_handled",
                system=gw.system,
                type=env.type if env is not None else d.delivery.type,
                message_id=env.id if env is not None else d.delivery.message_id,
                correlation_id=(
                    env.correlation_id if env is not None else d.delivery.correlation_id
                ),
                outcome=d.outcome,
                reason=d.reason or None,
                attempt=d.attempt,
                duration_ms=round((committed - d.received) * 1000, 2),
                call_ms=round(d.call_ms, 2) if d.call_ms is not None else None,
                commit_ms=round((committed - started) * 1000, 2),
            )

    async def _write(self, group: list[_Done]) -> tuple[list[OutboxRow], BatchWrite]:
        """Commit *group* in one write; retry conflicts and outages to the deadline."""
        backoff = Backoff(0.05, 5.0)
        deadline = time.monotonic() + self._core.commit_deadline_s
        claimed: frozenset[str] = frozenset()
        while True:
            write = self._decide(group, claimed)
            try:
                self._rt.crash.passed("mid_txn", len(group))
                return await self._store.commit_batch(write), write
            except TransientError as exc:
                # Nothing was written. A conflict means another consumer claimed
                # one of these keys since we looked: its commit counts, and ours
                # for that command becomes a duplicate (the system saw one
                # effect: the same idempotency key reached it twice).
                if time.monotonic() > deadline:
                    raise
                if isinstance(exc, ConcurrencyConflict):
                    claimed |= await self._claimed(list(write.keys))
                delay = backoff.next_delay()
                self._rt.metrics.commit_retries.inc()
                self._log_store_retry("commit", exc, delay)
                await anyio.sleep(delay)

    def _decide(self, group: list[_Done], claimed: frozenset[str]) -> BatchWrite:
        """Decide each outcome and build the one write that records them all."""
        queue = self._gw.queue
        keys: list[InboxKey] = []
        outbox: list[OutboxRecord] = []
        dead: list[DeadLetterRecord] = []
        journal: list[JournalRecord] = []

        def dead_letter(d: _Done, reason: str, detail: str) -> None:
            d.outcome, d.reason = "dead_lettered", reason
            env = d.envelope
            record, copy, entry = letters.dead_letter(
                queue,
                d.delivery,
                reason=reason,
                detail=detail,
                attempts=d.attempt,
                # From the envelope when the body could be read, so the
                # deal's trace shows them.
                correlation_id=env.correlation_id if env else d.delivery.correlation_id,
                type_=env.type if env else d.delivery.type,
            )
            dead.append(record)
            outbox.append(copy)
            journal.append(entry)

        for d in group:
            env = d.envelope
            if env is None or d.kind == "bad":
                bad = d.error
                reason = bad.reason if isinstance(bad, PermanentError) else "malformed"
                dead_letter(d, reason, str(bad))
            elif d.kind == "duplicate" or (
                d.kind == "ok" and env.idempotency_key in claimed
            ):
                d.outcome, d.reason = "duplicate", ""
                journal.append(letters.journal(env, "duplicate"))
            elif d.kind == "ok":
                d.outcome, d.reason = "completed", ""
                keys.append(_inbox_key(env))
                outbox.extend(d.results)
                types = ", ".join(r.routing_key for r in d.results)
                journal.append(
                    letters.journal(
                        env, "completed", f"{len(d.results)} results: {types}"
                    )
                )
            elif isinstance(d.error, PermanentError):
                dead_letter(d, d.error.reason, str(d.error))
            else:
                error = f"{type(d.error).__name__}: {d.error}"
                retry_after = getattr(d.error, "retry_after_s", None)
                tier = self._tier(d.attempt, retry_after)
                if tier is None:
                    dead_letter(d, "attempts_exhausted", error)
                    continue
                d.outcome, d.reason = "retry_scheduled", f"{tier:g}s"
                outbox.append(
                    letters.retry(
                        queue,
                        d.delivery,
                        message_id=env.id,
                        attempt=d.attempt,
                        tier=tier,
                        error=error,
                    )
                )
                journal.append(
                    letters.journal(
                        env,
                        "retry_scheduled",
                        f"attempt {d.attempt} failed, retry in {tier:g}s: "
                        f"{error[:200]}",
                    )
                )
        return BatchWrite(
            consumer=self._consumer,
            workflow=self._consumer,
            keys=keys,
            outbox=outbox,
            dead_letters=dead,
            journal=journal,
        )

    def _tier(self, attempt: int, retry_after_s: float | None) -> float | None:
        """The retry tier after failed *attempt*, at least *retry_after_s* long."""
        tier = self._rt.retry.tier_for(attempt)
        if tier is None or retry_after_s is None or tier >= retry_after_s:
            return tier
        longer = [t for t in self._tiers if t >= retry_after_s]
        return min(longer) if longer else max(self._tiers)

    def _count(self, group: list[_Done]) -> None:
        gw = self._gw
        m = self._rt.metrics
        outcomes: dict[str, int] = {}
        for d in group:
            outcomes[d.outcome] = outcomes.get(d.outcome, 0) + 1
            if d.outcome == "dead_lettered":
                m.dead_lettered.labels(d.reason).inc()
        for outcome, n in outcomes.items():
            gw.count_commands(outcome, n)
        if n_dup := outcomes.get("duplicate"):
            m.duplicates.labels(self._consumer).inc(n_dup)
        if n_retry := outcomes.get("retry_scheduled"):
            m.retried.labels(self._consumer).inc(n_retry)

    async def _with_store_retry(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run a read, backing off while the store is unavailable (to the deadline)."""
        backoff = Backoff(0.05, 5.0)
        deadline = time.monotonic() + self._core.commit_deadline_s
        while True:
            try:
                return await op()
            except TransientError as exc:
                if time.monotonic() > deadline:
                    raise
                delay = backoff.next_delay()
                self._log_store_retry("read", exc, delay)
                await anyio.sleep(delay)

    def _log_store_retry(self, what: str, exc: Exception, delay: float) -> None:
        _log.warning(
            "gateway_store_retried",
            system=self._gw.system,
            operation=what,
            error=f"{type(exc).__name__}: {exc}",
            retry_in_s=round(delay, 3),
        )


def _attempt(delivery: Delivery) -> int:
    headers = delivery.headers
    raw = headers.get(ATTEMPT_HEADER, 1) if headers else 1
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else 1


def _tag_of(event: Any, system: str) -> str:
    config = getattr(type(event), "__struct_config__", None)
    tag = getattr(config, "tag", None)
    if not isinstance(tag, str):
        raise TypeError(
            f"the {system} connector returned a {type(event).__name__}, "
            "not a tagged canonical event"
        )
    return tag


def _inbox_key(env: Envelope) -> InboxKey:
    """A command's inbox key: its idempotency key on its fact's own day."""
    return InboxKey(key=env.idempotency_key, day=env.time.date(), message_id=env.id)
