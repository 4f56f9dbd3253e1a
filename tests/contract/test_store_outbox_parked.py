"""Parked outbox rows on both stores: an operator lists, shows, retries, purges.

Every test runs against ``SqliteStore(":memory:")`` and against a
`PostgresStore` on a fresh database, like tests/contract/test_store.py,
whose row helpers it uses. The writers' lease is 30 s here, so a row the
relay may claim at once is one a retry made due, not one whose lease ran out.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.store import OutboxRow, Store, in_chunks
from tests.contract.test_store import add_outbox, outbox

pytestmark = pytest.mark.anyio

UNROUTABLE = "unroutable (returned by the broker)"


async def parked_rows(store: Store, n: int, **fields: object) -> list[OutboxRow]:
    """Write *n* rows (``o0``, ``o1`` …) and park them, as the relay does."""
    rows = await add_outbox(store, *(outbox(f"o{i}", **fields) for i in range(n)))
    await store.park_outbox([r.id for r in rows], reason=UNROUTABLE)
    return rows


async def parked_ids(store: Store) -> list[int]:
    return sorted(r.id for r in await store.list_parked_outbox(limit=10_000))


async def test_parked_rows_are_listed_newest_first_without_bodies(
    real_store: Store,
) -> None:
    """Only parked rows, newest first, with size and reason; the limit holds."""
    before = datetime.now(UTC) - timedelta(seconds=5)
    [first, second] = await parked_rows(
        real_store,
        2,
        exchange="",
        routing_key="q2c.sys.erp",
        correlation_id="deal-1",
        type="erp.order.create",
        headers={"x-q2c-system": "erp"},
    )
    await add_outbox(real_store, outbox("pending"))
    await real_store.park_outbox([first.id], reason="unpublishable: too long")

    rows = await real_store.list_parked_outbox(limit=10)
    assert [r.id for r in rows] == [second.id, first.id]
    newest = rows[0]
    assert (newest.message_id, newest.exchange, newest.routing_key) == (
        "o1",
        "",
        "q2c.sys.erp",
    )
    assert (newest.correlation_id, newest.type) == ("deal-1", "erp.order.create")
    assert newest.headers == {"x-q2c-system": "erp"}
    assert (newest.reason, rows[1].reason) == (UNROUTABLE, "unpublishable: too long")
    assert newest.size_bytes == len(b"body-o1")
    assert newest.body is None
    assert before <= newest.created_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert [r.id for r in await real_store.list_parked_outbox(limit=1)] == [second.id]


async def test_one_parked_row_is_shown_with_its_body(real_store: Store) -> None:
    """Show gives the body; a pending, purged or unknown id gives None."""
    [row] = await parked_rows(real_store, 1, body=b"\xff\x00payload")
    [pending] = await add_outbox(real_store, outbox("pending"))

    shown = await real_store.parked_outbox(row.id)
    assert shown is not None
    assert (shown.id, shown.body, shown.size_bytes) == (row.id, b"\xff\x00payload", 9)
    assert await real_store.parked_outbox(pending.id) is None
    assert await real_store.parked_outbox(row.id + 1000) is None
    await real_store.purge_parked_outbox([row.id])
    assert await real_store.parked_outbox(row.id) is None


async def test_a_retried_row_is_due_at_once_and_claimed_afresh(
    real_store: Store,
) -> None:
    """Unparked: no lease, due now, attempts from zero; the relay claims it again."""
    [row] = await parked_rows(real_store, 1)
    assert await real_store.claim_outbox(limit=10, lease_s=30) == []

    assert await real_store.retry_parked_outbox([row.id]) == [row.id]

    [claimed] = await real_store.claim_outbox(limit=10, lease_s=30)
    assert (claimed.id, claimed.message_id, claimed.attempts) == (row.id, "o0", 1)
    assert claimed.body == b"body-o0"
    counts = await real_store.counts()
    assert (counts["outbox_pending"], counts["outbox_parked"]) == (1, 0)
    assert await real_store.list_parked_outbox(limit=10) == []


async def test_rows_not_parked_are_skipped_and_left_alone(real_store: Store) -> None:
    """Pending, sent, already retried and unknown ids are not touched."""
    [parked, retried, sent] = await parked_rows(real_store, 3)
    [pending] = await add_outbox(real_store, outbox("pending"))
    await real_store.retry_parked_outbox([retried.id])
    await real_store.claim_outbox(limit=10, lease_s=30)  # the retried row, leased
    await real_store.delete_sent([sent.id])  # confirmed by the broker: gone

    named = [pending.id, retried.id, sent.id, parked.id, 999_999]
    assert await real_store.retry_parked_outbox(named) == [parked.id]
    # The pending row keeps its writer's lease, the retried one its relay lease:
    # only the row just unparked is claimable.
    [claimed] = await real_store.claim_outbox(limit=10, lease_s=30)
    assert claimed.id == parked.id
    assert await real_store.purge_parked_outbox(named) == []
    assert (await real_store.counts())["outbox_pending"] == 3


async def test_a_dry_run_names_the_parked_rows_and_changes_nothing(
    real_store: Store,
) -> None:
    """Dry runs of retry and purge, by ids or all, only select."""
    rows = await parked_rows(real_store, 3)
    [pending] = await add_outbox(real_store, outbox("pending"))
    ids = [r.id for r in rows]

    assert await real_store.retry_parked_outbox(None, dry_run=True) == ids
    assert await real_store.purge_parked_outbox(None, dry_run=True, chunk=2) == ids
    assert await real_store.retry_parked_outbox(
        [ids[2], pending.id, ids[0]], dry_run=True
    ) == [ids[0], ids[2]]
    assert await real_store.purge_parked_outbox([pending.id], dry_run=True) == []
    assert await parked_ids(real_store) == ids
    assert await real_store.claim_outbox(limit=10, lease_s=30) == []


async def test_a_purge_deletes_parked_rows_only(real_store: Store) -> None:
    """Purged rows are gone for good; pending rows stay pending."""
    [keep, drop] = await parked_rows(real_store, 2)
    await add_outbox(real_store, outbox("pending"))

    assert await real_store.purge_parked_outbox([drop.id, drop.id]) == [drop.id]
    assert await parked_ids(real_store) == [keep.id]
    assert await real_store.retry_parked_outbox([drop.id]) == []
    counts = await real_store.counts()
    assert (counts["outbox_pending"], counts["outbox_parked"]) == (1, 1)


@pytest.mark.parametrize("n", [4, 5])
async def test_all_acts_on_every_parked_row_chunk_by_chunk(
    real_store: Store, n: int
) -> None:
    """--all with chunks of 2: every parked row, whether or not n divides evenly."""
    rows = await parked_rows(real_store, n)
    await add_outbox(real_store, outbox("pending"))  # leased to its writer
    ids = [r.id for r in rows]

    assert await real_store.retry_parked_outbox(None, chunk=2) == ids
    claimed = await real_store.claim_outbox(limit=100, lease_s=30)
    assert sorted(r.id for r in claimed) == ids
    await real_store.park_outbox(ids, reason=UNROUTABLE)

    assert await real_store.purge_parked_outbox(None, chunk=2) == ids
    assert await parked_ids(real_store) == []
    assert await real_store.purge_parked_outbox(None, chunk=2) == []
    assert [r.id for r in await real_store.claim_outbox(limit=10, lease_s=30)] == []
    assert (await real_store.counts())["outbox_pending"] == 1  # the writer's row


async def test_many_named_ids_go_chunk_by_chunk(real_store: Store) -> None:
    """Named ids beyond one chunk are all acted on, each once, ascending."""
    rows = await parked_rows(real_store, 5)
    ids = [r.id for r in rows]

    named = [ids[4], ids[0], ids[2], ids[0], ids[3]]
    assert await real_store.retry_parked_outbox(named, chunk=2) == sorted(
        {ids[0], ids[2], ids[3], ids[4]}
    )
    assert await parked_ids(real_store) == [ids[1]]


async def test_in_chunks_never_hands_a_statement_more_than_a_chunk() -> None:
    """The loop both stores share: pages and acts of at most *chunk* ids."""
    parked = list(range(1, 8))
    pages: list[tuple[int, int]] = []
    acts: list[list[int]] = []

    async def page(after: int, limit: int) -> list[int]:
        pages.append((after, limit))
        return [i for i in parked if i > after][:limit]

    async def act(ids: list[int]) -> list[int]:
        acts.append(ids)
        return [i for i in ids if i % 2]

    assert await in_chunks(None, chunk=3, page=page, act=act) == [1, 3, 5, 7]
    assert pages == [(0, 3), (3, 3), (6, 3)]
    assert acts == [[1, 2, 3], [4, 5, 6], [7]]

    acts.clear()
    assert await in_chunks([9, 2, 4, 2, 1], chunk=2, page=page, act=act) == [1, 9]
    assert acts == [[1, 2], [4, 9]]
