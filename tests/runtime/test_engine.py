"""The batched core on the in-process transport and an on-disk SQLite store."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from actors.demo import entry_message
from actors.ledger import LedgerState
from broker import Daemon, load_config
from broker.config import Config
from broker.errors import SupervisorGaveUp
from broker.handler import DaemonControl
from broker.outbox import OutboxFeed
from broker.store import (
    BatchWrite,
    DeadLetterFilter,
    DeadLetterRecord,
    DeadLetterRow,
    SagaWrite,
)
from broker.store.sqlite import SqliteStore
from broker.transport import Delivery, OutgoingMessage, PublishOutcome
from canonical import Envelope, LedgerEntryApplied
from tests.polling import eventually

pytestmark = pytest.mark.anyio

OUT = "q2c.events.ledger-applied"


def config(tmp_path: Path, **overrides: str) -> Config:
    env = {
        "BROKER__SQLITE__PATH": str(tmp_path / "q2c.sqlite3"),
        "BROKER__MEMORY__JOURNAL": str(tmp_path / "queues.sqlite3"),
        "BROKER__CONTROL__SOCKET_PATH": str(tmp_path / "ctl" / "brokerd.sock"),
        "BROKER__TOPOLOGY__SHARDS": "2",
        "BROKER__TOPOLOGY__RETRY_TIERS_S": "[0.05, 0.1]",
        "BROKER__TOPOLOGY__EVENT_QUEUES": f'{{"{OUT}" = ["ledger.entry.applied"]}}',
        "BROKER__CORE__MAX_ATTEMPTS": "3",
        "BROKER__CORE__MAX_MESSAGE_BYTES": "4096",
        "BROKER__LOGGING__LEVEL": "warning",
        "BROKER__HTTP__PORT": "0",
        **overrides,
    }
    return load_config(environ=env)


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Daemon]:
    daemon = Daemon(cfg)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(20):
            await daemon.started.wait()
        try:
            yield daemon
        finally:
            daemon.request_shutdown("test finished")


async def publish(daemon: Daemon, messages: list[OutgoingMessage]) -> None:
    outcomes = await daemon.runtime.transport.publish(messages, timeout_s=5)
    assert set(outcomes) == {PublishOutcome.ACK}


async def collect(daemon: Daemon, queue: str, n: int) -> list[Delivery]:
    sub = await daemon.runtime.transport.subscribe(queue, prefetch=1000)
    got: list[Delivery] = []
    with anyio.fail_after(20):
        while len(got) < n:
            batch = await sub.batch(1000)
            got.extend(batch)
            sub.ack(batch[-1].tag, multiple=True)
    await sub.close()
    return got


async def balance(daemon: Daemon, account: str) -> LedgerState:
    rec = await daemon.runtime.store.load_saga("ledger", account)
    assert rec is not None
    return msgspec.json.decode(rec.state, type=LedgerState)


async def dead_letters(daemon: Daemon, n: int) -> list[DeadLetterRow]:
    async def enough() -> list[DeadLetterRow]:
        rows = await daemon.runtime.store.list_dead_letters(DeadLetterFilter())
        return rows if len(rows) >= n else []

    return await eventually(enough, timeout_s=20)


def counter(daemon: Daemon, name: str) -> Callable[[], Awaitable[int]]:
    async def read() -> int:
        return int(daemon.runtime.metrics.snapshot().get(name, 0))

    return read


async def test_each_entry_applies_once_and_duplicates_are_counted(
    tmp_path: Path,
) -> None:
    """Duplicates in and across batches collapse on the idempotency key."""
    entries = [entry_message(f"acct-{n % 3}", f"e{n}", Decimal(n)) for n in range(30)]
    async with running(config(tmp_path)) as daemon:
        await publish(daemon, entries + entries[:10])
        outputs = await collect(daemon, OUT, 30)
        await publish(daemon, entries[10:20])  # a later, separate duplicate batch
        read = counter(daemon, "messages_duplicate")
        await eventually(lambda: _at_least(read, 20))
        states = [await balance(daemon, f"acct-{k}") for k in range(3)]

    assert sorted(s.entries for s in states) == [10, 10, 10]
    assert sum(s.balance for s in states) == sum(range(30))
    ids = {msgspec.json.decode(o.body, type=Envelope).subject for o in outputs}
    assert ids == {f"e{n}" for n in range(30)}


async def test_outputs_carry_correlation_causation_and_a_derived_key(
    tmp_path: Path,
) -> None:
    """What a message causes shares its correlation id and names it as the cause."""
    msg = entry_message("acct-x", "e-1", Decimal("12.5"))
    async with running(config(tmp_path)) as daemon:
        await publish(daemon, [msg])
        (out,) = await collect(daemon, OUT, 1)

    env = msgspec.json.decode(out.body, type=Envelope)
    assert env.correlation_id == "acct-x" == out.correlation_id
    assert env.causation_id == msg.message_id
    assert env.idempotency_key == "ledger:e-1/ledger.entry.applied"
    assert out.message_id == env.id
    applied = msgspec.json.decode(env.data, type=LedgerEntryApplied)
    assert (applied.balance, applied.entries) == (Decimal("12.5"), 1)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{nope", "malformed"),
        (b'{"a":1,"a":2}', "malformed"),
        (b"x" * 5000, "oversize"),
    ],
)
async def test_bad_bytes_are_dead_lettered_with_original_bytes(
    tmp_path: Path, body: bytes, reason: str
) -> None:
    """Malformed and oversize deliveries become dead letters at once, bytes intact."""
    bad = OutgoingMessage(
        exchange="q2c.events",
        routing_key="ledger.entry.posted",
        body=body,
        message_id="bad-1",
        correlation_id="acct-1",
    )
    good = entry_message("acct-1", "e-good", Decimal(1))
    async with running(config(tmp_path)) as daemon:
        await publish(daemon, [bad, good])
        (row,) = await dead_letters(daemon, 1)
        dead = await collect(daemon, "q2c.dead", 1)
        state = await balance(daemon, "acct-1")

    assert (row.reason, row.body, row.attempts) == (reason, body, 1)
    assert dead[0].body == body
    assert dead[0].headers is not None
    assert dead[0].headers["x-q2c-reason"] == reason
    assert state.entries == 1  # the good message next to it was applied


async def test_unknown_type_and_schema_invalid_are_told_apart(tmp_path: Path) -> None:
    """A type nobody handles and data that breaks the schema get their own reasons."""
    good = entry_message("acct-1", "e-1", Decimal(1))
    unknown = msgspec.structs.replace(
        good,
        body=good.body.replace(
            b'"type":"ledger.entry.posted"', b'"type":"ledger.x.v9"', 1
        ),
        message_id="m-unknown",
    )
    invalid = msgspec.structs.replace(
        good,
        body=good.body.replace(b'"amount":"1"', b'"amount":"abc"'),
        message_id="m-bad",
    )
    async with running(config(tmp_path)) as daemon:
        await publish(daemon, [unknown, invalid])
        rows = await dead_letters(daemon, 2)

    reasons = {r.message_id: r.reason for r in rows}
    assert reasons == {"m-unknown": "unknown_type", "m-bad": "schema_invalid"}


async def test_a_poison_message_is_retried_through_the_tiers_then_dead_lettered(
    tmp_path: Path,
) -> None:
    """A failing apply goes through each retry tier, then dead-letters; others pass."""
    cfg = config(tmp_path, BROKER__DAEMON__TREE="tests.runtime.trees:build_poison_tree")
    poison = entry_message("acct-p", "e-poison", Decimal(5), memo="POISON")
    fine = entry_message("acct-p", "e-fine", Decimal(7))
    async with running(cfg) as daemon:
        await publish(daemon, [poison, fine])
        (row,) = await dead_letters(daemon, 1)
        state = await balance(daemon, "acct-p")
        journal = await daemon.runtime.store.journal("acct-p")

    assert row.reason == "attempts_exhausted"
    assert row.attempts == 3
    assert row.body == poison.body
    assert (state.entries, state.balance) == (1, Decimal(7))
    stages = [j.stage for j in journal if j.message_id == poison.message_id]
    assert stages == ["retry_scheduled", "retry_scheduled", "dead_lettered"]


async def test_a_workflow_that_waits_spends_time_not_attempts(tmp_path: Path) -> None:
    """RetryLater from apply: retried past max-attempts, until unavailable-max-s.

    What it waits for (reference data, a key another daemon holds) says
    nothing of the message; used up in attempts, a slow start of the ERP
    would have dead-lettered every quote that came in meanwhile.
    """
    cfg = config(
        tmp_path,
        BROKER__DAEMON__TREE="tests.runtime.trees:build_poison_tree",
        BROKER__CORE__UNAVAILABLE_MAX_S="1",
    )
    waiting = entry_message("acct-w", "e-wait", Decimal(5), memo="WAIT")
    async with running(cfg) as daemon:
        await publish(daemon, [waiting])
        (row,) = await dead_letters(daemon, 1)
        journal = await daemon.runtime.store.journal("acct-w")

    assert (row.reason, row.body) == ("unavailable_too_long", waiting.body)
    assert "reference data" in row.detail
    stages = [j.stage for j in journal if j.message_id == waiting.message_id]
    assert stages[-1] == "dead_lettered"
    assert stages.count("retry_scheduled") > 3  # max-attempts is 3


async def test_a_permanent_rejection_dead_letters_without_retry(tmp_path: Path) -> None:
    """PermanentError from apply dead-letters on the first attempt."""
    cfg = config(tmp_path, BROKER__DAEMON__TREE="tests.runtime.trees:build_poison_tree")
    msg = entry_message("acct-r", "e-r", Decimal(5), memo="REJECT")
    async with running(cfg) as daemon:
        await publish(daemon, [msg])
        (row,) = await dead_letters(daemon, 1)

    assert (row.reason, row.attempts) == ("rejected", 1)


async def test_replayed_dead_letter_is_applied_once(tmp_path: Path) -> None:
    """A dead letter replayed after a fix applies once; a second replay is refused."""
    cfg = config(tmp_path, BROKER__DAEMON__TREE="tests.runtime.trees:build_poison_tree")
    rejected = entry_message("acct-d", "e-d", Decimal(3), memo="REJECT")
    async with running(cfg) as daemon:
        await publish(daemon, [rejected])
        await dead_letters(daemon, 1)
    # The fix: a daemon whose workflow accepts the entry (the plain ledger).
    async with running(config(tmp_path)) as daemon:
        store = daemon.runtime.store
        replayed = await store.replay_dead_letters(
            DeadLetterFilter(reason="rejected"), max_replays=1, dry_run=False
        )
        assert len(replayed) == 1
        await eventually(lambda: store.load_saga("ledger", "acct-d"))
        again = await store.replay_dead_letters(
            DeadLetterFilter(reason="rejected", status=None),
            max_replays=1,
            dry_run=False,
        )
        state = await balance(daemon, "acct-d")

    assert again == []
    assert (state.entries, state.balance) == (1, Decimal(3))


async def test_replay_sends_back_only_what_a_queue_takes(tmp_path: Path) -> None:
    """A webhook's payload has no queue to go back to: named, kept parked.

    Sent back, it could only be parked unroutable in the outbox, and the
    letter, marked replayed, would be pruned with its bytes.
    """
    cfg = config(tmp_path, BROKER__DAEMON__TREE="tests.runtime.trees:build_poison_tree")
    rejected = entry_message("acct-q", "e-q", Decimal(2), memo="REJECT")
    async with running(cfg) as daemon:
        await publish(daemon, [rejected])
        (letter,) = await dead_letters(daemon, 1)
    async with running(config(tmp_path)) as daemon:
        store = daemon.runtime.store
        webhook = DeadLetterRecord(
            message_id="webhook:crm:sha256:00",
            queue="/webhooks/crm",
            routing_key="",
            reason="schema_invalid",
            detail="not a change event",
            body=b"{}",
        )
        await store.commit_batch(
            BatchWrite(consumer="http", workflow="", dead_letters=[webhook])
        )
        control = DaemonControl(daemon)
        first = await control.dlq_replay(
            DeadLetterFilter(), dry_run=False, max_replays=1
        )
        again = await control.dlq_replay(
            DeadLetterFilter(status=None), dry_run=False, max_replays=1
        )
        kept = await store.list_dead_letters(DeadLetterFilter(queue="/webhooks/crm"))

    [webhook_id] = [s["id"] for s in first["skipped"]]
    assert first == {
        "replayed": [letter.id],
        "skipped": [{"id": webhook_id, "reason": "no_queue"}],
        "matched": 2,
    }
    assert sorted(again["skipped"], key=lambda s: s["id"]) == [
        {"id": letter.id, "reason": "not_parked"},
        {"id": webhook_id, "reason": "no_queue"},
    ]
    assert again["replayed"] == []
    assert [(r.id, r.status) for r in kept] == [(webhook_id, "parked")]


async def test_drain_commits_every_delivery_it_took(tmp_path: Path) -> None:
    """Shutdown mid-stream: every delivery a shard took is committed before exit."""
    entries = [entry_message("acct-z", f"e{n}", Decimal(1)) for n in range(2000)]
    cfg = config(tmp_path, BROKER__CORE__BATCH_MAX="50")
    async with running(cfg) as daemon:
        await publish(daemon, entries)
        await eventually(counter(daemon, "messages_received"), interval_s=0.001)
    counters = daemon.runtime.metrics.snapshot()
    async with running(cfg) as again:
        rec = await again.runtime.store.load_saga("ledger", "acct-z")

    assert rec is not None
    state = msgspec.json.decode(rec.state, type=LedgerState)
    assert counters["messages_received"] == counters["messages_applied"]
    assert state.entries == counters["messages_applied"] == state.balance


async def _at_least(read: Callable[[], Awaitable[int]], n: int) -> bool:
    return await read() >= n


async def test_a_shard_waiting_on_a_dead_relay_is_stopped_at_its_deadline(
    tmp_path: Path,
) -> None:
    """The relay crashes while the hand-over to it is full: the tree still stops.

    The shards wait for room in the feed (back-pressure) after their commit.
    That wait must give way to a stop's deadline, or the root, stopping the
    application to restart the relay, would wait for them forever. Here the
    relay fails on every publish, so the root gives up, as OTP would, and
    the daemon ends instead of hanging.
    """
    cfg = config(
        tmp_path,
        BROKER__TOPOLOGY__SHARDS="1",
        BROKER__CORE__BATCH_MAX="1",
        BROKER__CORE__RELAY_WORKERS="1",
        BROKER__DAEMON__SHUTDOWN_S="1",
        BROKER__HTTP__ENABLED="false",
    )
    daemon = Daemon(cfg)
    daemon.runtime.feed.close()
    daemon.runtime.feed = OutboxFeed(max_batches=2)  # full after two batches
    crash, ended = anyio.Event(), anyio.Event()
    gave_up: list[SupervisorGaveUp] = []

    async def run() -> None:
        try:
            await daemon.run()
        except SupervisorGaveUp as exc:
            gave_up.append(exc)
        finally:
            ended.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        with anyio.fail_after(20):
            await daemon.started.wait()
        transport = daemon.runtime.transport
        publish_for_real = transport.publish

        async def failing(messages: object, *, timeout_s: float) -> object:
            await crash.wait()
            raise RuntimeError("a relay bug")

        transport.publish = failing  # type: ignore[method-assign,assignment]
        entries = [entry_message("a", f"e{n}", Decimal(n)) for n in range(10)]
        assert set(await publish_for_real(entries, timeout_s=5)) == {PublishOutcome.ACK}

        async def feed_full() -> bool:
            return daemon.runtime.feed.fill == 2

        await eventually(feed_full)
        crash.set()
        with anyio.fail_after(60):
            await ended.wait()
    assert "relay" in str(gave_up[0])


async def test_the_control_socket_cannot_be_restarted_through_itself(
    tmp_path: Path,
) -> None:
    """Refused with the reason, the control actor untouched; others still restart."""
    async with running(config(tmp_path)) as daemon:
        control = DaemonControl(daemon)
        with pytest.raises(ValueError, match="control socket"):
            await control.restart("control")
        assert await control.restart("relay") == {"restarted": "relay"}
        children = {c["id"]: c for c in daemon.system.tree()["children"]}
        assert children["control"]["state"] == "running"
        assert children["relay"]["state"] == "running"


async def test_an_undecodable_stored_state_fails_its_instance_not_the_batch(
    tmp_path: Path,
) -> None:
    """One account's state no longer decodes: its entry is dead-lettered, no crash.

    The other account's entries, written in the same batches, apply; nothing
    restarts.
    """
    cfg = config(tmp_path)
    async with running(cfg) as daemon:
        await publish(
            daemon,
            [
                entry_message("acct-x", "x1", Decimal(1)),
                entry_message("acct-y", "y1", Decimal(1)),
            ],
        )
        await eventually(lambda: _entries(daemon, "acct-y", 1))
        await eventually(lambda: _entries(daemon, "acct-x", 1))

        def corrupt() -> None:
            with sqlite3.connect(cfg.sqlite.path, timeout=5) as conn:
                conn.execute(
                    "UPDATE saga SET state = ? WHERE correlation_id = 'acct-x'",
                    (b'{"balance": "twelve"}',),
                )

        await anyio.to_thread.run_sync(corrupt)
        await publish(
            daemon,
            [
                entry_message("acct-x", "x2", Decimal(1)),
                entry_message("acct-y", "y2", Decimal(1)),
            ],
        )
        (row,) = await dead_letters(daemon, 1)
        await eventually(lambda: _entries(daemon, "acct-y", 2))
        tree = await DaemonControl(daemon).actors()

    assert (row.message_id, row.reason, row.attempts) == (
        "demo-x2",
        "state_undecodable",
        1,
    )
    assert "does not decode" in row.detail
    assert _restarts(tree) == 0


def _restarts(node: dict[str, Any]) -> int:
    """Restarts anywhere in a supervision tree (``brokerctl actors``)."""
    return int(node.get("restarts", 0)) + sum(
        _restarts(child) for child in node.get("children", ())
    )


async def _entries(daemon: Daemon, account: str, n: int) -> bool:
    rec = await daemon.runtime.store.load_saga("ledger", account)
    return (
        rec is not None
        and msgspec.json.decode(rec.state, type=LedgerState).entries == n
    )


async def test_a_failing_prune_is_logged_and_restarts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Housekeeping that fails for a reason nobody foresaw stays housekeeping."""
    calls = 0

    async def broken_prune(self: SqliteStore, **_: object) -> dict[str, int]:
        nonlocal calls
        calls += 1
        raise RuntimeError("a view depends on this partition")

    monkeypatch.setattr(SqliteStore, "prune", broken_prune)
    with capture_logs() as logs:
        async with running(config(tmp_path)) as daemon:

            async def failed() -> bool:
                return any(line["event"] == "store_prune_failed" for line in logs)

            await eventually(failed)
            await publish(daemon, [entry_message("acct-p", "p1", Decimal(1))])
            await eventually(lambda: _entries(daemon, "acct-p", 1))
            tree = await DaemonControl(daemon).actors()

    assert calls == 1
    assert _restarts(tree) == 0
    (line,) = [line for line in logs if line["event"] == "store_prune_failed"]
    assert line["log_level"] == "error"


