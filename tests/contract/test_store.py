"""One behavioural suite for the Store protocol: embedded SQLite and real PostgreSQL.

Every test in the first part runs twice, against ``SqliteStore(":memory:")``
and against a `PostgresStore` on a fresh database, so the embedded store the
unit and runtime tests rely on stays an honest stand-in. The last part pins
what only the SQLite store has (an injectable clock, files on disk).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Protocol

import anyio
import anyio.to_thread
import pytest

from broker.config import PostgresConfig, SqliteConfig
from broker.errors import ConcurrencyConflict, StoreUnavailable
from broker.store import (
    BatchRead,
    BatchWrite,
    DeadLetterFilter,
    DeadLetterRecord,
    HoldWrite,
    InboxKey,
    JournalRecord,
    OutboxRecord,
    OutboxRow,
    SagaWrite,
    Store,
    XrefConflict,
    XrefEntry,
)
from broker.store.migrate import apply_sqlite, load_migrations
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore

pytestmark = pytest.mark.anyio

#: The writer's lease in most tests: short, so relay-side tests need not wait.
LEASE_S = 0.02

TODAY = datetime.now(UTC).date()


class OpenStore(Protocol):
    """Opens a store on the backend under test."""

    def __call__(self, *, lease_s: float = LEASE_S) -> Awaitable[Store]:
        """Open a migrated store whose writer lease is *lease_s*."""
        ...


@pytest.fixture
async def open_store(backend: str) -> AsyncIterator[OpenStore]:
    """Open stores on the backend under test; close them afterwards."""
    opened: list[Store] = []

    async def open_(*, lease_s: float = LEASE_S) -> Store:
        store: Store
        if backend == ":memory:":
            store = await SqliteStore.open(":memory:", lease_s=lease_s)
        else:
            cfg = PostgresConfig(dsn=backend, pool_min_size=1, pool_max_size=4)
            store = await PostgresStore.open(cfg, lease_s=lease_s)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        await store.aclose()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    """A migrated, empty store with a short writer lease."""
    return await open_store()


def key(name: str, day: date = TODAY) -> InboxKey:
    return InboxKey(key=name, day=day, message_id=f"msg-{name}")


def outbox(message_id: str, **fields: object) -> OutboxRecord:
    values: dict[str, object] = {
        "exchange": "q2c.events",
        "routing_key": "order.placed",
        "body": f"body-{message_id}".encode(),
    }
    values.update(fields)
    return OutboxRecord(message_id=message_id, **values)  # type: ignore[arg-type]


def dead_letter(message_id: str, **fields: object) -> DeadLetterRecord:
    values: dict[str, object] = {
        "queue": "q2c.sys.erp",
        "routing_key": "order.placed",
        "reason": "schema_invalid",
        "detail": "Expected `int` - at `$.quantity`",
        "body": f"body-{message_id}".encode(),
    }
    values.update(fields)
    return DeadLetterRecord(message_id=message_id, **values)  # type: ignore[arg-type]


def batch_write(**fields: object) -> BatchWrite:
    """A write of the ``ledger`` consumer and workflow, with *fields* set."""
    values: dict[str, object] = {"consumer": "ledger", "workflow": "ledger"}
    values.update(fields)
    return BatchWrite(**values)  # type: ignore[arg-type]


def saga(correlation_id: str, expected_version: int, state: bytes = b"s") -> SagaWrite:
    return SagaWrite(
        correlation_id=correlation_id, expected_version=expected_version, state=state
    )


async def add_outbox(store: Store, *records: OutboxRecord) -> list[OutboxRow]:
    return await store.commit_batch(batch_write(outbox=records))


async def add_dead_letters(store: Store, *records: DeadLetterRecord) -> None:
    await store.commit_batch(batch_write(dead_letters=records))


async def claimed(store: Store, *names: str, consumer: str = "ledger") -> set[str]:
    """Which of *names* *consumer* has claimed."""
    keys = [key(n) for n in names]
    return set((await store.prepare_batch(consumer, keys, "ledger", [])).claimed)


async def claim_n(store: Store, n: int, *, lease_s: float = 30.0) -> list[OutboxRow]:
    """Poll the relay side until *n* rows were leased (bounded: 5 s)."""
    rows: list[OutboxRow] = []
    with anyio.fail_after(5):
        while len(rows) < n:
            rows += await store.claim_outbox(limit=n - len(rows), lease_s=lease_s)
            if len(rows) < n:
                await anyio.sleep(0.01)
    return rows


EMPTY = {
    "outbox_pending": 0,
    "outbox_parked": 0,
    "dead_letters": 0,
    "held": 0,
    "holds": 0,
    "sagas": 0,
    "inbox": 0,
}


# --- inbox -------------------------------------------------------------------------


async def test_keys_are_claimed_once_per_consumer_and_dedup_within_a_batch(
    store: Store,
) -> None:
    """A key is claimed once per consumer; repeated inside one write it counts once."""
    await store.commit_batch(batch_write(keys=[key("a"), key("b"), key("a")]))
    assert await claimed(store, "a", "b", "c") == {"a", "b"}

    with pytest.raises(ConcurrencyConflict, match="claimed concurrently"):
        await store.commit_batch(batch_write(keys=[key("b"), key("c")]))
    assert await claimed(store, "c") == set()

    await store.commit_batch(batch_write(keys=[key("c")]))
    await store.commit_batch(batch_write(consumer="crm", keys=[key("b")]))
    await store.commit_batch(batch_write())
    assert await claimed(store, "a", "b", "c", consumer="crm") == {"b"}
    assert (await store.counts())["inbox"] == 4


@pytest.mark.parametrize(
    ("conflict", "match"),
    [
        ("claimed key", "claimed concurrently"),
        ("stale update", "changed since"),
        ("second create", "changed since"),
    ],
)
async def test_a_conflicting_commit_writes_nothing(
    store: Store, conflict: str, match: str
) -> None:
    """A claimed key, stale update or second create: a conflict, and no row written."""
    await store.commit_batch(batch_write(keys=[key("k0")], sagas=[saga("c1", 0, b"1")]))
    await store.commit_batch(batch_write(sagas=[saga("c1", 1, b"v2")]))
    before = await store.counts()
    expected = {"claimed key": 2, "stale update": 1, "second create": 0}[conflict]
    keys = [key("k1"), key("k0")] if conflict == "claimed key" else [key("k1")]

    with pytest.raises(ConcurrencyConflict, match=match):
        await store.commit_batch(
            batch_write(
                keys=keys,
                sagas=[saga("c2", 0), saga("c1", expected, conflict.encode())],
                outbox=[outbox("o1")],
                dead_letters=[dead_letter("d1")],
                journal=[
                    JournalRecord(message_id="m1", correlation_id="c1", stage="applied")
                ],
            )
        )

    assert await store.counts() == before
    read = await store.prepare_batch("ledger", [key("k1")], "ledger", ["c1", "c2"])
    assert read.claimed == frozenset()
    assert list(read.sagas) == ["c1"]
    assert (read.sagas["c1"].version, read.sagas["c1"].state) == (2, b"v2")
    assert await store.journal("c1") == []
    assert await store.list_dead_letters(DeadLetterFilter(status=None)) == []


# --- sagas -------------------------------------------------------------------------


async def test_prepare_reports_claimed_keys_and_stored_instances(store: Store) -> None:
    """prepare_batch names the keys already claimed and returns existing instances."""
    await store.commit_batch(
        batch_write(keys=[key("k1")], sagas=[saga("acct-1", 0, b"s1")])
    )
    read = await store.prepare_batch(
        "ledger", [key("k1"), key("k2")], "ledger", ["acct-1", "x"]
    )
    assert read.claimed == frozenset({"k1"})
    assert list(read.sagas) == ["acct-1"]
    assert (read.sagas["acct-1"].version, read.sagas["acct-1"].state) == (1, b"s1")
    assert (
        await store.prepare_batch("crm", [key("k1")], "other", ["acct-1"])
    ) == BatchRead(claimed=frozenset(), sagas={})


async def test_sagas_are_created_at_version_1_and_updated_by_version(
    store: Store,
) -> None:
    """Create with expected version 0, then each update bumps the version by one."""
    await store.commit_batch(
        batch_write(workflow="wf", sagas=[saga("c1", 0, b"one"), saga("c2", 0, b"two")])
    )
    read = await store.prepare_batch("ledger", [], "wf", ["c1", "missing"])
    assert list(read.sagas) == ["c1"]
    assert (read.sagas["c1"].version, read.sagas["c1"].state) == (1, b"one")
    await store.commit_batch(batch_write(workflow="wf", sagas=[saga("c1", 1, b"one+")]))

    loaded = await store.load_saga("wf", "c1")
    assert loaded is not None
    assert (loaded.workflow, loaded.version, loaded.state) == ("wf", 2, b"one+")
    assert loaded.updated_at is not None
    assert await store.load_saga("other-wf", "c1") is None
    assert (await store.counts())["sagas"] == 2


async def test_two_writes_to_one_saga_in_one_batch_are_refused(store: Store) -> None:
    """The same instance twice in one BatchWrite is a caller bug (ValueError)."""
    with pytest.raises(ValueError, match="one write per instance"):
        await store.commit_batch(
            batch_write(keys=[key("k1")], sagas=[saga("c1", 0), saga("c1", 0)])
        )
    assert await store.counts() == EMPTY


# --- outbox ------------------------------------------------------------------------


async def test_outbox_rows_stay_leased_to_their_writer_until_the_lease_ends(
    open_store: OpenStore,
) -> None:
    """The relay cannot claim a row while its writer holds the lease."""
    store = await open_store(lease_s=1.0)
    [row] = await add_outbox(store, outbox("o1"))

    assert await store.claim_outbox(limit=10, lease_s=30) == []
    [claimed] = await claim_n(store, 1)
    assert claimed.id == row.id


async def test_outbox_rows_round_trip_in_order(store: Store) -> None:
    """Ids follow the input order; the relay gets every field back, oldest first."""
    records = [
        outbox(
            "o1",
            correlation_id="deal-1",
            type="order.placed",
            headers={"x-shard": 3, "x-source": "erp"},
        ),
        outbox("o2", exchange="", routing_key="q2c.sys.crm", body=b"\x00\xff"),
        outbox("o3"),
    ]
    rows = await add_outbox(store, *records)
    assert [r.message_id for r in rows] == ["o1", "o2", "o3"]
    assert rows[0].id < rows[1].id < rows[2].id
    assert {r.attempts for r in rows} == {1}

    claimed = await claim_n(store, 3)
    assert [r.id for r in claimed] == [r.id for r in rows]
    first, second, _ = claimed
    assert (first.correlation_id, first.type) == ("deal-1", "order.placed")
    assert first.headers == {"x-shard": 3, "x-source": "erp"}
    assert (second.exchange, second.routing_key, second.body) == (
        "",
        "q2c.sys.crm",
        b"\x00\xff",
    )
    assert (second.correlation_id, second.type, second.headers) == (None, None, {})
    assert {r.attempts for r in claimed} == {2}


async def test_a_claimed_row_is_leased_until_deleted_as_sent(store: Store) -> None:
    """A leased row is not handed out twice; once sent it is gone from the relay."""
    await add_outbox(store, outbox("o1"), outbox("o2"))
    claimed = await claim_n(store, 2)
    assert await store.claim_outbox(limit=10, lease_s=30) == []
    assert (await store.counts())["outbox_pending"] == 2

    await store.delete_sent([r.id for r in claimed])
    assert (await store.counts())["outbox_pending"] == 0


async def test_a_row_deleted_as_sent_is_not_claimed_after_its_lease(
    store: Store,
) -> None:
    """Deleted once confirmed: a lapsed lease cannot bring the row back."""
    [row] = await add_outbox(store, outbox("o1"))
    [first] = await claim_n(store, 1, lease_s=0)
    [again] = await claim_n(store, 1, lease_s=0)  # the lease lapsed at once
    assert first.id == again.id == row.id

    await store.delete_sent([row.id])
    assert await store.claim_outbox(limit=10, lease_s=0) == []
    # Another relay confirming the same row after its lease: nothing left to do.
    await store.delete_sent([row.id])
    assert await store.claim_outbox(limit=10, lease_s=0) == []


async def test_a_lapsed_relay_lease_makes_the_row_claimable_again(store: Store) -> None:
    """A relay that died mid-publish loses its lease; the row is claimed again."""
    [row] = await add_outbox(store, outbox("o1"))
    [first] = await claim_n(store, 1, lease_s=0.05)
    [again] = await claim_n(store, 1)
    assert first.id == again.id == row.id
    assert again.attempts == first.attempts + 1


async def test_reschedule_delays_a_row_and_releases_its_lease(store: Store) -> None:
    """A nacked row waits out its delay, then is claimable again at once."""
    [row] = await add_outbox(store, outbox("o1"))
    await claim_n(store, 1)

    await store.reschedule_outbox([row.id], delay_s=3600)
    assert await store.claim_outbox(limit=10, lease_s=30) == []
    assert (await store.counts())["outbox_pending"] == 1

    await store.reschedule_outbox([row.id], delay_s=0.01)
    [again] = await claim_n(store, 1)
    assert again.id == row.id


async def test_parked_rows_are_never_claimed_again(store: Store) -> None:
    """An unroutable row is parked: counted as parked, not pending; never claimed."""
    [row, _] = await add_outbox(store, outbox("o1"), outbox("o2"))
    await claim_n(store, 2, lease_s=0.01)

    await store.park_outbox([row.id], reason="unroutable: no queue bound")
    [other] = await claim_n(store, 1)
    assert other.message_id == "o2"
    counts = await store.counts()
    assert (counts["outbox_pending"], counts["outbox_parked"]) == (1, 1)


# --- dead letters ------------------------------------------------------------------


async def test_a_dead_letter_recorded_again_bumps_attempts(store: Store) -> None:
    """One row per message id: attempts add up and last_seen moves on."""
    await add_dead_letters(store, dead_letter("d1"))
    await add_dead_letters(store, dead_letter("d1", detail="again"), dead_letter("d1"))

    [row] = await store.list_dead_letters(DeadLetterFilter())
    assert (row.message_id, row.attempts, row.status, row.replays) == (
        "d1",
        3,
        "parked",
        0,
    )
    assert row.body == b"body-d1"
    assert row.first_seen <= row.last_seen
    assert (await store.counts())["dead_letters"] == 1


async def test_a_dead_letter_twice_in_one_batch_is_merged(store: Store) -> None:
    """One message id twice in one write: one row, attempts add up, the last wins."""
    await store.commit_batch(
        batch_write(
            dead_letters=[
                dead_letter("d1", attempts=2, detail="first"),
                dead_letter("d2"),
                dead_letter("d1", attempts=3, detail="second", correlation_id="c"),
            ]
        )
    )
    rows = {r.message_id: r for r in await store.list_dead_letters(DeadLetterFilter())}
    assert set(rows) == {"d1", "d2"}
    assert (rows["d1"].attempts, rows["d1"].detail, rows["d1"].correlation_id) == (
        5,
        "second",
        "c",
    )
    assert rows["d2"].attempts == 1


async def test_dead_letters_are_listed_newest_first_and_filtered(store: Store) -> None:
    """Each set filter field must match; ids, status and limit narrow the list."""
    await add_dead_letters(
        store,
        dead_letter("d1", reason="malformed", correlation_id="deal-1"),
        dead_letter("d2", queue="q2c.sys.crm", type="contact.updated"),
        dead_letter(
            "d3", reason="malformed", headers={"x-death": [{"count": 1}]}, type="t"
        ),
    )
    rows = await store.list_dead_letters(DeadLetterFilter())
    assert [r.message_id for r in rows] == ["d3", "d2", "d1"]
    assert rows[0].headers == {"x-death": [{"count": 1}]}

    async def ids(**flt: object) -> list[str]:
        found = await store.list_dead_letters(DeadLetterFilter(**flt))  # type: ignore[arg-type]
        return [r.message_id for r in found]

    assert await ids(reason="malformed") == ["d3", "d1"]
    assert await ids(queue="q2c.sys.crm") == ["d2"]
    assert await ids(type="contact.updated") == ["d2"]
    assert await ids(correlation_id="deal-1") == ["d1"]
    assert await ids(reason="malformed", type="t") == ["d3"]
    assert await ids(ids=(rows[2].id, rows[1].id)) == ["d2", "d1"]
    assert await ids(limit=1) == ["d3"]
    assert await ids(status="replayed") == []
    assert await ids(status=None) == ["d3", "d2", "d1"]


async def test_replay_sends_the_original_back_to_its_queue_via_the_outbox(
    store: Store,
) -> None:
    """Same id and body, default exchange to the original queue, plus x-q2c-replay.

    The marks of a run of waits (since when, how many) stay behind.
    """
    await add_dead_letters(
        store,
        dead_letter(
            "d1",
            queue="q2c.sys.erp",
            body=b'{"original": true}',
            # A run of waits that ended here: a replay starts waiting afresh.
            headers={
                "x-source": "crm",
                "x-q2c-unavailable-since": 1_700_000_000,
                "x-q2c-waits": 4,
            },
            correlation_id="deal-1",
            type="order.placed",
        ),
        dead_letter("d2", reason="other"),
    )
    [d1] = await store.list_dead_letters(DeadLetterFilter(reason="schema_invalid"))

    replayed = await store.replay_dead_letters(
        DeadLetterFilter(ids=(d1.id,)), max_replays=3, dry_run=False
    )
    assert replayed == [d1.id]

    [row] = await claim_n(store, 1)
    assert (row.message_id, row.exchange, row.routing_key) == ("d1", "", "q2c.sys.erp")
    assert row.body == b'{"original": true}'
    assert row.headers == {"x-source": "crm", "x-q2c-replay": 1}
    assert (row.correlation_id, row.type) == ("deal-1", "order.placed")

    [after] = await store.list_dead_letters(DeadLetterFilter(ids=(d1.id,), status=None))
    assert (after.status, after.replays) == ("replayed", 1)
    assert (await store.counts())["dead_letters"] == 1  # d2 is still parked


async def test_replay_loop_guard_and_a_failing_replay_parks_again(store: Store) -> None:
    """A replay that fails again is parked again; max_replays stops the loop."""
    await add_dead_letters(store, dead_letter("d1"))
    assert (
        len(
            await store.replay_dead_letters(
                DeadLetterFilter(), max_replays=1, dry_run=False
            )
        )
        == 1
    )

    await add_dead_letters(store, dead_letter("d1", detail="failed after replay"))
    [row] = await store.list_dead_letters(DeadLetterFilter())
    assert (row.status, row.attempts, row.replays) == ("parked", 2, 1)
    assert row.detail == "failed after replay"

    assert (
        await store.replay_dead_letters(
            DeadLetterFilter(), max_replays=1, dry_run=False
        )
        == []
    )
    assert await store.replay_dead_letters(
        DeadLetterFilter(), max_replays=2, dry_run=False
    ) == [row.id]
    rows = await claim_n(store, 2)
    assert sorted(r.headers["x-q2c-replay"] for r in rows) == [1, 2]


async def test_replay_dry_run_changes_nothing(store: Store) -> None:
    """A dry run names the rows it would replay and writes nothing."""
    await add_dead_letters(store, dead_letter("d1"), dead_letter("d2"))
    listed = [r.id for r in await store.list_dead_letters(DeadLetterFilter())]

    assert (
        await store.replay_dead_letters(DeadLetterFilter(), max_replays=3, dry_run=True)
        == listed
    )
    assert await store.counts() == {**EMPTY, "dead_letters": 2}
    assert {r.status for r in await store.list_dead_letters(DeadLetterFilter())} == {
        "parked"
    }


async def test_purge_drops_bodies_and_a_new_failure_parks_again(store: Store) -> None:
    """Purge empties bodies (a dry run changes nothing); a new failure parks again."""
    await add_dead_letters(store, dead_letter("d1"), dead_letter("d2", reason="other"))
    flt = DeadLetterFilter(reason="schema_invalid")
    [d1] = await store.list_dead_letters(flt)

    assert await store.purge_dead_letters(flt, dry_run=True) == [d1.id]
    assert (await store.list_dead_letters(flt))[0].body == b"body-d1"

    assert await store.purge_dead_letters(flt, dry_run=False) == [d1.id]
    [purged] = await store.list_dead_letters(DeadLetterFilter(status="purged"))
    assert (purged.id, purged.body) == (d1.id, b"")
    assert await store.purge_dead_letters(
        DeadLetterFilter(status=None), dry_run=True
    ) == [r.id for r in await store.list_dead_letters(DeadLetterFilter(reason="other"))]
    assert (await store.counts())["dead_letters"] == 1

    await add_dead_letters(store, dead_letter("d1"))
    [revived] = await store.list_dead_letters(flt)
    assert (revived.status, revived.body, revived.attempts) == ("parked", b"body-d1", 2)


# --- journal, retention, counts ----------------------------------------------------


async def test_past_its_limit_the_journal_shows_the_newest(store: Store) -> None:
    """A long-lived instance: the newest *limit* facts, still oldest first."""
    for n in range(5):
        await store.commit_batch(
            batch_write(
                journal=[
                    JournalRecord(
                        message_id=f"m{n}", correlation_id="acct-1", stage="applied"
                    )
                ]
            )
        )
    rows = await store.journal("acct-1", limit=3)
    assert [r.message_id for r in rows] == ["m2", "m3", "m4"]


async def test_the_journal_of_a_correlation_id_is_in_order(store: Store) -> None:
    """Entries come back oldest first, across batches, and only for that id."""
    await store.commit_batch(
        batch_write(
            journal=[
                JournalRecord(
                    message_id="m1", correlation_id="deal-1", stage="received"
                ),
                JournalRecord(
                    message_id="m1", correlation_id="deal-2", stage="received"
                ),
                JournalRecord(
                    message_id="m1",
                    correlation_id="deal-1",
                    stage="applied",
                    type="order.placed",
                    detail="v2",
                ),
            ]
        )
    )
    await store.commit_batch(
        batch_write(
            journal=[
                JournalRecord(
                    message_id="m2", correlation_id="deal-1", stage="published"
                )
            ]
        )
    )

    entries = await store.journal("deal-1")
    assert [(e.message_id, e.stage) for e in entries] == [
        ("m1", "received"),
        ("m1", "applied"),
        ("m2", "published"),
    ]
    assert (entries[1].type, entries[1].detail) == ("order.placed", "v2")
    assert entries[0].at <= entries[2].at
    assert len(await store.journal("deal-1", limit=2)) == 2


async def test_prune_forgets_keys_older_than_the_retention(store: Store) -> None:
    """After prune, an old key is new again; keys inside the retention still dedup."""
    old = key("old", TODAY - timedelta(days=30))
    edge = key("edge", TODAY - timedelta(days=7))
    recent = key("recent", TODAY)
    await store.commit_batch(batch_write(keys=[old, edge, recent]))

    result = await store.prune(retention_days=7)
    assert set(result) == {
        "inbox",
        "inbox_partitions",
        "journal",
        "journal_partitions",
        "outbox",
        "holds_swept",
        "dead_letters",
    }
    read = await store.prepare_batch("ledger", [old, edge, recent], "ledger", [])
    assert read.claimed == {"edge", "recent"}
    await store.commit_batch(batch_write(keys=[old]))


async def test_counts_cover_outbox_dead_letters_sagas_and_inbox(store: Store) -> None:
    """counts() reports pending and parked outbox rows, parked DLQ rows, sagas, keys."""
    rows = await store.commit_batch(
        batch_write(
            keys=[key("a"), key("b"), key("c")],
            sagas=[saga("c1", 0, b"")],
            outbox=[outbox("o1"), outbox("o2")],
            dead_letters=[dead_letter("d1")],
        )
    )
    await store.park_outbox([rows[0].id], reason="unroutable")

    assert await store.counts() == {
        **EMPTY,
        "outbox_pending": 1,
        "outbox_parked": 1,
        "dead_letters": 1,
        "sagas": 1,
        "inbox": 3,
    }


# --- SQLite only -------------------------------------------------------------------


class FakeClock:
    """Seconds since the epoch, moved by hand."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).timestamp()

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


