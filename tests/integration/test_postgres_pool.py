"""The store's connections (`broker.store.postgres_pool`) on a real PostgreSQL.

What the store does with them is pinned in ``test_postgres_store.py``; here,
the one rule that needs a clock: a connection kept idle too long goes back.
"""

from __future__ import annotations

import anyio
import asyncpg
import pytest

from broker.config import PostgresConfig
from broker.store.postgres_pool import Connections, PoolConnection

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_connection_kept_idle_too_long_goes_back_to_the_pool(
    pg_dsn: str,
) -> None:
    now = 0.0
    pool = await asyncpg.create_pool(
        pg_dsn, min_size=0, max_size=4, connection_class=PoolConnection
    )
    conns = Connections(
        pool, PostgresConfig(dsn=pg_dsn), idle_return_s=60.0, clock=lambda: now
    )
    try:
        inside = 0
        all_in = anyio.Event()

        async def call() -> None:
            nonlocal inside
            async with conns.connection() as conn:
                await conn.fetchval("SELECT 1")
                inside += 1
                if inside == 3:
                    all_in.set()
                await all_in.wait()  # three connections out at once

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(call)
        assert (conns.kept, pool.get_idle_size()) == (3, 0)

        async def one_call() -> None:
            async with conns.connection() as conn:
                await conn.fetchval("SELECT 1")

        now = 30.0  # the burst's leftovers are not stale yet
        await one_call()
        assert (conns.kept, pool.get_idle_size()) == (3, 0)

        now = 100.0  # the two left over since 0.0 are: one per call goes back
        await one_call()
        assert (conns.kept, pool.get_idle_size()) == (2, 1)
        await one_call()
        assert (conns.kept, pool.get_idle_size()) == (1, 2)
        await one_call()  # the one in use all along stays
        assert (conns.kept, pool.get_idle_size()) == (1, 2)
        assert conns.in_use == 0
    finally:
        await conns.aclose()
