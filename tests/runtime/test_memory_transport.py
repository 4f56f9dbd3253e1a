"""The in-process transport routes, bounds, delays and redelivers like RabbitMQ."""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

from broker.config import TopologyConfig
from broker.errors import ConfigError, TransportUnavailable
from broker.transport import Delivery, OutgoingMessage, PublishOutcome
from broker.transport.memory import MemorySubscription, MemoryTransport
from broker.transport.topology import (
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    UNROUTED,
    UNROUTED_MAX_LENGTH,
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
    Topology,
    WorkflowRoute,
    build_topology,
    retry_exchange,
    shard_queue,
)
from broker.transport.vhost import topic_matches

pytestmark = pytest.mark.anyio

ACK, NACK, RETURNED = PublishOutcome.ACK, PublishOutcome.NACK, PublishOutcome.RETURNED
ERP = "q2c.sys.erp"
AUDIT = "q2c.events.audit"
CANCELS = "q2c.events.cancels"
SHARDS = [shard_queue("deal", n) for n in range(4)]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


def topology(**overrides: object) -> Topology:
    cfg = {
        "shards": 4,
        "retry_tiers_s": (5.0,),
        "systems": ("erp",),
        "event_queues": {AUDIT: ("order.*",), CANCELS: ("#.cancelled",)},
        "delivery_limit": 3,
        **overrides,
    }
    workflows = [WorkflowRoute(name="deal", event_types=("quote.approved",))]
    return build_topology(TopologyConfig(**cfg), workflows)  # type: ignore[arg-type]


def msg(
    key: str,
    *,
    exchange: str = EVENTS_EXCHANGE,
    n: int = 0,
    correlation_id: str | None = None,
) -> OutgoingMessage:
    return OutgoingMessage(
        exchange=exchange,
        routing_key=key,
        body=f"body-{n}".encode(),
        message_id=f"m-{n}",
        correlation_id=correlation_id,
    )


def to_erp(n: int) -> OutgoingMessage:
    return msg(ERP, exchange="", n=n)


async def take(sub: MemorySubscription, n: int) -> list[Delivery]:
    """Exactly *n* deliveries, or fail within a second."""
    got: list[Delivery] = []
    with anyio.fail_after(1):
        while len(got) < n:
            got += await sub.batch(n - len(got))
    return got


@pytest.fixture
def transport() -> MemoryTransport:
    return MemoryTransport(topology())


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.b", "a.b", True),
        ("a.b", "a.bb", False),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("*", "", False),
        ("*.b.*", "a.b.c", True),
        ("#", "", True),
        ("#", "a.b.c", True),
        ("a.#", "a", True),
        ("#.c", "a.b.c", True),
        ("a.#.c", "a.c", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y.d", False),
        ("#.b.#", "a.b.c", True),
    ],
)
def test_topic_matching_follows_amqp_words(
    pattern: str, key: str, matches: bool
) -> None:
    """``*`` is exactly one dot-separated word, ``#`` zero or more."""
    assert topic_matches(pattern, key) is matches


async def test_topic_exchange_routes_to_every_matching_queue(
    transport: MemoryTransport,
) -> None:
    """A topic publish reaches each queue with a matching binding, once."""
    assert await transport.publish([msg("order.cancelled")], timeout_s=1) == [ACK]
    assert await transport.publish([msg("order.placed")], timeout_s=1) == [ACK]
    assert await transport.publish([msg("invoice.cancelled")], timeout_s=1) == [ACK]

    assert transport.queue_depth(AUDIT) == 2
    assert transport.queue_depth(CANCELS) == 2


async def test_direct_fanout_and_exchange_to_exchange_bindings() -> None:
    """Direct matches the key exactly, fanout ignores it, e2e bindings chain."""
    topo = Topology(
        exchanges=(
            ExchangeSpec(name="in", type="direct"),
            ExchangeSpec(name="all", type="fanout"),
        ),
        queues=(QueueSpec(name="a"), QueueSpec(name="b"), QueueSpec(name="c")),
        bindings=(
            BindingSpec(source="in", destination="a", routing_key="k1"),
            BindingSpec(
                source="in",
                destination="all",
                destination_type="exchange",
                routing_key="k2",
            ),
            BindingSpec(source="all", destination="b"),
            BindingSpec(source="all", destination="c"),
            BindingSpec(source="all", destination="a"),
        ),
        policies=(),
        retry_tiers_s=(),
    )
    transport = MemoryTransport(topo)

    outcomes = await transport.publish(
        [msg("k1", exchange="in"), msg("k2", exchange="in"), msg("k3", exchange="in")],
        timeout_s=1,
    )

    assert outcomes == [ACK, ACK, RETURNED]
    assert [transport.queue_depth(q) for q in "abc"] == [2, 1, 1]