async def test_sqlite_leases_and_retention_follow_the_injected_clock() -> None:
    """With a fake clock, leases lapse and kept sent rows age out without waiting."""
    clock = FakeClock()
    store = await SqliteStore.open(":memory:", lease_s=30, clock=clock)
    try:
        [row] = await store.commit_batch(
            batch_write(
                outbox=[outbox("o1")],
                journal=[
                    JournalRecord(
                        message_id="m1", correlation_id="c1", stage="received"
                    )
                ],
            )
        )
        assert await store.claim_outbox(limit=10, lease_s=30) == []
        clock.now += 31
        [claimed] = await store.claim_outbox(limit=10, lease_s=30)
        # Marked sent and kept, as releases before `delete_sent` left them.
        await anyio.to_thread.run_sync(
            store._conn.execute,
            "UPDATE outbox SET sent_at = ?, lease_until = NULL WHERE id = ?",
            (clock.now, claimed.id),
        )

        clock.now += 6 * 86_400
        assert (await store.prune(retention_days=7))["outbox"] == 0
        clock.now += 2 * 86_400
        result = await store.prune(retention_days=7, journal_retention_days=30)
        assert (result["outbox"], result["journal"]) == (1, 0)
        assert len(await store.journal("c1")) == 1
        assert (await store.prune(retention_days=7))["journal"] == 1
        assert row.id == claimed.id
    finally:
        await store.aclose()


