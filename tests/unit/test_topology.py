from __future__ import annotations

import re

from broker.config import TopologyConfig
from broker.transport.topology import (
    WorkflowRoute,
    build_topology,
    retry_exchange,
    retry_label,
)


def test_every_name_is_q2c_and_policies_do_not_overlap() -> None:
    """All names start with q2c.; each queue matches exactly one policy."""
    topo = build_topology(
        TopologyConfig(
            shards=3,
            systems=("erp-cloud",),
            event_queues={"q2c.events.out": ("ledger.entry.applied",)},
        ),
        [WorkflowRoute(name="ledger", event_types=("ledger.entry.posted",))],
    )
    names = [e.name for e in topo.exchanges] + [q.name for q in topo.queues]
    assert all(n.startswith("q2c.") for n in names)
    for queue in topo.queues:
        matching = [p.name for p in topo.policies if re.search(p.pattern, queue.name)]
        assert len(matching) == 1, (queue.name, matching)
        assert queue.arguments["x-queue-type"] == "quorum"
    shards = [q for q in topo.queues if q.name.startswith("q2c.wf.ledger.")]
    assert [q.name for q in shards] == [f"q2c.wf.ledger.{n}" for n in range(3)]
    assert all(q.single_active_consumer for q in shards)


def test_retry_tiers_dead_letter_back_through_the_default_exchange() -> None:
    """A tier queue has its TTL and returns messages by their own routing key."""
    topo = build_topology(TopologyConfig(retry_tiers_s=(0.5, 5.0)), [])
    tier = topo.queue(retry_exchange(0.5))
    assert tier.name == "q2c.retry.500ms"
    assert tier.message_ttl_ms == 500
    assert tier.arguments["x-dead-letter-exchange"] == ""
    assert retry_label(600.0) == "600s"


def test_takes_says_whether_a_binding_of_q2c_events_reads_a_type() -> None:
    """Workflow types and event-queue patterns are read; the rest go unrouted."""
    topology = build_topology(
        TopologyConfig(event_queues={"q2c.events.audit": ("order.*",)}),
        [WorkflowRoute(name="deal", event_types=("quote.approved",))],
    )
    assert topology.takes("quote.approved")
    assert topology.takes("order.booked")
    assert not topology.takes("order.booked.late")
    assert not topology.takes("q2c.deal.completed")
