"""Holds: one instance's messages applied in order, even when one is parked.

Holds keep one instance's messages in order (DESIGN §4.7). In an ordered
workflow (``ordered = True``), a message that is dead-lettered or sent to a
retry tier holds its instance: the instance's later messages are not
applied but recorded, in arrival order, as dead letters of status ``held``
and acknowledged. When the blocker comes back and is applied (a successful
retry, an operator's replay) the held messages are applied right after it,
in the same write, before anything that follows them in the batch; if one
of them fails in turn, it holds the rest. An operator who purges the
blocker hands the hold to the first held message, which goes back to its
queue (`broker.store.Store.purge_dead_letters`). A write that has more
held messages to release than it read back does the same with the first
one it left.

`Applier` takes a write's messages in delivery order for `GroupCommit`
(`broker.commit`), into the write's `broker._pass.Pass`: it skips a
duplicate, holds a message behind its instance's blocker, or applies it,
parking it when that fails; once a blocker is through, it applies what the
blocker held. `hold_writes` and `held_record` are what the write then
stores of the holds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, final

import structlog

from broker import letters
from broker.errors import PermanentError
from broker.retry import RetryPolicy
from broker.store import (
    DeadLetterRecord,
    DeadLetterRow,
    HoldWrite,
    InboxKey,
    JournalRecord,
    OutboxRecord,
)
from broker.workflow import Workflow, is_ordered, unheld_types

if TYPE_CHECKING:
    from broker._pass import Backlog, Parked, Pass
    from broker.commit import Item, ShardBatch

__all__ = ["RELEASED_HEADER", "Applier", "held_record", "hold_writes", "is_blocker"]

#: Set on a held message that a purge or an overflow sends back to its queue.
RELEASED_HEADER = "x-q2c-released"
#: Longer delays (and infinity, and NaN) are a bug in the workflow: not delayed.
_MAX_DELAY_S = 100 * 366 * 86_400.0
_log = structlog.get_logger(__name__)


@final
class Applier:
    """Skips, holds or applies one workflow's messages, one write at a time."""

    def __init__(self, workflow: Workflow[Any], retry: RetryPolicy) -> None:
        self._wf = workflow
        self._retry = retry
        self._ordered = is_ordered(workflow)
        self._unheld = unheld_types(workflow)
        self._source = f"/q2c/{workflow.name}"

    def take(self, p: Pass, item: Item) -> None:
        """Skip, hold or apply one delivery, in its place in the batch."""
        env = item.envelope
        cid = env.correlation_id
        blocker = p.holds.get(cid) if p.holds else None
        unblocks = blocker is not None and is_blocker(blocker, item)
        # A type applied even while held goes past the hold and leaves it as
        # it was, whatever becomes of it.
        passes = blocker is not None and not unblocks and env.type in self._unheld
        key = env.idempotency_key
        if item.error is None and (key in p.seen or key in p.held_keys):
            # Claimed before, or met earlier in this batch.
            self._duplicate(p, item)
            if unblocks:  # the blocker's fact was applied after all
                self._resolve(p, cid, item.req)
            return
        if blocker is not None and not unblocks and not passes:
            if item.error is None:
                p.held_keys.add(key)
            p.waiting.setdefault(cid, []).append(item)
            item.req.outcome.held += 1
            p.journal.append(letters.journal(env, "held", f"behind {blocker}"))
            return
        if item.error is None:
            p.seen.add(key)
        parked = self._apply(p, item)
        if passes:
            return
        if parked is not None:
            if blocker is not None or self._ordered:
                self._block(p, cid, parked[0])
        elif unblocks:
            self._resolve(p, cid, item.req)

    def _apply(self, p: Pass, item: Item) -> Parked | None:
        """Apply *item* to its instance; or dead-letter it, or send it to retry."""
        env = item.envelope
        cid = env.correlation_id
        out = item.req.outcome
        if item.error is not None:
            out.dead.append(item.error.reason)
            return p.dead_letter_item(item, item.error), True
        broken = p.broken.get(cid) if p.broken else None
        if broken is not None:
            out.dead.append(broken.reason)
            return p.dead_letter_item(item, broken), True
        state = p.states[cid] if cid in p.states else self._wf.initial(cid)
        try:
            applied = self._wf.apply(state, item.event, env)
        except PermanentError as exc:
            out.dead.append(exc.reason)
            return p.dead_letter_item(item, exc), True
        except Exception as exc:  # noqa: BLE001 - one bad message must not stall the shard
            return p.schedule_retry(item, exc, self._retry)
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

    def _duplicate(self, p: Pass, item: Item) -> None:
        item.req.outcome.duplicates += 1
        p.journal.append(letters.journal(item.envelope, "duplicate"))

    def _block(self, p: Pass, cid: str, blocker: str) -> None:
        if cid not in p.holds and cid not in p.read.holds:
            _log.warning(
                "instance_held",
                workflow=self._wf.name,
                correlation_id=cid,
                message_id=blocker,
            )
        p.holds[cid] = blocker

    def _resolve(self, p: Pass, cid: str, req: ShardBatch) -> None:
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
            _promote(p, cid, overflow, req)
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
        self, p: Pass, cid: str, entry: Backlog, req: ShardBatch, blocker: str
    ) -> None:
        """Apply one held message read back from the store, after its blocker."""
        row = entry.row
        _count_release(p, req, row, cid, f"after {blocker}")
        item = entry.item
        if item is None:
            assert entry.error is not None
            req.outcome.dead.append(entry.error.reason)
            p.holds[cid] = p.dead_letter(row.queue, entry.delivery, entry.error, 1, cid)
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


def _promote(p: Pass, cid: str, row: DeadLetterRow, req: ShardBatch) -> None:
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
    _count_release(p, req, row, cid, "sent back to its queue: it holds the rest now")


def _count_release(
    p: Pass, req: ShardBatch, row: DeadLetterRow, cid: str, detail: str
) -> None:
    """Count *row* as released in *req*'s outcome, with its journal entry."""
    req.outcome.released += 1
    p.journal.append(
        JournalRecord(
            message_id=row.message_id,
            correlation_id=cid,
            stage="released",
            type=row.type,
            detail=detail,
        )
    )


def hold_writes(p: Pass) -> list[HoldWrite]:
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


def held_record(item: Item, blocker: str) -> DeadLetterRecord:
    """The dead letter of status ``held`` that keeps *item* behind *blocker*."""
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


def is_blocker(blocker: str | None, item: Item) -> bool:
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