async def test_sqlite_on_disk_uses_wal_and_reports_a_locked_file(
    tmp_path: Path,
) -> None:
    """A file store runs in WAL mode; another writer's lock gives StoreUnavailable."""
    path = tmp_path / "var" / "q2c.sqlite3"
    store = await SqliteStore.open(SqliteConfig(path=str(path)), busy_timeout_s=0.05)
    other = await anyio.to_thread.run_sync(
        lambda: sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    )
    try:
        mode = await anyio.to_thread.run_sync(
            lambda: other.execute("PRAGMA journal_mode").fetchone()
        )
        assert mode == ("wal",)
        await anyio.to_thread.run_sync(other.execute, "BEGIN IMMEDIATE")

        with pytest.raises(StoreUnavailable, match="locked") as caught:
            await store.commit_batch(batch_write(keys=[key("a")]))
        assert isinstance(caught.value.__cause__, sqlite3.OperationalError)

        await anyio.to_thread.run_sync(other.execute, "ROLLBACK")
        await store.commit_batch(batch_write(keys=[key("a")]))
        assert await claimed(store, "a") == {"a"}
    finally:
        await anyio.to_thread.run_sync(other.close)
        await store.aclose()

    reopened = await SqliteStore.open(str(path))
    try:
        assert await reopened.migrate() == []
        assert (await reopened.counts())["inbox"] == 1
    finally:
        await reopened.aclose()


