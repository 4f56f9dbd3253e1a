"""Bounded polling for conditions with no event to wait on (a row, a counter)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

__all__ = ["eventually"]

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
) -> T:
    """Call *probe* until it returns something truthy; fail after *timeout_s*.

    Raises:
        TimeoutError: the condition did not hold in time.
    """
    with anyio.fail_after(timeout_s):
        while True:
            value = await probe()
            if value:
                return value
            await anyio.sleep(interval_s)
