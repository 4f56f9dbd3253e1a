"""The PostgreSQL store's operator view of holds: listing and releasing them.

`release` hands one instance's hold on in one transaction: it locks the
hold's row, applies the rule both stores share (`broker.store.rows.releasable`),
calls ``q2c_promote_hold`` (migration 0003), as a purge of the blocker does,
and journals the release. `broker.store.postgres.PostgresStore` runs both
functions on a pooled connection, under its error translation.

Internal: not for use outside broker/store.
"""

from __future__ import annotations

from typing import TypeAlias

import asyncpg
import structlog

from broker.store import HoldRow
from broker.store import postgres_sql as sql
from broker.store.rows import hold_row, releasable, release_detail

__all__ = ["list_holds", "release"]

_log = structlog.get_logger(__name__)

# asyncpg's classes are generic only in the stubs: keep the alias a string.
_Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


async def list_holds(conn: _Conn, workflow: str | None, limit: int) -> list[HoldRow]:
    """Held instances (of *workflow*, or all), longest held first."""
    return [hold_row(r) for r in await conn.fetch(sql.LIST_HOLDS, workflow, limit)]


async def release(conn: _Conn, workflow: str, correlation_id: str) -> str | None:
    """Hand one instance's hold on; return the new blocker, or None if it is free.

    Raises:
        HoldRefused: the instance is not held, or its blocker is parked.
    """
    async with conn.transaction():
        found = await conn.fetchrow(sql.HOLD_BLOCKER, workflow, correlation_id)
        blocker = releasable(workflow, correlation_id, found)
        promoted: str | None = await conn.fetchval(
            sql.PROMOTE_HOLD, workflow, correlation_id
        )
        await conn.execute(
            sql.RELEASE_JOURNAL,
            promoted or blocker,
            correlation_id,
            release_detail(workflow, blocker, promoted),
        )
    _log.info(
        "hold_released_by_operator",
        workflow=workflow,
        correlation_id=correlation_id,
        blocker=promoted,
    )
    return promoted
