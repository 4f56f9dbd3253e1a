"""The naive pipeline: the ledger done one message at a time with aio-pika and asyncpg.

What a careful service without the engine writes: consume with prefetch 100,
10 concurrent handlers, and for each message one transaction (inbox insert
``ON CONFLICT DO NOTHING``, balance upsert), then publish
``ledger.entry.applied`` with a publisher confirm (mandatory, persistent),
then ack. Duplicates are skipped by the inbox and acked without output.
It loses an output if it dies between the commit and the confirm; the engine's
outbox is what closes that gap. Decoding uses the engine's codec, so the
difference measured is the pipeline, not the parser.

Run ``python -m bench.naive --amqp-url URL --dsn DSN --queue NAME``; it
creates its two tables, consumes until SIGTERM or SIGINT, finishes the
messages in hand and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import uuid
from contextlib import AsyncExitStack
from decimal import Decimal
from typing import Final

import aio_pika
import anyio
import asyncpg
import structlog
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError

from bench.harness import Env, compare_balances
from bench.workload import (
    EVENTS_EXCHANGE,
    INPUT_TYPE,
    OUTPUT_TYPE,
    Expected,
    declare_pipeline_queues,
)
from broker.codec import (
    Decoders,
    decode_envelope,
    encode_envelope,
    encode_event,
    utcnow,
)
from broker.errors import PermanentError
from canonical.envelope import CONTENT_TYPE, Envelope
from canonical.ledger import LedgerEntryApplied, LedgerEntryPosted
from canonical.upcast import current_version

__all__ = ["SCHEMA", "PREFETCH", "HANDLERS", "NaivePipeline", "NaiveVariant", "main"]

PREFETCH: Final = 100
HANDLERS: Final = 10

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS bench_inbox (
    key         text        PRIMARY KEY,
    message_id  text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS bench_balance (
    account  text    PRIMARY KEY,
    balance  numeric NOT NULL,
    entries  bigint  NOT NULL
);
"""

_CLAIM = (
    "INSERT INTO bench_inbox (key, message_id) VALUES ($1, $2) "
    "ON CONFLICT DO NOTHING RETURNING true"
)
_APPLY = (
    "INSERT INTO bench_balance AS b (account, balance, entries) VALUES ($1, $2, 1) "
    "ON CONFLICT (account) DO UPDATE "
    "SET balance = b.balance + EXCLUDED.balance, entries = b.entries + 1 "
    "RETURNING balance, entries"
)
_NAMESPACE = uuid.UUID("5d0c3f7e-2b61-4c0e-8a8f-3e1d9c7b4a20")
_MAX_BYTES = 1_048_576
_FAILURES = (
    asyncpg.PostgresError,
    AMQPError,
    ChannelInvalidStateError,
    OSError,
    TimeoutError,
)

_log = structlog.get_logger(__name__)


