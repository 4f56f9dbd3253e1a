"""Two daemons on one vhost and database, under a duplicate storm (§7: 20).

DESIGN §9: nothing in the daemon assumes it is alone. Workflow shards move
between daemons through single-active-consumer; the inbox decides, whatever
daemon holds a shard, that one business message has one effect.
"""

from __future__ import annotations

import anyio
import pytest

from tests.reliability.checker import wait_applied
from tests.reliability.harness import SLOW, Daemon
from tests.reliability.scenario import KILLED, Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_duplicate_storm_across_two_daemons_has_one_effect(
    scenario: Scenario, second: Daemon
) -> None:
    """One message published 1,000 times at once, while its shard changes daemon.

    Both daemons consume; single-active-consumer gives each shard to one of
    them. The first is killed in the middle of the storm and the second
    takes its shards over, redeliveries included. Afterwards every entry,
    the stormed one too, has exactly one effect, and nothing is lost.
    """
    first = scenario.daemon
    workload = Workload.build(2000)
    stormed = workload.entries[0].message()
    storm = [stormed] * 1000
    await first.declare()
    await first.start(SLOW)
    await first.wait_ready()
    await second.start(SLOW)
    await second.wait_ready()
    async with anyio.create_task_group() as tg:
        # Each list gets its publisher's report when that publisher is done.
        reports = [
            scenario.publish_in_background(tg, storm[:500]),
            scenario.publish_in_background(tg, workload.stream, pause_s=0.05),
            scenario.publish_in_background(tg, storm[500:]),
        ]
        await wait_applied(scenario.pg_dsn, len(workload.entries) // 3)
        assert await first.kill() == KILLED
    confirmed = sum(r.confirmed for done in reports for r in done)
    assert confirmed == len(storm) + len(workload.stream)

    # The survivor finishes the work alone; the checker counts every effect.
    survivor = Scenario(
        daemon=second,
        amqp_url=scenario.amqp_url,
        vhost=scenario.vhost,
        pg_dsn=scenario.pg_dsn,
    )
    await survivor.wait_drained(len(workload.entries))
    status = await second.status()
    took = sum(s["delivered"] for s in status["transport"]["subscriptions"])
    assert took > 0, "the second daemon never took a shard over"
    await survivor.finish(workload)
