"""The store seam: durable inbox, saga state, outbox, dead letters and journal.

Two implementations share this protocol: `broker.store.postgres` (asyncpg,
production) and `broker.store.sqlite` (the embedded default; in memory for
unit and runtime tests). The core writes a whole batch of deliveries in two
round trips: `Store.prepare_batch` reads, without locks, which keys are
claimed and the instances' states; `Store.commit_batch` then writes
everything the batch decided as one `BatchWrite`, atomically, and raises
`ConcurrencyConflict` (writing nothing) if another writer got there first.

Besides inbox keys, states, outbox rows, dead letters and the journal, a
batch carries the *holds* of ordered workflows: an instance whose message
was parked (dead-lettered or sent to retry) is held by that message, and its
later messages are recorded as dead letters of status ``held`` instead of
being applied, until the blocker is applied or purged (see `broker.commit`).
Outbox rows may be delayed (`OutboxRecord.delay_s`); rows the relay parked
(unroutable, or no AMQP frame can carry them) wait for an operator to retry
or purge them (`ParkedOutboxRow`). The cross-reference registry
(`broker.xref`) and the operators' paused systems (`broker.store.pauses`)
live here too.

Every driver exception is translated where the driver is called:
`StoreUnavailable` (retry later) or a bug.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import date, datetime
from typing import Any, Final, Literal, Protocol

import msgspec

from broker.store.pauses import SystemPause
from broker.xref import XrefConflict, XrefEntry

__all__ = [
    "InboxKey",
    "SagaRecord",
    "SagaWrite",
    "OutboxRecord",
    "OutboxRow",
    "ParkedOutboxRow",
    "PARKED_CHUNK",
    "in_chunks",
    "DeadLetterRecord",
    "DeadLetterRow",
    "DeadLetterFilter",
    "HoldRow",
    "HoldRefused",
    "JournalRecord",
    "JournalRow",
    "BatchRead",
    "BatchWrite",
    "HoldWrite",
    "DeadLetterStatus",
    "REPLAY_HEADER",
    "REPLAY_DROPS",
    "UNAVAILABLE_SINCE_HEADER",
    "WAITS_HEADER",
    "StatusFilter",
    "XrefEntry",
    "XrefConflict",
    "SystemPause",
    "Store",
]

#: ``parked``: waits for an operator; ``held``: waits behind a parked message
#: of its instance; ``released``: a held message sent on again; ``replayed``
#: and ``purged``: an operator's decisions.
DeadLetterStatus = Literal["parked", "held", "released", "replayed", "purged"]

#: The header of a dead letter's copy sent back by ``replay_dead_letters``:
#: how many times it has been (1 the first time).
REPLAY_HEADER: Final = "x-q2c-replay"

#: Epoch seconds of the first of a run of failures for want of the system.
UNAVAILABLE_SINCE_HEADER: Final = "x-q2c-unavailable-since"
#: How many waits in a row (failures that spend time, not attempts) the
#: message has met: it picks the wait's tier, growing as a run goes on.
WAITS_HEADER: Final = "x-q2c-waits"

#: Headers a replayed copy does not carry on: the marks of a run of waits
#: (since when, how many) that ended in the dead letter. A replay starts
#: waiting afresh.
REPLAY_DROPS: Final = (UNAVAILABLE_SINCE_HEADER, WAITS_HEADER)

#: A filter's status: one status, or ``open`` for parked and held alike.
StatusFilter = Literal["parked", "held", "released", "replayed", "purged", "open"]


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
    #: Publish no earlier than this many seconds after the commit. A delayed
    #: row is not leased to its writer (the fast path never sees it): the
    #: relay's poller publishes it once due.
    delay_s: float = 0.0


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


class ParkedOutboxRow(msgspec.Struct, frozen=True, kw_only=True):
    """An outbox row the relay parked (`Store.park_outbox`), for an operator.

    ``body`` is None in listings (`Store.list_parked_outbox`), which carry
    its ``size_bytes`` only, so that a listing stays small whatever the
    bodies weigh.
    """

    id: int
    message_id: str
    exchange: str
    routing_key: str
    correlation_id: str | None
    type: str | None
    headers: dict[str, Any]
    attempts: int
    #: Why the relay parked it (``parked_reason``).
    reason: str
    created_at: datetime
    size_bytes: int
    body: bytes | None = None


#: How many parked outbox rows one statement of a retry or purge touches.
PARKED_CHUNK: Final = 1000


async def in_chunks(
    ids: Sequence[int] | None,
    *,
    chunk: int,
    page: Callable[[int, int], Awaitable[list[int]]],
    act: Callable[[list[int]], Awaitable[list[int]]],
) -> list[int]:
    """Apply *act* to *ids* (or, None, to every row *page* finds), *chunk* at a time.

    Internal: the loop both stores run for an operator's retry or purge of
    parked outbox rows. *page(after, limit)* returns the ids of up to
    *limit* parked rows above id *after*, in ascending order; *act* acts on
    at most *chunk* ids and returns those it acted on. Each chunk commits on
    its own, so a run cut short has done whole chunks, and repeating it
    does the rest.

    Returns:
        The ids acted on, ascending.
    """
    done: list[int] = []
    if ids is not None:
        named = sorted(set(ids))
        for start in range(0, len(named), chunk):
            done.extend(await act(named[start : start + chunk]))
        return sorted(done)
    after = 0
    while True:
        found = await page(after, chunk)
        if found:
            done.extend(await act(found))
        if len(found) < chunk:
            # Ids only grow: a row parked meanwhile above *after* is seen by
            # a later page, one below it was not parked when its page ran.
            return sorted(done)
        after = found[-1]


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
    #: The workflow whose instance a held message waits in (else None).
    workflow: str | None = None


class HoldRow(msgspec.Struct, frozen=True, kw_only=True):
    """A held workflow instance: the message it waits on, and how much waits.

    ``blocker_status`` is the blocker's dead-letter status, or None when the
    blocker is not a dead letter (it waits in a retry tier).
    """

    workflow: str
    correlation_id: str
    blocker: str
    since: datetime
    updated_at: datetime
    #: How many messages are held behind the blocker.
    held: int
    blocker_status: DeadLetterStatus | None = None


class HoldRefused(ValueError):
    """`Store.release_hold` refused: ``reason`` ``not_held`` or ``blocker_parked``."""

    def __init__(
        self, message: str, *, reason: Literal["not_held", "blocker_parked"]
    ) -> None:
        super().__init__(message)
        self.reason = reason


class DeadLetterFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Which dead letters a list, replay or purge applies to (all set fields match)."""

    ids: tuple[int, ...] = ()
    reason: str | None = None
    queue: str | None = None
    type: str | None = None
    correlation_id: str | None = None
    status: StatusFilter | None = "parked"
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
    #: Correlation id → the message id that holds the instance, for the
    #: given instances that are held.
    holds: dict[str, str] = {}


