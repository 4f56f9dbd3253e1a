"""KeyedLock: turns per key, none across keys, nothing kept once unused."""

from __future__ import annotations

import anyio
import anyio.abc
import anyio.lowlevel
import pytest

from broker.keyed_lock import KeyedLock

pytestmark = pytest.mark.anyio


async def test_one_holder_per_key_and_none_kept_afterwards() -> None:
    locks = KeyedLock()
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    both_keys_at_once = anyio.Event()

    async def work(key: str) -> None:
        async with locks.hold(key):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            if inside["a"] and inside["b"]:
                both_keys_at_once.set()
            for _ in range(3):  # let the other tasks run while it is held
                await anyio.lowlevel.checkpoint()
            inside[key] -= 1

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for key in "aabba":
                tg.start_soon(work, key)
    assert most == {"a": 1, "b": 1}
    assert both_keys_at_once.is_set()
    assert len(locks) == 0


async def test_a_cancelled_waiter_leaves_no_lock_behind() -> None:
    locks = KeyedLock()
    release = anyio.Event()

    async def holder(task_status: anyio.abc.TaskStatus[None]) -> None:
        async with locks.hold("k"):
            task_status.started()
            await release.wait()

    async with anyio.create_task_group() as tg:
        await tg.start(holder)
        with anyio.move_on_after(0.05):
            async with locks.hold("k"):
                pytest.fail("the key was held")
        release.set()
    assert len(locks) == 0
