"""declare_topology on a real RabbitMQ: what lands there, and how failures read."""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import aio_pika
import anyio
import anyio.to_thread
import pytest
from aio_pika.abc import AbstractChannel
from structlog.testing import capture_logs

from broker.config import TopologyConfig
from broker.errors import ConfigError, TransportUnavailable
from broker.transport import declare
from broker.transport.declare import check_plugins, declare_topology
from broker.transport.topology import (
    DEAD_QUEUE,
    EVENTS_EXCHANGE,
    UNROUTED,
    UNROUTED_MAX_LENGTH,
    ExchangeSpec,
    Topology,
    WorkflowRoute,
    build_topology,
    retry_exchange,
    shard_queue,
)
from tests import services

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SHARDS = [shard_queue("deal", n) for n in range(2)]
SYSTEMS = ["q2c.sys.erp", "q2c.sys.crm"]
TIER = retry_exchange(0.2)
TOPOLOGY = build_topology(
    TopologyConfig(shards=2, retry_tiers_s=(0.2,), systems=("erp", "crm")),
    [WorkflowRoute(name="deal", event_types=("quote.approved", "order.placed"))],
)
EXPECTED_POLICY = {
    **dict.fromkeys([*SHARDS, *SYSTEMS], "q2c.work"),
    TIER: "q2c.retry",
    DEAD_QUEUE: "q2c.dead",
    UNROUTED: "q2c.unrouted",
}


def vhost_path(amqp_url: str) -> str:
    """The URL-quoted vhost of a test's AMQP URL, for management API paths."""
    return urllib.parse.quote(amqp_url.rsplit("/", 1)[1], safe="")


async def management(path: str) -> Any:
    """GET from the management API without blocking the event loop."""
    return await anyio.to_thread.run_sync(services.management, "GET", path)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10
) -> None:
    """Poll *check* until it holds; fail after *timeout_s*."""
    with anyio.fail_after(timeout_s):
        while not await check():  # noqa: ASYNC110 - polls a service, bounded
            await anyio.sleep(0.05)


@asynccontextmanager
async def channel(url: str) -> AsyncIterator[AbstractChannel]:
    """A confirming channel on a throw-away connection."""
    connection = await aio_pika.connect(url)
    async with connection:
        yield await connection.channel()


async def test_declares_quorum_queues_single_active_shards_and_policies(
    amqp_url: str,
) -> None:
    """Declaring twice is fine; queues are quorum, shards SAC, policies applied."""
    for _ in range(2):
        await declare_topology(
            amqp_url, TOPOLOGY, management_url=services.MANAGEMENT_URL
        )
    vhost = vhost_path(amqp_url)
    queues: dict[str, Any] = {}

    async def policies_visible() -> bool:
        listed = await management(f"/api/queues/{vhost}")
        queues.update({q["name"]: q for q in listed})
        return all(queues.get(n, {}).get("policy") for n in EXPECTED_POLICY)

    await eventually(policies_visible)

    assert set(queues) == set(EXPECTED_POLICY)
    assert {n: q["policy"] for n, q in queues.items()} == EXPECTED_POLICY
    assert {q["type"] for q in queues.values()} == {"quorum"}
    assert {
        n for n, q in queues.items() if q["arguments"].get("x-single-active-consumer")
    } == set(SHARDS)
    assert queues[TIER]["arguments"]["x-message-ttl"] == 200
    hub = await management(f"/api/exchanges/{vhost}/q2c.wf.deal")
    assert hub["type"] == "x-consistent-hash"
    assert hub["arguments"] == {"hash-property": "correlation_id"}
    work = await management(f"/api/policies/{vhost}/q2c.work")
    assert work["definition"]["delivery-limit"] == 20
    assert work["apply-to"] == "queues"
    events = await management(f"/api/exchanges/{vhost}/{EVENTS_EXCHANGE}")
    assert events["policy"] == "q2c.events"
    assert queues[UNROUTED]["effective_policy_definition"] == {
        "overflow": "drop-head",
        "max-length": UNROUTED_MAX_LENGTH,
    }


async def test_an_event_no_binding_takes_is_kept_in_unrouted_not_returned(
    amqp_url: str,
) -> None:
    """A mandatory publish nobody subscribed to is kept, not returned.

    The policy gives q2c.events its alternate exchange, q2c.unrouted.
    """
    await declare_topology(amqp_url, TOPOLOGY, management_url=services.MANAGEMENT_URL)
    async with channel(amqp_url) as ch:
        events = await ch.get_exchange(EVENTS_EXCHANGE)
        await events.publish(
            aio_pika.Message(b"x", message_id="m-1"),
            routing_key="q2c.deal.completed",
            mandatory=True,
        )
        kept = await ch.declare_queue(UNROUTED, passive=True)
        with anyio.fail_after(5):
            message = await kept.get()
        assert (message.message_id, message.routing_key) == (
            "m-1",
            "q2c.deal.completed",
        )
        await message.ack()


