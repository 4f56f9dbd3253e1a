"""A downstream queue full with ``reject-publish`` (§7: 15).

Nobody reads ``q2c.events.ledger-applied`` and a policy caps it at 100
messages: the broker nacks every output past that. The relay keeps the rows
pending and retries them with a growing delay (no hot loop), the consumers
keep applying; once the cap goes, every output is delivered.
"""

from __future__ import annotations

import time

import anyio
import pytest

from tests.reliability.checker import drain_state, wait_applied
from tests.reliability.faults import queue_stats, rabbitmqctl
from tests.reliability.harness import OUTPUT_QUEUE
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

CAP = 100
POLICY = "test.output-full"


async def test_a_full_downstream_queue_holds_rows_pending_without_a_hot_loop(
    scenario: Scenario,
) -> None:
    daemon = scenario.daemon
    # The cap's overshoot (below) is bounded by what the relay has in flight,
    # not by the total: 30-60 here when idle, 180 in a loaded CI run. A
    # thousand entries keep "half held back" clear of it.
    workload = Workload.build(1000)
    entries = len(workload.entries)
    await daemon.declare()
    # Above the product's own policies, for the output queue alone.
    await rabbitmqctl(
        "set_policy", "-p", scenario.vhost, "--apply-to", "queues",
        "--priority", "100", POLICY, f"^{OUTPUT_QUEUE.replace('.', '[.]')}$",
        f'{{"max-length": {CAP}, "overflow": "reject-publish"}}',
    )  # fmt: skip
    assert (await scenario.publish(workload.stream)).confirmed == len(workload.stream)
    await daemon.start()
    await daemon.wait_ready()
    await wait_applied(scenario.pg_dsn, entries, timeout_s=60)
    # A quorum queue applies its cap a little late under pipelined publishes:
    # it may take a few dozen more than CAP. Whatever it took, the rest wait.
    with anyio.fail_after(30):
        while True:
            _, pending = await drain_state(scenario.pg_dsn)
            ready = (await queue_stats(scenario.amqp_url, [OUTPUT_QUEUE]))[
                OUTPUT_QUEUE
            ].ready
            if pending + ready == entries:
                break
            await anyio.sleep(0.2)  # bounded poll: the outbox has no event
    assert ready >= CAP
    assert pending >= entries // 2, "the cap did not hold the outputs back"

    # Retries grow from 2 s: over a 3 s window each pending row is tried at
    # most twice (more if the machine stretched the window). A relay spinning
    # on nacks would count thousands.
    before = (await daemon.status())["counters"].get("outbox_publish_failed", 0)
    started = time.monotonic()
    await anyio.sleep(3.0)  # the observation window itself, not a wait
    after = (await daemon.status())["counters"].get("outbox_publish_failed", 0)
    window_s = time.monotonic() - started
    assert after >= pending, "the held rows were never tried"
    assert after - before <= (1 + _delays_within(window_s)) * pending
    assert (await drain_state(scenario.pg_dsn))[1] == pending

    await rabbitmqctl("clear_policy", "-p", scenario.vhost, POLICY)
    await scenario.finish(workload, drain_s=90)


def _delays_within(window_s: float) -> int:
    """How many of the relay's growing nack delays (2 s, doubling) fit in a window."""
    fitted, delay, spent = 0, 2.0, 0.0
    while spent + delay <= window_s:
        spent += delay
        fitted += 1
        delay = min(delay * 2, 60.0)
    return fitted
