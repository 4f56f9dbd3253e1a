"""An operator's view of holds, on both stores: listing them and releasing one.

Every test runs against ``SqliteStore(":memory:")`` and against a
`PostgresStore` on a fresh database, like tests/contract/test_store.py,
whose row helpers it uses.
"""

from __future__ import annotations

import pytest

from broker.store import DeadLetterFilter, HoldRefused, Store
from tests.contract.test_store import batch_write, claim_n, dead_letter, held, hold

pytestmark = pytest.mark.anyio


async def test_holds_are_listed_with_their_held_count_and_blocker_status(
    real_store: Store,
) -> None:
    """Each hold shows its blocker, how much waits behind it, and the blocker's status.

    A blocker that is not a dead letter (it waits in a retry tier) has none.
    """
    await real_store.commit_batch(
        batch_write(
            dead_letters=[dead_letter("b1", correlation_id="c1")],
            holds=[hold("c1", "b1"), hold("c2", "r1")],
            held=[held("m2"), held("m3"), held("n1", "c2")],
        )
    )
    await real_store.commit_batch(
        batch_write(workflow="other", holds=[hold("c1", "x1")], held=[held("y1")])
    )

    rows = await real_store.list_holds()
    assert [
        (r.workflow, r.correlation_id, r.blocker, r.held, r.blocker_status)
        for r in rows
    ] == [
        ("ledger", "c1", "b1", 2, "parked"),
        ("ledger", "c2", "r1", 1, None),
        ("other", "c1", "x1", 1, None),
    ]
    assert all(r.since.tzinfo is not None and r.since <= r.updated_at for r in rows)
    assert rows[0].since <= rows[2].since
    assert [r.correlation_id for r in await real_store.list_holds("ledger")] == [
        "c1",
        "c2",
    ]
    assert await real_store.list_holds("nothing") == []
    assert len(await real_store.list_holds(limit=1)) == 1


async def test_releasing_a_lost_blocker_sends_the_first_held_message_back(
    real_store: Store,
) -> None:
    """The blocker's retry copy is gone: the first held message blocks now.

    It goes back to its queue with the released header, as after a purge,
    and the release is journalled; released again, the next one follows.
    """
    await real_store.commit_batch(
        batch_write(
            holds=[hold("c1", "r1")],
            held=[
                held("m2", headers={"x-source": "crm"}, type="order.placed"),
                held("m3"),
            ],
        )
    )

    assert await real_store.release_hold("ledger", "c1") == "m2"

    read = await real_store.prepare_batch("ledger", [], "ledger", ["c1"])
    assert read.holds == {"c1": "m2"}
    [row] = await claim_n(real_store, 1)
    assert (row.message_id, row.exchange, row.routing_key, row.body) == (
        "m2",
        "",
        "q2c.wf.ledger.0",
        b"body-m2",
    )
    assert row.headers == {"x-source": "crm", "x-q2c-released": 1}
    held_now = await real_store.held_messages("ledger", ["c1"], limit_each=10)
    assert [r.message_id for r in held_now] == ["m3"]
    [listed] = await real_store.list_holds()
    assert (listed.blocker, listed.held, listed.blocker_status) == ("m2", 1, "released")
    [entry] = await real_store.journal("c1")
    assert (entry.message_id, entry.stage, entry.type) == (
        "m2",
        "released",
        "order.placed",
    )
    assert entry.detail == (
        "an operator released the ledger hold of r1: "
        "sent back to its queue, it holds the rest now"
    )

    # m2 is lost in turn: a released (not parked) blocker may be released too.
    assert await real_store.release_hold("ledger", "c1") == "m3"
    assert [r.message_id for r in await claim_n(real_store, 1)] == ["m3"]
    assert (await real_store.counts())["held"] == 0


async def test_releasing_a_hold_with_nothing_held_frees_the_instance(
    real_store: Store,
) -> None:
    """Nothing waits behind the lost blocker: the hold is gone, nothing is sent."""
    await real_store.commit_batch(
        batch_write(holds=[hold("c1", "r1"), hold("c2", "r2")])
    )

    assert await real_store.release_hold("ledger", "c1") is None

    assert (await real_store.prepare_batch("ledger", [], "ledger", ["c1"])).holds == {}
    assert [r.correlation_id for r in await real_store.list_holds()] == ["c2"]
    assert await real_store.claim_outbox(limit=10, lease_s=30) == []
    [entry] = await real_store.journal("c1")
    assert (entry.message_id, entry.stage, entry.type) == ("r1", "released", None)
    assert entry.detail == (
        "an operator released the ledger hold of r1: nothing was held"
    )


async def test_release_is_refused_without_a_hold_or_behind_a_parked_blocker(
    real_store: Store,
) -> None:
    """No hold, or a parked dead letter as blocker: refused, and nothing changes.

    Once the parked blocker is replayed, its hold may be released.
    """
    with pytest.raises(HoldRefused, match="not held") as caught:
        await real_store.release_hold("ledger", "c1")
    assert caught.value.reason == "not_held"
    assert str(caught.value) == "instance 'c1' of workflow 'ledger' is not held"

    await real_store.commit_batch(
        batch_write(
            dead_letters=[dead_letter("b1", correlation_id="c1")],
            holds=[hold("c1", "b1")],
            held=[held("m2")],
        )
    )
    [b1] = await real_store.list_dead_letters(DeadLetterFilter(correlation_id="c1"))
    with pytest.raises(HoldRefused) as caught:
        await real_store.release_hold("ledger", "c1")
    assert caught.value.reason == "blocker_parked"
    assert str(caught.value) == (
        f"instance 'c1' of workflow 'ledger' waits on dead letter {b1.id} (b1), "
        "which is parked: replay or purge that dead letter instead"
    )
    with pytest.raises(HoldRefused, match="not held"):
        await real_store.release_hold("other", "c1")

    assert (await real_store.prepare_batch("ledger", [], "ledger", ["c1"])).holds == {
        "c1": "b1"
    }
    held_now = await real_store.held_messages("ledger", ["c1"], limit_each=10)
    assert [r.message_id for r in held_now] == ["m2"]
    assert await real_store.journal("c1") == []
    assert await real_store.claim_outbox(limit=10, lease_s=30) == []

    await real_store.replay_dead_letters(
        DeadLetterFilter(ids=(b1.id,)), max_replays=1, dry_run=False
    )
    assert await real_store.release_hold("ledger", "c1") == "m2"
