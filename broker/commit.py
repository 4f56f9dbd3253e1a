"""Group commit: one workflow's batches written together, two round trips each.

Every shard of a workflow hands its decoded batch to the workflow's
`GroupCommit`. One transaction runs at a time per workflow; the batches
that arrive while it runs are written together by the next one. Under a
steady trickle, four shards then cost one read and one write between them
instead of four of each, and the fixed per-batch cost in Postgres, in the
relay and here shrinks with it; under load, batches grow as they would have.

One write is: read which idempotency keys are already claimed and the
instances' states (one statement, no locks); apply the events in delivery
order in memory; write keys, states, outbox rows, dead letters and the
journal atomically (one call of ``q2c_commit_batch``). A concurrent writer
(another daemon took over a shard) makes it raise `ConcurrencyConflict`,
and the group is read and applied again; an outage retries with back-off
until ``commit-deadline-s``. Deliveries stay unacknowledged throughout: a
shard acknowledges its batch only after the write that contains it.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any, final

import anyio
import msgspec
import structlog

from broker.codec import encode_envelope, encode_event, utcnow
from broker.config import CoreConfig
from broker.errors import PermanentError, TransientError
from broker.faults import CrashHook
from broker.metrics import Metrics
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
from broker.transport import Delivery
from broker.transport.topology import DEAD_EXCHANGE, retry_exchange
from broker.workflow import Workflow
from canonical.envelope import Envelope

__all__ = ["ATTEMPT_HEADER", "GroupCommit", "Item", "Outcome", "message_id_for"]

ATTEMPT_HEADER = "x-q2c-attempt"
_log = structlog.get_logger(__name__)


def message_id_for(idempotency_key: str) -> str:
    """The message id of an emitted message: the same fact, the same id.

    A 128-bit BLAKE2b of the key, in hex: as unique as a UUID, ten times
    cheaper than ``uuid5`` on the hot path.
    """
    return hashlib.blake2b(idempotency_key.encode(), digest_size=16).hexdigest()


class Outcome:
    """What a write did with one shard's batch. Internal: not for outside broker/."""

    __slots__ = ("applied", "dead", "duplicates", "group", "outbox", "retried")

    def __init__(self) -> None:
        self.applied = 0
        self.duplicates = 0
        self.retried = 0
        self.dead: list[str] = []
        #: Rows to hand to the relay: all of the write's, on the request that led it.
        self.outbox: list[OutboxRow] = []
        #: How many shards' batches the write contained.
        self.group = 1


class Item:
    """One decoded delivery on its way through a write. Internal."""

    __slots__ = ("attempt", "delivery", "envelope", "event", "req")

    def __init__(self, delivery: Delivery, envelope: Envelope, event: Any) -> None:
        self.delivery = delivery
        self.envelope = envelope
        self.event = event
        headers = delivery.headers
        raw = headers.get(ATTEMPT_HEADER, 1) if headers else 1
        self.attempt = raw if isinstance(raw, int) and raw > 0 else 1
        self.req: _Request


class _Request:
    """One shard's batch waiting to be written. Internal."""

    __slots__ = ("bad", "done", "error", "items", "outcome", "queue", "size")

    def __init__(
        self,
        queue: str,
        items: list[Item],
        bad: Sequence[tuple[Delivery, PermanentError]],
    ) -> None:
        self.queue = queue
        self.items = items
        self.bad = bad
        self.size = len(items) + len(bad)
        self.outcome = Outcome()
        self.done = False
        self.error: BaseException | None = None
        for item in items:
            item.req = self


