"""The embedded store: SQLite, for first runs and (in memory) for tests.

One connection serves the whole process. sqlite3 blocks, so every call runs
on a worker thread (``anyio.to_thread.run_sync``), and an `anyio.Lock` gives
the connection to one transaction at a time: a `SqliteStore.batch()` holds
it from ``BEGIN IMMEDIATE`` to ``COMMIT``. Do not call store methods from
inside an open batch of the same store; the lock is not re-entrant and anyio
raises rather than deadlocking.

It behaves like the PostgreSQL store (the contract suite runs against both)
except for what one writer makes moot: no partitions (retention deletes in
chunks), no ``SKIP LOCKED``, no lock ordering. Times are seconds since the
epoch from an injectable clock, so tests can move time.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final, TypeVar, cast, final

import anyio
import anyio.to_thread
import msgspec
import structlog

from broker.config import SqliteConfig
from broker.errors import ConcurrencyConflict, StoreUnavailable
from broker.store import (
    BatchRead,
    BatchWrite,
    DeadLetterFilter,
    DeadLetterRecord,
    DeadLetterRow,
    DeadLetterStatus,
    InboxKey,
    JournalRecord,
    JournalRow,
    OutboxRecord,
    OutboxRow,
    SagaRecord,
    SagaWrite,
)
from broker.store.migrate import apply_sqlite, load_migrations

__all__ = ["SqliteStore", "SqliteBatch", "sqlite_errors", "PRUNE_CHUNK"]

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")

#: Primary result codes that mean "try again later": busy, locked, I/O, full.
_RETRYABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)

#: Rows deleted per transaction when pruning.
PRUNE_CHUNK: Final = 5000


@contextmanager
def sqlite_errors() -> Iterator[None]:
    """Re-raise "busy", "locked" and I/O failures as `StoreUnavailable`, chained.

    Other sqlite3 errors (no such table, constraint failures) are bugs and
    pass through unchanged.
    """
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _RETRYABLE_CODES:
            raise StoreUnavailable(f"sqlite unavailable: {exc}") from exc
        raise
    except OSError as exc:
        raise StoreUnavailable(f"sqlite unavailable: {exc}") from exc


# --- SQL ----------------------------------------------------------------------------

# json_each() expands one JSON array parameter into rows: one statement per
# batch, like unnest() on PostgreSQL. "WHERE true" resolves the parser's
# ambiguity between a join's ON and the upsert's ON CONFLICT.
_CLAIM = """
INSERT INTO inbox (consumer, key, day, message_id, claimed_at)
SELECT :consumer, json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'),
       json_extract(j.value, '$[2]'), :now
FROM json_each(:keys) AS j
WHERE true
ON CONFLICT DO NOTHING
RETURNING key
"""

_RELEASE = """
DELETE FROM inbox
WHERE consumer = :consumer AND key IN (SELECT value FROM json_each(:keys))
"""

_SAGA_COLUMNS = "correlation_id, version, state, updated_at"

_LOAD_SAGAS = f"""
SELECT {_SAGA_COLUMNS} FROM saga
WHERE workflow = :workflow AND correlation_id IN (SELECT value FROM json_each(:ids))
"""

_CREATE_SAGA = """
INSERT INTO saga (workflow, correlation_id, version, state, updated_at)
VALUES (?, ?, 1, ?, ?)
"""

_UPDATE_SAGA = """
UPDATE saga SET version = version + 1, state = ?, updated_at = ?
WHERE workflow = ? AND correlation_id = ?
"""

_ADD_OUTBOX = """
INSERT INTO outbox (message_id, exchange, routing_key, body, correlation_id, type,
                    headers, created_at, attempts, next_attempt_at, lease_until)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_OUTBOX_SEQ = "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"

_ADD_DEAD_LETTER = """
INSERT INTO dead_letter (message_id, queue, routing_key, reason, detail, body, headers,
                         attempts, correlation_id, type, first_seen, last_seen)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (message_id) DO UPDATE SET
    queue = excluded.queue,
    routing_key = excluded.routing_key,
    reason = excluded.reason,
    detail = excluded.detail,
    body = excluded.body,
    headers = excluded.headers,
    attempts = dead_letter.attempts + excluded.attempts,
    correlation_id = coalesce(excluded.correlation_id, dead_letter.correlation_id),
    type = coalesce(excluded.type, dead_letter.type),
    status = 'parked',
    last_seen = excluded.last_seen
"""

