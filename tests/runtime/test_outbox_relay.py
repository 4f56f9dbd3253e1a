"""The outbox relay and a row that no AMQP frame can carry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

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
from broker.transport import OutgoingMessage, PublishOutcome
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


class ClosingTransport:
    """The in-process transport, but the broker closes the channel for a poison.

    A publish holding a message id in *poison* ends INDETERMINATE for all its
    messages (none delivered) and counts a channel close, as RabbitMQ does
    for a message over its size limit. With *lose_first*, the first publish
    ends INDETERMINATE without a close, as a lost connection does.
    """

    def __init__(
        self, inner: MemoryTransport, poison: set[str], *, lose_first: bool = False
    ) -> None:
        self.inner = inner
        self.poison = poison
        self.lose_first = lose_first
        self.rounds: list[list[str]] = []
        self._closes = 0

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout_s: float
    ) -> list[PublishOutcome]:
        """Publish, unless a poison is among *messages* or the link is lost."""
        self.rounds.append([m.message_id for m in messages])
        if any(m.message_id in self.poison for m in messages):
            self._closes += 1
            return [PublishOutcome.INDETERMINATE] * len(messages)
        if self.lose_first:
            self.lose_first = False
            return [PublishOutcome.INDETERMINATE] * len(messages)
        return await self.inner.publish(messages, timeout_s=timeout_s)

    @property
    def refusal(self) -> str | None:
        """Never a permission refusal."""
        return None

    @property
    def channel_closes(self) -> tuple[int, str | None]:
        """The closes so far, with RabbitMQ's words for a message too large."""
        return self._closes, "406 PRECONDITION_FAILED - message size exceeds max"


@asynccontextmanager
async def relaying(
    wrap: Callable[[MemoryTransport], Any] | None = None,
) -> AsyncIterator[tuple[SqliteStore, MemoryTransport]]:
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
    publisher = wrap(transport) if wrap is not None else transport
    spec = SupervisorSpec(
        id="root",
        children=[
            ChildSpec(
                id="relay",
                start=lambda: OutboxRelay(
                    store=store,
                    transport=publisher,
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


async def test_a_row_the_broker_closes_the_channel_for_goes_alone_then_is_parked() -> (
    None
):
    """Rounds halve around the poison; alone three times, it is parked.

    Every other row is published, in rounds that shrink only while they
    share the poison's: not one by one.
    """
    wrapped: list[ClosingTransport] = []

    def closing(inner: MemoryTransport) -> ClosingTransport:
        wrapped.append(ClosingTransport(inner, {"poison"}))
        return wrapped[0]

    async with relaying(closing) as (store, transport):
        with capture_logs() as logs:
            await store.commit_batch(
                BatchWrite(
                    consumer="t",
                    workflow="t",
                    outbox=[record(f"ok-{n}") for n in range(50)]
                    + [record("poison")]
                    + [record(f"ok-{n}") for n in range(50, 100)],
                )
            )

            async def settled() -> bool:
                counts = await store.counts()
                return (counts["outbox_pending"], counts["outbox_parked"]) == (0, 1)

            await eventually(settled, timeout_s=30)
        assert transport.queue_depth(OUT) == 100
    rounds = wrapped[0].rounds
    assert len(rounds[0]) == 101
    assert [r for r in rounds if r == ["poison"]] == [["poison"]] * 3
    assert len(rounds) <= 25  # halving finds it, not one round per row
    (line,) = [line for line in logs if line["event"] == "outbox_message_refused"]
    assert line["message_id"] == "poison"
    assert "406 PRECONDITION_FAILED" in line["reason"]


async def test_rows_lost_with_the_link_go_out_together_again() -> None:
    """Unanswered for want of a connection: retried in one round, not one by one."""
    wrapped: list[ClosingTransport] = []

    def losing(inner: MemoryTransport) -> ClosingTransport:
        wrapped.append(ClosingTransport(inner, set(), lose_first=True))
        return wrapped[0]

    async with relaying(losing) as (store, transport):
        await store.commit_batch(
            BatchWrite(
                consumer="t",
                workflow="t",
                outbox=[record(f"r-{n}") for n in range(200)],
            )
        )

        async def published() -> bool:
            return transport.queue_depth(OUT) == 200

        await eventually(published, timeout_s=20)
    assert len(wrapped[0].rounds) <= 3
