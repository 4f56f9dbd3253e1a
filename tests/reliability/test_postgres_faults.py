"""PostgreSQL restarted, its backends killed, or silent, under load (§7: 8, 9, 10)."""

from __future__ import annotations

import anyio
import pytest

from tests.reliability.checker import applied_count, wait_applied
from tests.reliability.faults import restart_postgres, terminate_backends
from tests.reliability.harness import SLOW
from tests.reliability.proxy import proxied
from tests.reliability.scenario import Scenario
from tests.reliability.workload import PublishReport, Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ENTRIES = 5000
BACKLOG = 4500


async def rode_it_out(
    scenario: Scenario,
    workload: Workload,
    reports: list[PublishReport],
    *,
    drain_s: float = 45.0,
) -> None:
    """Confirmed, never died, retried: then the checker, on everything."""
    assert sum(r.confirmed for r in reports) == len(workload.stream) - BACKLOG
    daemon = scenario.daemon
    assert daemon.returncode is None, "the daemon died instead of riding it out"
    status = await daemon.wait_ready()
    assert status["counters"]["batch_commit_retries"] > 0, "the fault missed the load"
    await scenario.finish(workload, drain_s=drain_s)


@pytest.mark.chaos
async def test_postgres_restart_under_load_loses_and_duplicates_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 9: ``pg_ctlcluster 15 main restart`` while batches commit.

    In-flight transactions fail; the shards hold their deliveries
    unacknowledged and retry the commit with back-off while the pool
    reconnects; rows the relay could not mark are republished after their
    lease. The daemon is never restarted; no loss, no duplicated effect.
    """
    workload = Workload.build(ENTRIES)
    await scenario.start_on_backlog(workload.stream[:BACKLOG], SLOW)
    async with anyio.create_task_group() as tg:
        await wait_applied(scenario.pg_dsn, ENTRIES // 10)
        reports = scenario.publish_in_background(
            tg, workload.stream[BACKLOG:], pause_s=0.2
        )
        await restart_postgres(scenario.pg_dsn)
    await rode_it_out(scenario, workload, reports)


async def test_killed_backends_under_load_lose_and_duplicate_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 10: ``pg_terminate_backend`` on the daemon's connections, thrice.

    As a restart, but aimed at this daemon alone (``application_name``), so
    it runs in the normal suite: the transactions in flight fail, the pool
    opens new connections, the shards retry their commits; the daemon is
    never restarted; no loss, no duplicated effect.
    """
    daemon = scenario.daemon
    application_name = str(daemon.spec.config["postgres"]["application-name"])
    workload = Workload.build(ENTRIES)
    await scenario.start_on_backlog(workload.stream[:BACKLOG], SLOW)
    ended = 0
    async with anyio.create_task_group() as tg:
        await wait_applied(scenario.pg_dsn, ENTRIES // 10)
        reports = scenario.publish_in_background(
            tg, workload.stream[BACKLOG:], pause_s=0.2
        )
        # Three rounds at least, then more until one lands on a commit in
        # flight (an idle pooled connection is replaced without a failure),
        # while the load lasts; a miss fails in rode_it_out.
        rounds = 0
        with anyio.fail_after(90):
            while await applied_count(scenario.pg_dsn) < ENTRIES:
                ended += await terminate_backends(scenario.pg_dsn, application_name)
                rounds += 1
                status = await daemon.status()
                if rounds >= 3 and status["counters"]["batch_commit_retries"] > 0:
                    break
                await anyio.sleep(0.05)  # paces the fault; waits for nothing
    assert ended >= 3, "no daemon connection was there to end"
    await rode_it_out(scenario, workload, reports)


async def test_a_silent_database_holds_work_back_and_loses_nothing(
    scenario: Scenario,
) -> None:
    """Scenario 8: PostgreSQL unreachable without a word for 20 s, under load.

    The daemon reaches the database through a proxy that goes silent: no
    reset, no refusal, nothing answers. Statements fail by
    ``command-timeout-s``, nothing is acknowledged before its commit, the
    shards retry; once the network heals the pool recovers and the backlog
    drains. The daemon is never restarted; no loss, no duplicated effect.
    """
    workload = Workload.build(ENTRIES)
    async with proxied(scenario.pg_dsn) as (proxy, via_proxy):
        await scenario.start_on_backlog(
            workload.stream[:BACKLOG], {**SLOW, "postgres": {"dsn": via_proxy}}
        )
        async with anyio.create_task_group() as tg:
            await wait_applied(scenario.pg_dsn, ENTRIES // 10)
            reports = scenario.publish_in_background(
                tg, workload.stream[BACKLOG:], pause_s=0.2
            )
            proxy.blackhole()
            stalled = await applied_count(scenario.pg_dsn)
            await anyio.sleep(20)  # the partition itself, not a wait for a condition
            assert await applied_count(scenario.pg_dsn) == stalled
            proxy.heal()
        await rode_it_out(scenario, workload, reports, drain_s=90)
