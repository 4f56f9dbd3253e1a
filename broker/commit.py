"""Group commit: one workflow's batches written together, two round trips each.

Every shard of a workflow hands its decoded batch to the workflow's
`GroupCommit`. At most ``commit-writers`` transactions (two by default) run
at a time per workflow; the batches that arrive while they run are written
together by the next one. Under a steady trickle, four shards then cost one
read and one write between them instead of four of each, and the fixed
per-batch cost in Postgres, in the relay and here shrinks with it; under
load, batches grow as they would have. A second writer keeps a batch from
waiting for the whole write before it: transactions in flight together
never share an instance, since an instance belongs to one shard and a shard
has one batch in flight.

One write is: read which idempotency keys are already claimed, the
instances' states and their holds (one statement, no locks); apply the
events in delivery order in memory (`broker.holds.Applier`, into a
`broker._pass.Pass`); write keys, states, holds, outbox rows, dead letters,
held messages and the journal atomically (one call of
``q2c_commit_batch_v2``). A concurrent writer (another daemon took over a
shard) makes it raise `ConcurrencyConflict`, and the group is read and
applied again; an outage retries with back-off until ``commit-deadline-s``.
Deliveries stay unacknowledged throughout: a shard acknowledges its batch
only after the write that contains it.

Holds keep one instance's messages in order behind a parked message
(`broker.holds`). When a blocker comes back in a batch, the write reads
back the messages it holds, to release them right after it: that costs
two more round trips, only in the write that releases them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, final

import anyio
import msgspec
import structlog

from broker._pass import Backlog, Pass
from broker.codec import Decoders, decode_envelope
from broker.config import CoreConfig
from broker.errors import PermanentError, StateUndecodable, TransientError
from broker.faults import CrashHook
from broker.holds import RELEASED_HEADER, Applier, held_record, hold_writes, is_blocker
from broker.letters import ATTEMPT_HEADER, message_id_for
from broker.metrics import Metrics
from broker.retry import Backoff, RetryPolicy
from broker.store import (
    BatchWrite,
    DeadLetterRow,
    InboxKey,
    OutboxRow,
    SagaWrite,
    Store,
)
from broker.transport import Delivery
from broker.workflow import Workflow
from canonical.envelope import Envelope

__all__ = [
    "ATTEMPT_HEADER",
    "RELEASED_HEADER",
    "GroupCommit",
    "Item",
    "Outcome",
    "ShardBatch",
    "message_id_for",
]

_log = structlog.get_logger(__name__)


class Outcome:
    """What a write did with one shard's batch. Internal: not for outside broker/."""

    __slots__ = (
        "applied",
        "dead",
        "duplicates",
        "group",
        "held",
        "outbox",
        "released",
        "retried",
    )

    def __init__(self) -> None:
        self.applied = 0
        self.duplicates = 0
        self.retried = 0
        #: Deliveries recorded as held behind a parked message of their instance.
        self.held = 0
        #: Held messages this batch's blockers released (applied or parked again).
        self.released = 0
        self.dead: list[str] = []
        #: Rows to hand to the relay: all of the write's, on the request that led it.
        self.outbox: list[OutboxRow] = []
        #: How many shards' batches the write contained.
        self.group = 1


class Item:
    """One delivery with its envelope on its way through a write. Internal.

    ``error`` is set when the envelope decoded but its data did not: the
    item is dead-lettered in its place in the batch (it may hold its
    instance). ``queue`` is where it came from, by default its shard's queue.
    """

    __slots__ = ("attempt", "delivery", "envelope", "error", "event", "queue", "req")

    def __init__(
        self,
        delivery: Delivery,
        envelope: Envelope,
        event: Any,
        *,
        error: PermanentError | None = None,
        queue: str = "",
    ) -> None:
        self.delivery = delivery
        self.envelope = envelope
        self.event = event
        self.error = error
        self.queue = queue
        headers = delivery.headers
        raw = headers.get(ATTEMPT_HEADER, 1) if headers else 1
        self.attempt = raw if isinstance(raw, int) and raw > 0 else 1
        self.req: ShardBatch


