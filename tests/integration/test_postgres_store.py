"""What only the PostgreSQL store does: partitions, locking between sessions, faults.

The behaviour both stores share is pinned in tests/contract/test_store.py.
These tests inspect the database with a separate asyncpg connection; they
never reach into the store's pool.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import date, timedelta
from typing import Any, TypeAlias

import anyio
import asyncpg
import pytest

from broker.config import PostgresConfig
from broker.errors import ConcurrencyConflict, ConfigError, StoreUnavailable
from broker.store import InboxKey, OutboxRecord, SagaWrite
from broker.store.migrate import migrate
from broker.store.postgres import PostgresStore, store_errors
from tests import services

pytestmark = pytest.mark.anyio

Admin: TypeAlias = "asyncpg.Connection[Any]"  # generic only in the stubs
OpenStore = Callable[..., Awaitable[PostgresStore]]


@pytest.fixture
async def open_store(pg_dsn: str) -> AsyncIterator[OpenStore]:
    """Open PostgresStores on the test's database; close them afterwards."""
    opened: list[PostgresStore] = []

    async def open_(
        *, lease_s: float = 30.0, migrate: bool = True, **cfg: Any
    ) -> PostgresStore:
        settings: dict[str, Any] = {"pool_min_size": 1, "pool_max_size": 4, **cfg}
        store = await PostgresStore.open(
            PostgresConfig(dsn=pg_dsn, **settings), lease_s=lease_s, migrate=migrate
        )
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.aclose()


@pytest.fixture
async def admin(pg_dsn: str) -> AsyncIterator[Admin]:
    """A plain connection for inspecting (and disturbing) the test's database."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def utc_today(admin: Admin) -> date:
    today: date = await admin.fetchval("SELECT (now() AT TIME ZONE 'UTC')::date")
    return today


async def partitions(admin: Admin, table: str) -> set[str]:
    rows = await admin.fetch(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = $1::regclass",
        table,
    )
    return {r[0] for r in rows}


def daily(table: str, first: date, last: date) -> set[str]:
    days = (last - first).days
    return {f"{table}_p{(first + timedelta(days=i)):%Y%m%d}" for i in range(days + 1)}


async def wait_for_lock_waiters(admin: Admin, n: int) -> None:
    """Poll until *n* sessions on this database wait for a lock (bounded: 5 s)."""
    with anyio.fail_after(5):
        while (  # noqa: ASYNC110 - polls the server, bounded
            await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            < n
        ):
            await anyio.sleep(0.01)


def key(name: str, day: date) -> InboxKey:
    return InboxKey(key=name, day=day, message_id=f"msg-{name}")


# --- errors at the boundary (no database needed) -----------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.SerializationError("could not serialize access"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
    ],
)
def test_retryable_driver_errors_become_store_unavailable(exc: Exception) -> None:
    """Outages, deadlocks and serialization failures map to StoreUnavailable."""
    with pytest.raises(StoreUnavailable, match="postgres unavailable") as caught:
        raise_through_store_errors(exc)
    assert caught.value.__cause__ is exc


def test_sql_errors_pass_through_store_errors() -> None:
    """Bad SQL is a bug, not an outage: store_errors() leaves it alone."""
    with pytest.raises(asyncpg.exceptions.UndefinedTableError):
        raise_through_store_errors(
            asyncpg.exceptions.UndefinedTableError("relation does not exist")
        )


def raise_through_store_errors(exc: Exception) -> None:
    with store_errors():
        raise exc


# --- opening and migrating ---------------------------------------------------------


@pytest.mark.integration
async def test_migrations_are_recorded_and_idempotent_under_concurrency(
    open_store: OpenStore, admin: Admin
) -> None:
    """Three daemons migrating one empty database at once apply each script once."""
    stores = [await open_store(migrate=False) for _ in range(3)]
    results: list[list[str]] = []

    async def run(store: PostgresStore) -> None:
        results.append(await migrate(store))

    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(run, store)

    assert sorted(results, key=len) == [[], [], ["0001_init.sql"]]
    assert await admin.fetchval("SELECT count(*) FROM schema_migrations") == 1
    assert await stores[0].migrate() == []


@pytest.mark.integration
async def test_a_missing_database_is_a_config_error(postgres: None) -> None:
    """The DSN's database must exist: opening fails at once with ConfigError."""
    dsn = services.PG_ADMIN_DSN.rsplit("/", 1)[0] + "/q2c_does_not_exist"
    with pytest.raises(ConfigError, match="does not exist"):
        await PostgresStore.open(PostgresConfig(dsn=dsn, pool_min_size=1))


