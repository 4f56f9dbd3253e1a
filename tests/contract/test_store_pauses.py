"""Paused systems on both stores: pausing, reading and resuming.

Every test runs against ``SqliteStore(":memory:")`` and against a
`PostgresStore` on a fresh database, like tests/contract/test_store_holds.py.
"""

from __future__ import annotations

import pytest

from broker.store import Store

pytestmark = pytest.mark.anyio


async def test_a_pause_is_stored_read_and_cleared(real_store: Store) -> None:
    """A pause reads back with its reason and author; resuming returns and drops it."""
    assert await real_store.system_pauses() == {}

    pause = await real_store.pause_system(
        "erp", reason="ERP upgrade", paused_by="uid 1000"
    )
    await real_store.pause_system("crm", reason="", paused_by="uid 0")
    found = await real_store.system_pauses()

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

    ended = await real_store.resume_system("erp")
    assert ended == pause
    assert sorted(await real_store.system_pauses()) == ["crm"]
    assert await real_store.resume_system("erp") is None


async def test_pausing_again_updates_the_reason_and_keeps_since(
    real_store: Store,
) -> None:
    """A second pause replaces reason and author; the pause began at the first."""
    first = await real_store.pause_system("erp", reason="upgrade", paused_by="uid 1000")
    second = await real_store.pause_system(
        "erp", reason="cutover wave 2", paused_by="uid 0"
    )

    assert (second.reason, second.paused_by) == ("cutover wave 2", "uid 0")
    assert second.since == first.since
    assert second.updated_at >= first.updated_at
    assert await real_store.system_pauses() == {"erp": second}
