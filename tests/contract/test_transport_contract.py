"""One behavioural suite for every `Transport`: the contract in broker.transport.

Every test talks to the transport only through the protocol (``publish``,
``subscribe``, ``batch``, ``ack``, ``reject``, ``close``), on the same
topology, so any transport that passes behaves the same for the daemon.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import anyio
import pytest

from broker.config import AmqpConfig, TopologyConfig
from broker.errors import TransportUnavailable
from broker.transport import (
    Delivery,
    OutgoingMessage,
    PublishOutcome,
    Subscription,
    Transport,
)
from broker.transport.amqp import AmqpTransport
from broker.transport.declare import declare_topology
from broker.transport.memory import MemoryTransport
from broker.transport.topology import (
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    UNROUTED,
    WorkflowRoute,
    build_topology,
    retry_exchange,
    shard_queue,
)
from tests import services

pytestmark = pytest.mark.anyio

ACK, NACK, RETURNED = PublishOutcome.ACK, PublishOutcome.NACK, PublishOutcome.RETURNED
ERP = "q2c.sys.erp"
AUDIT = "q2c.events.audit"
SHARDS = [shard_queue("deal", n) for n in range(2)]
MAX_LENGTH = 3
TOPOLOGY = build_topology(
    TopologyConfig(
        shards=2,
        retry_tiers_s=(0.2,),
        systems=("erp",),
        queue_max_length=MAX_LENGTH,
        event_queues={AUDIT: ("order.*",)},
    ),
    [WorkflowRoute(name="deal", event_types=("quote.approved",))],
)


@dataclass
class Harness:
    """A transport on `TOPOLOGY`, and how long to watch for "nothing arrives"."""

    transport: Transport
    quiet_s: float


# ---------------------------------------------------------------------------
# Parametrization hook: every transport the suite runs against.
#
# To add a transport, add a `pytest.param` here and a branch in `harness`.
# "memory-journal" keeps the queues in a SQLite file (the daemon's embedded
# mode). "amqp" runs `AmqpTransport` on a fresh vhost of the real RabbitMQ (hence the
# integration mark; it skips when RabbitMQ is down).
# ---------------------------------------------------------------------------
TRANSPORTS = [
    pytest.param("memory", id="memory"),
    pytest.param("memory-journal", id="memory-journal"),
    pytest.param("amqp", id="amqp", marks=pytest.mark.integration),
]


async def _open_amqp(request: pytest.FixtureRequest) -> Transport:
    """Declare `TOPOLOGY` on a fresh vhost, then start an `AmqpTransport` on it."""
    url: str = request.getfixturevalue("amqp_url")
    # declare_topology puts the policies first: queues are born with their
    # max-length and dead-letter exchange, so no test waits for them.
    await declare_topology(url, TOPOLOGY, management_url=services.MANAGEMENT_URL)
    transport = AmqpTransport(AmqpConfig(url=url), name="contract")
    await transport.start()
    return transport


@pytest.fixture(params=TRANSPORTS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Each transport of `TRANSPORTS`, opened on `TOPOLOGY` and closed after."""
    if request.param == "memory":
        transport: Transport = MemoryTransport(TOPOLOGY)
        quiet_s = 0.05
    elif request.param == "memory-journal":
        tmp_path = request.getfixturevalue("tmp_path")
        transport = await MemoryTransport.open(
            TOPOLOGY, journal=str(tmp_path / "queues.sqlite3")
        )
        quiet_s = 0.05
    else:
        transport = await _open_amqp(request)
        quiet_s = 0.5
    try:
        yield Harness(transport, quiet_s)
    finally:
        await transport.aclose()


def message(
    key: str,
    n: int = 0,
    *,
    exchange: str = "",
    correlation_id: str | None = None,
) -> OutgoingMessage:
    return OutgoingMessage(
        exchange=exchange,
        routing_key=key,
        body=f"body-{n}".encode(),
        message_id=f"m-{n}",
        correlation_id=correlation_id,
    )


async def publish(h: Harness, *messages: OutgoingMessage) -> list[PublishOutcome]:
    return await h.transport.publish(messages, timeout_s=5)


async def take(sub: Subscription, n: int) -> list[Delivery]:
    """Exactly *n* deliveries (fewer fails within 5 s)."""
    got: list[Delivery] = []
    with anyio.fail_after(5):
        while len(got) < n:
            got += await sub.batch(n - len(got))
    return got


