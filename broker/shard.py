"""The high-throughput core: one actor per workflow shard queue.

A shard consumes ``q2c.wf.<workflow>.<n>`` (single-active-consumer, so it
sees one deal's messages in order) and handles what arrived as one batch:

1. decode every delivery with reused decoders; anything undecodable,
   oversize, of unknown type or schema-invalid is dead-lettered in the same
   transaction, never retried;
2. in ONE transaction: claim the batch's idempotency keys in the inbox
   (duplicates are skipped and counted), load the instances' states, apply
   the events in delivery order, save the states at their expected
   versions, write the outbox rows (what follows, retries, dead-letter
   copies), the dead letters and the journal;
3. commit, hand the new outbox rows to the relay, then acknowledge the
   whole batch with one multiple-ack.

A crash before the commit rolls everything back and the broker redelivers;
a crash after it redelivers messages whose keys are already claimed, so
they are acknowledged without effect. Nothing is acknowledged that is not
durable, and no effect happens twice.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, final

import anyio
import msgspec
import structlog

from broker.actor import Actor, Context
from broker.codec import (
    Decoders,
    decode_envelope,
    encode_envelope,
    encode_event,
    utcnow,
)
from broker.config import CoreConfig
from broker.errors import (
    PermanentError,
    TransientError,
    TransportUnavailable,
)
from broker.faults import CrashHook
from broker.metrics import Metrics
from broker.outbox import OutboxFeed
from broker.retry import Backoff, RetryPolicy
from broker.store import (
    BatchWrite,
    DeadLetterRecord,
    InboxKey,
    JournalRecord,
    OutboxRecord,
    OutboxRow,
    SagaWrite,
    Store,
)
from broker.transport import Delivery, Subscription, Transport
from broker.transport.topology import DEAD_EXCHANGE, retry_exchange
from broker.workflow import Workflow
from canonical.envelope import Envelope

__all__ = ["WorkflowShard", "ATTEMPT_HEADER", "message_id_for"]

ATTEMPT_HEADER = "x-q2c-attempt"
_log = structlog.get_logger(__name__)


def message_id_for(idempotency_key: str) -> str:
    """The message id of an emitted message: the same fact, the same id.

    A 128-bit BLAKE2b of the key, in hex: as unique as a UUID, ten times
    cheaper than ``uuid5`` on the hot path.
    """
    return hashlib.blake2b(idempotency_key.encode(), digest_size=16).hexdigest()


class _Item:
    """One decoded delivery on its way through a batch. Internal."""

    __slots__ = ("attempt", "delivery", "envelope", "event")

    def __init__(self, delivery: Delivery, envelope: Envelope, event: Any) -> None:
        self.delivery = delivery
        self.envelope = envelope
        self.event = event
        headers = delivery.headers
        raw = headers.get(ATTEMPT_HEADER, 1) if headers else 1
        self.attempt = raw if isinstance(raw, int) and raw > 0 else 1


class _Outcome:
    """What one batch transaction wrote, for counters and the hand-over."""

    __slots__ = ("applied", "dead", "duplicates", "outbox", "retried")

    def __init__(self) -> None:
        self.applied = 0
        self.duplicates = 0
        self.retried = 0
        self.dead: list[str] = []
        self.outbox: list[OutboxRow] = []


@final
class WorkflowShard(Actor[None]):
    """Apply one shard queue's messages to a workflow, a batch at a time.

    Owns: the subscription to its queue and the instances whose correlation
    ids hash to it. Redelivery is safe: keys are claimed in the transaction
    that applies their effects. On failure: a store outage retries the same
    batch with back-off (deliveries stay unacknowledged); a lost connection
    resubscribes and the broker redelivers; anything else crashes the actor,
    the supervisor restarts it, and the broker redelivers what was unacked.
    """

    def __init__(
        self,
        *,
        workflow: Workflow[Any],
        queue: str,
        transport: Transport,
        store: Store,
        feed: OutboxFeed,
        core: CoreConfig,
        prefetch: int,
        retry: RetryPolicy,
        metrics: Metrics,
        crash: CrashHook,
    ) -> None:
        self._wf = workflow
        self._queue = queue
        self._transport = transport
        self._store = store
        self._feed = feed
        self._core = core
        self._prefetch = prefetch
        self._retry = retry
        self._metrics = metrics
        self._crash = crash
        self._decoders = Decoders(workflow.events)
        self._state_decoder = msgspec.json.Decoder(workflow.state_type)
        self._encoder = msgspec.json.Encoder(decimal_format="string")
        self._source = f"/q2c/{workflow.name}"
        self._stopping = False
        self._wait_scope: anyio.CancelScope | None = None
        self._done = anyio.Event()
        self.batches = 0
        self.in_batch = 0

    async def on_start(self, ctx: Context[None]) -> None:
        """Start consuming in the background."""
        ctx.start_soon(self._consume, ctx, name=f"{ctx.id}.consume")

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """A shard takes no messages; its work arrives from its queue."""

    async def on_stop(self, ctx: Context[None]) -> None:
        """Stop taking deliveries and let the batch in hand finish (drain)."""
        self._stopping = True
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        await self._done.wait()

    async def _consume(self, ctx: Context[None]) -> None:
        try:
            while not self._stopping:
                sub = await self._transport.subscribe(
                    self._queue, prefetch=self._prefetch
                )
                try:
                    await self._consume_from(sub, ctx)
                except TransportUnavailable as exc:
                    ctx.log.warning(
                        "subscription_lost", queue=self._queue, error=str(exc)
                    )
                finally:
                    with anyio.CancelScope(shield=True):
                        await sub.close()
        finally:
            self._done.set()

    async def _consume_from(self, sub: Subscription, ctx: Context[None]) -> None:
        linger_s = self._core.batch_linger_s
        full = self._core.batch_max
        deliveries: list[Delivery] = []
        while not self._stopping:
            with anyio.CancelScope() as scope:
                self._wait_scope = scope
                if linger_s and 0 < len(deliveries) < full:
                    # The last batch was partial: under a steady trickle, a few
                    # milliseconds of waiting turn many small commits (each a
                    # fixed cost in Postgres, RabbitMQ and here) into one.
                    await anyio.sleep(linger_s)
                deliveries = await sub.batch(full)
            self._wait_scope = None
            if scope.cancelled_caught:
                return
            self.in_batch = len(deliveries)
            # The batch in hand finishes even if the actor is being stopped:
            # the commit and the ack are one step for the drain.
            with anyio.CancelScope(shield=True):
                await self._process(sub, deliveries, ctx)
            self.in_batch = 0

    async def _process(
        self, sub: Subscription, deliveries: list[Delivery], ctx: Context[None]
    ) -> None:
        started = time.perf_counter()
        items: list[_Item] = []
        bad: list[tuple[Delivery, PermanentError]] = []
        max_bytes = self._core.max_message_bytes
        for d in deliveries:
            try:
                envelope = decode_envelope(
                    d.body, max_bytes=max_bytes, content_type=d.content_type
                )
                items.append(_Item(d, envelope, self._decoders.decode_data(envelope)))
            except PermanentError as exc:
                bad.append((d, exc))
        self._metrics.received.labels(self._queue).inc(len(deliveries))
        redelivered = sum(1 for d in deliveries if d.redelivered)
        if redelivered:
            self._metrics.redelivered.labels(self._queue).inc(redelivered)

        decoded = time.perf_counter()
        outcome = await self._commit_with_retry(items, bad, ctx)
        self._crash.passed("after_commit_before_ack", len(deliveries))
        committed = time.perf_counter()
        await self._feed.put(outcome.outbox)
        sub.ack(deliveries[-1].tag, multiple=True)

        self.batches += 1
        elapsed = time.perf_counter() - started
        m = self._metrics
        m.applied.labels(self._wf.name).inc(outcome.applied)
        if outcome.duplicates:
            m.duplicates.labels(self._wf.name).inc(outcome.duplicates)
        if outcome.retried:
            m.retried.labels(self._wf.name).inc(outcome.retried)
        for reason in outcome.dead:
            m.dead_lettered.labels(reason).inc()
        m.batch_size.observe(len(deliveries))
        m.commit_seconds.observe(elapsed)
        ctx.log.info(
            "batch_handled",
            queue=self._queue,
            deliveries=len(deliveries),
            applied=outcome.applied,
            duplicates=outcome.duplicates,
            retried=outcome.retried,
            dead_lettered=len(outcome.dead),
            duration_ms=round(elapsed * 1000, 2),
            commit_ms=round((committed - decoded) * 1000, 2),
            handoff_ms=round((started + elapsed - committed) * 1000, 2),
        )

    async def _commit_with_retry(
        self,
        items: list[_Item],
        bad: list[tuple[Delivery, PermanentError]],
        ctx: Context[None],
    ) -> _Outcome:
        backoff = Backoff(0.05, 5.0)
        deadline = time.monotonic() + self._core.commit_deadline_s
        while True:
            try:
                outcome = await self._write(items, bad)
            except TransientError as exc:
                # StoreUnavailable or ConcurrencyConflict: the transaction rolled
                # back; the deliveries are still ours, unacknowledged.
                if time.monotonic() > deadline:
                    raise
                delay = backoff.next_delay()
                self._metrics.commit_retries.inc()
                ctx.log.warning(
                    "batch_commit_retried",
                    queue=self._queue,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 3),
                )
                await anyio.sleep(delay)
            else:
                return outcome

    async def _write(
        self, items: list[_Item], bad: list[tuple[Delivery, PermanentError]]
    ) -> _Outcome:
        """Read (one round trip), apply in memory, write (one round trip)."""
        wf = self._wf
        out = _Outcome()
        now = utcnow()
        records: list[OutboxRecord] = []
        dead: list[DeadLetterRecord] = []
        journal: list[JournalRecord] = []

        for d, exc in bad:
            self._dead_letter(d, exc.reason, str(exc), 1, records, dead, journal)
            out.dead.append(exc.reason)

        read = await self._store.prepare_batch(
            wf.name,
            list({k.key: k for k in map(_inbox_key, items)}.values()),
            wf.name,
            sorted({i.envelope.correlation_id for i in items}),
        )
        seen: set[str] = set(read.claimed)
        to_apply: list[_Item] = []
        for item in items:
            key = item.envelope.idempotency_key
            if key in seen:  # claimed before, or earlier in this batch
                out.duplicates += 1
                journal.append(
                    JournalRecord(
                        message_id=item.envelope.id,
                        correlation_id=item.envelope.correlation_id,
                        stage="duplicate",
                        type=item.envelope.type,
                    )
                )
            else:
                seen.add(key)
                to_apply.append(item)

        states: dict[str, Any] = {}
        versions: dict[str, int] = {}
        for cid, rec in read.sagas.items():
            states[cid] = self._state_decoder.decode(rec.state)
            versions[cid] = rec.version

        dirty: set[str] = set()
        released: set[str] = set()
        for item in to_apply:
            env = item.envelope
            cid = env.correlation_id
            state = states[cid] if cid in states else wf.initial(cid)
            try:
                applied = wf.apply(state, item.event, env)
            except PermanentError as exc:
                released.add(env.idempotency_key)
                self._dead_letter(
                    item.delivery,
                    exc.reason,
                    str(exc),
                    item.attempt,
                    records,
                    dead,
                    journal,
                )
                out.dead.append(exc.reason)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad message must not stall the shard
                released.add(env.idempotency_key)
                self._schedule_retry(item, exc, records, dead, journal, out)
                continue
            states[cid] = applied.state
            dirty.add(cid)
            out.applied += 1
            journal.append(
                JournalRecord(
                    message_id=env.id,
                    correlation_id=cid,
                    stage="applied",
                    type=env.type,
                )
            )
            for n, emit in enumerate(applied.emits):
                tag = type(emit.event).__struct_config__.tag
                key = f"{env.idempotency_key}/{tag}{emit.key_suffix}"
                if n and not emit.key_suffix:
                    key = f"{key}#{n}"
                msg_id = message_id_for(key)
                body = encode_envelope(
                    Envelope(
                        id=msg_id,
                        source=self._source,
                        type=tag,
                        time=now,
                        subject=emit.subject,
                        correlation_id=cid,
                        causation_id=env.id,
                        idempotency_key=key,
                        traceparent=env.traceparent,
                        data=encode_event(emit.event),
                    )
                )
                records.append(
                    OutboxRecord(
                        message_id=msg_id,
                        exchange=emit.exchange,
                        routing_key=emit.routing_key or tag,
                        body=body,
                        correlation_id=cid,
                        type=tag,
                    )
                )

        write = BatchWrite(
            consumer=wf.name,
            workflow=wf.name,
            keys=[
                _inbox_key(i)
                for i in to_apply
                if i.envelope.idempotency_key not in released
            ],
            sagas=[
                SagaWrite(
                    correlation_id=cid,
                    expected_version=versions.get(cid, 0),
                    state=self._encoder.encode(states[cid]),
                )
                for cid in sorted(dirty)
            ],
            outbox=records,
            dead_letters=dead,
            journal=journal,
        )
        self._crash.passed("mid_txn", len(items) + len(bad))
        out.outbox = await self._store.commit_batch(write)
        return out

    def _dead_letter(
        self,
        d: Delivery,
        reason: str,
        detail: str,
        attempts: int,
        records: list[OutboxRecord],
        dead: list[DeadLetterRecord],
        journal: list[JournalRecord],
    ) -> None:
        message_id = d.message_id or "sha256:" + hashlib.sha256(d.body).hexdigest()
        detail = detail[:2000]
        dead.append(
            DeadLetterRecord(
                message_id=message_id,
                queue=self._queue,
                routing_key=d.routing_key,
                reason=reason,
                detail=detail,
                body=d.body,
                headers=_plain_headers(d.headers),
                attempts=attempts,
                correlation_id=d.correlation_id,
                type=d.type,
            )
        )
        records.append(
            OutboxRecord(
                message_id=message_id,
                exchange=DEAD_EXCHANGE,
                routing_key=self._queue,
                body=d.body,
                correlation_id=d.correlation_id,
                type=d.type,
                headers={
                    **_plain_headers(d.headers),
                    "x-q2c-reason": reason,
                    "x-q2c-detail": detail[:500],
                    "x-q2c-queue": self._queue,
                    ATTEMPT_HEADER: attempts,
                },
            )
        )
        journal.append(
            JournalRecord(
                message_id=message_id,
                correlation_id=d.correlation_id,
                stage="dead_lettered",
                type=d.type,
                detail=f"{reason}: {detail[:200]}",
            )
        )
        _log.warning(
            "delivery_dead_lettered",
            queue=self._queue,
            message_id=message_id,
            correlation_id=d.correlation_id,
            reason=reason,
            detail=detail[:200],
            attempt=attempts,
        )

    def _schedule_retry(
        self,
        item: _Item,
        exc: Exception,
        records: list[OutboxRecord],
        dead: list[DeadLetterRecord],
        journal: list[JournalRecord],
        out: _Outcome,
    ) -> None:
        d = item.delivery
        env = item.envelope
        error = f"{type(exc).__name__}: {exc}"
        tier = self._retry.tier_for(item.attempt)
        if tier is None:
            self._dead_letter(
                d, "attempts_exhausted", error, item.attempt, records, dead, journal
            )
            out.dead.append("attempts_exhausted")
            return
        expected = isinstance(exc, TransientError)
        (_log.info if expected else _log.error)(
            "delivery_retry_scheduled",
            queue=self._queue,
            message_id=env.id,
            correlation_id=env.correlation_id,
            attempt=item.attempt,
            retry_in_s=tier,
            error=error,
            exc_info=None if expected else exc,
        )
        records.append(
            OutboxRecord(
                message_id=env.id,
                exchange=retry_exchange(tier),
                routing_key=self._queue,
                body=d.body,
                correlation_id=d.correlation_id,
                type=d.type,
                headers={
                    **_plain_headers(d.headers),
                    ATTEMPT_HEADER: item.attempt + 1,
                    "x-q2c-reason": error[:500],
                },
            )
        )
        journal.append(
            JournalRecord(
                message_id=env.id,
                correlation_id=env.correlation_id,
                stage="retry_scheduled",
                type=env.type,
                detail=f"attempt {item.attempt} failed, retry in {tier}s: "
                f"{error[:200]}",
            )
        )
        out.retried += 1

    def status(self) -> dict[str, Any]:
        """Batches handled and the size of the one in hand."""
        return {
            "queue": self._queue,
            "batches": self.batches,
            "in_batch": self.in_batch,
        }


def _inbox_key(item: _Item) -> InboxKey:
    """The inbox key of a delivery: its idempotency key on its fact's own day."""
    env = item.envelope
    return InboxKey(key=env.idempotency_key, day=env.time.date(), message_id=env.id)


def _plain_headers(headers: dict[str, Any] | None) -> dict[str, str | int]:
    """Headers reduced to the str/int values the outbox can carry."""
    if not headers:
        return {}
    return {
        k: v
        for k, v in headers.items()
        if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
    }
