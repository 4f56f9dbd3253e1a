"""Helpers of the PostgreSQL store tests: a plain session on the test's database."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeAlias

import asyncpg

from broker.store.postgres import PostgresStore

__all__ = ["Admin", "OpenStore", "session"]

Admin: TypeAlias = "asyncpg.Connection[Any]"  # generic only in the stubs
OpenStore = Callable[..., Awaitable[PostgresStore]]


@asynccontextmanager
async def session(dsn: str) -> AsyncIterator[Admin]:
    """A plain asyncpg connection to *dsn*, closed after the block."""
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()
