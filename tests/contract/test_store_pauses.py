"""Paused systems on both stores: pausing, reading and resuming.

Every test runs against ``SqliteStore(":memory:")`` and against a
`PostgresStore` on a fresh database, like tests/contract/test_store_holds.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

import pytest

from broker.config import PostgresConfig
from broker.store import Store
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)]
)
def backend(request: pytest.FixtureRequest) -> str:
    """``":memory:"`` for SQLite, or the DSN of a fresh PostgreSQL database."""
    if request.param == "postgres":
        return cast(str, request.getfixturevalue("pg_dsn"))
    return ":memory:"


@pytest.fixture
async def store(backend: str) -> AsyncIterator[Store]:
    """A migrated, empty store."""
    opened: Store
    if backend == ":memory:":
        opened = await SqliteStore.open(":memory:")
    else:
        cfg = PostgresConfig(dsn=backend, pool_min_size=1, pool_max_size=2)
        opened = await PostgresStore.open(cfg)
    yield opened
    await opened.aclose()


async def test_a_pause_is_stored_read_and_cleared(store: Store) -> None:
    """A pause reads back with its reason and author; resuming returns and drops it."""
    assert await store.system_pauses() == {}

    pause = await store.pause_system("erp", reason="ERP upgrade", paused_by="uid 1000")
    await store.pause_system("crm", reason="", paused_by="uid 0")
    found = await store.system_pauses()

    assert sorted(found) == ["crm", "erp"]
    assert found["erp"] == pause
    assert (pause.system, pause.reason, pause.paused_by) == (
        "erp",
        "ERP upgrade",
        "uid 1000",
    )
    assert pause.since.tzinfo is not None
    assert pause.since <= pause.updated_at
    assert found["crm"].reason == ""

    ended = await store.resume_system("erp")
    assert ended == pause
    assert sorted(await store.system_pauses()) == ["crm"]
    assert await store.resume_system("erp") is None


async def test_pausing_again_updates_the_reason_and_keeps_since(store: Store) -> None:
    """A second pause replaces reason and author; the pause began at the first."""
    first = await store.pause_system("erp", reason="upgrade", paused_by="uid 1000")
    second = await store.pause_system("erp", reason="cutover wave 2", paused_by="uid 0")

    assert (second.reason, second.paused_by) == ("cutover wave 2", "uid 0")
    assert second.since == first.since
    assert second.updated_at >= first.updated_at
    assert await store.system_pauses() == {"erp": second}
