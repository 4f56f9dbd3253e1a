"""Shared rate buckets on both stores: full at first, refilled by time, never shared.

Every test runs against ``SqliteStore(":memory:")`` and against a
`PostgresStore` on a fresh database, like tests/contract/test_store_pauses.py.
"""

from __future__ import annotations

import anyio
import pytest

from broker.store import Store

pytestmark = pytest.mark.anyio

#: One token per thousand seconds: nothing refills while a test runs.
STILL = 0.001


async def test_a_bucket_starts_full_and_grants_what_it_holds(real_store: Store) -> None:
    take = real_store.take_tokens
    assert await take("erp", 3, rate_per_s=STILL, burst=5) == (3, 0.0)
    assert await take("erp", 3, rate_per_s=STILL, burst=5) == (2, 0.0)
    granted, wait_s = await take("erp", 1, rate_per_s=STILL, burst=5)
    # Empty: the next token is a thousand seconds away, less what has refilled.
    assert granted == 0
    assert 990 < wait_s <= 1000
    # Each system has its own bucket.
    assert await take("crm", 5, rate_per_s=STILL, burst=5) == (5, 0.0)


async def test_an_empty_bucket_refills_at_the_rate(real_store: Store) -> None:
    take = real_store.take_tokens
    assert await take("erp", 1, rate_per_s=200, burst=1) == (1, 0.0)
    granted, wait_s = await take("erp", 1, rate_per_s=200, burst=1)
    if not granted:  # unless 5 ms passed already
        assert 0 < wait_s <= 1 / 200
    with anyio.fail_after(5):
        while not granted:
            await anyio.sleep(wait_s)
            granted, wait_s = await take("erp", 1, rate_per_s=200, burst=1)
    # Never more than the burst, however long it was left alone: after ten
    # tokens' time (let pass on purpose), five asked for, one granted.
    await anyio.sleep(10 / 200)
    assert (await take("erp", 5, rate_per_s=200, burst=1))[0] == 1


async def test_takers_at_once_never_share_a_token(real_store: Store) -> None:
    """Ten takers on the store's connections: exactly the burst is granted."""
    granted: list[int] = []

    async def taker() -> None:
        for _ in range(10):
            got, _ = await real_store.take_tokens("erp", 1, rate_per_s=STILL, burst=50)
            granted.append(got)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(taker)
    assert sum(granted) == 50
