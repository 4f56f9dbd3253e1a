"""The workload: unique ledger entries, published like a real producer would.

Jepsen-style (RELIABILITY.md §5.2): every entry has a unique id; the stream
holds each entry once plus re-sent copies (producer retries). Publishing
uses aio-pika, persistent, with publisher confirms and ``mandatory``; a
chunk whose fate is unknown (connection lost, timeout) is *indeterminate*
and published again, so an input may reach the daemon several times and
the inbox must make it count once.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import aio_pika
import anyio
import msgspec
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from actors.demo import entry_message
from broker.codec import encode_envelope, encode_event, utcnow
from broker.transport import OutgoingMessage
from canonical import Envelope, LedgerEntryApplied, LedgerEntryPosted

__all__ = [
    "Entry",
    "Workload",
    "PublishReport",
    "posted_message",
    "publish",
    "read_outputs",
    "raw_message",
    "take",
    "Got",
    "POSTED",
]

POSTED = "ledger.entry.posted"

_PUBLISH_ERRORS = (
    *aio_pika.exceptions.CONNECTION_EXCEPTIONS,
    aio_pika.exceptions.DeliveryError,
    TimeoutError,
)


@dataclass(frozen=True, kw_only=True)
class Entry:
    """One unique ledger entry of the workload."""

    account: str
    entry_id: str
    amount: Decimal
    memo: str = ""

    @property
    def message_id(self) -> str:
        """The message id ``entry_message`` gives this entry."""
        return f"demo-{self.entry_id}"

    def message(self) -> OutgoingMessage:
        """The message a producer publishes for this entry."""
        if not self.memo:
            return entry_message(self.account, self.entry_id, self.amount)
        return posted_message(self.account, self.entry_id, self.amount, self.memo)


def posted_message(
    account: str, entry_id: str, amount: Decimal, memo: str
) -> OutgoingMessage:
    """``entry_message`` with a memo (``actors.demo`` builds entries without one)."""
    plain = entry_message(account, entry_id, amount)
    env = msgspec.json.decode(plain.body, type=Envelope)
    event = LedgerEntryPosted(account=account, entry_id=entry_id, amount=amount)
    env = msgspec.structs.replace(
        env,
        time=utcnow(),
        data=encode_event(msgspec.structs.replace(event, memo=memo)),
    )
    return msgspec.structs.replace(plain, body=encode_envelope(env))


@dataclass(kw_only=True)
class Workload:
    """Unique entries over a few accounts, and the stream that carries them."""

    entries: list[Entry]
    stream: list[OutgoingMessage]

    @classmethod
    def build(
        cls,
        n: int = 3000,
        *,
        accounts: int = 40,
        duplicates: float = 0.1,
        seed: int = 1,
        prefix: str = "e",
    ) -> Workload:
        """*n* entries on *accounts* accounts, plus ``duplicates * n`` re-sends."""
        rng = random.Random(seed)
        entries = [
            Entry(
                account=f"acct-{rng.randrange(accounts):03d}",
                entry_id=f"{prefix}{i:06d}",
                amount=Decimal(rng.randrange(-50_000, 100_000)) / 100,
            )
            for i in range(n)
        ]
        messages = [e.message() for e in entries]
        stream = messages + rng.sample(messages, int(n * duplicates))
        rng.shuffle(stream)
        return cls(entries=entries, stream=stream)

    def expected(self) -> dict[str, tuple[Decimal, int]]:
        """Account → (sum of its distinct entries, how many)."""
        out: dict[str, tuple[Decimal, int]] = {}
        for e in self.entries:
            total, count = out.get(e.account, (Decimal(0), 0))
            out[e.account] = (total + e.amount, count + 1)
        return out


@dataclass(kw_only=True)
class PublishReport:
    """What the producer saw: confirmed messages and indeterminate chunks."""

    confirmed: int = 0
    indeterminate: int = 0
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)


def _message(m: OutgoingMessage) -> aio_pika.Message:
    return aio_pika.Message(
        body=m.body,
        message_id=m.message_id,
        correlation_id=m.correlation_id,
        type=m.type,
        content_type=m.content_type,
        headers=dict(m.headers),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


class _Indeterminate(Exception):
    """Some message of a chunk was not confirmed: the chunk's fate is unknown."""


