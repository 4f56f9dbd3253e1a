"""The system actor's commits: how a finished command is written and acknowledged.

A `SystemActor` (`broker.system_actor`) hands every delivery it is finished
with to its `SystemCommit` as a `Done`. Outcomes that finish together are
written in one ``commit_batch``: the inbox keys of completed commands with
their result events, retries to a ``q2c.retry.<delay>`` tier, dead letters
and one journal row each. The rows then go to the relay, and only then is
each delivery acknowledged.

A command's key is claimed in the write that records its results. A read
of the inbox (`SystemCommit.claimed`) that overlaps a commit also sees the
keys that commit claimed, so a command whose key is written while the
actor looks is still known to be a duplicate. A conflict with another
consumer's claim turns that command into a duplicate too; an outage is
retried with back-off until ``commit-deadline-s`` and then crashes the
actor. Internal: not for use outside broker/.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar, final

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from broker import letters
from broker.actor import Context
from broker.codec import utcnow
from broker.errors import (
    ConcurrencyConflict,
    PermanentError,
    TransientError,
)
from broker.letters import ATTEMPT_HEADER
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

__all__ = ["Done", "Kind", "SystemCommit", "attempt_of", "follow_ups", "inbox_key"]

T = TypeVar("T")
_log = structlog.get_logger(__name__)


Kind = Literal["ok", "failed", "bad", "duplicate"]


@final
class Done:
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
        self.attempt = attempt_of(delivery)
        #: Decided when the commit is built: completed, duplicate, ...
        self.outcome = ""
        self.reason = ""


@final
class SystemCommit:
    """Write one system actor's finished commands and acknowledge them. Internal.

    Args:
        gateway: the system's gateway: settings, counters and the runtime.
        in_flight_keys: the actor's keys called or being called and not yet
            committed; a commit removes the keys it settles.
    """

    def __init__(self, gateway: SystemGateway, in_flight_keys: set[str]) -> None:
        rt = gateway.rt
        self._gw = gateway
        self._rt = rt
        self._store = rt.store
        self._core = rt.cfg.core
        self._tiers = tuple(rt.cfg.topology.retry_tiers_s)
        self._consumer = gateway.id
        self._in_flight_keys = in_flight_keys
        # For each read of the inbox in progress, the keys committed meanwhile
        # (which the read may have missed). Bounded by prefetch.
        self._readers: list[set[str]] = []

    async def claimed(self, keys: list[InboxKey]) -> frozenset[str]:
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

    async def run(
        self,
        sub: Subscription,
        done: MemoryObjectReceiveStream[Done],
        ctx: Context[None],
    ) -> None:
        """Commit what arrives on *done*, in groups, until it closes; ack on *sub*."""
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
                await self._commit(sub, group, ctx)

    async def _commit(
        self, sub: Subscription, group: list[Done], ctx: Context[None]
    ) -> None:
        started = time.perf_counter()
        rows, write = await self._write(group)
        self._rt.crash.passed("after_commit_before_ack", len(group))
        for meanwhile in self._readers:
            meanwhile.update(k.key for k in write.keys)
        await self._rt.feed.put(rows)
        for d in group:
            sub.ack(d.delivery.tag)
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

    async def _write(self, group: list[Done]) -> tuple[list[OutboxRow], BatchWrite]:
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
                    claimed |= await self.claimed(list(write.keys))
                delay = backoff.next_delay()
                self._rt.metrics.commit_retries.inc()
                self._log_store_retry("commit", exc, delay)
                await anyio.sleep(delay)

    def _decide(self, group: list[Done], claimed: frozenset[str]) -> BatchWrite:
        """Decide each outcome and build the one write that records them all."""
        queue = self._gw.queue
        keys: list[InboxKey] = []
        outbox: list[OutboxRecord] = []
        dead: list[DeadLetterRecord] = []
        journal: list[JournalRecord] = []

        def dead_letter(d: Done, reason: str, detail: str) -> None:
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
                keys.append(inbox_key(env))
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
                # The system was down, throttling or silent, or the connector
                # waits on a key another daemon holds: that says nothing of
                # the command, so it does not use up attempts, only time (the
                # breaker keeps the queue still meanwhile).
                tier, since, exhausted = letters.next_tier(
                    self._rt.retry, d.error, d.delivery, d.attempt
                )
                if tier is None:
                    dead_letter(d, exhausted, error)
                    continue
                tier = self._longer(tier, retry_after)
                d.outcome, d.reason = "retry_scheduled", f"{tier:g}s"
                outbox.append(
                    letters.retry(
                        queue,
                        d.delivery,
                        message_id=env.id,
                        attempt=d.attempt,
                        tier=tier,
                        error=error,
                        unavailable_since=since,
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

    def _longer(self, tier: float, retry_after_s: float | None) -> float:
        """*tier*, or the shortest tier at least *retry_after_s* long."""
        if retry_after_s is None or tier >= retry_after_s:
            return tier
        longer = [t for t in self._tiers if t >= retry_after_s]
        return min(longer) if longer else max(self._tiers)

    def _count(self, group: list[Done]) -> None:
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


def follow_ups(
    env: Envelope, events: Sequence[Any], *, system: str, source: str
) -> list[OutboxRecord]:
    """Outbox rows for the events a call returned, with ids derived from the key.

    Raises:
        TypeError: an event is not a tagged canonical event (a connector bug).
    """
    now = utcnow()
    records: list[OutboxRecord] = []
    for n, event in enumerate(events):
        tag = _tag_of(event, system)
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
                source=source,
                now=now,
                exchange=EVENTS_EXCHANGE,
                routing_key=tag,
                correlation_id=own or env.correlation_id,
                subject=env.subject,
            )
        )
    return records


def attempt_of(delivery: Delivery) -> int:
    """The delivery's attempt number from its header; 1 when absent or invalid."""
    headers = delivery.headers
    raw = headers.get(ATTEMPT_HEADER, 1) if headers else 1
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else 1


def inbox_key(env: Envelope) -> InboxKey:
    """A command's inbox key: its idempotency key on its fact's own day."""
    return InboxKey(key=env.idempotency_key, day=env.time.date(), message_id=env.id)


def _tag_of(event: Any, system: str) -> str:
    config = getattr(type(event), "__struct_config__", None)
    tag = getattr(config, "tag", None)
    if not isinstance(tag, str):
        raise TypeError(
            f"the {system} connector returned a {type(event).__name__}, "
            "not a tagged canonical event"
        )
    return tag