class ShardBatch:
    """One shard's batch waiting to be written, and what became of it. Internal."""

    __slots__ = (
        "bad",
        "done",
        "error",
        "items",
        "outcome",
        "queue",
        "settled",
        "size",
        "taken",
    )

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
        #: In a writer's group (written, or being written).
        self.taken = False
        #: Set when the writer that took it finishes, or gives it back.
        self.settled = anyio.Event()
        self.error: BaseException | None = None
        for item in items:
            item.req = self
            item.queue = item.queue or queue

    def settle(self) -> None:
        """Wake whoever waits for this request's writer; arm a fresh event."""
        settled, self.settled = self.settled, anyio.Event()
        settled.set()


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
        self._metrics = metrics
        self._crash = crash
        self._applier = Applier(workflow, retry)
        self._state_decoder = msgspec.json.Decoder(workflow.state_type)
        self._decoders = Decoders(workflow.events)
        self._encoder = msgspec.json.Encoder(decimal_format="string")
        self._writers = anyio.Semaphore(core.commit_writers)
        # Bounded by the shards: each has at most one batch waiting here.
        self._pending: list[ShardBatch] = []

    def __repr__(self) -> str:
        return f"<GroupCommit {self._wf.name} {len(self._pending)} waiting>"

    async def write(
        self,
        queue: str,
        items: list[Item],
        bad: Sequence[tuple[Delivery, PermanentError]],
    ) -> Outcome:
        """Write one shard's batch, alone or with others; return what happened to it.

        *items* are in delivery order; *bad* are deliveries without a
        decodable envelope (dead-lettered, never holding an instance).

        Raises:
            TransientError: the store stayed unavailable past ``commit-deadline-s``.
        """
        req = ShardBatch(queue, items, bad)
        self._pending.append(req)
        while not req.done:
            if req.taken:
                await req.settled.wait()
                continue
            async with self._writers:
                if not req.taken:
                    await self._write_group(req)
        # Each item points back at its batch (`Item.req`). Dropping the list
        # breaks that cycle, so the batch, its deliveries and their bodies go
        # by reference counting as soon as the shard lets go of them, instead
        # of piling up for the cycle collector's oldest generation, whose
        # passes stall the event loop for tens of milliseconds.
        req.items = []
        if req.error is not None:
            raise req.error
        return req.outcome

    async def _write_group(self, req: ShardBatch) -> None:
        """Write *req* with every batch waiting now; *req*'s shard relays the rows.

        Groups in flight at once never share an instance: a shard has one
        batch in flight at a time, and an instance belongs to one shard.
        """
        group, self._pending = self._pending, []
        for r in group:
            r.taken = True
        try:
            rows = await self._write_with_retry(group)
        except Exception as exc:
            # Nothing was written: every shard in the group fails with the
            # same cause, and their deliveries come back.
            for r in group:
                r.done, r.error = True, exc
                r.settle()
            raise
        except BaseException:
            # This writer was cancelled, not the others: nothing was written,
            # so their batches go back to wait for the next writer.
            others = [r for r in group if r is not req]
            self._pending[:0] = others
            for r in others:
                r.taken = False
                r.settle()
            raise
        for r in group:
            r.done = True
            r.outcome.group = len(group)
            r.settle()
        req.outcome.outbox = rows

    async def _write_with_retry(self, group: list[ShardBatch]) -> list[OutboxRow]:
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

    async def _write(self, group: list[ShardBatch]) -> list[OutboxRow]:
        """Read (one round trip), apply in memory, write (one round trip)."""
        wf = self._wf
        for req in group:
            req.outcome = Outcome()
        items = [item for req in group for item in req.items]
        read = await self._store.prepare_batch(
            wf.name,
            list({k.key: k for k in map(_inbox_key, items) if k is not None}.values()),
            wf.name,
            sorted({i.envelope.correlation_id for i in items}),
        )
        p = Pass(read)
        if read.holds:
            await self._read_backlog(p, items)
        for cid, rec in read.sagas.items():
            p.versions[cid] = rec.version
            try:
                p.states[cid] = self._state_decoder.decode(rec.state)
            except (msgspec.DecodeError, msgspec.ValidationError) as undecodable:
                # One instance's state, not the group's write: its messages
                # are dead-lettered, the others' go on.
                p.broken[cid] = StateUndecodable(
                    f"the stored {wf.name} state of {cid[:100]} does not decode: "
                    f"{undecodable}"
                )
                _log.error(
                    "saga_state_undecodable",
                    workflow=wf.name,
                    correlation_id=cid,
                    error=str(undecodable),
                )

        for req in group:
            for d, exc in req.bad:
                p.dead_letter(req.queue, d, exc, 1, d.correlation_id)
                req.outcome.dead.append(exc.reason)
        for item in items:
            self._applier.take(p, item)

        write = BatchWrite(
            consumer=wf.name,
            workflow=wf.name,
            keys=p.claims,
            sagas=[
                SagaWrite(
                    correlation_id=cid,
                    expected_version=p.versions.get(cid, 0),
                    state=self._encoder.encode(p.states[cid]),
                )
                for cid in sorted(p.dirty)
            ],
            outbox=p.records,
            dead_letters=p.dead,
            journal=p.journal,
            held=[
                held_record(item, p.holds[cid])
                for cid, waiting in p.waiting.items()
                for item in waiting
            ],
            holds=hold_writes(p),
            released=p.released,
            xref=p.xref,
        )
        self._crash.passed("mid_txn", sum(r.size for r in group))
        return await self._store.commit_batch(write)

    async def _read_backlog(self, p: Pass, items: list[Item]) -> None:
        """Read back what the blockers in this batch hold (the rare path)."""
        blocking = sorted(
            {
                i.envelope.correlation_id
                for i in items
                if is_blocker(p.read.holds.get(i.envelope.correlation_id), i)
            }
        )
        if not blocking:
            return
        most = self._core.batch_max
        rows = await self._store.held_messages(
            self._wf.name, blocking, limit_each=most + 1
        )
        for row in rows:
            cid = row.correlation_id or ""
            backlog = p.backlog.setdefault(cid, [])
            if len(backlog) < most:
                backlog.append(self._backlog_entry(row))
            else:
                p.overflow.setdefault(cid, row)
        keys = [
            k
            for entries in p.backlog.values()
            for e in entries
            if e.item is not None and (k := _inbox_key(e.item)) is not None
        ]
        if keys:
            again = await self._store.prepare_batch(
                self._wf.name, keys, self._wf.name, []
            )
            p.seen.update(again.claimed)

    def _backlog_entry(self, row: DeadLetterRow) -> Backlog:
        d = Delivery(
            tag=0,
            body=row.body,
            routing_key=row.routing_key,
            message_id=row.message_id,
            correlation_id=row.correlation_id,
            type=row.type,
            headers=row.headers,
        )
        try:
            env = decode_envelope(row.body, max_bytes=self._core.max_message_bytes)
        except PermanentError as exc:
            return Backlog(row, d, None, exc)
        try:
            item = Item(d, env, self._decoders.decode_data(env), queue=row.queue)
        except PermanentError as exc:
            item = Item(d, env, None, error=exc, queue=row.queue)
        return Backlog(row, d, item, None)


def _inbox_key(item: Item) -> InboxKey | None:
    """The inbox key of a decoded delivery (None when its data did not decode)."""
    return None if item.error is not None else _inbox_key_of(item.envelope)


def _inbox_key_of(env: Envelope) -> InboxKey:
    """An envelope's idempotency key on its fact's own day."""
    return InboxKey(key=env.idempotency_key, day=env.time.date(), message_id=env.id)