async def test_an_unreachable_server_is_store_unavailable() -> None:
    """Nothing listening on the port: StoreUnavailable, so the supervisor retries."""
    cfg = PostgresConfig(
        dsn="postgresql://postgres@127.0.0.1:1/q2c", acquire_timeout_s=2.0
    )
    with anyio.fail_after(10), pytest.raises(StoreUnavailable):
        await PostgresStore.open(cfg)


# --- partitions --------------------------------------------------------------------


@pytest.mark.integration
async def test_daily_partitions_cover_the_retention_window_and_a_week_ahead(
    open_store: OpenStore, admin: Admin
) -> None:
    """Inbox: today-7 ... today+7; journal: today ... today+7; both with DEFAULT."""
    store = await open_store()
    today = await utc_today(admin)

    assert await partitions(admin, "inbox") == {"inbox_default"} | daily(
        "inbox", today - timedelta(days=7), today + timedelta(days=7)
    )
    assert await partitions(admin, "journal") == {"journal_default"} | daily(
        "journal", today, today + timedelta(days=7)
    )
    assert await store.ensure_partitions() == 0


@pytest.mark.integration
async def test_keys_for_a_day_without_partition_wait_in_default_then_move(
    open_store: OpenStore, admin: Admin
) -> None:
    """No insert fails for want of a partition; a later partition adopts the rows."""
    store = await open_store()
    future = await utc_today(admin) + timedelta(days=20)
    async with store.batch() as b:
        assert await b.claim("erp", [key("later", future)]) == {"later"}
    where = "SELECT tableoid::regclass::text FROM inbox WHERE key = 'later'"
    assert await admin.fetchval(where) == "inbox_default"

    assert await store.ensure_partitions(ahead_days=20) == 26  # 13 inbox + 13 journal
    assert await admin.fetchval(where) == f"inbox_p{future:%Y%m%d}"
    async with store.batch() as b:
        assert await b.claim("erp", [key("later", future)]) == set()


@pytest.mark.integration
async def test_prune_drops_whole_partitions_older_than_the_retention(
    open_store: OpenStore, admin: Admin
) -> None:
    """Retention drops day partitions (no DELETE) and clears old DEFAULT rows."""
    store = await open_store()
    today = await utc_today(admin)
    await store.ensure_partitions(retention_days=30)
    async with store.batch() as b:
        keys = [
            key("ancient", today - timedelta(days=60)),  # DEFAULT partition
            key("old", today - timedelta(days=20)),
            key("kept", today - timedelta(days=7)),
        ]
        assert len(await b.claim("erp", keys)) == 3

    result = await store.prune(retention_days=7)

    assert result["inbox_partitions"] == 23  # today-30 ... today-8
    assert result["inbox"] == 1  # "ancient", from the DEFAULT partition
    oldest = min(p for p in await partitions(admin, "inbox") if p != "inbox_default")
    assert oldest == f"inbox_p{today - timedelta(days=7):%Y%m%d}"
    async with store.batch() as b:
        assert await b.claim("erp", keys) == {"ancient", "old"}


@pytest.mark.integration
async def test_prune_gives_up_on_a_busy_parent_instead_of_stalling_inserts(
    open_store: OpenStore, admin: Admin
) -> None:
    """Dropping a partition waits at most the lock timeout, then StoreUnavailable."""
    store = await open_store()
    today = await utc_today(admin)
    await store.ensure_partitions(retention_days=30)

    async with store.batch() as b:
        await b.claim("erp", [key("busy", today)])  # holds a lock on inbox
        with anyio.fail_after(5), pytest.raises(StoreUnavailable, match="lock"):
            await store.prune(retention_days=7)
        await b.claim("erp", [key("still-fine", today)])

    assert (await store.prune(retention_days=7))["inbox_partitions"] == 23


