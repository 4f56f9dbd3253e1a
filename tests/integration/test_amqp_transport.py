"""AmqpTransport on a real RabbitMQ: the Transport contract plus reconnection."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import anyio
import pytest
from structlog.testing import capture_logs

from broker.config import AmqpConfig
from broker.errors import ConfigError, TransportUnavailable
from broker.transport import (
    Delivery,
    OutgoingMessage,
    PublishOutcome,
    Subscription,
    Transport,
)
from broker.transport.amqp import AmqpTransport
from broker.transport.wire import WireConnection
from tests import services

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ACK, INDETERMINATE = PublishOutcome.ACK, PublishOutcome.INDETERMINATE


def cfg(url: str, **kw: object) -> AmqpConfig:
    base: dict[str, object] = {
        "url": url,
        "reconnect_interval_s": 0.05,
        "reconnect_max_s": 0.5,
        "connect_timeout_s": 2.0,
    }
    return AmqpConfig(**(base | kw))  # type: ignore[arg-type]


def msgs(queue: str, start: int, n: int) -> list[OutgoingMessage]:
    return [
        OutgoingMessage(
            exchange="", routing_key=queue, body=f"{i}".encode(), message_id=f"m-{i}"
        )
        for i in range(start, start + n)
    ]


async def declare(url: str, *queues: str) -> None:
    conn = await WireConnection.open(
        url, name="test admin", heartbeat_s=0, connect_timeout_s=5
    )
    try:
        ch = await conn.channel()
        for queue in queues:
            await ch.queue_declare(queue)
    finally:
        await conn.close()


async def take(sub: Subscription, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    with anyio.fail_after(10):
        while len(got) < n:
            got += await sub.batch(n - len(got))
    return got


@pytest.fixture
async def transport(amqp_url: str) -> AsyncIterator[AmqpTransport]:
    t = AmqpTransport(cfg(amqp_url), name="tdaemon")
    with anyio.fail_after(10):
        await t.start()
    try:
        yield t
    finally:
        await t.aclose()


async def test_round_trip_and_status(amqp_url: str, transport: AmqpTransport) -> None:
    """Publish then consume through the transport; status counts it all."""
    await declare(amqp_url, "work")
    assert transport.ready().is_set()
    seam: Transport = transport  # mypy checks the Protocol is met
    sub: Subscription = await seam.subscribe("work", prefetch=100)
    assert await transport.publish(msgs("work", 0, 20), timeout_s=5) == [ACK] * 20
    assert await transport.publish(msgs("nowhere", 99, 1), timeout_s=5) == [
        PublishOutcome.RETURNED
    ]
    got = await take(sub, 20)
    assert [d.message_id for d in got] == [f"m-{i}" for i in range(20)]
    sub.ack(got[-1].tag, multiple=True)

    status = transport.status()
    assert status["connections"]["publish"]["name"] == "tdaemon publish"
    assert status["connections"]["consume"]["name"] == "tdaemon consume"
    assert {c["state"] for c in status["connections"].values()} == {"connected"}
    assert status["reconnects"] == 0
    assert (status["published"], status["confirmed"], status["returned"]) == (21, 20, 1)
    (sub_status,) = status["subscriptions"]
    assert sub_status["queue"] == "work"
    assert sub_status["consumer_tag"].startswith("amq.ctag-")
    assert (sub_status["delivered"], sub_status["acked"]) == (20, 20)
    await sub.close()
    assert transport.status()["subscriptions"] == []


async def test_a_body_over_max_body_bytes_is_delivered_cut_and_flagged(
    amqp_url: str,
) -> None:
    """``max_body_bytes`` reaches every subscription's channel.

    The daemon passes ``[core] max-message-bytes``: a bigger message arrives
    with its first limit + 1 bytes and `Delivery.oversize` set, for the
    consumer to dead-letter, instead of being buffered whole.
    """
    await declare(amqp_url, "work")
    t = AmqpTransport(cfg(amqp_url), name="limited", max_body_bytes=100)
    with anyio.fail_after(10):
        await t.start()
    try:
        sub = await t.subscribe("work", prefetch=10)
        body = bytes(range(256)) * 2
        fits = b"f" * 100
        out = [
            OutgoingMessage(exchange="", routing_key="work", body=b, message_id=i)
            for i, b in (("big", body), ("fits", fits))
        ]
        assert await t.publish(out, timeout_s=5) == [ACK, ACK]
        big, small = await take(sub, 2)
        sub.ack(small.tag, multiple=True)
    finally:
        await t.aclose()
    assert (big.message_id, big.body) == ("big", body[:101])
    assert big.oversize is not None
    assert "body of 512 bytes declared, over the 100-byte limit" in big.oversize
    assert (small.message_id, small.body, small.oversize) == ("fits", fits, None)


async def test_killed_connections_recover_and_redeliver(
    amqp_url: str, transport: AmqpTransport
) -> None:
    """After a forced close the unacked come back and publishing resumes by itself."""
    await declare(amqp_url, "work")
    sub = await transport.subscribe("work", prefetch=50)
    assert await transport.publish(msgs("work", 0, 10), timeout_s=5) == [ACK] * 10
    got = await take(sub, 10)
    sub.ack(got[4].tag, multiple=True)  # 0..4 done, 5..9 in flight

    vhost = services.vhost_of(amqp_url)
    for name in ("tdaemon consume", "tdaemon publish"):
        await anyio.to_thread.run_sync(services.close_connections, vhost, name)
    with anyio.fail_after(5), pytest.raises(TransportUnavailable):
        await sub.batch(10)
    sub.ack(got[-1].tag, multiple=True)  # a void tag: silently dropped
    sub.reject(got[-1].tag, requeue=True)

    with anyio.fail_after(10):
        again = await transport.subscribe("work", prefetch=50)
    redelivered = await take(again, 5)
    assert [d.message_id for d in redelivered] == [f"m-{i}" for i in range(5, 10)]
    assert all(d.redelivered for d in redelivered)
    again.ack(redelivered[-1].tag, multiple=True)

    with anyio.fail_after(10):
        outcomes = await transport.publish(msgs("work", 10, 5), timeout_s=5)
    assert outcomes == [ACK] * 5
    assert [d.message_id for d in await take(again, 5)] == [
        f"m-{i}" for i in range(10, 15)
    ]
    status = transport.status()
    assert status["reconnects"] == 2
    assert "CONNECTION_FORCED" in status["connections"]["publish"]["last_error"]


async def test_publish_while_unreachable_is_indeterminate_and_logged(
    amqp_url: str,
) -> None:
    """No broker: publish is INDETERMINATE; failures logged without the password."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    t = AmqpTransport(cfg(f"amqp://guest:s3cret-pw@127.0.0.1:{port}/v"), name="lonely")
    with capture_logs() as logs:
        with anyio.move_on_after(0.3):
            await t.start()
        with anyio.fail_after(5):
            outcomes = await t.publish(msgs("q", 0, 3), timeout_s=0.3)
        status = t.status()
        await t.aclose()
    assert outcomes == [INDETERMINATE] * 3
    assert status["indeterminate"] == 3
    assert status["connections"]["publish"]["state"] == "connecting"
    failures = [e for e in logs if e["event"] == "amqp_connect_failed"]
    assert failures
    assert {e["attempt"] for e in failures} >= {1, 2}
    assert "s3cret" not in repr(logs)
    assert t.status()["connections"]["publish"]["state"] == "closed"


