"""The production store: PostgreSQL through an asyncpg pool.

A batch of deliveries costs two round trips, never one per row:
`PostgresStore.prepare_batch` reads claimed keys, instance states and holds
in one statement, and `PostgresStore.commit_batch` writes everything with one
call of the ``q2c_commit_batch_v2`` function (migration 0003), the rows
passed as arrays. The SQL texts live in `broker.store.postgres_sql`, and an
operator's listing and release of holds in `broker.store.postgres_holds`.

Driver failures are translated at this boundary by
`broker.store.postgres_errors`: every "try again later" failure becomes
`StoreUnavailable` (`store_errors()`, re-exported here), with the driver's
exception chained as the cause.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final, Literal, final

import asyncpg
import structlog

from broker.config import PostgresConfig, split_url
from broker.errors import ConfigError
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
from broker.store import postgres_holds as holds
from broker.store import postgres_sql as sql
from broker.store import postgres_upkeep as upkeep
from broker.store.postgres_errors import commit_errors, store_errors
from broker.store.postgres_pool import Connections, Pool, PoolConnection
from broker.store.postgres_sql import EXACT_COUNT_CAP, MAINTENANCE_LOCK_TIMEOUT
from broker.store.rows import (
    Row,
    dead_letter_row,
    decode_headers,
    encode_json,
    journal_row,
    normalized,
    outbox_row,
    pause_row,
    saga_record,
    written_outbox,
    xref_entry,
)
from broker.xref import unique_entries

__all__ = [
    "PostgresStore",
    "store_errors",
    "PRUNE_CHUNK",
    "EXACT_COUNT_CAP",
    "MAINTENANCE_LOCK_TIMEOUT",
]

_log = structlog.get_logger(__name__)

#: Rows deleted per statement when pruning tables that are not partitioned.
PRUNE_CHUNK: Final = 5000

# Before any instance's updated_at: where the first page of idle_sagas starts.
_BEGINNING: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _rowcount(status: str) -> int:
    """The row count of a command tag such as ``DELETE 42``."""
    return int(status.rsplit(" ", 1)[-1])


def _arrays(
    records: Sequence[object], fields: Sequence[str], *, untrusted: bool = False
) -> list[list[object]] | list[None]:
    """One array per field of *records*, for ``unnest`` to turn into rows.

    Headers become JSON text, which the SQL casts to ``jsonb``. No records
    give NULLs instead of empty arrays: the SQL reads both as no rows
    (``unnest`` of NULL is empty, ``cardinality`` of NULL is not > 0), and a
    NULL costs the driver nothing to encode where an empty array costs its
    array encoder (most of a typical batch's 49 arrays are empty).

    PostgreSQL's text and jsonb cannot hold NUL, and one would fail the whole
    write, on every redelivery. Headers are copied from what arrived, and
    *untrusted* records (dead letters, journal entries, xref) carry what a
    producer or a vendor sent, unchecked: their NULs become U+FFFD. The other
    records' text comes from envelopes the codec checked.
    """
    if not records:
        return [None] * len(fields)
    return [
        [
            _no_nul_json(encode_json(getattr(r, f)))
            if f == "headers"
            else _no_nul(getattr(r, f))
            if untrusted
            else getattr(r, f)
            for r in records
        ]
        for f in fields
    ]


def _no_nul(value: object) -> object:
    if isinstance(value, str) and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def _no_nul_json(text: str) -> str:
    return text.replace("\\u0000", "\\ufffd") if "\\u0000" in text else text


def _dl_args(flt: DeadLetterFilter) -> tuple[object, ...]:
    return (list(flt.ids), flt.reason, flt.queue, flt.type, flt.correlation_id)


@final
class PostgresStore:
    """The durable store on PostgreSQL; implements `broker.store.Store`.

    Build it with `PostgresStore.open`. Every method acquires a pooled
    connection with the configured acquire timeout, and every statement runs
    under the pool's ``command_timeout``: an unreachable or silent database
    surfaces as `StoreUnavailable`, never as a hang.
    """

    def __init__(
        self, pool: Pool, cfg: PostgresConfig, *, lease_s: float = 30.0
    ) -> None:
        self._connections = Connections(pool, cfg)
        self._connection = self._connections.connection
        self._cfg = cfg
        self._lease_s = lease_s

    def __repr__(self) -> str:
        c = self._connections
        return (
            f"<PostgresStore {self._cfg.application_name} "
            f"{c.in_use}/{c.max_size} connections>"
        )

    @classmethod
    async def open(
        cls,
        cfg: PostgresConfig,
        *,
        lease_s: float = 30.0,
        schema: Literal["migrate", "verify", "as-is"] = "migrate",
        retention_days: int = 7,
    ) -> PostgresStore:
        """Connect the pool; make sure the schema is current; create partitions.

        Args:
            cfg: the ``[postgres]`` section. The DSN's database must exist.
            lease_s: how long outbox rows written by `commit_batch` stay
                leased to their writer before the relay may publish them.
            schema: ``"migrate"`` applies pending migrations; ``"verify"``
                only checks that none is pending (a role without DDL rights,
                ``[postgres] migrate = false``); either is followed by
                `ensure_partitions`. ``"as-is"`` does none of it (tools, tests).
            retention_days: how many past days of inbox partitions to create.

        Raises:
            StoreUnavailable: the server is unreachable or refused for now.
            ConfigError: the database does not exist, the login was refused,
                a migration is pending under ``"verify"``, or the role lacks a
                grant.
        """
        _check_dsn(cfg.dsn)
        try:
            with store_errors():
                pool = await asyncpg.create_pool(
                    cfg.dsn,
                    min_size=cfg.pool_min_size,
                    max_size=cfg.pool_max_size,
                    command_timeout=cfg.command_timeout_s,
                    timeout=cfg.acquire_timeout_s,
                    server_settings={"application_name": cfg.application_name},
                    connection_class=PoolConnection,
                )
        except (
            asyncpg.exceptions.InvalidCatalogNameError,
            asyncpg.exceptions.InvalidAuthorizationSpecificationError,
        ) as exc:
            raise ConfigError(f"postgres refused the connection: {exc}") from exc
        store = cls(pool, cfg, lease_s=lease_s)
        try:
            if schema == "migrate":
                await store.migrate()
            elif schema == "verify":
                await store.check_migrated()
            if schema != "as-is":
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

    async def _fetch(self, text: str, *args: object) -> list[asyncpg.Record]:
        async with self._connection() as conn:
            return await conn.fetch(text, *args)

    async def _execute(self, text: str, *args: object) -> str:
        async with self._connection() as conn:
            return await conn.execute(text, *args)

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied.

        Raises:
            StoreUnavailable: the database is unreachable or asked us to retry.
            ConfigError: the role may not change the schema.
        """
        async with self._connection() as conn:
            return await upkeep.migrate(conn)

    async def check_migrated(self) -> None:
        """Refuse to run on a schema with a migration pending (no DDL here).

        Raises:
            StoreUnavailable: the database is unreachable or asked us to retry.
            ConfigError: a migration is pending.
        """
        async with self._connection() as conn:
            await upkeep.check_migrated(conn)

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
            ConfigError: the role may not run the partition function.
        """
        async with self._connection() as conn:
            return await upkeep.ensure_partitions(conn, retention_days, ahead_days)

    async def prepare_batch(
        self,
        consumer: str,
        keys: Sequence[InboxKey],
        workflow: str,
        correlation_ids: Sequence[str],
    ) -> BatchRead:
        """Claimed keys, stored instances and holds, in one statement, without locks."""
        rows = await self._fetch(
            sql.PREPARE_BATCH,
            consumer,
            [k.key for k in keys],
            workflow,
            list(correlation_ids),
            [k.day for k in keys],
        )
        return BatchRead(
            claimed=frozenset(r[0] for r in rows if r[4] == 0),
            sagas={r[0]: saga_record(workflow, r) for r in rows if r[4] == 1},
            holds={r[0]: r[5] for r in rows if r[4] == 2},
        )

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Write the whole batch with one call of ``q2c_commit_batch_v2``.

        Returns the rows leased to this writer (not the delayed ones).

        Raises:
            ConcurrencyConflict: a key was claimed, an instance or a hold
                changed, or a held message was released since `prepare_batch`;
                nothing was written.
            XrefConflict: a native id is bound to another canonical id.
            StoreUnavailable: the database is unreachable or asked us to retry.
            ValueError: one instance appears twice in ``write.sagas`` or
                ``write.holds``.
        """
        write = normalized(write)
        args = (
            write.consumer,
            *_arrays(write.keys, sql.COMMIT_KEY_FIELDS),
            write.workflow,
            *_arrays(write.sagas, sql.COMMIT_SAGA_FIELDS),
            *_arrays(write.outbox, sql.COMMIT_OUTBOX_FIELDS),
            self._lease_s,
            *_arrays(write.dead_letters, sql.COMMIT_DEAD_LETTER_FIELDS, untrusted=True),
            *_arrays(write.journal, sql.COMMIT_JOURNAL_FIELDS, untrusted=True),
            *_arrays(write.held, sql.COMMIT_HELD_FIELDS, untrusted=True),
            *_arrays(write.holds, sql.COMMIT_HOLD_FIELDS),
            list(write.released) or None,
            *_arrays(write.xref, sql.COMMIT_XREF_FIELDS, untrusted=True),
        )
        with commit_errors():
            rows = await self._fetch(sql.COMMIT_BATCH, *args)
        return written_outbox(sorted(r[0] for r in rows), write.outbox)

    async def held_messages(
        self, workflow: str, correlation_ids: Sequence[str], *, limit_each: int
    ) -> list[DeadLetterRow]:
        """The held messages of the given instances: by instance, in arrival order."""
        if not correlation_ids:
            return []
        rows = await self._fetch(
            sql.HELD_MESSAGES, workflow, list(correlation_ids), limit_each
        )
        return [dead_letter_row(r) for r in rows]

    async def sweep_holds(self, *, limit: int = 1000) -> int:
        """Hand on holds whose blocker was purged, and held messages without a hold."""
        moved: int = (await self._fetch(sql.SWEEP_HOLDS, limit))[0][0]
        if moved:
            _log.warning("holds_swept", instances=moved)
        return moved

    async def list_holds(
        self, workflow: str | None = None, *, limit: int = 1000
    ) -> list[HoldRow]:
        """Held instances (of *workflow*, or all), longest held first."""
        async with self._connection() as conn:
            return await holds.list_holds(conn, workflow, limit)

    async def release_hold(self, workflow: str, correlation_id: str) -> str | None:
        """Hand an instance's hold on as a purge of its blocker would (`Store`)."""
        async with self._connection() as conn:
            return await holds.release(conn, workflow, correlation_id)

    async def claim_outbox(self, *, limit: int, lease_s: float) -> list[OutboxRow]:
        """Lease up to *limit* unsent rows with no live lease, oldest first.

        ``FOR UPDATE SKIP LOCKED``: concurrent relays never get the same row.
        """
        rows = await self._fetch(sql.CLAIM_OUTBOX, limit, lease_s)
        return sorted((outbox_row(r) for r in rows), key=lambda row: row.id)

    async def delete_sent(self, ids: Sequence[int]) -> None:
        """Delete rows the broker confirmed."""
        if ids:
            await self._execute(sql.DELETE_SENT, list(ids))

    async def reschedule_outbox(self, ids: Sequence[int], *, delay_s: float) -> None:
        """Release the rows' lease and make them eligible again after *delay_s*."""
        if ids:
            await self._execute(sql.RESCHEDULE, list(ids), delay_s)

    async def park_outbox(self, ids: Sequence[int], *, reason: str) -> None:
        """Stop retrying rows that cannot be routed; they stay for an operator."""
        if ids:
            await self._execute(sql.PARK, list(ids), reason)

    async def list_parked_outbox(self, *, limit: int) -> list[ParkedOutboxRow]:
        """Parked rows, newest first, without bodies (read from outbox_parked)."""
        return [_parked_row(r) for r in await self._fetch(sql.LIST_PARKED, limit)]

    async def parked_outbox(self, id: int, /) -> ParkedOutboxRow | None:
        """Parked row *id* with its body (None: no such parked row)."""
        rows = await self._fetch(sql.SHOW_PARKED, id)
        return _parked_row(rows[0], with_body=True) if rows else None

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
        async def page(after: int, limit: int) -> list[int]:
            return [r[0] for r in await self._fetch(sql.PARKED_PAGE, after, limit)]

        async def act(chunk_ids: list[int]) -> list[int]:
            if dry_run and ids is None:
                return chunk_ids  # just paged: parked
            statement = sql.PARKED_AMONG if dry_run else text
            return [r[0] for r in await self._fetch(statement, chunk_ids)]

        return await in_chunks(ids, chunk=chunk, page=page, act=act)

    async def list_dead_letters(self, flt: DeadLetterFilter) -> list[DeadLetterRow]:
        """Dead letters matching *flt*, newest first."""
        rows = await self._fetch(
            sql.LIST_DEAD_LETTERS, *_dl_args(flt), flt.status, flt.limit
        )
        return [dead_letter_row(r) for r in rows]

    async def replay_dead_letters(
        self, flt: DeadLetterFilter, *, max_replays: int, dry_run: bool
    ) -> list[int]:
        """Queue matching parked dead letters back to their queue via the outbox.

        Only ``parked`` rows are replayed, whatever ``flt.status`` says; rows
        replayed *max_replays* times already are skipped. Each copy keeps its
        message id and gets the header ``x-q2c-replay: <n>``. Returns the ids
        replayed (or that would be, with *dry_run*), newest first.
        """
        text = sql.REPLAYABLE if dry_run else sql.REPLAY
        rows = await self._fetch(text, *_dl_args(flt), max_replays, flt.limit)
        ids = [r[0] for r in rows]
        if ids and not dry_run:
            _log.info("dead_letters_replayed", count=len(ids))
        return ids

    async def purge_dead_letters(
        self, flt: DeadLetterFilter, *, dry_run: bool
    ) -> list[int]:
        """Mark matching dead letters purged and drop their bodies; return their ids.

        Holds whose blocker is purged are handed on in the same transaction.
        """
        args = (*_dl_args(flt), flt.status, flt.limit)
        if dry_run:
            return [r[0] for r in await self._fetch(sql.PURGEABLE, *args)]
        async with self._connection() as conn, conn.transaction():
            rows = await conn.fetch(sql.PURGE, *args)
            if rows:
                await conn.execute(sql.PROMOTE_PURGED, [r[1] for r in rows])
        ids = sorted((r[0] for r in rows), reverse=True)
        if ids:
            _log.info("dead_letters_purged", count=len(ids))
        return ids

    async def xref_put(self, entries: Sequence[XrefEntry]) -> None:
        """Upsert cross-reference entries, all or none.

        Raises:
            XrefConflict: a native id is bound to another canonical id.
            ConcurrencyConflict: another writer bound the same native id
                meanwhile (try again).
            StoreUnavailable: the database is unreachable or asked us to retry.
        """
        unique = unique_entries(entries)
        if unique:
            with commit_errors():
                await self._fetch(
                    sql.XREF_PUT, *_arrays(unique, sql.COMMIT_XREF_FIELDS)
                )

    async def xref_get(self, kind: str, canonical_id: str) -> dict[str, XrefEntry]:
        """System → entry, for every system that knows this canonical object."""
        rows = await self._fetch(sql.XREF_GET, kind, canonical_id)
        return {r[2]: xref_entry(r) for r in rows}

    async def xref_find(
        self, kind: str, system: str, native_id: str
    ) -> XrefEntry | None:
        """The entry binding this native id, if any."""
        rows = await self._fetch(sql.XREF_FIND, kind, system, native_id)
        return xref_entry(rows[0]) if rows else None

    async def xref_many(
        self, kind: str, canonical_ids: Sequence[str]
    ) -> dict[str, dict[str, XrefEntry]]:
        """Canonical id → system → entry, for those of *canonical_ids* that have any."""
        found: dict[str, dict[str, XrefEntry]] = {}
        if canonical_ids:
            for r in await self._fetch(sql.XREF_MANY, kind, list(canonical_ids)):
                found.setdefault(r[1], {})[r[2]] = xref_entry(r)
        return found

    async def pause_system(
        self, system: str, *, reason: str, paused_by: str
    ) -> SystemPause:
        """Pause *system* for every daemon on this store (`Store`)."""
        rows = await self._fetch(pauses.PG_PAUSE, system, reason, paused_by)
        return pause_row(rows[0])

    async def resume_system(self, system: str) -> SystemPause | None:
        """End *system*'s pause; return it (None: it was not paused)."""
        rows = await self._fetch(pauses.PG_RESUME, system)
        return pause_row(rows[0]) if rows else None

    async def system_pauses(self) -> dict[str, SystemPause]:
        """System → its pause, for every paused system."""
        rows = await self._fetch(pauses.PG_PAUSES)
        return {r[0]: pause_row(r) for r in rows}

    async def take_tokens(
        self, system: str, want: int, *, rate_per_s: float, burst: float
    ) -> tuple[int, float]:
        """Up to *want* of *system*'s shared tokens, on the database's clock."""
        rows = await self._fetch(ratebuckets.PG_TAKE, system, want, rate_per_s, burst)
        return rows[0][0], rows[0][1]

    async def try_lease(self, key: str, owner: str, *, lease_s: float) -> bool:
        """Take lock *key* for *owner*, on the database's clock."""
        return bool(await self._fetch(leases.PG_TAKE, key, owner, lease_s))

    async def end_lease(self, key: str, owner: str) -> None:
        """Give back lock *key* if *owner* holds it."""
        await self._execute(leases.PG_END, key, owner)

    async def load_saga(self, workflow: str, correlation_id: str) -> SagaRecord | None:
        """One instance's state, for status queries and tests."""
        rows = await self._fetch(sql.LOAD_SAGA, workflow, correlation_id)
        return saga_record(workflow, rows[0]) if rows else None

    async def idle_sagas(
        self,
        workflow: str,
        *,
        idle_days: int,
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[SagaRecord]:
        """One page of *workflow*'s instances unchanged for *idle_days* days."""
        at, cid = after if after is not None else (_BEGINNING, "")
        rows = await self._fetch(sql.IDLE_SAGAS, workflow, idle_days, at, cid, limit)
        return [saga_record(workflow, r) for r in rows]

    async def delete_sagas(
        self, workflow: str, instances: Sequence[tuple[str, int]]
    ) -> int:
        """Delete *workflow*'s *instances* unless changed, held or awaited."""
        if not instances:
            return 0
        ids = [cid for cid, _ in instances]
        versions = [version for _, version in instances]
        return _rowcount(await self._execute(sql.DELETE_SAGAS, workflow, ids, versions))

    async def journal(
        self, correlation_id: str, *, limit: int = 1000
    ) -> list[JournalRow]:
        """The audit trail of one correlation id, oldest first."""
        rows = await self._fetch(sql.JOURNAL, correlation_id, limit)
        return [journal_row(r) for r in rows]

    async def prune(
        self, *, retention_days: int, journal_retention_days: int | None = None
    ) -> dict[str, int]:
        """Drop old partitions, delete old stragglers, then create partitions ahead.

        Inbox and journal partitions whose day is older than the retention
        are dropped whole; rows for such days that sit in a DEFAULT partition,
        and outbox rows marked sent before the retention (by releases that
        kept sent rows), are deleted in chunks of
        `PRUNE_CHUNK`. The journal keeps *journal_retention_days* (default:
        *retention_days*).

        Holds nothing can release any more are handed on (`sweep_holds`).
        Then dead letters nothing waits on any more (released, replayed or
        purged, and no hold's blocker) whose ``last_seen`` is older than the
        retention are deleted in chunks too; parked and held ones stay.

        Returns:
            Counts under ``inbox_partitions``, ``journal_partitions`` (dropped),
            ``inbox``, ``journal``, ``outbox``, ``dead_letters`` (rows
            deleted) and ``holds_swept`` (instances handed on).
        """
        journal_days = (
            retention_days if journal_retention_days is None else journal_retention_days
        )
        async with self._connection() as conn:
            inbox_parts, journal_parts = await upkeep.drop_partitions(
                conn, retention_days, journal_days
            )
        result = {
            "inbox_partitions": inbox_parts,
            "journal_partitions": journal_parts,
            "inbox": await self._delete_chunks(sql.PRUNE_INBOX_DEFAULT, retention_days),
            "journal": await self._delete_chunks(
                sql.PRUNE_JOURNAL_DEFAULT, journal_days
            ),
            "outbox": await self._delete_chunks(sql.PRUNE_OUTBOX, retention_days),
            "holds_swept": await self.sweep_holds(),
            "dead_letters": await self._delete_chunks(
                sql.PRUNE_DEAD_LETTERS, retention_days
            ),
        }
        await self.ensure_partitions(retention_days=retention_days)
        _log.debug("store_pruned", **result)
        return result

    async def _delete_chunks(self, text: str, days: int) -> int:
        total = 0
        while True:
            deleted = _rowcount(await self._execute(text, days, PRUNE_CHUNK))
            total += deleted
            if deleted < PRUNE_CHUNK:
                return total

    async def ping(self) -> None:
        """``SELECT 1`` through the pool: a connection can be had and answers."""
        await self._fetch(sql.PING)

    async def counts(self) -> dict[str, int]:
        """Row counts for status.

        ``outbox_pending``, ``outbox_parked``, ``dead_letters`` (parked),
        ``held`` (messages) and ``holds`` (held instances) are exact; ``sagas``
        and ``inbox`` are exact up to `EXACT_COUNT_CAP` and the planner's
        estimate above it.
        """
        rows = await self._fetch(sql.COUNTS)
        r = rows[0]
        return {
            "outbox_pending": r[0],
            "outbox_parked": r[1],
            "dead_letters": r[2],
            "held": r[3],
            "holds": r[4],
            "sagas": r[5] if r[5] < EXACT_COUNT_CAP else max(r[5], r[6]),
            "inbox": r[7] if r[7] < EXACT_COUNT_CAP else max(r[7], r[8]),
        }

    async def aclose(self) -> None:
        """Close the pool: wait for connections in use, up to the command timeout."""
        await self._connections.aclose()


def _parked_row(r: Row, *, with_body: bool = False) -> ParkedOutboxRow:
    """Decode `postgres_sql.LIST_PARKED`'s columns (and SHOW_PARKED's ``body``)."""
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
        created_at=r[9],
        size_bytes=r[10],
        body=r[11] if with_body else None,
    )


def _check_dsn(dsn: str) -> None:
    """Refuse a DSN whose parts cannot be told apart, quoting none of it.

    A password with an unencoded ``/ ? #`` moves the URL's boundaries, and the
    driver's error would then quote a piece of it as a port or a database.

    Raises:
        ConfigError: the DSN does not parse as a PostgreSQL URL.
    """
    split = split_url(dsn)
    if (
        split is None
        or split[0].scheme not in ("postgres", "postgresql")
        or split[1] == 0
    ):
        raise ConfigError(
            "postgres.dsn does not parse as postgresql://user:password@host:port/"
            "database; percent-encode / ? # @ : in the user name and password"
        )