async def test_consistent_hash_sends_each_correlation_id_to_one_stable_shard(
    transport: MemoryTransport,
) -> None:
    """Through q2c.events → q2c.wf.deal, one key always lands on the same shard."""
    keys = [f"deal-{i}" for i in range(40)]
    for _ in range(3):
        for key in keys:
            outcome = await transport.publish(
                [msg("quote.approved", correlation_id=key)], timeout_s=1
            )
            assert outcome == [ACK]

    depths = [transport.queue_depth(q) for q in SHARDS]
    assert sum(depths) == 120
    assert all(d % 3 == 0 for d in depths)  # a key's three copies stay together
    assert sum(1 for d in depths if d) >= 2  # and keys spread over shards


async def test_default_exchange_routes_by_queue_name(
    transport: MemoryTransport,
) -> None:
    """Exchange "" delivers to the queue named by the routing key, or returns."""
    outcomes = await transport.publish(
        [to_erp(0), msg("q2c.sys.nope", exchange="")], timeout_s=1
    )

    assert outcomes == [ACK, RETURNED]
    assert transport.queue_depth(ERP) == 1


async def test_unknown_exchange_or_queue_is_returned(
    transport: MemoryTransport,
) -> None:
    """No such exchange, or no such queue: RETURNED, nothing stored."""
    outcomes = await transport.publish(
        [msg("order.placed", exchange="q2c.nope"), msg("q2c.sys.none", exchange="")],
        timeout_s=1,
    )

    assert outcomes == [RETURNED, RETURNED]
    assert transport.queue_depth(AUDIT) == 0
    assert transport.queue_depth(UNROUTED) == 0


async def test_unrouted_events_keep_the_newest_in_q2c_unrouted() -> None:
    """q2c.events' alternate exchange; past its max-length the oldest goes."""
    transport = MemoryTransport(topology())
    outcomes = await transport.publish(
        [msg("nobody.listens", n=n) for n in range(UNROUTED_MAX_LENGTH + 2)],
        timeout_s=5,
    )

    assert set(outcomes) == {ACK}
    assert transport.queue_depth(UNROUTED) == UNROUTED_MAX_LENGTH
    [oldest] = await take(await transport.subscribe(UNROUTED, prefetch=1), 1)
    assert oldest.message_id == "m-2"
    assert transport.queue_depth(AUDIT) == 0


async def test_full_queue_nacks_but_other_destinations_keep_the_message() -> None:
    """max-length with reject-publish: NACK once any destination is full."""
    transport = MemoryTransport(topology(queue_max_length=2))
    assert await transport.publish(
        [msg("order.x", n=i) for i in range(3)], timeout_s=1
    ) == [
        ACK,
        ACK,
        NACK,
    ]

    outcome = await transport.publish([msg("order.cancelled", n=9)], timeout_s=1)

    assert outcome == [NACK]  # audit is full ...
    assert transport.queue_depth(CANCELS) == 1  # ... cancels stored it anyway


async def test_limit_counts_ready_messages_only() -> None:
    """Unacknowledged deliveries do not count toward max-length, as on RabbitMQ."""
    transport = MemoryTransport(topology(), max_length=1)
    sub = await transport.subscribe(ERP, prefetch=1)
    assert await transport.publish([to_erp(0)], timeout_s=1) == [ACK]
    await take(sub, 1)

    assert await transport.publish([to_erp(1), to_erp(2)], timeout_s=1) == [ACK, NACK]


