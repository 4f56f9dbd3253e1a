"""Named locks shared through the store: `Store.try_lease` and `SharedKeyedLock`.

Each test runs on SQLite and on a fresh PostgreSQL database (``real_store``).
Two `SharedKeyedLock` objects stand for two daemons: each has its own
in-process turn-taking, so only the store's lease can make them take turns.
"""

from __future__ import annotations

import anyio
import pytest

from broker.errors import RetryLater
from broker.keyed_lock import SharedKeyedLock
from broker.store import Store
from tests.polling import eventually

pytestmark = pytest.mark.anyio


async def test_a_lease_is_one_owners_until_given_back(real_store: Store) -> None:
    assert await real_store.try_lease("k", "daemon-a:1", lease_s=30)
    assert not await real_store.try_lease("k", "daemon-b:1", lease_s=30)
    assert await real_store.try_lease("other", "daemon-b:1", lease_s=30)

    await real_store.end_lease("k", "daemon-b:1")  # not b's: nothing happens
    assert not await real_store.try_lease("k", "daemon-b:2", lease_s=30)
    await real_store.end_lease("k", "daemon-a:1")
    assert await real_store.try_lease("k", "daemon-b:2", lease_s=30)


async def test_a_lapsed_lease_is_taken_over(real_store: Store) -> None:
    """A holder that died frees the key when its lease runs out."""
    assert await real_store.try_lease("k", "dead:1", lease_s=0.05)

    async def taken() -> bool:
        return await real_store.try_lease("k", "alive:1", lease_s=30)

    await eventually(taken, timeout_s=5)
    await real_store.end_lease("k", "dead:1")  # too late: the key is not its own
    assert not await real_store.try_lease("k", "third:1", lease_s=30)


async def test_two_daemons_take_turns_on_a_key(real_store: Store) -> None:
    a = SharedKeyedLock(real_store, owner="a")
    b = SharedKeyedLock(real_store, owner="b")
    inside: list[str] = []
    overlaps = 0

    async def hold(lock: SharedKeyedLock, name: str) -> None:
        nonlocal overlaps
        for _ in range(5):
            async with lock.hold("erp:business-partner:acct-1"):
                overlaps += bool(inside)
                inside.append(name)
                await anyio.sleep(0.01)
                inside.remove(name)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(hold, a, "a")
            tg.start_soon(hold, b, "b")
    assert overlaps == 0
    # Every hold gave its lease back: a third daemon takes the key at once.
    assert await real_store.try_lease("erp:business-partner:acct-1", "c", lease_s=1)


async def test_a_key_held_elsewhere_too_long_is_retry_later(real_store: Store) -> None:
    """The command goes back through a retry tier instead of blocking its slot."""
    assert await real_store.try_lease("k", "elsewhere", lease_s=30)
    now = [0.0]

    async def sleep(delay: float) -> None:
        now[0] += delay

    lock = SharedKeyedLock(
        real_store, owner="here", wait_s=2.0, clock=lambda: now[0], sleep=sleep
    )
    with pytest.raises(RetryLater, match="held by another daemon"):
        async with lock.hold("k"):
            pytest.fail("held a key another daemon holds")
    assert 1.0 <= now[0] <= 2.0


async def test_a_hold_longer_than_the_lease_keeps_the_key(real_store: Store) -> None:
    """The lease is renewed while the body runs: nobody takes the key from it."""
    lock = SharedKeyedLock(real_store, owner="slow", lease_s=1.5)
    async with lock.hold("k"):
        # Past the first lease's end: only renewals keep the key now.
        await anyio.sleep(2.5)
        assert not await real_store.try_lease("k", "other", lease_s=30)
    assert await real_store.try_lease("k", "other", lease_s=30)


async def test_taking_a_lease_again_with_its_token_renews_it(
    real_store: Store,
) -> None:
    assert await real_store.try_lease("k", "holder:1", lease_s=0.05)
    assert await real_store.try_lease("k", "holder:1", lease_s=30)
    await anyio.sleep(0.1)  # the first lease's time: over; the renewed one's: not
    assert not await real_store.try_lease("k", "other:1", lease_s=30)
