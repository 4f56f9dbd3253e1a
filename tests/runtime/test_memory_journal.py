"""The embedded mode's queues survive the process: `MemoryTransport.open`'s journal.

The crash tests kill a child process (`tests.runtime.journal_child`) by pid
with SIGKILL while it holds deliveries, then open the same journal here.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from broker.config import TopologyConfig
from broker.errors import ConfigError, StoreUnavailable
from broker.transport import Delivery, PublishOutcome
from broker.transport import journal as journal_module
from broker.transport.memory import MemorySubscription, MemoryTransport
from broker.transport.topology import DEAD_QUEUE, build_topology, retry_exchange
from tests.runtime.journal_child import ERP, TOPOLOGY, to_erp

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
ACK = PublishOutcome.ACK


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


@pytest.fixture
def journal(tmp_path: Path) -> str:
    return str(tmp_path / "queues.sqlite3")


async def take(sub: MemorySubscription, n: int) -> list[Delivery]:
    """Exactly *n* deliveries, or fail within five seconds."""
    got: list[Delivery] = []
    with anyio.fail_after(5):
        while len(got) < n:
            got += await sub.batch(n - len(got))
    return got


@pytest.fixture
def killed() -> Iterator[list[subprocess.Popen[str]]]:
    """Children to kill by pid if a test fails before it kills them itself."""
    children: list[subprocess.Popen[str]] = []
    yield children
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()


def run_and_kill(
    children: list[subprocess.Popen[str]],
    journal: str,
    *,
    publish: int = 0,
    take: int = 1,
    ack: int = 0,
) -> None:
    """Run the child until it holds its deliveries, then SIGKILL it by pid."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.runtime.journal_child", journal]
        + [str(n) for n in (publish, take, ack)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    children.append(child)
    assert child.stdout is not None
    said = []
    deadline = threading.Timer(30, child.kill)  # a stuck child ends the read
    deadline.start()
    try:
        for line in child.stdout:
            said.append(line)
            if line == "holding\n":
                break
    finally:
        deadline.cancel()
    assert said[-1:] == ["holding\n"], f"child said {said!r}, exit {child.poll()}"
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=10) == -signal.SIGKILL
    child.stdout.close()


async def test_what_is_queued_at_close_is_delivered_after_open(journal: str) -> None:
    """Every property comes back, in order, not marked redelivered."""
    first = await MemoryTransport.open(TOPOLOGY, journal=journal)
    sent = [to_erp(n) for n in range(3)]
    assert await first.publish(sent, timeout_s=1) == [ACK] * 3
    await first.aclose()

    second = await MemoryTransport.open(TOPOLOGY, journal=journal)
    got = await take(await second.subscribe(ERP, prefetch=10), 3)
    await second.aclose()

    assert [
        (d.body, d.message_id, d.correlation_id, d.type, d.routing_key, d.headers)
        for d in got
    ] == [
        (m.body, m.message_id, m.correlation_id, m.type, ERP, m.headers) for m in sent
    ]
    assert not any(d.redelivered for d in got)


async def test_acknowledged_messages_do_not_come_back(journal: str) -> None:
    first = await MemoryTransport.open(TOPOLOGY, journal=journal)
    await first.publish([to_erp(n) for n in range(4)], timeout_s=1)
    sub = await first.subscribe(ERP, prefetch=10)
    got = await take(sub, 4)
    sub.ack(got[1].tag, multiple=True)
    await first.aclose()

    second = await MemoryTransport.open(TOPOLOGY, journal=journal)
    again = await take(await second.subscribe(ERP, prefetch=10), 2)
    await second.aclose()

    assert [d.message_id for d in again] == ["m-2", "m-3"]
    assert all(d.redelivered for d in again)
    assert [d.headers and d.headers["x-delivery-count"] for d in again] == [1, 1]


async def test_a_killed_process_redelivers_what_it_held(
    journal: str, killed: list[subprocess.Popen[str]]
) -> None:
    """Acked: gone. Held unacked: redelivered first, counted. The rest: as sent."""
    # The child takes m-0 and m-1 and acks m-0; with prefetch 2 it holds
    # m-1 and m-2 when it dies; m-3 and m-4 were never delivered.
    run_and_kill(killed, journal, publish=5, take=2, ack=1)

    transport = await MemoryTransport.open(TOPOLOGY, journal=journal)
    got = await take(await transport.subscribe(ERP, prefetch=10), 4)
    assert transport.queue_depth(ERP) == 4
    await transport.aclose()

    assert [(d.message_id, d.redelivered) for d in got] == [
        ("m-1", True),
        ("m-2", True),
        ("m-3", False),
        ("m-4", False),
    ]
    assert [d.headers and d.headers.get("x-delivery-count") for d in got] == [
        1,
        1,
        None,
        None,
    ]