_ADD_JOURNAL = """
INSERT INTO journal (at, message_id, correlation_id, stage, type, detail)
VALUES (?, ?, ?, ?, ?, ?)
"""

_OUTBOX_COLUMNS = (
    "id, message_id, exchange, routing_key, body, correlation_id, type, headers, "
    "attempts"
)

_CLAIM_OUTBOX = f"""
UPDATE outbox SET lease_until = :lease_until, attempts = attempts + 1
WHERE id IN (
    SELECT id FROM outbox
    WHERE sent_at IS NULL AND parked_reason IS NULL
      AND next_attempt_at <= :now
      AND (lease_until IS NULL OR lease_until <= :now)
    ORDER BY id
    LIMIT :limit
)
RETURNING {_OUTBOX_COLUMNS}
"""

_IDS = "id IN (SELECT value FROM json_each(:ids))"

_MARK_SENT = f"""
UPDATE outbox SET sent_at = :now, lease_until = NULL
WHERE {_IDS} AND sent_at IS NULL
"""

_RESCHEDULE = f"""
UPDATE outbox SET next_attempt_at = :at, lease_until = NULL
WHERE {_IDS} AND sent_at IS NULL
"""

_PARK = f"""
UPDATE outbox SET parked_reason = :reason, lease_until = NULL
WHERE {_IDS} AND sent_at IS NULL
"""

_DL_MATCH = """
    (:n_ids = 0 OR id IN (SELECT value FROM json_each(:ids)))
    AND (:reason IS NULL OR reason = :reason)
    AND (:queue IS NULL OR queue = :queue)
    AND (:type IS NULL OR type = :type)
    AND (:correlation_id IS NULL OR correlation_id = :correlation_id)
"""

_LIST_DEAD_LETTERS = f"""
SELECT id, message_id, queue, routing_key, reason, detail, body, headers,
       attempts, correlation_id, type, status, replays, first_seen, last_seen
FROM dead_letter
WHERE {_DL_MATCH} AND (:status IS NULL OR status = :status)
ORDER BY id DESC
LIMIT :limit
"""

_REPLAYABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND status = 'parked' AND replays < :max_replays
ORDER BY id DESC
LIMIT :limit
"""

_REPLAY = f"""
UPDATE dead_letter SET status = 'replayed', replays = replays + 1
WHERE {_IDS}
RETURNING id, message_id, queue, body, headers, replays, correlation_id, type
"""

_PURGEABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND (:status IS NULL OR status = :status) AND status <> 'purged'
ORDER BY id DESC
LIMIT :limit
"""

_PURGE = f"UPDATE dead_letter SET status = 'purged', body = x'' WHERE {_IDS}"

_LOAD_SAGA = f"""
SELECT {_SAGA_COLUMNS} FROM saga WHERE workflow = ? AND correlation_id = ?
"""

_JOURNAL = """
SELECT id, at, message_id, correlation_id, stage, type, detail
FROM journal WHERE correlation_id = ?
ORDER BY at, id
LIMIT ?
"""

_PRUNE_INBOX = """
DELETE FROM inbox WHERE rowid IN (SELECT rowid FROM inbox WHERE day < ? LIMIT ?)
"""

_PRUNE_JOURNAL = """
DELETE FROM journal WHERE id IN (SELECT id FROM journal WHERE at < ? LIMIT ?)
"""

_PRUNE_OUTBOX = """
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sent_at < ? LIMIT ?)
"""

_COUNTS = """
SELECT
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NULL),
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NOT NULL),
    (SELECT count(*) FROM dead_letter WHERE status = 'parked'),
    (SELECT count(*) FROM saga),
    (SELECT count(*) FROM inbox)
"""

_encode_json = msgspec.json.Encoder()
_decode_headers = msgspec.json.Decoder(dict[str, Any])


def _json(value: object) -> str:
    return _encode_json.encode(value).decode()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def _saga(workflow: str, r: tuple[Any, ...]) -> SagaRecord:
    return SagaRecord(
        workflow=workflow,
        correlation_id=r[0],
        version=r[1],
        state=r[2],
        updated_at=_utc(r[3]),
    )


def _outbox_row(r: tuple[Any, ...]) -> OutboxRow:
    return OutboxRow(
        id=r[0],
        message_id=r[1],
        exchange=r[2],
        routing_key=r[3],
        body=r[4],
        correlation_id=r[5],
        type=r[6],
        headers=_decode_headers.decode(r[7]),
        attempts=r[8],
    )


