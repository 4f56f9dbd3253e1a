"""The Jepsen-style soak (§7: 27): random faults under steady load, for minutes.

Not part of the normal suite (marker ``soak``, deselected by default). Run::

    .venv/bin/python -m pytest -m soak tests/reliability/test_soak.py -s

``Q2C_SOAK_S`` (default 480), ``Q2C_SOAK_ENTRIES`` (50,000) and
``Q2C_SOAK_SEED`` change the length, the workload and the sequence of faults.

A producer publishes the workload at a steady pace over the whole run, with
its duplicates, through the real broker. Every 10 to 30 s one fault, drawn at
random, hits the daemon (which reaches RabbitMQ through a fault proxy):

* ``kill``: SIGKILL by pid at a random moment, then a run that kills itself
  between a commit and its acks (§7: 1), then a normal restart;
* ``broker-restart``: ``rabbitmqctl stop_app`` for 5 to 10 s (§7: 5);
* ``close``: every connection of the vhost closed by the broker (§7: 6);
* ``partition``: RabbitMQ silent, no reset, for 20 to 30 s (§7: 7);
* ``pg-restart``: ``pg_ctlcluster … restart`` (§7: 9);
* ``memory-alarm``: the memory watermark at 0 for 10 to 20 s (§7: 13).

After the last fault the daemon drains. The checker then expects every entry
applied exactly once, an empty outbox and shard queues, every output
downstream, and no dead letter (the workload has no bad input).
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter

import anyio
import pytest

from tests.reliability.checker import applied_count, dead_letters
from tests.reliability.faults import (
    memory_alarm,
    rabbitmq_outage,
    rabbitmqctl,
    restart_postgres,
)
from tests.reliability.harness import Config
from tests.reliability.proxy import FaultProxy, proxied
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload, publish

SOAK_S = float(os.environ.get("Q2C_SOAK_S", "480"))
ENTRIES = int(os.environ.get("Q2C_SOAK_ENTRIES", "50000"))
SEED = int(os.environ.get("Q2C_SOAK_SEED", "27"))
FAULTS = ("kill", "broker-restart", "close", "partition", "pg-restart", "memory-alarm")
CHUNK = 250

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.integration,
    pytest.mark.chaos,
    pytest.mark.soak,
    pytest.mark.timeout(SOAK_S + 900),
]


class Soak:
    """The daemon, its proxy to RabbitMQ, and the faults that hit them."""

    def __init__(
        self, scenario: Scenario, proxy: FaultProxy, config: Config, rng: random.Random
    ) -> None:
        self.scenario = scenario
        self.daemon = scenario.daemon
        self.proxy = proxy
        self.config = config
        self.rng = rng

    async def inject(self, fault: str) -> None:
        """Apply *fault*, end it, and wait until the daemon is ready again."""
        s, rng = self.scenario, self.rng
        if fault == "kill":
            await self.daemon.kill()
            crash = {"crash-at": "after_commit_before_ack", "crash-after": 200}
            await self.daemon.start({**self.config, "testing": crash})
            await self.daemon.wait_exit(120)  # killed itself at the point
            await self.daemon.start(self.config)
        elif fault == "broker-restart":
            await rabbitmq_outage(rng.uniform(5.0, 10.0))
        elif fault == "close":
            await rabbitmqctl("close_all_connections", "-p", s.vhost, "soak")
        elif fault == "partition":
            self.proxy.blackhole()
            await anyio.sleep(rng.uniform(20.0, 30.0))  # the fault's length
            self.proxy.heal()
        elif fault == "pg-restart":
            await restart_postgres(s.pg_dsn)
        elif fault == "memory-alarm":
            async with memory_alarm():
                await anyio.sleep(rng.uniform(10.0, 20.0))  # the fault's length
        else:
            raise AssertionError(f"unknown fault {fault!r}")
        if self.daemon.returncode is not None:
            # Died of the fault itself (nothing above stops it otherwise):
            # the supervisor's restart, on the soak's config.
            print(f"[soak] the daemon exited {self.daemon.returncode}; restarted")
            await self.daemon.start(self.config)
        await self.daemon.wait_ready(timeout_s=120)


async def test_random_faults_for_minutes_lose_and_duplicate_nothing(
    scenario: Scenario,
) -> None:
    daemon = scenario.daemon
    rng = random.Random(SEED)
    workload = Workload.build(ENTRIES, accounts=200, seed=SEED)
    stream = workload.stream
    # Paced so that publishing lasts the whole soak.
    pause_s = SOAK_S / max(1, len(stream) // CHUNK)
    await daemon.declare()
    async with proxied(scenario.amqp_url) as (proxy, via_proxy):
        config: Config = {"amqp": {"url": via_proxy, "heartbeat-s": 5}}
        await daemon.start(config)
        await daemon.wait_ready()
        soak = Soak(scenario, proxy, config, rng)
        injected: Counter[str] = Counter()
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            reports = []

            async def produce() -> None:
                reports.append(
                    await publish(
                        scenario.amqp_url,
                        stream,
                        chunk=CHUNK,
                        pause_s=pause_s,
                        timeout_s=SOAK_S * 2 + 300,
                    )
                )

            tg.start_soon(produce)
            while time.monotonic() - started < SOAK_S:
                await anyio.sleep(rng.uniform(10.0, 30.0))  # between faults
                fault = rng.choice(FAULTS)
                at = round(time.monotonic() - started)
                applied = await applied_count(scenario.pg_dsn)
                print(f"[soak {at:4d}s] {fault} (applied so far: {applied})")
                await soak.inject(fault)
                injected[fault] += 1
        assert reports[0].confirmed == len(stream)
        print(f"[soak] faults: {dict(injected)}; producer: {reports[0]}")
        outcome = await scenario.finish(workload, drain_s=600)
        r = outcome.report
        print(
            f"[soak] expected {r.expected}: lost {len(r.lost)}, duplicated "
            f"{len(r.duplicated)}, unexpected {len(r.unexpected)}; duplicates "
            f"skipped {r.duplicates_skipped}, dead letters {r.dead_letters}, "
            f"outputs {sum(outcome.outputs.values())} for {len(outcome.outputs)} ids"
        )
    assert await dead_letters(scenario.pg_dsn) == []
    assert len(injected) >= min(len(FAULTS), 4), injected
