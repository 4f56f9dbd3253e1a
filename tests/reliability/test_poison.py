"""A message the workflow cannot apply (§7: 16 poison message)."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tests.reliability.checker import journal_stages, wait_dead_letters
from tests.reliability.faults import queue_stats
from tests.reliability.scenario import Scenario
from tests.reliability.trees import POISON
from tests.reliability.workload import Entry, Workload, take

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_poison_goes_through_the_retry_tiers_then_to_the_dead_letters(
    scenario: Scenario,
) -> None:
    """Scenario 16: 3 attempts (tiers 0.5 s, 1 s), then a dead letter; others unharmed.

    The dead-letter row and the ``q2c.dead`` copy carry the reason
    ``attempts_exhausted``, the original bytes and attempts = 3; the
    poison's account ends with exactly its other entries; the quorum
    queue's delivery limit (the backstop) plays no part.
    """
    daemon = scenario.daemon
    workload = Workload.build(2000)
    account = workload.entries[0].account  # shares an account with good entries
    poison = Entry(
        account=account, entry_id="poison-1", amount=Decimal("13.37"), memo=POISON
    )
    message = poison.message()
    stream = list(workload.stream)
    stream.insert(len(stream) // 2, message)
    await daemon.start(
        {
            "daemon": {"tree": "tests.reliability.trees:build_poison_tree"},
            "core": {"max-attempts": 3},
        }
    )
    await daemon.wait_ready()
    assert (await scenario.publish(stream)).confirmed == len(stream)

    [letter] = await wait_dead_letters(scenario.pg_dsn, 1)
    assert letter["message_id"] == poison.message_id
    assert letter["reason"] == "attempts_exhausted"
    assert letter["attempts"] == 3
    assert letter["body"] == message.body
    assert "poison memo" in letter["detail"]
    assert await journal_stages(scenario.pg_dsn, poison.message_id) == [
        "retry_scheduled",
        "retry_scheduled",
        "dead_lettered",
    ]

    outcome = await scenario.finish(workload)
    assert outcome.report.dead_letters == 1
    [dead] = await take(scenario.amqp_url, "q2c.dead", 1)
    assert dead.message_id == poison.message_id
    assert dead.body == message.body
    assert dead.headers["x-q2c-reason"] == "attempts_exhausted"
    assert dead.headers["x-q2c-attempt"] == 3
    assert dead.headers.get("x-first-death-reason") != "delivery_limit"
    left = await queue_stats(scenario.amqp_url, ["q2c.retry.500ms", "q2c.retry.1s"])
    assert [s.ready for s in left.values()] == [0, 0]
