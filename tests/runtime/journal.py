"""An event journal the runtime tests record into and wait on."""

from __future__ import annotations

import anyio

__all__ = ["Journal"]


class Journal:
    """An append-only list of what happened, which tests can wait on."""

    def __init__(self) -> None:
        self.entries: list[str] = []
        self._changed = anyio.Event()

    def add(self, entry: str) -> None:
        """Record ``entry`` and wake the waiters."""
        self.entries.append(entry)
        self._changed.set()
        self._changed = anyio.Event()

    def count(self, entry: str) -> int:
        """How often ``entry`` was recorded."""
        return self.entries.count(entry)

    def take(self) -> list[str]:
        """Return the entries so far and start a fresh list."""
        taken, self.entries = self.entries, []
        return taken

    async def wait_for(self, entry: str, count: int = 1) -> None:
        """Wait (at most 5 s) until ``entry`` was recorded ``count`` times."""
        with anyio.fail_after(5):
            while self.entries.count(entry) < count:
                await self._changed.wait()
