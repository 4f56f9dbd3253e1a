"""RabbitMQ faults under load (§7: 5 restart, 6 close, 7 partition, 12 TCP resets).

The daemon starts on a backlog (published before it runs), so the fault
lands while batches are in flight, up to ``prefetch`` deliveries per shard
are held unacknowledged and the relay is publishing; the rest of the
stream is published during the fault by a producer that republishes what
it could not get confirmed.
"""

from __future__ import annotations

import anyio
import pytest

from tests.reliability.checker import wait_applied
from tests.reliability.faults import (
    QueueStat,
    queue_stats,
    rabbitmq_outage,
    rabbitmqctl,
)
from tests.reliability.harness import SHARD_QUEUES, SLOW
from tests.reliability.proxy import proxied
from tests.reliability.scenario import Scenario
from tests.reliability.workload import PublishReport, Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ENTRIES = 5000
BACKLOG = 4500


def confirmed(reports: list[PublishReport]) -> int:
    """Messages the live producer got confirmed."""
    return sum(r.confirmed for r in reports)


async def redelivered(scenario: Scenario) -> int:
    """Deliveries the broker marked redelivered: the fault hit messages in flight."""
    status = await scenario.daemon.status()
    return int(status["counters"].get("messages_redelivered", 0))


async def wait_consumers(scenario: Scenario, timeout_s: float = 15.0) -> None:
    """Every shard queue's leader counts a consumer again (bounded poll)."""
    stats: dict[str, QueueStat] = {}
    with anyio.move_on_after(timeout_s):
        while True:
            stats = await queue_stats(scenario.amqp_url, SHARD_QUEUES)
            if all(s.consumers > 0 for s in stats.values()):
                return
            await anyio.sleep(0.2)  # registration after recovery has no event
    raise AssertionError(f"shard queues without a consumer: {stats}")


