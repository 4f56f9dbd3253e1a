"""The ledger workload: what is published, what must come back, and the maths.

A workload is *messages* ``ledger.entry.posted`` envelopes in publish order,
of which a fraction are duplicates: re-publications of the same bytes (same
message id, same idempotency key ``ledger:<entry_id>``) of an entry posted
earlier. Entry ids say which phase they belong to and, in the latency phase,
when they were published: ``d.17`` or ``l.17.<monotonic_ns>``. Every variant
answers each distinct entry with one message whose ``data.entry_id`` is the
entry's, so one `OutputCounter` counts the outputs of all of them.

Generation is deterministic for a seed, except the latency stamps. This
side of the benchmark talks AMQP through the engine's own lean client
(`broker.transport.wire`): at some 10 µs a message instead of aio-pika's
200, it leaves the two cores to the pipelines being measured.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

import aio_pika
import anyio
import msgspec

from broker.codec import encode_envelope, encode_event
from broker.transport import OutgoingMessage, PublishOutcome
from broker.transport.channel import WireChannel
from broker.transport.wire import WireConnection
from canonical.envelope import CONTENT_TYPE, Envelope
from canonical.ledger import LedgerEntryPosted
from canonical.upcast import current_version

__all__ = [
    "BenchError",
    "EVENTS_EXCHANGE",
    "INPUT_TYPE",
    "OUTPUT_TYPE",
    "OUTPUT_QUEUE",
    "Posting",
    "Workload",
    "publish_order",
    "entry_id",
    "parse_entry_id",
    "account_name",
    "merge_expected",
    "percentile",
    "Tally",
    "OutputCounter",
    "counting",
    "message_for",
    "publish_backlog",
    "publish_paced",
    "ready_count",
    "declare_pipeline_queues",
]

EVENTS_EXCHANGE = "q2c.events"
INPUT_TYPE = "ledger.entry.posted"
OUTPUT_TYPE = "ledger.entry.applied"
#: Where every variant's outputs end up (the engine declares it from config).
OUTPUT_QUEUE = "q2c.events.ledger-applied"

_NAMESPACE = uuid.UUID("0b7d9a1e-52c4-4d8e-9f0a-6b3c1f2e8a47")
_SOURCE = "/bench/ledger"

Expected = dict[str, tuple[Decimal, int]]


class BenchError(Exception):
    """A phase failed or ran past its deadline; the message says which and why."""


def account_name(index: int) -> str:
    """The account (and correlation id) number *index*."""
    return f"acct-{index:05d}"


def entry_id(phase: str, index: int, stamp_ns: int | None = None) -> str:
    """``<phase>.<index>``, or ``<phase>.<index>.<stamp_ns>`` when stamped."""
    if stamp_ns is None:
        return f"{phase}.{index}"
    return f"{phase}.{index}.{stamp_ns}"


def parse_entry_id(text: str) -> tuple[str, int, int | None]:
    """Split an entry id made by `entry_id` into (phase, index, stamp).

    Raises:
        ValueError: *text* is not such an id.
    """
    parts = text.split(".")
    if len(parts) == 2:
        return parts[0], int(parts[1]), None
    if len(parts) == 3:
        return parts[0], int(parts[1]), int(parts[2])
    raise ValueError(f"not a bench entry id: {text!r}")


def publish_order(
    messages: int, duplicates: float, rng: random.Random, *, gap: int = 1024
) -> list[int]:
    """Distinct-entry indices in publish order; ``messages * duplicates`` are repeats.

    A repeat always follows its original and, when there are enough entries,
    by at least *gap* distinct entries, so no publisher window ever holds two
    copies of one message id (aiormq matches returns by message id).

    Raises:
        ValueError: *messages* < 1 or *duplicates* outside [0, 0.5].
    """
    if messages < 1:
        raise ValueError("messages must be at least 1")
    if not 0 <= duplicates <= 0.5:
        raise ValueError("duplicates must be between 0 and 0.5")
    repeats = min(round(messages * duplicates), messages - 1)
    at = set(rng.sample(range(1, messages), repeats)) if repeats else set()
    order: list[int] = []
    fresh = 0
    for position in range(messages):
        if position in at:
            order.append(rng.randrange(fresh - gap if fresh > gap else fresh))
        else:
            order.append(fresh)
            fresh += 1
    return order


@dataclass(frozen=True, slots=True)
class Posting:
    """One message to publish: its envelope bytes and AMQP identity."""

    index: int
    account: str
    message_id: str
    body: bytes


class Workload:
    """The messages of one phase, generated lazily from a seed.

    Args:
        phase: short tag put in every entry id (``d``, ``l``, ``b``).
        messages: how many to publish, duplicates included.
        accounts: how many accounts the entries spread over.
        duplicates: the fraction of *messages* that are repeats.
        seed: the same seed gives the same accounts, amounts and order.
        stamped: put the publish time in each entry id (latency phase);
            then `posting` must be called in publish order, at publish time.
    """

    def __init__(
        self,
        *,
        phase: str,
        messages: int,
        accounts: int,
        duplicates: float,
        seed: int,
        stamped: bool = False,
    ) -> None:
        if accounts < 1:
            raise ValueError("accounts must be at least 1")
        rng = random.Random(f"{seed}/{phase}")
        self.phase = phase
        self.order = publish_order(messages, duplicates, rng)
        self.distinct = max(self.order) + 1
        self._accounts = [rng.randrange(accounts) for _ in range(self.distinct)]
        self._cents = [rng.randint(-100_000, 100_000) for _ in range(self.distinct)]
        self._stamped = stamped
        self._cache: dict[int, Posting] = {}
        # One fixed time: rebuilding a posting gives the same bytes.
        self._time = datetime.now(UTC)

    @property
    def messages(self) -> int:
        """How many messages the phase publishes, duplicates included."""
        return len(self.order)

    def amount(self, index: int) -> Decimal:
        """The amount of distinct entry *index*."""
        return Decimal(self._cents[index]).scaleb(-2)

    def posting(self, position: int) -> Posting:
        """The message published at *position* (0-based) of `order`."""
        index = self.order[position]
        if not self._stamped:
            return self._build(index, entry_id(self.phase, index), self._time)
        cached = self._cache.get(index)
        if cached is None:
            eid = entry_id(self.phase, index, time.monotonic_ns())
            cached = self._build(index, eid, datetime.now(UTC))
            self._cache[index] = cached
        return cached

    def postings(self) -> Iterator[Posting]:
        """Every message, in publish order."""
        return (self.posting(p) for p in range(self.messages))

    def expected(self) -> Expected:
        """Account → (balance, entries) once every distinct entry is applied once."""
        out: Expected = {}
        for index in range(self.distinct):
            name = account_name(self._accounts[index])
            balance, entries = out.get(name, (Decimal(0), 0))
            out[name] = (balance + self.amount(index), entries + 1)
        return out

    def _build(self, index: int, eid: str, at: datetime) -> Posting:
        account = account_name(self._accounts[index])
        key = f"ledger:{eid}"
        message_id = str(uuid.uuid5(_NAMESPACE, key))
        event = LedgerEntryPosted(
            account=account, entry_id=eid, amount=self.amount(index)
        )
        body = encode_envelope(
            Envelope(
                id=message_id,
                source=_SOURCE,
                type=INPUT_TYPE,
                schema_version=current_version(INPUT_TYPE),
                time=at,
                correlation_id=account,
                idempotency_key=key,
                data=encode_event(event),
            )
        )
        return Posting(index=index, account=account, message_id=message_id, body=body)


def merge_expected(*parts: Expected) -> Expected:
    """Add up the expected balances of several workloads on one database."""
    out: Expected = {}
    for part in parts:
        for account, (balance, entries) in part.items():
            have_balance, have_entries = out.get(account, (Decimal(0), 0))
            out[account] = (have_balance + balance, have_entries + entries)
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The *q*-th percentile (0-100) by linear interpolation, as numpy's default.

    Raises:
        ValueError: *values* is empty or *q* is outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(eq=False)
class Tally:
    """The outputs of one phase as they arrive.

    Args:
        phase: the entry-id tag of the phase.
        distinct: how many distinct entries the phase published.
        target: outputs that end the phase: *distinct* when the variant
            deduplicates, every message when it passes duplicates through.
        count_all: count every output towards *target*, not only new entries.
    """

    phase: str
    distinct: int
    target: int
    count_all: bool = False
    seen: bytearray = field(init=False)
    new: int = 0
    total: int = 0
    unknown: int = 0
    first_ns: int | None = None
    done_ns: int | None = None
    latencies_ns: list[int] = field(default_factory=list)
    #: Publish stamp of each entry in `latencies_ns`, in the same order.
    stamps_ns: list[int] = field(default_factory=list)
    done: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        self.seen = bytearray(self.distinct)

    def record(self, index: int, stamp_ns: int | None, now_ns: int) -> None:
        """Count one output for entry *index*, received at *now_ns*."""
        if not 0 <= index < self.distinct:
            self.unknown += 1
            return
        self.total += 1
        if self.first_ns is None:
            self.first_ns = now_ns
        if not self.seen[index]:
            self.seen[index] = 1
            self.new += 1
            if stamp_ns is not None:
                self.latencies_ns.append(now_ns - stamp_ns)
                self.stamps_ns.append(stamp_ns)
        reached = (self.total if self.count_all else self.new) >= self.target
        if reached and self.done_ns is None:
            self.done_ns = now_ns
            self.done.set()

    def latency_ms(self, q: float, *, since_ns: int | None = None) -> float | None:
        """The *q*-th percentile latency in milliseconds, if any were stamped.

        With *since_ns*, only of the entries published at or after it.
        """
        values = self.latencies_ns
        if since_ns is not None:
            values = [
                latency
                for stamp, latency in zip(self.stamps_ns, values, strict=True)
                if stamp >= since_ns
            ]
        if not values:
            return None
        return percentile(values, q) / 1e6


class _OutData(msgspec.Struct):
    entry_id: str


class _Out(msgspec.Struct):
    data: _OutData


_out_decoder = msgspec.json.Decoder(_Out)


class OutputCounter:
    """Feeds every output message to the `Tally` of its phase."""

    _ACK_EVERY = 250  # well under the prefetch, so the consumer never stalls

    def __init__(self) -> None:
        self._tallies: dict[str, Tally] = {}
        self.foreign = 0

    def expect(self, tally: Tally) -> Tally:
        """Count outputs whose entry ids carry ``tally.phase`` into *tally*."""
        self._tallies[tally.phase] = tally
        return tally

    def record(self, body: bytes, now_ns: int) -> None:
        """Count one output body; anything unrecognised counts as foreign."""
        try:
            phase, index, stamp = parse_entry_id(
                _out_decoder.decode(body).data.entry_id
            )
        except (msgspec.DecodeError, ValueError):
            self.foreign += 1
            return
        tally = self._tallies.get(phase)
        if tally is None:
            self.foreign += 1
            return
        tally.record(index, stamp, now_ns)

    async def read(self, channel: WireChannel, queue: str) -> None:
        """Consume *queue* until cancelled, a batch of deliveries at a time."""
        await channel.qos(1000)
        await channel.consume(queue)
        while True:
            deliveries = await channel.get_batch(1000)
            now_ns = time.monotonic_ns()
            for delivery in deliveries:
                self.record(delivery.body, now_ns)
            channel.ack(deliveries[-1].tag, multiple=True)


@asynccontextmanager
async def counting(
    connection: WireConnection, counter: OutputCounter, queue: str = OUTPUT_QUEUE
) -> AsyncIterator[None]:
    """Consume *queue* into *counter* for the duration of the block."""
    channel = await connection.channel()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(counter.read, channel, queue)
            yield
            tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await channel.close()


def message_for(posting: Posting) -> OutgoingMessage:
    """The AMQP message of *posting* (persistent, mandatory, confirmed)."""
    return OutgoingMessage(
        exchange=EVENTS_EXCHANGE,
        routing_key=INPUT_TYPE,
        body=posting.body,
        message_id=posting.message_id,
        correlation_id=posting.account,
        type=INPUT_TYPE,
        content_type=CONTENT_TYPE,
    )


async def _publish(
    channel: WireChannel, postings: list[Posting], timeout_s: float
) -> None:
    outcomes = await channel.publish_batch(
        [message_for(p) for p in postings], timeout_s
    )
    for posting, outcome in zip(postings, outcomes, strict=True):
        if outcome is not PublishOutcome.ACK:
            raise BenchError(
                f"publishing entry {posting.index} ({posting.message_id}) "
                f"failed: {outcome.name}"
            )


class _Window:
    """At most *batches* publish batches in flight: `reserve`, then `send`."""

    def __init__(self, channel: WireChannel, batches: int, timeout_s: float) -> None:
        self._channel = channel
        self._slots = anyio.Semaphore(batches)
        self._timeout_s = timeout_s

    async def reserve(self) -> None:
        """Wait for a free slot; the next `send` uses it."""
        await self._slots.acquire()

    async def send(self, postings: list[Posting]) -> None:
        """Publish one batch in the reserved slot; free it when confirmed."""
        try:
            await _publish(self._channel, postings, self._timeout_s)
        finally:
            self._slots.release()


async def publish_backlog(
    channel: WireChannel,
    workload: Workload,
    *,
    batch: int = 250,
    batches: int = 4,
    timeout_s: float = 30.0,
) -> float:
    """Publish every message of *workload* as fast as confirms allow; return seconds.

    *channel* must be in confirm mode. A nack, return or missing confirm
    fails the phase. At most ``batch * batches`` (1,000) messages are in
    flight, under the 1,024-entry gap before a repeat, so one message id is
    never in flight twice.
    """
    started = time.perf_counter()
    window = _Window(channel, batches, timeout_s)
    async with anyio.create_task_group() as tg:
        for first in range(0, workload.messages, batch):
            last = min(first + batch, workload.messages)
            postings = [workload.posting(p) for p in range(first, last)]
            await window.reserve()
            tg.start_soon(window.send, postings)
    return time.perf_counter() - started


async def publish_paced(
    channel: WireChannel,
    workload: Workload,
    rate: float,
    *,
    max_batch: int = 250,
    batches: int = 4,
    timeout_s: float = 30.0,
) -> float:
    """Publish *workload* at *rate* messages per second; return the rate achieved.

    The schedule is absolute (message *i* is due at ``start + i / rate``):
    each round waits for a free batch slot, then for the next message to be
    due, and publishes everything due by then (at most *max_batch*). A
    stamped workload takes each entry's time when its batch is built, just
    before it is written.
    """
    window = _Window(channel, batches, timeout_s)
    started = time.perf_counter()
    position = 0
    async with anyio.create_task_group() as tg:
        while position < workload.messages:
            await window.reserve()
            ahead = started + position / rate - time.perf_counter()
            if ahead > 0:
                await anyio.sleep(ahead)
            due = int((time.perf_counter() - started) * rate) + 1
            last = min(max(due, position + 1), position + max_batch, workload.messages)
            postings = [workload.posting(p) for p in range(position, last)]
            position = last
            tg.start_soon(window.send, postings)
    elapsed = time.perf_counter() - started
    return workload.messages / elapsed if elapsed > 0 else float("inf")


async def ready_count(channel: WireChannel, queues: Sequence[str]) -> int:
    """Messages ready (not yet delivered) in *queues*, from passive declares.

    Cheap (a fraction of a millisecond each) and current, unlike the
    management API, whose queue figures lag by its statistics interval.
    """
    total = 0
    for name in queues:
        _, ready, _ = await channel.queue_declare(name, passive=True)
        total += ready
    return total


async def declare_pipeline_queues(
    amqp_url: str, *, input_queue: str, output_queue: str = OUTPUT_QUEUE
) -> None:
    """Declare the naive/pass-through topology: quorum queues, as the engine's are.

    ``q2c.events`` (topic) routes ``ledger.entry.posted`` to *input_queue*
    and ``ledger.entry.applied`` to *output_queue*.
    """
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        events = await channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        inbound = await channel.declare_queue(
            input_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await inbound.bind(events, INPUT_TYPE)
        outbound = await channel.declare_queue(
            output_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await outbound.bind(events, OUTPUT_TYPE)
    finally:
        await connection.close()