class NaivePipeline:
    """Per-message consume → transaction → confirmed publish → ack.

    Args:
        pool: asyncpg pool of at least `HANDLERS` connections.
        exchange: ``q2c.events`` on a channel with publisher confirms and
            ``on_return_raises``.
    """

    def __init__(self, pool: asyncpg.Pool, exchange: AbstractExchange) -> None:
        self._pool = pool
        self._exchange = exchange
        self._decoders = Decoders({INPUT_TYPE: LedgerEntryPosted})
        self._handlers = anyio.Semaphore(HANDLERS)
        self._inflight = 0
        self._stopping = False
        self._idle = anyio.Event()
        self.applied = 0
        self.duplicates = 0
        self.failed = 0

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """aio-pika consumer callback: one delivery, start to ack."""
        self._inflight += 1
        try:
            async with self._handlers:
                await self._handle(message)
        finally:
            self._inflight -= 1
            if self._stopping and not self._inflight:
                self._idle.set()

    async def drain(self) -> None:
        """Wait for the deliveries in hand; call after cancelling the consumer."""
        self._stopping = True
        if not self._inflight:
            self._idle.set()
        await self._idle.wait()

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = decode_envelope(message.body, max_bytes=_MAX_BYTES)
            event = self._decoders.decode_data(envelope)
        except PermanentError as exc:
            _log.error(
                "message_rejected", message_id=message.message_id, error=str(exc)
            )
            await message.reject(requeue=False)
            return
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                claimed = await conn.fetchval(
                    _CLAIM, envelope.idempotency_key, envelope.id
                )
                row = (
                    await conn.fetchrow(_APPLY, event.account, event.amount)
                    if claimed
                    else None
                )
            if row is not None:
                await self._publish(envelope, event, row["balance"], row["entries"])
        except _FAILURES as exc:
            self.failed += 1
            _log.error(
                "message_failed",
                message_id=envelope.id,
                error=f"{type(exc).__name__}: {exc}",
            )
            await message.nack(requeue=True)
            return
        if row is None:
            self.duplicates += 1
        else:
            self.applied += 1
        await message.ack()

    async def _publish(
        self,
        envelope: Envelope,
        event: LedgerEntryPosted,
        balance: Decimal,
        entries: int,
    ) -> None:
        key = f"{envelope.idempotency_key}/{OUTPUT_TYPE}"
        message_id = str(uuid.uuid5(_NAMESPACE, key))
        applied = LedgerEntryApplied(
            account=event.account,
            entry_id=event.entry_id,
            amount=event.amount,
            balance=balance,
            entries=entries,
        )
        body = encode_envelope(
            Envelope(
                id=message_id,
                source="/bench/naive",
                type=OUTPUT_TYPE,
                schema_version=current_version(OUTPUT_TYPE),
                time=utcnow(),
                correlation_id=event.account,
                causation_id=envelope.id,
                idempotency_key=key,
                data=encode_event(applied),
            )
        )
        await self._exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                correlation_id=event.account,
                type=OUTPUT_TYPE,
                content_type=CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            OUTPUT_TYPE,
            mandatory=True,
            timeout=30,
        )


class NaiveVariant:
    """`bench.naive`: per-message transaction and confirmed publish."""

    name = "naive"
    input_queues: tuple[str, ...] = ("bench.naive.in",)
    passes_duplicates = False
    needs_database = True

    async def prepare(self, env: Env) -> None:
        """Queues bound to ``q2c.events``; the child creates its tables."""
        await declare_pipeline_queues(env.amqp_url, input_queue=self.input_queues[0])

    def command(self, env: Env) -> list[str]:
        """``python -m bench.naive ...``."""
        return [
            sys.executable, "-m", "bench.naive", "--amqp-url", env.amqp_url,
            "--dsn", env.dsn, "--queue", self.input_queues[0],
        ]  # fmt: skip

    async def verify(self, env: Env, expected: Expected) -> list[str]:
        """Balances and inbox keys."""
        conn = await asyncpg.connect(env.dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT account, balance, entries FROM bench_balance"
            )
            inbox = await conn.fetchval("SELECT count(*) FROM bench_inbox")
        finally:
            await conn.close()
        got = {r["account"]: (Decimal(r["balance"]), int(r["entries"])) for r in rows}
        problems = compare_balances(expected, got)
        distinct = sum(n for _, n in expected.values())
        if inbox != distinct:
            problems.append(f"inbox holds {inbox} keys, expected {distinct}")
        return problems


async def _run(amqp_url: str, dsn: str, queue_name: str) -> int:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with AsyncExitStack() as stack:
            pool = await asyncpg.create_pool(dsn, min_size=HANDLERS, max_size=HANDLERS)
            stack.push_async_callback(pool.close)
            await pool.execute(SCHEMA)
            connection = await aio_pika.connect(
                amqp_url, client_properties={"connection_name": "bench naive"}
            )
            stack.push_async_callback(connection.close)
            publish = await connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            pipeline = NaivePipeline(pool, await publish.get_exchange(EVENTS_EXCHANGE))
            consume = await connection.channel()
            await consume.set_qos(prefetch_count=PREFETCH)
            queue = await consume.get_queue(queue_name)
            tag = await queue.consume(pipeline.on_message)
            async for signum in signals:
                _log.info("signal_received", signal=signal.Signals(signum).name)
                break
            await queue.cancel(tag)
            with anyio.fail_after(30):
                await pipeline.drain()
        _log.info(
            "naive_stopped",
            applied=pipeline.applied,
            duplicates=pipeline.duplicates,
            failed=pipeline.failed,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m bench.naive``."""
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__)
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--queue", default="bench.naive.in")
    args = parser.parse_args(argv)
    return anyio.run(
        _run, args.amqp_url, args.dsn, args.queue, backend_options={"use_uvloop": True}
    )


if __name__ == "__main__":
    sys.exit(main())
