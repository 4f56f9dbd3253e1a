"""In-process transport with RabbitMQ's semantics: the embedded default and the tests.

It routes by the same `Topology` the AMQP transport declares, through the
exchanges, queues and bindings of a `Vhost` (see `broker.transport.vhost`
for the exchange types and queue limits it emulates), and behaves like
RabbitMQ wherever the daemon can tell the difference:

* publishing answers ``ACK`` only when every destination queue stored the
  message, ``NACK`` when one of them was full, ``RETURNED`` when none matched;
* consumers: prefetch credit, competing consumers served round-robin, one
  active consumer at a time on single-active-consumer queues, manual ``ack``
  (also ``multiple``) and ``reject``. A closed or disconnected subscription
  returns its unacknowledged deliveries to the *front* of the queue, marked
  redelivered and counted in ``x-delivery-count``; past the delivery limit
  they are dead-lettered instead, as on a quorum queue.

Time: a message in a queue with a TTL (the retry tiers) is dead-lettered when
it reaches the head of the queue and its TTL has passed, through the queue's
dead-letter exchange, by its own routing key. There is no timer task: every
operation first runs the due timers, and a waiting ``batch()`` wakes at the
next due time by itself. With an injected fake *clock*, move the clock and
call `MemoryTransport.run_timers`.

Durability: opened with a journal (`MemoryTransport.open`, the daemon's
``[memory] journal``), every queue is kept on disk as well, a publish is
confirmed only once it is written, and a restart delivers again what was
queued: a message its consumer had not committed (redelivered, counted), a
retry waiting out its tier, a webhook's event already answered 202. See
`broker.transport.journal` for when each change is written. Without one
(the constructor, as the unit tests use it), what sits in a queue when the
process exits is gone.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import anyio
import anyio.lowlevel
import structlog

from broker.config import Synchronous
from broker.errors import ConfigError, StoreUnavailable, TransportUnavailable
from broker.transport import Delivery, OutgoingMessage, PublishOutcome
from broker.transport.journal import JournalRow, QueueJournal
from broker.transport.topology import RETRY_PREFIX, Topology
from broker.transport.vhost import Entry, Message, Queue, Vhost

__all__ = [
    "MemorySubscription",
    "MemoryTransport",
]

log = structlog.get_logger(__name__)

#: How long a dead letter whose target is full waits before the next attempt.
_DEAD_LETTER_RETRY_S = 1.0
#: How long a consumer waits before it tries a failed journal write again.
_JOURNAL_RETRY_S = 0.5
_COUNTER = {
    PublishOutcome.ACK: "confirmed",
    PublishOutcome.NACK: "nacked",
    PublishOutcome.RETURNED: "returned",
    PublishOutcome.INDETERMINATE: "indeterminate",
}


class MemorySubscription:
    """A consumer on one queue of a `MemoryTransport`; see `Subscription`."""

    def __init__(
        self, transport: MemoryTransport, queue: Queue, prefetch: int, tag: str
    ) -> None:
        self.consumer_tag = tag
        self.delivered = 0
        self.acked = 0
        self.rejected = 0
        self._transport = transport
        self._queue = queue
        self._prefetch = prefetch
        self._next_tag = 1
        self._unacked: dict[int, Entry] = {}  # in tag order
        self._received: deque[Delivery] = deque()  # bounded by prefetch
        self._wakeup = anyio.Event()
        self._closed_because: str | None = None

    def __repr__(self) -> str:
        state = f" closed: {self._closed_because}" if self._closed_because else ""
        return (
            f"<MemorySubscription {self._queue.name} "
            f"{len(self._unacked)}/{self._prefetch} unacked{state}>"
        )

    @property
    def queue(self) -> str:
        """The queue consumed."""
        return self._queue.name

    @property
    def alive(self) -> bool:
        """Whether the subscription still consumes."""
        return self._closed_because is None

    def status(self) -> dict[str, Any]:
        """Counters for ``brokerctl status``, as the AMQP subscription reports."""
        return {
            "queue": self._queue.name,
            "consumer_tag": self.consumer_tag,
            "alive": self.alive,
            "delivered": self.delivered,
            "acked": self.acked,
            "rejected": self.rejected,
            "buffered": len(self._received),
            "unacked": len(self._unacked),
        }

    async def batch(self, max_n: int) -> list[Delivery]:
        """Wait for at least one delivery; return up to *max_n* received ones.

        Raises:
            TransportUnavailable: the subscription was closed or disconnected.
        """
        if max_n < 1:
            raise ValueError(f"max_n must be at least 1, not {max_n}")
        await anyio.lowlevel.checkpoint()
        transport = self._transport
        while True:
            if self._closed_because is not None:
                raise TransportUnavailable(
                    f"subscription to {self._queue.name!r} {self._closed_because}"
                )
            transport.run_timers()
            # Only deliveries whose delivered mark is written are handed out:
            # the ones here before the write below (an ack or a timer may
            # push more while it runs). The write also carries the
            # acknowledgements since the last one, before any wait.
            ready = len(self._received)
            if transport._journal is not None and transport._journal.pending:
                if not await transport._sync_journal():
                    await anyio.sleep(_JOURNAL_RETRY_S)
                    continue
                if not self.alive:
                    continue  # closed meanwhile
            if ready:
                n = min(max_n, ready)
                self.delivered += n
                return [self._received.popleft() for _ in range(n)]
            if self._received:
                continue  # arrived during the write: write their marks first
            if self._wakeup.is_set():
                self._wakeup = anyio.Event()
            with anyio.move_on_after(self._transport.seconds_to_next_timer()):
                await self._wakeup.wait()

    def ack(self, tag: int, *, multiple: bool = False) -> None:
        """Acknowledge *tag* (and, with *multiple*, every earlier delivery).

        As on RabbitMQ, an unknown tag closes the subscription (its other
        deliveries are redelivered); after a close, acks are ignored.
        """
        if self._closed_because is not None:
            return
        if tag not in self._unacked:
            self._unknown_tag(tag)
            return
        settled = [t for t in self._unacked if t <= tag] if multiple else [tag]
        journal = self._transport._journal
        for t in settled:
            entry = self._unacked.pop(t)
            if journal is not None:
                journal.removed(entry)
        self.acked += len(settled)
        self._transport._dispatch(self._queue)

    def reject(self, tag: int, *, requeue: bool) -> None:
        """Refuse one delivery: back to the front of the queue, or dead-lettered."""
        if self._closed_because is not None:
            return
        entry = self._unacked.pop(tag, None)
        if entry is None:
            self._unknown_tag(tag)
            return
        self.rejected += 1
        if requeue:
            self._transport._requeue(self._queue, [entry])
        else:
            self._transport._dead_letter(self._queue, entry, "rejected")
        self._transport._dispatch(self._queue)

    async def close(self) -> None:
        """Stop consuming; unacknowledged deliveries return to the queue's front."""
        if self._closed_because is None:
            entries = self._detach("was closed")
            self._transport._requeue(self._queue, entries)
        await anyio.lowlevel.checkpoint()

    def _has_credit(self) -> bool:
        return len(self._unacked) < self._prefetch

    def _deliver(self, entry: Entry) -> None:
        tag = self._next_tag
        self._next_tag += 1
        self._unacked[tag] = entry
        entry.delivered = True
        if self._transport._journal is not None:
            self._transport._journal.changed(entry, self._queue.name)
        self._received.append(entry.delivery(tag))
        self._wakeup.set()

    def _detach(self, reason: str) -> list[Entry]:
        """Stop for *reason*; return the unacknowledged entries, oldest first."""
        self._closed_because = reason
        entries = list(self._unacked.values())
        self._unacked.clear()
        self._received.clear()
        self._queue.subscriptions.remove(self)
        self._transport._subscriptions.discard(self)
        self._wakeup.set()
        return entries

    def _unknown_tag(self, tag: int) -> None:
        log.warning("delivery_tag_unknown", queue=self._queue.name, tag=tag)
        entries = self._detach(f"was closed: PRECONDITION_FAILED unknown tag {tag}")
        self._transport._requeue(self._queue, entries)


