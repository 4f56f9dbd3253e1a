"""The system actor on RabbitMQ and Postgres: an outage cancels its consumer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import aio_pika
import msgspec
import pytest

from broker.app import open_store, open_transport
from broker.commit import message_id_for
from broker.config import Config, load_config
from broker.gateway import GatewaySettings, SystemGateway
from broker.limits import BreakerState
from broker.runtime import Runtime
from broker.transport.topology import build_topology
from tests import services
from tests.polling import eventually
from tests.runtime.test_gateway import OUT, QUEUE, FakeErp, OrderCreated, command, serve

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

#: ready messages and consumers of a queue, as RabbitMQ counts them right now
QueueCounts = Callable[[], Awaitable[tuple[int, int]]]


def config(amqp_url: str, pg_dsn: str) -> Config:
    return load_config(
        environ={
            "BROKER__DAEMON__TRANSPORT": "amqp",
            "BROKER__DAEMON__STORE": "postgres",
            "BROKER__DAEMON__SHUTDOWN_S": "5",
            "BROKER__AMQP__URL": amqp_url,
            "BROKER__AMQP__MANAGEMENT_URL": services.MANAGEMENT_URL,
            "BROKER__AMQP__RECONNECT_INTERVAL_S": "0.05",
            "BROKER__AMQP__RECONNECT_MAX_S": "0.5",
            "BROKER__POSTGRES__DSN": pg_dsn,
            "BROKER__TOPOLOGY__SYSTEMS": '["erp"]',
            "BROKER__TOPOLOGY__RETRY_TIERS_S": "[0.2]",
            "BROKER__TOPOLOGY__EVENT_QUEUES": f'{{"{OUT}" = ["test.order.created"]}}',
            "BROKER__CORE__MAX_ATTEMPTS": "20",
        }
    )


@asynccontextmanager
async def opened(cfg: Config) -> AsyncIterator[Runtime]:
    """A runtime with the daemon's real store and transport (topology declared)."""
    rt = Runtime(cfg)
    store = await open_store(cfg)
    try:
        transport = await open_transport(cfg, build_topology(cfg.topology, []))
        try:
            rt.attach(store=store, transport=transport)
            yield rt
        finally:
            await transport.aclose()
    finally:
        rt.feed.close()
        await store.aclose()


@asynccontextmanager
async def queue_counts(url: str, queue: str) -> AsyncIterator[QueueCounts]:
    """Read *queue*'s consumer and ready-message counts with a passive declare."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()

        async def counts() -> tuple[int, int]:
            declared = await channel.declare_queue(queue, passive=True)
            result = declared.declaration_result
            return result.consumer_count or 0, result.message_count or 0

        yield counts


async def test_an_outage_cancels_the_consumer_until_a_probe_succeeds(
    amqp_url: str, pg_dsn: str
) -> None:
    """Breaker open: 0 consumers, commands wait in RabbitMQ; then all complete once."""
    erp = FakeErp()
    erp.outage = True
    settings = GatewaySettings(
        rate_per_s=1000,
        burst=100,
        concurrency=1,
        prefetch=2,
        breaker_failures=2,
        breaker_reset_s=1.5,
        breaker_reset_max_s=3.0,
    )
    async with (
        opened(config(amqp_url, pg_dsn)) as rt,
        queue_counts(amqp_url, QUEUE) as counts,
    ):
        gateway = SystemGateway(rt, erp, settings, rand=lambda: 0.0)
        erp.gateway = gateway
        async with serve(rt, gateway) as h:

            async def consumers(n: int) -> bool:
                return (await counts())[0] == n

            await eventually(lambda: consumers(1))
            await h.send(*(command(f"o-{n}") for n in range(5)))

            async def cancelled() -> int:
                n_consumers, ready = await counts()
                open_ = gateway.breaker.state is BreakerState.OPEN
                return ready if open_ and n_consumers == 0 else 0

            waiting = await eventually(cancelled, interval_s=0.05)
            erp.outage = False
            results = await h.results(5)
            await h.until("completed", 5, timeout_s=20)
            await eventually(lambda: consumers(1))
            journal = await rt.store.journal("deal-o-3")

    assert waiting >= 3  # the commands never called wait in the queue
    assert gateway.breaker.opened >= 1
    assert gateway.breaker.state is BreakerState.CLOSED
    states = [state for _, state, _ in erp.calls]
    assert states[:2] == ["closed", "closed"]
    assert "half_open" in states
    assert len(erp.effects) == 5  # one effect per command at the system
    orders = {msgspec.json.decode(r.data, type=OrderCreated).order_id for r in results}
    assert orders == {f"o-{n}" for n in range(5)}
    for r in results:
        assert r.id == message_id_for(r.idempotency_key)
    assert [j.stage for j in journal][-1] == "completed"
