"""The HTTP session an adapter's client talks through, and reading its answers.

`SessionClient` holds the session (its own, or borrowed); `retry_after_s`
reads a ``Retry-After`` header the way every vendor client needs it;
`read_bounded` reads an answer's body up to a limit.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from datetime import UTC, datetime
from types import SimpleNamespace, TracebackType
from typing import Self

import aiohttp

__all__ = [
    "MAX_RESPONSE_BYTES",
    "SessionClient",
    "answer_class",
    "read_bounded",
    "request_counter",
    "retry_after_s",
]

#: The largest answer a vendor client reads; a larger one is a failed call.
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


async def read_bounded(
    response: aiohttp.ClientResponse, limit: int = MAX_RESPONSE_BYTES
) -> bytes:
    """The body of *response*, refused past *limit* bytes without reading on.

    Raises:
        aiohttp.ClientPayloadError: the body is larger than *limit*.
    """
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(65_536):
        size += len(chunk)
        if size > limit:
            raise aiohttp.ClientPayloadError(f"response larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def answer_class(status: int | None) -> str:
    """An answer's class for counting: ``2xx`` … ``5xx``, ``429``, or ``failed``."""
    if status is None:
        return "failed"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def request_counter(count: Callable[[str], None]) -> aiohttp.TraceConfig:
    """A trace config for a session that calls *count* once per request it makes.

    *count* gets the answer's `answer_class`: ``failed`` when no answer came
    (refused, reset, timed out). Vendors meter requests, not calls: a retry,
    a token fetch and a CSRF handshake each count.
    """

    async def ended(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        count(answer_class(params.response.status))

    async def failed(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestExceptionParams,
    ) -> None:
        count("failed")

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(ended)
    trace.on_request_exception.append(failed)
    return trace


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
