"""Small fakes shared by unit tests (never instead of the real services)."""

from __future__ import annotations

from collections.abc import Sequence

from broker.store import BatchWrite, OutboxRow
from broker.transport import OutgoingMessage, PublishOutcome

__all__ = ["ConfirmingTransport", "KeepingStore"]


class ConfirmingTransport:
    """Confirms every message, and keeps it."""

    def __init__(self) -> None:
        self.published: list[OutgoingMessage] = []

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout_s: float
    ) -> list[PublishOutcome]:
        """Every message confirmed."""
        self.published.extend(messages)
        return [PublishOutcome.ACK] * len(messages)


class KeepingStore:
    """Keeps every batch written."""

    def __init__(self) -> None:
        self.writes: list[BatchWrite] = []

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Kept; no row leased."""
        self.writes.append(write)
        return []
