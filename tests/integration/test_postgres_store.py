"""What only the PostgreSQL store does: partitions, locking between sessions, faults.

The behaviour both stores share is pinned in tests/contract/test_store.py.
These tests inspect the database with a separate asyncpg connection; they
never reach into the store's pool.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import pytest

from broker.config import PostgresConfig
from broker.errors import ConcurrencyConflict, ConfigError, StoreUnavailable
from broker.store import (
    BatchWrite,
    DeadLetterFilter,
    DeadLetterRecord,
    InboxKey,
    OutboxRecord,
    SagaWrite,
)
from broker.store import postgres_sql as sql
from broker.store.migrate import Migration, load_migrations, migrate
from broker.store.postgres import PostgresStore, store_errors
from tests import services
from tests.integration.pg import Admin, OpenStore

pytestmark = pytest.mark.anyio


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


def write(**fields: object) -> BatchWrite:
    """A write of the ``erp`` consumer and the ``wf`` workflow, with *fields* set."""
    values: dict[str, object] = {"consumer": "erp", "workflow": "wf"}
    values.update(fields)
    return BatchWrite(**values)  # type: ignore[arg-type]


#: Another session claims a key: consumer, key, day.
INSERT_KEY = (
    "INSERT INTO inbox (consumer, key, day, message_id) VALUES ($1, $2, $3, 'x')"
)


def create(correlation_id: str) -> SagaWrite:
    """Create an instance: version 1, state ``v1``."""
    return SagaWrite(correlation_id=correlation_id, expected_version=0, state=b"v1")


def outbox_records(n: int) -> list[OutboxRecord]:
    return [
        OutboxRecord(message_id=f"o{i}", exchange="x", routing_key="r", body=b"")
        for i in range(n)
    ]


async def claimed(store: PostgresStore, keys: list[InboxKey]) -> set[str]:
    """Which of *keys* the ``erp`` consumer has claimed."""
    read = await store.prepare_batch("erp", keys, "wf", [])
    return set(read.claimed)


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

    names = [m.name for m in await load_migrations("postgres")]
    # Each script once, by whichever daemon took its lock first, in order.
    applied = [name for result in results for name in result]
    assert sorted(applied) == names
    assert all(result == sorted(result) for result in results)
    assert await admin.fetchval("SELECT count(*) FROM schema_migrations") == len(names)
    assert await stores[0].migrate() == []


@pytest.mark.integration
async def test_migration_0003_keeps_what_an_older_daemon_wrote(
    open_store: OpenStore, admin: Admin
) -> None:
    """A database at 0002 with a dead letter and a pending row migrates; both serve."""
    older = [m for m in await load_migrations("postgres") if m.name < "0003"]
    await admin.execute(
        "CREATE TABLE schema_migrations (name text PRIMARY KEY,"
        " applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for m in older:
        await admin.execute(m.sql)
        await admin.execute("INSERT INTO schema_migrations (name) VALUES ($1)", m.name)
    await admin.execute(
        "INSERT INTO dead_letter (message_id, queue, routing_key, reason, detail, body)"
        " VALUES ('d1', 'q', 'r', 'malformed', 'x', '\\x00')"
    )
    await admin.execute(
        "INSERT INTO outbox (message_id, exchange, routing_key, body)"
        " VALUES ('o1', 'x', 'r', '')"
    )

    store = await open_store()
    [letter] = await store.list_dead_letters(DeadLetterFilter())
    [row] = await store.claim_outbox(limit=10, lease_s=30)
    assert (letter.message_id, letter.status, letter.workflow) == ("d1", "parked", None)
    assert (row.message_id, row.attempts) == ("o1", 1)
    assert (await store.counts())["outbox_pending"] == 1


@pytest.mark.integration
async def test_a_missing_database_is_a_config_error(postgres: None) -> None:
    """The DSN's database must exist: opening fails at once with ConfigError."""
    dsn = services.PG_ADMIN_DSN.rsplit("/", 1)[0] + "/q2c_does_not_exist"
    with pytest.raises(ConfigError, match="does not exist"):
        await PostgresStore.open(PostgresConfig(dsn=dsn, pool_min_size=1))


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres:S3cret/PW@127.0.0.1:5432/q2c",  # '/' ends the host
        "postgresql://postgres:ab#cd@127.0.0.1/q2c",  # '#' ends the address
        "mysql://postgres@127.0.0.1/q2c",
    ],
)
async def test_a_dsn_that_does_not_parse_is_a_config_error_quoting_none_of_it(
    dsn: str,
) -> None:
    """Refused before any connection, naming the fix; no piece of the password."""
    with pytest.raises(ConfigError, match="percent-encode") as caught:
        await PostgresStore.open(PostgresConfig(dsn=dsn, pool_min_size=1))
    text = f"{caught.value} {caught.value.__cause__!r} {caught.value.__context__!r}"
    for piece in ("S3cret", "PW@", "ab#cd"):
        assert piece not in text


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
    await store.commit_batch(write(keys=[key("later", future)]))
    where = "SELECT tableoid::regclass::text FROM inbox WHERE key = 'later'"
    assert await admin.fetchval(where) == "inbox_default"

    assert await store.ensure_partitions(ahead_days=20) == 26  # 13 inbox + 13 journal
    assert await admin.fetchval(where) == f"inbox_p{future:%Y%m%d}"
    assert await claimed(store, [key("later", future)]) == {"later"}


