"""The pass-through: the best a bare aio-pika user gets, with no database at all.

Consume with prefetch 1000; publish every delivery, unchanged, to the output
queue with pipelined publisher confirms (mandatory, persistent); once the
confirms of a group of consecutive deliveries have arrived, ack the group
with one ``multiple=True`` ack. No decoding, no deduplication, no effects:
the ceiling for anything that moves messages through RabbitMQ safely.

Run ``python -m bench.passthrough --amqp-url URL --queue NAME --output NAME``;
it consumes until SIGTERM or SIGINT, finishes what is in hand and exits 0, or
exits 1 at the first failed publish.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Final

import aio_pika
import anyio
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from bench.harness import Env
from bench.workload import OUTPUT_QUEUE, Expected, declare_pipeline_queues

__all__ = ["PREFETCH", "GROUP", "Passthrough", "PassthroughVariant", "main"]

PREFETCH: Final = 1000
GROUP: Final = 100

_FAILURES = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError)
_log = structlog.get_logger(__name__)


class Passthrough:
    """Republish each delivery to *output*; ack confirmed prefixes in groups.

    Delivery tags on a channel count up from 1, so the deliveries whose
    copies are confirmed form a set whose contiguous prefix can be acked
    with one multiple-ack. A group is acked when it has *group* members, or
    when nothing else is in flight (the tail of a burst).

    Args:
        exchange: the default exchange, on a channel with publisher confirms
            and ``on_return_raises``.
        output: the queue every message is copied to.
        group: deliveries per multiple-ack.
    """

    def __init__(
        self, exchange: AbstractExchange, output: str, group: int = GROUP
    ) -> None:
        self._exchange = exchange
        self._output = output
        self._group = group
        self._held: dict[int, AbstractIncomingMessage] = {}
        self._confirmed: set[int] = set()
        self._prefix = 0  # highest tag whose copy and all before it are confirmed
        self._acked = 0  # highest tag acked
        self._inflight = 0
        self._stopping = False
        self._idle = anyio.Event()
        self.failed = anyio.Event()
        self.failure: BaseException | None = None
        self.copied = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """aio-pika consumer callback: copy one delivery, maybe ack a group."""
        tag = message.delivery_tag
        if tag is None or self.failure is not None:
            return  # unacked: the broker redelivers it to the next consumer
        self._inflight += 1
        self._held[tag] = message
        try:
            await self._exchange.publish(
                aio_pika.Message(
                    message.body,
                    message_id=message.message_id,
                    correlation_id=message.correlation_id,
                    type=message.type,
                    content_type=message.content_type,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                self._output,
                mandatory=True,
                timeout=30,
            )
            self.copied += 1
            self._confirmed.add(tag)
            await self._ack_prefix()
        except _FAILURES as exc:
            self.failure = exc
            _log.error("copy_failed", error=f"{type(exc).__name__}: {exc}")
            self.failed.set()
        finally:
            self._inflight -= 1
            if self._stopping and not self._inflight:
                self._idle.set()

    async def drain(self) -> None:
        """Wait for the copies in flight; call after cancelling the consumer."""
        self._stopping = True
        if not self._inflight:
            self._idle.set()
        await self._idle.wait()

    async def _ack_prefix(self) -> None:
        while self._prefix + 1 in self._confirmed:
            self._prefix += 1
            self._confirmed.discard(self._prefix)
        # This copy is still counted in flight: 1 means it is the last one.
        tail = self._inflight == 1
        if self._prefix > self._acked and (
            self._prefix - self._acked >= self._group or tail
        ):
            top = self._prefix
            message = self._held[top]
            for released in range(self._acked + 1, top + 1):
                del self._held[released]
            self._acked = top
            await message.ack(multiple=True)


class PassthroughVariant:
    """`bench.passthrough`: copy every message, no database."""

    name = "passthrough"
    input_queues: tuple[str, ...] = ("bench.passthrough.in",)
    passes_duplicates = True
    needs_database = False

    async def prepare(self, env: Env) -> None:
        """Queues bound to ``q2c.events``."""
        await declare_pipeline_queues(env.amqp_url, input_queue=self.input_queues[0])

    def command(self, env: Env) -> list[str]:
        """``python -m bench.passthrough ...``."""
        return [
            sys.executable, "-m", "bench.passthrough", "--amqp-url", env.amqp_url,
            "--queue", self.input_queues[0], "--output", OUTPUT_QUEUE,
        ]  # fmt: skip

    async def verify(self, env: Env, expected: Expected) -> list[str]:
        """Nothing is stored; the output counts are the check."""
        return []


async def _cancel_when(
    event: Callable[[], Awaitable[object]], scope: anyio.CancelScope
) -> None:
    await event()
    scope.cancel()


async def _run(amqp_url: str, queue_name: str, output: str, group: int) -> int:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        connection = await aio_pika.connect(
            amqp_url, client_properties={"connection_name": "bench passthrough"}
        )
        async with connection:
            publish = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            copier = Passthrough(publish.default_exchange, output, group)
            consume = await connection.channel()
            await consume.set_qos(prefetch_count=PREFETCH)
            queue = await consume.get_queue(queue_name)
            tag = await queue.consume(copier.on_message)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_cancel_when, copier.failed.wait, tg.cancel_scope)
                async for signum in signals:
                    _log.info("signal_received", signal=signal.Signals(signum).name)
                    break
                tg.cancel_scope.cancel()
            await queue.cancel(tag)
            with anyio.fail_after(30):
                await copier.drain()
        _log.info(
            "passthrough_stopped",
            copied=copier.copied,
            failed=copier.failure is not None,
        )
    return 1 if copier.failure is not None else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.passthrough``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.passthrough", description=__doc__
    )
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", default="bench.passthrough.in")
    parser.add_argument("--output", default=OUTPUT_QUEUE)
    parser.add_argument("--group", type=int, default=GROUP)
    args = parser.parse_args(argv)
    return anyio.run(
        _run,
        args.amqp_url,
        args.queue,
        args.output,
        args.group,
        backend_options={"use_uvloop": True},
    )


if __name__ == "__main__":
    sys.exit(main())
