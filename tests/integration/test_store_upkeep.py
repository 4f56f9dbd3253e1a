"""The PostgreSQL store's hourly upkeep when daemons overlap: sweeps and partitions.

Two daemons' maintenance actors run `PostgresStore.prune` (hold sweeps,
partition upkeep) at the same time, next to other daemons' commits. Each
test makes the overlap certain with a third session that holds a lock the
upkeep needs, waits until the upkeep queues behind it, and lets go. Also
pinned: a daemon opens its store with partitions for its own retention, and
the hourly statements read partial indexes, not the whole table.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import anyio
import pytest

from broker import app
from broker.config import Config, CoreConfig, DaemonConfig, PostgresConfig
from broker.store import DeadLetterFilter
from broker.store import postgres_sql as sql
from broker.store.postgres import PRUNE_CHUNK, PostgresStore
from tests.contract.test_store import batch_write, dead_letter, held, hold
from tests.integration.pg import Admin, OpenStore
from tests.integration.test_postgres_store import (
    INSERT_KEY,
    daily,
    partitions,
    utc_today,
    wait_for_lock_waiters,
)

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def hold_freed_by_a_purge(store: PostgresStore) -> None:
    """Instance c1 held by a purged blocker, with m1 and m2 held behind it."""
    await store.commit_batch(
        batch_write(dead_letters=[dead_letter("gone", correlation_id="c1")])
    )
    await store.purge_dead_letters(DeadLetterFilter(), dry_run=False)
    await store.commit_batch(
        batch_write(holds=[hold("c1", "gone")], held=[held("m1"), held("m2")])
    )


async def dead_letter_states(admin: Admin) -> dict[str, str]:
    rows = await admin.fetch("SELECT message_id, status FROM dead_letter")
    return {r[0]: r[1] for r in rows}


async def sent_back(admin: Admin) -> list[str]:
    return [r[0] for r in await admin.fetch("SELECT message_id FROM outbox")]


# --- hold sweeps ---------------------------------------------------------------------


async def test_overlapping_sweeps_hand_an_instance_on_once(
    open_store: OpenStore, admin: Admin, other: Admin
) -> None:
    """Two daemons' sweeps at once release the first held message only, not two."""
    first, second = await open_store(), await open_store()
    await hold_freed_by_a_purge(first)
    moved: list[int] = []

    async def sweep(store: PostgresStore) -> None:
        moved.append(await store.sweep_holds())

    busy = other.transaction()
    await busy.start()
    await other.execute("SELECT 1 FROM dead_letter WHERE message_id = 'm1' FOR UPDATE")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(sweep, first)
            tg.start_soon(sweep, second)
            await wait_for_lock_waiters(admin, 2)  # both sweeps are under way
            await busy.rollback()

    assert sorted(moved) == [0, 1]
    assert await dead_letter_states(admin) == {
        "gone": "purged",
        "m1": "released",
        "m2": "held",
    }
    assert await admin.fetchval("SELECT message_id FROM hold") == "m1"
    assert await sent_back(admin) == ["m1"]


async def test_a_sweep_skips_an_instance_an_operator_moved_on_meanwhile(
    open_store: OpenStore, admin: Admin, other: Admin
) -> None:
    """A sweep re-reads the hold it saw, under its lock: a release got there first."""
    operator, daemon = await open_store(), await open_store()
    await hold_freed_by_a_purge(operator)
    released: list[str | None] = []
    moved: list[int] = []

    async def release() -> None:
        released.append(await operator.release_hold("ledger", "c1"))

    async def sweep() -> None:
        moved.append(await daemon.sweep_holds())

    busy = other.transaction()
    await busy.start()
    await other.execute("SELECT 1 FROM dead_letter WHERE message_id = 'm1' FOR UPDATE")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(release)
            await wait_for_lock_waiters(admin, 1)  # the release holds the hold's row
            tg.start_soon(sweep)
            await wait_for_lock_waiters(admin, 2)  # the sweep saw the purged blocker
            await busy.rollback()

    assert (released, moved) == (["m1"], [0])
    assert (await dead_letter_states(admin))["m2"] == "held"
    assert await admin.fetchval("SELECT message_id FROM hold") == "m1"
    assert await sent_back(admin) == ["m1"]


# --- partitions ----------------------------------------------------------------------


async def test_a_key_committed_while_its_days_partition_is_made_moves_in(
    open_store: OpenStore, admin: Admin, other: Admin
) -> None:
    """A row for the new day, committed into DEFAULT meanwhile, lands in the partition.

    Before, ATTACH found it left behind in DEFAULT and failed (23514).
    """
    store = await open_store()
    day = await utc_today(admin) + timedelta(days=8)  # the day after the week ahead
    created: list[int] = []

    async def ensure() -> None:
        created.append(await store.ensure_partitions(ahead_days=8))

    busy = other.transaction()
    await busy.start()
    await other.execute(INSERT_KEY, "crm", "late", day)  # into inbox_default
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ensure)
            await wait_for_lock_waiters(admin, 1)
            await busy.commit()

    assert created == [2]  # the day's inbox and journal partitions
    where = "SELECT tableoid::regclass::text FROM inbox WHERE key = 'late'"
    assert await admin.fetchval(where) == f"inbox_p{day:%Y%m%d}"


async def test_a_daemon_makes_inbox_partitions_for_its_own_retention(
    pg_dsn: str, admin: Admin
) -> None:
    """Opened for a 2-day retention, the store makes no partitions prune would drop."""
    cfg = Config(
        daemon=DaemonConfig(store="postgres"),
        postgres=PostgresConfig(dsn=pg_dsn, pool_min_size=1, pool_max_size=2),
        core=CoreConfig(inbox_retention_days=2),
    )
    store = await app.open_store(cfg, attempts=1)
    try:
        today = await utc_today(admin)
        assert await partitions(admin, "inbox") == {"inbox_default"} | daily(
            "inbox", today - timedelta(days=2), today + timedelta(days=7)
        )
        assert (await store.prune(retention_days=2))["inbox_partitions"] == 0
    finally:
        await store.aclose()


# --- plans ---------------------------------------------------------------------------


async def plan(admin: Admin, text: str, *args: Any) -> str:
    return "\n".join(r[0] for r in await admin.fetch(f"EXPLAIN {text}", *args))


async def test_the_hourly_prune_and_status_counts_read_partial_indexes(
    open_store: OpenStore, admin: Admin
) -> None:
    """Old sent rows, parked rows and settled dead letters: none scans the table.

    20,000 pending outbox rows and 20,000 recently released dead letters are
    the bulk those statements must not visit.
    """
    await open_store()
    await admin.execute(
        "INSERT INTO outbox (message_id, exchange, routing_key, body) "
        "SELECT 'o' || i, 'x', 'r', '' FROM generate_series(1, 20000) AS i"
    )
    await admin.execute(
        "INSERT INTO dead_letter (message_id, queue, routing_key, reason, detail, body,"
        " status) "
        "SELECT 'd' || i, 'q', 'r', 'held', '', '', 'released'"
        " FROM generate_series(1, 20000) AS i"
    )
    await admin.execute("ANALYZE outbox")
    await admin.execute("ANALYZE dead_letter")

    assert "outbox_sent" in await plan(admin, sql.PRUNE_OUTBOX, 7, PRUNE_CHUNK)
    assert "outbox_parked" in await plan(admin, sql.COUNTS)
    assert "dead_letter_settled" in await plan(
        admin, sql.PRUNE_DEAD_LETTERS, 7, PRUNE_CHUNK
    )