@pytest.mark.integration
async def test_prune_drops_whole_partitions_older_than_the_retention(
    open_store: OpenStore, admin: Admin
) -> None:
    """Retention drops day partitions (no DELETE) and clears old DEFAULT rows."""
    store = await open_store()
    today = await utc_today(admin)
    await store.ensure_partitions(retention_days=30)
    keys = [
        key("ancient", today - timedelta(days=60)),  # DEFAULT partition
        key("old", today - timedelta(days=20)),
        key("kept", today - timedelta(days=7)),
    ]
    await store.commit_batch(write(keys=keys))

    result = await store.prune(retention_days=7)

    assert result["inbox_partitions"] == 23  # today-30 ... today-8
    assert result["inbox"] == 1  # "ancient", from the DEFAULT partition
    oldest = min(p for p in await partitions(admin, "inbox") if p != "inbox_default")
    assert oldest == f"inbox_p{today - timedelta(days=7):%Y%m%d}"
    assert await claimed(store, keys) == {"kept"}


@pytest.mark.integration
async def test_prune_gives_up_on_a_busy_parent_instead_of_stalling_inserts(
    open_store: OpenStore, admin: Admin, other: Admin
) -> None:
    """Dropping a partition waits at most the lock timeout; commits then go on."""
    store = await open_store()
    today = await utc_today(admin)
    await store.ensure_partitions(retention_days=30)

    async with other.transaction():
        await other.execute(INSERT_KEY, "crm", "busy", today)  # holds a lock on inbox
        with anyio.fail_after(5), pytest.raises(StoreUnavailable, match="lock"):
            await store.prune(retention_days=7)
        with anyio.fail_after(5):
            await store.commit_batch(write(keys=[key("still-fine", today)]))

    assert (await store.prune(retention_days=7))["inbox_partitions"] == 23


@pytest.mark.integration
async def test_rows_deleted_as_sent_leave_the_outbox_table(
    open_store: OpenStore, admin: Admin
) -> None:
    """The table keeps only what is still to publish: no sent rows pile up."""
    store = await open_store(lease_s=0.01)
    rows = await store.commit_batch(write(outbox=outbox_records(3)))
    await store.delete_sent([rows[0].id, rows[2].id])

    remaining = await admin.fetch("SELECT message_id, sent_at FROM outbox")
    assert [tuple(r) for r in remaining] == [("o1", None)]


@pytest.mark.integration
async def test_prune_deletes_outbox_rows_sent_before_the_retention(
    open_store: OpenStore, admin: Admin
) -> None:
    """Kept sent rows older than the retention go; recent and unsent rows stay."""
    store = await open_store(lease_s=0.01)
    rows = await store.commit_batch(write(outbox=outbox_records(3)))
    # Marked sent and kept, as releases before `delete_sent` left them.
    await admin.execute(
        "UPDATE outbox SET sent_at = now() - interval '8 days' WHERE id = $1",
        rows[0].id,
    )
    await admin.execute("UPDATE outbox SET sent_at = now() WHERE id = $1", rows[1].id)

    assert (await store.prune(retention_days=7))["outbox"] == 1
    remaining = await admin.fetch("SELECT message_id FROM outbox ORDER BY id")
    assert [r[0] for r in remaining] == ["o1", "o2"]


