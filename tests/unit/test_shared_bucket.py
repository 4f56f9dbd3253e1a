"""SharedTokenBucket: tokens from the store a handful at a time, spent locally."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from broker.errors import StoreUnavailable
from broker.shared_bucket import SharedTokenBucket

pytestmark = pytest.mark.anyio


class FakeStore:
    """Answers take_tokens from a script; records what was asked and slept."""

    def __init__(self, *answers: tuple[int, float] | Exception) -> None:
        self.answers = list(answers)
        self.asked: list[int] = []
        self.slept: list[float] = []
        self.now = 0.0

    async def take(self, want: int) -> tuple[int, float]:
        """The next scripted answer."""
        self.asked.append(want)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def sleep(self, seconds: float) -> None:
        """Move the fake clock on at once."""
        self.slept.append(seconds)
        self.now += seconds

    def bucket(self, rate_per_s: float, burst: float) -> SharedTokenBucket:
        """A bucket taking from this store, on its clock."""
        return SharedTokenBucket(
            self.take,
            rate_per_s=rate_per_s,
            burst=burst,
            clock=lambda: self.now,
            sleep=self.sleep,
            hold_s=1.0,
            retry_s=0.5,
        )


@pytest.mark.parametrize(
    ("rate", "burst", "handful"),
    [(1000, 100, 100), (1000, 20, 20), (10, 10, 1), (50, 3, 3), (0.5, 1, 1)],
)
async def test_a_handful_is_a_tenth_of_a_second_within_the_burst(
    rate: float, burst: float, handful: int
) -> None:
    store = FakeStore((1, 0.0))
    await store.bucket(rate, burst).take()
    assert store.asked == [handful]


async def test_tokens_in_hand_are_spent_without_asking_the_store() -> None:
    store = FakeStore((3, 0.0), (3, 0.0))
    bucket = store.bucket(30, 10)
    for _ in range(4):
        await bucket.take()
    assert store.asked == [3, 3]
    assert bucket.tokens == 2


async def test_tokens_held_too_long_lapse() -> None:
    store = FakeStore((3, 0.0), (3, 0.0))
    bucket = store.bucket(30, 10)
    await bucket.take()
    store.now += 1.5  # past hold_s: the two left are not started late
    assert bucket.tokens == 0
    await bucket.take()
    assert store.asked == [3, 3]


async def test_an_empty_bucket_is_waited_for_then_asked_again() -> None:
    store = FakeStore((0, 0.25), (0, 0.0), (1, 0.0))
    await store.bucket(4, 1).take()
    # The store's own estimate, then a floor that keeps it from spinning.
    assert store.slept == [0.25, 0.001]
    assert len(store.asked) == 3


async def test_an_unreachable_store_is_asked_again_after_a_pause() -> None:
    """Retried every retry_s; the outage is logged once, and its end once."""
    down = StoreUnavailable("connection refused")
    store = FakeStore(down, down, down, (1, 0.0))
    with capture_logs() as logs:
        await store.bucket(10, 10).take()
    assert store.slept == [0.5, 0.5, 0.5]
    assert len(store.asked) == 4
    assert [e["event"] for e in logs] == [
        "rate_tokens_unavailable",
        "rate_tokens_available",
    ]
