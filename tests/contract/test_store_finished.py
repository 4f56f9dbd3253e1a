"""Finished workflow instances on both stores: which go after their retention.

Every test runs against ``SqliteStore(":memory:")`` and against a
`PostgresStore` on a fresh database (the ``real_store`` fixture). Instances
are aged behind the store's back, on its own database; `prune_finished`
asks a small workflow whose state says whether it is done.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio.to_thread
import asyncpg
import msgspec
import pytest

from broker.retention import prune_finished
from broker.store import OutboxRecord, Store
from broker.store.sqlite import SqliteStore
from broker.workflow import Workflow
from tests.contract.test_store import batch_write, hold, saga

pytestmark = pytest.mark.anyio


class Done(msgspec.Struct, frozen=True):
    """An instance's state: over or not."""

    done: bool


class Finishing:
    """Enough of a workflow for `prune_finished`: a name, a state, ``finished``."""

    name = "ledger"
    state_type = Done

    def finished(self, state: Done) -> bool:
        """Whether the instance is over."""
        return state.done


class Keeping:
    """The same, without ``finished``: its instances are kept."""

    name = "ledger"
    state_type = Done


DONE = msgspec.json.encode(Done(done=True))
OPEN = msgspec.json.encode(Done(done=False))


def workflows(workflow: object) -> Mapping[str, Workflow[Any]]:
    return {"ledger": workflow}  # type: ignore[dict-item]  # a stand-in


async def age(store: Store, backend: str, days: int, *ids: str) -> None:
    """Move the ``updated_at`` of instances *ids* *days* into the past."""
    if isinstance(store, SqliteStore):
        for cid in ids:
            await anyio.to_thread.run_sync(
                store._conn.execute,
                "UPDATE saga SET updated_at = updated_at - ? WHERE correlation_id = ?",
                (days * 86_400.0, cid),
            )
        return
    conn = await asyncpg.connect(backend)
    try:
        await conn.execute(
            "UPDATE saga SET updated_at = updated_at - make_interval(days => $1) "
            "WHERE correlation_id = ANY($2)",
            days,
            list(ids),
        )
    finally:
        await conn.close()


async def kept(store: Store, *ids: str) -> set[str]:
    return {cid for cid in ids if await store.load_saga("ledger", cid) is not None}


async def test_finished_instances_idle_past_the_retention_are_deleted(
    real_store: Store, backend: str
) -> None:
    """Only the finished, idle, unheld instance nothing waits on goes.

    An open one stays however old; a finished one changed within the
    retention stays; a held one stays, and so does one with a timer still
    pending in the outbox, and one whose state this workflow cannot read.
    Pages of two make the walk take several pages.
    """
    states = {
        "done-old": DONE,
        "open-old": OPEN,
        "done-young": DONE,
        "held-old": DONE,
        "timer-old": DONE,
        "alien-old": b'{"stage":"v9"}',
        "done-old-2": DONE,
    }
    timer = OutboxRecord(
        message_id="t1",
        exchange="q2c.timers",
        routing_key="q2c.wf.ledger.0",
        body=b"{}",
        correlation_id="timer-old",
        delay_s=3600.0,
    )
    await real_store.commit_batch(
        batch_write(
            sagas=[saga(cid, 0, state) for cid, state in states.items()],
            holds=[hold("held-old", "b1")],
            outbox=[timer],
        )
    )
    old = [cid for cid in states if cid.endswith(("-old", "-old-2"))]
    await age(real_store, backend, 100, *old)

    deleted = await prune_finished(
        real_store, workflows(Finishing()), retention_days=90, page=2
    )

    assert deleted == {"ledger": 2}
    assert await kept(real_store, *states) == set(states) - {"done-old", "done-old-2"}


async def test_an_instance_changed_after_it_was_read_stays(
    real_store: Store, backend: str
) -> None:
    """The delete checks the version it read: a message in between wins."""
    await real_store.commit_batch(batch_write(sagas=[saga("c1", 0, DONE)]))
    await age(real_store, backend, 100, "c1")
    (read,) = await real_store.idle_sagas("ledger", idle_days=90, after=None, limit=10)
    await real_store.commit_batch(batch_write(sagas=[saga("c1", read.version, DONE)]))

    assert await real_store.delete_sagas("ledger", [("c1", read.version)]) == 0
    assert await kept(real_store, "c1") == {"c1"}


async def test_no_retention_or_no_finished_test_keeps_everything(
    real_store: Store, backend: str
) -> None:
    """Retention 0 is "keep for ever"; a workflow without ``finished`` keeps all."""
    await real_store.commit_batch(batch_write(sagas=[saga("c1", 0, DONE)]))
    await age(real_store, backend, 1000, "c1")

    assert (
        await prune_finished(real_store, workflows(Finishing()), retention_days=0) == {}
    )
    assert (
        await prune_finished(real_store, workflows(Keeping()), retention_days=90) == {}
    )
    assert await kept(real_store, "c1") == {"c1"}