async def test_subscribe_to_missing_queue_raises(transport: AmqpTransport) -> None:
    """A queue that does not exist is a TransportUnavailable (404) for the caller."""
    with pytest.raises(TransportUnavailable, match="404"):
        await transport.subscribe("absent", prefetch=10)
    assert transport.status()["connections"]["consume"]["state"] == "connected"


async def test_publish_channel_reopens_after_a_channel_error(
    amqp_url: str, transport: AmqpTransport
) -> None:
    """A publish to a missing exchange costs its channel only; the next one works."""
    await declare(amqp_url, "work")
    bad = [
        OutgoingMessage(
            exchange="no.such.exchange", routing_key="x", body=b"", message_id="b"
        )
    ]
    with capture_logs() as logs:
        assert await transport.publish(bad, timeout_s=5) == [INDETERMINATE]
        assert await transport.publish(msgs("work", 0, 3), timeout_s=5) == [ACK] * 3
    (closed,) = [e for e in logs if e["event"] == "amqp_channel_closed"]
    assert "404" in closed["reason"]
    assert transport.status()["reconnects"] == 0


async def test_aclose_ends_subscriptions(amqp_url: str) -> None:
    """After aclose, a subscription's batch raises and publish is indeterminate."""
    await declare(amqp_url, "work")
    t = AmqpTransport(cfg(amqp_url), name="closing")
    with anyio.fail_after(10):
        await t.start()
    sub = await t.subscribe("work", prefetch=10)
    await t.aclose()
    with anyio.fail_after(5), pytest.raises(TransportUnavailable):
        await sub.batch(1)
    assert await t.publish(msgs("work", 0, 1), timeout_s=1) == [INDETERMINATE]
    with pytest.raises(TransportUnavailable):
        await t.subscribe("work", prefetch=10)


def test_bad_url_is_a_config_error() -> None:
    """A non-AMQP URL is refused when the transport is built, not later."""
    with pytest.raises(ConfigError, match=r"amqp\.url"):
        AmqpTransport(AmqpConfig(url="http://example.com"))
