"""GroupCommit: batches that arrive during a write are written together by the next."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import anyio
import msgspec
import pytest

from actors.demo import entry_message
from actors.ledger import LedgerWorkflow
from broker.codec import decode_envelope, encode_event
from broker.commit import (
    ATTEMPT_HEADER,
    RELEASED_HEADER,
    GroupCommit,
    Item,
    Outcome,
    ShardBatch,
    message_id_for,
)
from broker.config import CoreConfig, TestingConfig
from broker.errors import StoreUnavailable
from broker.faults import CrashHook
from broker.metrics import Metrics
from broker.retry import RetryPolicy
from broker.store import (
    BatchRead,
    BatchWrite,
    DeadLetterFilter,
    DeadLetterRow,
    InboxKey,
    OutboxRow,
    Store,
)
from broker.store.rows import written_outbox
from broker.transport import Delivery
from canonical import Envelope, LedgerEntryPosted
from tests.runtime.trees import OrderedLedger, OrderedState, TimerLedger

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


def group_commit(store: Any, *, writers: int = 1) -> GroupCommit:
    return GroupCommit(
        workflow=LedgerWorkflow(),
        store=store,
        core=CoreConfig(commit_writers=writers),
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


async def test_a_second_writer_does_not_wait_for_the_first() -> None:
    """Two writers: a batch arriving during a write is written beside it, not after."""
    store = GatedStore()
    commit = group_commit(store, writers=2)
    finished: list[str] = []

    async def write(queue: str, entry_id: str, account: str) -> None:
        await commit.write(queue, [item(entry_id, account)], [])
        finished.append(queue)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(write, "q.0", "e0", "a0")
            await store.first_started.wait()
            tg.start_soon(write, "q.1", "e1", "a1")
            await anyio.wait_all_tasks_blocked()
            assert finished == ["q.1"]  # the first write is still held at its gate
            tg.start_soon(write, "q.2", "e2", "a2")
            await anyio.wait_all_tasks_blocked()
            assert finished == ["q.1", "q.2"]
            store.gate.set()

    assert finished == ["q.1", "q.2", "q.0"]
    assert [sorted(k.key for k in w.keys) for w in store.commits] == [
        ["ledger:e0"],
        ["ledger:e1"],
        ["ledger:e2"],
    ]


async def test_batches_taken_by_a_cancelled_writer_are_written_by_the_next() -> None:
    """A cancelled writer hands the other shards' batches back; none is lost."""
    store = GatedStore()
    commit = group_commit(store)
    outcomes: dict[str, Outcome] = {}
    leader = anyio.CancelScope()

    async def write(queue: str, entry_id: str) -> None:
        outcomes[queue] = await commit.write(queue, [item(entry_id, "a")], [])

    async def lead() -> None:
        with leader:
            await write("q.0", "e0")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            # Started together, q.0 and q.1 meet in one write, led by q.0 and
            # held at the gate; q.0's shard is then stopped.
            tg.start_soon(lead)
            tg.start_soon(write, "q.1", "e1")
            await store.first_started.wait()
            await anyio.wait_all_tasks_blocked()
            assert sorted(k.key for k in store.commits[0].keys) == [
                "ledger:e0",
                "ledger:e1",
            ]
            leader.cancel()

    assert leader.cancelled_caught
    assert "q.0" not in outcomes
    assert [sorted(k.key for k in w.keys) for w in store.commits[1:]] == [["ledger:e1"]]
    assert outcomes["q.1"].applied == 1


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


async def test_a_written_batch_is_freed_without_the_cycle_collector() -> None:
    """Once written, a batch, its items and deliveries go by reference counting.

    The cycle collector's full passes stall the event loop for as long as
    they take; batches left in reference cycles would make them long and
    frequent under load.
    """
    store = GatedStore()
    store.gate.set()
    commit = group_commit(store)

    def live_batches() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, ShardBatch))

    gc.collect()
    gc.disable()
    try:
        before = live_batches()
        with anyio.fail_after(5):
            for n in range(3):
                await commit.write("q.0", [item(f"e{n}", "a"), item(f"f{n}", "b")], [])
        assert live_batches() == before
    finally:
        gc.enable()


# --- holds, delays and round trips, on a real store ----------------------------------


