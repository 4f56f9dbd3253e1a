"""The embedded mode's files are written as configured: power-loss safe by default."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.config import SqliteConfig
from broker.store.sqlite import SqliteStore
from broker.transport.journal import QueueJournal

pytestmark = pytest.mark.anyio

_FULL, _NORMAL = 2, 1


async def test_the_store_is_synchronous_full_unless_told_normal(tmp_path: Path) -> None:
    for synchronous, level in (("full", _FULL), ("normal", _NORMAL)):
        path = str(tmp_path / f"{synchronous}.sqlite3")
        cfg = (
            SqliteConfig(path=path)
            if level == _FULL
            else SqliteConfig(path=path, synchronous="normal")
        )
        store = await SqliteStore.open(cfg)
        try:
            (row,) = store._conn.execute("PRAGMA synchronous").fetchall()
        finally:
            await store.aclose()
        assert row[0] == level


async def test_the_queue_journal_is_synchronous_full_unless_told_normal(
    tmp_path: Path,
) -> None:
    full, _ = await QueueJournal.open(str(tmp_path / "full.sqlite3"))
    normal, _ = await QueueJournal.open(
        str(tmp_path / "normal.sqlite3"), synchronous="normal"
    )
    try:
        assert full._conn.execute("PRAGMA synchronous").fetchone()[0] == _FULL
        assert normal._conn.execute("PRAGMA synchronous").fetchone()[0] == _NORMAL
    finally:
        await full.aclose()
        await normal.aclose()