async def test_forced_connection_close_mid_batch_loses_and_duplicates_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 6: every connection of the vhost force-closed twice under load.

    ``rabbitmqctl close_all_connections -p <vhost>`` hits the daemon's
    publish and consume connections and the producer's. The daemon
    reconnects on its own (it is not restarted), the broker redelivers what
    was unacknowledged, and the inbox drops the copies: no loss, no dup.
    """
    daemon = scenario.daemon
    workload = Workload.build(ENTRIES)
    await scenario.start_on_backlog(workload.stream[:BACKLOG], SLOW)
    async with anyio.create_task_group() as tg:
        reports = scenario.publish_in_background(
            tg, workload.stream[BACKLOG:], pause_s=0.2
        )
        for fraction in (0.1, 0.5):
            await wait_applied(scenario.pg_dsn, int(ENTRIES * fraction))
            await rabbitmqctl(
                "close_all_connections", "-p", scenario.vhost, "scenario 6"
            )
    assert confirmed(reports) == len(workload.stream) - BACKLOG
    assert daemon.returncode is None, "the daemon died instead of reconnecting"
    await daemon.wait_ready()
    lost = [
        e for e in await daemon.log_events() if e["event"] == "amqp_connection_lost"
    ]
    assert len(lost) >= 4, lost  # two closes x (publish, consume)
    await wait_applied(scenario.pg_dsn, ENTRIES)
    assert await redelivered(scenario) > 0, "the fault missed the load"

    await scenario.finish(workload)


@pytest.mark.chaos
async def test_broker_restart_under_load_restores_consumers_and_loses_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 5: ``rabbitmqctl stop_app`` for 5 s during load, then ``start_app``.

    The producer's and the relay's publishes in flight become indeterminate
    and are published again; the daemon reconnects by itself and every
    shard queue has a consumer again; lost = 0 and duplicated effects = 0.
    """
    daemon = scenario.daemon
    workload = Workload.build(ENTRIES)
    await scenario.start_on_backlog(workload.stream[:BACKLOG], SLOW)
    async with anyio.create_task_group() as tg:
        await wait_applied(scenario.pg_dsn, ENTRIES // 10)
        reports = scenario.publish_in_background(
            tg, workload.stream[BACKLOG:], pause_s=0.2
        )
        await rabbitmq_outage(5.0)
    assert confirmed(reports) == len(workload.stream) - BACKLOG
    assert daemon.returncode is None, "the daemon died instead of reconnecting"
    status = await daemon.wait_ready(timeout_s=30)
    assert status["transport"]["connections"]["consume"]["reconnects"] >= 1
    await wait_consumers(scenario)
    await wait_applied(scenario.pg_dsn, ENTRIES)
    assert await redelivered(scenario) > 0, (
        "the fault missed the load",
        reports,
        await daemon.status(),
    )

    await scenario.finish(workload)


async def test_a_silent_broker_partition_loses_and_duplicates_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 7: RabbitMQ unreachable without a word for 30 s, under load.

    The daemon reaches the broker through a proxy that goes silent (no
    reset, no close) for more than three heartbeats of 5 s. The daemon
    must notice by the missing heartbeats, give up both connections, keep
    trying, and once the network heals reconnect and restore its consumers
    by itself; the broker redelivers what the lost connections held, and
    the inbox drops the copies: no loss, no duplicated effect.
    """
    daemon = scenario.daemon
    workload = Workload.build(ENTRIES)
    async with proxied(scenario.amqp_url) as (proxy, via_proxy):
        overrides = {
            **SLOW,
            "amqp": {**SLOW["amqp"], "url": via_proxy, "heartbeat-s": 5},
        }
        await scenario.start_on_backlog(workload.stream[:BACKLOG], overrides)
        async with anyio.create_task_group() as tg:
            await wait_applied(scenario.pg_dsn, ENTRIES // 10)
            reports = scenario.publish_in_background(
                tg, workload.stream[BACKLOG:], pause_s=0.2
            )
            proxy.blackhole()
            # Stuck detection within (heartbeat + 1) x 3 s (RELIABILITY.md §7).
            await daemon.wait_log(
                lambda e: e["event"] == "amqp_connection_lost", timeout_s=18
            )
            await anyio.sleep(15)  # the rest of the partition, not a wait
            proxy.heal()
        assert confirmed(reports) == len(workload.stream) - BACKLOG
        assert daemon.returncode is None, "the daemon died instead of reconnecting"
        await daemon.wait_ready(timeout_s=60)
        await wait_consumers(scenario)
        await wait_applied(scenario.pg_dsn, ENTRIES, timeout_s=60)
        assert await redelivered(scenario) > 0, "the fault missed the load"
        await scenario.finish(workload)


async def test_tcp_resets_under_load_lose_and_duplicate_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 12: every AMQP connection reset (TCP RST) three times under load.

    Unlike scenario 6 the broker says nothing: the sockets die under both
    ends. The daemon reconnects with back-off (a handful of attempts, not
    a storm), restores its consumers, and the inbox drops the redelivered
    copies: no loss, no duplicated effect.
    """
    daemon = scenario.daemon
    workload = Workload.build(ENTRIES)
    async with proxied(scenario.amqp_url) as (proxy, via_proxy):
        await scenario.start_on_backlog(
            workload.stream[:BACKLOG],
            {**SLOW, "amqp": {**SLOW["amqp"], "url": via_proxy}},
        )
        resets = 0
        async with anyio.create_task_group() as tg:
            reports = scenario.publish_in_background(
                tg, workload.stream[BACKLOG:], pause_s=0.2
            )
            for fraction in (0.1, 0.3, 0.5):
                await wait_applied(scenario.pg_dsn, int(ENTRIES * fraction))
                resets += proxy.reset_all()
                await daemon.wait_ready(timeout_s=30)
        assert resets >= 12, resets  # 3 x (publish, consume) x (client, broker side)
        assert confirmed(reports) == len(workload.stream) - BACKLOG
        assert daemon.returncode is None, "the daemon died instead of reconnecting"
        status = await daemon.wait_ready()
        reconnects = sum(
            c["reconnects"] for c in status["transport"]["connections"].values()
        )
        assert 6 <= reconnects <= 12, f"{reconnects} reconnects for 3 resets"
        await wait_consumers(scenario)
        await wait_applied(scenario.pg_dsn, ENTRIES, timeout_s=60)
        assert await redelivered(scenario) > 0, "the fault missed the load"
        await scenario.finish(workload)
