"""The embedded store: SQLite, for first runs and (in memory) for tests.

One connection serves the whole process. sqlite3 blocks, so every call runs
on a worker thread (``anyio.to_thread.run_sync``), and an `anyio.Lock` gives
the connection to one call at a time. A call that writes several statements
runs them in one worker-thread call, inside ``BEGIN IMMEDIATE`` ... ``COMMIT``:
`SqliteStore.commit_batch` writes a whole batch that way.

It behaves like the PostgreSQL store (the contract suite runs against both)
except for what one writer makes moot: no partitions (retention deletes in
chunks), no ``SKIP LOCKED``, no lock ordering. Times are seconds since the
epoch from an injectable clock, so tests can move time.

`SqliteStore` is the async surface; the blocking work lives beside it: the
connection and its failures in `broker.store.sqlite_connection`, the batch
write in `broker.store.sqlite_batch`, replay, purge and hold sweeps in
`broker.store.sqlite_deadletter`, and the SQL texts in
`broker.store.sqlite_sql`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import Final, TypeVar, final

import anyio
import anyio.to_thread
import structlog

from broker.config import SqliteConfig
from broker.errors import StoreUnavailable
from broker.store import (
    PARKED_CHUNK,
    BatchRead,
    BatchWrite,
    DeadLetterFilter,
    DeadLetterRow,
    HoldRow,
    InboxKey,
    JournalRow,
    OutboxRow,
    ParkedOutboxRow,
    SagaRecord,
    SystemPause,
    XrefEntry,
    in_chunks,
    leases,
    pauses,
    ratebuckets,
)
from broker.store import sqlite_deadletter as deadletter
from broker.store import sqlite_sql as sql
from broker.store.migrate import apply_sqlite, load_migrations
from broker.store.rows import (
    Row,
    dead_letter_row,
    decode_headers,
    encode_json,
    hold_row,
    journal_row,
    normalized,
    outbox_row,
    pause_row,
    saga_record,
    xref_entry,
)
from broker.store.sqlite_batch import put_xref, write_batch
from broker.store.sqlite_connection import connect, in_transaction, sqlite_errors
from broker.xref import unique_entries

__all__ = ["SqliteStore", "sqlite_errors", "PRUNE_CHUNK"]

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: Rows deleted per transaction when pruning.
PRUNE_CHUNK: Final = 5000


@final
class SqliteStore:
    """The embedded durable store; implements `broker.store.Store`.

    Build it with `SqliteStore.open`; ``":memory:"`` gives a private
    database for tests.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        *,
        path: str,
        lease_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conn = conn
        self._path = path
        self._lease_s = lease_s
        self._clock = clock
        self._lock = anyio.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<SqliteStore {self._path}>"

    @classmethod
    async def open(
        cls,
        cfg: SqliteConfig | str | os.PathLike[str] = ":memory:",
        *,
        lease_s: float = 30.0,
        migrate: bool = True,
        busy_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> SqliteStore:
        """Open (creating it if needed) the database file, or a private in-memory one.

        Args:
            cfg: the ``[sqlite]`` section (its ``synchronous`` too), or a path
                (``synchronous = full``), or ``":memory:"``.
            lease_s: how long outbox rows written by `commit_batch` stay
                leased to their writer before the relay may publish them.
            migrate: apply pending migrations.
            busy_timeout_s: how long to wait for another process's write lock.
            clock: seconds since the epoch; tests inject a fake one.

        Raises:
            StoreUnavailable: the file cannot be opened or is locked.
        """
        path = cfg.path if isinstance(cfg, SqliteConfig) else os.fspath(cfg)
        synchronous = cfg.synchronous if isinstance(cfg, SqliteConfig) else "full"
        with sqlite_errors():
            conn = await anyio.to_thread.run_sync(
                connect, path, busy_timeout_s, synchronous
            )
        store = cls(conn, path=path, lease_s=lease_s, clock=clock)
        try:
            if migrate:
                await store.migrate()
        except BaseException:
            await store.aclose()
            raise
        _log.info("store_opened", store="sqlite", path=path)
        return store

    async def _locked(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *fn* on a worker thread with the connection to itself.

        A cancelled caller waits for the thread to finish: a transaction *fn*
        runs is committed or rolled back, never left open.
        """
        async with self._lock:
            if self._closed:
                raise StoreUnavailable("sqlite store is closed")
            with sqlite_errors():
                return await anyio.to_thread.run_sync(fn, self._conn)

    async def _transaction(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *fn* in a transaction of its own."""
        return await self._locked(lambda conn: in_transaction(conn, partial(fn, conn)))

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""
        migrations = await load_migrations("sqlite")
        return await self._locked(lambda conn: apply_sqlite(conn, migrations))

    async def prepare_batch(
        self,
        consumer: str,
        keys: Sequence[InboxKey],
        workflow: str,
        correlation_ids: Sequence[str],
    ) -> BatchRead:
        """Claimed keys and stored instances (no locks: commit_batch re-checks)."""
        key_params = {"consumer": consumer, "keys": encode_json([k.key for k in keys])}
        saga_params = {"workflow": workflow, "ids": encode_json(list(correlation_ids))}

        def run(conn: sqlite3.Connection) -> BatchRead:
            return BatchRead(
                claimed=frozenset(
                    r[0] for r in conn.execute(sql.CLAIMED_KEYS, key_params)
                ),
                sagas={
                    r[0]: saga_record(workflow, r, when=_utc)
                    for r in conn.execute(sql.LOAD_SAGAS, saga_params)
                },
                holds=dict(conn.execute(sql.LOAD_HOLDS, saga_params).fetchall()),
            )

        return await self._locked(run)

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Write the whole batch in one transaction, in one worker-thread call.

        Raises:
            ConcurrencyConflict: a key was claimed, or an instance changed,
                since `prepare_batch`; nothing was written.
            StoreUnavailable: the database is locked or failing.
            ValueError: one instance appears twice in ``write.sagas``.
        """
        commit = partial(
            write_batch,
            write=normalized(write),
            now=self._clock(),
            lease_s=self._lease_s,
        )
        return await self._transaction(commit)

    async def held_messages(
        self, workflow: str, correlation_ids: Sequence[str], *, limit_each: int
    ) -> list[DeadLetterRow]:
        """The held messages of the given instances: by instance, in arrival order."""

        def run(conn: sqlite3.Connection) -> list[DeadLetterRow]:
            return [
                dead_letter_row(r, when=_utc)
                for cid in sorted(correlation_ids)
                for r in conn.execute(sql.HELD_MESSAGES, (workflow, cid, limit_each))
            ]

        return await self._locked(run) if correlation_ids else []

    async def sweep_holds(self, *, limit: int = 1000) -> int:
        """Hand on holds whose blocker was purged, and held messages without a hold."""
        now = self._clock()
        moved = await self._transaction(lambda conn: deadletter.sweep(conn, limit, now))
        if moved:
            _log.warning("holds_swept", instances=moved)
        return moved

    async def list_holds(
        self, workflow: str | None = None, *, limit: int = 1000
    ) -> list[HoldRow]:
        """Held instances (of *workflow*, or all), longest held first."""
        params = {"workflow": workflow, "limit": limit}
        rows = await self._locked(
            lambda conn: conn.execute(sql.LIST_HOLDS, params).fetchall()
        )
        return [hold_row(r, when=_utc) for r in rows]

    async def release_hold(self, workflow: str, correlation_id: str) -> str | None:
        """Hand an instance's hold on as a purge of its blocker would (`Store`)."""
        now = self._clock()
        promoted = await self._transaction(
            lambda conn: deadletter.release(conn, workflow, correlation_id, now)
        )
        _log.info(
            "hold_released_by_operator",
            workflow=workflow,
            correlation_id=correlation_id,
            blocker=promoted,
        )
        return promoted

    async def claim_outbox(self, *, limit: int, lease_s: float) -> list[OutboxRow]:
        """Lease up to *limit* due unsent rows with no live lease, longest due first."""
        now = self._clock()
        params = {"now": now, "lease_until": now + lease_s, "limit": limit}
        rows = await self._locked(
            lambda conn: conn.execute(sql.CLAIM_OUTBOX, params).fetchall()
        )
        return sorted((outbox_row(r) for r in rows), key=lambda row: row.id)

    async def delete_sent(self, ids: Sequence[int]) -> None:
        """Delete rows the broker confirmed."""
        if ids:
            params = {"ids": encode_json(list(ids))}
            await self._locked(lambda conn: conn.execute(sql.DELETE_SENT, params))

    async def reschedule_outbox(self, ids: Sequence[int], *, delay_s: float) -> None:
        """Release the rows' lease and make them eligible again after *delay_s*."""
        if ids:
            params = {"ids": encode_json(list(ids)), "at": self._clock() + delay_s}
            await self._locked(lambda conn: conn.execute(sql.RESCHEDULE, params))

    async def park_outbox(self, ids: Sequence[int], *, reason: str) -> None:
        """Stop retrying rows that cannot be routed; they stay for an operator."""
        if ids:
            params = {"ids": encode_json(list(ids)), "reason": reason}
            await self._locked(lambda conn: conn.execute(sql.PARK, params))

    async def list_parked_outbox(self, *, limit: int) -> list[ParkedOutboxRow]:
        """Parked rows, newest first, without bodies."""
        rows = await self._locked(
            lambda conn: conn.execute(sql.LIST_PARKED, (limit,)).fetchall()
        )
        return [_parked_row(r) for r in rows]

    async def parked_outbox(self, id: int, /) -> ParkedOutboxRow | None:
        """Parked row *id* with its body (None: no such parked row)."""
        row = await self._locked(
            lambda conn: conn.execute(sql.SHOW_PARKED, (id,)).fetchone()
        )
        return _parked_row(row, with_body=True) if row is not None else None

    async def retry_parked_outbox(
        self,
        ids: Sequence[int] | None,
        *,
        dry_run: bool = False,
        chunk: int = PARKED_CHUNK,
    ) -> list[int]:
        """Unpark rows still parked, *chunk* per statement (`Store`)."""
        return await self._parked_chunks(sql.RETRY_PARKED, ids, dry_run, chunk)

    async def purge_parked_outbox(
        self,
        ids: Sequence[int] | None,
        *,
        dry_run: bool = False,
        chunk: int = PARKED_CHUNK,
    ) -> list[int]:
        """Delete rows still parked, *chunk* per statement (`Store`)."""
        return await self._parked_chunks(sql.PURGE_PARKED, ids, dry_run, chunk)

    async def _parked_chunks(
        self, text: str, ids: Sequence[int] | None, dry_run: bool, chunk: int
    ) -> list[int]:
        """Each chunk in a lock of its own: batches commit between chunks."""

        async def page(after: int, limit: int) -> list[int]:
            rows = await self._locked(
                lambda conn: conn.execute(sql.PARKED_PAGE, (after, limit)).fetchall()
            )
            return [r[0] for r in rows]

        async def act(chunk_ids: list[int]) -> list[int]:
            if dry_run and ids is None:
                return chunk_ids  # just paged: parked
            statement = sql.PARKED_AMONG if dry_run else text
            params = {"ids": encode_json(chunk_ids), "now": self._clock()}
            rows = await self._locked(
                lambda conn: conn.execute(statement, params).fetchall()
            )
            return [r[0] for r in rows]

        return await in_chunks(ids, chunk=chunk, page=page, act=act)

    async def list_dead_letters(self, flt: DeadLetterFilter) -> list[DeadLetterRow]:
        """Dead letters matching *flt*, newest first."""
        params = deadletter.filter_params(flt)
        rows = await self._locked(
            lambda conn: conn.execute(sql.LIST_DEAD_LETTERS, params).fetchall()
        )
        return [dead_letter_row(r, when=_utc) for r in rows]

    async def replay_dead_letters(
        self, flt: DeadLetterFilter, *, max_replays: int, dry_run: bool
    ) -> list[int]:
        """Queue matching parked dead letters back to their queue via the outbox.

        Same rules as `PostgresStore.replay_dead_letters`.
        """
        replay = partial(
            deadletter.replay,
            flt=flt,
            max_replays=max_replays,
            now=self._clock(),
            dry_run=dry_run,
        )
        ids = await self._transaction(replay)
        if ids and not dry_run:
            _log.info("dead_letters_replayed", count=len(ids))
        return ids

    async def purge_dead_letters(
        self, flt: DeadLetterFilter, *, dry_run: bool
    ) -> list[int]:
        """Mark matching dead letters purged and drop their bodies; return their ids.

        Holds whose blocker is purged are handed on in the same transaction.
        """
        purge = partial(deadletter.purge, flt=flt, now=self._clock(), dry_run=dry_run)
        ids = await self._transaction(purge)
        if ids and not dry_run:
            _log.info("dead_letters_purged", count=len(ids))
        return ids

    async def xref_put(self, entries: Sequence[XrefEntry]) -> None:
        """Upsert cross-reference entries, all or none.

        Raises:
            XrefConflict: a native id is bound to another canonical id.
        """
        unique = unique_entries(entries)
        if unique:
            now = self._clock()
            await self._transaction(lambda conn: put_xref(conn, unique, now))

    async def xref_get(self, kind: str, canonical_id: str) -> dict[str, XrefEntry]:
        """System → entry, for every system that knows this canonical object."""
        rows = await self._locked(
            lambda conn: conn.execute(sql.XREF_GET, (kind, canonical_id)).fetchall()
        )
        return {r[2]: xref_entry(r, when=_utc) for r in rows}

    async def xref_find(
        self, kind: str, system: str, native_id: str
    ) -> XrefEntry | None:
        """The entry binding this native id, if any."""
        row = await self._locked(
            lambda conn: conn.execute(
                sql.XREF_FIND, (kind, system, native_id)
            ).fetchone()
        )
        return xref_entry(row, when=_utc) if row is not None else None

    async def xref_many(
        self, kind: str, canonical_ids: Sequence[str]
    ) -> dict[str, dict[str, XrefEntry]]:
        """Canonical id → system → entry, for those of *canonical_ids* that have any."""
        params = {"kind": kind, "ids": encode_json(list(canonical_ids))}
        rows = await self._locked(
            lambda conn: conn.execute(sql.XREF_MANY, params).fetchall()
        )
        found: dict[str, dict[str, XrefEntry]] = {}
        for r in rows:
            found.setdefault(r[1], {})[r[2]] = xref_entry(r, when=_utc)
        return found

    async def pause_system(
        self, system: str, *, reason: str, paused_by: str
    ) -> SystemPause:
        """Pause *system* for every daemon on this store (`Store`)."""
        params: dict[str, object] = {"system": system, "reason": reason}
        params.update(paused_by=paused_by, now=self._clock())
        row = await self._transaction(
            lambda conn: conn.execute(pauses.SQLITE_PAUSE, params).fetchone()
        )
        return pause_row(row, when=_utc)

    async def resume_system(self, system: str) -> SystemPause | None:
        """End *system*'s pause; return it (None: it was not paused)."""
        row = await self._transaction(
            lambda conn: conn.execute(
                pauses.SQLITE_RESUME, {"system": system}
            ).fetchone()
        )
        return pause_row(row, when=_utc) if row is not None else None

    async def system_pauses(self) -> dict[str, SystemPause]:
        """System → its pause, for every paused system."""
        rows = await self._locked(
            lambda conn: conn.execute(pauses.SQLITE_PAUSES).fetchall()
        )
        return {r[0]: pause_row(r, when=_utc) for r in rows}

    async def take_tokens(
        self, system: str, want: int, *, rate_per_s: float, burst: float
    ) -> tuple[int, float]:
        """Up to *want* of *system*'s shared tokens, in one write transaction."""

        def take(conn: sqlite3.Connection) -> tuple[int, float]:
            row = conn.execute(ratebuckets.SQLITE_READ, {"system": system}).fetchone()
            tokens, last = (None, None) if row is None else (row[0], row[1])
            at = self._clock() if last is None else max(self._clock(), last)
            granted, left, wait_s = ratebuckets.refill(
                tokens,
                0.0 if last is None else at - last,
                want=want,
                rate_per_s=rate_per_s,
                burst=burst,
            )
            params = {"system": system, "tokens": left, "at": at}
            conn.execute(ratebuckets.SQLITE_WRITE, params)
            return granted, wait_s

        return await self._transaction(take)

    async def try_lease(self, key: str, owner: str, *, lease_s: float) -> bool:
        """Take lock *key* for *owner*, in one write transaction."""

        def take(conn: sqlite3.Connection) -> bool:
            now = self._clock()
            lapsed = now - leases.LAPSED_KEPT_S
            conn.execute(leases.SQLITE_FORGET, {"lapsed": lapsed, "key": key})
            params = {"key": key, "owner": owner, "until": now + lease_s, "now": now}
            conn.execute(leases.SQLITE_TAKE, params)
            row = conn.execute(leases.SQLITE_HOLDER, {"key": key}).fetchone()
            return row is not None and row[0] == owner

        return await self._transaction(take)

    async def end_lease(self, key: str, owner: str) -> None:
        """Give back lock *key* if *owner* holds it."""
        await self._transaction(
            lambda conn: conn.execute(leases.SQLITE_END, {"key": key, "owner": owner})
        )

    async def load_saga(self, workflow: str, correlation_id: str) -> SagaRecord | None:
        """One instance's state, for status queries and tests."""
        row = await self._locked(
            lambda conn: conn.execute(
                sql.LOAD_SAGA, (workflow, correlation_id)
            ).fetchone()
        )
        return saga_record(workflow, row, when=_utc) if row is not None else None

    async def idle_sagas(
        self,
        workflow: str,
        *,
        idle_days: int,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[SagaRecord]:
        """One page of *workflow*'s instances unchanged for *idle_days* days."""
        at, cid = (after[0].timestamp(), after[1]) if after is not None else (0.0, "")
        params = {
            "workflow": workflow,
            "before": self._clock() - idle_days * 86_400.0,
            "after_at": at,
            "after_id": cid,
            "limit": limit,
        }
        rows = await self._locked(
            lambda conn: conn.execute(sql.IDLE_SAGAS, params).fetchall()
        )
        return [saga_record(workflow, r, when=_utc) for r in rows]

    async def delete_sagas(
        self, workflow: str, instances: Sequence[tuple[str, int]]
    ) -> int:
        """Delete *workflow*'s *instances* unless changed, held or awaited."""
        if not instances:
            return 0
        params = {
            "workflow": workflow,
            "instances": encode_json(list(instances)),
            "now": self._clock(),
        }
        return await self._transaction(
            lambda conn: conn.execute(sql.DELETE_SAGAS, params).rowcount
        )

    async def journal(
        self, correlation_id: str, *, limit: int = 1000
    ) -> list[JournalRow]:
        """The audit trail of one correlation id, oldest first."""
        rows = await self._locked(
            lambda conn: conn.execute(sql.JOURNAL, (correlation_id, limit)).fetchall()
        )
        return [journal_row(r, when=_utc) for r in rows]

    async def prune(
        self, *, retention_days: int, journal_retention_days: int | None = None
    ) -> dict[str, int]:
        """Delete, in chunks, old keys, journal entries, sent rows and dead letters.

        Keeps what is younger than the retention (inbox by the key's day,
        journal by its time, outbox rows marked sent by releases that kept
        them by when they were sent, dead letters by ``last_seen``); the
        journal keeps *journal_retention_days* (default: *retention_days*).
        Only dead letters nothing waits on any more go: released, replayed
        or purged, and no hold's blocker; parked and held ones stay. The lock
        is released between chunks, so batches keep flowing.

        Holds nothing can release any more are handed on (`sweep_holds`)
        before dead letters are deleted.

        Returns:
            Rows deleted under ``inbox``, ``journal``, ``outbox`` and
            ``dead_letters``, instances handed on under ``holds_swept``; the
            ``*_partitions`` counts are always 0 here.
        """
        now = self._clock()
        today = _utc(now).date()
        journal_days = (
            retention_days if journal_retention_days is None else journal_retention_days
        )
        result = {
            "inbox_partitions": 0,
            "journal_partitions": 0,
            "inbox": await self._delete_chunks(
                sql.PRUNE_INBOX, (today - timedelta(days=retention_days)).isoformat()
            ),
            "journal": await self._delete_chunks(
                sql.PRUNE_JOURNAL, _midnight(today - timedelta(days=journal_days))
            ),
            "outbox": await self._delete_chunks(
                sql.PRUNE_OUTBOX, now - retention_days * 86_400.0
            ),
            "holds_swept": await self.sweep_holds(),
            "dead_letters": await self._delete_chunks(
                sql.PRUNE_DEAD_LETTERS, now - retention_days * 86_400.0
            ),
        }
        _log.debug("store_pruned", **result)
        return result

    async def _delete_chunks(self, sql: str, cutoff: object) -> int:
        total = 0
        while True:
            deleted = await self._locked(
                lambda conn: conn.execute(sql, (cutoff, PRUNE_CHUNK)).rowcount
            )
            total += deleted
            if deleted < PRUNE_CHUNK:
                return total

    async def ping(self) -> None:
        """``SELECT 1`` on the store's connection, off the event loop."""
        await self._locked(lambda conn: conn.execute(sql.PING).fetchone())

    async def counts(self) -> dict[str, int]:
        """Exact row counts for status."""
        row = await self._locked(lambda conn: conn.execute(sql.COUNTS).fetchone())
        keys = (
            "outbox_pending",
            "outbox_parked",
            "dead_letters",
            "held",
            "holds",
            "sagas",
            "inbox",
        )
        return dict(zip(keys, row, strict=True))

    async def aclose(self) -> None:
        """Close the connection (after any call in progress)."""
        with anyio.CancelScope(shield=True):
            if not self._closed:
                await self._locked(lambda conn: conn.close())
                self._closed = True


def _parked_row(r: Row, *, with_body: bool = False) -> ParkedOutboxRow:
    """Decode `sqlite_sql.LIST_PARKED`'s columns (and SHOW_PARKED's ``body``)."""
    return ParkedOutboxRow(
        id=r[0],
        message_id=r[1],
        exchange=r[2],
        routing_key=r[3],
        correlation_id=r[4],
        type=r[5],
        headers=decode_headers(r[6]),
        attempts=r[7],
        reason=r[8],
        created_at=_utc(r[9]),
        size_bytes=r[10],
        body=r[11] if with_body else None,
    )


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
