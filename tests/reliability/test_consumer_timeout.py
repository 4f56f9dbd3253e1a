"""A batch held past RabbitMQ's consumer timeout (§7: 22).

The broker's ``consumer_timeout`` is set to 5 s for the test (a per-node
setting in 3.10, read by each channel when it opens, so before the daemon
starts; restored in a ``finally``). The test then holds an exclusive lock on
the outbox table, so every commit waits, times out (``command-timeout-s``)
and is retried, while its deliveries stay unacknowledged. RabbitMQ checks
the timeout about once a minute: it closes the consuming channel with
``PRECONDITION_FAILED``. The daemon logs why, subscribes again, and once the
lock goes the redelivered messages are recognised by the inbox: each effect
once, nothing lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.reliability.checker import applied_count, connect
from tests.reliability.faults import rabbit_env
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.chaos]

TIMEOUT_MS = 5000


@pytest.fixture
async def short_consumer_timeout() -> AsyncIterator[None]:
    """``consumer_timeout`` at 5 s on the node, then as it was."""
    async with rabbit_env({"consumer_timeout": str(TIMEOUT_MS)}):
        yield


@pytest.mark.usefixtures("short_consumer_timeout")
@pytest.mark.timeout(300)  # waits up to 150 s for the broker's timeout
async def test_deliveries_held_past_the_consumer_timeout_are_applied_once(
    scenario: Scenario,
) -> None:
    daemon = scenario.daemon
    workload = Workload.build(400)
    await daemon.declare()
    # Commits keep retrying through the lock: the deliveries stay in hand.
    await daemon.start({"core": {"commit-deadline-s": 600.0}})
    await daemon.wait_ready()

    def timed_out(e: dict[str, object]) -> bool:
        return e["event"] == "amqp_subscription_lost" and "PRECONDITION_FAILED" in str(
            e.get("reason")
        )

    async with connect(scenario.pg_dsn) as conn, conn.transaction():
        await conn.execute("LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE")
        published = await scenario.publish(workload.stream)
        assert published.confirmed == len(workload.stream)
        # RabbitMQ evaluates the timeout on a one-minute tick.
        lost = await daemon.wait_log(timed_out, timeout_s=150)
        assert "timed out" in str(lost["reason"])
        assert lost["level"] == "warning"
        assert await applied_count(scenario.pg_dsn) == 0
    # The lock is gone: the shard subscribes again and the broker redelivers.
    await daemon.wait_ready(timeout_s=60)
    await scenario.finish(workload, drain_s=120)