@pytest.mark.integration
async def test_prune_deletes_outbox_rows_sent_before_the_retention(
    open_store: OpenStore, admin: Admin
) -> None:
    """Sent rows older than the retention go; recent and unsent rows stay."""
    store = await open_store(lease_s=0.01)
    async with store.batch() as b:
        rows = await b.add_outbox(
            [
                OutboxRecord(
                    message_id=f"o{i}", exchange="x", routing_key="r", body=b""
                )
                for i in range(3)
            ]
        )
    await store.mark_sent([rows[0].id, rows[1].id])
    await admin.execute(
        "UPDATE outbox SET sent_at = now() - interval '8 days' WHERE id = $1",
        rows[0].id,
    )

    assert (await store.prune(retention_days=7))["outbox"] == 1
    remaining = await admin.fetch("SELECT message_id FROM outbox ORDER BY id")
    assert [r[0] for r in remaining] == ["o1", "o2"]


# --- locking between sessions ------------------------------------------------------


@pytest.mark.integration
async def test_a_key_claimed_by_an_open_transaction_blocks_until_it_ends(
    open_store: OpenStore, admin: Admin
) -> None:
    """The second claimer waits for the first to commit, then sees a duplicate."""
    store = await open_store()
    today = await utc_today(admin)
    first = [key(f"k{i}", today) for i in range(10)]
    second = [*reversed(first), key("k-new", today)]
    got: set[str] = set()

    async def claim_second() -> None:
        nonlocal got
        async with store.batch() as b:
            got = await b.claim("erp", second)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg, store.batch() as b:
            assert len(await b.claim("erp", first)) == 10
            tg.start_soon(claim_second)
            await wait_for_lock_waiters(admin, 1)
            # Committed: now the waiting claim can finish.
    assert got == {"k-new"}


@pytest.mark.integration
async def test_overlapping_claims_in_any_order_neither_deadlock_nor_double_claim(
    open_store: OpenStore, admin: Admin
) -> None:
    """Concurrent batches of shuffled, overlapping keys: no deadlock, each key once."""
    store = await open_store(pool_max_size=6)
    today = await utc_today(admin)
    rng = random.Random(7)
    universe = [f"k{i:04d}" for i in range(600)]

    async def worker(consumer: str, names: list[str], out: list[set[str]]) -> None:
        async with store.batch() as b:
            out.append(await b.claim(consumer, [key(n, today) for n in names]))

    for round_ in range(5):
        claimed: list[set[str]] = []

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    names = rng.sample(universe, 400)
                    tg.start_soon(worker, f"c{round_}", names, claimed)

        assert sum(len(c) for c in claimed) == len(set().union(*claimed))


@pytest.mark.integration
async def test_two_updates_of_one_saga_at_the_same_version_one_wins(
    open_store: OpenStore, admin: Admin
) -> None:
    """The second writer waits for the first, then fails its version check."""
    store = await open_store()
    async with store.batch() as b:
        await b.save_sagas(
            "wf", [SagaWrite(correlation_id="c1", expected_version=0, state=b"v1")]
        )
    outcome: list[str] = []

    async def second_writer() -> None:
        try:
            async with store.batch() as b:
                await b.save_sagas(
                    "wf",
                    [SagaWrite(correlation_id="c1", expected_version=1, state=b"B")],
                )
        except ConcurrencyConflict:
            outcome.append("conflict")

    async with anyio.create_task_group() as tg, store.batch() as b:
        await b.save_sagas(
            "wf", [SagaWrite(correlation_id="c1", expected_version=1, state=b"A")]
        )
        tg.start_soon(second_writer)
        await wait_for_lock_waiters(admin, 1)

    assert outcome == ["conflict"]
    saga = await store.load_saga("wf", "c1")
    assert saga is not None
    assert (saga.version, saga.state) == (2, b"A")


