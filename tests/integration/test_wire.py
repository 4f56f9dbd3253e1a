"""The hot-path AMQP client against a real RabbitMQ (one fresh vhost per test)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import anyio
import pytest
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader

from broker.errors import TransportUnavailable
from broker.transport import Delivery, OutgoingMessage, PublishOutcome
from broker.transport.channel import WireChannel
from broker.transport.frames import ClosedByBroker, parse_url
from broker.transport.wire import WireConnection
from tests import services

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ACK, NACK = PublishOutcome.ACK, PublishOutcome.NACK
RETURNED, INDETERMINATE = PublishOutcome.RETURNED, PublishOutcome.INDETERMINATE


def msg(queue: str, i: int, body: bytes = b"{}", **kw: object) -> OutgoingMessage:
    return OutgoingMessage(
        exchange="",
        routing_key=queue,
        body=body,
        message_id=f"m-{i}",
        **kw,  # type: ignore[arg-type]
    )


async def open_conn(
    url: str, name: str = "test wire", heartbeat_s: int = 10
) -> WireConnection:
    return await WireConnection.open(
        url, name=name, heartbeat_s=heartbeat_s, connect_timeout_s=5
    )


@contextlib.asynccontextmanager
async def connected(url: str, **kw: object) -> AsyncIterator[WireConnection]:
    conn = await open_conn(url, **kw)  # type: ignore[arg-type]
    try:
        yield conn
    finally:
        await conn.close()


async def confirm_channel(conn: WireConnection, window: int = 2048) -> WireChannel:
    ch = await conn.channel()
    await ch.confirm_select(window=window)
    return ch


def publish_raw(
    conn: WireConnection, ch: WireChannel, queue: str, header: bytes, body: bytes
) -> None:
    """Publish *body* to *queue* with a content header frame written by hand.

    For properties no well-behaved client would send, which RabbitMQ passes
    through unchecked.
    """
    conn._write(
        pframe.marshal(commands.Basic.Publish(exchange="", routing_key=queue), ch.id)
        + struct.pack(">BHI", 2, ch.id, len(header))
        + header
        + b"\xce"
        + pframe.marshal(pbody.ContentBody(body), ch.id)
    )


async def queue_depth(ch: WireChannel, queue: str) -> int:
    return (await ch.queue_declare(queue, passive=True))[1]


class FaultProxy:
    """A TCP proxy to RabbitMQ that can hold or inject broker->client bytes."""

    def __init__(self) -> None:
        self.thawed = asyncio.Event()
        self.thawed.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._to_client: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def url(self, amqp_url: str) -> str:
        """*amqp_url*, through the proxy."""
        return amqp_url.replace("127.0.0.1:5672", f"127.0.0.1:{self.port}")

    def inject(self, data: bytes) -> None:
        """Send *data* to every client as if the broker had."""
        for writer in self._to_client:
            writer.write(data)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        self._to_client.append(writer)
        for src, dst, gate in ((reader, up_writer, False), (up_reader, writer, True)):
            task = asyncio.create_task(self._pump(src, dst, gate=gate))
            self._tasks.add(task)

    async def _pump(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, gate: bool
    ) -> None:
        try:
            while data := await src.read(65536):
                if gate:
                    await self.thawed.wait()
                dst.write(data)
        except ConnectionError:
            pass
        finally:
            dst.close()

    async def aclose(self) -> None:
        """Stop relaying and listening."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def proxy() -> AsyncIterator[FaultProxy]:
    p = FaultProxy()
    await p.start()
    try:
        yield p
    finally:
        await p.aclose()


