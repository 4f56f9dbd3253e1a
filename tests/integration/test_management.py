"""``brokerctl queues`` on RabbitMQ: the management API's counts and failures."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import anyio
import pytest
import yarl

from broker.errors import ConfigError, TransportUnavailable
from broker.handler import DaemonControl
from broker.transport.management import ManagementApi, QueueCounts, list_queues
from tests import services
from tests.runtime.test_engine import OUT, config, running

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def declare_and_fill(amqp_url: str) -> None:
    """A classic q2c.* queue with two messages, and a queue that is not the broker's."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("q2c.test.one", durable=True)
        await channel.declare_queue("other.queue", durable=True)
        for n in range(2):
            await channel.default_exchange.publish(
                aio_pika.Message(body=f"{n}".encode()), routing_key="q2c.test.one"
            )


async def counted(api: ManagementApi, name: str, ready: int) -> QueueCounts:
    """Poll until the API reports *ready* messages on *name* (stats lag)."""
    with anyio.fail_after(20):
        while True:
            found = {q.name: q for q in await list_queues(api)}
            if name in found and found[name].ready == ready:
                return found[name]
            await anyio.sleep(0.2)


async def test_lists_only_the_q2c_queues_of_the_vhost_with_counts(
    amqp_url: str,
) -> None:
    """q2c.* queues of the URL's vhost, by name; counts and type as RabbitMQ says."""
    await declare_and_fill(amqp_url)
    api = ManagementApi(amqp_url, services.MANAGEMENT_URL, timeout_s=10)

    queue = await counted(api, "q2c.test.one", ready=2)
    names = [q.name for q in await list_queues(api)]

    assert api.vhost == services.vhost_of(amqp_url)
    assert queue == QueueCounts(
        name="q2c.test.one", type="classic", ready=2, unacked=0, consumers=0
    )
    assert names == ["q2c.test.one"]


async def test_a_refused_login_is_a_config_error_without_the_password(
    amqp_url: str,
) -> None:
    """A wrong password reads as a login problem; the password appears nowhere."""
    wrong = str(yarl.URL(amqp_url).with_password("s3cret-wrong"))
    api = ManagementApi(wrong, services.MANAGEMENT_URL, timeout_s=10)
    with pytest.raises(ConfigError, match="HTTP 401") as caught:
        await list_queues(api)
    assert "s3cret-wrong" not in str(caught.value)
    assert "s3cret-wrong" not in repr(api)


async def test_an_unreachable_api_is_transport_unavailable_and_redacted(
    amqp_url: str,
) -> None:
    """Nothing listening: TransportUnavailable naming the URL without credentials."""
    api = ManagementApi(amqp_url, "http://admin:pw-in-url@127.0.0.1:1", timeout_s=5)
    with pytest.raises(TransportUnavailable, match="unreachable") as caught:
        await list_queues(api)
    assert "http://127.0.0.1:1" in str(caught.value)
    assert "pw-in-url" not in str(caught.value)


async def test_the_daemon_answers_queues_from_the_management_api(
    tmp_path: Path, amqp_url: str
) -> None:
    """On RabbitMQ the handler reads its own vhost's queues; no URL or password."""
    cfg = config(
        tmp_path,
        BROKER__DAEMON__TRANSPORT="amqp",
        BROKER__AMQP__URL=amqp_url,
        BROKER__AMQP__MANAGEMENT_URL=services.MANAGEMENT_URL,
    )
    async with running(cfg) as daemon:
        result = await DaemonControl(daemon).queues()

    assert (result["transport"], result["vhost"]) == (
        "amqp",
        services.vhost_of(amqp_url),
    )
    by_name = {q["name"]: q for q in result["queues"]}
    assert OUT in by_name
    assert by_name[OUT]["type"] == "quorum"
    assert all(name.startswith("q2c.") for name in by_name)
    assert "guest" not in repr(result)
    assert services.MANAGEMENT_URL not in repr(result)
