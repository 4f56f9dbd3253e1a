"""A RabbitMQ memory or disk alarm while the daemon works (§7: 13, 14).

The broker blocks every publishing connection. The daemon's consumers live
on a connection of their own, so they keep draining into Postgres; the
relay's publishes wait, the rows stay pending, the publishing connection
says why it is blocked and ``/readyz`` answers 503. Once the alarm clears,
every row goes out; nothing is lost or applied twice.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
import pytest

from tests.reliability.checker import wait_applied
from tests.reliability.faults import disk_alarm, memory_alarm
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.mark.chaos
@pytest.mark.parametrize("alarm", [memory_alarm, disk_alarm], ids=["memory", "disk"])
async def test_a_broker_alarm_holds_rows_back_and_loses_nothing(
    scenario: Scenario, alarm: Callable[[], AbstractAsyncContextManager[None]]
) -> None:
    daemon = scenario.daemon
    workload = Workload.build(2000)
    await daemon.declare()
    # Published before the alarm: the test's own publisher would be blocked too.
    assert (await scenario.publish(workload.stream)).confirmed == len(workload.stream)
    async with alarm():
        await daemon.start()
        # Not `wait_ready`: a blocked connection is not ready. Consumers keep
        # draining while nothing can be published.
        await daemon.wait_log(lambda e: e["event"] == "daemon_started", timeout_s=30)
        await wait_applied(scenario.pg_dsn, len(workload.entries), timeout_s=60)
        with anyio.fail_after(30):
            while True:
                status = await daemon.status()
                publish = status["transport"]["connections"]["publish"]
                if publish["state"] == "blocked":
                    break
                await anyio.sleep(0.1)  # bounded poll: the block comes on publish
        assert publish["blocked_reason"]
        assert status["store"]["outbox_pending"] > 0, "rows went out through the alarm"
        code, body = await daemon.readyz()
        assert code == 503
        assert "blocked" in body
    # The alarm is over: every row goes out, once each downstream at least.
    await scenario.finish(workload)
