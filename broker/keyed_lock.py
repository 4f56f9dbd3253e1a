"""`KeyedLock`: one holder at a time per key, for as many keys as are in use.

A connector that reads, then writes what it did not find (SAP has no unique
key to make the second create of a business partner fail) runs that step
under ``async with locks.hold(key)``, so two commands about one account in
the same daemon take turns. Memory is bounded by the holders and waiters of
the moment: a key's lock goes when its last user leaves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import final

import anyio

__all__ = ["KeyedLock"]


@final
class KeyedLock:
    """Mutual exclusion per key; waiters are served in arrival order."""

    def __init__(self) -> None:
        # key -> (the lock, how many hold it or wait for it)
        self._locks: dict[str, tuple[anyio.Lock, int]] = {}

    def __repr__(self) -> str:
        return f"<KeyedLock {len(self._locks)} keys in use>"

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold *key* for the body; wait while another task holds it."""
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = anyio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)
