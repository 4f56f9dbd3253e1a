"""One scenario's moving parts together, and the common ending of every scenario.

Every scenario ends the same way (RELIABILITY.md §7): the daemon (restarted
if the fault killed it) drains, the checker counts lost and duplicated
effects, the downstream queue holds each entry at least once, ``brokerctl
status`` answers, and SIGTERM ends the daemon with exit status 0.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

from broker.transport import OutgoingMessage
from tests.reliability.checker import Report, check, drain_state
from tests.reliability.faults import queue_stats
from tests.reliability.harness import OUTPUT_QUEUE, SHARD_QUEUES, Daemon, brokerctl
from tests.reliability.workload import (
    Entry,
    PublishReport,
    Workload,
    publish,
    read_outputs,
)

__all__ = ["Scenario", "Outcome", "KILLED"]

#: What ``Process.returncode`` says for a process ended by SIGKILL.
KILLED = -signal.SIGKILL


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """The checker's report and the downstream copies per entry id."""

    report: Report
    outputs: Counter[str]


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """The daemon under test and the services it runs on."""

    daemon: Daemon
    amqp_url: str
    vhost: str
    pg_dsn: str

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, pause_s: float = 0.0
    ) -> PublishReport:
        """Publish *messages* (confirmed; indeterminate chunks again)."""
        return await publish(self.amqp_url, messages, pause_s=pause_s)

    async def start_on_backlog(
        self,
        backlog: Sequence[OutgoingMessage],
        overrides: Mapping[str, Mapping[str, Any]] = {},
    ) -> None:
        """Declare the topology, publish *backlog*, then start the daemon on it.

        The daemon starts with work waiting, so a fault soon after lands
        while batches are in flight.
        """
        await self.daemon.declare()
        assert (await self.publish(backlog)).confirmed == len(backlog)
        await self.daemon.start(overrides)
        await self.daemon.wait_ready()

    def publish_in_background(
        self,
        tg: anyio.abc.TaskGroup,
        messages: Sequence[OutgoingMessage],
        *,
        pause_s: float = 0.0,
    ) -> list[PublishReport]:
        """Start publishing in *tg*; the list gets the report when it is done."""
        reports: list[PublishReport] = []

        async def run() -> None:
            reports.append(await self.publish(messages, pause_s=pause_s))

        tg.start_soon(run)
        return reports

    async def restart_if_dead(self, *, timeout_s: float = 30.0) -> None:
        """The supervisor's job: start the daemon again (without fault hooks)."""
        if self.daemon.returncode is not None:
            await self.daemon.start()
        await self.daemon.wait_ready(timeout_s)

    async def wait_drained(self, expected: int, *, timeout_s: float = 45.0) -> None:
        """Wait until the work is done: nothing left anywhere, nothing in flight.

        *expected* distinct messages applied, no unsent outbox row, no ready
        message on a shard queue, and every delivery the daemon's consumers
        received acknowledged.
        """
        with anyio.fail_after(timeout_s):
            while True:
                applied, pending = await drain_state(self.pg_dsn)
                if applied >= expected and pending == 0:
                    stats = await queue_stats(self.amqp_url, SHARD_QUEUES)
                    if all(s.ready == 0 for s in stats.values()):
                        subs = (await self.daemon.status())["transport"][
                            "subscriptions"
                        ]
                        if all(s["delivered"] == s["acked"] for s in subs):
                            return
                await anyio.sleep(0.2)  # bounded poll: the drain has no event

    async def finish(
        self,
        workload: Workload,
        *,
        extra: Iterable[Entry] = (),
        silent: Iterable[Entry] = (),
        drain_s: float = 45.0,
    ) -> Outcome:
        """Drain, check, read the downstream queue, check health, stop with exit 0.

        *extra* entries were applied besides the workload's; the *silent*
        ones among them emit nothing downstream. Every other entry must
        appear in ``q2c.events.ledger-applied`` at least once (duplicates
        are allowed there: at-least-once).
        """
        extra = list(extra)
        expected = len(workload.entries) + len(extra)
        downstream = {e.entry_id for e in [*workload.entries, *extra]}
        downstream -= {e.entry_id for e in silent}
        try:
            await self.wait_drained(expected, timeout_s=drain_s)
        except TimeoutError:
            raise AssertionError(
                "no drain within the bound\n" + await self.daemon.log_tail()
            ) from None
        report = await check(self.pg_dsn, workload, extra=extra)
        report.assert_ok()
        outputs = await read_outputs(self.amqp_url, OUTPUT_QUEUE, expect=downstream)
        missing = sorted(downstream - set(outputs))
        assert not missing, f"{len(missing)} entries never came out: {missing[:5]}"
        unexpected = sorted(set(outputs) - downstream)
        assert not unexpected, f"outputs for no input: {unexpected[:5]}"
        status = await brokerctl(self.daemon.spec.socket_path, "status")
        assert status["pid"] == self.daemon.pid
        assert not status["draining"]
        assert await self.daemon.stop() == 0, await self.daemon.log_tail()
        # Stopped: nothing is held unacknowledged, so "ready" is everything left.
        stats = await queue_stats(self.amqp_url, SHARD_QUEUES)
        assert all(s.ready == 0 for s in stats.values()), stats
        return Outcome(report=report, outputs=outputs)
