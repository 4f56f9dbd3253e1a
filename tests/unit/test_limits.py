"""TokenBucket and CircuitBreaker, driven by a clock the test moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.limits import BreakerState, CircuitBreaker, TokenBucket


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


def test_a_full_bucket_admits_its_burst_then_says_how_long_to_wait() -> None:
    """Burst 3 at 2/s: three calls at once, the fourth waits half a second."""
    clock = Clock()
    bucket = TokenBucket(2.0, 3, clock=clock)

    assert [bucket.try_take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.try_take() == pytest.approx(0.5)
    assert bucket.try_take() == pytest.approx(0.5)  # asking reserves nothing

    clock.now += 0.5
    assert bucket.try_take() == 0.0
    assert bucket.try_take() == pytest.approx(0.5)


def test_tokens_refill_up_to_the_burst_and_no_further() -> None:
    """A long idle spell refills the bucket to its size, not beyond."""
    clock = Clock()
    bucket = TokenBucket(10.0, 2, clock=clock)
    bucket.try_take()
    bucket.try_take()

    clock.now += 60
    assert bucket.tokens == 2.0
    assert [bucket.try_take() for _ in range(3)][:2] == [0.0, 0.0]
    assert bucket.try_take() > 0


@given(
    rate=st.floats(min_value=0.5, max_value=50),
    burst=st.integers(min_value=1, max_value=20),
    steps=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200),
)
def test_calls_admitted_in_any_run_stay_within_burst_plus_rate(
    rate: float, burst: int, steps: list[float]
) -> None:
    """However time moves, admitted calls never exceed burst + rate x elapsed."""
    clock = Clock()
    bucket = TokenBucket(rate, burst, clock=clock)
    start = clock.now
    admitted = 0
    for step in steps:
        clock.now += step
        while bucket.try_take() == 0.0:
            admitted += 1
        assert admitted <= burst + rate * (clock.now - start) + 1e-6


@pytest.mark.parametrize(("rate", "burst"), [(0.0, 1), (-1.0, 1), (1.0, 0)])
def test_a_bucket_that_admits_nothing_is_refused(rate: float, burst: int) -> None:
    """A rate or burst that is not positive is a configuration error."""
    with pytest.raises(ValueError, match="token bucket"):
        TokenBucket(rate, burst)


def breaker(clock: Clock, *, failures: int = 3) -> CircuitBreaker:
    return CircuitBreaker(failures, 10.0, 35.0, clock=clock, rand=lambda: 0.0)


def test_the_breaker_opens_after_consecutive_failures_only() -> None:
    """Two failures, a success, two failures: still closed; a third in a row opens."""
    clock = Clock()
    b = breaker(clock)

    assert not b.record_failure()
    assert not b.record_failure()
    assert not b.record_success()
    assert not b.record_failure()
    assert not b.record_failure()
    assert b.status()["state"] == "closed"
    assert b.record_failure()

    assert b.state is BreakerState.OPEN
    assert (b.opened, b.reset_s, b.retry_in_s()) == (1, 10.0, 10.0)


def test_an_open_breaker_counts_down_to_its_probe() -> None:
    """retry_in_s falls with the clock; at zero the breaker may go half-open."""
    clock = Clock()
    b = breaker(clock, failures=1)
    b.record_failure()

    clock.now += 4
    assert b.retry_in_s() == pytest.approx(6.0)
    clock.now += 6
    assert b.retry_in_s() == 0.0
    b.half_open()
    assert b.state is BreakerState.HALF_OPEN
    assert b.retry_in_s() == 0.0


def test_a_good_probe_closes_the_breaker_and_resets_the_back_off() -> None:
    """Success while half-open closes it; the next opening waits the base time."""
    clock = Clock()
    b = breaker(clock, failures=1)
    b.record_failure()
    b.half_open()
    b.record_failure()  # a failed probe: 20 s next time
    b.half_open()

    assert b.record_success()
    assert (b.state, b.consecutive_failures) == (BreakerState.CLOSED, 0)
    b.record_failure()
    assert b.reset_s == 10.0


def test_failed_probes_double_the_open_time_up_to_the_cap() -> None:
    """10 s, 20 s, then the 35 s cap; each failed probe re-opens at once."""
    clock = Clock()
    b = breaker(clock, failures=5)
    for _ in range(5):
        b.record_failure()
    resets = [b.reset_s]
    for _ in range(3):
        b.half_open()
        assert b.record_failure()  # one failed probe is enough
        resets.append(b.reset_s)

    assert resets == [10.0, 20.0, 35.0, 35.0]
    assert b.opened == 4


def test_jitter_shortens_the_open_time_by_at_most_a_fifth() -> None:
    """With jitter the open time lies in (0.8, 1] x the back-off step."""
    clock = Clock()
    b = CircuitBreaker(1, 10.0, 60.0, clock=clock, rand=lambda: 0.999)
    b.record_failure()

    assert 8.0 < b.reset_s < 10.0


def test_a_late_success_does_not_close_an_open_breaker() -> None:
    """Only a probe closes it: a call that started before it opened does not."""
    clock = Clock()
    b = breaker(clock, failures=1)
    b.record_failure()

    assert not b.record_success()
    assert b.state is BreakerState.OPEN
    with pytest.raises(RuntimeError, match="closed breaker"):
        CircuitBreaker(1, 1.0, 1.0, clock=clock).half_open()


def test_status_is_plain_data() -> None:
    """The status dict names the state and the countdown."""
    clock = Clock()
    b = breaker(clock, failures=2)
    b.record_failure()
    b.record_failure()
    clock.now += 2.5

    assert b.status() == {
        "state": "open",
        "consecutive_failures": 2,
        "failures_to_open": 2,
        "opened": 1,
        "reset_s": 10.0,
        "retry_in_s": 7.5,
    }
    assert repr(b) == "<CircuitBreaker open 2/2 failures>"