# --- locking between sessions ------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("held", ["key", "saga"])
@pytest.mark.parametrize("ending", ["commit", "rollback"])
async def test_a_commit_blocked_by_another_write_conflicts_or_wins_as_that_ends(
    open_store: OpenStore, admin: Admin, other: Admin, held: str, ending: str
) -> None:
    """Blocked by another session's row: its commit means a conflict, a rollback not."""
    store = await open_store()
    today = await utc_today(admin)
    await store.commit_batch(write(sagas=[create("c1")]))
    keys = [key(f"k{i}", today) for i in range(10)]
    mine = write(
        keys=[*reversed(keys), key("k-new", today)],
        sagas=[SagaWrite(correlation_id="c1", expected_version=1, state=b"mine")],
    )
    outcome: list[str] = []

    async def commit() -> None:
        try:
            await store.commit_batch(mine)
            outcome.append("committed")
        except ConcurrencyConflict:
            outcome.append("conflict")

    tx = other.transaction()
    await tx.start()
    if held == "key":
        await other.execute(INSERT_KEY, "erp", "k5", today)
    else:
        await other.execute(
            "UPDATE saga SET version = 2, state = 'theirs' WHERE correlation_id = 'c1'"
        )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit)
            await wait_for_lock_waiters(admin, 1)
            await (tx.commit() if ending == "commit" else tx.rollback())

    stored = await store.load_saga("wf", "c1")
    assert stored is not None
    if ending == "rollback":
        assert outcome == ["committed"]
        assert await claimed(store, [key("k-new", today)]) == {"k-new"}
        assert (stored.version, stored.state) == (2, b"mine")
    else:
        assert outcome == ["conflict"]
        assert await claimed(store, [key("k-new", today)]) == set()
        theirs = (1, b"v1") if held == "key" else (2, b"theirs")
        assert (stored.version, stored.state) == theirs


@pytest.mark.integration
@pytest.mark.parametrize("rows", ["keys", "sagas"])
async def test_overlapping_commits_in_opposite_orders_never_deadlock(
    open_store: OpenStore, admin: Admin, rows: str
) -> None:
    """Two concurrent commits of overlapping rows: one wins them all, one conflicts."""
    store = await open_store()
    today = await utc_today(admin)
    rng = random.Random(7)
    universe = [f"r{i:04d}" for i in range(300)]

    def batch(round_: int, names: list[str]) -> BatchWrite:
        if rows == "keys":
            return write(consumer=f"c{round_}", keys=[key(n, today) for n in names])
        creates = [create(n) for n in names]
        return write(workflow=f"wf{round_}", sagas=creates)

    async def commit(names: list[str], won: list[list[str]], round_: int) -> None:
        try:
            await store.commit_batch(batch(round_, names))
        except ConcurrencyConflict:
            return
        won.append(names)

    with anyio.fail_after(30):
        for round_ in range(40):
            ascending = sorted(rng.sample(universe, 200))
            descending = sorted(rng.sample(universe, 200), reverse=True)
            won: list[list[str]] = []
            async with anyio.create_task_group() as tg:
                tg.start_soon(commit, ascending, won, round_)
                tg.start_soon(commit, descending, won, round_)

            assert len(won) == 1, f"round {round_}: {len(won)} winners"
            read = await store.prepare_batch(
                f"c{round_}",
                [key(k, today) for k in universe],
                f"wf{round_}",
                universe,
            )
            assert set(read.claimed if rows == "keys" else read.sagas) == set(won[0])


@pytest.mark.integration
async def test_concurrent_relays_never_lease_the_same_row(
    open_store: OpenStore,
) -> None:
    """FOR UPDATE SKIP LOCKED: four pollers split the rows, none is leased twice."""
    store = await open_store(lease_s=0.01, pool_max_size=6)
    await store.commit_batch(write(outbox=outbox_records(300)))
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