async def test_sqlite_migration_0003_keeps_dead_letters_and_their_ids(
    tmp_path: Path,
) -> None:
    """The dead-letter table is rebuilt by 0003: rows survive, new ids follow on."""
    path = tmp_path / "q2c.sqlite3"
    older = [m for m in await load_migrations("sqlite") if m.name < "0003"]

    def at_0001() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            apply_sqlite(conn, tuple(older))
            conn.execute(
                "INSERT INTO dead_letter (message_id, queue, routing_key, reason,"
                " detail, body, first_seen, last_seen)"
                " VALUES ('d1', 'q', 'r', 'malformed', 'x', x'00', 1, 1)"
            )
        finally:
            conn.close()

    await anyio.to_thread.run_sync(at_0001)
    store = await SqliteStore.open(str(path))
    try:
        await add_dead_letters(store, dead_letter("d2"))
        rows = await store.list_dead_letters(DeadLetterFilter())
    finally:
        await store.aclose()
    assert [(r.id, r.message_id, r.status) for r in rows] == [
        (2, "d2", "parked"),
        (1, "d1", "parked"),
    ]


async def test_sqlite_statements_run_off_the_event_loop_thread() -> None:
    """Every SQL statement runs on a worker thread, never on the event loop's."""
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    store = await SqliteStore.open(":memory:")
    try:
        await anyio.to_thread.run_sync(
            store._conn.set_trace_callback, lambda _: threads.add(threading.get_ident())
        )
        await store.prepare_batch("ledger", [key("a")], "ledger", ["c1"])
        await store.commit_batch(batch_write(keys=[key("a")], outbox=[outbox("o1")]))
        await store.counts()
        await anyio.to_thread.run_sync(store._conn.set_trace_callback, None)
    finally:
        await store.aclose()
    assert threads
    assert loop_thread not in threads


