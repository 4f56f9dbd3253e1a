"""The high-throughput core: one actor per workflow shard queue.

A shard consumes ``q2c.wf.<workflow>.<n>`` (single-active-consumer, so it
sees one deal's messages in order) and handles what arrived as one batch:

1. decode every delivery with reused decoders; anything undecodable,
   oversize, of unknown type or schema-invalid is dead-lettered in the same
   transaction, never retried (in an ordered workflow, one whose envelope
   decoded holds its instance, see `broker.commit`);
2. hand the batch to the workflow's `GroupCommit`, which writes it (with
   the other shards' batches that arrive meanwhile) in one atomic write:
   idempotency keys claimed (duplicates skipped and counted), the events
   applied in delivery order (or held behind a parked message of their
   instance), states saved at their expected versions, outbox rows (what
   follows, retries, dead-letter copies), dead letters, held messages and
   the journal;
3. hand the new outbox rows to the relay, then acknowledge the whole batch
   with one multiple-ack.

A crash before the commit rolls everything back and the broker redelivers;
a crash after it redelivers messages whose keys are already claimed, so
they are acknowledged without effect. Nothing is acknowledged that is not
durable, and no effect happens twice.
"""

from __future__ import annotations

import time
from typing import Any, final

import anyio

from broker.actor import Actor, Context
from broker.codec import Decoders, decode_envelope
from broker.commit import GroupCommit, Item
from broker.config import CoreConfig
from broker.errors import (
    MessageTooLarge,
    PermanentError,
    TransportUnavailable,
    UndecodableMessage,
)
from broker.faults import CrashHook
from broker.metrics import Metrics
from broker.outbox import OutboxFeed
from broker.store import OutboxRow
from broker.transport import Delivery, Subscription, Transport
from broker.workflow import Workflow

__all__ = ["WorkflowShard"]


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
        commit: GroupCommit,
        feed: OutboxFeed,
        core: CoreConfig,
        prefetch: int,
        metrics: Metrics,
        crash: CrashHook,
    ) -> None:
        self._wf = workflow
        self._queue = queue
        self._transport = transport
        self._commit = commit
        self._feed = feed
        self._core = core
        self._prefetch = prefetch
        self._metrics = metrics
        self._crash = crash
        self._decoders = Decoders(workflow.events)
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
                # Subscribing waits while RabbitMQ is down or refuses us: a
                # drain must not wait for it.
                with anyio.CancelScope() as scope:
                    self._wait_scope = scope
                    sub = await self._transport.subscribe(
                        self._queue, prefetch=self._prefetch
                    )
                self._wait_scope = None
                if scope.cancelled_caught:
                    return
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
                waiting = await self._process(sub, deliveries, ctx)
            self.in_batch = 0
            if waiting:
                # The relay has no room: wait for it (back-pressure: no next
                # batch meanwhile), but not in the shield, where a stop's
                # deadline could not end the wait: a relay that crashed with
                # the feed full would hold the whole tree. The rows are
                # committed and leased; what is not handed over, the poller
                # publishes once the lease runs out.
                await self._feed.put(waiting)

    async def _process(
        self, sub: Subscription, deliveries: list[Delivery], ctx: Context[None]
    ) -> list[OutboxRow]:
        """Decode, commit and acknowledge one batch.

        Returns:
            The batch's outbox rows the relay had no room for ([] if none).
        """
        started = time.perf_counter()
        items: list[Item] = []
        bad: list[tuple[Delivery, PermanentError]] = []
        max_bytes = self._core.max_message_bytes
        for d in deliveries:
            try:
                if d.oversize is not None:
                    raise MessageTooLarge(d.oversize)
                if d.unreadable is not None:
                    raise UndecodableMessage(d.unreadable)
                envelope = decode_envelope(
                    d.body, max_bytes=max_bytes, content_type=d.content_type
                )
            except PermanentError as exc:
                bad.append((d, exc))
                continue
            try:
                items.append(Item(d, envelope, self._decoders.decode_data(envelope)))
            except PermanentError as exc:
                # Its envelope names its instance: dead-lettered in its place
                # in the batch, it may hold the messages behind it.
                items.append(Item(d, envelope, None, error=exc))
        self._metrics.received.labels(self._queue).inc(len(deliveries))
        redelivered = sum(1 for d in deliveries if d.redelivered)
        if redelivered:
            self._metrics.redelivered.labels(self._queue).inc(redelivered)

        decoded = time.perf_counter()
        outcome = await self._commit.write(self._queue, items, bad)
        self._crash.passed("after_commit_before_ack", len(deliveries))
        committed = time.perf_counter()
        waiting = [] if self._feed.offer(outcome.outbox) else outcome.outbox
        sub.ack(deliveries[-1].tag, multiple=True)

        self.batches += 1
        elapsed = time.perf_counter() - started
        m = self._metrics
        m.applied.labels(self._wf.name).inc(outcome.applied)
        if outcome.duplicates:
            m.duplicates.labels(self._wf.name).inc(outcome.duplicates)
        if outcome.retried:
            m.retried.labels(self._wf.name).inc(outcome.retried)
        if outcome.held:
            m.held.labels(self._wf.name).inc(outcome.held)
        if outcome.released:
            m.released.labels(self._wf.name).inc(outcome.released)
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
            held=outcome.held,
            released=outcome.released,
            group=outcome.group,
            duration_ms=round(elapsed * 1000, 2),
            commit_ms=round((committed - decoded) * 1000, 2),
            handoff_ms=round((started + elapsed - committed) * 1000, 2),
            relay_full=bool(waiting),
        )
        return waiting