async def test_an_event_reaches_exactly_one_shard_per_correlation_id(
    amqp_url: str,
) -> None:
    """q2c.events → q2c.wf.deal → one shard queue, the same one for a key."""
    await declare_topology(amqp_url, TOPOLOGY, management_url=None)

    async with channel(amqp_url) as ch:
        events = await ch.get_exchange(EVENTS_EXCHANGE)
        for n in range(3):
            message = aio_pika.Message(
                b"x", correlation_id="deal-42", message_id=str(n)
            )
            await events.publish(message, routing_key="quote.approved")

        async def counts() -> list[int]:
            return [
                cast(
                    int,
                    (
                        await ch.declare_queue(q, passive=True)
                    ).declaration_result.message_count,
                )
                for q in SHARDS
            ]

        async def all_arrived() -> bool:
            return sum(await counts()) >= 3

        await eventually(all_arrived)
        assert sorted(await counts()) == [0, 3]


async def test_a_retry_tier_returns_the_message_to_its_origin_queue(
    amqp_url: str,
) -> None:
    """Sent to q2c.retry.200ms with key = a shard, it is back there after the TTL."""
    await declare_topology(amqp_url, TOPOLOGY, management_url=services.MANAGEMENT_URL)

    async with channel(amqp_url) as ch:
        tier = await ch.get_exchange(TIER)
        origin = await ch.get_queue(SHARDS[1])
        await tier.publish(
            aio_pika.Message(b"retry me", message_id="r-1"), routing_key=SHARDS[1]
        )
        with anyio.fail_after(5):
            async with origin.iterator() as messages:
                got = await anext(messages)
                await got.ack()

    assert (got.body, got.message_id) == (b"retry me", "r-1")


async def test_conflicting_arguments_name_the_queue_and_argument(amqp_url: str) -> None:
    """An existing classic q2c.dead: ConfigError naming the queue and argument."""
    async with channel(amqp_url) as ch:
        await ch.declare_queue(DEAD_QUEUE, durable=True)

    with pytest.raises(ConfigError, match=r"queue 'q2c\.dead' .*'x-queue-type'"):
        await declare_topology(amqp_url, TOPOLOGY, management_url=None)


async def test_a_missing_exchange_plugin_is_named_with_its_fix(
    amqp_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exchange type the broker lacks: ConfigError with the enabling command."""
    monkeypatch.setitem(
        declare.PLUGIN_FOR_EXCHANGE_TYPE, "x-q2c-missing", "rabbitmq_q2c_missing"
    )
    broken = Topology(
        exchanges=(ExchangeSpec(name="q2c.odd", type=cast(Any, "x-q2c-missing")),),
        queues=(),
        bindings=(),
        policies=(),
        retry_tiers_s=(),
    )
    fix = "enable it: rabbitmq-plugins enable rabbitmq_q2c_missing"

    await check_plugins(amqp_url, TOPOLOGY)  # the real plugin is on
    with pytest.raises(ConfigError, match=fix):
        await check_plugins(amqp_url, broken)
    with pytest.raises(ConfigError, match=fix):
        await declare_topology(amqp_url, broken, management_url=None)


@pytest.mark.parametrize("management_url", [None, "http://127.0.0.1:1"])
async def test_without_the_management_api_queues_work_and_a_warning_says_why(
    amqp_url: str, management_url: str | None
) -> None:
    """No management API: policies_not_applied at warning, no credentials logged."""
    with capture_logs() as logs:
        await declare_topology(amqp_url, TOPOLOGY, management_url=management_url)

    [warning] = [e for e in logs if e["event"] == "policies_not_applied"]
    assert warning["log_level"] == "warning"
    assert "delivery-limit" in warning["consequence"]
    assert "guest" not in repr(logs)
    async with channel(amqp_url) as ch:
        await ch.declare_queue(SHARDS[0], passive=True)


async def test_an_unreachable_broker_is_transport_unavailable() -> None:
    """Connection refused is transient: TransportUnavailable, cause chained."""
    with pytest.raises(TransportUnavailable) as info:
        await declare_topology(
            "amqp://guest:guest@127.0.0.1:1/",
            TOPOLOGY,
            management_url=None,
            timeout_s=2,
        )

    assert info.value.__cause__ is not None