@pytest.mark.integration
async def test_the_relay_poll_never_visits_rows_due_later(
    open_store: OpenStore, admin: Admin
) -> None:
    """20k timers due in an hour: the poll reads only the due rows, by index.

    The plan of the claim, run and rolled back, scans ``outbox_due`` up to
    now() (the rows due later are never read) and updates by primary key,
    with no sequential scan of the outbox anywhere.
    """
    store = await open_store()
    later = [
        OutboxRecord(
            message_id=f"t{i}", exchange="x", routing_key="r", body=b"", delay_s=3600
        )
        for i in range(2000)
    ]
    for _ in range(10):
        await store.commit_batch(write(outbox=later))
    # Three of them fall due (as if their hour had passed).
    await admin.execute(
        "UPDATE outbox SET next_attempt_at = now() - interval '1 minute'"
        " WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT 3)"
    )
    await admin.execute("ANALYZE outbox")

    tx = admin.transaction()
    await tx.start()
    try:
        [plan] = json.loads(
            await admin.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.CLAIM_OUTBOX, 100, 30
            )
        )
    finally:
        await tx.rollback()
    nodes = list(plan_nodes(plan["Plan"]))
    scans = {
        (n["Node Type"], n.get("Index Name")): n for n in nodes if "Relation Name" in n
    }
    assert all(kind != "Seq Scan" for kind, _ in scans)
    due = scans[("Index Scan", "outbox_due")]
    assert due["Actual Rows"] == 3
    assert ("Index Scan", "outbox_pkey") in scans


