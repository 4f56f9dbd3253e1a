"""The RabbitMQ `Transport`: two supervised connections on the wire client.

One connection publishes, one consumes, as RabbitMQ advises: an alarm blocks
publishing connections, and acks must keep flowing while it lasts. They are
named ``"<daemon> publish"`` and ``"<daemon> consume"`` so the management UI
says who they are.

Each connection has a supervisor task that connects with jittered
exponential backoff and reconnects when the connection dies. Nothing is
replayed on reconnect, on purpose:

* A subscription dies with its channel; ``batch()`` then raises
  `TransportUnavailable` and the caller subscribes again. The broker
  redelivers what was unacknowledged, so acks for the old tags are dropped
  (at debug level), never sent on the new channel.
* A publish in flight when the connection dies comes back INDETERMINATE; the
  caller (the outbox relay) republishes with the same ``message_id``.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Final, final

import structlog

from broker.config import AmqpConfig
from broker.errors import ConfigError, TransportUnavailable
from broker.retry import Backoff
from broker.transport import Delivery, OutgoingMessage, PublishOutcome
from broker.transport.channel import WireChannel
from broker.transport.frames import ClosedByBroker, parse_url
from broker.transport.wire import WireConnection

__all__ = ["AmqpTransport", "AmqpSubscription"]

_log = structlog.get_logger(__name__)

_INDETERMINATE: Final = PublishOutcome.INDETERMINATE
_ACK: Final = PublishOutcome.ACK
#: AMQP reply code of a permission refusal (channel or connection close).
_ACCESS_REFUSED: Final = 403
#: Longest wait between attempts while the broker refuses to let us consume.
_REFUSED_MAX_S: Final = 30.0


def _backoff_s(cfg: AmqpConfig, failures: int) -> float:
    """Exponential from ``reconnect_interval_s``, capped, with ±20 % jitter."""
    exponent = min(max(0, failures - 1), 30)  # 2**30 s is past any sane cap
    base = min(cfg.reconnect_max_s, cfg.reconnect_interval_s * 2.0**exponent)
    return min(cfg.reconnect_max_s, base * random.uniform(0.8, 1.2))


class _Link:
    """One supervised connection. Internal: not for use outside broker/."""

    def __init__(
        self,
        name: str,
        cfg: AmqpConfig,
        on_change: Callable[[], None],
        tls: ssl.SSLContext | None,
    ) -> None:
        self.name = name
        self._cfg = cfg
        self._tls = tls
        self._on_change = on_change
        self.conn: WireConnection | None = None
        self.up = asyncio.Event()
        self.reconnects = 0
        self.failures = 0
        self.last_error: str | None = None
        self.closing = False
        self.task: asyncio.Task[None] | None = None

    @property
    def state(self) -> str:
        """One of connected, blocked, connecting, reconnecting, closed."""
        conn = self.conn
        if self.closing:
            return "closed"
        if conn is None:
            return "connecting"
        if conn.is_closed:
            return "reconnecting"
        return "blocked" if conn.is_blocked else "connected"

    def _set_up(self, up: bool) -> None:
        if up:
            self.up.set()
        else:
            self.up.clear()
        self._on_change()

    async def connection(self) -> WireConnection:
        """Wait for a live connection.

        Raises:
            TransportUnavailable: the transport was closed.
        """
        while True:
            if self.closing:
                raise TransportUnavailable(f"{self.name}: transport closed")
            conn = self.conn
            if conn is not None and not conn.is_closed:
                return conn
            # The supervisor may not have noticed the death yet; don't spin.
            self._set_up(False)
            await self.up.wait()

    async def run(self) -> None:
        """Connect, wait for the connection to die, back off, repeat."""
        cfg = self._cfg
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn = await WireConnection.open(
                    cfg.url,
                    name=self.name,
                    heartbeat_s=cfg.heartbeat_s,
                    connect_timeout_s=cfg.connect_timeout_s,
                    tls=self._tls,
                    mechanism=cfg.auth_mechanism,
                )
            except TransportUnavailable as exc:
                self.failures += 1
                self.last_error = str(
                    exc
                )  # names host, vhost and user; never the password
                delay = _backoff_s(cfg, self.failures)
                _log.warning(
                    "amqp_connect_failed",
                    connection=self.name,
                    attempt=self.failures,
                    error=self.last_error,
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            if self.conn is not None:
                self.reconnects += 1
            self.conn = conn
            _log.info(
                "amqp_connected",
                connection=self.name,
                attempt=self.failures + 1,
                heartbeat_s=conn.heartbeat_s,
                frame_max=conn.frame_max,
            )
            self._set_up(True)
            opened = loop.time()
            await conn.wait_closed()
            self._set_up(False)
            self.last_error = conn.closed_reason
            lived_s = loop.time() - opened
            _log.warning(
                "amqp_connection_lost",
                connection=self.name,
                reason=conn.closed_reason,
                lived_s=round(lived_s, 1),
            )
            # A connection refused right after opening (vhost limit, forced
            # close loop) keeps growing the backoff instead of hammering.
            self.failures = self.failures + 1 if lived_s < cfg.reconnect_max_s else 1
            await asyncio.sleep(_backoff_s(cfg, self.failures))

    async def aclose(self) -> None:
        """Stop supervising and close the connection."""
        self.closing = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait([self.task])
        if self.conn is not None:
            await self.conn.close()
        self._set_up(True)  # wake waiters; they see ``closing`` and raise


@final
class AmqpSubscription:
    """A consumer on one queue, on its own channel of the consume connection.

    Once the channel dies, `batch` raises `TransportUnavailable`, and `ack` /
    `reject` do nothing (logged at debug): the broker redelivers.
    """

    def __init__(
        self,
        transport: AmqpTransport,
        queue: str,
        channel: WireChannel,
        consumer_tag: str,
    ) -> None:
        self._transport = transport
        self._queue = queue
        self._ch = channel
        self.consumer_tag = consumer_tag
        self.delivered = 0
        self.acked = 0
        self.rejected = 0
        self._acked_upto = 0
        self._lost = False
        channel.on_close(self._closed)

    def __repr__(self) -> str:
        state = "dead" if self._ch.is_closed else "live"
        return (
            f"<AmqpSubscription {self._queue} {state} delivered={self.delivered} "
            f"acked={self.acked}>"
        )

    @property
    def queue(self) -> str:
        """The queue consumed."""
        return self._queue

    @property
    def alive(self) -> bool:
        """Whether the channel behind the subscription is still open."""
        return not self._ch.is_closed

    async def batch(self, max_n: int) -> list[Delivery]:
        """Wait for at least one delivery; return up to *max_n* received ones.

        Raises:
            TransportUnavailable: the channel or connection closed, or the
                broker cancelled the consumer (queue deleted).
        """
        try:
            deliveries = await self._ch.get_batch(max_n)
        except TransportUnavailable as exc:
            if not self._lost:
                self._lost = True
                _log.info(
                    "amqp_subscription_lost",
                    queue=self._queue,
                    consumer_tag=self.consumer_tag,
                    reason=str(exc),
                )
            raise
        self.delivered += len(deliveries)
        return deliveries

    def _closed(self, ch: WireChannel) -> None:
        # Said when it happens, not when the consumer next asks for a batch:
        # a shard busy with a long commit may not ask for a minute or more.
        if ch.close_code is None or ch.close_code == 200 or self._lost:
            return  # the connection's loss is logged by its link; ours is no news
        self._lost = True
        _log.warning(
            "amqp_subscription_lost",
            queue=self._queue,
            consumer_tag=self.consumer_tag,
            reason=ch.closed_reason,
        )

    def ack(self, tag: int, *, multiple: bool = False) -> None:
        """Acknowledge *tag* (and, with *multiple*, every earlier delivery)."""
        try:
            self._ch.ack(tag, multiple)
        except TransportUnavailable as exc:
            _log.debug("amqp_ack_dropped", queue=self._queue, tag=tag, reason=str(exc))
            return
        if multiple:  # tags are consecutive per channel: a rough count is cheap
            self.acked += max(1, tag - self._acked_upto)
            self._acked_upto = max(self._acked_upto, tag)
        else:
            self.acked += 1

    def reject(self, tag: int, *, requeue: bool) -> None:
        """Refuse one delivery; with *requeue* it comes back, else it is dropped."""
        try:
            self._ch.nack(tag, False, requeue)
        except TransportUnavailable as exc:
            _log.debug(
                "amqp_reject_dropped", queue=self._queue, tag=tag, reason=str(exc)
            )
            return
        self.rejected += 1

    async def close(self) -> None:
        """Stop consuming; unacknowledged deliveries return to the queue."""
        self._transport._subscriptions.discard(self)
        await self._ch.close()

    def status(self) -> dict[str, Any]:
        """Counters for ``brokerctl status``."""
        return {
            "queue": self._queue,
            "consumer_tag": self.consumer_tag,
            "alive": self.alive,
            "delivered": self.delivered,
            "acked": self.acked,
            "rejected": self.rejected,
            "buffered": self._ch.buffered,
        }


@final
class AmqpTransport:
    """`Transport` on RabbitMQ: confirms, manual acks, reconnects on its own.

    Args:
        cfg: the ``[amqp]`` section.
        name: the daemon's name; the connections are ``"<name> publish"`` and
            ``"<name> consume"``.
        tls: the context for an ``amqps://`` URL (`broker.transport.tls`);
            ``None`` uses the system's defaults.
        max_body_bytes: ``[core] max-message-bytes``: a delivery whose body
            is declared larger is cut, not buffered whole, and flagged
            (`Delivery.oversize`; see `WireChannel.consume`). None buffers
            every body whole.

    Raises:
        ConfigError: ``cfg.url`` is not an AMQP URL.
    """

    def __init__(
        self,
        cfg: AmqpConfig,
        *,
        name: str = "q2c-broker",
        tls: ssl.SSLContext | None = None,
        max_body_bytes: int | None = None,
    ) -> None:
        try:
            parse_url(cfg.url)
        except ValueError as exc:
            raise ConfigError(f"amqp.url: {exc}") from exc
        self._cfg = cfg
        self._max_body_bytes = max_body_bytes
        self._ready = asyncio.Event()
        self._pub = _Link(f"{name} publish", cfg, self._update_ready, tls)
        self._con = _Link(f"{name} consume", cfg, self._update_ready, tls)
        self._pub_ch: WireChannel | None = None
        self._pub_lock = asyncio.Lock()
        self._subscriptions: set[AmqpSubscription] = set()
        self._closed = False
        self._refusal: str | None = None
        self._noted: WireChannel | None = None
        #: Queues the broker will not let us consume, with its words.
        self._consume_refused: dict[str, str] = {}
        self.refusals = 0
        self._channel_closes = 0
        self._close_reason: str | None = None
        self.published = 0
        self.confirmed = 0
        self.nacked = 0
        self.returned = 0
        self.indeterminate = 0

    def __repr__(self) -> str:
        return (
            f"<AmqpTransport publish={self._pub.state} consume={self._con.state} "
            f"subscriptions={len(self._subscriptions)}>"
        )

    def _update_ready(self) -> None:
        if self._pub.up.is_set() and self._con.up.is_set() and not self._closed:
            self._ready.set()
        else:
            self._ready.clear()

    def ready(self) -> asyncio.Event:
        """The event set while both connections are up."""
        return self._ready

    @property
    def refusal(self) -> str | None:
        """The broker's 403 on our publishing channel, or ``None``.

        Kept until a publish is confirmed again.
        """
        return self._refusal

    @property
    def channel_closes(self) -> tuple[int, str | None]:
        """Publishing channels the broker closed, and its last reason."""
        return self._channel_closes, self._close_reason

    async def start(self) -> None:
        """Start both connection supervisors; return once both are connected.

        Connection failures are retried forever (logged as
        ``amqp_connect_failed``); bound the wait with a deadline if needed.
        """
        for link in (self._pub, self._con):
            if link.task is None:
                link.task = asyncio.create_task(link.run(), name=f"amqp {link.name}")
                link.task.add_done_callback(self._on_link_done)
        await self._ready.wait()

    @staticmethod
    def _on_link_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a broker problem: status() then shows no progress.
            _log.error(
                "amqp_supervisor_crashed",
                task=task.get_name(),
                exc_info=task.exception(),
            )

    async def subscribe(self, queue: str, *, prefetch: int) -> AmqpSubscription:
        """Consume *queue* on a new channel, waiting for the connection if down.

        While the broker refuses the user read permission on *queue* (403),
        waits too: an operator's fix, not ours, so it is logged as an error
        and asked again with back-off (1 s doubling to 30 s), rather than
        raised into a consumer that would be restarted at once, and again.

        Raises:
            TransportUnavailable: the broker refused otherwise (e.g.
                `ClosedByBroker` 404 for a missing queue), or the transport
                is closed.
        """
        refused = Backoff(1.0, _REFUSED_MAX_S)
        while True:
            conn = await self._con.connection()
            try:
                ch = await conn.channel()
            except TransportUnavailable:
                if conn.is_closed:
                    continue  # died under us: wait for the next connection
                raise
            try:
                await ch.qos(prefetch)
                tag = await ch.consume(queue, max_body_bytes=self._max_body_bytes)
            except ClosedByBroker as exc:
                if exc.code != _ACCESS_REFUSED or conn.is_closed:
                    raise
                delay = refused.next_delay()
                self._consume_refused[queue] = exc.text
                _log.error(
                    "amqp_access_refused",
                    connection=conn.name,
                    queue=queue,
                    reason=f"{exc.code} {exc.text}",
                    retry_in_s=round(delay, 2),
                    fix="grant the daemon's RabbitMQ user read permission on "
                    "the queue (rabbitmqctl set_permissions -p <vhost> <user> ...)",
                )
                await asyncio.sleep(delay)
                continue
            except TransportUnavailable:
                if conn.is_closed:
                    continue
                raise
            except BaseException:
                ch.close_nowait()  # cancelled: don't leave a consumer behind
                raise
            if self._consume_refused.pop(queue, None) is not None:
                _log.info("amqp_access_granted", connection=conn.name, queue=queue)
            sub = AmqpSubscription(self, queue, ch, tag)
            self._subscriptions.add(sub)
            _log.info(
                "amqp_subscribed", queue=queue, consumer_tag=tag, prefetch=prefetch
            )
            return sub

    async def _publish_channel(self) -> WireChannel:
        while True:
            conn = await self._pub.connection()
            ch = self._pub_ch
            if ch is not None and not ch.is_closed and ch.connection is conn:
                return ch
            async with self._pub_lock:
                ch = self._pub_ch
                if ch is not None and not ch.is_closed and ch.connection is conn:
                    return ch
                if ch is not None and ch.connection is conn:
                    self._note_closed(ch)
                try:
                    ch = await conn.channel()
                    await ch.confirm_select(window=self._cfg.confirm_window)
                except TransportUnavailable:
                    if conn.is_closed:
                        continue
                    raise
                self._pub_ch = ch
                return ch

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout_s: float
    ) -> list[PublishOutcome]:
        """Publish *messages* pipelined with confirms; one outcome each, in order.

        Waits up to *timeout_s* in all (connection, blocked broker, confirms);
        whatever is unconfirmed then is INDETERMINATE. Never raises for a
        message's fate.
        """
        n = len(messages)
        if not n:
            return []
        self.published += n
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                ch = await self._publish_channel()
        except TimeoutError:
            return self._count([_INDETERMINATE] * n)
        except TransportUnavailable as exc:
            _log.warning("amqp_publish_unavailable", count=n, reason=str(exc))
            return self._count([_INDETERMINATE] * n)
        remaining_s = max(0.0, deadline - loop.time())
        outcomes = await ch.publish_batch(messages, remaining_s)
        if ch.is_closed and ch.close_code is not None:
            self._note_closed(ch)
        elif self._refusal is not None and _ACK in outcomes:
            _log.info("amqp_access_granted", connection=ch.connection.name)
            self._refusal = None
        return self._count(outcomes)

    def _note_closed(self, ch: WireChannel) -> None:
        """Say, once, why the broker closed our publishing channel *ch*."""
        if ch is self._noted:
            return
        self._noted = ch
        self._channel_closes += 1
        self._close_reason = ch.closed_reason
        if ch.close_code != _ACCESS_REFUSED:
            _log.warning(
                "amqp_channel_closed",
                connection=ch.connection.name,
                channel=ch.id,
                reason=ch.closed_reason,
            )
            return
        self._refusal = ch.closed_reason
        self.refusals += 1
        # An operator's mistake, not a fault that heals by itself: an error,
        # with what to change. Publishing is retried, slowly, until it does.
        _log.error(
            "amqp_access_refused",
            connection=ch.connection.name,
            channel=ch.id,
            reason=ch.closed_reason,
            fix="grant the daemon's RabbitMQ user write permission on the "
            "exchange (rabbitmqctl set_permissions -p <vhost> <user> ...)",
        )

    def _count(self, outcomes: list[PublishOutcome]) -> list[PublishOutcome]:
        for outcome in outcomes:
            if outcome is PublishOutcome.ACK:
                self.confirmed += 1
            elif outcome is PublishOutcome.NACK:
                self.nacked += 1
            elif outcome is PublishOutcome.RETURNED:
                self.returned += 1
            else:
                self.indeterminate += 1
        return outcomes

    def status(self) -> dict[str, Any]:
        """Connection state and counters for ``brokerctl status``."""
        connections: dict[str, Any] = {}
        for role, link in (("publish", self._pub), ("consume", self._con)):
            conn = link.conn
            connections[role] = {
                "name": link.name,
                "state": link.state,
                "reconnects": link.reconnects,
                "last_error": link.last_error,
                "blocked_reason": conn.blocked_reason if conn is not None else None,
            }
        return {
            "connections": connections,
            "reconnects": self._pub.reconnects + self._con.reconnects,
            "subscriptions": [sub.status() for sub in self._subscriptions],
            "published": self.published,
            "confirmed": self.confirmed,
            "nacked": self.nacked,
            "returned": self.returned,
            "indeterminate": self.indeterminate,
            "refused": self._refusal,
            "consume_refused": dict(self._consume_refused),
            "refusals": self.refusals,
        }

    async def aclose(self) -> None:
        """Close both connections; pending publishes become INDETERMINATE."""
        self._closed = True
        self._update_ready()
        for link in (self._pub, self._con):
            await link.aclose()
        self._subscriptions.clear()
