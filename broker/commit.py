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
events in delivery order in memory; write keys, states, holds, outbox rows,
dead letters, held messages and the journal atomically (one call of
``q2c_commit_batch_v2``). A concurrent writer (another daemon took over a
shard) makes it raise `ConcurrencyConflict`, and the group is read and
applied again; an outage retries with back-off until ``commit-deadline-s``.
Deliveries stay unacknowledged throughout: a shard acknowledges its batch
only after the write that contains it.

Holds keep one instance's messages in order (DESIGN §4.7). In an ordered
workflow (``ordered = True``), a message that is dead-lettered or sent to a
retry tier holds its instance: the instance's later messages are not
applied but recorded, in arrival order, as dead letters of status ``held``
and acknowledged. When the blocker comes back and is applied (a successful
retry, an operator's replay) the held messages are applied right after it,
in the same write, before anything that follows them in the batch; if one
of them fails in turn, it holds the rest. An operator who purges the
blocker hands the hold to the first held message, which goes back to its
queue (`broker.store.Store.purge_dead_letters`). Reading the held messages
costs two more round trips, only in the write that releases them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, final

import anyio
import msgspec
import structlog

from broker import letters
from broker.codec import (
    Decoders,
    decode_envelope,
    utcnow,
)
from broker.config import CoreConfig
from broker.errors import PermanentError, TransientError
from broker.faults import CrashHook
from broker.letters import ATTEMPT_HEADER, message_id_for
from broker.metrics import Metrics
from broker.retry import Backoff, RetryPolicy
from broker.store import (
    BatchRead,
    BatchWrite,
    DeadLetterRecord,
    DeadLetterRow,
    HoldWrite,
    InboxKey,
    JournalRecord,
    OutboxRecord,
    OutboxRow,
    SagaWrite,
    Store,
)
from broker.transport import Delivery
from broker.workflow import Workflow, is_ordered
from broker.xref import XrefEntry
from canonical.envelope import Envelope

__all__ = ["ATTEMPT_HEADER", "GroupCommit", "Item", "Outcome", "message_id_for"]

#: Set on a held message that a purge or an overflow sends back to its queue.
RELEASED_HEADER = "x-q2c-released"
#: Longer delays (and infinity, and NaN) are a bug in the workflow: not delayed.
_MAX_DELAY_S = 100 * 366 * 86_400.0
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
        self.req: _Request


class _Request:
    """One shard's batch waiting to be written. Internal."""

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


class _Backlog:
    """A held message read back to be released. Internal.

    ``item`` is None when its envelope no longer decodes (``error`` says why).
    """

    __slots__ = ("delivery", "error", "item", "row")

    def __init__(
        self,
        row: DeadLetterRow,
        delivery: Delivery,
        item: Item | None,
        error: PermanentError | None,
    ) -> None:
        self.row = row
        self.delivery = delivery
        self.item = item
        self.error = error


class _Pass:
    """What one pass over a group decides, to be written at once. Internal."""

    __slots__ = (
        "backlog",
        "claims",
        "dead",
        "dirty",
        "held_keys",
        "holds",
        "journal",
        "now",
        "overflow",
        "read",
        "records",
        "released",
        "seen",
        "states",
        "versions",
        "waiting",
        "xref",
    )

    def __init__(self, read: BatchRead) -> None:
        self.read = read
        self.now = utcnow()
        #: Keys claimed, or applied (or parked) earlier in this pass.
        self.seen: set[str] = set(read.claimed)
        #: Keys of the items held in this pass (their copies are duplicates).
        self.held_keys: set[str] = set()
        self.states: dict[str, Any] = {}
        self.versions: dict[str, int] = {}
        self.dirty: set[str] = set()
        self.claims: list[InboxKey] = []
        self.records: list[OutboxRecord] = []
        self.dead: list[DeadLetterRecord] = []
        self.journal: list[JournalRecord] = []
        #: Correlation id → blocker, as it stands after each step.
        self.holds: dict[str, str] = dict(read.holds)
        #: Items of this batch held so far, per instance, in arrival order.
        self.waiting: dict[str, list[Item]] = {}
        #: Held messages read back for the blockers in this batch, per instance.
        self.backlog: dict[str, list[_Backlog]] = {}
        #: Per instance, the first held message beyond what was read back.
        self.overflow: dict[str, DeadLetterRow] = {}
        #: Held messages taken out of their hold (status ``released``).
        self.released: list[str] = []
        #: Cross-references the applied events established.
        self.xref: list[XrefEntry] = []


#: How an item was parked: (the message id that holds its instance now,
#: whether it became a dead letter rather than a retry).
_Parked = tuple[str, bool]


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
        self._ordered = is_ordered(workflow)
        self._state_decoder = msgspec.json.Decoder(workflow.state_type)
        self._decoders = Decoders(workflow.events)
        self._encoder = msgspec.json.Encoder(decimal_format="string")
        self._source = f"/q2c/{workflow.name}"
        self._writers = anyio.Semaphore(core.commit_writers)
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

        *items* are in delivery order; *bad* are deliveries without a
        decodable envelope (dead-lettered, never holding an instance).

        Raises:
            TransientError: the store stayed unavailable past ``commit-deadline-s``.
        """
        req = _Request(queue, items, bad)
        self._pending.append(req)
        while not req.done:
            if req.taken:
                await req.settled.wait()
                continue
            async with self._writers:
                if not req.taken:
                    await self._write_group(req)
        if req.error is not None:
            raise req.error
        return req.outcome

    async def _write_group(self, req: _Request) -> None:
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
        read = await self._store.prepare_batch(
            wf.name,
            list({k.key: k for k in map(_inbox_key, items) if k is not None}.values()),
            wf.name,
            sorted({i.envelope.correlation_id for i in items}),
        )
        p = _Pass(read)
        if read.holds:
            await self._read_backlog(p, items)
        for cid, rec in read.sagas.items():
            p.states[cid] = self._state_decoder.decode(rec.state)
            p.versions[cid] = rec.version

        for req in group:
            for d, exc in req.bad:
                self._dead_letter(p, req.queue, d, exc, 1, d.correlation_id)
                req.outcome.dead.append(exc.reason)
        for item in items:
            self._take(p, item)

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
                _held_record(item, p.holds[cid])
                for cid, waiting in p.waiting.items()
                for item in waiting
            ],
            holds=self._hold_writes(p),
            released=p.released,
            xref=p.xref,
        )
        self._crash.passed("mid_txn", sum(r.size for r in group))
        return await self._store.commit_batch(write)

    async def _read_backlog(self, p: _Pass, items: list[Item]) -> None:
        """Read back what the blockers in this batch hold (the rare path)."""
        blocking = sorted(
            {
                i.envelope.correlation_id
                for i in items
                if _is_blocker(p.read.holds.get(i.envelope.correlation_id), i)
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

    def _backlog_entry(self, row: DeadLetterRow) -> _Backlog:
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
            return _Backlog(row, d, None, exc)
        try:
            item = Item(d, env, self._decoders.decode_data(env), queue=row.queue)
        except PermanentError as exc:
            item = Item(d, env, None, error=exc, queue=row.queue)
        return _Backlog(row, d, item, None)

    # --- one message ----------------------------------------------------------------

    def _take(self, p: _Pass, item: Item) -> None:
        """Skip, hold or apply one delivery, in its place in the batch."""
        env = item.envelope
        cid = env.correlation_id
        blocker = p.holds.get(cid) if p.holds else None
        unblocks = blocker is not None and _is_blocker(blocker, item)
        key = env.idempotency_key
        if item.error is None and (key in p.seen or key in p.held_keys):
            # Claimed before, or met earlier in this batch.
            self._duplicate(p, item)
            if unblocks:  # the blocker's fact was applied after all
                self._resolve(p, cid, item.req)
            return
        if blocker is not None and not unblocks:
            if item.error is None:
                p.held_keys.add(key)
            p.waiting.setdefault(cid, []).append(item)
            item.req.outcome.held += 1
            p.journal.append(letters.journal(env, "held", f"behind {blocker}"))
            return
        if item.error is None:
            p.seen.add(key)
        parked = self._apply(p, item)
        if parked is not None:
            if blocker is not None or self._ordered:
                self._block(p, cid, parked[0])
        elif unblocks:
            self._resolve(p, cid, item.req)

    def _apply(self, p: _Pass, item: Item) -> _Parked | None:
        """Apply *item* to its instance; or dead-letter it, or send it to retry."""
        env = item.envelope
        cid = env.correlation_id
        out = item.req.outcome
        if item.error is not None:
            out.dead.append(item.error.reason)
            return self._dead_letter_item(p, item, item.error), True
        state = p.states[cid] if cid in p.states else self._wf.initial(cid)
        try:
            applied = self._wf.apply(state, item.event, env)
        except PermanentError as exc:
            out.dead.append(exc.reason)
            return self._dead_letter_item(p, item, exc), True
        except Exception as exc:  # noqa: BLE001 - one bad message must not stall the shard
            return self._schedule_retry(p, item, exc)
        p.states[cid] = applied.state
        p.dirty.add(cid)
        p.claims.append(
            InboxKey(key=env.idempotency_key, day=env.time.date(), message_id=env.id)
        )
        out.applied += 1
        p.journal.append(
            JournalRecord(
                message_id=env.id, correlation_id=cid, stage="applied", type=env.type
            )
        )
        p.xref.extend(applied.xref)
        now = p.now
        for n, emit in enumerate(applied.emits):
            tag = type(emit.event).__struct_config__.tag
            key = f"{env.idempotency_key}/{tag}{emit.key_suffix}"
            if n and not emit.key_suffix:
                key = f"{key}#{n}"
            p.records.append(
                letters.follow_up(
                    env,
                    emit.event,
                    tag=tag,
                    key=key,
                    source=self._source,
                    now=now,
                    exchange=emit.exchange,
                    routing_key=emit.routing_key or tag,
                    correlation_id=cid,
                    subject=emit.subject,
                    delay_s=_delay(emit.delay_s),
                )
            )
        return None

    def _duplicate(self, p: _Pass, item: Item) -> None:
        item.req.outcome.duplicates += 1
        p.journal.append(letters.journal(item.envelope, "duplicate"))

    # --- holds ----------------------------------------------------------------------

    def _block(self, p: _Pass, cid: str, blocker: str) -> None:
        if cid not in p.holds and cid not in p.read.holds:
            _log.warning(
                "instance_held",
                workflow=self._wf.name,
                correlation_id=cid,
                message_id=blocker,
            )
        p.holds[cid] = blocker

    def _resolve(self, p: _Pass, cid: str, req: _Request) -> None:
        """The blocker of *cid* is through: apply what it held, in order.

        First the held messages read back from the store, then those held
        earlier in this batch. One that is parked in turn holds the rest.
        """
        blocker = p.holds.pop(cid)
        backlog = p.backlog.pop(cid, [])
        for n, entry in enumerate(backlog):
            if cid in p.holds:
                p.backlog[cid] = backlog[n:]
                return
            self._release_row(p, cid, entry, req, blocker)
        overflow = p.overflow.pop(cid, None)
        if overflow is not None and cid not in p.holds:
            self._promote(p, cid, overflow, req)
            return
        waiting = p.waiting.pop(cid, [])
        for n, item in enumerate(waiting):
            if cid in p.holds:
                p.waiting[cid] = waiting[n:]
                return
            item.req.outcome.held -= 1
            req.outcome.released += 1
            p.journal.append(
                letters.journal(item.envelope, "released", f"after {blocker}")
            )
            if item.error is None:
                key = item.envelope.idempotency_key
                if key in p.seen:  # a copy of a held message applied just before
                    self._duplicate(p, item)
                    continue
                p.seen.add(key)
            parked = self._apply(p, item)
            if parked is not None:
                p.holds[cid] = parked[0]
        if cid not in p.holds:
            _log.info("hold_released", workflow=self._wf.name, correlation_id=cid)

    def _release_row(
        self, p: _Pass, cid: str, entry: _Backlog, req: _Request, blocker: str
    ) -> None:
        """Apply one held message read back from the store, after its blocker."""
        row = entry.row
        req.outcome.released += 1
        p.journal.append(
            JournalRecord(
                message_id=row.message_id,
                correlation_id=cid,
                stage="released",
                type=row.type,
                detail=f"after {blocker}",
            )
        )
        item = entry.item
        if item is None:
            assert entry.error is not None
            req.outcome.dead.append(entry.error.reason)
            p.holds[cid] = self._dead_letter(
                p, row.queue, entry.delivery, entry.error, 1, cid
            )
            return
        item.req = req
        if item.error is None:
            key = item.envelope.idempotency_key
            if key in p.seen:
                self._duplicate(p, item)
                p.released.append(row.message_id)
                return
            p.seen.add(key)
        parked = self._apply(p, item)
        if parked is None or not parked[1]:
            # A dead letter's upsert parks its row; anything else leaves the hold.
            p.released.append(row.message_id)
        if parked is not None:
            p.holds[cid] = parked[0]

    def _promote(self, p: _Pass, cid: str, row: DeadLetterRow, req: _Request) -> None:
        """More is held than one write releases: the next held message blocks now.

        It goes back to its queue; when it is applied, it releases the rest.
        """
        p.holds[cid] = row.message_id
        p.released.append(row.message_id)
        p.records.append(
            OutboxRecord(
                message_id=row.message_id,
                exchange="",
                routing_key=row.queue,
                body=row.body,
                correlation_id=row.correlation_id,
                type=row.type,
                headers={**letters.plain_headers(row.headers), RELEASED_HEADER: 1},
            )
        )
        req.outcome.released += 1
        p.journal.append(
            JournalRecord(
                message_id=row.message_id,
                correlation_id=cid,
                stage="released",
                type=row.type,
                detail="sent back to its queue: it holds the rest now",
            )
        )

    def _hold_writes(self, p: _Pass) -> list[HoldWrite]:
        """The holds that changed, and those that hold new messages.

        An unchanged hold that new messages are held behind is written too
        (to the same blocker): if another writer released it meanwhile, the
        commit conflicts instead of leaving those messages without a hold.
        """
        before = p.read.holds
        return [
            HoldWrite(
                correlation_id=cid,
                message_id=p.holds.get(cid),
                expected=before.get(cid),
            )
            for cid in sorted(before.keys() | p.holds.keys())
            if before.get(cid) != p.holds.get(cid) or cid in p.waiting
        ]

    # --- parking --------------------------------------------------------------------

    def _dead_letter_item(self, p: _Pass, item: Item, exc: PermanentError) -> str:
        d = item.delivery
        cid = d.correlation_id or item.envelope.correlation_id
        return self._dead_letter(p, item.queue, d, exc, item.attempt, cid)

    def _dead_letter(
        self,
        p: _Pass,
        queue: str,
        d: Delivery,
        exc: PermanentError,
        attempts: int,
        correlation_id: str | None,
        *,
        reason: str | None = None,
    ) -> str:
        """Record *d* as a dead letter with a copy on ``q2c.dead``; return its id."""
        reason = reason or exc.reason
        detail = str(exc)[:2000]
        record, copy, entry = letters.dead_letter(
            queue,
            d,
            reason=reason,
            detail=detail,
            attempts=attempts,
            correlation_id=correlation_id,
            type_=d.type,
        )
        message_id = record.message_id
        p.dead.append(record)
        p.records.append(copy)
        p.journal.append(entry)
        _log.warning(
            "delivery_dead_lettered",
            queue=queue,
            message_id=message_id,
            correlation_id=correlation_id,
            reason=reason,
            detail=detail[:200],
            attempt=attempts,
        )
        return message_id

    def _schedule_retry(self, p: _Pass, item: Item, exc: Exception) -> _Parked:
        d = item.delivery
        out = item.req.outcome
        queue = item.queue
        env = item.envelope
        error = f"{type(exc).__name__}: {exc}"
        tier = self._retry.tier_for(item.attempt)
        if tier is None:
            out.dead.append("attempts_exhausted")
            cid = d.correlation_id or env.correlation_id
            message_id = self._dead_letter(
                p,
                queue,
                d,
                PermanentError(error),
                item.attempt,
                cid,
                reason="attempts_exhausted",
            )
            return message_id, True
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
        p.records.append(
            letters.retry(
                queue,
                d,
                message_id=env.id,
                attempt=item.attempt,
                tier=tier,
                error=error,
            )
        )
        p.journal.append(
            letters.journal(
                env,
                "retry_scheduled",
                f"attempt {item.attempt} failed, retry in {tier}s: {error[:200]}",
            )
        )
        out.retried += 1
        return env.id, False


def _is_blocker(blocker: str | None, item: Item) -> bool:
    """Whether *item* is the message that holds its instance.

    A retried message comes back under its envelope id; a replayed dead
    letter under the dead letter's message id.
    """
    return blocker is not None and (
        blocker == item.envelope.id or blocker == item.delivery.message_id
    )


def _delay(delay_s: float) -> float:
    """An emit's delay as the outbox takes it: finite and positive, else none."""
    return delay_s if 0.0 < delay_s < _MAX_DELAY_S else 0.0


def _held_record(item: Item, blocker: str) -> DeadLetterRecord:
    d = item.delivery
    env = item.envelope
    return DeadLetterRecord(
        message_id=letters.letter_id(d),
        queue=item.queue,
        routing_key=d.routing_key,
        reason="held",
        detail=f"held behind {blocker}",
        body=d.body,
        headers=letters.plain_headers(d.headers),
        attempts=item.attempt,
        correlation_id=env.correlation_id,
        type=d.type or env.type,
    )


def _inbox_key(item: Item) -> InboxKey | None:
    """The inbox key of a decoded delivery (None when its data did not decode)."""
    return None if item.error is not None else _inbox_key_of(item.envelope)


def _inbox_key_of(env: Envelope) -> InboxKey:
    """An envelope's idempotency key on its fact's own day."""
    return InboxKey(key=env.idempotency_key, day=env.time.date(), message_id=env.id)