@pytest.mark.integration
async def test_the_batch_read_probes_each_key_whatever_the_statistics(
    open_store: OpenStore, admin: Admin
) -> None:
    """Statistics taken while the tables were empty cannot turn the read into scans.

    A long-running daemon's cached generic plan once hash-joined a batch's
    few keys against every key its consumer claimed that day, and its
    instances against every instance of the workflow. Each key and each
    instance must stay one index probe that reads only its own row.
    """
    await open_store()
    today = datetime.now(UTC).date()
    await admin.execute("ANALYZE inbox; ANALYZE saga")  # both empty now
    await admin.execute(
        "INSERT INTO inbox (consumer, key, day, message_id)"
        " SELECT 'ledger', 'k' || g, $1::date, 'm' || g"
        " FROM generate_series(1, 20000) AS g",
        today,
    )
    await admin.execute(
        "INSERT INTO saga (workflow, correlation_id, version, state)"
        " SELECT 'ledger', 'acct-' || g, 1, '{}'::bytea"
        " FROM generate_series(1, 2000) AS g"
    )
    await admin.execute("SET plan_cache_mode = force_generic_plan")
    await admin.execute(
        "PREPARE batch_read(text, text[], text, text[], date[]) AS " + sql.PREPARE_BATCH
    )
    keys = ["k1", "k7", "k19", "unseen"]
    [plan] = json.loads(
        await admin.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE batch_read("
            "'ledger', ARRAY['k1', 'k7', 'k19', 'unseen'], 'ledger',"
            " ARRAY['acct-1', 'acct-2', 'acct-3'],"
            f" ARRAY['{today}', '{today}', '{today}', '{today}']::date[])"
        )
    )
    nodes = list(plan_nodes(plan["Plan"]))
    assert not [n["Node Type"] for n in nodes if n["Node Type"].endswith("Join")]
    ran = [n for n in nodes if "Relation Name" in n and n["Actual Loops"] > 0]
    assert {n["Node Type"] for n in ran} <= {"Index Scan", "Index Only Scan"}
    # One probe per key and per instance, each reading at most its own row
    # (EXPLAIN's Actual Rows is per loop): a scan would read the whole day.
    for table, probes in (("inbox", len(keys)), ("saga", 3)):
        scans = [n for n in ran if n["Relation Name"].startswith(table)]
        assert scans, table
        assert all(n["Actual Rows"] <= 1 for n in scans), table
        assert sum(n["Actual Loops"] for n in scans) == probes, table
    # The commit function keeps to nested loops of probes for the same reason.
    config = await admin.fetchval(
        "SELECT proconfig FROM pg_proc WHERE proname = 'q2c_commit_batch_v2'"
    )
    assert {"enable_hashjoin=off", "enable_mergejoin=off"} <= set(config)


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of an EXPLAIN (FORMAT JSON) plan, depth first."""
    yield node
    for child in node.get("Plans", ()):
        yield from plan_nodes(child)


# --- faults ------------------------------------------------------------------------


@pytest.mark.integration
async def test_killed_connections_give_store_unavailable_or_success_never_a_hang(
    open_store: OpenStore, admin: Admin, other: Admin
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

    batch = write(keys=[key("a", today), key("b", today)])
    lost: list[StoreUnavailable] = []

    async def commit_losing_its_connection() -> None:
        try:
            await store.commit_batch(batch)
        except StoreUnavailable as exc:
            lost.append(exc)

    tx = other.transaction()
    await tx.start()
    await other.execute(INSERT_KEY, "erp", "b", today)  # our commit waits for it
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit_losing_its_connection)
            await wait_for_lock_waiters(admin, 1)
            assert await admin.fetchval(kill, app) >= 1
    await tx.rollback()
    assert len(lost) == 1

    with anyio.fail_after(10):
        while True:
            try:
                await store.commit_batch(batch)
                break
            except StoreUnavailable:
                continue
    assert await claimed(store, list(batch.keys)) == {"a", "b"}


@pytest.mark.integration
async def test_a_session_killed_while_idle_is_never_handed_out(
    open_store: OpenStore, admin: Admin
) -> None:
    """The store keeps its last session checked out; a dead one is dropped."""
    app = services.unique_name("q2c_idle")
    store = await open_store(application_name=app, pool_min_size=1)
    await store.counts()  # its session now waits, checked out, for the next call
    pids = "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = $1"
    killed = await admin.fetchval(pids, app)
    assert len(killed) == 1
    await admin.execute("SELECT pg_terminate_backend($1, 5000)", killed[0])
    with anyio.fail_after(5):
        while killed[0] in (await admin.fetchval(pids, app) or []):  # noqa: ASYNC110
            await anyio.sleep(0.01)  # bounded poll of the server

    with anyio.fail_after(10):
        for _ in range(3):  # no StoreUnavailable, no InterfaceError
            await store.counts()


@pytest.mark.integration
async def test_a_caller_waiting_for_the_pool_gets_a_connection_freed_meanwhile(
    open_store: OpenStore, admin: Admin, other: Admin
) -> None:
    """A connection freed while another caller waits goes to that caller.

    Two commits hold both connections, each blocked on a key of another
    session; a third call waits in the pool. Once the keys are free, all
    three finish long before the acquire timeout: nothing freed sat idle
    out of the waiter's reach.
    """
    store = await open_store(pool_min_size=2, pool_max_size=2, acquire_timeout_s=8)
    today = await utc_today(admin)
    tx = other.transaction()
    await tx.start()
    for name in ("held-a", "held-b"):
        await other.execute(INSERT_KEY, "erp", name, today)
    done: list[str] = []

    async def commit(name: str) -> None:
        await store.commit_batch(
            write(keys=[key(f"held-{name}", today), key(name, today)])
        )
        done.append(name)

    async def count() -> None:
        await store.counts()
        done.append("counted")

    with anyio.fail_after(6):
        async with anyio.create_task_group() as tg:
            tg.start_soon(commit, "a")
            tg.start_soon(commit, "b")
            await wait_for_lock_waiters(admin, 2)
            tg.start_soon(count)
            await anyio.wait_all_tasks_blocked()
            await tx.rollback()
    assert sorted(done) == ["a", "b", "counted"]


@pytest.mark.integration
async def test_close_returns_the_idle_sessions_at_once(
    open_store: OpenStore, admin: Admin
) -> None:
    """Closing does not wait out the command timeout for connections kept idle."""
    app = services.unique_name("q2c_close")
    store = await open_store(
        application_name=app, pool_min_size=1, pool_max_size=4, command_timeout_s=10
    )
    async with anyio.create_task_group() as tg:
        for _ in range(4):
            tg.start_soon(store.counts)
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    assert await admin.fetchval(sessions, app) >= 1
    async with anyio.create_task_group() as tg:
        tg.start_soon(store.aclose)  # shielded: a deadline cannot cut it short
        with anyio.fail_after(5):
            while await admin.fetchval(sessions, app):  # noqa: ASYNC110
                await anyio.sleep(0.01)  # bounded poll of the server


@pytest.mark.integration
async def test_a_statement_stuck_on_a_lock_times_out_as_store_unavailable(
    open_store: OpenStore, other: Admin
) -> None:
    """command_timeout bounds every statement: a lock wait ends in StoreUnavailable."""
    store = await open_store(command_timeout_s=0.5)
    await store.commit_batch(write(sagas=[create("c1")]))
    update = SagaWrite(correlation_id="c1", expected_version=1, state=b"mine")

    async with other.transaction():
        await other.execute("UPDATE saga SET state = 'theirs'")  # the row is theirs
        with anyio.fail_after(5), pytest.raises(StoreUnavailable) as caught:
            await store.commit_batch(write(sagas=[update]))
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert repr(store) == "<PostgresStore q2c-broker 0/4 connections>"


# --- a measurement, printed, not asserted ------------------------------------------


@pytest.mark.integration
async def test_commit_throughput_with_1000_key_batches(
    open_store: OpenStore, admin: Admin
) -> None:
    """Prints keys/s for 1000-key commits and duplicate checks; asserts counts only."""
    store = await open_store()
    today = await utc_today(admin)
    batches = [[key(f"b{i}-k{j}", today) for j in range(1000)] for i in range(20)]

    started = time.perf_counter()
    for keys in batches:
        assert await store.commit_batch(write(keys=keys)) == []
    report("commit (new)", len(batches), time.perf_counter() - started)

    started = time.perf_counter()
    for keys in batches:
        assert len(await claimed(store, keys)) == 1000
    report("prepare (duplicate)", len(batches), time.perf_counter() - started)


def report(label: str, batches: int, elapsed: float) -> None:
    print(
        f"\n{label}: {batches} x 1000 keys in {elapsed:.3f} s = "
        f"{batches * 1000 / elapsed:,.0f} keys/s "
        f"({elapsed / batches * 1000:.1f} ms per batch)"
    )


@pytest.mark.integration
async def test_a_migration_longer_than_the_command_timeout_is_applied(
    open_store: OpenStore, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index build on a large table outlasts command-timeout-s: it still lands.

    Run under the pool's command timeout, it was cut short at every start and
    the daemon never came up on the new version.
    """
    slow = Migration(
        name="9999_slow.sql", sql="SELECT pg_sleep(1.5); CREATE TABLE slow_done (x int)"
    )
    packaged = await load_migrations("postgres")

    async def with_slow(dialect: str) -> tuple[Migration, ...]:
        return (*packaged, slow)

    monkeypatch.setattr("broker.store.migrate.load_migrations", with_slow)
    await open_store(command_timeout_s=0.5)
    assert await admin.fetchval("SELECT to_regclass('slow_done') IS NOT NULL")
    assert await admin.fetchval(
        "SELECT true FROM schema_migrations WHERE name = '9999_slow.sql'"
    )


