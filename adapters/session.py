"""The HTTP session an adapter's client talks through: its own, or borrowed."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import aiohttp

__all__ = ["SessionClient"]


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
