"""Least privilege on RabbitMQ (§7: 25, permissions; TLS is in ``test_tls.py``).

The topology is declared by an operator (here: the test, as ``guest``), the
way definitions are imported in production, and the daemon logs in as its
own user with ``configure "^$"`` (RELIABILITY.md §6.1):

* asked to declare the topology all the same, it stops at once with the
  broker's refusal and exit status 78 (a configuration error), no retry loop;
* refused ``write`` on ``q2c.events``, it keeps consuming and committing,
  keeps every output pending, says so as an error and on ``/readyz``, probes
  no more than once per growing back-off, and delivers everything once the
  permission is granted;
* refused ``read`` on one shard queue, it consumes the others, says so, asks
  again with back-off (no crash and restart of the shard, which used to end
  the daemon within seconds), and drains that shard once granted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from tests.reliability.checker import (
    applied_count,
    connect,
    drain_state,
    wait_applied,
    wait_dead_letters,
)
from tests.reliability.faults import rabbitmqctl
from tests.reliability.harness import SHARD_QUEUES, brokerctl
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload, raw_message

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PASSWORD = "least-privilege-pw"
#: Every q2c exchange but q2c.events, whose outputs are what gets refused.
WRITE_ALL_BUT_EVENTS = "^q2c[.](?!events$).*"
#: The README's grant: the q2c exchanges and the default exchange (``amq.default``),
#: through which commands go to system queues and replays and released messages
#: go back to theirs.
WRITE_ALL = "^(q2c[.].*|amq[.]default)$"
READ_ALL = "^q2c[.].*"


@pytest.fixture
async def user(scenario: Scenario) -> AsyncIterator[str]:
    """A RabbitMQ user of the scenario's own, deleted at the end."""
    name = f"q2c-daemon-{scenario.vhost}"
    await rabbitmqctl("add_user", name, PASSWORD)
    try:
        yield name
    finally:
        with anyio.CancelScope(shield=True):
            await rabbitmqctl("delete_user", name)


async def grant(
    scenario: Scenario, user: str, *, write: str, read: str = READ_ALL
) -> None:
    """Set *user*'s permissions on the scenario's vhost: no configure at all."""
    await rabbitmqctl("set_permissions", "-p", scenario.vhost, user, "^$", write, read)


def as_user(scenario: Scenario, user: str) -> str:
    """The scenario's AMQP URL, logged in as *user*."""
    return scenario.amqp_url.replace("guest:guest@", f"{user}:{PASSWORD}@", 1)


async def test_a_daemon_without_configure_permission_stops_instead_of_looping(
    scenario: Scenario, user: str
) -> None:
    daemon = scenario.daemon
    await grant(scenario, user, write=WRITE_ALL)
    await daemon.start({"amqp": {"url": as_user(scenario, user)}})
    assert await daemon.wait_exit(30) == 78, await daemon.log_tail()
    tail = await daemon.log_tail()
    assert "ACCESS_REFUSED" in tail
    assert PASSWORD not in tail


async def test_refused_outputs_stay_pending_alert_and_go_out_once_granted(
    scenario: Scenario, user: str
) -> None:
    daemon = scenario.daemon
    workload = Workload.build(300)
    entries = len(workload.entries)
    await daemon.declare()  # the operator's part
    await grant(scenario, user, write=WRITE_ALL_BUT_EVENTS)
    assert (await scenario.publish(workload.stream)).confirmed == len(workload.stream)
    await daemon.start(
        {"amqp": {"url": as_user(scenario, user)}, "topology": {"declare": False}}
    )
    await daemon.wait_ready()
    await wait_applied(scenario.pg_dsn, entries, timeout_s=60)

    refused = await daemon.wait_log(
        lambda e: e["event"] == "amqp_access_refused", timeout_s=30
    )
    assert refused["level"] == "error"
    assert "q2c.events" in refused["reason"]
    assert (await drain_state(scenario.pg_dsn))[1] == entries, "an output got out"
    status = await daemon.status()
    assert "ACCESS_REFUSED" in status["transport"]["refused"]
    code, body = await scenario.daemon.readyz()
    assert code == 503
    assert "publish refused" in body

    # No loop: one probe per back-off period (1 s, 2 s, 4 s, ...), not a
    # channel per row or per batch. A relay retrying each row would open
    # hundreds of channels in this window.
    before = (await daemon.status())["transport"]["refusals"]
    await anyio.sleep(4.0)  # the observation window itself, not a wait
    after = (await daemon.status())["transport"]["refusals"]
    assert after - before <= 3, f"{after - before} refusals in 4 s"
    assert (await drain_state(scenario.pg_dsn))[1] == entries

    await grant(scenario, user, write=WRITE_ALL)
    await daemon.wait_log(lambda e: e["event"] == "amqp_access_granted", timeout_s=45)
    await scenario.finish(workload, drain_s=90)
    events = await daemon.log_events()
    assert not any(PASSWORD in str(e) for e in events)


