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
from typing import Final, Protocol, final

import anyio
import anyio.lowlevel
import structlog

from broker.errors import RetryLater, StoreUnavailable
from broker.retry import Backoff
from broker.store import Store

__all__ = ["KeyedLock", "Locks", "SharedKeyedLock"]

_log = structlog.get_logger(__name__)


class Locks(Protocol):
    """What a connector holds a key with."""

    def hold(self, key: str) -> AbstractAsyncContextManager[None]:
        """Hold *key* for the body; wait while another holder has it.

        A shared hold that cannot be kept cancels the body and raises a
        `TransientError` (`RetryLater`): the command is tried again later.
        """
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

    The body runs only while the lease is sure to last. It has a deadline:
    the lease's end as this daemon counts it (from when the last successful
    take or renewal was *sent*, so never later than the store's), less a
    sixth of *lease_s* to unwind in. Each renewal must answer before that
    deadline, and a successful one moves it on. A renewal that fails is
    tried again with back-off until then; one that stalls is given up then.
    So if the store cannot confirm the lease in time, or says another
    daemon has taken it, the body is cancelled before the other daemon can
    be inside, the lease is given back (best effort), and the hold raises
    `RetryLater`: the command comes back through a retry tier.

    Args:
        store: where the locks are (`Store.try_lease`, `Store.end_lease`).
        owner: names this daemon in the tokens (e.g. name and pid).
        lease_s: how long a taken lock stays taken if it is neither renewed
            nor given back.
        wait_s: how long a hold waits for another daemon before it gives up
            with `RetryLater` (the command comes back through a retry tier).
        clock: monotonic seconds; sleep: how to wait (both for the tests of
            the wait for another daemon; the lease's own timing runs on the
            event loop's clock, as its deadlines do).
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
            RetryLater: another daemon held it for *wait_s*; or the lease was
                lost (taken by another daemon, or not renewed in time) and
                the body was cancelled.
            StoreUnavailable: the store could not be asked.
        """
        async with self._local.hold(key):
            token = f"{self._owner}:{secrets.token_hex(8)}"
            taken_at = await self._take(key, token)
            lease = _Lease(key, token, self._body_deadline(taken_at))
            lost = False
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._keep, lease, taken_at)
                    try:
                        # Cancelled by its deadline, or by `_keep`: the
                        # cancellation ends here; the caller's own goes on.
                        with lease.body:
                            yield
                        lost = lease.body.cancel_called or lease.overran()
                    finally:
                        tg.cancel_scope.cancel()
            finally:
                await self._give_back(key, token)
        if lost:
            # Cancelled meanwhile by the caller? Then that, not a retry.
            await anyio.lowlevel.checkpoint_if_cancelled()
            raise lease.lost_error()

    def _body_deadline(self, sent_at: float) -> float:
        """When the body must end if the lease taken or renewed at *sent_at* is not."""
        return sent_at + self._lease_s * (1 - _UNWIND)

    async def _keep(self, lease: _Lease, renewed_at: float) -> None:
        """Renew the lease every third of *lease_s* until the body ends.

        Each success moves the body's deadline on; a failure is tried again
        with back-off. Every call ends by the body's deadline: after that,
        the body is cancelled whatever the store says.
        """
        backoff = Backoff(self._lease_s / 60, self._lease_s / 12)
        body = lease.body
        next_at = renewed_at + self._lease_s / 3
        while True:
            await anyio.sleep_until(min(next_at, body.deadline))
            sent_at = anyio.current_time()
            if sent_at >= body.deadline:
                return
            kept: bool | None = None
            with anyio.CancelScope(deadline=body.deadline):
                try:
                    kept = await self._store.try_lease(
                        lease.key, lease.token, lease_s=self._lease_s
                    )
                except StoreUnavailable as exc:
                    lease.error = exc
                    _log.warning("lease_not_renewed", key=lease.key, error=str(exc))
            if kept is None or anyio.current_time() >= body.deadline:
                # Failed (tried again soon) or too late (the deadline ends the body).
                next_at = anyio.current_time() + backoff.next_delay()
                continue
            if not kept:
                lease.taken = True
                body.cancel()
                return
            body.deadline = self._body_deadline(sent_at)
            lease.error = None
            backoff.reset()
            next_at = sent_at + self._lease_s / 3

    async def _give_back(self, key: str, token: str) -> None:
        """End the lease, shielded and bounded: unended, it runs out by itself."""
        hint = f"it is free again within {self._lease_s:g} s"
        with anyio.move_on_after(min(_GIVE_BACK_S, self._lease_s), shield=True) as cut:
            try:
                await self._store.end_lease(key, token)
            except StoreUnavailable as exc:
                _log.warning("lease_not_given_back", key=key, error=str(exc), hint=hint)
        if cut.cancelled_caught:
            _log.warning("lease_not_given_back", key=key, error="timed out", hint=hint)

    async def _take(self, key: str, token: str) -> float:
        """Take the store's lock for *token*; return when the taking call was sent."""
        deadline = self._clock() + self._wait_s
        backoff = Backoff(0.05, 1.0)
        while True:
            sent_at = anyio.current_time()
            if await self._store.try_lease(key, token, lease_s=self._lease_s):
                return sent_at
            delay = backoff.next_delay()
            if self._clock() + delay > deadline:
                raise RetryLater(
                    f"lock {key!r} is held by another daemon", delay_s=self._wait_s
                )
            await self._sleep(delay)


#: The share of the lease kept back for a cancelled body to unwind in.
_UNWIND: Final = 1 / 6
#: The longest a hold waits to give its lease back.
_GIVE_BACK_S: Final = 5.0


@final
class _Lease:
    """One hold's lease in the store, and the scope of the body it covers."""

    def __init__(self, key: str, token: str, deadline: float) -> None:
        self.key = key
        self.token = token
        self.body = anyio.CancelScope(deadline=deadline)
        #: The store said another daemon holds the key now.
        self.taken = False
        #: The last renewal's failure.
        self.error: StoreUnavailable | None = None

    def overran(self) -> bool:
        """Whether the body outlived its deadline (it had no checkpoint since)."""
        return anyio.current_time() >= self.body.deadline

    def lost_error(self) -> RetryLater:
        """What the hold raises, logged: why the lease was lost."""
        if self.taken:
            why = "another daemon took it"
        elif self.error is not None:
            why = f"the store did not renew it: {self.error}"
        else:
            why = "the store did not renew it in time"
        _log.warning(
            "lease_lost", key=self.key, reason=why, hint="the body was cancelled"
        )
        exc = RetryLater(f"lock {self.key!r} was lost: {why}")
        exc.__cause__ = self.error
        return exc