# --- the whole batch in one commit -------------------------------------------------


async def test_commit_batch_writes_everything_and_leases_the_outbox(
    store: Store,
) -> None:
    """One commit claims keys, writes instances, dead letters, journal and outbox."""
    rows = await store.commit_batch(
        batch_write(
            keys=[key("k1"), key("k2")],
            sagas=[saga("acct-1", 0)],
            outbox=[outbox("m1"), outbox("m2", headers={"x-a": 1})],
            dead_letters=[dead_letter("d1")],
            journal=[
                JournalRecord(message_id="k1", correlation_id="acct-1", stage="applied")
            ],
        )
    )
    assert [r.message_id for r in rows] == ["m1", "m2"]
    assert rows[0].id < rows[1].id
    assert rows[1].headers == {"x-a": 1}
    assert await store.claim_outbox(limit=10, lease_s=LEASE_S) == []  # leased to us
    assert await store.counts() == {
        **EMPTY,
        "outbox_pending": 2,
        "dead_letters": 1,
        "sagas": 1,
        "inbox": 2,
    }
    assert [j.stage for j in await store.journal("acct-1")] == ["applied"]


async def test_prepare_looks_each_key_up_on_its_own_day(store: Store) -> None:
    """A key claimed on one day is not a duplicate of the same key on another day.

    The inbox key includes the fact's own date (the partition), so the same
    idempotency key with another date is another fact.
    """
    yesterday = TODAY - timedelta(days=1)
    await store.commit_batch(
        BatchWrite(
            consumer="ledger",
            workflow="ledger",
            keys=[key("k-today"), key("k-yesterday", yesterday)],
        )
    )
    read = await store.prepare_batch(
        "ledger",
        [key("k-today"), key("k-yesterday", yesterday), key("k-new")],
        "ledger",
        [],
    )
    assert read.claimed == frozenset({"k-today", "k-yesterday"})


