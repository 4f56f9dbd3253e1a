"""Reading a vendor's Retry-After header, as every client does."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta

import pytest

from adapters.session import retry_after_s


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("", None), ("5", 5.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None)],
)
def test_delta_seconds_and_what_is_not_a_header(
    value: str | None, expected: float | None
) -> None:
    """Seconds are read as they are (never negative); absent or unreadable is None."""
    assert retry_after_s(value) == expected


@pytest.mark.parametrize("usegmt", [True, False])
def test_an_http_date_is_seconds_from_now_with_or_without_a_zone(usegmt: bool) -> None:
    """``GMT`` and the zone-less ``-0000`` form both mean UTC; a past date is 0."""
    later = datetime.now(UTC) + timedelta(seconds=120)
    header = email.utils.format_datetime(later, usegmt=usegmt)
    if not usegmt:
        header = header.replace("+0000", "-0000")  # no zone information
    waited = retry_after_s(header)
    assert waited is not None
    assert 100 < waited <= 120
    past = email.utils.format_datetime(later - timedelta(hours=1), usegmt=True)
    assert retry_after_s(past) == 0.0
