from __future__ import annotations

import pytest

from broker import letters
from broker.retry import Backoff, RetryPolicy
from broker.transport import Delivery


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


def _comes_back(d: Delivery, *, wait: bool) -> Delivery:
    """*d* as its retry copy comes back from the tier (a wait, or a failure)."""
    copy = letters.retry(
        "q2c.sys.erp",
        d,
        message_id="m1",
        attempt=letters_attempt(d),
        tier=5.0,
        error="boom",
        unavailable_since=1_700_000_000 if wait else None,
    )
    return Delivery(tag=d.tag + 1, body=copy.body, headers=dict(copy.headers))


def letters_attempt(d: Delivery) -> int:
    raw = (d.headers or {}).get(letters.ATTEMPT_HEADER, 1)
    return raw if isinstance(raw, int) else 1


def test_waits_keep_the_attempt_and_count_their_run() -> None:
    """Four waits, then a failure of the message: its second attempt, not its sixth.

    Counted as attempts, a run of waits left the first real failure after
    it no retry at all (attempts exhausted).
    """
    d = Delivery(tag=1, body=b"{}")
    for n in range(1, 5):
        d = _comes_back(d, wait=True)
        assert (letters_attempt(d), letters.waits_of(d)) == (1, n)
    d = _comes_back(d, wait=False)
    assert (letters_attempt(d), letters.waits_of(d)) == (2, 0)
    assert letters.UNAVAILABLE_SINCE_HEADER not in (d.headers or {})


def test_a_run_of_waits_goes_up_the_tiers_until_its_time_is_out() -> None:
    """The n-th wait in a run takes tier n (capped); past wait_max_s, none."""
    policy = RetryPolicy((5.0, 60.0, 600.0), max_attempts=3, wait_max_s=3600.0)
    since = 1_700_000_000
    assert [policy.wait_for(n, since, since + 10) for n in (1, 2, 3, 9)] == [
        5.0,
        60.0,
        600.0,
        600.0,
    ]
    assert policy.wait_for(1, since, since + 3601) is None
