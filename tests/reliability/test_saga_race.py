"""Two daemons writing the same instances at once (§7: 21).

Single-active-consumer gives each shard to one daemon, so the same account's
entries are never handled by two consumers at once, except across a
handover: a daemon cut off from RabbitMQ (but not from PostgreSQL) still
holds a batch, and still commits it, after the broker has given its shards,
and the same messages, to the other daemon.

The test makes that race happen. The first daemon reaches RabbitMQ through a
fault proxy; the second waits as the standby consumer. The test locks the
``saga`` table against writes (SHARE: reads go on), so the first daemon's
batch is read and applied and its write waits in the database, then cuts
the first daemon's network to RabbitMQ. Once the broker has handed the
shards over and the second daemon's write of the same messages waits too,
the lock goes: both write the same keys and instances from reads made
before either wrote. The store's optimistic checks (keys claimed, instance
versions changed since the read: ``ConcurrencyConflict``) refuse the second
writer, which reads again and finds the entries already applied. Holding
the writes rather than the reads makes the race certain: with the reads
held, a slow daemon could read only after the other had committed, and see
duplicates without any race.

The checker then finds every account's balance equal to the serial
application of its entries, nothing lost and no entry applied twice.
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from tests.reliability.checker import applied_count, connect
from tests.reliability.harness import Config, Daemon
from tests.reliability.proxy import proxied
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

#: Statements wait on the lock instead of timing out, so that both daemons'
#: writes are queued behind it when it goes.
PATIENT: Config = {
    "postgres": {"command-timeout-s": 120.0},
    "core": {"batch-max": 50},
}


#: What only `PostgresStore.commit_batch`'s statement says (``sql.COMMIT_BATCH``).
BATCH_WRITE = "%q2c_commit_batch_v2(%"


async def wait_delivered(daemon: Daemon, *, timeout_s: float) -> None:
    """Wait until *daemon*'s consumers have received something."""
    with anyio.fail_after(timeout_s):
        while True:
            status = await daemon.status()
            if any(s["delivered"] for s in status["transport"]["subscriptions"]):
                return
            await anyio.sleep(0.1)  # bounded poll: no delivery event


async def wait_lock_waiters(dsn: str, daemons: list[Daemon]) -> None:
    """Wait until each daemon's batch write waits for a lock.

    The first waits on the table lock, the second on the first's claim of
    the same keys; either way, a lock.
    """
    names = {str(d.spec.config["postgres"]["application-name"]) for d in daemons}
    async with connect(dsn) as conn:
        with anyio.fail_after(30):
            while True:
                waiting = {
                    r[0]
                    for r in await conn.fetch(
                        "SELECT application_name FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock'"
                        " AND datname = current_database()"
                        " AND query LIKE $1",
                        BATCH_WRITE,
                    )
                }
                if names <= waiting:
                    return
                await anyio.sleep(0.1)  # bounded poll: no event for a lock wait


def conflicts(events: list[dict[str, Any]]) -> int:
    """Commits retried because another writer got there first."""
    return sum(
        1
        for e in events
        if e["event"] == "batch_commit_retried"
        and "ConcurrencyConflict" in str(e.get("error"))
    )


async def test_two_writers_on_one_instance_apply_each_entry_once(
    scenario: Scenario, second: Daemon
) -> None:
    first = scenario.daemon
    workload = Workload.build(600, accounts=8)
    await first.declare()
    async with proxied(scenario.amqp_url) as (proxy, via_proxy):
        await first.start({**PATIENT, "amqp": {"url": via_proxy, "heartbeat-s": 5}})
        await first.wait_ready()
        await second.start({**PATIENT, "amqp": {"heartbeat-s": 5}})
        await second.wait_ready()

        async with connect(scenario.pg_dsn) as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute("LOCK TABLE saga IN SHARE MODE")  # no writes
                published = await scenario.publish(workload.stream)
                assert published.confirmed == len(workload.stream)
                await wait_delivered(first, timeout_s=30)
                proxy.blackhole()
                # The broker misses the first daemon's heartbeats and hands
                # its shards, unacknowledged deliveries included, to the second.
                await wait_delivered(second, timeout_s=60)
                # Both daemons' writes wait on the lock, from reads made
                # before either wrote: the race, not one after the other.
                await wait_lock_waiters(scenario.pg_dsn, [first, second])
                assert await applied_count(scenario.pg_dsn) == 0
            finally:
                await tx.commit()  # the lock goes: both batches race
        proxy.heal()

        await first.wait_ready(timeout_s=60)
        with anyio.fail_after(60):
            while True:
                events = [*await first.log_events(), *await second.log_events()]
                if conflicts(events):
                    break
                await anyio.sleep(0.2)  # bounded poll: the log is a file
        await scenario.finish(workload, drain_s=90)
    assert await second.stop() == 0, await second.log_tail()
