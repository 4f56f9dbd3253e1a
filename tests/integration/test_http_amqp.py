"""Webhooks on RabbitMQ and Postgres: 202 once queued, 503 when a queue refuses."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import aiohttp
import anyio
import pytest

from broker import Daemon
from broker.config import Config
from broker.http import webhook_message_id
from broker.store import DeadLetterFilter
from broker.transport.wire import WireConnection
from tests import services
from tests.runtime.test_http import QUEUE, SOURCE, SYSTEM, payload, settings, sign

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.fixture
def run_dir() -> Iterator[str]:
    """A directory short enough for the control socket's AF_UNIX path."""
    directory = tempfile.mkdtemp(prefix="q2ch", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def config(amqp_url: str, pg_dsn: str, run_dir: str, **env: str) -> Config:
    return settings(
        BROKER__DAEMON__NAME=services.unique_name("http"),
        BROKER__DAEMON__TRANSPORT="amqp",
        BROKER__DAEMON__STORE="postgres",
        BROKER__DAEMON__TREE="tests.runtime.test_http:build_tree",
        BROKER__AMQP__URL=amqp_url,
        BROKER__AMQP__MANAGEMENT_URL=services.MANAGEMENT_URL,
        BROKER__POSTGRES__DSN=pg_dsn,
        BROKER__CONTROL__SOCKET_PATH=f"{run_dir}/brokerd.sock",
        BROKER__LOGGING__LEVEL="warning",
        **env,
    )


@asynccontextmanager
async def running(cfg: Config) -> AsyncIterator[Daemon]:
    daemon = Daemon(cfg)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(30):
            await daemon.started.wait()
        try:
            yield daemon
        finally:
            daemon.request_shutdown("test finished")


async def queue_depth(amqp_url: str) -> int:
    """Messages in the test queue, as RabbitMQ counts them right now."""
    conn = await WireConnection.open(
        amqp_url, name="test depth", heartbeat_s=10, connect_timeout_s=5
    )
    try:
        channel = await conn.channel()
        return (await channel.queue_declare(QUEUE, passive=True))[1]
    finally:
        await conn.close()


async def post(
    client: aiohttp.ClientSession, daemon: Daemon, body: bytes
) -> aiohttp.ClientResponse:
    async with client.post(
        f"{daemon.runtime.http_url}/webhooks/{SYSTEM}",
        data=body,
        headers={"X-Signature": sign(body), "Content-Type": "application/json"},
    ) as response:
        await response.read()
        return response


async def test_a_webhook_is_answered_202_once_its_message_is_in_the_queue(
    amqp_url: str, pg_dsn: str, run_dir: str
) -> None:
    """202 means confirmed: the queue holds the message when the answer arrives."""
    cfg = config(amqp_url, pg_dsn, run_dir)
    async with aiohttp.ClientSession() as client, running(cfg) as daemon:
        assert await queue_depth(amqp_url) == 0
        response = await post(client, daemon, payload({"id": "evt-1", "thing": "t1"}))
        assert response.status == 202
        assert await response.json() == {
            "accepted": 1,
            "message_ids": [webhook_message_id(SOURCE, "evt-1")],
        }
        assert await queue_depth(amqp_url) == 1

        bad = await post(client, daemon, b"[{}]")
        assert bad.status == 400
        (row,) = await daemon.runtime.store.list_dead_letters(DeadLetterFilter())
        assert row.body == b"[{}]"
        assert row.reason == "schema_invalid"


async def test_a_full_queue_with_reject_publish_is_answered_503(
    amqp_url: str, pg_dsn: str, run_dir: str
) -> None:
    """max-length 1 (the q2c.work policy, overflow reject-publish): NACK, then 503."""
    cfg = config(amqp_url, pg_dsn, run_dir, BROKER__TOPOLOGY__QUEUE_MAX_LENGTH="1")
    async with aiohttp.ClientSession() as client, running(cfg) as daemon:
        # One at a time: a quorum queue learns it is full asynchronously, so
        # it may take one more message than its max-length before refusing.
        answers = [
            await post(client, daemon, payload({"id": f"evt-{n}", "thing": "t"}))
            for n in range(4)
        ]
        statuses = [a.status for a in answers]
        assert statuses[0] == 202
        assert statuses[-1] == 503
        assert set(statuses) == {202, 503}
        refused = answers[-1]
        assert refused.headers["Retry-After"] == "7"
        assert await refused.json() == {
            "error": "queue_full",
            "detail": "the broker refused the events (a queue is full); retry later",
        }
        # Every 202 is in the queue, and nothing that was refused.
        assert await queue_depth(amqp_url) == statuses.count(202)