# --- delayed outbox rows -----------------------------------------------------------


async def test_a_delayed_row_is_not_leased_to_its_writer_and_waits_until_due(
    open_store: OpenStore,
) -> None:
    """commit_batch returns only undelayed rows; a delayed one is claimed once due."""
    store = await open_store(lease_s=30.0)
    rows = await store.commit_batch(
        batch_write(
            outbox=[
                outbox("now"),
                outbox("hour", delay_s=3600),
                outbox("soon", delay_s=0.2),
            ]
        )
    )
    assert [r.message_id for r in rows] == ["now"]
    assert await store.claim_outbox(limit=10, lease_s=30) == []
    assert (await store.counts())["outbox_pending"] == 3

    [due] = await claim_n(store, 1)
    assert (due.message_id, due.attempts) == ("soon", 1)
    assert await store.claim_outbox(limit=10, lease_s=30) == []
    await store.delete_sent([due.id])
    assert (await store.counts())["outbox_pending"] == 2


async def test_rows_due_later_do_not_crowd_out_rows_due_now(store: Store) -> None:
    """A thousand timers due in an hour: a row due now is still claimed first."""
    await add_outbox(store, *[outbox(f"t{n}", delay_s=3600) for n in range(1000)])
    [row] = await add_outbox(store, outbox("due"))
    [claimed] = await claim_n(store, 1)
    assert claimed.id == row.id
    assert await store.claim_outbox(limit=10, lease_s=30) == []


# --- holds -------------------------------------------------------------------------


def held(
    message_id: str, correlation_id: str = "c1", **fields: object
) -> DeadLetterRecord:
    values: dict[str, object] = {
        "queue": "q2c.wf.ledger.0",
        "reason": "held",
        "detail": "held behind b1",
        "correlation_id": correlation_id,
    }
    values.update(fields)
    return dead_letter(message_id, **values)


