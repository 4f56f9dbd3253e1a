"""Named locks shared through the store: `Store.try_lease` and `SharedKeyedLock`.

Each test runs on SQLite and on a fresh PostgreSQL database (``real_store``).
Two `SharedKeyedLock` objects stand for two daemons: each has its own
in-process turn-taking, so only the store's lease can make them take turns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, cast

import anyio
import anyio.lowlevel
import pytest
from structlog.testing import capture_logs

from broker.errors import RetryLater, StoreUnavailable, TransientError
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


class LeaseStore:
    """The store under test, with renewals that can fail or hang, and a record.

    The first `try_lease` of a token takes the lock; later ones renew it.
    While ``failure`` is ``"error"`` renewals raise `StoreUnavailable`; while
    it is ``"stall"`` they never answer (a pool that is busy for longer than
    the lease). `end_lease` always reaches the store.
    """

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.failure: Literal["error", "stall"] | None = None
        self.tokens: list[str] = []
        self.renewals = 0
        self.renewed = anyio.Event()
        self.ended: list[str] = []
        #: Called when the store says the lease is not this holder's any more.
        self.on_lost: Callable[[], None] | None = None

    async def try_lease(self, key: str, owner: str, *, lease_s: float) -> bool:
        """Take or renew as the store does, unless renewals are failing."""
        if owner not in self.tokens:
            self.tokens.append(owner)
            return await self.inner.try_lease(key, owner, lease_s=lease_s)
        if self.failure == "error":
            raise StoreUnavailable("pool timed out")
        if self.failure == "stall":
            await anyio.sleep_forever()
        kept = await self.inner.try_lease(key, owner, lease_s=lease_s)
        if kept:
            self.renewals += 1
            self.renewed.set()
            self.renewed = anyio.Event()
        elif self.on_lost is not None:
            self.on_lost()
        return kept

    async def end_lease(self, key: str, owner: str) -> None:
        """Give back as the store does; recorded once done."""
        await self.inner.end_lease(key, owner)
        self.ended.append(owner)


@pytest.mark.parametrize("failure", ["error", "stall"])
async def test_a_holder_whose_renewals_fail_is_cancelled_before_its_lease_lapses(
    real_store: Store, failure: Literal["error", "stall"]
) -> None:
    """Two business partners for one account, as review found them, cannot happen.

    Daemon a's renewals fail or hang while its body runs. Its body is
    cancelled and its hold raises a transient error (the command goes back
    through a retry tier) before the lease could lapse, and the lease is
    given back: b gets the key only once a is out.
    """
    key = "erp:business-partner:acct-1"
    flaky = LeaseStore(real_store)
    a = SharedKeyedLock(cast(Store, flaky), owner="a", lease_s=0.6)
    b = SharedKeyedLock(real_store, owner="b", lease_s=0.6)
    inside: set[str] = set()
    most = 0
    a_inside, b_done = anyio.Event(), anyio.Event()
    raised: list[RetryLater] = []

    def enter(name: str) -> None:
        nonlocal most
        inside.add(name)
        most = max(most, len(inside))

    async def daemon_a() -> None:
        try:
            async with a.hold(key):
                enter("a")
                try:
                    flaky.failure = failure
                    a_inside.set()
                    await b_done.wait()  # the lookup-then-create, taking its time
                finally:
                    inside.discard("a")
        except RetryLater as exc:
            raised.append(exc)

    async def daemon_b() -> None:
        await a_inside.wait()
        async with b.hold(key):
            enter("b")
            await anyio.lowlevel.checkpoint()
            inside.discard("b")
        b_done.set()

    with capture_logs() as logs, anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon_a)
            tg.start_soon(daemon_b)

    assert most == 1
    [exc] = raised
    assert isinstance(exc, TransientError)
    assert f"lock {key!r} was lost: the store did not renew it" in str(exc)
    assert isinstance(exc.__cause__, StoreUnavailable) == (failure == "error")
    assert flaky.ended == flaky.tokens  # a's lease was given back
    lost = [e for e in logs if e["event"] == "lease_lost"]
    assert [(e["log_level"], e["key"]) for e in lost] == [("warning", key)]


async def test_a_holder_whose_key_another_daemon_took_is_cancelled_at_once(
    real_store: Store,
) -> None:
    """A renewal that finds the key another's ends the body at once."""
    recording = LeaseStore(real_store)
    lock = SharedKeyedLock(cast(Store, recording), owner="a", lease_s=0.6)

    async def hold() -> None:
        async with lock.hold("k"):
            # As if a's lease had lapsed unseen and b had taken the key since.
            await real_store.end_lease("k", recording.tokens[0])
            assert await real_store.try_lease("k", "b", lease_s=30)
            await anyio.sleep_forever()

    with anyio.fail_after(10), pytest.raises(RetryLater, match="another daemon took"):
        await hold()
    assert not await real_store.try_lease("k", "c", lease_s=30)  # b's still


async def test_a_holder_whose_renewals_succeed_keeps_the_key_for_several_leases(
    real_store: Store,
) -> None:
    """Renewed in time, the body runs on: nothing cancels it, nobody gets in."""
    recording = LeaseStore(real_store)
    lock = SharedKeyedLock(cast(Store, recording), owner="slow", lease_s=0.6)
    with anyio.fail_after(10):
        async with lock.hold("k"):
            started = anyio.current_time()
            while anyio.current_time() - started < 4 * 0.6:
                await recording.renewed.wait()
                assert not await real_store.try_lease("k", "other", lease_s=30)
    assert recording.renewals >= 4 * 3 - 2  # every third of a lease, give or take
    assert recording.ended == recording.tokens
    assert await real_store.try_lease("k", "other", lease_s=30)


async def test_a_body_its_caller_cancels_gives_the_lease_back(
    real_store: Store,
) -> None:
    """The caller's cancellation stays the caller's; the key is free at once."""
    lock = SharedKeyedLock(real_store, owner="a")
    with anyio.fail_after(10), anyio.CancelScope() as caller:
        async with lock.hold("k"):
            caller.cancel()
            await anyio.sleep_forever()
    assert caller.cancelled_caught
    assert await real_store.try_lease("k", "b", lease_s=30)


async def test_a_caller_cancelled_as_the_lease_is_lost_sees_its_cancellation(
    real_store: Store,
) -> None:
    """A lost lease does not turn the caller's own cancellation into a retry."""
    recording = LeaseStore(real_store)
    lock = SharedKeyedLock(cast(Store, recording), owner="a", lease_s=0.6)
    with anyio.fail_after(10), anyio.CancelScope() as caller:
        recording.on_lost = caller.cancel
        async with lock.hold("k"):
            await real_store.end_lease("k", recording.tokens[0])
            assert await real_store.try_lease("k", "b", lease_s=30)
            await anyio.sleep_forever()
    assert caller.cancelled_caught
