"""A slow network to both services (§7: 11).

The daemon reaches RabbitMQ and PostgreSQL through proxies that delay every
chunk by 50 to 150 ms each way, in order. Throughput drops, but pipelined
confirms and batched commits keep things moving: nothing times out below
the configured budgets (no commit retried, no publish unconfirmed), and
nothing is lost or applied twice.
"""

from __future__ import annotations

import pytest

from tests.reliability.proxy import proxied
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.mark.timeout(420)  # its own waits add up to 300 s
async def test_a_slow_network_slows_the_daemon_without_errors(
    scenario: Scenario,
) -> None:
    daemon = scenario.daemon
    workload = Workload.build(3000)
    await daemon.declare()
    assert (await scenario.publish(workload.stream)).confirmed == len(workload.stream)
    async with (
        proxied(scenario.amqp_url) as (amqp_proxy, amqp_url),
        proxied(scenario.pg_dsn) as (pg_proxy, pg_dsn),
    ):
        for proxy in (amqp_proxy, pg_proxy):
            proxy.latency(0.05, 0.15)
        await daemon.start({"amqp": {"url": amqp_url}, "postgres": {"dsn": pg_dsn}})
        await daemon.wait_ready(timeout_s=60)
        await scenario.wait_drained(len(workload.entries), timeout_s=120)
        counters = (await daemon.status())["counters"]
        assert counters.get("batch_commit_retries", 0) == 0, counters
        assert counters.get("outbox_publish_failed", 0) == 0, counters
        await scenario.finish(workload, drain_s=120)