@final
class GroupCommit:
    """Writes the batches of one workflow's shards, together when they meet."""

    def __init__(
        self,
        *,
        workflow: Workflow[Any],
        store: Store,
        core: CoreConfig,
        retry: RetryPolicy,
        metrics: Metrics,
        crash: CrashHook,
    ) -> None:
        self._wf = workflow
        self._store = store
        self._core = core
        self._retry = retry
        self._metrics = metrics
        self._crash = crash
        self._state_decoder = msgspec.json.Decoder(workflow.state_type)
        self._encoder = msgspec.json.Encoder(decimal_format="string")
        self._source = f"/q2c/{workflow.name}"
        self._lock = anyio.Lock()
        # Bounded by the shards: each has at most one batch waiting here.
        self._pending: list[_Request] = []

    def __repr__(self) -> str:
        return f"<GroupCommit {self._wf.name} {len(self._pending)} waiting>"

    async def write(
        self,
        queue: str,
        items: list[Item],
        bad: Sequence[tuple[Delivery, PermanentError]],
    ) -> Outcome:
        """Write one shard's batch, alone or with others; return what happened to it.

        Raises:
            TransientError: the store stayed unavailable past ``commit-deadline-s``.
        """
        req = _Request(queue, items, bad)
        self._pending.append(req)
        async with self._lock:
            if not req.done:
                group, self._pending = self._pending, []
                try:
                    rows = await self._write_with_retry(group)
                except Exception as exc:
                    # Nothing was written: every shard in the group fails with
                    # the same cause, and their deliveries come back.
                    for r in group:
                        r.done, r.error = True, exc
                    raise
                except BaseException:
                    # This writer was cancelled, not the others: nothing was
                    # written, so their batches wait for the next writer.
                    self._pending[:0] = [r for r in group if r is not req]
                    raise
                for r in group:
                    r.done = True
                    r.outcome.group = len(group)
                req.outcome.outbox = rows
        if req.error is not None:
            raise req.error
        return req.outcome

    async def _write_with_retry(self, group: list[_Request]) -> list[OutboxRow]:
        backoff = Backoff(0.05, 5.0)
        deadline = time.monotonic() + self._core.commit_deadline_s
        while True:
            try:
                return await self._write(group)
            except TransientError as exc:
                # StoreUnavailable or ConcurrencyConflict: nothing was written;
                # the deliveries are still the shards', unacknowledged.
                if time.monotonic() > deadline:
                    raise
                delay = backoff.next_delay()
                self._metrics.commit_retries.inc()
                _log.warning(
                    "batch_commit_retried",
                    workflow=self._wf.name,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 3),
                )
                await anyio.sleep(delay)

    async def _write(self, group: list[_Request]) -> list[OutboxRow]:
        """Read (one round trip), apply in memory, write (one round trip)."""
        wf = self._wf
        for req in group:
            req.outcome = Outcome()
        items = [item for req in group for item in req.items]
        now = utcnow()
        records: list[OutboxRecord] = []
        dead: list[DeadLetterRecord] = []
        journal: list[JournalRecord] = []

        for req in group:
            for d, exc in req.bad:
                self._dead_letter(
                    req.queue, d, exc.reason, str(exc), 1, records, dead, journal
                )
                req.outcome.dead.append(exc.reason)

        read = await self._store.prepare_batch(
            wf.name,
            list({k.key: k for k in map(_inbox_key, items)}.values()),
            wf.name,
            sorted({i.envelope.correlation_id for i in items}),
        )
        seen: set[str] = set(read.claimed)
        to_apply: list[Item] = []
        for item in items:
            key = item.envelope.idempotency_key
            if key in seen:  # claimed before, or earlier in this batch
                item.req.outcome.duplicates += 1
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
                    item.req.queue,
                    item.delivery,
                    exc.reason,
                    str(exc),
                    item.attempt,
                    records,
                    dead,
                    journal,
                )
                item.req.outcome.dead.append(exc.reason)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad message must not stall the shard
                released.add(env.idempotency_key)
                self._schedule_retry(item, exc, records, dead, journal)
                continue
            states[cid] = applied.state
            dirty.add(cid)
            item.req.outcome.applied += 1
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
        self._crash.passed("mid_txn", sum(r.size for r in group))
        return await self._store.commit_batch(write)

    def _dead_letter(
        self,
        queue: str,
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
                queue=queue,
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
                routing_key=queue,
                body=d.body,
                correlation_id=d.correlation_id,
                type=d.type,
                headers={
                    **_plain_headers(d.headers),
                    "x-q2c-reason": reason,
                    "x-q2c-detail": detail[:500],
                    "x-q2c-queue": queue,
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
            queue=queue,
            message_id=message_id,
            correlation_id=d.correlation_id,
            reason=reason,
            detail=detail[:200],
            attempt=attempts,
        )

    def _schedule_retry(
        self,
        item: Item,
        exc: Exception,
        records: list[OutboxRecord],
        dead: list[DeadLetterRecord],
        journal: list[JournalRecord],
    ) -> None:
        d = item.delivery
        out = item.req.outcome
        queue = item.req.queue
        env = item.envelope
        error = f"{type(exc).__name__}: {exc}"
        tier = self._retry.tier_for(item.attempt)
        if tier is None:
            self._dead_letter(
                queue,
                d,
                "attempts_exhausted",
                error,
                item.attempt,
                records,
                dead,
                journal,
            )
            out.dead.append("attempts_exhausted")
            return
        expected = isinstance(exc, TransientError)
        (_log.info if expected else _log.error)(
            "delivery_retry_scheduled",
            queue=queue,
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
                routing_key=queue,
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


def _inbox_key(item: Item) -> InboxKey:
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
