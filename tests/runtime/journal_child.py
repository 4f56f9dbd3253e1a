"""A process that holds deliveries of a journaled `MemoryTransport` until killed.

``python -m tests.runtime.journal_child JOURNAL PUBLISH TAKE ACK``: opens the
journal on `TOPOLOGY`, publishes PUBLISH messages to the ERP queue, consumes
TAKE deliveries one batch at a time (prefetch 2), acknowledges the first ACK
of them, prints ``holding`` and waits for the test to kill it by pid.
"""

from __future__ import annotations

import sys

import anyio

from broker.config import TopologyConfig
from broker.transport import OutgoingMessage
from broker.transport.memory import MemoryTransport
from broker.transport.topology import build_topology

ERP = "q2c.sys.erp"
TOPOLOGY = build_topology(
    TopologyConfig(systems=("erp",), retry_tiers_s=(5.0,), delivery_limit=3), []
)


def to_erp(n: int) -> OutgoingMessage:
    """Message *n* for the ERP queue, through the default exchange."""
    return OutgoingMessage(
        exchange="",
        routing_key=ERP,
        body=f"body-{n}".encode(),
        message_id=f"m-{n}",
        correlation_id=f"c-{n}",
        type="order.booked",
        headers={"x-attempt": n},
    )


async def main(journal: str, publish: int, take: int, ack: int) -> None:
    transport = await MemoryTransport.open(TOPOLOGY, journal=journal)
    if publish:
        await transport.publish([to_erp(n) for n in range(publish)], timeout_s=5)
    sub = await transport.subscribe(ERP, prefetch=2)
    taken = 0
    while taken < take:
        for delivery in await sub.batch(1):
            taken += 1
            if taken <= ack:
                sub.ack(delivery.tag)
    print("holding", flush=True)
    await anyio.sleep_forever()


if __name__ == "__main__":
    path, *counts = sys.argv[1:]
    publish, take, ack = (int(c) for c in counts)
    anyio.run(main, path, publish, take, ack)
