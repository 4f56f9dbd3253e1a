"""The HTTP session an adapter's client talks through, and reading its answers.

`SessionClient` holds the session (its own, or borrowed); `retry_after_s`
reads a ``Retry-After`` header the way every vendor client needs it.
"""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime
from types import TracebackType
from typing import Self

import aiohttp

__all__ = ["SessionClient", "retry_after_s"]


def retry_after_s(value: str | None) -> float | None:
    """A ``Retry-After`` header as seconds from now, or None when absent or unreadable.

    Either delta-seconds or an HTTP date (RFC 9110 §10.2.3); a date with no
    zone (``-0000``) is UTC, and a moment already past is 0.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class SessionClient:
    """Base of the vendor clients: one `aiohttp.ClientSession` for all calls.

    A session passed in is borrowed and left open; without one, the client
    opens its own and closes it in `aclose` (or on leaving ``async with``).
    """

    def __init__(self, session: aiohttp.ClientSession | None) -> None:
        self._own_session = session is None
        self._session = session if session is not None else aiohttp.ClientSession()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session if this client opened it."""
        if self._own_session:
            await self._session.close()