@pytest.mark.integration
async def test_concurrent_relays_never_lease_the_same_row(
    open_store: OpenStore,
) -> None:
    """FOR UPDATE SKIP LOCKED: four pollers split the rows, none is leased twice."""
    store = await open_store(lease_s=0.01, pool_max_size=6)
    async with store.batch() as b:
        await b.add_outbox(
            [
                OutboxRecord(
                    message_id=f"o{i}", exchange="x", routing_key="r", body=b""
                )
                for i in range(300)
            ]
        )
    leased: list[int] = []

    async def relay() -> None:
        while len(leased) < 300:
            rows = await store.claim_outbox(limit=25, lease_s=60)
            leased.extend(r.id for r in rows)
            await anyio.sleep(0 if rows else 0.01)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(relay)

    assert len(leased) == len(set(leased)) == 300


# --- faults ------------------------------------------------------------------------


@pytest.mark.integration
async def test_killed_connections_give_store_unavailable_or_success_never_a_hang(
    open_store: OpenStore, admin: Admin
) -> None:
    """After pg_terminate_backend, calls fail fast or succeed; the pool reconnects."""
    app = services.unique_name("q2c_kill")
    store = await open_store(application_name=app, pool_min_size=2)
    today = await utc_today(admin)
    kill = (
        "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity "
        "WHERE application_name = $1"
    )
    assert await admin.fetchval(kill, app) >= 1  # the pool is named as configured

    outcomes: list[str] = []
    with anyio.fail_after(10):
        while not outcomes or outcomes[-1] != "ok":
            try:
                await store.counts()
                outcomes.append("ok")
            except StoreUnavailable:
                outcomes.append("unavailable")
    assert len(outcomes) <= 3

    async def batch_losing_its_connection() -> None:
        async with store.batch() as b:
            await b.claim("erp", [key("a", today)])
            assert await admin.fetchval(kill, app) >= 1
            await b.claim("erp", [key("b", today)])

    with anyio.fail_after(10), pytest.raises(StoreUnavailable):
        await batch_losing_its_connection()

    with anyio.fail_after(10):
        while True:
            try:
                async with store.batch() as b:
                    assert await b.claim("erp", [key("a", today)]) == {"a"}
                break
            except StoreUnavailable:
                continue


@pytest.mark.integration
async def test_a_statement_stuck_on_a_lock_times_out_as_store_unavailable(
    open_store: OpenStore,
) -> None:
    """command_timeout bounds every statement: a lock wait ends in StoreUnavailable."""
    store = await open_store(command_timeout_s=0.5)
    async with store.batch() as b:
        await b.save_sagas(
            "wf", [SagaWrite(correlation_id="c1", expected_version=0, state=b"")]
        )

    async def blocked_load() -> None:
        async with store.batch() as b:
            await b.load_sagas("wf", ["c1"])

    async with store.batch() as holder:
        await holder.load_sagas("wf", ["c1"])  # FOR UPDATE: the row is ours
        with anyio.fail_after(5), pytest.raises(StoreUnavailable) as caught:
            await blocked_load()
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert repr(store) == "<PostgresStore q2c-broker 0/4 connections>"


# --- a measurement, printed, not asserted ------------------------------------------


@pytest.mark.integration
async def test_claim_throughput_with_1000_key_batches(
    open_store: OpenStore, admin: Admin
) -> None:
    """Prints keys/s for 1000-key claims (new, then duplicates); asserts counts only."""
    store = await open_store()
    today = await utc_today(admin)
    batches = [[key(f"b{i}-k{j}", today) for j in range(1000)] for i in range(20)]

    for label, expected in (("new", 1000), ("duplicate", 0)):
        started = time.perf_counter()
        for keys in batches:
            async with store.batch() as b:
                assert len(await b.claim("bench", keys)) == expected
        elapsed = time.perf_counter() - started
        print(
            f"\nclaim ({label}): {len(batches)} x 1000 keys in {elapsed:.3f} s = "
            f"{len(batches) * 1000 / elapsed:,.0f} keys/s "
            f"({elapsed / len(batches) * 1000:.1f} ms per batch)"
        )
