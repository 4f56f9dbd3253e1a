"""`bench.rabbit_top` against the real node: its Erlang snippet still reads 3.10."""

from __future__ import annotations

import anyio
import pytest

from bench.rabbit_top import sample
from broker.transport import OutgoingMessage, PublishOutcome
from broker.transport.wire import WireConnection

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_publishing_connection_shows_under_its_name(amqp_url: str) -> None:
    """Publishes during the window land on the named channel and the queue."""
    name = f"rabbit-top {amqp_url.rsplit('/', 1)[1]}"
    conn = await WireConnection.open(
        amqp_url, name=name, heartbeat_s=30, connect_timeout_s=10
    )
    try:
        ch = await conn.channel()
        await ch.confirm_select()
        await ch.queue_declare("q2c.top", arguments={"x-queue-type": "quorum"})
        done = anyio.Event()

        async def publish() -> None:
            i = 0
            while not done.is_set():
                batch = [
                    OutgoingMessage(
                        exchange="",
                        routing_key="q2c.top",
                        body=b"{}",
                        message_id=str(i + n),
                    )
                    for n in range(50)
                ]
                i += 50
                outcomes = await ch.publish_batch(batch, 30)
                assert set(outcomes) == {PublishOutcome.ACK}

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(publish)
                result = await anyio.to_thread.run_sync(sample, 2.0)
                done.set()
    finally:
        await conn.close()

    assert result.reductions.get(f"channel {name}", 0) > 0
    assert result.reductions.get(f"connection {name}", 0) > 0
    assert result.reductions.get("queue q2c.top", 0) > 0
    assert result.cpu_s > 0