class MemoryTransport:
    """The `Transport` in-process, routing by *topology*.

    Args:
        topology: exchanges, queues, bindings and policies to emulate.
        clock: monotonic seconds; inject a fake one to drive TTLs in tests.
        max_length: when given, the bound of every queue, overriding the
            topology; otherwise queue argument, then policy, then
            `DEFAULT_MAX_LENGTH`.
        journal: where the queues are kept on disk; see `open`, which
            opens one and restores what it holds.

    Raises:
        ConfigError: a binding names an exchange or queue not in *topology*.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_length: int | None = None,
        journal: QueueJournal | None = None,
    ) -> None:
        self._clock = clock
        self._journal = journal
        self._vhost = Vhost(topology, max_length=max_length)
        self._subscriptions: set[MemorySubscription] = set()
        self._consumers = 0
        self._disconnects = 0
        #: Outcome counters, named as the AMQP transport names them.
        self._counts = dict.fromkeys(
            ("published", "confirmed", "nacked", "returned", "indeterminate"), 0
        )
        self._next_due = math.inf
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"<MemoryTransport {len(self._vhost.queues)} queues "
            f"{len(self._subscriptions)} subscriptions"
            f"{' closed' if self._closed else ''}>"
        )

    @classmethod
    async def open(
        cls,
        topology: Topology,
        *,
        journal: str,
        clock: Callable[[], float] = time.monotonic,
        max_length: int | None = None,
        synchronous: Synchronous = "full",
    ) -> MemoryTransport:
        """A transport whose queues are kept in the SQLite file *journal*.

        What the file holds is queued again, in the order it was first
        queued: a message that was delivered and not acknowledged comes back
        redelivered with its delivery count one higher (past the queue's
        delivery limit it is dead-lettered), a message in a TTL queue keeps
        its due time. Messages of a queue no longer in *topology* stay in
        the file, untouched, and are logged. *synchronous* is SQLite's for
        the file (``[memory] synchronous``).

        Raises:
            ConfigError: another process has *journal* open, or it is not a
                queue journal this version reads.
            StoreUnavailable: the file cannot be opened or read.
        """
        opened, rows = await QueueJournal.open(
            journal, clock=clock, synchronous=synchronous
        )
        try:
            transport = cls(
                topology, clock=clock, max_length=max_length, journal=opened
            )
            transport._restore(rows)
        except BaseException:
            await opened.aclose()  # lets go of the file's lock
            raise
        return transport

    async def subscribe(self, queue: str, *, prefetch: int) -> MemorySubscription:
        """Start consuming *queue* with at most *prefetch* unacknowledged deliveries.

        Raises:
            ConfigError: *queue* is not in the topology.
            TransportUnavailable: the transport was closed.
        """
        await anyio.lowlevel.checkpoint()
        if self._closed:
            raise TransportUnavailable("the memory transport is closed")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, not {prefetch}")
        try:
            q = self._vhost.queues[queue]
        except KeyError:
            raise ConfigError(f"queue {queue!r} is not in the topology") from None
        self._consumers += 1
        subscription = MemorySubscription(
            self, q, prefetch, f"memory-{self._consumers}"
        )
        q.subscriptions.append(subscription)
        self._subscriptions.add(subscription)
        self._dispatch(q)
        return subscription

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout_s: float
    ) -> list[PublishOutcome]:
        """Route and store *messages*; one outcome each, in order.

        *timeout_s* is accepted for the protocol: nothing here waits.
        """
        await anyio.lowlevel.checkpoint()
        if self._closed:
            self._counts["indeterminate"] += len(messages)
            return [PublishOutcome.INDETERMINATE] * len(messages)
        self.run_timers()
        outcomes = [self._publish_one(m) for m in messages]
        if self._journal is not None and not await self._sync_journal():
            # Queued, but not on disk: not confirmed. The publisher sends
            # them again; the inbox makes the copies cause nothing.
            outcomes = [
                PublishOutcome.INDETERMINATE if o is PublishOutcome.ACK else o
                for o in outcomes
            ]
        self._counts["published"] += len(messages)
        for outcome in outcomes:
            self._counts[_COUNTER[outcome]] += 1
        return outcomes

    @property
    def refusal(self) -> str | None:
        """Always ``None``: nothing here checks permissions."""
        return None

    @property
    def channel_closes(self) -> tuple[int, str | None]:
        """Always none: nothing here closes a channel."""
        return 0, None

    def status(self) -> dict[str, Any]:
        """The AMQP transport's status shape, plus per-queue message counts."""
        self.run_timers()
        journal = self._journal
        return {
            "journal": None
            if journal is None
            else {"path": journal.path, "writes": journal.writes},
            "connections": {
                "memory": {
                    "name": "memory",
                    "state": "closed" if self._closed else "connected",
                    "reconnects": self._disconnects,
                    "last_error": None,
                    "blocked_reason": None,
                }
            },
            "reconnects": self._disconnects,
            "subscriptions": [s.status() for s in self._subscriptions],
            **self._counts,
            "queues": {q.name: q.counts() for q in self._vhost.queues.values()},
        }

    def queue_depth(self, name: str) -> int:
        """Messages in queue *name*, ready or unacknowledged (RabbitMQ's "Total")."""
        self.run_timers()
        counts = self._vhost.queues[name].counts()
        return counts["ready"] + counts["unacked"]

    def simulate_disconnect(self) -> None:
        """Drop every subscription as a lost connection would.

        Their ``batch()`` raises `TransportUnavailable` and their unacknowledged
        deliveries go back to the front of their queues, redelivered. The
        transport itself stays usable, like a reconnected robust connection.
        """
        if not self._closed:
            self._disconnects += 1
        returned = [
            (s._queue, s._detach("lost its connection"))
            for s in list(self._subscriptions)
        ]
        # Requeue only after every consumer is gone, so nothing is handed to
        # a consumer that is about to die as well.
        for queue, entries in returned:
            self._requeue(queue, entries)

    async def aclose(self) -> None:
        """Close: subscriptions fail, later publishes are indeterminate.

        The journal, if any, is written and closed: what was unacknowledged
        is queued again, redelivered, at the next `open`.
        """
        self._closed = True
        self.simulate_disconnect()
        if self._journal is not None:
            try:
                await self._journal.aclose()  # shielded
            except StoreUnavailable as exc:
                log.warning("queue_journal_unavailable", error=str(exc))
        await anyio.lowlevel.checkpoint()

    def run_timers(self) -> None:
        """Dead-letter every message whose TTL has passed; retry parked dead letters.

        Called by every operation; call it yourself after moving a fake clock.
        """
        now = self._clock()
        if now < self._next_due:
            return
        self._next_due = math.inf
        for q in self._vhost.queues.values():
            while q.ttl_s is not None and q.ready and q.ready[0].due <= now:
                self._dead_letter(q, q.ready.popleft(), "expired")
            for _ in range(len(q.parked)):
                if q.parked[0].due > now:
                    break
                entry = q.parked.popleft()
                if self._route_dead_letter(entry.message):
                    if self._journal is not None:
                        self._journal.removed(entry)
                else:
                    entry.due = now + _DEAD_LETTER_RETRY_S
                    q.parked.append(entry)
            for pending in (q.ready if q.ttl_s is not None else (), q.parked):
                if pending:
                    self._next_due = min(self._next_due, pending[0].due)

    def seconds_to_next_timer(self) -> float:
        """How long until `run_timers` has work: ``math.inf`` when nothing waits."""
        return max(0.0, self._next_due - self._clock())

    def _publish_one(self, m: OutgoingMessage) -> PublishOutcome:
        message = Message(
            body=m.body,
            exchange=m.exchange,
            routing_key=m.routing_key,
            message_id=m.message_id,
            correlation_id=m.correlation_id,
            type=m.type,
            content_type=m.content_type,
            headers=dict(m.headers),
        )
        encoded = None
        if self._journal is not None:
            try:
                encoded = self._journal.encode(message)
            except ValueError as exc:
                # Nothing could ever store it: parked by the relay, as an
                # unroutable message is (RabbitMQ refuses such a frame too).
                log.warning(
                    "publish_unstorable", message_id=m.message_id, error=str(exc)
                )
                return PublishOutcome.RETURNED
        targets = self._vhost.route(message)
        if not targets:
            if m.exchange and m.exchange not in self._vhost.exchanges:
                log.warning("publish_to_unknown_exchange", exchange=m.exchange)
            return PublishOutcome.RETURNED
        outcome = PublishOutcome.ACK
        for q in targets:
            if q.is_full():
                outcome = PublishOutcome.NACK  # stored in the others, as RabbitMQ
            else:
                self._enqueue(q, message, encoded)
        return outcome

    def _enqueue(
        self, q: Queue, message: Message, encoded: bytes | None = None
    ) -> None:
        journal = self._journal
        if q.drop_head and q.ready and q.at_max_length():
            dropped = q.ready.popleft()  # overflow drop-head: the oldest goes
            if journal is not None:
                journal.removed(dropped)
        entry_id = 0 if journal is None else journal.new_id()
        if q.ttl_s is None:
            entry = Entry(message, id=entry_id)
        else:
            entry = Entry(message, due=self._clock() + q.ttl_s, id=entry_id)
        q.ready.append(entry)
        if journal is not None:
            journal.added(entry, q.name, encoded=encoded)
        if q.ttl_s is not None:
            due = entry.due
            if due < self._next_due:
                self._next_due = due
                # Waiters computed their timeout before this timer existed:
                # wake them so one of them runs the timer when it is due.
                for sub in self._subscriptions:
                    sub._wakeup.set()
        self._dispatch(q)

    def _dispatch(self, q: Queue) -> None:
        """Hand ready messages to consumers with credit (the broker's push)."""
        if not q.subscriptions:
            return
        if q.single_active:
            active = q.subscriptions[0]
            while q.ready and active._has_credit():
                active._deliver(q.ready.popleft())
            return
        n = len(q.subscriptions)
        while q.ready:
            for offset in range(n):
                subscription = q.subscriptions[(q.next_consumer + offset) % n]
                if subscription._has_credit():
                    break
            else:
                return  # nobody has credit
            subscription._deliver(q.ready.popleft())
            q.next_consumer = (q.next_consumer + offset + 1) % n

    def _requeue(self, q: Queue, entries: list[Entry]) -> None:
        """Put *entries* back at the front, oldest first; dead-letter the exhausted."""
        kept = []
        journal = self._journal
        for entry in entries:
            entry.redelivered = True
            entry.delivered = False
            entry.delivery_count += 1
            if q.delivery_limit is not None and entry.delivery_count > q.delivery_limit:
                self._dead_letter(q, entry, "delivery_limit")
            else:
                kept.append(entry)
                if journal is not None:
                    journal.changed(entry, q.name)
        q.ready.extendleft(reversed(kept))
        if q.ttl_s is not None and q.ready:
            self._next_due = min(self._next_due, q.ready[0].due)
        self._dispatch(q)

    def _dead_letter(self, q: Queue, entry: Entry, reason: str) -> None:
        """Move *entry* out of *q* through its dead-letter exchange, if it has one."""
        journal = self._journal
        if journal is not None:
            journal.removed(entry)
        if q.dead_letter_exchange is None:
            return  # dropped, as RabbitMQ drops it
        msg = entry.message
        dead = _died(
            msg,
            q.name,
            reason,
            exchange=q.dead_letter_exchange,
            routing_key=q.dead_letter_routing_key or msg.routing_key,
        )
        if self._route_dead_letter(dead):
            return
        if not q.at_least_once:
            log.info(
                "dead_letter_dropped",
                queue=q.name,
                reason=reason,
                message_id=msg.message_id,
            )
            return
        log.warning(
            "dead_letter_deferred",
            queue=q.name,
            reason=reason,
            message_id=msg.message_id,
            dead_letter_exchange=q.dead_letter_exchange,
        )
        due = self._clock() + _DEAD_LETTER_RETRY_S
        parked = Entry(dead, due=due, id=0 if journal is None else journal.new_id())
        q.parked.append(parked)
        if journal is not None:
            journal.added(parked, q.name, parked=True)
        self._next_due = min(self._next_due, due)

    def _route_dead_letter(self, message: Message) -> bool:
        """Store *message* in all its targets, or in none (full or unroutable)."""
        targets = self._vhost.route(message)
        if not targets or any(q.is_full() for q in targets):
            return False
        for q in targets:
            self._enqueue(q, message)
        return True

    async def _sync_journal(self) -> bool:
        """Write the journal's pending changes; ``False`` (logged) if that failed."""
        assert self._journal is not None
        try:
            await self._journal.sync()
        except StoreUnavailable as exc:
            log.warning("queue_journal_unavailable", error=str(exc))
            return False
        return True

    def _expire_orphan(self, row: JournalRow) -> bool:
        """Send a message of a retry tier no longer declared back to its origin.

        A tier's messages dead-letter through the default exchange by their
        own routing key when their TTL runs out; a tier taken out of
        ``[topology] retry-tiers-s`` ends their wait now instead of never.
        """
        if not row.queue.startswith(RETRY_PREFIX) or row.parked:
            return False
        msg = row.message
        back = _died(
            msg, row.queue, "expired", exchange="", routing_key=msg.routing_key
        )
        if not self._route_dead_letter(back):
            return False
        assert self._journal is not None
        self._journal.removed(Entry(msg, id=row.id))
        return True

    def _restore(self, rows: list[JournalRow]) -> None:
        """Queue again what the journal held when it was opened."""
        now, wall = self._clock(), time.time()
        orphans: dict[str, int] = {}
        held: dict[str, list[Entry]] = {}
        queues = self._vhost.queues
        for row in rows:
            q = queues.get(row.queue)
            if q is None:
                if not self._expire_orphan(row):
                    orphans[row.queue] = orphans.get(row.queue, 0) + 1
                continue
            due = math.inf if row.due is None else now + max(0.0, row.due - wall)
            entry = Entry(row.message, due=due, id=row.id)
            entry.delivery_count = row.delivery_count
            entry.redelivered = row.redelivered
            if row.parked:
                q.parked.append(entry)
            elif row.delivered:
                held.setdefault(q.name, []).append(entry)
            else:
                q.ready.append(entry)
        for name, entries in held.items():
            # Delivered, never settled: the process died while a consumer
            # held them. As a lost connection does, back to the front.
            self._requeue(queues[name], entries)
        for name, count in orphans.items():
            log.warning(
                "queue_journal_orphans",
                queue=name,
                messages=count,
                hint="the queue is no longer in the topology; they stay in the journal",
            )
        for q in queues.values():
            for pending in (q.ready if q.ttl_s is not None else (), q.parked):
                if pending:
                    self._next_due = min(self._next_due, pending[0].due)
        restored = len(rows) - sum(orphans.values())
        if restored:
            log.info(
                "queue_journal_restored",
                journal=self._journal.path if self._journal else None,
                messages=restored,
                redelivered=sum(len(e) for e in held.values()),
            )


def _died(
    msg: Message, queue: str, reason: str, *, exchange: str, routing_key: str
) -> Message:
    """*msg* dead-lettered out of *queue* for *reason*, to *exchange*.

    The ``x-first-death-*`` headers keep the first death, ``x-last-death-*``
    name this one, as RabbitMQ's do.
    """
    headers = dict(msg.headers)
    headers.setdefault("x-first-death-queue", queue)
    headers.setdefault("x-first-death-reason", reason)
    headers["x-last-death-queue"] = queue
    headers["x-last-death-reason"] = reason
    return replace(msg, exchange=exchange, routing_key=routing_key, headers=headers)