async def test_round_trip_keeps_properties_and_headers(amqp_url: str) -> None:
    """Properties and headers we publish arrive intact, for us and for aio-pika."""
    async with connected(amqp_url) as conn:
        ch = await confirm_channel(conn)
        await ch.queue_declare("q")
        sent = OutgoingMessage(
            exchange="",
            routing_key="q",
            body=b'{"a": 1}',
            message_id="id-1",
            correlation_id="corr-1",
            type="order.placed",
            content_type="application/json",
            headers={"schema": "v2", "n": 7, "big": 2**40, "neg": -300},
        )
        assert await ch.publish_batch([sent, sent], 5) == [ACK, ACK]

        sub = await conn.channel()
        await sub.consume("q")
        with anyio.fail_after(5):
            got = await sub.get_batch(1)
        d = got[0]
        assert (d.tag, d.body, d.exchange, d.routing_key) == (1, sent.body, "", "q")
        assert (d.message_id, d.correlation_id, d.type) == (
            "id-1",
            "corr-1",
            "order.placed",
        )
        assert d.content_type == "application/json"
        assert d.headers == {"schema": "v2", "n": 7, "big": 2**40, "neg": -300}
        assert d.redelivered is False
        sub.ack(d.tag)

    pika = await aio_pika.connect(amqp_url)
    try:
        queue = await (await pika.channel()).get_queue("q")
        with anyio.fail_after(5):
            incoming = await queue.get()
        assert incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert incoming.message_id == "id-1"
        assert incoming.type == "order.placed"
        assert incoming.headers["n"] == 7
        assert incoming.timestamp is not None
        assert abs(
            incoming.timestamp - datetime.datetime.now(datetime.UTC)
        ) < datetime.timedelta(minutes=1)
        await incoming.ack()
    finally:
        await pika.close()


async def test_properties_that_are_not_utf8_do_not_cost_the_connection(
    amqp_url: str,
) -> None:
    """RabbitMQ passes short strings through unchecked: bad bytes are replaced.

    A strict decode took the whole connection down on every redelivery of
    such a message; now it arrives, to be judged by its body.
    """

    def short(raw: bytes) -> bytes:
        return bytes([len(raw)]) + raw

    body = b"{}"
    table = short(b"x-\xffname") + b"S" + struct.pack(">I", 3) + b"v\xfe1"
    flags = 0x2000 | 0x0080 | 0x0020  # headers, message-id, type
    header = (
        struct.pack(">HHQH", 60, 0, len(body), flags)
        + struct.pack(">I", len(table))
        + table
        + short(b"msg-\xff")
        + short(b"order.\xc3")
    )
    async with connected(amqp_url) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        publish_raw(conn, ch, "q", header, body)
        await ch.consume("q")
        with anyio.fail_after(5):
            [d] = await ch.get_batch(1)
        ch.ack(d.tag)
        assert (d.message_id, d.type, d.body) == ("msg-\ufffd", "order.\ufffd", body)
        assert d.headers == {"x-\ufffdname": b"v\xfe1"}
        assert await queue_depth(await conn.channel(), "q") == 0  # still connected


async def test_parses_rich_headers_published_by_aio_pika(amqp_url: str) -> None:
    """Nested tables, arrays, floats, booleans and timestamps in headers decode."""
    stamp = datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)
    headers: dict[str, Any] = {
        "x-death": [{"count": 1, "reason": "rejected", "routing-keys": ["q"]}],
        "ok": True,
        "ratio": 0.5,
        "at": stamp,
        "small": 3,
        "mid": 1000,
    }
    pika = await aio_pika.connect(amqp_url)
    try:
        channel = await pika.channel()
        await channel.declare_queue("rich", durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"payload", headers=headers, message_id="r1"),
            routing_key="rich",
        )
    finally:
        await pika.close()
    async with connected(amqp_url) as conn:
        ch = await conn.channel()
        await ch.consume("rich")
        with anyio.fail_after(5):
            (d,) = await ch.get_batch(10)
    assert d.body == b"payload"
    assert d.message_id == "r1"
    assert d.headers == headers


