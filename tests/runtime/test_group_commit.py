"""GroupCommit: batches that arrive during a write are written together by the next."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import pytest

from actors.ledger import LedgerWorkflow
from broker.codec import encode_event
from broker.commit import GroupCommit, Item, Outcome
from broker.config import CoreConfig, TestingConfig
from broker.faults import CrashHook
from broker.metrics import Metrics
from broker.retry import RetryPolicy
from broker.store import BatchRead, BatchWrite, InboxKey, OutboxRow
from broker.store.rows import written_outbox
from broker.transport import Delivery
from canonical import Envelope, LedgerEntryPosted

pytestmark = pytest.mark.anyio


class GatedStore:
    """A store whose first commit waits for a gate; records every commit."""

    def __init__(self, *, fail_after_first: Exception | None = None) -> None:
        self.commits: list[BatchWrite] = []
        self.first_started = anyio.Event()
        self.gate = anyio.Event()
        self.fail_after_first = fail_after_first

    async def prepare_batch(
        self,
        consumer: str,
        keys: Sequence[InboxKey],
        workflow: str,
        correlation_ids: Sequence[str],
    ) -> BatchRead:
        """Nothing claimed, no instances."""
        return BatchRead(claimed=frozenset(), sagas={})

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Record the write; hold the first until the gate opens."""
        self.commits.append(write)
        if len(self.commits) == 1:
            self.first_started.set()
            await self.gate.wait()
        elif self.fail_after_first is not None:
            raise self.fail_after_first
        return written_outbox(range(len(write.outbox)), write.outbox)


def item(entry_id: str, account: str) -> Item:
    event = LedgerEntryPosted(account=account, entry_id=entry_id, amount=Decimal(1))
    env = Envelope(
        id=f"m-{entry_id}",
        source="/test",
        type="ledger.entry.posted",
        time=datetime(2026, 1, 1, tzinfo=UTC),
        correlation_id=account,
        idempotency_key=f"ledger:{entry_id}",
        data=encode_event(event),
    )
    return Item(Delivery(tag=1, body=b"{}"), env, event)


def group_commit(store: Any) -> GroupCommit:
    return GroupCommit(
        workflow=LedgerWorkflow(),
        store=store,
        core=CoreConfig(),
        retry=RetryPolicy((1.0,), max_attempts=3),
        metrics=Metrics(),
        crash=CrashHook(TestingConfig()),
    )


async def test_batches_waiting_during_a_write_are_written_together() -> None:
    """Three shards: the first writes alone; the two that waited share one write."""
    store = GatedStore()
    commit = group_commit(store)
    outcomes: dict[str, Outcome] = {}

    async def write(queue: str, entry_id: str, account: str) -> None:
        outcomes[queue] = await commit.write(queue, [item(entry_id, account)], [])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(write, "q.0", "e0", "a0")
            await store.first_started.wait()
            tg.start_soon(write, "q.1", "e1", "a1")
            tg.start_soon(write, "q.2", "e2", "a2")
            await anyio.wait_all_tasks_blocked()
            store.gate.set()

    assert [sorted(k.key for k in w.keys) for w in store.commits] == [
        ["ledger:e0"],
        ["ledger:e1", "ledger:e2"],
    ]
    assert [outcomes[q].group for q in ("q.0", "q.1", "q.2")] == [1, 2, 2]
    assert [outcomes[q].applied for q in ("q.0", "q.1", "q.2")] == [1, 1, 1]
    # The relay gets each write's rows once, from the shard that led it.
    assert sum(len(o.outbox) for o in outcomes.values()) == 3


async def test_a_failed_write_fails_every_batch_in_it() -> None:
    """A write that fails (not transiently) is raised to each shard it contained."""
    store = GatedStore(fail_after_first=RuntimeError("disk on fire"))
    commit = group_commit(store)
    errors: list[str] = []

    async def write(queue: str, entry_id: str) -> None:
        try:
            await commit.write(queue, [item(entry_id, "a")], [])
        except RuntimeError as exc:
            errors.append(f"{queue}: {exc}")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(write, "q.0", "e0")
            await store.first_started.wait()
            tg.start_soon(write, "q.1", "e1")
            tg.start_soon(write, "q.2", "e2")
            await anyio.wait_all_tasks_blocked()
            store.gate.set()

    assert len(store.commits) == 2  # q.1 and q.2 failed in one write
    assert sorted(errors) == ["q.1: disk on fire", "q.2: disk on fire"]
