"""The relay's feed is bounded in rows, not only in batches."""

from __future__ import annotations

import anyio
import pytest

from broker.outbox import OutboxFeed
from broker.store import OutboxRow

pytestmark = pytest.mark.anyio


def rows(n: int, start: int = 0) -> list[OutboxRow]:
    return [
        OutboxRow(
            id=start + i,
            message_id=f"m{start + i}",
            exchange="q2c.events",
            routing_key="t",
            body=b"{}",
            correlation_id=None,
            type=None,
            headers={},
            attempts=1,
        )
        for i in range(n)
    ]


async def test_a_put_waits_once_the_rows_reach_the_bound_not_the_batches() -> None:
    """Two groups of 600 fill a 1,000-row feed; the third waits for a take.

    Two of 64 batches: bounded in batches alone, it would not wait.
    """
    feed = OutboxFeed(max_batches=64, max_rows=1000)
    await feed.put(rows(600))
    await feed.put(rows(600, 600))  # admitted below the bound: may pass it
    assert (feed.fill, feed.rows) == (2, 1200)
    assert not feed.offer(rows(1, 2000))
    put_done = anyio.Event()

    async def third() -> None:
        await feed.put(rows(10, 3000))
        put_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(third)
        await anyio.wait_all_tasks_blocked()
        assert not put_done.is_set()
        assert len(await feed.take()) == 600  # 600 rows left: below the bound
        with anyio.fail_after(5):
            await put_done.wait()
    assert (feed.fill, feed.rows) == (2, 610)
    feed.close()


async def test_a_group_larger_than_the_bound_still_passes_an_empty_feed() -> None:
    feed = OutboxFeed(max_rows=100)
    with anyio.fail_after(5):
        await feed.put(rows(500))
    assert feed.rows == 500
    assert len(feed.take_nowait()) == 500
    assert feed.rows == 0
    assert feed.offer(rows(3))
    feed.close()
