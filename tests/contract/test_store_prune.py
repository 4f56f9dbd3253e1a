"""Pruning dead letters on both stores: what goes after the retention, what stays.

Every test runs against ``SqliteStore(":memory:")`` and against a
`PostgresStore` on a fresh database, like tests/contract/test_store_holds.py,
whose row helpers come from tests/contract/test_store.py. Rows are aged
behind the store's back, on its own database.
"""

from __future__ import annotations

import anyio.to_thread
import asyncpg
import pytest

from broker.store import DeadLetterFilter, Store
from broker.store import sqlite_sql as sql
from broker.store.sqlite import SqliteStore
from tests.contract.test_store import batch_write, dead_letter, held, hold

pytestmark = pytest.mark.anyio


async def age_dead_letters(store: Store, backend: str, days: int) -> None:
    """Move every dead letter's ``last_seen`` *days* into the past."""
    if isinstance(store, SqliteStore):
        await anyio.to_thread.run_sync(
            store._conn.execute,
            "UPDATE dead_letter SET last_seen = last_seen - ?",
            (days * 86_400.0,),
        )
        return
    conn = await asyncpg.connect(backend)
    try:
        await conn.execute(
            "UPDATE dead_letter SET last_seen = last_seen - make_interval(days => $1)",
            days,
        )
    finally:
        await conn.close()


async def statuses(store: Store) -> dict[str, str]:
    rows = await store.list_dead_letters(DeadLetterFilter(status=None, limit=1000))
    return {r.message_id: r.status for r in rows}


async def test_prune_deletes_settled_dead_letters_after_the_retention(
    real_store: Store, backend: str
) -> None:
    """Released, replayed and purged dead letters go once last seen before retention.

    Parked and held ones stay for an operator, and so does a released one
    that blocks its instance now (a hold points to it).
    """
    await real_store.commit_batch(
        batch_write(
            dead_letters=[
                dead_letter("p1"),
                dead_letter("r1", reason="replay"),
                dead_letter("x1", reason="purge"),
                dead_letter("b1", reason="blocker", correlation_id="c1"),
            ],
            holds=[hold("c1", "b1"), hold("c2", "in-retry")],
            held=[held("m2"), held("m3"), held("n1", "c2"), held("n2", "c2")],
        )
    )
    await real_store.replay_dead_letters(
        DeadLetterFilter(reason="replay"), max_replays=3, dry_run=False
    )
    for reason in ("purge", "blocker"):  # the purge of b1 releases m2, its blocker now
        await real_store.purge_dead_letters(
            DeadLetterFilter(reason=reason), dry_run=False
        )
    await real_store.commit_batch(batch_write(released=["n1"]))
    before = await statuses(real_store)
    assert before == {
        "p1": "parked",
        "r1": "replayed",
        "x1": "purged",
        "b1": "purged",
        "m2": "released",
        "m3": "held",
        "n1": "released",
        "n2": "held",
    }

    assert (await real_store.prune(retention_days=7))["dead_letters"] == 0
    assert await statuses(real_store) == before

    await age_dead_letters(real_store, backend, days=8)
    assert (await real_store.prune(retention_days=7))["dead_letters"] == 4
    assert await statuses(real_store) == {
        "p1": "parked",
        "m2": "released",
        "m3": "held",
        "n2": "held",
    }
    assert (await real_store.prune(retention_days=7))["dead_letters"] == 0


async def test_sqlite_prunes_dead_letters_through_the_settled_index() -> None:
    """The hourly delete reads dead_letter_settled, not every dead letter."""
    store = await SqliteStore.open(":memory:")
    try:
        plan = await anyio.to_thread.run_sync(
            lambda: store._conn.execute(
                f"EXPLAIN QUERY PLAN {sql.PRUNE_DEAD_LETTERS}", (0.0, 1)
            ).fetchall()
        )
    finally:
        await store.aclose()
    assert any("dead_letter_settled" in row[-1] for row in plan), plan
