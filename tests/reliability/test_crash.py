"""kill -9 at the crash points the product must survive, and at random (§7: 1 to 4).

The daemon kills itself with SIGKILL through ``[testing] crash-at`` once
``crash-after`` messages passed the point; the test, as the supervisor,
starts it again without the hook, lets it drain, and runs the checker.
The storm kills it from outside, by its pid, at moments nobody chose.
"""

from __future__ import annotations

import random

import anyio
import pytest

from tests.reliability.checker import applied_count, wait_applied
from tests.reliability.harness import SLOW
from tests.reliability.scenario import KILLED, Outcome, Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def crash_and_recover(
    scenario: Scenario, workload: Workload, *, point: str, after: int
) -> Outcome:
    """Publish while the daemon crashes at *point*; restart it; drain and check."""
    daemon = scenario.daemon
    await daemon.start({"testing": {"crash-at": point, "crash-after": after}})
    await daemon.wait_ready()
    async with anyio.create_task_group() as tg:
        reports = scenario.publish_in_background(tg, workload.stream)
        assert await daemon.wait_exit(30) == KILLED, await daemon.log_tail()
        events = [e["event"] for e in await daemon.log_events()]
        assert "crash_injected" in events
        await scenario.restart_if_dead()
    assert reports[0].confirmed == len(workload.stream)
    return await scenario.finish(workload)


async def test_kill_between_commit_and_ack_loses_and_duplicates_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 1: SIGKILL after commit, before ack: the redeliveries are skipped."""
    workload = Workload.build(3000)
    outcome = await crash_and_recover(
        scenario, workload, point="after_commit_before_ack", after=1200
    )
    # The killed batch was committed but never acked: its redelivered copies
    # (beyond the producer's own re-sends) met claimed keys and were skipped.
    resent = len(workload.stream) - len(workload.entries)
    assert outcome.report.duplicates_skipped > resent


async def test_kill_mid_transaction_rolls_back_and_applies_once(
    scenario: Scenario,
) -> None:
    """Scenario 2: SIGKILL before COMMIT: the batch rolls back, is redelivered, once."""
    workload = Workload.build(3000)
    await crash_and_recover(scenario, workload, point="mid_txn", after=1200)


async def test_kill_after_confirm_before_mark_republishes_under_the_same_id(
    scenario: Scenario,
) -> None:
    """Scenario 3: SIGKILL after the broker confirmed, before the rows were marked.

    After the 2 s lease the new daemon's poller republishes the rows with
    the same message id: downstream sees some entries twice (at-least-once),
    every entry at least once, effects stay exactly once, the outbox drains.
    """
    workload = Workload.build(3000)
    outcome = await crash_and_recover(
        scenario, workload, point="after_confirm_before_mark", after=1000
    )
    assert max(outcome.outputs.values()) >= 2, "the confirmed rows were not republished"


async def test_a_kill_storm_under_load_loses_and_duplicates_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 4, bounded: SIGKILL by pid five times, at random points of progress.

    Each kill lands wherever the daemon happens to be (consuming, in a
    commit, publishing, marking rows sent); the test restarts it every
    time, while the producer keeps publishing, and the checker then finds
    nothing lost and no effect applied twice.
    """
    daemon = scenario.daemon
    workload = Workload.build(5000)
    entries = len(workload.entries)
    rng = random.Random(4)
    marks = sorted(rng.sample(range(entries // 10, entries * 8 // 10), 5))
    await daemon.declare()
    await daemon.start(SLOW)
    await daemon.wait_ready()
    killed_at: list[int] = []
    async with anyio.create_task_group() as tg:
        reports = scenario.publish_in_background(tg, workload.stream, pause_s=0.1)
        for mark in marks:
            await wait_applied(scenario.pg_dsn, mark, timeout_s=60)
            assert await daemon.kill() == KILLED
            killed_at.append(await applied_count(scenario.pg_dsn))
            await daemon.start(SLOW)
            await daemon.wait_ready()
    assert reports[0].confirmed == len(workload.stream)
    assert len(killed_at) == 5
    assert killed_at[-1] < entries, "the storm came after the load"
    await scenario.finish(workload)