async def test_retry_tier_returns_the_message_to_its_origin_after_the_ttl() -> None:
    """A message waits its tier's TTL, then dead-letters to the queue in its key."""
    clock = FakeClock()
    transport = MemoryTransport(topology(), clock=clock)
    tier = retry_exchange(5.0)
    assert await transport.publish([msg(ERP, exchange=tier)], timeout_s=1) == [ACK]

    clock.now += 4.9
    transport.run_timers()
    assert (transport.queue_depth(tier), transport.queue_depth(ERP)) == (1, 0)

    clock.now += 0.1
    transport.run_timers()
    assert (transport.queue_depth(tier), transport.queue_depth(ERP)) == (0, 1)
    [back] = await take(await transport.subscribe(ERP, prefetch=1), 1)
    assert (back.exchange, back.routing_key, back.body) == ("", ERP, b"body-0")
    assert back.headers is not None
    assert back.headers["x-first-death-reason"] == "expired"
    assert back.headers["x-first-death-queue"] == tier


async def test_a_waiting_batch_wakes_when_a_retry_comes_due() -> None:
    """No timer task is needed: the consumer's wait ends at the next due time."""
    transport = MemoryTransport(topology(retry_tiers_s=(0.05,)))
    sub = await transport.subscribe(ERP, prefetch=1)
    await transport.publish([msg(ERP, exchange=retry_exchange(0.05))], timeout_s=1)

    [back] = await take(sub, 1)

    assert back.message_id == "m-0"


async def test_retry_waits_while_its_origin_is_full() -> None:
    """At-least-once dead-lettering: a due retry stays parked, then moves."""
    clock = FakeClock()
    transport = MemoryTransport(topology(queue_max_length=1), clock=clock)
    tier = retry_exchange(5.0)
    await transport.publish([to_erp(0), msg(ERP, exchange=tier, n=1)], timeout_s=1)

    clock.now += 5
    with capture_logs() as logs:
        transport.run_timers()
    assert transport.queue_depth(tier) == 1
    assert [e["event"] for e in logs] == ["dead_letter_deferred"]

    sub = await transport.subscribe(ERP, prefetch=5)
    [first] = await take(sub, 1)
    sub.ack(first.tag)
    clock.now += 1
    [second] = await take(sub, 1)

    assert (first.message_id, second.message_id) == ("m-0", "m-1")
    assert transport.queue_depth(tier) == 0


async def test_prefetch_limits_unacknowledged_deliveries(
    transport: MemoryTransport,
) -> None:
    """Only *prefetch* deliveries are outstanding; an ack frees one more."""
    await transport.publish([to_erp(i) for i in range(5)], timeout_s=1)
    sub = await transport.subscribe(ERP, prefetch=2)

    first = await sub.batch(10)
    assert [d.message_id for d in first] == ["m-0", "m-1"]
    assert transport.status()["queues"][ERP] == {
        "ready": 3,
        "unacked": 2,
        "consumers": 1,
    }

    sub.ack(first[0].tag)
    assert [d.message_id for d in await sub.batch(10)] == ["m-2"]


async def test_multiple_ack_settles_every_earlier_delivery(
    transport: MemoryTransport,
) -> None:
    """ack(tag, multiple=True) settles up to and including tag, nothing after."""
    await transport.publish([to_erp(i) for i in range(3)], timeout_s=1)
    sub = await transport.subscribe(ERP, prefetch=10)
    deliveries = await take(sub, 3)

    sub.ack(deliveries[1].tag, multiple=True)
    await sub.close()

    [again] = await take(await transport.subscribe(ERP, prefetch=10), 1)
    assert (again.message_id, again.redelivered) == ("m-2", True)


async def test_close_returns_unacked_to_the_front_marked_redelivered(
    transport: MemoryTransport,
) -> None:
    """Unacked deliveries come back first, in order, redelivered and counted."""
    await transport.publish([to_erp(i) for i in range(3)], timeout_s=1)
    sub = await transport.subscribe(ERP, prefetch=2)
    await take(sub, 2)

    await sub.close()

    with pytest.raises(TransportUnavailable):
        await sub.batch(1)
    again = await take(await transport.subscribe(ERP, prefetch=10), 3)
    assert [(d.message_id, d.redelivered) for d in again] == [
        ("m-0", True),
        ("m-1", True),
        ("m-2", False),
    ]
    assert again[0].headers == {"x-delivery-count": 1}