def hold(cid: str, message_id: str | None, expected: str | None = None) -> HoldWrite:
    return HoldWrite(correlation_id=cid, message_id=message_id, expected=expected)


async def test_holds_are_read_with_the_batch_and_written_at_their_expected_blocker(
    store: Store,
) -> None:
    """prepare_batch reports holds; a hold moves or clears only from what was read."""
    await store.commit_batch(batch_write(holds=[hold("c1", "b1"), hold("c2", "x1")]))
    read = await store.prepare_batch("ledger", [], "ledger", ["c1", "c3"])
    assert read.holds == {"c1": "b1"}
    assert (await store.prepare_batch("ledger", [], "other", ["c1"])).holds == {}

    await store.commit_batch(batch_write(holds=[hold("c1", "b1", "b1")]))  # a check
    stale_holds = (
        hold("c1", None, "b0"),
        hold("c1", "b2", "b0"),
        hold("c1", "b2"),
        hold("c1", "b0", "b0"),
    )
    for stale in stale_holds:
        with pytest.raises(ConcurrencyConflict, match="holds changed"):
            await store.commit_batch(batch_write(keys=[key("k")], holds=[stale]))
    assert await claimed(store, "k") == set()

    await store.commit_batch(batch_write(holds=[hold("c1", "b2", "b1")]))
    assert (await store.prepare_batch("ledger", [], "ledger", ["c1"])).holds == {
        "c1": "b2"
    }
    assert (await store.counts())["holds"] == 2
    await store.commit_batch(batch_write(holds=[hold("c1", None, "b2")]))
    assert (await store.prepare_batch("ledger", [], "ledger", ["c1"])).holds == {}
    with pytest.raises(ValueError, match="one write per instance"):
        await store.commit_batch(batch_write(holds=[hold("c3", "a"), hold("c3", "b")]))


async def test_held_messages_keep_their_arrival_order_and_their_place(
    store: Store,
) -> None:
    """Held in order across writes; one held again keeps its place; listed as held."""
    await store.commit_batch(
        batch_write(
            holds=[hold("c1", "b1")],
            held=[held("m2"), held("m3"), held("x1", "c2")],
        )
    )
    await store.commit_batch(
        batch_write(held=[held("m4"), held("m2", detail="again", attempts=2)])
    )

    rows = await store.held_messages("ledger", ["c1", "c2"], limit_each=10)
    assert [(r.correlation_id, r.message_id) for r in rows] == [
        ("c1", "m2"),
        ("c1", "m3"),
        ("c1", "m4"),
        ("c2", "x1"),
    ]
    first = rows[0]
    assert (first.status, first.reason, first.workflow) == ("held", "held", "ledger")
    assert (first.detail, first.attempts, first.body) == ("again", 2, b"body-m2")
    assert [
        r.message_id for r in await store.held_messages("ledger", ["c1"], limit_each=2)
    ] == ["m2", "m3"]
    assert await store.held_messages("other", ["c1"], limit_each=10) == []

    await add_dead_letters(store, dead_letter("b1", correlation_id="c1"))
    counts = await store.counts()
    assert (counts["dead_letters"], counts["held"], counts["holds"]) == (1, 4, 1)
    parked = await store.list_dead_letters(DeadLetterFilter())
    assert [r.message_id for r in parked] == ["b1"]
    listed = await store.list_dead_letters(DeadLetterFilter(status="open"))
    assert {r.message_id: r.status for r in listed} == {
        "b1": "parked",
        "m2": "held",
        "m3": "held",
        "m4": "held",
        "x1": "held",
    }
    held_ids = tuple(r.id for r in listed if r.status == "held")
    assert (
        await store.replay_dead_letters(
            DeadLetterFilter(ids=held_ids), max_replays=3, dry_run=False
        )
        == []
    )  # released by their blocker, never by a replay


async def test_released_messages_leave_the_hold_once(store: Store) -> None:
    """Releasing marks held rows released; releasing one no longer held conflicts."""
    await store.commit_batch(batch_write(held=[held("m2"), held("m3")]))
    await store.commit_batch(batch_write(released=["m2", "m2"]))
    assert [
        r.message_id for r in await store.held_messages("ledger", ["c1"], limit_each=10)
    ] == ["m3"]
    [m2] = await store.list_dead_letters(DeadLetterFilter(status="released"))
    assert m2.message_id == "m2"

    with pytest.raises(ConcurrencyConflict, match="released concurrently"):
        await store.commit_batch(batch_write(keys=[key("k")], released=["m3", "m2"]))
    assert (await store.counts())["held"] == 1
    assert await claimed(store, "k") == set()


