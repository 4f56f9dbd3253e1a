"""One holder at a time per key: in this daemon, or in every daemon on the store.

A connector that reads, then writes what it did not find (SAP has no unique
key to make the second create of a business partner fail) runs that step
under ``async with locks.hold(key)``, so two commands about one account take
turns. `KeyedLock` serves one daemon; `SharedKeyedLock` adds a lease row in
the store (`Store.try_lease`), so that daemons sharing the store and a
system's queue (DESIGN §9) take turns too. Memory is bounded by the holders
and waiters of the moment: a key's lock goes when its last user leaves.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, final

import anyio
import structlog

from broker.errors import RetryLater, StoreUnavailable
from broker.retry import Backoff
from broker.store import Store

__all__ = ["KeyedLock", "Locks", "SharedKeyedLock"]

_log = structlog.get_logger(__name__)


class Locks(Protocol):
    """What a connector holds a key with."""

    def hold(self, key: str) -> AbstractAsyncContextManager[None]:
        """Hold *key* for the body; wait while another holder has it."""
        ...


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


@final
class SharedKeyedLock:
    """`KeyedLock` across every daemon on *store*: a lease row per held key.

    Within the daemon, holders of a key take turns in a `KeyedLock` first, so
    only one of them asks the store. The store's lock is then taken with a
    token of this hold, asked again with back-off while another daemon has
    it, and renewed every third of *lease_s* while the body runs. A holder
    that dies keeps the key until its lease runs out: within *lease_s*.

    Args:
        store: where the locks are (`Store.try_lease`, `Store.end_lease`).
        owner: names this daemon in the tokens (e.g. name and pid).
        lease_s: how long a taken lock stays taken if it is neither renewed
            nor given back.
        wait_s: how long a hold waits for another daemon before it gives up
            with `RetryLater` (the command comes back through a retry tier).
        clock: monotonic seconds; sleep: how to wait (both for the tests).
    """

    def __init__(
        self,
        store: Store,
        *,
        owner: str,
        lease_s: float = 30.0,
        wait_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._store = store
        self._owner = owner
        self._lease_s = lease_s
        self._wait_s = wait_s
        self._clock = clock
        self._sleep = sleep
        self._local = KeyedLock()

    def __repr__(self) -> str:
        return f"<SharedKeyedLock {self._owner} {len(self._local)} keys in use>"

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold *key* here and in the store for the body.

        Raises:
            RetryLater: another daemon held it for *wait_s*.
            StoreUnavailable: the store could not be asked.
        """
        async with self._local.hold(key):
            token = f"{self._owner}:{secrets.token_hex(8)}"
            await self._take(key, token)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._renew, key, token)
                    try:
                        yield
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._store.end_lease(key, token)
                    except StoreUnavailable as exc:
                        _log.warning(
                            "lease_not_given_back",
                            key=key,
                            error=str(exc),
                            hint=f"it is free again within {self._lease_s:g} s",
                        )

    async def _renew(self, key: str, token: str) -> None:
        """Keep the lease from running out while the body runs."""
        while True:
            await self._sleep(self._lease_s / 3)
            try:
                kept = await self._store.try_lease(key, token, lease_s=self._lease_s)
            except StoreUnavailable as exc:
                _log.warning("lease_not_renewed", key=key, error=str(exc))
                continue
            if not kept:
                _log.warning(
                    "lease_lost",
                    key=key,
                    hint="it ran out before it was renewed: another daemon may hold it",
                )
                return

    async def _take(self, key: str, token: str) -> None:
        deadline = self._clock() + self._wait_s
        backoff = Backoff(0.05, 1.0)
        while not await self._store.try_lease(key, token, lease_s=self._lease_s):
            delay = backoff.next_delay()
            if self._clock() + delay > deadline:
                raise RetryLater(
                    f"lock {key!r} is held by another daemon", delay_s=self._wait_s
                )
            await self._sleep(delay)