async def test_a_message_that_kills_the_process_is_dead_lettered(
    journal: str, killed: list[subprocess.Popen[str]]
) -> None:
    """Past the delivery limit (3) the message goes to q2c.dead, not round again."""
    run_and_kill(killed, journal, publish=1)
    for _ in range(3):
        run_and_kill(killed, journal)

    transport = await MemoryTransport.open(TOPOLOGY, journal=journal)
    [dead] = await take(await transport.subscribe(DEAD_QUEUE, prefetch=1), 1)
    assert transport.queue_depth(ERP) == 0
    await transport.aclose()

    assert dead.message_id == "m-0"
    assert dead.headers is not None
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
    assert dead.headers["x-first-death-queue"] == ERP


async def test_a_retry_waits_out_the_rest_of_its_tier(journal: str) -> None:
    """Due times are kept as wall-clock times: a restart does not restart them."""
    tier = retry_exchange(5.0)
    first = await MemoryTransport.open(
        TOPOLOGY, journal=journal, clock=FakeClock(1000.0)
    )
    await first.publish([to_erp(0).__replace__(exchange=tier)], timeout_s=1)
    await first.aclose()

    clock = FakeClock(50.0)  # a new process: another monotonic origin
    second = await MemoryTransport.open(TOPOLOGY, journal=journal, clock=clock)
    assert second.queue_depth(tier) == 1
    assert 4.0 < second.seconds_to_next_timer() <= 5.0
    clock.now += 5.0
    [back] = await take(await second.subscribe(ERP, prefetch=1), 1)
    await second.aclose()

    assert back.message_id == "m-0"
    assert back.headers is not None
    assert back.headers["x-first-death-queue"] == tier


async def test_a_second_process_on_the_journal_is_refused(journal: str) -> None:
    first = await MemoryTransport.open(TOPOLOGY, journal=journal)
    try:
        with pytest.raises(ConfigError, match="in use by another process"):
            await MemoryTransport.open(TOPOLOGY, journal=journal)
    finally:
        await first.aclose()
    second = await MemoryTransport.open(TOPOLOGY, journal=journal)
    await second.aclose()


async def test_messages_of_a_queue_no_longer_declared_stay_in_the_journal(
    journal: str,
) -> None:
    first = await MemoryTransport.open(TOPOLOGY, journal=journal)
    await first.publish([to_erp(0)], timeout_s=1)
    await first.aclose()

    without_erp = build_topology(TopologyConfig(systems=("crm",)), [])
    with capture_logs() as logs:
        second = await MemoryTransport.open(without_erp, journal=journal)
    await second.aclose()
    assert [(e["event"], e.get("queue")) for e in logs] == [
        ("queue_journal_orphans", ERP)
    ]

    third = await MemoryTransport.open(TOPOLOGY, journal=journal)
    [back] = await take(await third.subscribe(ERP, prefetch=1), 1)
    await third.aclose()
    assert back.message_id == "m-0"


