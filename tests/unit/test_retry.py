from __future__ import annotations

import pytest

from broker.retry import Backoff, RetryPolicy


def test_tiers_grow_then_attempts_run_out() -> None:
    """Attempt n goes to tier n (capped at the last); after max_attempts, none."""
    policy = RetryPolicy((5.0, 60.0), max_attempts=4)
    assert [policy.tier_for(n) for n in (1, 2, 3, 4)] == [5.0, 60.0, 60.0, None]


def test_backoff_is_exponential_capped_and_jittered() -> None:
    """Delays double up to the cap; jitter only shortens them; reset starts over."""
    b = Backoff(1.0, 8.0, jitter=0.5, rand=lambda: 1.0)
    assert [b.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_policy_needs_a_tier() -> None:
    """An empty tier list is a configuration mistake, refused at once."""
    with pytest.raises(ValueError, match="tier"):
        RetryPolicy((), max_attempts=3)


def test_backoff_keeps_its_cap_after_thousands_of_attempts() -> None:
    """Days of a vendor outage: the delay stays at the cap, no OverflowError."""
    backoff = Backoff(30.0, 300.0, rand=lambda: 0.0)
    delays = [backoff.next_delay() for _ in range(5000)]
    assert delays[-1] == 300.0
    assert max(delays) == 300.0