async def _publish_chunk(
    channel: AbstractChannel,
    exchanges: dict[str, AbstractExchange],
    chunk: Sequence[OutgoingMessage],
) -> None:
    for m in chunk:
        if m.exchange not in exchanges:
            exchanges[m.exchange] = (
                channel.default_exchange
                if m.exchange == ""
                else await channel.get_exchange(m.exchange, ensure=False)
            )
    # gather, not a task group: a publish that dies with the connection may
    # end in a stray CancelledError (RELIABILITY.md §3.3), which must count
    # as "not confirmed", never as done.
    results = await asyncio.gather(
        *(
            exchanges[m.exchange].publish(
                _message(m), m.routing_key, mandatory=True, timeout=10
            )
            for m in chunk
        ),
        return_exceptions=True,
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise _Indeterminate(f"{len(failed)} not confirmed, e.g. {failed[0]!r}")


async def publish(
    url: str,
    messages: Sequence[OutgoingMessage],
    *,
    chunk: int = 250,
    pause_s: float = 0.0,
    timeout_s: float = 60.0,
) -> PublishReport:
    """Publish *messages* in confirmed chunks, republishing indeterminate ones.

    *pause_s* between chunks spreads the load over time, so a fault lands
    while work is in flight. Bounded by *timeout_s* in all.
    """
    report = PublishReport()
    done = 0
    with anyio.fail_after(timeout_s):
        while done < len(messages):
            try:
                connection = await aio_pika.connect(url, timeout=5)
                async with connection:
                    channel = await connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    exchanges: dict[str, AbstractExchange] = {}
                    while done < len(messages):
                        part = messages[done : done + chunk]
                        await _publish_chunk(channel, exchanges, part)
                        done += len(part)
                        report.confirmed += len(part)
                        if pause_s:
                            await anyio.sleep(pause_s)  # pacing, not waiting
            except (_Indeterminate, *_PUBLISH_ERRORS) as exc:
                # Some of the chunk may have arrived: all of it is published again.
                report.indeterminate += min(chunk, len(messages) - done)
                report.reconnects += 1
                report.errors.append(repr(exc))
                await anyio.sleep(0.3)  # reconnect back-off
    return report


_envelope = msgspec.json.Decoder(Envelope)
_applied = msgspec.json.Decoder(LedgerEntryApplied)


async def read_outputs(
    url: str, queue: str, *, expect: set[str], timeout_s: float = 30.0
) -> Counter[str]:
    """Consume *queue* (``ledger.entry.applied``): copies per entry id.

    Stops once every entry id in *expect* was seen and the queue's leader
    reports nothing ready twice in a row (after the first, the deliveries
    sent before it have reached the callback), or after *timeout_s* with
    what it has.
    """
    seen: Counter[str] = Counter()

    async def count(message: AbstractIncomingMessage) -> None:
        applied = _applied.decode(_envelope.decode(message.body).data)
        seen[applied.entry_id] += 1  # no await before this: ordered with frames

    connection = await aio_pika.connect(url, timeout=5)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1000)
        q = await channel.get_queue(queue, ensure=False)
        tag = await q.consume(count, no_ack=True)
        empty = 0
        with anyio.move_on_after(timeout_s):
            while empty < 2:
                left = await channel.declare_queue(queue, passive=True)
                done = left.declaration_result.message_count == 0 and expect <= set(
                    seen
                )
                empty = empty + 1 if done else 0
                await anyio.sleep(0.1)  # bounded poll: the queue has no "empty" event
        await q.cancel(tag)
    return seen


def raw_message(
    name: str,
    body: bytes,
    *,
    content_type: str = "application/cloudevents+json",
    exchange: str = "q2c.events",
    routing_key: str = POSTED,
    type: str = POSTED,
    correlation_id: str = "acct-bad",
) -> OutgoingMessage:
    """Any bytes, published as a producer would publish an entry (id ``bad-<name>``)."""
    return OutgoingMessage(
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        message_id=f"bad-{name}",
        correlation_id=correlation_id,
        type=type,
        content_type=content_type,
    )


async def take(url: str, queue: str, n: int, *, timeout_s: float = 15.0) -> list[Got]:
    """``basic.get`` *n* messages from *queue* (acknowledged), waiting for them."""
    got: list[Got] = []
    connection = await aio_pika.connect(url, timeout=5)
    async with connection:
        channel = await connection.channel()
        q = await channel.get_queue(queue, ensure=False)
        with anyio.fail_after(timeout_s):
            while len(got) < n:
                message = await q.get(no_ack=True, fail=False)
                if message is None:
                    await anyio.sleep(0.1)  # bounded poll: basic.get does not wait
                    continue
                got.append(
                    Got(
                        body=message.body,
                        message_id=message.message_id,
                        headers=dict(message.headers),
                    )
                )
    return got


@dataclass(frozen=True, kw_only=True)
class Got:
    """One message taken from a queue."""

    body: bytes
    message_id: str | None
    headers: dict[str, Any]
