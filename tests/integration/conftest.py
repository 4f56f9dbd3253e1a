"""Fixtures of the PostgreSQL store tests: stores on the test's database, sessions.

`tests.integration.pg` holds the helpers they are built from, for tests that
import them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from broker.config import PostgresConfig
from broker.store.postgres import PostgresStore
from tests.integration.pg import Admin, OpenStore, session


@pytest.fixture
async def open_store(pg_dsn: str) -> AsyncIterator[OpenStore]:
    """Open PostgresStores (one per daemon) on the test's database; close them after."""
    opened: list[PostgresStore] = []

    async def open_(
        *, lease_s: float = 30.0, migrate: bool = True, **cfg: Any
    ) -> PostgresStore:
        settings: dict[str, Any] = {"pool_min_size": 1, "pool_max_size": 4, **cfg}
        store = await PostgresStore.open(
            PostgresConfig(dsn=pg_dsn, **settings),
            lease_s=lease_s,
            schema="migrate" if migrate else "as-is",
        )
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.aclose()


@pytest.fixture
async def admin(pg_dsn: str) -> AsyncIterator[Admin]:
    """A plain connection for inspecting (and disturbing) the test's database."""
    async with session(pg_dsn) as conn:
        yield conn


@pytest.fixture
async def other(pg_dsn: str) -> AsyncIterator[Admin]:
    """Another daemon's session: holds locks in a transaction of its own."""
    async with session(pg_dsn) as conn:
        yield conn