class HoldWrite(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A change to one instance's hold, checked like a saga's version.

    ``expected`` None creates the hold, ``message_id`` None clears it, both
    set moves it to another blocker (or, equal, checks that it is still
    there); *expected* must be what is stored.
    """

    correlation_id: str
    message_id: str | None
    expected: str | None = None


class BatchWrite(msgspec.Struct, frozen=True, kw_only=True):
    """Everything one batch writes, committed atomically by `Store.commit_batch`.

    Attributes:
        held: messages held behind a parked one, in arrival order: stored
            as dead letters of status ``held`` (reason ``held``) in the
            instance of ``workflow`` named by their ``correlation_id``; one
            already held keeps its place.
        holds: instances that become held, move to another blocker, or are
            released.
        released: message ids of held dead letters now taken out of the hold
            (status ``released``).
        xref: cross-reference entries to upsert (see `broker.xref`).
    """

    consumer: str
    workflow: str
    keys: Sequence[InboxKey] = ()
    sagas: Sequence[SagaWrite] = ()
    outbox: Sequence[OutboxRecord] = ()
    dead_letters: Sequence[DeadLetterRecord] = ()
    journal: Sequence[JournalRecord] = ()
    held: Sequence[DeadLetterRecord] = ()
    holds: Sequence[HoldWrite] = ()
    released: Sequence[str] = ()
    xref: Sequence[XrefEntry] = ()


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
        """Write a whole batch atomically, in one round trip.

        Claims every key (all must be new; a key repeated in *write* counts
        once), creates or updates every instance at its expected version,
        writes the holds at their expected blockers, marks released held
        messages, and inserts the outbox rows (ids in input order), dead
        letters (upserted by message id: attempts add up, also within
        *write*), held messages (in order), journal entries (in order) and
        xref entries.

        Returns:
            The outbox rows leased to this writer, for the relay's fast path:
            every row of *write* except the delayed ones.

        Raises:
            ValueError: one instance appears twice in ``write.sagas`` or
                ``write.holds``.
            XrefConflict: an xref entry binds a native id that belongs to
                another canonical id; nothing was written.
            ConcurrencyConflict: a key was claimed, an instance or a hold
                changed, or a held message was released since
                `prepare_batch`; nothing was written.
            StoreUnavailable: the database is unreachable or asked us to retry.
        """
        ...

    async def held_messages(
        self, workflow: str, correlation_ids: Sequence[str], *, limit_each: int
    ) -> list[DeadLetterRow]:
        """The held messages of the given instances: by instance, in arrival order.

        At most *limit_each* per instance.
        """
        ...

    async def sweep_holds(self, *, limit: int = 1000) -> int:
        """Release what nothing blocks any more; return how many instances moved on.

        A hold whose blocker was purged, and held messages whose instance
        has no hold (a race between two writers), are handed on: the first
        held message becomes the blocker and is sent back to its queue.
        """
        ...

    async def list_holds(
        self, workflow: str | None = None, *, limit: int = 1000
    ) -> list[HoldRow]:
        """Held instances (of *workflow*, or of every workflow), longest held first."""
        ...

    async def release_hold(self, workflow: str, correlation_id: str) -> str | None:
        """Hand an instance's hold on as a purge of its blocker would.

        For a blocker that is lost (say its copy in a retry tier): the first
        held message becomes the blocker and is sent back to its queue, and
        is returned; with nothing held the instance is free (None). Journalled
        as ``released``.

        Raises:
            HoldRefused: the instance is not held, or its blocker is a parked
                dead letter (replay or purge that instead).
        """
        ...

    async def claim_outbox(self, *, limit: int, lease_s: float) -> list[OutboxRow]:
        """Lease due unsent rows whose lease ran out (or never was), longest due first.

        A row is due once its delay (`OutboxRecord.delay_s`) or reschedule
        has passed; rows due in the future cost the query nothing.
        """
        ...

    async def delete_sent(self, ids: Sequence[int]) -> None:
        """Delete rows the broker confirmed: the outbox keeps only unsent rows.

        Deleting an id that is gone already (another relay confirmed the
        same row after its lease ran out) does nothing.
        """
        ...

    async def reschedule_outbox(self, ids: Sequence[int], *, delay_s: float) -> None:
        """Make rows eligible again after *delay_s* (nack or no answer)."""
        ...

    async def park_outbox(self, ids: Sequence[int], *, reason: str) -> None:
        """Stop retrying rows that cannot be routed; they stay for an operator."""
        ...

    async def list_parked_outbox(self, *, limit: int) -> list[ParkedOutboxRow]:
        """Parked, unsent outbox rows, newest first, without bodies (``body`` None)."""
        ...

    async def parked_outbox(self, id: int, /) -> ParkedOutboxRow | None:
        """Parked, unsent outbox row *id* with its body (None: no such parked row)."""
        ...

    async def retry_parked_outbox(
        self,
        ids: Sequence[int] | None,
        *,
        dry_run: bool = False,
        chunk: int = PARKED_CHUNK,
    ) -> list[int]:
        """Unpark rows: the relay publishes them again, as if newly written.

        Of *ids* (None: every parked row), each row still parked and unsent
        loses its ``parked_reason`` and lease, is due now and starts its
        attempts afresh; the relay's poller claims it within ``[core]
        relay-poll-s``. Rows not parked (sent, retried or purged already, or
        no such id) are left as they are. At most *chunk* rows per statement,
        each chunk committed on its own (`in_chunks`).

        Returns:
            The ids unparked (or, with *dry_run*, that would be), ascending.
        """
        ...

    async def purge_parked_outbox(
        self,
        ids: Sequence[int] | None,
        *,
        dry_run: bool = False,
        chunk: int = PARKED_CHUNK,
    ) -> list[int]:
        """Delete parked rows: of *ids* (None: all), those still parked and unsent.

        Chunked like `retry_parked_outbox`; rows not parked are left as they are.

        Returns:
            The ids deleted (or, with *dry_run*, that would be), ascending.
        """
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
        """Mark matching dead letters purged (bodies dropped); return their ids.

        A purged message that held an instance hands the hold on to the
        instance's first held message, which is sent back to its queue (or
        clears it when nothing is held), in the same transaction.
        """
        ...

    async def xref_put(self, entries: Sequence[XrefEntry]) -> None:
        """Upsert cross-reference entries, all or none.

        Raises:
            XrefConflict: a native id is bound to another canonical id.
        """
        ...

    async def xref_get(self, kind: str, canonical_id: str) -> dict[str, XrefEntry]:
        """System → entry, for every system that knows this canonical object."""
        ...

    async def xref_find(
        self, kind: str, system: str, native_id: str
    ) -> XrefEntry | None:
        """The entry binding this native id, if any."""
        ...

    async def xref_many(
        self, kind: str, canonical_ids: Sequence[str]
    ) -> dict[str, dict[str, XrefEntry]]:
        """Canonical id → system → entry, for those of *canonical_ids* that have any."""
        ...

    async def pause_system(
        self, system: str, *, reason: str, paused_by: str
    ) -> SystemPause:
        """Pause *system* for every daemon on this store; return the stored pause.

        Pausing a paused system keeps its ``since`` and replaces the reason.
        """
        ...

    async def resume_system(self, system: str) -> SystemPause | None:
        """End *system*'s pause; return the pause ended (None: it was not paused)."""
        ...

    async def system_pauses(self) -> dict[str, SystemPause]:
        """System → its pause, for every paused system."""
        ...

    async def take_tokens(
        self, system: str, want: int, *, rate_per_s: float, burst: float
    ) -> tuple[int, float]:
        """Take up to *want* tokens from *system*'s bucket, shared by every daemon.

        The bucket refills at *rate_per_s* up to *burst* and starts full.

        Returns:
            ``(granted, wait_s)``: with nothing granted, ``wait_s`` is the
            seconds until a token is there (nothing is reserved).
        """
        ...

    async def try_lease(self, key: str, owner: str, *, lease_s: float) -> bool:
        """Take the named lock *key* for *owner* (a token of one holder).

        It is taken when nobody holds it or its holder's lease has run out;
        it is then *owner*'s for *lease_s* seconds, or until `end_lease`.
        Taken again by its holder, the lease is renewed for *lease_s* from
        now. Every daemon on this store sees the same locks.

        Returns:
            Whether *owner* holds it now.
        """
        ...

    async def end_lease(self, key: str, owner: str) -> None:
        """Give back lock *key* if *owner* still holds it (else do nothing)."""
        ...

    async def load_saga(self, workflow: str, correlation_id: str) -> SagaRecord | None:
        """One instance's state, for status queries and tests."""
        ...

    async def idle_sagas(
        self,
        workflow: str,
        *,
        idle_days: int,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[SagaRecord]:
        """One page of *workflow*'s instances unchanged for *idle_days* days.

        Oldest first, in (``updated_at``, ``correlation_id``) order, after
        *after* (the last page's last instance's pair; None: from the start).
        """
        ...

    async def delete_sagas(
        self, workflow: str, instances: Sequence[tuple[str, int]]
    ) -> int:
        """Delete *workflow*'s *instances* (correlation id, version); return how many.

        An instance changed since it was read (another version), held, or
        with a timer due later (a pending outbox row due after now) stays.
        """
        ...

    async def journal(
        self, correlation_id: str, *, limit: int = 1000
    ) -> list[JournalRow]:
        """The newest *limit* facts of one correlation id, oldest first."""
        ...

    async def prune(self, *, retention_days: int) -> dict[str, int]:
        """Drop inbox partitions older than the retention.

        Outbox rows marked sent by releases that kept them go after the
        retention too; confirmed rows are deleted at once now (`delete_sent`).

        Also runs `sweep_holds` (``holds_swept`` in the result), then deletes
        the dead letters nothing waits on any more (``dead_letters``):
        released, replayed or purged, no hold's blocker, and last seen before
        the retention. Parked and held dead letters stay for an operator.
        """
        ...

    async def ping(self) -> None:
        """One trivial statement: the store answers (readiness).

        Raises:
            StoreUnavailable: it does not.
        """
        ...

    async def counts(self) -> dict[str, int]:
        """Row counts for status: outbox, dead letters, held messages and instances."""
        ...

    async def aclose(self) -> None:
        """Close the pool or connection."""
        ...
