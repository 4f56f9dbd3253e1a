"""The outbox relay: publishes committed outbox rows with publisher confirms.

Rows reach the relay two ways. The fast path: a shard that has just
committed a batch hands the new rows over in memory (`OutboxFeed`), so a
message is published within milliseconds of its commit. The recovery path:
a poller leases rows whose writer's lease ran out (the writer crashed, the
relay restarted, a publish was not confirmed) with ``FOR UPDATE SKIP
LOCKED``, and rows that just fell due: delayed emits (durable timers) are
never leased to their writer, so only the poller publishes them, within
``relay-poll-s`` of their time. Either way a row is deleted only after the
broker confirmed it; a crash between the confirm and the delete republishes
it with the same ``message_id``, and the receiver's inbox drops the
duplicate.

Outcomes: ACK → delete; NACK (queue full) → retry with growing delay;
INDETERMINATE (timeout, connection lost) → retry soon; RETURNED
(unroutable) → parked for an operator, logged as an error: a routing bug,
not something time will fix. A row that no AMQP frame can carry (a name or
id over 255 bytes) is parked before it is tried, for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import final

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from broker.actor import Actor, Context
from broker.config import CoreConfig
from broker.errors import StoreUnavailable
from broker.faults import CrashHook
from broker.metrics import Metrics
from broker.retry import Backoff
from broker.store import OutboxRow, Store
from broker.transport import (
    SHORTSTR_MAX_BYTES,
    OutgoingMessage,
    PublishOutcome,
    Transport,
    fits_shortstr,
)

__all__ = ["OutboxFeed", "OutboxRelay", "to_message"]

#: How long confirmed rows wait to be deleted together.
_DELETE_INTERVAL_S = 0.05
#: Longest wait between probes while the broker refuses our publishing.
_REFUSED_MAX_S = 30.0
#: Rows remembered as in flight when the broker closed the channel (suspects).
_MAX_SUSPECTS = 10_000
#: Rounds of its own a suspect may close the channel in before it is parked.
_SOLO_CLOSES = 3
#: The longest a suspect waits between its rounds.
_SUSPECT_DELAY_MAX_S = 2.0


@final
class OutboxFeed:
    """The bounded in-memory hand-over from committing shards to the relay.

    Bounded in batches and in rows: one batch is a whole commit group's rows
    (its shards times ``batch-max`` messages times what each emits), so a count of
    batches alone would let a stalled relay (a RabbitMQ memory alarm blocks
    publishing while consumers drain) hold gigabytes. When either bound is
    reached, ``put`` waits, the shard stops taking deliveries, and RabbitMQ
    holds the backlog. A batch is taken whole while the feed holds fewer
    than *max_rows* rows, so a group larger than the bound still passes.
    """

    def __init__(self, max_batches: int = 64, max_rows: int = 16_000) -> None:
        send: ObjectSendStream[list[OutboxRow]]
        receive: ObjectReceiveStream[list[OutboxRow]]
        send, receive = anyio.create_memory_object_stream[list[OutboxRow]](max_batches)
        self._send = send
        self._receive = receive
        self.max_batches = max_batches
        self.max_rows = max_rows
        self._rows = 0
        self._room = anyio.Event()

    async def put(self, rows: list[OutboxRow]) -> None:
        """Hand *rows* (already committed) to the relay, waiting for room."""
        if not rows:
            return
        while self._rows >= self.max_rows:
            await self._room.wait()
        self._rows += len(rows)
        try:
            await self._send.send(rows)
        except BaseException:
            self._taken(len(rows))
            raise

    def offer(self, rows: list[OutboxRow]) -> bool:
        """Hand *rows* over if there is room now; False leaves them to the poller.

        For writers that must not wait for the relay (an HTTP request in
        hand): rows not taken stay leased in the outbox, and the poller
        publishes them once the lease runs out.
        """
        if not rows:
            return True
        if self._rows >= self.max_rows:
            return False
        try:
            self._send.send_nowait(rows)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            return False
        self._rows += len(rows)
        return True

    async def take(self) -> list[OutboxRow]:
        """The next batch of rows, waiting for one.

        Raises:
            anyio.EndOfStream: the feed was closed.
        """
        rows = await self._receive.receive()
        self._taken(len(rows))
        return rows

    def take_nowait(self) -> list[OutboxRow]:
        """The next batch of rows if one is waiting.

        Raises:
            anyio.WouldBlock: none is.
        """
        rows = self._receive.receive_nowait()
        self._taken(len(rows))
        return rows

    def _taken(self, n: int) -> None:
        self._rows -= n
        if self._rows < self.max_rows:
            self._room.set()
            self._room = anyio.Event()

    def close(self) -> None:
        """Close both ends; rows left inside are leased in the outbox and recovered."""
        self._send.close()
        self._receive.close()

    @property
    def fill(self) -> int:
        """Batches waiting for the relay."""
        return self._send.statistics().current_buffer_used

    @property
    def rows(self) -> int:
        """Rows waiting for the relay."""
        return self._rows

    def __repr__(self) -> str:
        return f"<OutboxFeed {self.fill}/{self.max_batches} batches, {self._rows} rows>"


def unpublishable(row: OutboxRow) -> str | None:
    """Why no AMQP publish can carry *row* (None: it fits).

    The exchange, routing key, message id, correlation id, type and header
    names are AMQP short strings; the frame encoder refuses a longer one.
    Asked of every row published, so a row that fits costs no encoding.
    """
    for name, value in (
        ("exchange", row.exchange),
        ("routing key", row.routing_key),
        ("message id", row.message_id),
        ("correlation id", row.correlation_id or ""),
        ("type", row.type or ""),
    ):
        if not fits_shortstr(value):
            return f"unpublishable: its {name} is over {SHORTSTR_MAX_BYTES} bytes"
    for key in row.headers:
        if not fits_shortstr(key):
            return (
                f"unpublishable: its header name {key[:40]!r} is over "
                f"{SHORTSTR_MAX_BYTES} bytes"
            )
    return None


def to_message(row: OutboxRow) -> OutgoingMessage:
    """The AMQP message for one outbox row."""
    return OutgoingMessage(
        exchange=row.exchange,
        routing_key=row.routing_key,
        body=row.body,
        message_id=row.message_id,
        correlation_id=row.correlation_id,
        type=row.type,
        headers=row.headers,
    )


@final
class OutboxRelay(Actor[None]):
    """Publish outbox rows and record each one's outcome.

    Owns: the publishing of committed rows. Redelivery safety: rows carry
    their message id; receivers deduplicate. Failure: a crash loses only the
    in-memory fast-path rows, whose leases expire and the poller republishes
    them; a store outage backs off and leaves rows unsent.
    """

    def __init__(
        self,
        *,
        store: Store,
        transport: Transport,
        feed: OutboxFeed,
        core: CoreConfig,
        publish_timeout_s: float,
        metrics: Metrics,
        crash: CrashHook,
    ) -> None:
        self._store = store
        self._transport = transport
        self._feed = feed
        self._core = core
        self._timeout_s = publish_timeout_s
        self._metrics = metrics
        self._crash = crash
        self._workers = core.relay_workers
        self.in_flight = 0
        # Confirmed row ids not yet deleted: deleted together, a few times a
        # second, instead of one transaction per publish round.
        self._confirmed: list[int] = []
        self._has_confirmed = anyio.Event()
        self._idle = anyio.Event()
        self._idle.set()
        # While the broker refuses our publishing (permissions), one probe per
        # back-off period; every other row waits in the store until then.
        self._refused_until = 0.0
        self._refusals = Backoff(1.0, _REFUSED_MAX_S)
        # Rows that were in flight when the broker closed the channel: one of
        # them made it (a message over its size limit, to an exchange that
        # does not exist), the rest shared its channel. By id: the size of
        # round each may go out in (halved at each close it is in, so the
        # culprit is found in a few rounds, not one row at a time), and how
        # often it closed the channel alone; at `_SOLO_CLOSES` it is parked.
        self._suspects: dict[int, list[int]] = {}

    async def on_start(self, ctx: Context[None]) -> None:
        """Start the publishing workers and the recovery poller."""
        for n in range(self._workers):
            ctx.start_soon(self._work, ctx, name=f"{ctx.id}.worker{n}")
        ctx.start_soon(self._poll, ctx, name=f"{ctx.id}.poller")
        ctx.start_soon(self._delete_sent_loop, ctx, name=f"{ctx.id}.deleter")

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """The relay takes no messages; its work arrives through the feed."""

    async def on_stop(self, ctx: Context[None]) -> None:
        """Publish what the feed still holds, within the shutdown grace."""
        while True:
            try:
                rows = self._feed.take_nowait()
            except anyio.WouldBlock:
                break
            await self._publish(rows, ctx)
        await self._idle.wait()
        await self._delete_confirmed(ctx)

    async def _work(self, ctx: Context[None]) -> None:
        feed = self._feed
        limit = self._core.relay_batch
        while True:
            try:
                rows = list(await feed.take())
            except anyio.EndOfStream:
                return
            while len(rows) < limit:
                try:
                    rows.extend(feed.take_nowait())
                except anyio.WouldBlock:
                    break
            await self._publish(rows, ctx)

    async def _delete_sent_loop(self, ctx: Context[None]) -> None:
        while True:
            await self._has_confirmed.wait()
            await anyio.sleep(_DELETE_INTERVAL_S)  # let confirms of other rounds join
            await self._delete_confirmed(ctx)

    async def _delete_confirmed(self, ctx: Context[None]) -> None:
        ids, self._confirmed = self._confirmed, []
        self._has_confirmed = anyio.Event()
        if not ids:
            return
        try:
            await self._store.delete_sent(ids)
        except StoreUnavailable as exc:
            # Dropping the ids keeps memory bounded through a long outage: the
            # rows stay leased, the poller republishes them after the lease,
            # and receivers drop the duplicates.
            ctx.log.warning("outbox_mark_failed", error=str(exc), rows=len(ids))

    async def _poll(self, ctx: Context[None]) -> None:
        backoff = Backoff(self._core.relay_poll_s, 30.0)
        while True:
            refused_s = self._refused_until - anyio.current_time()
            if refused_s > 0:
                # Claiming now would only put the rows back until the probe.
                await anyio.sleep(refused_s)
            try:
                rows = await self._store.claim_outbox(
                    limit=self._core.relay_batch, lease_s=self._core.outbox_lease_s
                )
            except StoreUnavailable as exc:
                delay = backoff.next_delay()
                ctx.log.warning("outbox_poll_failed", error=str(exc), retry_in_s=delay)
                await anyio.sleep(delay)
                continue
            backoff.reset()
            if rows:
                # Leased once before (by a writer or a relay): a recovery.
                # Never leased: a delayed row, or a replay, that fell due.
                recovered = sum(1 for r in rows if r.attempts > 1)
                if recovered:
                    ctx.log.info("outbox_rows_recovered", rows=recovered)
                if len(rows) > recovered:
                    ctx.log.debug("outbox_rows_due", rows=len(rows) - recovered)
                await self._publish(rows, ctx)
            if len(rows) < self._core.relay_batch:
                await anyio.sleep(self._core.relay_poll_s)

    async def _publish(self, rows: Sequence[OutboxRow], ctx: Context[None]) -> None:
        self.in_flight += 1
        if self.in_flight == 1:
            self._idle = anyio.Event()
        try:
            # A suspect is published on its own, so that the broker closing
            # the channel again for it does not hold back the rows that shared
            # its first publish, round after round. Every other row, retried
            # or not, goes out together with the rest.
            suspects = self._suspects
            clear = [r for r in rows if r.id not in suspects]
            rounds = [clear] if clear else []
            if suspects and len(clear) < len(rows):
                rounds.extend(_suspect_rounds(rows, suspects))
            for n, round_rows in enumerate(rounds):
                wait_s = self._refused_until - anyio.current_time()
                if wait_s > 0:
                    later = [r for rr in rounds[n:] for r in rr]
                    await self._hold_back(later, wait_s, ctx)
                    break
                await self._publish_together(round_rows, ctx)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    async def _publish_together(
        self, rows: Sequence[OutboxRow], ctx: Context[None]
    ) -> None:
        if any(unpublishable(r) for r in rows):
            rows = await self._park_unpublishable(rows, ctx)
            if not rows:
                return
        closes, _ = self._transport.channel_closes
        outcomes: Sequence[PublishOutcome] = await self._transport.publish(
            [to_message(r) for r in rows], timeout_s=self._timeout_s
        )
        self._crash.passed("after_confirm_before_mark", len(rows))
        after, reason = self._transport.channel_closes
        if after != closes:
            rows, outcomes = await self._suspect(rows, outcomes, reason, ctx)
        await self._settle(rows, outcomes, ctx)

    async def _suspect(
        self,
        rows: Sequence[OutboxRow],
        outcomes: Sequence[PublishOutcome],
        reason: str | None,
        ctx: Context[None],
    ) -> tuple[Sequence[OutboxRow], Sequence[PublishOutcome]]:
        """The broker closed the channel during this round: note its suspects.

        Rows left without an answer become suspects (published alone from
        now on); one that was alone, and has closed the channel
        `_SOLO_CLOSES` times so, is parked. Returns the rows and outcomes
        still to settle.
        """
        suspects = self._suspects
        half = max(1, len(rows) // 2)
        parked: list[OutboxRow] = []
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome is not PublishOutcome.INDETERMINATE:
                continue
            known = suspects.get(row.id)
            if known is None:
                if len(suspects) < _MAX_SUSPECTS:
                    suspects[row.id] = [half, 0]
            elif len(rows) == 1:
                known[1] += 1
                if known[1] >= _SOLO_CLOSES:
                    parked.append(row)
            else:
                known[0] = half
        if not parked or self._transport.refusal is not None:
            return rows, outcomes
        why = f"refused by the broker: {reason or 'channel closed'}"[:500]
        try:
            await self._store.park_outbox([r.id for r in parked], reason=why)
        except StoreUnavailable as exc:
            ctx.log.warning("outbox_mark_failed", error=str(exc), rows=len(parked))
            return rows, outcomes
        for row in parked:
            del suspects[row.id]
            ctx.log.error(
                "outbox_message_refused",
                exchange=row.exchange[:100],
                routing_key=row.routing_key[:100],
                message_id=row.message_id[:100],
                reason=why,
            )
        self._metrics.publish_failed.labels("refused_alone").inc(len(parked))
        gone = {r.id for r in parked}
        kept = [(r, o) for r, o in zip(rows, outcomes, strict=True) if r.id not in gone]
        return [r for r, _ in kept], [o for _, o in kept]

    async def _settle(
        self,
        rows: Sequence[OutboxRow],
        outcomes: Sequence[PublishOutcome],
        ctx: Context[None],
    ) -> None:
        acked: list[int] = []
        nacked: list[OutboxRow] = []
        unknown: list[OutboxRow] = []
        returned: list[OutboxRow] = []
        suspects = self._suspects
        for row, outcome in zip(rows, outcomes, strict=True):
            if outcome is PublishOutcome.ACK:
                acked.append(row.id)
                if suspects:
                    suspects.pop(row.id, None)
            elif outcome is PublishOutcome.NACK:
                nacked.append(row)
            elif outcome is PublishOutcome.RETURNED:
                returned.append(row)
            else:
                unknown.append(row)
        try:
            if acked:
                self._refusals.reset()
                self._metrics.published.inc(len(acked))
                self._confirmed.extend(acked)
                self._has_confirmed.set()
            if nacked:
                # The queue is full (reject-publish): wait longer each attempt.
                await self._reschedule(
                    nacked, "nack", "outbox_publish_nacked", first_s=2.0, ctx=ctx
                )
            refusal = self._transport.refusal if unknown else None
            if refusal is not None:
                # The broker will refuse every row until an operator changes
                # the user's permissions: stop trying but for one probe now
                # and then, rather than a channel per row.
                delay = self._refusals.next_delay()
                self._refused_until = anyio.current_time() + delay
                await self._store.reschedule_outbox(
                    [r.id for r in unknown], delay_s=delay
                )
                self._metrics.publish_failed.labels("refused").inc(len(unknown))
                ctx.log.error(
                    "outbox_publish_refused",
                    rows=len(unknown),
                    reason=refusal,
                    retry_in_s=round(delay, 2),
                )
            elif unknown:
                # No answer: the connection dropped, the broker refused the
                # channel, or the confirm was late. Soon at first, then slower,
                # so a row the broker keeps refusing cannot become a hot loop;
                # suspects no slower than `_SUSPECT_DELAY_MAX_S`: their rounds
                # shrink until the culprit is parked, so they end anyway.
                suspects = self._suspects
                suspected = [r for r in unknown if r.id in suspects]
                others = [r for r in unknown if r.id not in suspects]
                for group, cap_s in ((others, 60.0), (suspected, _SUSPECT_DELAY_MAX_S)):
                    if group:
                        await self._reschedule(
                            group,
                            "indeterminate",
                            "outbox_publish_indeterminate",
                            first_s=0.5,
                            cap_s=cap_s,
                            ctx=ctx,
                        )
            if returned:
                await self._store.park_outbox(
                    [r.id for r in returned],
                    reason="unroutable (returned by the broker)",
                )
                self._metrics.publish_failed.labels("returned").inc(len(returned))
                for row in returned[:10]:
                    ctx.log.error(
                        "outbox_message_unroutable",
                        exchange=row.exchange,
                        routing_key=row.routing_key,
                        message_id=row.message_id,
                    )
        except StoreUnavailable as exc:
            # Unmarked rows stay leased; after the lease the poller republishes
            # them and receivers drop the duplicates.
            ctx.log.warning("outbox_mark_failed", error=str(exc), rows=len(rows))

    async def _park_unpublishable(
        self, rows: Sequence[OutboxRow], ctx: Context[None]
    ) -> list[OutboxRow]:
        """Park the rows no frame can carry; return the others."""
        fit: list[OutboxRow] = []
        for row in rows:
            reason = unpublishable(row)
            if reason is None:
                fit.append(row)
                continue
            try:
                await self._store.park_outbox([row.id], reason=reason)
            except StoreUnavailable as exc:
                # Still leased: the poller tries it, and parks it, again.
                ctx.log.warning("outbox_mark_failed", error=str(exc), rows=1)
                continue
            self._metrics.publish_failed.labels("unpublishable").inc()
            ctx.log.error(
                "outbox_message_unpublishable",
                reason=reason,
                exchange=row.exchange[:100],
                message_id=row.message_id[:100],
            )
        return fit

    async def _hold_back(
        self, rows: Sequence[OutboxRow], wait_s: float, ctx: Context[None]
    ) -> None:
        """Leave *rows*, not tried, in the store until the refusal's probe is due."""
        try:
            await self._store.reschedule_outbox([r.id for r in rows], delay_s=wait_s)
        except StoreUnavailable as exc:
            # Still leased: the poller finds them once the lease ends.
            ctx.log.warning("outbox_mark_failed", error=str(exc), rows=len(rows))

    async def _reschedule(
        self,
        rows: Sequence[OutboxRow],
        outcome: str,
        event: str,
        *,
        first_s: float,
        cap_s: float = 60.0,
        ctx: Context[None],
    ) -> None:
        """Make *rows* eligible again after a delay that grows with their attempts."""
        delay = min(cap_s, _retry_delay(rows, first_s=first_s))
        await self._store.reschedule_outbox([r.id for r in rows], delay_s=delay)
        self._metrics.publish_failed.labels(outcome).inc(len(rows))
        ctx.log.warning(event, rows=len(rows), retry_in_s=delay)


def _suspect_rounds(
    rows: Sequence[OutboxRow], suspects: dict[int, list[int]]
) -> list[list[OutboxRow]]:
    """*rows*' suspects in rounds no larger than each one's size allows."""
    by_size: dict[int, list[OutboxRow]] = {}
    for row in rows:
        known = suspects.get(row.id)
        if known is not None:
            by_size.setdefault(known[0], []).append(row)
    return [
        group[n : n + size]
        for size, group in sorted(by_size.items())
        for n in range(0, len(group), size)
    ]


def _retry_delay(rows: Sequence[OutboxRow], *, first_s: float) -> float:
    """Doubling with the rows' attempts, capped at a minute."""
    attempts = max(r.attempts for r in rows)
    return min(60.0, first_s * math.pow(2, min(max(attempts - 1, 0), 7)))