class CountingStore:
    """Counts the calls that cost a round trip; can fail or disturb one commit."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.calls: list[str] = []
        self.before_commit: list[Callable[[], Awaitable[None]]] = []

    def take(self) -> list[str]:
        """The calls since the last take."""
        calls, self.calls = self.calls, []
        return calls

    async def prepare_batch(
        self,
        consumer: str,
        keys: Sequence[InboxKey],
        workflow: str,
        correlation_ids: Sequence[str],
    ) -> BatchRead:
        """Count, then read."""
        self.calls.append("prepare")
        return await self.inner.prepare_batch(consumer, keys, workflow, correlation_ids)

    async def held_messages(
        self, workflow: str, correlation_ids: Sequence[str], *, limit_each: int
    ) -> list[DeadLetterRow]:
        """Count, then read."""
        self.calls.append("held")
        return await self.inner.held_messages(
            workflow, correlation_ids, limit_each=limit_each
        )

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Count, run the next disturbance if any, then write."""
        self.calls.append("commit")
        if self.before_commit:
            await self.before_commit.pop(0)()
        return await self.inner.commit_batch(write)


def delivered(
    account: str,
    entry_id: str,
    memo: str = "",
    *,
    attempt: int = 1,
    message_id: str | None = None,
) -> Item:
    """The delivery of one ledger entry as a shard hands it over, decoded.

    With *message_id*, a producer's re-send of the same fact under a new id.
    """
    msg = entry_message(account, entry_id, Decimal(1), memo=memo)
    body = msg.body
    if message_id is not None:
        old, new = f'"id":"{msg.message_id}"', f'"id":"{message_id}"'
        body = body.replace(old.encode(), new.encode())
    d = Delivery(
        tag=1,
        body=body,
        routing_key=msg.routing_key,
        message_id=message_id or msg.message_id,
        correlation_id=msg.correlation_id,
        type=msg.type,
        headers={ATTEMPT_HEADER: attempt} if attempt > 1 else None,
    )
    env = decode_envelope(d.body, max_bytes=1 << 20)
    return Item(d, env, msgspec.json.decode(env.data, type=LedgerEntryPosted))


def ordered_commit(
    store: Any, workflow: Any = None, *, batch_max: int = 1000
) -> GroupCommit:
    return GroupCommit(
        workflow=workflow if workflow is not None else OrderedLedger(),
        store=store,
        core=CoreConfig(batch_max=batch_max),
        retry=RetryPolicy((1.0,), max_attempts=5),
        metrics=Metrics(),
        crash=CrashHook(TestingConfig()),
    )


async def applied_order(store: Store, account: str) -> tuple[str, ...]:
    rec = await store.load_saga("ordered", account)
    return (
        () if rec is None else msgspec.json.decode(rec.state, type=OrderedState).order
    )


async def held_ids(store: Store, account: str) -> list[str]:
    rows = await store.held_messages("ordered", [account], limit_each=100)
    return [r.message_id for r in rows]


QUEUE = "q2c.wf.ordered.0"


async def test_holds_cost_no_round_trip_until_a_blocker_comes_back(
    real_store: Store,
) -> None:
    """A write is one read and one write, holding or not; a release reads two more."""
    store = CountingStore(real_store)
    commit = ordered_commit(store)

    plain = await commit.write(QUEUE, [delivered("acct-a", "a0")], [])
    assert store.take() == ["prepare", "commit"]
    parked = await commit.write(
        QUEUE, [delivered("acct-a", "a1", "FLAKY"), delivered("acct-a", "a2")], []
    )
    assert store.take() == ["prepare", "commit"]
    back = await commit.write(QUEUE, [delivered("acct-a", "a1", attempt=2)], [])
    assert store.take() == ["prepare", "held", "prepare", "commit"]

    assert (plain.applied, parked.retried, parked.held) == (1, 1, 1)
    assert (back.applied, back.released) == (2, 1)
    assert await applied_order(real_store, "acct-a") == ("a0", "a1", "a2")


async def test_redelivery_after_a_commit_applies_nothing_twice(
    real_store: Store,
) -> None:
    """A batch redelivered after its commit (kill before ack) changes nothing twice.

    Held messages redelivered keep their place; the blocker's redelivered
    copy releases them; its retry copy arriving later is a duplicate.
    """
    commit = ordered_commit(real_store)
    batch = ["a1:FLAKY", "a2", "a3"]

    def deliveries() -> list[Item]:
        return [delivered("acct-a", *spec.split(":")) for spec in batch]

    first = await commit.write(QUEUE, deliveries(), [])
    again = await commit.write(QUEUE, deliveries()[1:], [])  # a1's copy is elsewhere
    held = await held_ids(real_store, "acct-a")
    later = await commit.write(QUEUE, [*deliveries(), delivered("acct-a", "a4")], [])
    retry = await commit.write(QUEUE, [delivered("acct-a", "a1", attempt=2)], [])

    assert (first.retried, first.held) == (1, 2)
    assert (again.held, held) == (2, ["demo-a2", "demo-a3"])
    assert (later.applied, later.released, later.duplicates) == (4, 2, 2)
    assert retry.duplicates == 1
    assert await applied_order(real_store, "acct-a") == ("a1", "a2", "a3", "a4")
    counts = await real_store.counts()
    assert (counts["held"], counts["holds"]) == (0, 0)


