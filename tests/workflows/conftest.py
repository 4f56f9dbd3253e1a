"""Fixtures shared by the workflow tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from broker.store.sqlite import SqliteStore


@pytest.fixture
async def store() -> AsyncIterator[SqliteStore]:
    """A private in-memory store."""
    opened = await SqliteStore.open(":memory:")
    try:
        yield opened
    finally:
        await opened.aclose()
