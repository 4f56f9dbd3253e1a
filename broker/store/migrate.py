"""Schema migrations: numbered SQL files, applied once each, in order.

The scripts live in ``broker/store/migrations/<dialect>/NNNN_name.sql``. Each
runs in its own transaction together with the row that records it in
``schema_migrations``, so a crash leaves either all of a migration or none of
it. Running migrations again applies nothing. Several daemons may start at
once: on PostgreSQL an advisory transaction lock serializes them, and on
SQLite ``BEGIN IMMEDIATE`` plus the ledger's primary key does.

Scripts are never edited once released; a change is a new, higher number.
"""

from __future__ import annotations

import re
import sqlite3
from functools import cache
from importlib import resources
from typing import Any, Final, Literal, Protocol

import anyio
import asyncpg
import msgspec
import structlog

__all__ = [
    "Dialect",
    "Migration",
    "Migratable",
    "MIGRATION_LOCK_ID",
    "load_migrations",
    "apply_postgres",
    "apply_sqlite",
    "migrate",
]

Dialect = Literal["postgres", "sqlite"]

#: Key of the PostgreSQL advisory lock held while a migration is applied.
MIGRATION_LOCK_ID = 7_170_000

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_log = structlog.get_logger(__name__)


class Migration(msgspec.Struct, frozen=True, kw_only=True):
    """One migration script: its file name (the ledger key) and its SQL."""

    name: str
    sql: str


class Migratable(Protocol):
    """A store that can bring its own schema up to date."""

    async def migrate(self) -> list[str]:
        """Apply pending migrations; return the names applied."""
        ...


async def migrate(store: Migratable) -> list[str]:
    """Apply the pending migrations of *store*'s dialect.

    Returns:
        The names of the scripts applied now, in order (empty if none).

    Raises:
        StoreUnavailable: the database is unreachable or asked us to retry.
    """
    return await store.migrate()


async def load_migrations(dialect: Dialect) -> tuple[Migration, ...]:
    """The packaged migration scripts of *dialect*, in order (read off the loop)."""
    return await anyio.to_thread.run_sync(_read_migrations, dialect)


@cache
def _read_migrations(dialect: Dialect) -> tuple[Migration, ...]:
    folder = resources.files("broker.store") / "migrations" / dialect
    found: list[Migration] = []
    numbers: set[str] = set()
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        match = _NAME.match(entry.name)
        if match is None:
            continue
        if match.group(1) in numbers:
            raise RuntimeError(f"two {dialect} migrations numbered {match.group(1)}")
        numbers.add(match.group(1))
        found.append(Migration(name=entry.name, sql=entry.read_text(encoding="utf-8")))
    return tuple(found)


#: How long one PostgreSQL migration may run (the pool's command timeout is
#: for the daemon's own statements, seconds long; a migration's index build on
#: a table of millions of rows is not).
MIGRATION_TIMEOUT_S: Final = 6 * 3600.0

_PG_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        text        PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


async def apply_postgres(conn: asyncpg.pool.PoolConnectionProxy[Any]) -> list[str]:
    """Apply pending PostgreSQL migrations on *conn* (which must be idle).

    Driver errors propagate untranslated; callers wrap this in `store_errors()`.
    """
    migrations = await load_migrations("postgres")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
        await conn.execute(_PG_LEDGER)
        done = {r[0] for r in await conn.fetch("SELECT name FROM schema_migrations")}
    applied: list[str] = []
    for migration in migrations:
        if migration.name in done:
            continue
        async with conn.transaction():
            # Another daemon may have applied it since we looked: check under the lock.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_ID)
            if await conn.fetchval(
                "SELECT true FROM schema_migrations WHERE name = $1", migration.name
            ):
                continue
            # No arguments: the simple query protocol, which allows many
            # statements. Not under the pool's command timeout: an index built
            # on a large table takes what it takes, and one cut short would be
            # retried at every start, never applied.
            await conn.execute(migration.sql, timeout=MIGRATION_TIMEOUT_S)
            await conn.execute(
                "INSERT INTO schema_migrations (name) VALUES ($1)", migration.name
            )
        applied.append(migration.name)
        _log.info("migration_applied", dialect="postgres", migration=migration.name)
    return applied


async def pending_postgres(conn: asyncpg.pool.PoolConnectionProxy[Any]) -> list[str]:
    """The PostgreSQL migrations not yet applied, by reading only (no DDL).

    For a daemon whose role may not change the schema: `apply_postgres` is
    then run by the schema's owner (``brokerd migrate``).
    """
    migrations = await load_migrations("postgres")
    if await conn.fetchval("SELECT to_regclass('schema_migrations') IS NULL"):
        return [m.name for m in migrations]
    done = {r[0] for r in await conn.fetch("SELECT name FROM schema_migrations")}
    return [m.name for m in migrations if m.name not in done]


_SQLITE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name        TEXT PRIMARY KEY,
    applied_at  REAL NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS REAL))
)
"""


def apply_sqlite(
    conn: sqlite3.Connection, migrations: tuple[Migration, ...]
) -> list[str]:
    """Apply pending SQLite *migrations* on *conn* (blocking: call it off the loop).

    *conn* must be in autocommit mode (``isolation_level=None``) with no open
    transaction. Driver errors propagate untranslated.
    """
    conn.execute(_SQLITE_LEDGER)
    done = {r[0] for r in conn.execute("SELECT name FROM schema_migrations")}
    applied: list[str] = []
    for migration in migrations:
        if migration.name in done:
            continue
        # The ledger row goes first: if another process applied this script in
        # the meantime, its primary key stops us before any DDL runs. The name
        # is safe to inline: _NAME allows only [0-9a-z_.].
        script = (
            "BEGIN IMMEDIATE;\n"
            f"INSERT INTO schema_migrations (name) VALUES ('{migration.name}');\n"
            f"{migration.sql}\n;\nCOMMIT;"
        )
        try:
            conn.executescript(script)
        except sqlite3.IntegrityError:
            _rollback_sqlite(conn)
            continue
        except BaseException:
            _rollback_sqlite(conn)
            raise
        applied.append(migration.name)
        _log.info("migration_applied", dialect="sqlite", migration=migration.name)
    return applied


def _rollback_sqlite(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")