async def test_disconnect_fails_waiting_batches_and_redelivers_once(
    transport: MemoryTransport,
) -> None:
    """simulate_disconnect(): batch() raises, every unacked delivery comes back once."""
    await transport.publish([to_erp(i) for i in range(2)], timeout_s=1)
    holder = await transport.subscribe(ERP, prefetch=1)
    other = await transport.subscribe(ERP, prefetch=1)
    await take(holder, 1)
    await take(other, 1)
    idle = await transport.subscribe(AUDIT, prefetch=1)
    failures: list[TransportUnavailable] = []

    async def wait_on_idle() -> None:
        with pytest.raises(TransportUnavailable) as info:
            await idle.batch(1)
        failures.append(info.value)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_on_idle)
        await anyio.wait_all_tasks_blocked()
        transport.simulate_disconnect()

    assert len(failures) == 1
    again = await take(await transport.subscribe(ERP, prefetch=5), 2)
    assert sorted(d.message_id or "" for d in again) == ["m-0", "m-1"]
    assert all(d.headers == {"x-delivery-count": 1} for d in again)


async def test_single_active_consumer_fails_over_on_close(
    transport: MemoryTransport,
) -> None:
    """On a shard queue only the first consumer receives; the next takes over."""
    shard = SHARDS[0]
    active = await transport.subscribe(shard, prefetch=10)
    standby = await transport.subscribe(shard, prefetch=10)
    await transport.publish(
        [msg(shard, exchange="", n=i) for i in range(3)], timeout_s=1
    )

    assert len(await take(active, 3)) == 3
    assert transport.status()["queues"][shard]["consumers"] == 2
    assert transport.queue_depth(shard) == 3  # all with the active one

    await active.close()

    again = await take(standby, 3)
    assert [d.message_id for d in again] == ["m-0", "m-1", "m-2"]
    assert all(d.redelivered for d in again)


async def test_competing_consumers_share_a_queue(transport: MemoryTransport) -> None:
    """Without single-active-consumer, consumers with credit take turns."""
    one = await transport.subscribe(ERP, prefetch=1)
    two = await transport.subscribe(ERP, prefetch=1)

    await transport.publish([to_erp(0), to_erp(1)], timeout_s=1)

    assert [d.message_id for d in await take(one, 1) + await take(two, 1)] == [
        "m-0",
        "m-1",
    ]


async def test_reject_requeues_or_dead_letters_by_policy(
    transport: MemoryTransport,
) -> None:
    """reject(requeue=True) redelivers; requeue=False goes to q2c.dead (policy DLX)."""
    await transport.publish([to_erp(0)], timeout_s=1)
    sub = await transport.subscribe(ERP, prefetch=1)
    [first] = await take(sub, 1)

    sub.reject(first.tag, requeue=True)
    [second] = await take(sub, 1)
    sub.reject(second.tag, requeue=False)

    assert second.redelivered
    assert transport.queue_depth(ERP) == 0
    [dead] = await take(await transport.subscribe(DEAD_QUEUE, prefetch=1), 1)
    assert (dead.exchange, dead.message_id) == ("q2c.dead", "m-0")
    assert dead.headers is not None
    assert dead.headers["x-first-death-reason"] == "rejected"


async def test_delivery_limit_dead_letters_a_poison_message(
    transport: MemoryTransport,
) -> None:
    """delivery-limit 3: four deliveries, then the message is dead-lettered."""
    await transport.publish([to_erp(0)], timeout_s=1)
    sub = await transport.subscribe(ERP, prefetch=1)

    counts = []
    for _ in range(4):
        [d] = await take(sub, 1)
        counts.append((d.headers or {}).get("x-delivery-count"))
        sub.reject(d.tag, requeue=True)

    assert counts == [None, 1, 2, 3]
    assert transport.queue_depth(ERP) == 0
    [dead] = await take(await transport.subscribe(DEAD_QUEUE, prefetch=1), 1)
    assert dead.headers is not None
    assert dead.headers["x-first-death-reason"] == "delivery_limit"