async def test_a_refused_queue_is_asked_again_while_the_others_are_consumed(
    scenario: Scenario, user: str
) -> None:
    daemon = scenario.daemon
    workload = Workload.build(400)
    refused_queue = SHARD_QUEUES[1]
    await daemon.declare()
    escaped = refused_queue.removeprefix("q2c.").replace(".", "[.]")
    read_all_but_one = f"^q2c[.](?!{escaped}$).*"
    await grant(scenario, user, write=WRITE_ALL, read=read_all_but_one)
    assert (await scenario.publish(workload.stream)).confirmed == len(workload.stream)
    await daemon.start(
        {"amqp": {"url": as_user(scenario, user)}, "topology": {"declare": False}}
    )

    def refusal(e: dict[str, object]) -> bool:
        return e["event"] == "amqp_access_refused" and e.get("queue") == refused_queue

    first = await daemon.wait_log(refusal, timeout_s=30)
    assert first["level"] == "error"
    assert "ACCESS_REFUSED" in str(first["reason"])
    # The other shard is consumed: some entries, never all, are applied.
    await wait_applied(scenario.pg_dsn, 1, timeout_s=30)
    code, body = await scenario.daemon.readyz()
    assert code == 503
    assert f"consume {refused_queue} refused" in body

    before = len([e for e in await daemon.log_events() if refusal(e)])
    await anyio.sleep(4.0)  # the observation window itself, not a wait
    events = await daemon.log_events()
    assert len([e for e in events if refusal(e)]) - before <= 3
    assert not [e for e in events if e["event"] == "actor_crashed"]
    assert daemon.returncode is None
    assert await applied_count(scenario.pg_dsn) < len(workload.entries)

    await grant(scenario, user, write=WRITE_ALL)

    def granted(e: dict[str, object]) -> bool:
        return e["event"] == "amqp_access_granted" and e.get("queue") == refused_queue

    await daemon.wait_log(granted, timeout_s=45)
    await daemon.wait_ready()
    await scenario.finish(workload)


async def test_the_readme_grant_lets_a_replay_through_the_default_exchange(
    scenario: Scenario, user: str
) -> None:
    """A replay goes back to its queue through ``amq.default``: the grant covers it.

    Granted ``q2c.*`` alone, the broker refused every publish to the default
    exchange: commands to system queues, replays and released messages.
    """
    daemon = scenario.daemon
    await daemon.declare()
    await grant(scenario, user, write=WRITE_ALL)
    await daemon.start(
        {"amqp": {"url": as_user(scenario, user)}, "topology": {"declare": False}}
    )
    await daemon.wait_ready()
    bad = raw_message("replayed", b"{not json")
    assert (await scenario.publish([bad])).confirmed == 1
    [letter] = await wait_dead_letters(scenario.pg_dsn, 1)
    socket = daemon.spec.socket_path
    replayed = await brokerctl(socket, "dlq", "replay", str(letter["id"]))
    assert replayed["replayed"] == [letter["id"]]
    # Back through its shard queue, and malformed again: a second attempt.
    with anyio.fail_after(30):
        while True:
            async with connect(scenario.pg_dsn) as conn:
                attempts = await conn.fetchval(
                    "SELECT attempts FROM dead_letter WHERE id = $1", letter["id"]
                )
            if attempts == 2:
                break
            await anyio.sleep(0.2)  # bounded poll: the store has no event
    events = await daemon.log_events()
    assert not [e for e in events if e["event"] == "amqp_access_refused"]