async def test_the_maintenance_deletes_finished_instances_past_their_retention(
    tmp_path: Path,
) -> None:
    """At start, then hourly: closed accounts idle for the retention go.

    An account closed long ago goes; one still open stays however old, and
    one closed yesterday stays.
    """
    states = {
        "acct-closed": LedgerState(balance=Decimal(3), entries=2),
        "acct-open": LedgerState(balance=Decimal(1), entries=1),
        "acct-recent": LedgerState(balance=Decimal(5), entries=2),
    }
    store = await SqliteStore.open(str(tmp_path / "q2c.sqlite3"))
    try:
        await store.commit_batch(
            BatchWrite(
                consumer="ledger",
                workflow="ledger",
                sagas=[
                    SagaWrite(
                        correlation_id=cid,
                        expected_version=0,
                        state=msgspec.json.encode(state),
                    )
                    for cid, state in states.items()
                ],
            )
        )
    finally:
        await store.aclose()
    with sqlite3.connect(tmp_path / "q2c.sqlite3") as db:
        db.execute(
            "UPDATE saga SET updated_at = updated_at - ? WHERE correlation_id != ?",
            (30 * 86_400.0, "acct-recent"),
        )
        db.execute(
            "UPDATE saga SET updated_at = updated_at - ? WHERE correlation_id = ?",
            (86_400.0, "acct-recent"),
        )
    cfg = config(
        tmp_path,
        BROKER__DAEMON__TREE="tests.runtime.trees:build_closing_tree",
        BROKER__CORE__FINISHED_RETENTION_DAYS="7",
    )
    with capture_logs() as logs:
        async with running(cfg) as daemon:

            async def pruned() -> bool:
                return (
                    await daemon.runtime.store.load_saga("ledger", "acct-closed")
                    is None
                )

            await eventually(pruned)
            kept = {
                cid
                for cid in states
                if await daemon.runtime.store.load_saga("ledger", cid) is not None
            }

    assert kept == {"acct-open", "acct-recent"}
    (line,) = [e for e in logs if e["event"] == "finished_instances_pruned"]
    assert line["ledger"] == 1