async def nothing_more(h: Harness, sub: Subscription) -> None:
    """Fail if *sub* receives anything within the harness's quiet period."""
    with anyio.move_on_after(h.quiet_s):
        got = await sub.batch(10)
        pytest.fail(f"unexpected deliveries on {sub.queue}: {got}")


async def gather(subs: Sequence[Subscription], total: int) -> dict[str, list[Delivery]]:
    """Consume all *subs* at once until *total* deliveries arrived (5 s bound)."""
    got: dict[str, list[Delivery]] = {s.queue: [] for s in subs}
    enough = anyio.Event()

    async def pump(sub: Subscription) -> None:
        while True:
            got[sub.queue] += await sub.batch(10)
            if sum(map(len, got.values())) >= total:
                enough.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for sub in subs:
                tg.start_soon(pump, sub)
            await enough.wait()
            tg.cancel_scope.cancel()
    return got


def ids(deliveries: Sequence[Delivery]) -> list[str | None]:
    return [d.message_id for d in deliveries]


async def test_properties_arrive_intact(harness: Harness) -> None:
    """Body, ids, type, content type, headers and routing survive the trip."""
    sent = OutgoingMessage(
        exchange=EVENTS_EXCHANGE,
        routing_key="order.placed",
        body=b'{"n": 1}',
        message_id="id-1",
        correlation_id="deal-1",
        type="order.placed",
        content_type="application/json",
        headers={"x-attempt": 2, "traceparent": "00-abc-def-01"},
    )
    sub = await harness.transport.subscribe(AUDIT, prefetch=1)

    assert await publish(harness, sent) == [ACK]
    [got] = await take(sub, 1)

    assert (got.body, got.message_id, got.correlation_id) == (
        b'{"n": 1}',
        "id-1",
        "deal-1",
    )
    assert (got.type, got.content_type) == ("order.placed", "application/json")
    assert (got.exchange, got.routing_key, got.redelivered) == (
        EVENTS_EXCHANGE,
        "order.placed",
        False,
    )
    assert got.headers is not None
    assert got.headers["x-attempt"] == 2
    assert got.headers["traceparent"] == "00-abc-def-01"


async def test_an_event_nobody_takes_goes_to_unrouted_a_missing_queue_returns(
    harness: Harness,
) -> None:
    """An event no binding takes is kept (ACK); a missing queue is RETURNED.

    The first goes to q2c.events' alternate exchange, q2c.unrouted; the
    default exchange has none, so the second is never ACKed.
    """
    outcomes = await publish(
        harness,
        message("nobody.listens", 7, exchange=EVENTS_EXCHANGE),
        message("q2c.sys.none"),
    )

    assert outcomes == [ACK, RETURNED]
    sub = await harness.transport.subscribe(UNROUTED, prefetch=10)
    [kept] = await take(sub, 1)
    sub.ack(kept.tag)
    assert (kept.routing_key, kept.body) == ("nobody.listens", b"body-7")


async def test_a_full_queue_refuses_with_nack(harness: Harness) -> None:
    """max-length with reject-publish: the first fit, later ones are NACKed."""
    # One at a time: a quorum queue learns it is full asynchronously, so a
    # pipelined burst can overshoot the limit by more than one message.
    outcomes = [
        outcome
        for n in range(MAX_LENGTH + 3)
        for outcome in await publish(harness, message(ERP, n))
    ]

    assert outcomes[:MAX_LENGTH] == [ACK] * MAX_LENGTH
    assert outcomes[-1] == NACK
    assert set(outcomes) == {ACK, NACK}


async def test_batch_returns_at_most_max_n_in_delivery_order(harness: Harness) -> None:
    """batch(max_n) never exceeds max_n, and deliveries keep publish order."""
    await publish(harness, *(message(ERP, n) for n in range(MAX_LENGTH)))
    sub = await harness.transport.subscribe(ERP, prefetch=10)

    got: list[Delivery] = []
    with anyio.fail_after(5):
        while len(got) < MAX_LENGTH:
            batch = await sub.batch(2)
            assert 1 <= len(batch) <= 2
            got += batch

    assert ids(got) == ["m-0", "m-1", "m-2"]
    assert len({d.tag for d in got}) == MAX_LENGTH


async def test_prefetch_bounds_unacknowledged_deliveries(harness: Harness) -> None:
    """With prefetch 2 a third delivery waits for an ack."""
    await publish(harness, *(message(ERP, n) for n in range(3)))
    sub = await harness.transport.subscribe(ERP, prefetch=2)

    first = await take(sub, 2)
    await nothing_more(harness, sub)
    sub.ack(first[0].tag)

    assert ids(await take(sub, 1)) == ["m-2"]