async def test_purging_a_blocker_hands_its_hold_to_the_first_held_message(
    open_store: OpenStore,
) -> None:
    """The first held message blocks now and goes back to its queue; at last none."""
    store = await open_store(lease_s=30.0)
    await store.commit_batch(
        batch_write(
            dead_letters=[dead_letter("b1", correlation_id="c1")],
            holds=[hold("c1", "b1")],
            held=[held("m2", headers={"x-source": "crm"}), held("m3")],
        )
    )
    [b1] = await store.list_dead_letters(DeadLetterFilter(reason="schema_invalid"))
    assert await store.purge_dead_letters(
        DeadLetterFilter(ids=(b1.id,)), dry_run=False
    ) == [b1.id]

    read = await store.prepare_batch("ledger", [], "ledger", ["c1"])
    assert read.holds == {"c1": "m2"}
    [row] = await claim_n(store, 1)
    assert (row.message_id, row.exchange, row.routing_key) == (
        "m2",
        "",
        "q2c.wf.ledger.0",
    )
    assert row.headers == {"x-source": "crm", "x-q2c-released": 1}
    assert row.body == b"body-m2"
    assert [
        r.message_id for r in await store.held_messages("ledger", ["c1"], limit_each=10)
    ] == ["m3"]

    # The operator purges the one in flight, then the last one held: no hold is left.
    await store.purge_dead_letters(DeadLetterFilter(status="released"), dry_run=False)
    assert (await store.prepare_batch("ledger", [], "ledger", ["c1"])).holds == {
        "c1": "m3"
    }
    await store.purge_dead_letters(DeadLetterFilter(status="released"), dry_run=False)
    counts = await store.counts()
    assert (counts["held"], counts["holds"]) == (0, 0)


async def test_sweep_hands_on_holds_nothing_can_release(
    open_store: OpenStore,
) -> None:
    """Held rows without a hold, and a hold whose blocker is purged, move on."""
    store = await open_store(lease_s=30.0)
    await add_dead_letters(store, dead_letter("gone", correlation_id="c2"))
    await store.purge_dead_letters(DeadLetterFilter(ids=()), dry_run=False)
    await store.commit_batch(
        batch_write(
            holds=[hold("c2", "gone")],
            held=[held("m1", "c1"), held("m2", "c1"), held("n1", "c2")],
        )
    )
    assert await store.sweep_holds() == 2
    read = await store.prepare_batch("ledger", [], "ledger", ["c1", "c2"])
    assert read.holds == {"c1": "m1", "c2": "n1"}
    sent_back = await claim_n(store, 2)
    assert sorted(r.message_id for r in sent_back) == ["m1", "n1"]
    assert await store.sweep_holds() == 0
    assert (await store.prune(retention_days=7))["holds_swept"] == 0


# --- xref --------------------------------------------------------------------------


def xref(
    canonical_id: str, system: str, native_id: str, content_hash: str = ""
) -> XrefEntry:
    return XrefEntry(
        kind="account",
        canonical_id=canonical_id,
        system=system,
        native_id=native_id,
        content_hash=content_hash,
    )


async def test_xref_entries_round_trip_and_are_replaced_per_system(
    store: Store,
) -> None:
    """put, get, find and many; writing a system again replaces its native id."""
    await store.xref_put(
        [
            xref("acc-1", "crm", "001A"),
            xref("acc-1", "erp", "1000123", "h1"),
            xref("acc-2", "crm", "001B"),
        ]
    )
    got = await store.xref_get("account", "acc-1")
    assert sorted(got) == ["crm", "erp"]
    assert (got["erp"].native_id, got["erp"].content_hash) == ("1000123", "h1")
    assert got["erp"].updated_at is not None
    found = await store.xref_find("account", "crm", "001B")
    assert found is not None
    assert found.canonical_id == "acc-2"
    assert await store.xref_find("account", "crm", "nope") is None
    assert await store.xref_find("product", "crm", "001B") is None

    await store.xref_put([xref("acc-1", "erp", "1000999", "h2")])
    assert (await store.xref_get("account", "acc-1"))["erp"].native_id == "1000999"
    assert await store.xref_find("account", "erp", "1000123") is None

    many = await store.xref_many("account", ["acc-1", "acc-2", "acc-3"])
    assert {cid: sorted(m) for cid, m in many.items()} == {
        "acc-1": ["crm", "erp"],
        "acc-2": ["crm"],
    }
    assert await store.xref_get("account", "acc-3") == {}


async def test_a_native_id_bound_elsewhere_is_a_conflict_and_nothing_is_written(
    store: Store,
) -> None:
    """Binding a native id to a second canonical id raises XrefConflict, all or none."""
    await store.xref_put([xref("acc-1", "erp", "1000123")])

    with pytest.raises(XrefConflict, match="1000123") as caught:
        await store.xref_put(
            [xref("acc-3", "crm", "001C"), xref("acc-2", "erp", "1000123")]
        )
    assert (caught.value.bound_to, caught.value.wanted) == ("acc-1", "acc-2")
    assert caught.value.reason == "xref_conflict"
    assert await store.xref_get("account", "acc-3") == {}

    with pytest.raises(XrefConflict):
        await store.xref_put(
            [xref("acc-4", "erp", "2000"), xref("acc-5", "erp", "2000")]
        )
    assert await store.xref_find("account", "erp", "2000") is None


async def test_xref_entries_commit_with_their_batch(store: Store) -> None:
    """BatchWrite.xref is written atomically with the batch, or not at all."""
    await store.commit_batch(
        batch_write(keys=[key("k1")], xref=[xref("acc-1", "erp", "1000123")])
    )
    assert (await store.xref_get("account", "acc-1"))["erp"].native_id == "1000123"

    with pytest.raises(XrefConflict):
        await store.commit_batch(
            batch_write(
                keys=[key("k2")],
                outbox=[outbox("o1")],
                xref=[xref("acc-2", "erp", "1000123")],
            )
        )
    assert await claimed(store, "k2") == set()
    assert (await store.counts())["outbox_pending"] == 0


async def test_ping_answers_while_the_store_is_open(store: Store) -> None:
    """What /readyz asks: one trivial statement, not the status counts."""
    await store.ping()
    await store.aclose()
    with pytest.raises(StoreUnavailable):
        await store.ping()
