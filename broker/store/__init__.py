"""The store seam: durable inbox, saga state, outbox, dead letters and journal.

Two implementations share this protocol: `broker.store.postgres` (asyncpg,
production) and `broker.store.sqlite` (the embedded default; in memory for
unit and runtime tests). The core writes a whole batch of deliveries in two
round trips: `Store.prepare_batch` reads, without locks, which keys are
claimed and the instances' states; `Store.commit_batch` then writes
everything the batch decided as one `BatchWrite`, atomically, and raises
`ConcurrencyConflict` (writing nothing) if another writer got there first.

Every driver exception is translated where the driver is called:
`StoreUnavailable` (retry later) or a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Literal, Protocol

import msgspec

__all__ = [
    "InboxKey",
    "SagaRecord",
    "SagaWrite",
    "OutboxRecord",
    "OutboxRow",
    "DeadLetterRecord",
    "DeadLetterRow",
    "DeadLetterFilter",
    "JournalRecord",
    "JournalRow",
    "BatchRead",
    "BatchWrite",
    "Store",
]

DeadLetterStatus = Literal["parked", "replayed", "purged"]


class InboxKey(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An idempotency key to claim for one consumer.

    ``day`` is the business fact's own date (the envelope's ``time``), never
    the arrival date, so every redelivery lands in the same inbox partition.
    """

    key: str
    day: date
    message_id: str


class SagaRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A workflow instance's durable state as stored."""

    workflow: str
    correlation_id: str
    version: int
    state: bytes
    updated_at: datetime | None = None


class SagaWrite(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """New state for one instance; ``expected_version`` 0 means "create"."""

    correlation_id: str
    expected_version: int
    state: bytes


class OutboxRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A message to publish once the transaction that writes it commits."""

    message_id: str
    exchange: str
    routing_key: str
    body: bytes
    correlation_id: str | None = None
    type: str | None = None
    headers: dict[str, str | int] = {}


class OutboxRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An outbox record with its row id and how often it was tried."""

    id: int
    message_id: str
    exchange: str
    routing_key: str
    body: bytes
    correlation_id: str | None
    type: str | None
    headers: dict[str, str | int]
    attempts: int


class DeadLetterRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A message the daemon gave up on, with its original bytes and why.

    Written again for the same ``message_id`` (a redelivered poison message),
    it bumps ``attempts`` and ``last_seen`` instead of adding a row.
    """

    message_id: str
    queue: str
    routing_key: str
    reason: str
    detail: str
    body: bytes
    headers: dict[str, Any] = {}
    attempts: int = 1
    correlation_id: str | None = None
    type: str | None = None


class DeadLetterRow(msgspec.Struct, frozen=True, kw_only=True):
    """A stored dead letter."""

    id: int
    message_id: str
    queue: str
    routing_key: str
    reason: str
    detail: str
    body: bytes
    headers: dict[str, Any]
    attempts: int
    correlation_id: str | None
    type: str | None
    status: DeadLetterStatus
    replays: int
    first_seen: datetime
    last_seen: datetime


class DeadLetterFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which dead letters a list, replay or purge applies to (all set fields match)."""

    ids: tuple[int, ...] = ()
    reason: str | None = None
    queue: str | None = None
    type: str | None = None
    correlation_id: str | None = None
    status: DeadLetterStatus | None = "parked"
    limit: int = 100


class JournalRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One audit fact about a message: what happened to it, at which stage."""

    message_id: str
    correlation_id: str | None
    stage: str
    type: str | None = None
    detail: str = ""


class JournalRow(msgspec.Struct, frozen=True, kw_only=True):
    """A stored journal entry."""

    id: int
    at: datetime
    message_id: str
    correlation_id: str | None
    stage: str
    type: str | None
    detail: str


class BatchRead(msgspec.Struct, frozen=True, kw_only=True):
    """What a batch needs to know before it applies anything."""

    #: The given idempotency keys that are already claimed (duplicates).
    claimed: frozenset[str]
    #: The stored state of the given instances that exist.
    sagas: dict[str, SagaRecord]


class BatchWrite(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one batch writes, committed atomically by `Store.commit_batch`."""

    consumer: str
    workflow: str
    keys: Sequence[InboxKey] = ()
    sagas: Sequence[SagaWrite] = ()
    outbox: Sequence[OutboxRecord] = ()
    dead_letters: Sequence[DeadLetterRecord] = ()
    journal: Sequence[JournalRecord] = ()


class Store(Protocol):
    """Durable state of the daemon."""

    async def prepare_batch(
        self,
        consumer: str,
        keys: Sequence[InboxKey],
        workflow: str,
        correlation_ids: Sequence[str],
    ) -> BatchRead:
        """Read, in one round trip, which keys are claimed and the instances' states.

        A key is looked up on its own day (`InboxKey.day`, part of the inbox
        key), so each lookup is one index probe in one day's partition.
        Nothing is locked: `commit_batch` checks that nothing changed since.
        """
        ...

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Write a whole batch atomically, in one round trip; return the outbox rows.

        Claims every key (all must be new; a key repeated in *write* counts
        once), creates or updates every instance at its expected version, and
        inserts the outbox rows (leased to this writer, ids in input order),
        dead letters (upserted by message id: attempts add up, also within
        *write*) and journal entries (in order).

        Raises:
            ValueError: one instance appears twice in ``write.sagas``.
            ConcurrencyConflict: a key was claimed or an instance changed since
                `prepare_batch`; nothing was written.
            StoreUnavailable: the database is unreachable or asked us to retry.
        """
        ...

    async def claim_outbox(self, *, limit: int, lease_s: float) -> list[OutboxRow]:
        """Lease unsent rows whose lease ran out (or never was), oldest first."""
        ...

    async def mark_sent(self, ids: Sequence[int]) -> None:
        """Record that the broker confirmed these rows."""
        ...

    async def reschedule_outbox(self, ids: Sequence[int], *, delay_s: float) -> None:
        """Make rows eligible again after *delay_s* (nack or no answer)."""
        ...

    async def park_outbox(self, ids: Sequence[int], *, reason: str) -> None:
        """Stop retrying rows that cannot be routed; they stay for an operator."""
        ...

    async def list_dead_letters(self, flt: DeadLetterFilter) -> list[DeadLetterRow]:
        """Dead letters matching *flt*, newest first."""
        ...

    async def replay_dead_letters(
        self, flt: DeadLetterFilter, *, max_replays: int, dry_run: bool
    ) -> list[int]:
        """Send matching parked dead letters back to their queue through the outbox.

        Each keeps its ``message_id``, so deduplication still applies. Rows
        already replayed *max_replays* times are skipped (the loop guard).
        Returns the ids replayed (or that would be, with *dry_run*).
        """
        ...

    async def purge_dead_letters(
        self, flt: DeadLetterFilter, *, dry_run: bool
    ) -> list[int]:
        """Mark matching dead letters purged (bodies dropped); return their ids."""
        ...

    async def load_saga(self, workflow: str, correlation_id: str) -> SagaRecord | None:
        """One instance's state, for status queries and tests."""
        ...

    async def journal(
        self, correlation_id: str, *, limit: int = 1000
    ) -> list[JournalRow]:
        """The audit trail of one correlation id, oldest first."""
        ...

    async def prune(self, *, retention_days: int) -> dict[str, int]:
        """Drop inbox partitions and sent outbox rows older than the retention."""
        ...

    async def counts(self) -> dict[str, int]:
        """Row counts for status: outbox pending, dead letters parked, sagas."""
        ...

    async def aclose(self) -> None:
        """Close the pool or connection."""
        ...