async def test_an_unknown_tag_closes_the_subscription_like_rabbitmq(
    transport: MemoryTransport,
) -> None:
    """A double ack is a channel error: the subscription dies and redelivers."""
    await transport.publish([to_erp(0), to_erp(1)], timeout_s=1)
    sub = await transport.subscribe(ERP, prefetch=2)
    first, _ = await take(sub, 2)
    sub.ack(first.tag)

    with capture_logs() as logs:
        sub.ack(first.tag)

    assert logs[0]["event"] == "delivery_tag_unknown"
    with pytest.raises(TransportUnavailable, match="unknown tag"):
        await sub.batch(1)
    assert transport.queue_depth(ERP) == 1


async def test_properties_survive_routing(transport: MemoryTransport) -> None:
    """Body, ids, type, content type and headers reach the consumer unchanged."""
    sent = OutgoingMessage(
        exchange=EVENTS_EXCHANGE,
        routing_key="order.placed",
        body=b'{"x": 1}',
        message_id="id-1",
        correlation_id="deal-1",
        type="order.placed",
        content_type="application/json",
        headers={"x-attempt": 2, "traceparent": "00-abc-def-01"},
    )
    await transport.publish([sent], timeout_s=1)

    [got] = await take(await transport.subscribe(AUDIT, prefetch=1), 1)

    assert (got.body, got.message_id, got.correlation_id) == (
        b'{"x": 1}',
        "id-1",
        "deal-1",
    )
    assert (got.type, got.content_type) == ("order.placed", "application/json")
    assert (got.exchange, got.routing_key, got.redelivered) == (
        EVENTS_EXCHANGE,
        "order.placed",
        False,
    )
    assert got.headers == {"x-attempt": 2, "traceparent": "00-abc-def-01"}


async def test_closed_transport_refuses_work(transport: MemoryTransport) -> None:
    """After aclose(): publishes are indeterminate, subscribing fails."""
    sub = await transport.subscribe(ERP, prefetch=1)

    await transport.aclose()

    assert await transport.publish([to_erp(0)], timeout_s=1) == [
        PublishOutcome.INDETERMINATE
    ]
    with pytest.raises(TransportUnavailable):
        await transport.subscribe(ERP, prefetch=1)
    with pytest.raises(TransportUnavailable):
        await sub.batch(1)
    status = transport.status()
    assert status["connections"]["memory"]["state"] == "closed"
    assert status["indeterminate"] == 1


async def test_unknown_queue_and_bad_bindings_are_config_errors(
    transport: MemoryTransport,
) -> None:
    """Subscribing to an undeclared queue, or binding to one, names it."""
    with pytest.raises(ConfigError, match=r"q2c\.sys\.nope"):
        await transport.subscribe("q2c.sys.nope", prefetch=1)
    with pytest.raises(ConfigError, match="'x' -> 'y'"):
        MemoryTransport(
            Topology(
                exchanges=(),
                queues=(),
                bindings=(BindingSpec(source="x", destination="y"),),
                policies=(),
                retry_tiers_s=(),
            )
        )


async def test_status_and_reprs_report_counters_like_the_amqp_transport(
    transport: MemoryTransport,
) -> None:
    """status() has the AMQP transport's keys plus per-queue counts; reprs agree."""
    sub = await transport.subscribe(ERP, prefetch=32)
    await transport.publish(
        [to_erp(0), to_erp(1), msg("q2c.sys.none", exchange="")], timeout_s=1
    )
    first, _ = await take(sub, 2)
    sub.ack(first.tag)
    transport.simulate_disconnect()

    status = transport.status()

    assert {k: status[k] for k in ("published", "confirmed", "returned", "nacked")} == {
        "published": 3,
        "confirmed": 2,
        "returned": 1,
        "nacked": 0,
    }
    assert status["reconnects"] == 1
    assert status["subscriptions"] == []
    assert status["queues"][ERP] == {"ready": 1, "unacked": 0, "consumers": 0}
    assert sub.status() | {"consumer_tag": "-"} == {
        "queue": ERP,
        "consumer_tag": "-",
        "alive": False,
        "delivered": 2,
        "acked": 1,
        "rejected": 0,
        "buffered": 0,
        "unacked": 0,
    }
    fresh = await transport.subscribe(AUDIT, prefetch=32)
    assert repr(fresh) == "<MemorySubscription q2c.events.audit 0/32 unacked>"
    assert repr(transport) == "<MemoryTransport 10 queues 1 subscriptions>"