async def test_a_failed_write_is_not_confirmed_and_is_written_later(
    journal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The publisher hears INDETERMINATE; the change waits for the next write."""
    transport = await MemoryTransport.open(TOPOLOGY, journal=journal)
    write = journal_module._write

    def failing(*args: object) -> None:
        raise StoreUnavailable("sqlite unavailable: disk I/O error")

    monkeypatch.setattr(journal_module, "_write", failing)
    with capture_logs() as logs:
        outcomes = await transport.publish([to_erp(0)], timeout_s=1)
    assert outcomes == [PublishOutcome.INDETERMINATE]
    assert [e["event"] for e in logs] == ["queue_journal_unavailable"]

    monkeypatch.setattr(journal_module, "_write", write)
    assert await transport.publish([to_erp(1)], timeout_s=1) == [ACK]
    await transport.aclose()

    reopened = await MemoryTransport.open(TOPOLOGY, journal=journal)
    got = await take(await reopened.subscribe(ERP, prefetch=10), 2)
    await reopened.aclose()
    assert [d.message_id for d in got] == ["m-0", "m-1"]


async def test_the_journal_holds_only_what_is_queued(journal: str) -> None:
    """Published and acknowledged between two writes: never written at all."""
    transport = await MemoryTransport.open(TOPOLOGY, journal=journal)
    sub = await transport.subscribe(ERP, prefetch=100)
    for n in range(20):
        await transport.publish([to_erp(n)], timeout_s=1)
        [d] = await take(sub, 1)
        sub.ack(d.tag)
    await transport.aclose()

    with anyio.fail_after(5):
        rows = await anyio.to_thread.run_sync(_rows, journal)
    assert rows == 0


def _rows(path: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT count(*) FROM queued").fetchone()[0])
    finally:
        conn.close()


async def die(transport: MemoryTransport) -> None:
    """Leave *transport* as a killed process would: nothing more is written."""
    journal = transport._journal
    assert journal is not None
    await anyio.to_thread.run_sync(journal._conn.close)


async def test_a_delivery_pushed_during_a_write_waits_for_its_own(
    journal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery pushed while the consumer writes waits for its own write.

    A retry comes due while the consumer writes its last ack: the delivery it
    pushes is handed out only once its delivered mark is on disk, so a crash
    while it is handled counts it.
    """
    clock = FakeClock(1000.0)
    transport = await MemoryTransport.open(TOPOLOGY, journal=journal, clock=clock)
    tier = retry_exchange(5.0)
    await transport.publish(
        [to_erp(0), to_erp(1).__replace__(exchange=tier)], timeout_s=1
    )
    sub = await transport.subscribe(ERP, prefetch=1)
    [first] = await take(sub, 1)
    sub.ack(first.tag)  # pending, and nothing to push: the queue is empty

    write = journal_module._write
    writing = threading.Event()

    def slow(*args: Any) -> None:
        writing.set()
        time.sleep(0.2)
        write(*args)

    monkeypatch.setattr(journal_module, "_write", slow)

    async def retry_due_during_the_write() -> None:
        assert await anyio.to_thread.run_sync(writing.wait, 5.0)
        clock.now += 5.0
        transport.run_timers()  # m-1 back in the queue, pushed to the consumer

    async with anyio.create_task_group() as tg:
        tg.start_soon(retry_due_during_the_write)
        [retried] = await take(sub, 1)
    await die(transport)

    reopened = await MemoryTransport.open(TOPOLOGY, journal=journal)
    [again] = await take(await reopened.subscribe(ERP, prefetch=1), 1)
    await reopened.aclose()
    assert retried.message_id == again.message_id == "m-1"
    assert again.redelivered
    assert again.headers is not None
    assert again.headers["x-delivery-count"] == 1


async def test_while_writes_fail_a_consumer_is_handed_nothing_unwritten(
    journal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    transport = await MemoryTransport.open(TOPOLOGY, journal=journal)
    await transport.publish([to_erp(0)], timeout_s=1)
    write = journal_module._write

    def failing(*args: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(journal_module, "_write", failing)
    sub = await transport.subscribe(ERP, prefetch=1)
    with capture_logs() as logs, anyio.move_on_after(0.3):
        await sub.batch(1)
        pytest.fail("handed out a delivery whose mark was not written")
    assert {e["event"] for e in logs} == {"queue_journal_unavailable"}

    monkeypatch.setattr(journal_module, "_write", write)
    [d] = await take(sub, 1)
    await transport.aclose()
    assert d.message_id == "m-0"


async def test_a_message_the_journal_cannot_store_is_returned_alone(
    journal: str,
) -> None:
    """A header integer beyond 64 bits: returned (parked by the relay).

    The rest of the publish is confirmed, and the journal goes on writing.
    """
    transport = await MemoryTransport.open(TOPOLOGY, journal=journal)
    huge = msgspec.structs.replace(to_erp(1), headers={"x-attempt": 2**64})
    with capture_logs() as logs:
        outcomes = await transport.publish([to_erp(0), huge, to_erp(2)], timeout_s=1)
    assert outcomes == [ACK, PublishOutcome.RETURNED, ACK]
    assert [e["event"] for e in logs] == ["publish_unstorable"]
    await transport.aclose()

    reopened = await MemoryTransport.open(TOPOLOGY, journal=journal)
    got = await take(await reopened.subscribe(ERP, prefetch=10), 2)
    await reopened.aclose()
    assert [d.message_id for d in got] == ["m-0", "m-2"]


async def test_a_file_that_is_no_journal_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "queues.sqlite3"
    path.write_bytes(b"not a database, just bytes " * 100)
    with pytest.raises(ConfigError, match="not a queue journal"):
        await MemoryTransport.open(TOPOLOGY, journal=str(path))


async def test_a_cancelled_close_still_writes_and_lets_go(journal: str) -> None:
    transport = await MemoryTransport.open(TOPOLOGY, journal=journal)
    await transport.publish([to_erp(0)], timeout_s=1)
    sub = await transport.subscribe(ERP, prefetch=1)
    [d] = await take(sub, 1)
    sub.ack(d.tag)  # pending: written by the close
    with anyio.CancelScope() as scope:
        scope.cancel()
        await transport.aclose()

    reopened = await MemoryTransport.open(TOPOLOGY, journal=journal)
    assert reopened.queue_depth(ERP) == 0
    await reopened.aclose()


async def test_a_retry_tier_taken_out_of_the_topology_sends_its_messages_back(
    journal: str,
) -> None:
    """They would otherwise wait for a tier nobody declares: they expire now."""
    first = await MemoryTransport.open(TOPOLOGY, journal=journal)
    tier = retry_exchange(5.0)
    await first.publish([to_erp(0).__replace__(exchange=tier)], timeout_s=1)
    await first.aclose()

    other_tiers = build_topology(
        TopologyConfig(systems=("erp",), retry_tiers_s=(30.0,)), []
    )
    second = await MemoryTransport.open(other_tiers, journal=journal)
    [back] = await take(await second.subscribe(ERP, prefetch=1), 1)
    await second.aclose()
    assert back.message_id == "m-0"
    assert back.headers is not None
    assert back.headers["x-first-death-queue"] == tier
    assert back.headers["x-first-death-reason"] == "expired"

    third = await MemoryTransport.open(TOPOLOGY, journal=journal)
    assert third.queue_depth(tier) == 0  # gone from the journal, not only moved
    await third.aclose()