@pytest.mark.integration
async def test_connections_to_a_read_only_server_are_replaced(
    open_store: OpenStore,
) -> None:
    """A demoted primary's sessions never write again: dropped, and the next works.

    Kept in the pool, every write failed on them until a restart.
    """
    store = await open_store(pool_min_size=1, pool_max_size=1)
    async with store._connection() as conn:
        await conn.execute("SET default_transaction_read_only = on")
    with pytest.raises(StoreUnavailable, match="read-only"):
        await store.commit_batch(write(outbox=outbox_records(1)))
    await store.commit_batch(write(outbox=outbox_records(1)))
    assert (await store.counts())["outbox_pending"] == 1


@pytest.mark.integration
async def test_a_nul_in_what_a_producer_sent_does_not_fail_the_write(
    open_store: OpenStore,
) -> None:
    """A dead letter's message id, headers and detail as received: NULs replaced.

    RabbitMQ passes a property's bytes through unchecked, and PostgreSQL's
    text and jsonb cannot hold NUL: the write failed, on every redelivery.
    """
    store = await open_store()
    letter = DeadLetterRecord(
        message_id="m\x00-1",
        queue="q2c.wf.t.0",
        routing_key="t",
        reason="malformed",
        detail="not JSON near 'a\x00b'",
        body=b"\x00\x01",
        headers={"x-note": "a\x00b", "x-ok": 1},
        correlation_id="c\x00",
    )
    await store.commit_batch(write(dead_letters=[letter]))
    (row,) = await store.list_dead_letters(DeadLetterFilter())
    assert row.message_id == "m\ufffd-1"
    assert row.detail == "not JSON near 'a\ufffdb'"
    assert row.headers == {"x-note": "a\ufffdb", "x-ok": 1}
    assert row.body == b"\x00\x01"  # bytes are bytes