async def test_a_re_sent_held_message_applies_once_in_its_first_place(
    real_store: Store,
) -> None:
    """A producer re-sends a held fact under a new id: the held one applies, once."""
    commit = ordered_commit(real_store)
    await commit.write(
        QUEUE,
        [
            delivered("acct-a", "a1", "FLAKY"),
            delivered("acct-a", "a2"),
            delivered("acct-a", "a3"),
        ],
        [],
    )
    copy = delivered("acct-a", "a2", message_id="resend-a2")
    assert copy.envelope.id == "resend-a2"
    outcome = await commit.write(
        QUEUE, [copy, delivered("acct-a", "a1", attempt=2)], []
    )

    assert (outcome.applied, outcome.duplicates, outcome.held) == (3, 1, 0)
    assert await applied_order(real_store, "acct-a") == ("a1", "a2", "a3")
    assert (await real_store.counts())["held"] == 0


async def test_a_failed_commit_is_retried_and_applies_once(real_store: Store) -> None:
    """The store fails the release's commit (a crash mid-transaction): retried, once."""
    store = CountingStore(real_store)
    commit = ordered_commit(store)
    await commit.write(
        QUEUE, [delivered("acct-a", "a1", "FLAKY"), delivered("acct-a", "a2")], []
    )

    async def outage() -> None:
        raise StoreUnavailable("connection lost")

    store.before_commit.append(outage)
    back = await commit.write(QUEUE, [delivered("acct-a", "a1", attempt=2)], [])

    assert back.applied == 2
    assert await applied_order(real_store, "acct-a") == ("a1", "a2")
    assert (await real_store.counts())["held"] == 0


async def test_a_hold_moved_by_an_operator_meanwhile_is_read_again(
    real_store: Store,
) -> None:
    """A purge that hands the hold on between read and write: conflict, re-read.

    The replayed blocker, no longer the blocker, waits behind the message
    the hold was handed to; nothing is applied out of order.
    """
    store = CountingStore(real_store)
    commit = ordered_commit(store)
    await commit.write(
        QUEUE,
        [delivered("acct-a", "a1", "REJECT"), delivered("acct-a", "a2")],
        [],
    )
    store.take()

    async def purge() -> None:
        await real_store.purge_dead_letters(
            DeadLetterFilter(reason="rejected"), dry_run=False
        )

    store.before_commit.append(purge)
    outcome = await commit.write(QUEUE, [delivered("acct-a", "a1")], [])

    assert store.take() == ["prepare", "held", "prepare", "commit", "prepare", "commit"]
    assert (outcome.applied, outcome.held) == (0, 1)
    assert await applied_order(real_store, "acct-a") == ()
    read = await real_store.prepare_batch("ordered", [], "ordered", ["acct-a"])
    assert read.holds == {"acct-a": "demo-a2"}
    assert await held_ids(real_store, "acct-a") == ["demo-a1"]


async def test_a_long_hold_is_released_a_write_at_a_time(real_store: Store) -> None:
    """More held than a batch: the rest waits behind the next, sent back in order."""
    commit = ordered_commit(real_store, batch_max=2)
    await commit.write(
        QUEUE,
        [delivered("acct-a", "a1", "FLAKY")]
        + [delivered("acct-a", f"a{n}") for n in (2, 3, 4)],
        [],
    )
    back = await commit.write(
        QUEUE, [delivered("acct-a", "a1", attempt=2), delivered("acct-a", "a5")], []
    )
    read = await real_store.prepare_batch("ordered", [], "ordered", ["acct-a"])
    middle = await applied_order(real_store, "acct-a")
    [sent_back] = [r for r in back.outbox if r.exchange == ""]
    last = await commit.write(QUEUE, [delivered("acct-a", "a4")], [])

    assert middle == ("a1", "a2", "a3")
    assert read.holds == {"acct-a": "demo-a4"}
    assert (sent_back.message_id, sent_back.routing_key) == ("demo-a4", QUEUE)
    assert sent_back.headers[RELEASED_HEADER] == 1
    assert (back.held, last.applied) == (1, 2)
    assert await applied_order(real_store, "acct-a") == ("a1", "a2", "a3", "a4", "a5")


async def test_delayed_emits_are_not_handed_to_the_relay(real_store: Store) -> None:
    """Only undelayed rows go the fast path; the delayed one waits in the outbox."""
    commit = ordered_commit(real_store, TimerLedger())
    later = delivered("acct-t", "t1", "DELAY=60")
    now = delivered("acct-t", "t2")
    outcome = await commit.write(QUEUE, [later, now], [])

    assert [r.message_id for r in outcome.outbox] == [
        message_id_for("ledger:t2/ledger.entry.applied")
    ]
    assert (await real_store.counts())["outbox_pending"] == 2
