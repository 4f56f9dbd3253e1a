"""What one pass over a write's group decides, gathered to be written at once.

`GroupCommit` (`broker.commit`) reads a group's keys, states and holds, then
takes its messages in delivery order (`broker.holds.Applier`). Everything
that pass decides collects in one `Pass`: the instances' states, the claimed
keys, the outbox rows, dead letters and journal rows, the holds as they stand
after each step. The write sends it in one call of the store.

A message that cannot be applied is parked here. A dead letter
(`Pass.dead_letter`) keeps the original bytes and headers with a copy on
``q2c.dead``; a retry (`Pass.schedule_retry`) sends a copy to the retry tier
its attempt calls for, or dead-letters the message once its attempts are
exhausted. Either way the parked message's id is returned: in an ordered
workflow it holds its instance.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog

from broker import letters
from broker.codec import utcnow
from broker.errors import PermanentError, TransientError
from broker.retry import RetryPolicy
from broker.store import (
    BatchRead,
    DeadLetterRecord,
    DeadLetterRow,
    InboxKey,
    JournalRecord,
    OutboxRecord,
)
from broker.transport import Delivery
from broker.xref import XrefEntry

if TYPE_CHECKING:
    from broker.commit import Item

__all__ = ["Backlog", "Parked", "Pass"]

#: How an item was parked: (the message id that holds its instance now,
#: whether it became a dead letter rather than a retry).
Parked = tuple[str, bool]
_log = structlog.get_logger(__name__)


class Backlog:
    """A held message read back to be released.

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


class Pass:
    """What one pass over a group decides, to be written at once."""

    __slots__ = (
        "backlog",
        "broken",
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
        #: Instances whose stored state does not decode: their items fail.
        self.broken: dict[str, PermanentError] = {}
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
        self.backlog: dict[str, list[Backlog]] = {}
        #: Per instance, the first held message beyond what was read back.
        self.overflow: dict[str, DeadLetterRow] = {}
        #: Held messages taken out of their hold (status ``released``).
        self.released: list[str] = []
        #: Cross-references the applied events established.
        self.xref: list[XrefEntry] = []

    def dead_letter_item(self, item: Item, exc: PermanentError) -> str:
        """Dead-letter *item* from its queue; return the dead letter's id."""
        d = item.delivery
        cid = d.correlation_id or item.envelope.correlation_id
        return self.dead_letter(item.queue, d, exc, item.attempt, cid)

    def dead_letter(
        self,
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
        self.dead.append(record)
        self.records.append(copy)
        self.journal.append(entry)
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

    def schedule_retry(self, item: Item, exc: Exception, retry: RetryPolicy) -> Parked:
        """Send *item* to the retry tier of its attempt, or dead-letter it."""
        d = item.delivery
        out = item.req.outcome
        queue = item.queue
        env = item.envelope
        error = f"{type(exc).__name__}: {exc}"
        # A wait for something outside the message (reference data not
        # loaded, a key another daemon holds) spends time, not attempts.
        tier, since, exhausted = letters.next_tier(retry, exc, d, item.attempt)
        if tier is None:
            out.dead.append(exhausted)
            cid = d.correlation_id or env.correlation_id
            message_id = self.dead_letter(
                queue,
                d,
                PermanentError(error),
                item.attempt,
                cid,
                reason=exhausted,
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
        self.records.append(
            letters.retry(
                queue,
                d,
                message_id=env.id,
                attempt=item.attempt,
                tier=tier,
                error=error,
                unavailable_since=since,
            )
        )
        self.journal.append(
            letters.journal(
                env,
                "retry_scheduled",
                f"attempt {item.attempt} failed, retry in {tier}s: {error[:200]}",
            )
        )
        out.retried += 1
        return env.id, False