async def test_multiple_ack_settles_earlier_deliveries_only(harness: Harness) -> None:
    """ack(tag, multiple=True) settles up to tag; the rest come back on close."""
    await publish(harness, *(message(ERP, n) for n in range(3)))
    sub = await harness.transport.subscribe(ERP, prefetch=10)
    got = await take(sub, 3)

    sub.ack(got[1].tag, multiple=True)
    await sub.close()

    again = await harness.transport.subscribe(ERP, prefetch=10)
    [back] = await take(again, 1)
    assert (back.message_id, back.redelivered) == ("m-2", True)
    await nothing_more(harness, again)


async def test_close_returns_unacknowledged_deliveries(harness: Harness) -> None:
    """Closing redelivers what was not acked; the closed subscription raises."""
    await publish(harness, message(ERP, 0), message(ERP, 1))
    sub = await harness.transport.subscribe(ERP, prefetch=10)
    await take(sub, 2)

    await sub.close()

    with pytest.raises(TransportUnavailable):
        await sub.batch(1)
    again = await take(await harness.transport.subscribe(ERP, prefetch=10), 2)
    assert sorted(d.message_id or "" for d in again) == ["m-0", "m-1"]
    assert all(d.redelivered for d in again)


async def test_reject_with_requeue_redelivers(harness: Harness) -> None:
    """reject(requeue=True): the same message comes back, marked redelivered."""
    await publish(harness, message(ERP, 0))
    sub = await harness.transport.subscribe(ERP, prefetch=1)
    [first] = await take(sub, 1)

    sub.reject(first.tag, requeue=True)

    [second] = await take(sub, 1)
    assert (second.message_id, second.redelivered) == ("m-0", True)


async def test_reject_without_requeue_dead_letters(harness: Harness) -> None:
    """reject(requeue=False) on a work queue lands in q2c.dead (policy DLX)."""
    dead = await harness.transport.subscribe(DEAD_QUEUE, prefetch=1)
    await publish(harness, message(ERP, 0))
    sub = await harness.transport.subscribe(ERP, prefetch=1)
    [got] = await take(sub, 1)

    sub.reject(got.tag, requeue=False)

    [letter] = await take(dead, 1)
    assert (letter.message_id, letter.body) == ("m-0", b"body-0")
    await nothing_more(harness, sub)


async def test_single_active_consumer_fails_over(harness: Harness) -> None:
    """On a shard queue one consumer gets everything; on close the next one does."""
    active = await harness.transport.subscribe(SHARDS[0], prefetch=10)
    standby = await harness.transport.subscribe(SHARDS[0], prefetch=10)
    await publish(harness, *(message(SHARDS[0], n) for n in range(3)))

    assert ids(await take(active, 3)) == ["m-0", "m-1", "m-2"]
    await nothing_more(harness, standby)
    await active.close()

    again = await take(standby, 3)
    assert ids(again) == ["m-0", "m-1", "m-2"]
    assert all(d.redelivered for d in again)


async def test_one_correlation_id_stays_on_one_shard(harness: Harness) -> None:
    """The consistent-hash hub sends every message of a deal to one shard queue."""
    subs = [await harness.transport.subscribe(q, prefetch=20) for q in SHARDS]
    deals = [f"deal-{i}" for i in range(6)]
    sent = [
        message("quote.approved", n, exchange=EVENTS_EXCHANGE, correlation_id=deal)
        for n, deal in enumerate(deals * 2)
    ]

    assert await publish(harness, *sent) == [ACK] * len(sent)

    got = await gather(subs, len(sent))
    homes = {
        deal: {q for q, ds in got.items() for d in ds if d.correlation_id == deal}
        for deal in deals
    }
    assert all(len(home) == 1 for home in homes.values()), homes
    assert sum(map(len, got.values())) == len(sent)


async def test_a_retry_tier_returns_the_message_to_its_origin(harness: Harness) -> None:
    """Published to a retry tier with key = origin queue, it returns after the TTL."""
    sub = await harness.transport.subscribe(ERP, prefetch=1)

    outcome = await publish(harness, message(ERP, 7, exchange=retry_exchange(0.2)))

    assert outcome == [ACK]
    [back] = await take(sub, 1)
    assert (back.message_id, back.body, back.routing_key) == ("m-7", b"body-7", ERP)