async def test_bodies_larger_than_frame_max_round_trip(amqp_url: str) -> None:
    """A body spanning several frames, and an empty body, arrive byte for byte."""
    async with connected(amqp_url) as conn:
        ch = await confirm_channel(conn)
        await ch.queue_declare("big")
        big = bytes(range(256)) * (3 * conn.frame_max // 256 + 7)
        outcomes = await ch.publish_batch([msg("big", 1, big), msg("big", 2, b"")], 10)
        assert outcomes == [ACK, ACK]
        sub = await conn.channel()
        await sub.consume("big")
        got: list[Delivery] = []
        with anyio.fail_after(5):
            while len(got) < 2:
                got += await sub.get_batch(10)
    assert len(big) > 3 * conn.frame_max
    assert [d.body for d in got] == [big, b""]


async def test_a_body_over_the_consumers_limit_arrives_cut_and_flagged(
    amqp_url: str,
) -> None:
    """Over *max_body_bytes*: the first limit + 1 bytes and why; the rest intact.

    Counted off frame by frame rather than assembled: RabbitMQ lets a message
    be 128 MiB, and a consumer with a large prefetch held every one whole.
    """
    async with connected(amqp_url) as conn:
        ch = await confirm_channel(conn)
        await ch.queue_declare("big")
        big = bytes(range(256)) * (3 * conn.frame_max // 256 + 7)
        small = b"s" * 1024
        outcomes = await ch.publish_batch(
            [msg("big", 1, big), msg("big", 2, small), msg("big", 3, b"")], 10
        )
        assert outcomes == [ACK, ACK, ACK]
        sub = await conn.channel()
        await sub.consume("big", max_body_bytes=1024)
        got: list[Delivery] = []
        with anyio.fail_after(5):
            while len(got) < 3:
                got += await sub.get_batch(10)
        sub.ack(got[-1].tag, multiple=True)
    assert [(d.message_id, d.body) for d in got] == [
        ("m-1", big[:1025]),
        ("m-2", small),
        ("m-3", b""),
    ]
    assert got[0].oversize == (
        f"body of {len(big)} bytes declared, over the 1024-byte limit: "
        "cut to its first 1025 bytes"
    )
    assert (got[1].oversize, got[2].oversize) == (None, None)


async def test_pipelined_publish_through_a_small_window_all_acked(
    amqp_url: str,
) -> None:
    """5,000 messages through a 256-message confirm window are all acked and queued."""
    async with connected(amqp_url) as conn:
        ch = await confirm_channel(conn, window=256)
        await ch.queue_declare("bulk")
        batch = [msg("bulk", i, b"x" * 512) for i in range(5000)]
        with anyio.fail_after(30):
            outcomes = await ch.publish_batch(batch, 30)
        assert outcomes == [ACK] * 5000
        assert ch.inflight == 0
        assert await queue_depth(ch, "bulk") == 5000


async def test_concurrent_batches_on_one_channel_settle_independently(
    amqp_url: str,
) -> None:
    """Batches published concurrently on one channel each get their own outcomes."""
    async with connected(amqp_url) as conn:
        ch = await confirm_channel(conn, window=64)
        await ch.queue_declare("conc")
        batches = [
            [msg("conc", i * 1000 + j) for j in range(300)]
            + [msg("nowhere", i * 1000 + 999)]
            for i in range(4)
        ]
        with anyio.fail_after(30):
            results = await asyncio.gather(*(ch.publish_batch(b, 30) for b in batches))
        for outcomes in results:
            assert outcomes == [ACK] * 300 + [RETURNED]
        assert await queue_depth(ch, "conc") == 1200


async def test_unroutable_message_is_returned(amqp_url: str) -> None:
    """A mandatory publish no queue receives is RETURNED; its neighbours are ACKed."""
    async with connected(amqp_url) as conn:
        ch = await confirm_channel(conn)
        await ch.queue_declare("real")
        batch = [msg("real", 1), msg("no-such-queue", 2), msg("real", 3)]
        assert await ch.publish_batch(batch, 5) == [ACK, RETURNED, ACK]


async def test_reject_publish_overflow_is_nacked(amqp_url: str) -> None:
    """A full queue with x-overflow reject-publish nacks what exceeds the limit."""
    async with connected(amqp_url) as conn:
        ch = await confirm_channel(conn)
        await ch.queue_declare(
            "full",
            arguments={"x-max-length": 10, "x-overflow": "reject-publish"},
        )
        outcomes = await ch.publish_batch([msg("full", i) for i in range(25)], 10)
    assert outcomes == [ACK] * 10 + [NACK] * 15


async def test_multiple_ack_settles_every_earlier_delivery(amqp_url: str) -> None:
    """ack(multiple) settles all earlier deliveries; nack with requeue redelivers."""
    async with connected(amqp_url) as conn:
        pub = await confirm_channel(conn)
        await pub.queue_declare("acks")
        await pub.publish_batch([msg("acks", i) for i in range(100)], 10)
        sub = await conn.channel()
        await sub.qos(100)
        await sub.consume("acks")
        got: list[Delivery] = []
        with anyio.fail_after(5):
            while len(got) < 100:
                got += await sub.get_batch(100)
        assert [d.tag for d in got] == list(range(1, 101))
        sub.ack(60, multiple=True)
        sub.nack(61, requeue=True)
        await sub.close()  # 62..100 return to the queue unacked
        assert await queue_depth(pub, "acks") == 40

        again = await conn.channel()
        await again.consume("acks")
        redelivered: list[Delivery] = []
        with anyio.fail_after(5):
            while len(redelivered) < 40:
                redelivered += await again.get_batch(100)
    assert {d.message_id for d in redelivered} == {f"m-{i}" for i in range(60, 100)}
    assert all(d.redelivered for d in redelivered)


async def test_channel_error_closes_only_that_channel(amqp_url: str) -> None:
    """Consuming a missing queue fails with 404 on its channel; the connection lives."""
    async with connected(amqp_url) as conn:
        ch = await conn.channel()
        with pytest.raises(ClosedByBroker) as info:
            await ch.consume("missing")
        assert info.value.code == 404
        assert ch.is_closed
        assert ch.close_code == 404
        with pytest.raises(TransportUnavailable):
            ch.ack(1)
        assert not conn.is_closed
        other = await conn.channel()
        assert (await other.queue_declare("fine"))[0] == "fine"


async def test_deleted_queue_cancels_the_consumer(amqp_url: str) -> None:
    """When the broker cancels a consumer (queue deleted), get_batch raises."""
    async with connected(amqp_url) as conn:
        ch = await conn.channel()
        await ch.queue_declare("doomed")
        await ch.consume("doomed")
        admin = await conn.channel()
        await admin.rpc(commands.Queue.Delete(queue="doomed"))
        with (
            anyio.fail_after(5),
            pytest.raises(TransportUnavailable, match="cancelled"),
        ):
            await ch.get_batch(10)


async def test_forced_close_fails_consumers_and_pending_publishes(
    amqp_url: str,
) -> None:
    """A connection closed via the management API ends consumers and publishes."""
    async with connected(amqp_url, name="doomed conn") as conn:
        ch = await confirm_channel(conn)
        await ch.queue_declare("f")
        sub = await conn.channel()
        await sub.consume("f")
        await anyio.to_thread.run_sync(
            services.close_connections, services.vhost_of(amqp_url), "doomed conn"
        )
        with anyio.fail_after(5):
            await conn.wait_closed()
            with pytest.raises(ClosedByBroker) as info:
                await sub.get_batch(1)
        assert info.value.code == 320
        assert conn.close_code == 320
        assert "CONNECTION_FORCED" in (conn.closed_reason or "")
        assert await ch.publish_batch([msg("f", 1)], 1) == [INDETERMINATE]
        with pytest.raises(TransportUnavailable):
            await conn.channel()


async def test_heartbeat_and_name_are_negotiated(amqp_url: str) -> None:
    """The requested heartbeat and connection name are what the broker records."""
    async with connected(amqp_url, name="hb probe", heartbeat_s=7) as conn:
        assert conn.heartbeat_s == 7
        vhost = services.vhost_of(amqp_url).replace("/", "%2F")
        with anyio.fail_after(10):
            while True:
                rows = await anyio.to_thread.run_sync(
                    services.management, "GET", f"/api/vhosts/{vhost}/connections"
                )
                if rows:
                    break
                await anyio.sleep(0.05)
        (row,) = rows
        assert row["timeout"] == 7
        props = row["client_properties"]
        assert props["connection_name"] == "hb probe"
        assert props["product"] == "q2c-broker"
        assert props["capabilities"]["publisher_confirms"] is True
        assert props["capabilities"]["connection.blocked"] is True


async def test_silent_broker_is_declared_dead_after_two_heartbeats(
    amqp_url: str, proxy: FaultProxy
) -> None:
    """No frame from the broker for 2x the heartbeat closes the connection."""
    conn = await open_conn(proxy.url(amqp_url), heartbeat_s=1)
    try:
        ch = await conn.channel()
        await ch.queue_declare("hb")
        await ch.consume("hb")
        proxy.thawed.clear()
        started = asyncio.get_running_loop().time()
        with anyio.fail_after(5):
            await conn.wait_closed()
            with pytest.raises(TransportUnavailable):
                await ch.get_batch(1)
        elapsed = asyncio.get_running_loop().time() - started
        # 2x the heartbeat at least; the checker ticks at half of it, and a
        # busy two-core machine may add a second of loop lag.
        assert 1.0 <= elapsed <= 4.0
        assert "no frame" in (conn.closed_reason or "")
    finally:
        proxy.thawed.set()
        await conn.close()


async def test_a_blocked_connection_gone_silent_is_declared_dead_too(
    amqp_url: str, proxy: FaultProxy
) -> None:
    """Blocked by an alarm, then cut: found dead, not waited on until unblocked.

    RabbitMQ keeps sending heartbeats to a blocked connection (it only stops
    watching the client's), so silence means the link is gone, blocked or not.
    """
    conn = await open_conn(proxy.url(amqp_url), heartbeat_s=1)
    try:
        ch = await conn.channel()
        await ch.queue_declare("hb-blocked")
        proxy.inject(pframe.marshal(commands.Connection.Blocked("test alarm"), 0))
        await ch.queue_declare("hb-blocked", passive=True)
        assert conn.is_blocked
        proxy.thawed.clear()
        with anyio.fail_after(6):
            await conn.wait_closed()
        assert "no frame" in (conn.closed_reason or "")
    finally:
        proxy.thawed.set()
        await conn.close()


async def test_publish_timeout_is_indeterminate_and_late_confirms_are_ignored(
    amqp_url: str, proxy: FaultProxy
) -> None:
    """Unconfirmed at the deadline means INDETERMINATE; late confirms do no harm."""
    async with connected(proxy.url(amqp_url), heartbeat_s=0) as conn:
        ch = await confirm_channel(conn)
        await ch.queue_declare("slow")
        proxy.thawed.clear()
        with anyio.fail_after(5):
            outcomes = await ch.publish_batch([msg("slow", i) for i in range(50)], 0.3)
        assert outcomes == [INDETERMINATE] * 50
        proxy.thawed.set()  # the 50 late confirms arrive now
        with anyio.fail_after(5):
            outcomes = await ch.publish_batch(
                [msg("slow", i) for i in range(50, 60)], 5
            )
        assert outcomes == [ACK] * 10
        assert ch.inflight == 0
        assert await queue_depth(ch, "slow") == 60


async def test_blocked_connection_holds_publishes_until_unblocked(
    amqp_url: str, proxy: FaultProxy
) -> None:
    """While blocked nothing is written: INDETERMINATE at the deadline, ACK after."""
    async with connected(proxy.url(amqp_url), heartbeat_s=0) as conn:
        ch = await confirm_channel(conn)
        await ch.queue_declare("held")
        proxy.inject(pframe.marshal(commands.Connection.Blocked("test alarm"), 0))
        # The injected frame precedes the reply to this round trip.
        await ch.queue_declare("held", passive=True)
        assert conn.is_blocked
        assert conn.blocked_reason == "test alarm"
        assert await ch.publish_batch([msg("held", 1)], 0.2) == [INDETERMINATE]
        assert await queue_depth(ch, "held") == 0  # never written

        async def unblock_soon() -> None:
            # Once the publish waits (held by the block), not before it.
            await anyio.wait_all_tasks_blocked()
            assert ch._writable_waiters, "the publish is not waiting"
            proxy.inject(pframe.marshal(commands.Connection.Unblocked(), 0))

        async with anyio.create_task_group() as tg:
            tg.start_soon(unblock_soon)
            with anyio.fail_after(5):
                outcomes = await ch.publish_batch([msg("held", 2)], 5)
        assert outcomes == [ACK]
        assert not conn.is_blocked


async def test_bad_password_is_refused_without_leaking_it(amqp_url: str) -> None:
    """Wrong credentials raise TransportUnavailable that never shows the password."""
    bad = amqp_url.replace("guest:guest@", "guest:hunter2-secret@")
    with pytest.raises(TransportUnavailable) as info:
        await open_conn(bad)
    text = f"{info.value} {info.value.__cause__!r}"
    assert "ACCESS_REFUSED" in str(info.value)
    assert "hunter2" not in text
    assert "hunter2" not in repr(parse_url(bad))


async def test_refused_and_silent_endpoints_raise_transport_unavailable() -> None:
    """A closed port fails at once; a peer that never speaks times out."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    with pytest.raises(TransportUnavailable, match="failed") as refused:
        await WireConnection.open(
            f"amqp://guest:guest@127.0.0.1:{free_port}/",
            name="t",
            heartbeat_s=0,
            connect_timeout_s=2,
        )
    assert isinstance(refused.value.__cause__, OSError)

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with (
            anyio.fail_after(5),
            pytest.raises(TransportUnavailable, match="timed out") as slow,
        ):
            await WireConnection.open(
                f"amqp://guest:guest@127.0.0.1:{port}/",
                name="t",
                heartbeat_s=0,
                connect_timeout_s=0.3,
            )
        assert isinstance(slow.value.__cause__, TimeoutError)
    finally:
        server.close()
        await server.wait_closed()


def test_url_parsing_decodes_the_vhost() -> None:
    """The vhost is url-decoded; an empty path means '/'."""
    assert parse_url("amqp://u:p@h:1234/a%2Fb").vhost == "a/b"
    assert parse_url("amqp://h").vhost == "/"
    assert parse_url("amqp://h/").vhost == "/"
    assert parse_url("amqps://h").port == 5671
    with pytest.raises(ValueError, match="scheme"):
        parse_url("http://h")


@pytest.mark.parametrize(
    "url",
    [
        "amqp://svc:s3cr#et@rabbit/prod",  # '#' ends the address: port 's3cr'
        "amqp://svc:1234/abcd@rabbit:5672/prod",  # '/' ends it: vhost 'abcd@...'
        "amqp://svc:ab?cd@rabbit/prod",
    ],
)
def test_a_password_with_unencoded_delimiters_never_shows_in_the_error(
    url: str,
) -> None:
    """The URL's boundaries moved: refused, naming the fix, quoting no part of it."""
    with pytest.raises(ValueError, match="percent-encode") as caught:
        parse_url(url)
    text = f"{caught.value} {caught.value.__cause__!r} {caught.value.__context__!r}"
    for piece in ("s3cr", "abcd", "ab?cd", "et@"):
        assert piece not in text


class _Sink:
    """Stands in for the socket: keeps what the client writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.data += part

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def published_ids(self) -> list[str]:
        """message_id of every content header written so far."""
        ids, view = [], bytes(self.data)
        while view:
            used, _, value = pframe.unmarshal(view)
            view = view[used:]
            if isinstance(value, pheader.ContentHeader):
                ids.append(str(value.properties.message_id))
        return ids


async def fake_channel(window: int) -> tuple[WireConnection, WireChannel, _Sink]:
    """A confirm-mode channel on a connection whose broker is this test."""
    conn = WireConnection(name="fake", heartbeat_s=0)
    sink = _Sink()
    conn.connection_made(sink)  # type: ignore[arg-type]
    holder: list[WireChannel] = []

    async def open_channel() -> None:
        ch = await conn.channel()
        holder.append(ch)
        await ch.confirm_select(window=window)

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_channel)
        await anyio.wait_all_tasks_blocked()
        conn.data_received(pframe.marshal(commands.Channel.OpenOk(), 1))
        await anyio.wait_all_tasks_blocked()
        conn.data_received(pframe.marshal(commands.Confirm.SelectOk(), 1))
    sink.data.clear()
    return conn, holder[0], sink


def confirm(tag: int, *, multiple: bool = False, nack: bool = False) -> bytes:
    method = (
        commands.Basic.Nack(delivery_tag=tag, multiple=multiple)
        if nack
        else commands.Basic.Ack(delivery_tag=tag, multiple=multiple)
    )
    return pframe.marshal(method, 1)


def returned(message_id: str) -> bytes:
    props = commands.Basic.Properties(message_id=message_id)
    return (
        pframe.marshal(commands.Basic.Return(312, "NO_ROUTE", "", "x"), 1)
        + pframe.marshal(pheader.ContentHeader(0, 2, props), 1)
        + pframe.marshal(pbody.ContentBody(b"{}"), 1)
    )


async def test_out_of_order_confirms_settle_each_message_once() -> None:
    """Single, multiple and out-of-order confirms, nacks and returns land right."""
    conn, ch, sink = await fake_channel(window=100)
    outcomes: list[PublishOutcome] = []

    async def publish() -> None:
        outcomes.extend(await ch.publish_batch([msg("q", i) for i in range(7)], 5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        await anyio.wait_all_tasks_blocked()
        assert sink.published_ids() == [f"m-{i}" for i in range(7)]
        conn.data_received(returned("m-1"))
        conn.data_received(confirm(3))  # out of order, single
        conn.data_received(confirm(1))
        conn.data_received(confirm(2))  # the returned one's ack
        conn.data_received(confirm(5, nack=True))
        conn.data_received(confirm(6, multiple=True))  # covers 4; 3 and 5 settled
        await anyio.wait_all_tasks_blocked()
        assert not outcomes
        conn.data_received(confirm(7) + confirm(7))  # a duplicate is harmless
    assert outcomes == [ACK, RETURNED, ACK, ACK, NACK, ACK, ACK]
    assert ch.inflight == 0
    assert not ch._runs


async def test_window_bounds_unconfirmed_messages() -> None:
    """No more than the window is ever unconfirmed; the rest waits for confirms."""
    conn, ch, sink = await fake_channel(window=4)
    outcomes: list[PublishOutcome] = []

    async def publish() -> None:
        outcomes.extend(await ch.publish_batch([msg("q", i) for i in range(10)], 5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        await anyio.wait_all_tasks_blocked()
        assert len(sink.published_ids()) == 4
        conn.data_received(confirm(1))  # frees one slot (slice minimum: window/4)
        await anyio.wait_all_tasks_blocked()
        assert len(sink.published_ids()) == 5
        assert ch.inflight == 4
        conn.data_received(confirm(5, multiple=True))
        await anyio.wait_all_tasks_blocked()
        assert len(sink.published_ids()) == 9
        conn.data_received(confirm(9, multiple=True))
        await anyio.wait_all_tasks_blocked()
        conn.data_received(confirm(10))
    assert outcomes == [ACK] * 10
    assert sink.published_ids() == [f"m-{i}" for i in range(10)]


async def test_connection_loss_makes_pending_indeterminate() -> None:
    """Confirmed messages keep their outcome; the rest become INDETERMINATE."""
    conn, ch, _ = await fake_channel(window=100)
    outcomes: list[PublishOutcome] = []

    async def publish() -> None:
        outcomes.extend(await ch.publish_batch([msg("q", i) for i in range(4)], 5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(publish)
        await anyio.wait_all_tasks_blocked()
        conn.data_received(confirm(2, multiple=True))
        conn.connection_lost(ConnectionResetError("peer reset"))
    assert outcomes == [ACK, ACK, INDETERMINATE, INDETERMINATE]
    assert conn.is_closed
    assert "peer reset" in (conn.closed_reason or "")


async def test_frames_split_across_reads_are_reassembled() -> None:
    """A delivery cut into arbitrary read sizes parses the same as whole."""
    conn, ch, _ = await fake_channel(window=10)
    body = bytes(range(256)) * 2000  # > frame_max: three body frames
    props = commands.Basic.Properties(message_id="x", headers={"k": "v"})
    wire = pframe.marshal(
        commands.Basic.Deliver("ctag", 9, True, "ex", "rk"), 1
    ) + pframe.marshal(pheader.ContentHeader(0, len(body), props), 1)
    for i in range(0, len(body), 131_064):
        wire += pframe.marshal(pbody.ContentBody(body[i : i + 131_064]), 1)
    wire += _HEARTBEAT_FRAME
    for i in range(0, len(wire), 7777):
        conn.data_received(wire[i : i + 7777])
    (d,) = await ch.get_batch(5)
    assert (d.tag, d.redelivered, d.exchange, d.routing_key) == (9, True, "ex", "rk")
    assert (d.message_id, d.headers, d.body) == ("x", {"k": "v"}, body)
    assert not conn._buf


_HEARTBEAT_FRAME = b"\x08\x00\x00\x00\x00\x00\x00\xce"


async def test_a_header_table_that_cannot_be_read_costs_the_message_not_the_link(
    amqp_url: str,
) -> None:
    """A header table that cannot be read flags its message, not the connection.

    RabbitMQ passes a nested table's field names through unchecked. One that
    is not UTF-8 used to abort the consuming connection at every redelivery
    (every consumer on it with it); now the message arrives with its headers
    None and the reason, for the consumer to dead-letter.
    """
    # A nested table whose field name is not UTF-8.
    entry = b"\x05inner" + b"F" + struct.pack(">I", 5) + b"\x02\xff\xfe" + b"t\x01"
    body = b"{}"
    flags = 0x2000 | 0x0080  # headers, message-id
    header = (
        struct.pack(">HHQH", 60, 0, len(body), flags)
        + struct.pack(">I", len(entry))
        + entry
        + bytes([5])
        + b"bad-1"
    )
    async with connected(amqp_url) as conn:
        ch = await conn.channel()
        await ch.queue_declare("q")
        publish_raw(conn, ch, "q", header, body)
        await ch.consume("q")
        with anyio.fail_after(5):
            [d] = await ch.get_batch(1)
        ch.ack(d.tag)
        assert (d.message_id, d.body, d.headers) == ("bad-1", body, None)
        assert d.unreadable is not None
        assert "utf-8" in d.unreadable
        assert await queue_depth(await conn.channel(), "q") == 0  # still connected
