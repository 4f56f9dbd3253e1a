"""The outbox relay and a row that no AMQP frame can carry."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from structlog.testing import capture_logs

from broker.config import load_config
from broker.outbox import OutboxRelay, unpublishable
from broker.runtime import Runtime
from broker.store import BatchWrite, OutboxRecord, OutboxRow
from broker.store.sqlite import SqliteStore
from broker.supervision import ChildSpec, SupervisorSpec
from broker.system import ActorSystem
from broker.transport.memory import MemoryTransport
from broker.transport.topology import build_topology
from tests.polling import eventually

pytestmark = pytest.mark.anyio

OUT = "q2c.events.relay-out"
TYPE = "test.thing.happened"


def record(message_id: str, **fields: object) -> OutboxRecord:
    values: dict[str, object] = {
        "exchange": "q2c.events",
        "routing_key": TYPE,
        "body": b"{}",
        "correlation_id": "c-1",
        "type": TYPE,
    }
    values.update(fields)
    return OutboxRecord(message_id=message_id, **values)  # type: ignore[arg-type]


@asynccontextmanager
async def relaying() -> AsyncIterator[tuple[SqliteStore, MemoryTransport]]:
    """A relay whose poller takes rows as soon as their writer's lease ends."""
    cfg = load_config(
        environ={
            "BROKER__TOPOLOGY__EVENT_QUEUES": f'{{"{OUT}" = ["{TYPE}"]}}',
            "BROKER__CORE__RELAY_POLL_S": "0.02",
        }
    )
    rt = Runtime(cfg)
    store = await SqliteStore.open(":memory:", lease_s=0.01)
    transport = MemoryTransport(build_topology(cfg.topology, []))
    spec = SupervisorSpec(
        id="root",
        children=[
            ChildSpec(
                id="relay",
                start=lambda: OutboxRelay(
                    store=store,
                    transport=transport,
                    feed=rt.feed,
                    core=cfg.core,
                    publish_timeout_s=5,
                    metrics=rt.metrics,
                    crash=rt.crash,
                ),
            )
        ],
    )
    system, shutdown, started = ActorSystem(), anyio.Event(), anyio.Event()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: system.run(spec, started=started, shutdown=shutdown))
            with anyio.fail_after(10):
                await started.wait()
            yield store, transport
            shutdown.set()
    finally:
        rt.feed.close()
        await store.aclose()


async def test_a_row_with_an_overlong_id_is_parked_and_the_rest_published() -> None:
    """Parked with the reason, once, before any publish; the others go out."""
    async with relaying() as (store, transport):
        with capture_logs() as logs:
            await store.commit_batch(
                BatchWrite(
                    consumer="t",
                    workflow="t",
                    outbox=[
                        record("ok-1"),
                        record("long", correlation_id="c" * 300),
                        record("ok-2"),
                    ],
                )
            )

            async def settled() -> bool:
                counts = await store.counts()
                return (counts["outbox_pending"], counts["outbox_parked"]) == (0, 1)

            await eventually(settled)
        assert transport.queue_depth(OUT) == 2
    parked = [line for line in logs if line["event"] == "outbox_message_unpublishable"]
    assert [line["message_id"] for line in parked] == ["long"]
    assert parked[0]["reason"] == "unpublishable: its correlation id is over 255 bytes"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, None),
        ({"routing_key": "k" * 256}, "routing key"),
        ({"message_id": "\u00e9" * 128}, "message id"),  # 256 bytes
        ({"headers": {"h" * 256: "v"}}, "header name"),
        ({"headers": {"h": "v" * 10_000}}, None),  # a long string value is fine
    ],
)
def test_what_no_frame_can_carry_is_named(
    fields: dict[str, object], reason: str | None
) -> None:
    values: dict[str, object] = {
        "id": 1,
        "message_id": "m",
        "exchange": "q2c.events",
        "routing_key": TYPE,
        "body": b"",
        "correlation_id": None,
        "type": None,
        "headers": {},
        "attempts": 1,
    }
    values.update(fields)
    why = unpublishable(OutboxRow(**values))  # type: ignore[arg-type]
    assert (why is None) if reason is None else (why is not None and reason in why)
