"""The PostgreSQL schema's upkeep: migrations and daily partitions.

What `broker.store.postgres.PostgresStore` runs at start (`migrate` or, for
a role without DDL rights, `check_migrated`; then `ensure_partitions`) and
hourly (`drop_partitions`, then `ensure_partitions`), each on a connection
the store lends. The partition work goes through two SQL functions that run
with their owner's rights (migration 0007), so a refused privilege here is a
missing grant, said as a `ConfigError` that names it. Internal: not for use
outside broker/store.
"""

from __future__ import annotations

from typing import Final

import structlog

from broker.errors import ConfigError
from broker.store import postgres_sql as sql
from broker.store.migrate import apply_postgres, pending_postgres
from broker.store.postgres_errors import grants_needed
from broker.store.postgres_pool import Conn

__all__ = ["check_migrated", "drop_partitions", "ensure_partitions", "migrate"]

_log = structlog.get_logger(__name__)

# What to do about a refused privilege (README, "PostgreSQL roles").
_MIGRATE_AS_OWNER: Final = (
    "Run `brokerd migrate` as the schema's owner and set [postgres] migrate = false"
)
_GRANT_PARTITIONS: Final = (
    "Grant the daemon's role EXECUTE ON FUNCTION q2c_ensure_partitions(text, date, "
    "date), q2c_drop_partitions(text, date)"
)


async def migrate(conn: Conn) -> list[str]:
    """Apply pending migrations; return the names applied.

    Raises:
        ConfigError: the role may not change the schema.
    """
    with grants_needed("a migration", _MIGRATE_AS_OWNER):
        return await apply_postgres(conn)


async def check_migrated(conn: Conn) -> None:
    """Refuse to run on a schema with a migration pending (a read, no DDL).

    Raises:
        ConfigError: a migration is pending.
    """
    pending = await pending_postgres(conn)
    if pending:
        raise ConfigError(
            f"postgres schema is not migrated ({', '.join(pending)} pending) and "
            "[postgres] migrate is off: run `brokerd migrate` as the schema's owner"
        )


async def ensure_partitions(conn: Conn, retention_days: int, ahead_days: int) -> int:
    """Create missing daily partitions, in a transaction; return how many.

    Raises:
        ConfigError: the role may not run the partition function.
    """
    async with conn.transaction():
        await conn.execute(sql.SET_LOCK_TIMEOUT)
        with grants_needed("partition upkeep", _GRANT_PARTITIONS):
            created: int = await conn.fetchval(
                sql.ENSURE_PARTITIONS, retention_days, ahead_days
            )
    if created:
        _log.info("partitions_created", count=created)
    return created


async def drop_partitions(
    conn: Conn, retention_days: int, journal_days: int
) -> tuple[int, int]:
    """Drop inbox and journal partitions past retention; return how many of each.

    Raises:
        ConfigError: the role may not run the partition function.
    """
    async with conn.transaction():
        await conn.execute(sql.SET_LOCK_TIMEOUT)
        with grants_needed("partition upkeep", _GRANT_PARTITIONS):
            dropped = await conn.fetch(
                sql.DROP_PARTITIONS, retention_days, journal_days
            )
    return int(dropped[0][0]), int(dropped[0][1])
