"""RestartWindow: OTP's intensity/period rule, driven by an injected clock."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.supervision import RestartWindow


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


def test_gives_up_once_intensity_is_exceeded_within_the_period() -> None:
    """intensity=2: two quick restarts pass, a third in the same window does not."""
    clock = FakeClock()
    window = RestartWindow(intensity=2, period_s=10, clock=clock)

    assert window.allow_restart()
    assert window.allow_restart()
    assert not window.allow_restart()

    clock.now = 10.5  # both earlier restarts have left the window
    assert window.allow_restart()


def test_a_refused_restart_is_not_recorded() -> None:
    """Refusals do not extend the window: only granted restarts count."""
    clock = FakeClock()
    window = RestartWindow(intensity=1, period_s=10, clock=clock)

    assert window.allow_restart()
    clock.now = 5
    assert not window.allow_restart()
    clock.now = 10.1  # 10.1 s after the only granted restart
    assert window.allow_restart()


def test_a_restart_exactly_period_s_old_still_counts() -> None:
    """The window is closed at its far end: age == period_s is still inside."""
    clock = FakeClock()
    window = RestartWindow(intensity=1, period_s=10, clock=clock)

    assert window.allow_restart()
    clock.now = 10.0
    assert not window.allow_restart()


def test_zero_intensity_never_allows_a_restart() -> None:
    """intensity=0 means the first failure gives up, as in OTP."""
    window = RestartWindow(intensity=0, period_s=10, clock=FakeClock())

    assert not window.allow_restart()


def test_recent_counts_only_restarts_inside_the_window() -> None:
    """`recent` (the supervisor's repr shows it) ages out old restarts."""
    clock = FakeClock()
    window = RestartWindow(intensity=5, period_s=60, clock=clock)
    window.allow_restart()
    clock.now = 30
    window.allow_restart()

    assert window.recent == 2
    clock.now = 61
    assert window.recent == 1
    assert (window.intensity, window.period_s) == (5, 60)


@given(
    intensity=st.integers(min_value=0, max_value=5),
    period_s=st.floats(min_value=0.5, max_value=100),
    gaps=st.lists(st.floats(min_value=0, max_value=50), max_size=40),
)
def test_never_grants_more_than_intensity_within_any_period(
    intensity: int, period_s: float, gaps: list[float]
) -> None:
    """Whatever the timing, no span of period_s holds more than intensity grants."""
    clock = FakeClock()
    window = RestartWindow(intensity, period_s, clock=clock)
    granted: list[float] = []
    for gap in gaps:
        clock.now += gap
        if window.allow_restart():
            granted.append(clock.now)

    for i, start in enumerate(granted):
        inside = [t for t in granted[i:] if t - start <= period_s]
        assert len(inside) <= intensity
