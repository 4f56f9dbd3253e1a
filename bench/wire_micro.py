"""Consume -> publish pass-through: our wire client against aio-pika, same run.

Each round fills a source queue with N persistent 1 KiB messages, then moves
them to a destination queue: take up to 1000 deliveries (prefetch 1000),
publish them all pipelined with publisher confirms, then ack the batch with
one multiple-ack. Rounds alternate between the two clients so both see the
same broker state. Reports msg/s and client CPU µs per message (the client
competes with the broker for the host's two cores, so CPU is the steadier
number).

Run: ``.venv/bin/python -m bench.wire_micro [--n 20000] [--rounds 2]
[--queue-type quorum|classic] [--url amqp://...]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import aio_pika
import uvloop
from pamqp import commands

from broker.transport import OutgoingMessage, PublishOutcome
from broker.transport.channel import WireChannel
from broker.transport.wire import WireConnection

BATCH = 1000
BODY = b"x" * 1024


async def _admin(url: str) -> tuple[WireConnection, WireChannel]:
    conn = await WireConnection.open(
        url, name="bench admin", heartbeat_s=30, connect_timeout_s=10
    )
    ch = await conn.channel()
    await ch.confirm_select()
    return conn, ch


async def _fill(ch: WireChannel, queue: str, n: int) -> None:
    msgs = [
        OutgoingMessage(
            exchange="", routing_key=queue, body=BODY, message_id=f"{queue}-{i}"
        )
        for i in range(n)
    ]
    for i in range(0, n, 5000):
        outcomes = await ch.publish_batch(msgs[i : i + 5000], 60)
        assert all(o is PublishOutcome.ACK for o in outcomes)


async def run_wire(url: str, src: str, dst: str, n: int) -> None:
    con = await WireConnection.open(
        url, name="bench wire consume", heartbeat_s=30, connect_timeout_s=10
    )
    pub = await WireConnection.open(
        url, name="bench wire publish", heartbeat_s=30, connect_timeout_s=10
    )
    try:
        cch = await con.channel()
        await cch.qos(BATCH)
        await cch.consume(src)
        pch = await pub.channel()
        await pch.confirm_select(window=2048)
        done = 0
        while done < n:
            batch = await cch.get_batch(BATCH)
            out = [
                OutgoingMessage(
                    exchange="",
                    routing_key=dst,
                    body=d.body,
                    message_id=d.message_id or "",
                    correlation_id=d.correlation_id,
                )
                for d in batch
            ]
            outcomes = await pch.publish_batch(out, 30)
            assert all(o is PublishOutcome.ACK for o in outcomes)
            cch.ack(batch[-1].tag, multiple=True)
            done += len(batch)
    finally:
        await con.close()
        await pub.close()


async def run_aio_pika(url: str, src: str, dst: str, n: int) -> None:
    con = await aio_pika.connect(
        url, client_properties={"connection_name": "bench pika c"}
    )
    pub = await aio_pika.connect(
        url, client_properties={"connection_name": "bench pika p"}
    )
    try:
        cch = await con.channel()
        await cch.set_qos(prefetch_count=BATCH)
        pch = await pub.channel(publisher_confirms=True, on_return_raises=True)
        queue = await cch.get_queue(src)
        buffer: list[aio_pika.abc.AbstractIncomingMessage] = []
        arrived = asyncio.Event()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            buffer.append(message)
            arrived.set()

        await queue.consume(on_message)
        exchange = pch.default_exchange
        done = 0
        while done < n:
            await arrived.wait()
            arrived.clear()
            batch = buffer[:BATCH]
            del buffer[:BATCH]
            if buffer:
                arrived.set()
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(
                            m.body,
                            message_id=m.message_id,
                            correlation_id=m.correlation_id,
                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        ),
                        routing_key=dst,
                        mandatory=True,
                        timeout=30,
                    )
                    for m in batch
                )
            )
            await batch[-1].ack(multiple=True)
            done += len(batch)
    finally:
        await con.close()
        await pub.close()


async def measure(
    name: str,
    run: Callable[[str, str, str, int], Awaitable[None]],
    url: str,
    ch: WireChannel,
    queue_args: dict[str, str],
    n: int,
) -> tuple[float, float]:
    src, dst = f"bench.src.{uuid.uuid4().hex[:8]}", f"bench.dst.{uuid.uuid4().hex[:8]}"
    await ch.queue_declare(src, arguments=queue_args)
    await ch.queue_declare(dst, arguments=queue_args)
    try:
        await _fill(ch, src, n)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await run(url, src, dst, n)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        _, left, _ = await ch.queue_declare(src, passive=True)
        _, moved, _ = await ch.queue_declare(dst, passive=True)
        assert left == 0, left
        assert moved == n, moved
    finally:
        await ch.rpc(commands.Queue.Delete(queue=src))
        await ch.rpc(commands.Queue.Delete(queue=dst))
    rate, cpu_us = n / wall, cpu / n * 1e6
    print(f"{name:9} {rate:8.0f} msg/s   client CPU {cpu_us:6.1f} µs/msg")
    return rate, cpu_us


async def main(url: str, n: int, rounds: int, queue_type: str) -> None:
    conn, ch = await _admin(url)
    args = {"x-queue-type": queue_type}
    results: dict[str, list[tuple[float, float]]] = {"wire": [], "aio-pika": []}
    try:
        for _ in range(rounds):
            results["wire"].append(await measure("wire", run_wire, url, ch, args, n))
            results["aio-pika"].append(
                await measure("aio-pika", run_aio_pika, url, ch, args, n)
            )
    finally:
        await conn.close()
    print(f"-- {queue_type} queues, {n} x 1 KiB, best of {rounds}:")
    for name, rows in results.items():
        rate = max(r for r, _ in rows)
        cpu = min(c for _, c in rows)
        print(f"{name:9} {rate:8.0f} msg/s   client CPU {cpu:6.1f} µs/msg")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    ns = parser.parse_args()
    uvloop.run(main(ns.url, ns.n, ns.rounds, ns.queue_type))