def _dead_letter_row(r: tuple[Any, ...]) -> DeadLetterRow:
    return DeadLetterRow(
        id=r[0],
        message_id=r[1],
        queue=r[2],
        routing_key=r[3],
        reason=r[4],
        detail=r[5],
        body=r[6],
        headers=_decode_headers.decode(r[7]),
        attempts=r[8],
        correlation_id=r[9],
        type=r[10],
        status=cast(DeadLetterStatus, r[11]),  # the CHECK constraint allows no other
        replays=r[12],
        first_seen=_utc(r[13]),
        last_seen=_utc(r[14]),
    )


def _dl_params(flt: DeadLetterFilter) -> dict[str, Any]:
    return {
        "n_ids": len(flt.ids),
        "ids": _json(flt.ids),
        "reason": flt.reason,
        "queue": flt.queue,
        "type": flt.type,
        "correlation_id": flt.correlation_id,
        "status": flt.status,
        "limit": flt.limit,
    }


def _unique_dead_letters(records: Sequence[DeadLetterRecord]) -> list[DeadLetterRecord]:
    """One record per message id, as on PostgreSQL: attempts add up, the last wins."""
    merged: dict[str, DeadLetterRecord] = {}
    for record in records:
        seen = merged.get(record.message_id)
        if seen is not None:
            record = msgspec.structs.replace(
                record, attempts=seen.attempts + record.attempts
            )
        merged[record.message_id] = record
    return list(merged.values())


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _in_transaction(conn: sqlite3.Connection, fn: Callable[[], _T]) -> _T:
    """Run *fn* inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (blocking)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return result


@final
class SqliteBatch:
    """One open SQLite transaction; see `broker.store.Batch`.

    Internal: obtained from `SqliteStore.batch()` only. As on PostgreSQL, a
    failed call dooms the batch: leaving the block after swallowing the
    error rolls back and raises it again.
    """

    __slots__ = ("_closed", "_store", "failure")

    def __init__(self, store: SqliteStore) -> None:
        self._store = store
        self._closed = False
        #: The first exception a call raised, if any.
        self.failure: BaseException | None = None

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise RuntimeError("this batch has ended; open a new one")
        try:
            return await self._store._run(fn)
        except BaseException as exc:
            self.failure = self.failure or exc
            raise

    async def claim(self, consumer: str, keys: Sequence[InboxKey]) -> set[str]:
        """Insert inbox keys; return the ones that were new."""
        if not keys:
            return set()
        unique: dict[str, InboxKey] = {}
        for k in keys:
            unique.setdefault(k.key, k)
        payload = _json(
            [(k.key, k.day.isoformat(), k.message_id) for k in unique.values()]
        )
        params = {"consumer": consumer, "keys": payload, "now": self._store._clock()}

        def run(conn: sqlite3.Connection) -> set[str]:
            return {r[0] for r in conn.execute(_CLAIM, params)}

        return await self._call(run)

    async def release(self, consumer: str, keys: Sequence[str]) -> None:
        """Remove keys claimed earlier in this transaction."""
        if keys:
            params = {"consumer": consumer, "keys": _json(list(keys))}
            await self._call(lambda conn: conn.execute(_RELEASE, params))

    async def load_sagas(
        self, workflow: str, correlation_ids: Sequence[str]
    ) -> dict[str, SagaRecord]:
        """Return the stored instances among *correlation_ids*."""
        if not correlation_ids:
            return {}
        params = {"workflow": workflow, "ids": _json(list(correlation_ids))}

        def run(conn: sqlite3.Connection) -> dict[str, SagaRecord]:
            return {r[0]: _saga(workflow, r) for r in conn.execute(_LOAD_SAGAS, params)}

        return await self._call(run)

    async def save_sagas(self, workflow: str, writes: Sequence[SagaWrite]) -> None:
        """Create or update instances, each only at its expected version.

        Raises:
            ConcurrencyConflict: naming the instances that changed since loaded.
            ValueError: one instance appears twice in *writes*.
        """
        if not writes:
            return
        ids = [w.correlation_id for w in writes]
        if len(set(ids)) != len(ids):
            raise ValueError(f"saga {workflow}: one write per instance per call")
        now = self._store._clock()

        def run(conn: sqlite3.Connection) -> list[str]:
            # This transaction holds the write lock: versions read here cannot
            # change before the writes below.
            current = {
                r[0]: r[1]
                for r in conn.execute(
                    _LOAD_SAGAS, {"workflow": workflow, "ids": _json(ids)}
                )
            }
            conflicts = [
                w.correlation_id
                for w in writes
                if current.get(w.correlation_id, 0) != w.expected_version
            ]
            if conflicts:
                return conflicts
            conn.executemany(
                _CREATE_SAGA,
                [
                    (workflow, w.correlation_id, w.state, now)
                    for w in writes
                    if w.expected_version == 0
                ],
            )
            conn.executemany(
                _UPDATE_SAGA,
                [
                    (w.state, now, workflow, w.correlation_id)
                    for w in writes
                    if w.expected_version != 0
                ],
            )
            return []

        conflicts = await self._call(run)
        if conflicts:
            conflict = ConcurrencyConflict(
                f"saga {workflow}: {len(conflicts)} instance(s) changed since loaded, "
                f"e.g. {sorted(conflicts)[:5]}"
            )
            self.failure = self.failure or conflict
            raise conflict

    async def add_outbox(self, records: Sequence[OutboxRecord]) -> list[OutboxRow]:
        """Insert messages to publish, leased to this writer; rows in input order."""
        if not records:
            return []
        now = self._store._clock()
        lease_until = now + self._store._lease_s
        params = [
            (
                r.message_id,
                r.exchange,
                r.routing_key,
                r.body,
                r.correlation_id,
                r.type,
                _json(r.headers),
                now,
                1,
                now,
                lease_until,
            )
            for r in records
        ]

        def run(conn: sqlite3.Connection) -> int:
            # AUTOINCREMENT under the write lock: the new ids are seq+1 ... seq+n.
            before = conn.execute(_OUTBOX_SEQ).fetchone()
            first = (before[0] if before else 0) + 1
            conn.executemany(_ADD_OUTBOX, params)
            after = conn.execute(_OUTBOX_SEQ).fetchone()
            if after is None or after[0] != first + len(params) - 1:
                raise RuntimeError("outbox ids were not allocated consecutively")
            return int(first)

        first = await self._call(run)
        return [
            OutboxRow(
                id=first + i,
                message_id=r.message_id,
                exchange=r.exchange,
                routing_key=r.routing_key,
                body=r.body,
                correlation_id=r.correlation_id,
                type=r.type,
                headers=r.headers,
                attempts=1,
            )
            for i, r in enumerate(records)
        ]

    async def add_dead_letters(self, records: Sequence[DeadLetterRecord]) -> None:
        """Record dead letters, upserted by message id (attempts add up)."""
        if not records:
            return
        now = self._store._clock()
        params = [
            (
                r.message_id,
                r.queue,
                r.routing_key,
                r.reason,
                r.detail,
                r.body,
                _json(r.headers),
                r.attempts,
                r.correlation_id,
                r.type,
                now,
                now,
            )
            for r in _unique_dead_letters(records)
        ]
        await self._call(lambda conn: conn.executemany(_ADD_DEAD_LETTER, params))

    async def add_journal(self, records: Sequence[JournalRecord]) -> None:
        """Append audit entries, in order."""
        if not records:
            return
        now = self._store._clock()
        params = [
            (now, r.message_id, r.correlation_id, r.stage, r.type, r.detail)
            for r in records
        ]
        await self._call(lambda conn: conn.executemany(_ADD_JOURNAL, params))


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
            cfg: the ``[sqlite]`` section, or a path, or ``":memory:"``.
            lease_s: how long rows written by `add_outbox` stay leased to
                their writer before the relay may publish them.
            migrate: apply pending migrations.
            busy_timeout_s: how long to wait for another process's write lock.
            clock: seconds since the epoch; tests inject a fake one.

        Raises:
            StoreUnavailable: the file cannot be opened or is locked.
        """
        path = cfg.path if isinstance(cfg, SqliteConfig) else os.fspath(cfg)
        with sqlite_errors():
            conn = await anyio.to_thread.run_sync(_connect, path, busy_timeout_s)
        store = cls(conn, path=path, lease_s=lease_s, clock=clock)
        try:
            if migrate:
                await store.migrate()
        except BaseException:
            await store.aclose()
            raise
        _log.info("store_opened", store="sqlite", path=path)
        return store

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *fn* on a worker thread (the caller holds the lock)."""
        with sqlite_errors():
            return await anyio.to_thread.run_sync(fn, self._conn)

    async def _locked(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *fn* on a worker thread with the connection to itself."""
        async with self._lock:
            return await self._run(fn)

    async def _transaction(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run *fn* in a transaction of its own."""
        return await self._locked(lambda conn: _in_transaction(conn, partial(fn, conn)))

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""
        migrations = await load_migrations("sqlite")
        return await self._locked(lambda conn: apply_sqlite(conn, migrations))

    async def prepare_batch(
        self,
        consumer: str,
        keys: Sequence[str],
        workflow: str,
        correlation_ids: Sequence[str],
    ) -> BatchRead:
        """Claimed keys and stored instances (no locks: commit_batch re-checks)."""

        def run(conn: sqlite3.Connection) -> BatchRead:
            claimed = frozenset(
                r[0]
                for r in conn.execute(
                    "SELECT key FROM inbox WHERE consumer = :consumer"
                    " AND key IN (SELECT value FROM json_each(:keys))",
                    {"consumer": consumer, "keys": _json(list(keys))},
                )
            )
            sagas = {
                r[0]: _saga(workflow, r)
                for r in conn.execute(
                    _LOAD_SAGAS,
                    {"workflow": workflow, "ids": _json(list(correlation_ids))},
                )
            }
            return BatchRead(claimed=claimed, sagas=sagas)

        return await self._locked(run)

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Write the whole batch in one transaction.

        Raises:
            ConcurrencyConflict: a key was claimed, or an instance changed,
                since `prepare_batch`; nothing was written.
        """
        async with self.batch() as tx:
            unique = {k.key for k in write.keys}
            claimed = await tx.claim(write.consumer, write.keys)
            if len(claimed) != len(unique):
                raise ConcurrencyConflict(
                    f"{len(unique) - len(claimed)} of {len(unique)} idempotency keys "
                    f"of {write.consumer} were claimed concurrently"
                )
            await tx.save_sagas(write.workflow, write.sagas)
            await tx.add_dead_letters(write.dead_letters)
            await tx.add_journal(write.journal)
            return await tx.add_outbox(write.outbox)

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[SqliteBatch]:
        """Open one transaction; commit on clean exit, roll back on error.

        Raises:
            StoreUnavailable: the database is locked or failing.
            ConcurrencyConflict: re-raised at exit if a swallowed conflict
                happened inside the block (the batch was rolled back).
        """
        async with self._lock:
            await self._run(lambda conn: conn.execute("BEGIN IMMEDIATE"))
            batch = SqliteBatch(self)
            try:
                yield batch
            except BaseException:
                batch._closed = True
                await self._rollback()
                raise
            batch._closed = True
            if batch.failure is not None:
                await self._rollback()
                raise batch.failure
            try:
                await self._run(lambda conn: conn.execute("COMMIT"))
            except BaseException:
                await self._rollback()
                raise

    async def _rollback(self) -> None:
        with anyio.CancelScope(shield=True):
            try:
                await self._run(_rollback)
            except (StoreUnavailable, sqlite3.Error) as exc:
                # The error that got us here is the one worth raising.
                _log.warning("rollback_failed", error=repr(exc))

    async def claim_outbox(self, *, limit: int, lease_s: float) -> list[OutboxRow]:
        """Lease up to *limit* unsent rows with no live lease, oldest first."""
        now = self._clock()
        params = {"now": now, "lease_until": now + lease_s, "limit": limit}
        rows = await self._locked(
            lambda conn: conn.execute(_CLAIM_OUTBOX, params).fetchall()
        )
        return sorted((_outbox_row(r) for r in rows), key=lambda row: row.id)

    async def mark_sent(self, ids: Sequence[int]) -> None:
        """Record that the broker confirmed these rows."""
        if ids:
            params = {"ids": _json(list(ids)), "now": self._clock()}
            await self._locked(lambda conn: conn.execute(_MARK_SENT, params))

    async def reschedule_outbox(self, ids: Sequence[int], *, delay_s: float) -> None:
        """Release the rows' lease and make them eligible again after *delay_s*."""
        if ids:
            params = {"ids": _json(list(ids)), "at": self._clock() + delay_s}
            await self._locked(lambda conn: conn.execute(_RESCHEDULE, params))

    async def park_outbox(self, ids: Sequence[int], *, reason: str) -> None:
        """Stop retrying rows that cannot be routed; they stay for an operator."""
        if ids:
            params = {"ids": _json(list(ids)), "reason": reason}
            await self._locked(lambda conn: conn.execute(_PARK, params))

    async def list_dead_letters(self, flt: DeadLetterFilter) -> list[DeadLetterRow]:
        """Dead letters matching *flt*, newest first."""
        params = _dl_params(flt)
        rows = await self._locked(
            lambda conn: conn.execute(_LIST_DEAD_LETTERS, params).fetchall()
        )
        return [_dead_letter_row(r) for r in rows]

    async def replay_dead_letters(
        self, flt: DeadLetterFilter, *, max_replays: int, dry_run: bool
    ) -> list[int]:
        """Queue matching parked dead letters back to their queue via the outbox.

        Same rules as `PostgresStore.replay_dead_letters`.
        """
        params = {**_dl_params(flt), "max_replays": max_replays}
        now = self._clock()

        def run(conn: sqlite3.Connection) -> list[int]:
            ids = [r[0] for r in conn.execute(_REPLAYABLE, params)]
            if dry_run or not ids:
                return ids
            replayed = conn.execute(_REPLAY, {"ids": _json(ids)}).fetchall()
            conn.executemany(
                _ADD_OUTBOX,
                [
                    (
                        message_id,
                        "",
                        queue,
                        body,
                        correlation_id,
                        type_,
                        _json(
                            {**_decode_headers.decode(headers), "x-q2c-replay": replays}
                        ),
                        now,
                        0,
                        now,
                        None,
                    )
                    for (
                        _,
                        message_id,
                        queue,
                        body,
                        headers,
                        replays,
                        correlation_id,
                        type_,
                    ) in sorted(replayed)
                ],
            )
            return ids

        ids = await self._transaction(run)
        if ids and not dry_run:
            _log.info("dead_letters_replayed", count=len(ids))
        return ids

    async def purge_dead_letters(
        self, flt: DeadLetterFilter, *, dry_run: bool
    ) -> list[int]:
        """Mark matching dead letters purged and drop their bodies; return their ids."""
        params = _dl_params(flt)

        def run(conn: sqlite3.Connection) -> list[int]:
            ids = [r[0] for r in conn.execute(_PURGEABLE, params)]
            if ids and not dry_run:
                conn.execute(_PURGE, {"ids": _json(ids)})
            return ids

        ids = await self._transaction(run)
        if ids and not dry_run:
            _log.info("dead_letters_purged", count=len(ids))
        return ids

    async def load_saga(self, workflow: str, correlation_id: str) -> SagaRecord | None:
        """One instance's state, for status queries and tests."""
        row = await self._locked(
            lambda conn: conn.execute(_LOAD_SAGA, (workflow, correlation_id)).fetchone()
        )
        return _saga(workflow, row) if row is not None else None

    async def journal(
        self, correlation_id: str, *, limit: int = 1000
    ) -> list[JournalRow]:
        """The audit trail of one correlation id, oldest first."""
        rows = await self._locked(
            lambda conn: conn.execute(_JOURNAL, (correlation_id, limit)).fetchall()
        )
        return [
            JournalRow(
                id=r[0],
                at=_utc(r[1]),
                message_id=r[2],
                correlation_id=r[3],
                stage=r[4],
                type=r[5],
                detail=r[6],
            )
            for r in rows
        ]

    async def prune(
        self, *, retention_days: int, journal_retention_days: int | None = None
    ) -> dict[str, int]:
        """Delete, in chunks, inbox keys, journal entries and sent outbox rows.

        Keeps what is younger than the retention (inbox by the key's day,
        journal by its time, outbox by when it was sent); the journal keeps
        *journal_retention_days* (default: *retention_days*). The lock is
        released between chunks, so batches keep flowing.

        Returns:
            Rows deleted under ``inbox``, ``journal`` and ``outbox``; the
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
                _PRUNE_INBOX, (today - timedelta(days=retention_days)).isoformat()
            ),
            "journal": await self._delete_chunks(
                _PRUNE_JOURNAL, _midnight(today - timedelta(days=journal_days))
            ),
            "outbox": await self._delete_chunks(
                _PRUNE_OUTBOX, now - retention_days * 86_400.0
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

    async def counts(self) -> dict[str, int]:
        """Exact row counts for status."""
        row = await self._locked(lambda conn: conn.execute(_COUNTS).fetchone())
        keys = ("outbox_pending", "outbox_parked", "dead_letters", "sagas", "inbox")
        return dict(zip(keys, row, strict=True))

    async def aclose(self) -> None:
        """Close the connection (after any batch in progress)."""
        with anyio.CancelScope(shield=True):
            await self._locked(lambda conn: conn.close())


def _midnight(day: date) -> float:
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    """Open and tune the connection (blocking: runs on a worker thread)."""
    on_disk = path != ":memory:" and not path.startswith("file:")
    if on_disk:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_s,
        isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        check_same_thread=False,  # worker threads take turns, under the store's lock
        uri=path.startswith("file:"),
    )
    try:
        if on_disk:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn
