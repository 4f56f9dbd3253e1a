"""The production store: PostgreSQL through an asyncpg pool.

Every `PostgresBatch` method is one statement for the whole batch, with the
rows passed as arrays and expanded server-side by ``unnest``: a batch of a
thousand deliveries costs a handful of round trips, never one per row. SQL
texts are module constants, so asyncpg's per-connection statement cache
prepares each once.

This module and `broker.store.migrate` are the only places that know asyncpg's
exception classes: `store_errors()` turns every "try again later" failure into
`StoreUnavailable`, with the driver's exception chained as the cause.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Final, TypeAlias, cast, final

import anyio
import asyncpg
import msgspec
import structlog

from broker.config import PostgresConfig
from broker.errors import ConcurrencyConflict, ConfigError, StoreUnavailable
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
from broker.store.migrate import apply_postgres

__all__ = [
    "PostgresStore",
    "PostgresBatch",
    "store_errors",
    "PRUNE_CHUNK",
    "EXACT_COUNT_CAP",
    "MAINTENANCE_LOCK_TIMEOUT",
]

_log = structlog.get_logger(__name__)

# asyncpg's classes are generic only in the stubs: keep the aliases as strings.
_Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
_Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

_RETRYABLE: Final = (
    asyncpg.exceptions.PostgresConnectionError,  # connection lost or refused
    asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, statement timeout
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout (partition maintenance)
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a demoted primary
    # What asyncpg raises on a pooled connection whose backend was killed while
    # idle ("cannot switch to state ..."; MagicStack/asyncpg#784). Verified.
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,  # command_timeout or pool acquire timeout
)

#: Rows deleted per statement when pruning tables that are not partitioned.
PRUNE_CHUNK: Final = 5000

#: Above this many rows, `counts()` reports the planner's estimate instead.
EXACT_COUNT_CAP: Final = 100_000


@contextmanager
def store_errors() -> Iterator[None]:
    """Re-raise driver failures as `StoreUnavailable`, keeping the cause chained.

    SQL errors and misuse of the driver are bugs and pass through unchanged.
    """
    try:
        yield
    except _RETRYABLE as exc:
        raise StoreUnavailable(
            f"postgres unavailable: {type(exc).__name__}: {exc}"
        ) from exc


@contextmanager
def _connection_errors(conn: _Conn) -> Iterator[None]:
    """`store_errors()`, and an `InterfaceError` on a dead connection is an outage too.

    When a pooled connection's backend dies, asyncpg detaches it and later
    calls fail with "connection is closed" or "released back to the pool";
    on a live connection the same class means a bug, and passes through.
    """
    try:
        with store_errors():
            yield
    except asyncpg.exceptions.InterfaceError as exc:
        if not _lost(conn):
            raise
        raise StoreUnavailable(f"postgres unavailable: connection lost: {exc}") from exc


def _lost(conn: _Conn) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.exceptions.InterfaceError:
        return True  # detached: the pool took it back when the connection died


# --- SQL: the batch (one transaction of the hot path) -------------------------------

_CLAIM = """
INSERT INTO inbox (consumer, key, day, message_id)
SELECT $1, u.key, u.day, u.message_id
FROM unnest($2::text[], $3::date[], $4::text[]) AS u(key, day, message_id)
ORDER BY u.key
ON CONFLICT DO NOTHING
RETURNING key
"""

_RELEASE = "DELETE FROM inbox WHERE consumer = $1 AND key = ANY($2::text[])"

_LOAD_SAGAS = """
SELECT correlation_id, version, state, updated_at
FROM saga
WHERE workflow = $1 AND correlation_id = ANY($2::text[])
ORDER BY correlation_id
FOR UPDATE
"""

# Creates (expected version 0) and updates (version check) in one statement;
# it returns the instances that were neither created nor updated: conflicts.
_SAVE_SAGAS = """
WITH w AS (
    SELECT * FROM unnest($2::text[], $3::bigint[], $4::bytea[])
        AS w(correlation_id, expected, state)
), created AS (
    INSERT INTO saga (workflow, correlation_id, version, state)
    SELECT $1, w.correlation_id, 1, w.state FROM w
    WHERE w.expected = 0
    ORDER BY w.correlation_id
    ON CONFLICT DO NOTHING
    RETURNING correlation_id
), updated AS (
    UPDATE saga SET version = saga.version + 1, state = w.state, updated_at = now()
    FROM w
    WHERE w.expected > 0
      AND saga.workflow = $1
      AND saga.correlation_id = w.correlation_id
      AND saga.version = w.expected
    RETURNING saga.correlation_id
)
SELECT w.correlation_id FROM w
WHERE w.correlation_id NOT IN (
    SELECT correlation_id FROM created UNION ALL SELECT correlation_id FROM updated
)
"""

# Ids follow the input order (ORDER BY n), so RETURNING id is all we need back.
_ADD_OUTBOX = """
INSERT INTO outbox (message_id, exchange, routing_key, body, correlation_id, type,
                    headers, attempts, lease_until)
SELECT u.message_id, u.exchange, u.routing_key, u.body, u.correlation_id, u.type,
       u.headers::jsonb, 1, now() + make_interval(secs => $8)
FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[],
            $7::text[])
    WITH ORDINALITY AS u(message_id, exchange, routing_key, body, correlation_id, type,
                         headers, n)
ORDER BY u.n
RETURNING id
"""

_ADD_DEAD_LETTERS = """
INSERT INTO dead_letter AS d (message_id, queue, routing_key, reason, detail, body,
                              headers, attempts, correlation_id, type)
SELECT u.message_id, u.queue, u.routing_key, u.reason, u.detail, u.body,
       u.headers::jsonb, u.attempts, u.correlation_id, u.type
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[],
            $7::text[], $8::int[], $9::text[], $10::text[])
    AS u(message_id, queue, routing_key, reason, detail, body, headers, attempts,
         correlation_id, type)
ORDER BY u.message_id
ON CONFLICT (message_id) DO UPDATE SET
    queue = EXCLUDED.queue,
    routing_key = EXCLUDED.routing_key,
    reason = EXCLUDED.reason,
    detail = EXCLUDED.detail,
    body = EXCLUDED.body,
    headers = EXCLUDED.headers,
    attempts = d.attempts + EXCLUDED.attempts,
    correlation_id = coalesce(EXCLUDED.correlation_id, d.correlation_id),
    type = coalesce(EXCLUDED.type, d.type),
    status = 'parked',
    last_seen = now()
"""

_ADD_JOURNAL = """
INSERT INTO journal (message_id, correlation_id, stage, type, detail)
SELECT u.message_id, u.correlation_id, u.stage, u.type, u.detail
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
    WITH ORDINALITY AS u(message_id, correlation_id, stage, type, detail, n)
ORDER BY u.n
"""

# --- SQL: the batch in two round trips (prepare_batch, commit_batch) ----------------

_PREPARE_BATCH = """
SELECT 0, key, NULL::bigint, NULL::bytea, NULL::timestamptz
FROM inbox WHERE consumer = $1 AND key = ANY($2::text[])
UNION ALL
SELECT 1, correlation_id, version, state, updated_at
FROM saga WHERE workflow = $3 AND correlation_id = ANY($4::text[])
"""

_COMMIT_BATCH = """
SELECT q2c_commit_batch(
    $1, $2::text[], $3::date[], $4::text[],
    $5, $6::text[], $7::bigint[], $8::bytea[],
    $9::text[], $10::text[], $11::text[], $12::bytea[], $13::text[], $14::text[],
    $15::text[], $16,
    $17::text[], $18::text[], $19::text[], $20::text[], $21::text[], $22::bytea[],
    $23::text[], $24::int[], $25::text[], $26::text[],
    $27::text[], $28::text[], $29::text[], $30::text[], $31::text[])
"""

#: SQLSTATEs q2c_commit_batch raises when another writer got there first.
_CONFLICTS = frozenset({"QC001", "QC002"})

# --- SQL: the relay, operators and maintenance ---------------------------------------

_OUTBOX_COLUMNS = (
    "o.id, o.message_id, o.exchange, o.routing_key, o.body, o.correlation_id, o.type, "
    "o.headers::text, o.attempts"
)

_CLAIM_OUTBOX = f"""
UPDATE outbox AS o
SET lease_until = now() + make_interval(secs => $2), attempts = o.attempts + 1
FROM (
    SELECT id FROM outbox
    WHERE sent_at IS NULL AND parked_reason IS NULL
      AND next_attempt_at <= now()
      AND (lease_until IS NULL OR lease_until <= now())
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) AS c
WHERE o.id = c.id
RETURNING {_OUTBOX_COLUMNS}
"""

_MARK_SENT = """
UPDATE outbox SET sent_at = now(), lease_until = NULL
WHERE id = ANY($1::bigint[]) AND sent_at IS NULL
"""

_RESCHEDULE = """
UPDATE outbox
SET next_attempt_at = now() + make_interval(secs => $2), lease_until = NULL
WHERE id = ANY($1::bigint[]) AND sent_at IS NULL
"""

_PARK = """
UPDATE outbox SET parked_reason = $2, lease_until = NULL
WHERE id = ANY($1::bigint[]) AND sent_at IS NULL
"""

# $1..$5 select rows; every dead-letter statement below shares these parameters.
_DL_MATCH = """
    (cardinality($1::bigint[]) = 0 OR id = ANY($1::bigint[]))
    AND ($2::text IS NULL OR reason = $2)
    AND ($3::text IS NULL OR queue = $3)
    AND ($4::text IS NULL OR type = $4)
    AND ($5::text IS NULL OR correlation_id = $5)
"""

_LIST_DEAD_LETTERS = f"""
SELECT id, message_id, queue, routing_key, reason, detail, body, headers::text,
       attempts, correlation_id, type, status, replays, first_seen, last_seen
FROM dead_letter
WHERE {_DL_MATCH} AND ($6::text IS NULL OR status = $6)
ORDER BY id DESC
LIMIT $7
"""

_REPLAYABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND status = 'parked' AND replays < $6
ORDER BY id DESC
LIMIT $7
"""

# The replayed copy goes to the default exchange ("") with the original queue
# as routing key, i.e. straight back to that queue, under the same message id.
_REPLAY = f"""
WITH picked AS (
    {_REPLAYABLE}
    FOR UPDATE
), replayed AS (
    UPDATE dead_letter AS d SET status = 'replayed', replays = d.replays + 1
    FROM picked WHERE d.id = picked.id
    RETURNING d.id, d.message_id, d.queue, d.body, d.headers, d.replays,
              d.correlation_id, d.type
), queued AS (
    INSERT INTO outbox (message_id, exchange, routing_key, body, correlation_id, type,
                        headers)
    SELECT message_id, '', queue, body, correlation_id, type,
           headers || jsonb_build_object('x-q2c-replay', replays)
    FROM replayed
    ORDER BY id
)
SELECT id FROM replayed ORDER BY id DESC
"""

_PURGEABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND ($6::text IS NULL OR status = $6) AND status <> 'purged'
ORDER BY id DESC
LIMIT $7
"""

_PURGE = f"""
UPDATE dead_letter SET status = 'purged', body = ''::bytea
WHERE id IN ({_PURGEABLE} FOR UPDATE)
RETURNING id
"""

_LOAD_SAGA = """
SELECT correlation_id, version, state, updated_at
FROM saga WHERE workflow = $1 AND correlation_id = $2
"""

_JOURNAL = """
SELECT id, at, message_id, correlation_id, stage, type, detail
FROM journal WHERE correlation_id = $1
ORDER BY at, id
LIMIT $2
"""

_TODAY = "(now() AT TIME ZONE 'UTC')::date"

# Dropping a partition locks its parent exclusively, and attaching one locks
# the DEFAULT partition exclusively; while such a lock request waits, every
# insert queues behind it. So maintenance waits briefly, then gives up (as
# StoreUnavailable) and is retried at the next prune.
MAINTENANCE_LOCK_TIMEOUT: Final = "500ms"
_SET_LOCK_TIMEOUT = f"SET LOCAL lock_timeout = '{MAINTENANCE_LOCK_TIMEOUT}'"

_ENSURE_PARTITIONS = f"""
SELECT q2c_ensure_partitions('inbox', d - $1::int, d + $2::int)
     + q2c_ensure_partitions('journal', d, d + $2::int)
FROM (SELECT {_TODAY} AS d) AS today
"""

_DROP_PARTITIONS = f"""
SELECT q2c_drop_partitions('inbox', {_TODAY} - $1::int),
       q2c_drop_partitions('journal', {_TODAY} - $2::int)
"""

# Rows for days without a partition sit in the DEFAULT partitions; old ones go
# in chunks, by ctid, so no statement holds many row locks or runs long.
_PRUNE_INBOX_DEFAULT = f"""
DELETE FROM inbox_default WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM inbox_default WHERE day < {_TODAY} - $1::int LIMIT $2))
"""

_PRUNE_JOURNAL_DEFAULT = f"""
DELETE FROM journal_default WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM journal_default
    WHERE at < ({_TODAY} - $1::int)::timestamp AT TIME ZONE 'UTC' LIMIT $2))
"""

_PRUNE_OUTBOX = """
DELETE FROM outbox WHERE id = ANY(ARRAY(
    SELECT id FROM outbox WHERE sent_at < now() - make_interval(days => $1) LIMIT $2))
"""

_COUNTS = f"""
SELECT
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NULL),
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NOT NULL),
    (SELECT count(*) FROM dead_letter WHERE status = 'parked'),
    (SELECT count(*) FROM (SELECT 1 FROM saga LIMIT {EXACT_COUNT_CAP}) AS s),
    (SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'saga'::regclass),
    (SELECT count(*) FROM (SELECT 1 FROM inbox LIMIT {EXACT_COUNT_CAP}) AS i),
    (SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
     FROM pg_inherits AS h JOIN pg_class AS c ON c.oid = h.inhrelid
     WHERE h.inhparent = 'inbox'::regclass)
"""

_encode_json = msgspec.json.Encoder()
_decode_headers = msgspec.json.Decoder(dict[str, Any])


def _json(value: dict[str, Any]) -> str:
    return _encode_json.encode(value).decode()


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``DELETE 42``."""
    return int(status.rsplit(" ", 1)[-1])


def _saga(workflow: str, r: asyncpg.Record) -> SagaRecord:
    return SagaRecord(
        workflow=workflow,
        correlation_id=r[0],
        version=r[1],
        state=r[2],
        updated_at=r[3],
    )


def _outbox_row(r: asyncpg.Record) -> OutboxRow:
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


def _dead_letter_row(r: asyncpg.Record) -> DeadLetterRow:
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
        first_seen=r[13],
        last_seen=r[14],
    )


def _dl_args(flt: DeadLetterFilter) -> tuple[object, ...]:
    return (list(flt.ids), flt.reason, flt.queue, flt.type, flt.correlation_id)


def _unique_dead_letters(records: Sequence[DeadLetterRecord]) -> list[DeadLetterRecord]:
    """One record per message id (an upsert may not touch a row twice).

    Attempts of the duplicates add up; the last record wins otherwise.
    """
    merged: dict[str, DeadLetterRecord] = {}
    for record in records:
        seen = merged.get(record.message_id)
        if seen is not None:
            record = msgspec.structs.replace(
                record, attempts=seen.attempts + record.attempts
            )
        merged[record.message_id] = record
    return list(merged.values())


@final
class PostgresBatch:
    """One open PostgreSQL transaction; see `broker.store.Batch`.

    Internal: obtained from `PostgresStore.batch()` only. Calls must be awaited
    one at a time. If a call fails, the failure is remembered: leaving the
    block "cleanly" after swallowing it rolls back and raises it again, since
    PostgreSQL would silently turn that COMMIT into a ROLLBACK anyway.
    """

    __slots__ = ("_busy", "_closed", "_conn", "_lease_s", "failure")

    def __init__(self, conn: _Conn, *, lease_s: float) -> None:
        self._conn = conn
        self._lease_s = lease_s
        self._busy = False
        self._closed = False
        #: The first exception a call raised, if any.
        self.failure: BaseException | None = None

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        if self._closed:
            raise RuntimeError("this batch has ended; open a new one")
        if self._busy:
            raise RuntimeError("await each Batch call before starting the next")
        self._busy = True
        try:
            with _connection_errors(self._conn):
                return await self._conn.fetch(sql, *args)
        except BaseException as exc:
            self.failure = self.failure or exc
            raise
        finally:
            self._busy = False

    async def claim(self, consumer: str, keys: Sequence[InboxKey]) -> set[str]:
        """Insert inbox keys; return the ones that were new."""
        if not keys:
            return set()
        unique: dict[str, InboxKey] = {}
        for k in keys:
            unique.setdefault(k.key, k)
        rows = await self._fetch(
            _CLAIM,
            consumer,
            list(unique),
            [k.day for k in unique.values()],
            [k.message_id for k in unique.values()],
        )
        return {r[0] for r in rows}

    async def release(self, consumer: str, keys: Sequence[str]) -> None:
        """Remove keys claimed earlier in this transaction."""
        if keys:
            await self._fetch(_RELEASE, consumer, list(keys))

    async def load_sagas(
        self, workflow: str, correlation_ids: Sequence[str]
    ) -> dict[str, SagaRecord]:
        """Return the stored instances among *correlation_ids*, locked until commit."""
        if not correlation_ids:
            return {}
        rows = await self._fetch(_LOAD_SAGAS, workflow, list(correlation_ids))
        return {r[0]: _saga(workflow, r) for r in rows}

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
        rows = await self._fetch(
            _SAVE_SAGAS,
            workflow,
            ids,
            [w.expected_version for w in writes],
            [w.state for w in writes],
        )
        if rows:
            conflict = ConcurrencyConflict(
                f"saga {workflow}: {len(rows)} instance(s) changed since loaded, "
                f"e.g. {sorted(r[0] for r in rows)[:5]}"
            )
            self.failure = self.failure or conflict
            raise conflict

    async def add_outbox(self, records: Sequence[OutboxRecord]) -> list[OutboxRow]:
        """Insert messages to publish, leased to this writer; rows in input order."""
        if not records:
            return []
        rows = await self._fetch(
            _ADD_OUTBOX,
            [r.message_id for r in records],
            [r.exchange for r in records],
            [r.routing_key for r in records],
            [r.body for r in records],
            [r.correlation_id for r in records],
            [r.type for r in records],
            [_json(r.headers) for r in records],
            self._lease_s,
        )
        ids = sorted(r[0] for r in rows)
        return [
            OutboxRow(
                id=row_id,
                message_id=r.message_id,
                exchange=r.exchange,
                routing_key=r.routing_key,
                body=r.body,
                correlation_id=r.correlation_id,
                type=r.type,
                headers=r.headers,
                attempts=1,
            )
            for row_id, r in zip(ids, records, strict=True)
        ]

    async def add_dead_letters(self, records: Sequence[DeadLetterRecord]) -> None:
        """Record dead letters, upserted by message id (attempts add up)."""
        if not records:
            return
        unique = _unique_dead_letters(records)
        await self._fetch(
            _ADD_DEAD_LETTERS,
            [r.message_id for r in unique],
            [r.queue for r in unique],
            [r.routing_key for r in unique],
            [r.reason for r in unique],
            [r.detail for r in unique],
            [r.body for r in unique],
            [_json(r.headers) for r in unique],
            [r.attempts for r in unique],
            [r.correlation_id for r in unique],
            [r.type for r in unique],
        )

    async def add_journal(self, records: Sequence[JournalRecord]) -> None:
        """Append audit entries, in order."""
        if not records:
            return
        await self._fetch(
            _ADD_JOURNAL,
            [r.message_id for r in records],
            [r.correlation_id for r in records],
            [r.stage for r in records],
            [r.type for r in records],
            [r.detail for r in records],
        )


@final
class PostgresStore:
    """The durable store on PostgreSQL; implements `broker.store.Store`.

    Build it with `PostgresStore.open`. Every method acquires a pooled
    connection with the configured acquire timeout, and every statement runs
    under the pool's ``command_timeout``: an unreachable or silent database
    surfaces as `StoreUnavailable`, never as a hang.
    """

    def __init__(
        self, pool: _Pool, cfg: PostgresConfig, *, lease_s: float = 30.0
    ) -> None:
        self._pool = pool
        self._cfg = cfg
        self._lease_s = lease_s

    def __repr__(self) -> str:
        in_use = self._pool.get_size() - self._pool.get_idle_size()
        return (
            f"<PostgresStore {self._cfg.application_name} "
            f"{in_use}/{self._pool.get_max_size()} connections>"
        )

    @classmethod
    async def open(
        cls,
        cfg: PostgresConfig,
        *,
        lease_s: float = 30.0,
        migrate: bool = True,
        retention_days: int = 7,
    ) -> PostgresStore:
        """Connect the pool; with *migrate*, apply migrations and create partitions.

        Args:
            cfg: the ``[postgres]`` section. The DSN's database must exist.
            lease_s: how long rows written by `add_outbox` stay leased to
                their writer before the relay may publish them.
            migrate: apply pending migrations, then `ensure_partitions`.
            retention_days: how many past days of inbox partitions to create.

        Raises:
            StoreUnavailable: the server is unreachable or refused for now.
            ConfigError: the database does not exist or the login was refused.
        """
        try:
            with store_errors():
                pool = await asyncpg.create_pool(
                    cfg.dsn,
                    min_size=cfg.pool_min_size,
                    max_size=cfg.pool_max_size,
                    command_timeout=cfg.command_timeout_s,
                    timeout=cfg.acquire_timeout_s,
                    server_settings={"application_name": cfg.application_name},
                )
        except (
            asyncpg.exceptions.InvalidCatalogNameError,
            asyncpg.exceptions.InvalidAuthorizationSpecificationError,
        ) as exc:
            raise ConfigError(f"postgres refused the connection: {exc}") from exc
        store = cls(pool, cfg, lease_s=lease_s)
        try:
            if migrate:
                await store.migrate()
                await store.ensure_partitions(retention_days=retention_days)
        except BaseException:
            await store.aclose()
            raise
        _log.info(
            "store_opened",
            store="postgres",
            application_name=cfg.application_name,
            pool_max_size=cfg.pool_max_size,
        )
        return store

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[_Conn]:
        with store_errors():
            conn = await self._pool.acquire(timeout=self._cfg.acquire_timeout_s)
        try:
            with _connection_errors(conn):
                yield conn
        finally:
            await self._release(conn)

    async def _release(self, conn: _Conn) -> None:
        # Shielded so a cancelled caller still returns its connection; asyncpg
        # rolls back an open transaction on release, or terminates the connection.
        with anyio.move_on_after(self._cfg.command_timeout_s, shield=True):
            try:
                await self._pool.release(conn)
            except (
                asyncpg.exceptions.PostgresError,
                asyncpg.exceptions.InterfaceError,
                *_RETRYABLE,
            ) as exc:
                _log.warning("connection_release_failed", error=repr(exc))

    async def _fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            return await conn.fetch(sql, *args)

    async def _execute(self, sql: str, *args: object) -> str:
        async with self._connection() as conn:
            return await conn.execute(sql, *args)

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied.

        Raises:
            StoreUnavailable: the database is unreachable or asked us to retry.
        """
        async with self._connection() as conn:
            return await apply_postgres(conn)

    async def ensure_partitions(
        self, *, retention_days: int = 7, ahead_days: int = 7
    ) -> int:
        """Create missing daily partitions; return how many were created.

        Inbox: today - *retention_days* ... today + *ahead_days*; journal: today
        ... today + *ahead_days* (UTC days). Rows already waiting in a DEFAULT
        partition for a new day move into it.

        Raises:
            StoreUnavailable: also when a lock was not granted within
                `MAINTENANCE_LOCK_TIMEOUT` (try again later).
        """
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_SET_LOCK_TIMEOUT)
            created: int = await conn.fetchval(
                _ENSURE_PARTITIONS, retention_days, ahead_days
            )
        if created:
            _log.info("partitions_created", count=created)
        return created

    async def prepare_batch(
        self,
        consumer: str,
        keys: Sequence[str],
        workflow: str,
        correlation_ids: Sequence[str],
    ) -> BatchRead:
        """Claimed keys and stored instances, in one statement, without locks."""
        rows = await self._fetch(
            _PREPARE_BATCH, consumer, list(keys), workflow, list(correlation_ids)
        )
        claimed = frozenset(r[1] for r in rows if r[0] == 0)
        sagas = {
            r[1]: SagaRecord(
                workflow=workflow,
                correlation_id=r[1],
                version=r[2],
                state=r[3],
                updated_at=r[4],
            )
            for r in rows
            if r[0] == 1
        }
        return BatchRead(claimed=claimed, sagas=sagas)

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Write the whole batch with one call of ``q2c_commit_batch``.

        Raises:
            ConcurrencyConflict: a key was claimed, or an instance changed,
                since `prepare_batch`; nothing was written.
            StoreUnavailable: the database is unreachable or asked us to retry.
        """
        keys = {k.key: k for k in write.keys}
        outbox = write.outbox
        dead = _unique_dead_letters(write.dead_letters)
        journal = write.journal
        sagas = write.sagas
        try:
            rows = await self._fetch(
                _COMMIT_BATCH,
                write.consumer,
                list(keys),
                [k.day for k in keys.values()],
                [k.message_id for k in keys.values()],
                write.workflow,
                [w.correlation_id for w in sagas],
                [w.expected_version for w in sagas],
                [w.state for w in sagas],
                [r.message_id for r in outbox],
                [r.exchange for r in outbox],
                [r.routing_key for r in outbox],
                [r.body for r in outbox],
                [r.correlation_id for r in outbox],
                [r.type for r in outbox],
                [_json(r.headers) for r in outbox],
                self._lease_s,
                [r.message_id for r in dead],
                [r.queue for r in dead],
                [r.routing_key for r in dead],
                [r.reason for r in dead],
                [r.detail for r in dead],
                [r.body for r in dead],
                [_json(r.headers) for r in dead],
                [r.attempts for r in dead],
                [r.correlation_id for r in dead],
                [r.type for r in dead],
                [r.message_id for r in journal],
                [r.correlation_id for r in journal],
                [r.stage for r in journal],
                [r.type for r in journal],
                [r.detail for r in journal],
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate in _CONFLICTS:
                raise ConcurrencyConflict(str(exc)) from exc
            raise
        ids = sorted(r[0] for r in rows)
        return [
            OutboxRow(
                id=row_id,
                message_id=r.message_id,
                exchange=r.exchange,
                routing_key=r.routing_key,
                body=r.body,
                correlation_id=r.correlation_id,
                type=r.type,
                headers=r.headers,
                attempts=1,
            )
            for row_id, r in zip(ids, outbox, strict=True)
        ]

    @asynccontextmanager
    async def batch(self) -> AsyncIterator[PostgresBatch]:
        """Open one transaction; commit on clean exit, roll back on error.

        Raises:
            StoreUnavailable: the database is unreachable or asked us to retry.
            ConcurrencyConflict: re-raised at exit if a swallowed conflict
                happened inside the block (the batch was rolled back).
        """
        with store_errors():
            conn = await self._pool.acquire(timeout=self._cfg.acquire_timeout_s)
        try:
            tx = conn.transaction()
            with _connection_errors(conn):
                await tx.start()
            batch = PostgresBatch(conn, lease_s=self._lease_s)
            try:
                yield batch
            except BaseException:
                batch._closed = True
                await self._rollback(tx)
                raise
            batch._closed = True
            if batch.failure is not None:
                await self._rollback(tx)
                raise batch.failure
            with _connection_errors(conn):
                await tx.commit()
        finally:
            await self._release(conn)

    async def _rollback(self, tx: asyncpg.transaction.Transaction) -> None:
        with anyio.move_on_after(self._cfg.command_timeout_s, shield=True):
            try:
                await tx.rollback()
            except (
                asyncpg.exceptions.PostgresError,
                asyncpg.exceptions.InterfaceError,
                *_RETRYABLE,
            ) as exc:
                # The connection is gone, and the transaction with it; the
                # error that got us here is the one worth raising.
                _log.warning("rollback_failed", error=repr(exc))

    async def claim_outbox(self, *, limit: int, lease_s: float) -> list[OutboxRow]:
        """Lease up to *limit* unsent rows with no live lease, oldest first.

        ``FOR UPDATE SKIP LOCKED``: concurrent relays never get the same row.
        """
        rows = await self._fetch(_CLAIM_OUTBOX, limit, lease_s)
        return sorted((_outbox_row(r) for r in rows), key=lambda row: row.id)

    async def mark_sent(self, ids: Sequence[int]) -> None:
        """Record that the broker confirmed these rows."""
        if ids:
            await self._execute(_MARK_SENT, list(ids))

    async def reschedule_outbox(self, ids: Sequence[int], *, delay_s: float) -> None:
        """Release the rows' lease and make them eligible again after *delay_s*."""
        if ids:
            await self._execute(_RESCHEDULE, list(ids), delay_s)

    async def park_outbox(self, ids: Sequence[int], *, reason: str) -> None:
        """Stop retrying rows that cannot be routed; they stay for an operator."""
        if ids:
            await self._execute(_PARK, list(ids), reason)

    async def list_dead_letters(self, flt: DeadLetterFilter) -> list[DeadLetterRow]:
        """Dead letters matching *flt*, newest first."""
        rows = await self._fetch(
            _LIST_DEAD_LETTERS, *_dl_args(flt), flt.status, flt.limit
        )
        return [_dead_letter_row(r) for r in rows]

    async def replay_dead_letters(
        self, flt: DeadLetterFilter, *, max_replays: int, dry_run: bool
    ) -> list[int]:
        """Queue matching parked dead letters back to their queue via the outbox.

        Only ``parked`` rows are replayed, whatever ``flt.status`` says; rows
        replayed *max_replays* times already are skipped. Each copy keeps its
        message id and gets the header ``x-q2c-replay: <n>``. Returns the ids
        replayed (or that would be, with *dry_run*), newest first.
        """
        sql = _REPLAYABLE if dry_run else _REPLAY
        rows = await self._fetch(sql, *_dl_args(flt), max_replays, flt.limit)
        ids = [r[0] for r in rows]
        if ids and not dry_run:
            _log.info("dead_letters_replayed", count=len(ids))
        return ids

    async def purge_dead_letters(
        self, flt: DeadLetterFilter, *, dry_run: bool
    ) -> list[int]:
        """Mark matching dead letters purged and drop their bodies; return their ids."""
        sql = _PURGEABLE if dry_run else _PURGE
        rows = await self._fetch(sql, *_dl_args(flt), flt.status, flt.limit)
        ids = [r[0] for r in rows]
        if ids and not dry_run:
            _log.info("dead_letters_purged", count=len(ids))
        return ids

    async def load_saga(self, workflow: str, correlation_id: str) -> SagaRecord | None:
        """One instance's state, for status queries and tests."""
        rows = await self._fetch(_LOAD_SAGA, workflow, correlation_id)
        return _saga(workflow, rows[0]) if rows else None

    async def journal(
        self, correlation_id: str, *, limit: int = 1000
    ) -> list[JournalRow]:
        """The audit trail of one correlation id, oldest first."""
        rows = await self._fetch(_JOURNAL, correlation_id, limit)
        return [
            JournalRow(
                id=r[0],
                at=r[1],
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
        """Drop old partitions, delete old stragglers, then create partitions ahead.

        Inbox and journal partitions whose day is older than the retention
        are dropped whole; rows for such days that sit in a DEFAULT partition,
        and outbox rows sent before the retention, are deleted in chunks of
        `PRUNE_CHUNK`. The journal keeps *journal_retention_days* (default:
        *retention_days*).

        Returns:
            Counts under ``inbox_partitions``, ``journal_partitions`` (dropped)
            and ``inbox``, ``journal``, ``outbox`` (rows deleted).
        """
        journal_days = (
            retention_days if journal_retention_days is None else journal_retention_days
        )
        async with self._connection() as conn, conn.transaction():
            await conn.execute(_SET_LOCK_TIMEOUT)
            dropped = await conn.fetch(_DROP_PARTITIONS, retention_days, journal_days)
        result = {
            "inbox_partitions": int(dropped[0][0]),
            "journal_partitions": int(dropped[0][1]),
            "inbox": await self._delete_chunks(_PRUNE_INBOX_DEFAULT, retention_days),
            "journal": await self._delete_chunks(_PRUNE_JOURNAL_DEFAULT, journal_days),
            "outbox": await self._delete_chunks(_PRUNE_OUTBOX, retention_days),
        }
        await self.ensure_partitions(retention_days=retention_days)
        _log.debug("store_pruned", **result)
        return result

    async def _delete_chunks(self, sql: str, days: int) -> int:
        total = 0
        while True:
            deleted = _rowcount(await self._execute(sql, days, PRUNE_CHUNK))
            total += deleted
            if deleted < PRUNE_CHUNK:
                return total

    async def counts(self) -> dict[str, int]:
        """Row counts for status.

        ``outbox_pending``, ``outbox_parked`` and ``dead_letters`` (parked) are
        exact; ``sagas`` and ``inbox`` are exact up to `EXACT_COUNT_CAP` and
        the planner's estimate above it.
        """
        rows = await self._fetch(_COUNTS)
        r = rows[0]
        return {
            "outbox_pending": r[0],
            "outbox_parked": r[1],
            "dead_letters": r[2],
            "sagas": r[3] if r[3] < EXACT_COUNT_CAP else max(r[3], r[4]),
            "inbox": r[5] if r[5] < EXACT_COUNT_CAP else max(r[5], r[6]),
        }

    async def aclose(self) -> None:
        """Close the pool: wait for connections in use, up to the command timeout."""
        with anyio.move_on_after(self._cfg.command_timeout_s, shield=True) as scope:
            await self._pool.close()
        if scope.cancelled_caught:
            self._pool.terminate()
            _log.warning("pool_terminated", reason="close timed out")
