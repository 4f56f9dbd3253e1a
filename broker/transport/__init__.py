"""The transport seam: how the daemon consumes and publishes messages.

Two implementations share these semantics: `broker.transport.amqp` on
RabbitMQ (production) and `broker.transport.memory` in-process (the embedded
default and the unit tests). Everything here is transport-neutral: raw bytes
in, raw bytes out, with the few AMQP properties the core needs.

Contract, for both implementations:

* ``Subscription.batch()`` waits for at least one delivery and returns every
  delivery already received, up to ``max_n``, in delivery order.
* Deliveries stay unacknowledged until ``ack``; ``ack(tag, multiple=True)``
  settles every delivery of that subscription up to and including ``tag``.
  A subscription whose connection died raises `TransportUnavailable`; its
  unacknowledged deliveries come back (redelivered) on a new subscription.
* ``publish()`` returns one `PublishOutcome` per message, in order, and never
  raises for a single message's failure: only ``ACK`` means the broker took
  responsibility (routed and durable).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol, final

import msgspec

__all__ = [
    "SHORTSTR_MAX_BYTES",
    "Delivery",
    "OutgoingMessage",
    "PublishOutcome",
    "Subscription",
    "Transport",
    "fits_shortstr",
]

#: The longest AMQP short string (exchange, routing key, message and
#: correlation ids, type, header names), in UTF-8 bytes.
SHORTSTR_MAX_BYTES = 255


def fits_shortstr(value: str) -> bool:
    """Whether *value* fits an AMQP short string."""
    # At 4 bytes a character at most, a short value needs no encoding.
    return (
        len(value) * 4 <= SHORTSTR_MAX_BYTES
        or len(value.encode()) <= SHORTSTR_MAX_BYTES
    )


@final
class Delivery:
    """One received message. Internal: not for use outside broker/.

    A plain slotted class rather than a Struct: one is built per message on
    the hot path and nothing here is ever encoded.
    """

    __slots__ = (
        "body",
        "content_type",
        "correlation_id",
        "exchange",
        "headers",
        "message_id",
        "oversize",
        "redelivered",
        "routing_key",
        "tag",
        "type",
        "unreadable",
    )

    def __init__(
        self,
        *,
        tag: int,
        body: bytes,
        exchange: str = "",
        routing_key: str = "",
        redelivered: bool = False,
        message_id: str | None = None,
        correlation_id: str | None = None,
        type: str | None = None,
        content_type: str | None = None,
        headers: dict[str, Any] | None = None,
        unreadable: str | None = None,
        oversize: str | None = None,
    ) -> None:
        self.tag = tag
        self.body = body
        self.exchange = exchange
        self.routing_key = routing_key
        self.redelivered = redelivered
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.type = type
        self.content_type = content_type
        self.headers = headers
        #: Why the message's AMQP headers could not be read (they are then
        #: None): a delivery to dead-letter by its body, not to apply.
        self.unreadable = unreadable
        #: Why the body was cut: its declared size is over the transport's
        #: limit, so only its first limit + 1 bytes were kept (still over
        #: the limit, so no decoder takes them for a whole message). A
        #: delivery to dead-letter as oversize, never to decode.
        self.oversize = oversize

    def __repr__(self) -> str:
        return (
            f"<Delivery {self.tag} {self.routing_key!r} id={self.message_id!r} "
            f"{len(self.body)}B{' cut' if self.oversize else ''}"
            f"{' redelivered' if self.redelivered else ''}>"
        )


class OutgoingMessage(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One message to publish: persistent, mandatory, confirmed.

    ``message_id`` must be unique among the messages in flight on a channel
    (aiormq matches returns by it); the outbox row id makes it so.
    """

    exchange: str
    routing_key: str
    body: bytes
    message_id: str
    correlation_id: str | None = None
    type: str | None = None
    content_type: str = "application/cloudevents+json"
    headers: dict[str, str | int] = {}


class PublishOutcome(enum.IntEnum):
    """What the broker said about one published message."""

    ACK = 0  #: routed and durable: the broker is responsible now
    NACK = 1  #: refused (queue full with reject-publish, internal error): retry later
    RETURNED = 2  #: unroutable: a topology or routing bug; park and alert
    INDETERMINATE = 3  #: no answer (timeout, connection lost): republish later


class Subscription(Protocol):
    """A consumer on one queue, with manual acknowledgements."""

    @property
    def queue(self) -> str:
        """The queue consumed."""
        ...

    async def batch(self, max_n: int) -> list[Delivery]:
        """Wait for at least one delivery; return up to *max_n* received ones.

        Raises:
            TransportUnavailable: the connection or channel behind it closed.
        """
        ...

    def ack(self, tag: int, *, multiple: bool = False) -> None:
        """Acknowledge *tag* (and, with *multiple*, every earlier delivery)."""
        ...

    def reject(self, tag: int, *, requeue: bool) -> None:
        """Refuse one delivery; with *requeue* it comes back, else it is dropped."""
        ...

    async def close(self) -> None:
        """Stop consuming; unacknowledged deliveries return to the queue."""
        ...


class Transport(Protocol):
    """Consume and publish; reconnects on its own."""

    @property
    def refusal(self) -> str | None:
        """Why the broker last refused our publishing outright, or ``None``.

        Set by a 403 ACCESS_REFUSED (the user may not write to the exchange)
        and kept until a publish is confirmed again.
        """
        ...

    @property
    def channel_closes(self) -> tuple[int, str | None]:
        """How often the broker closed our publishing channel, and why last.

        A message the broker refuses outright (over its size limit, to an
        exchange that does not exist) closes the channel, and every publish
        in flight on it ends INDETERMINATE; the count lets a publisher tell
        that from a lost connection.
        """
        ...

    async def subscribe(self, queue: str, *, prefetch: int) -> Subscription:
        """Start consuming *queue*, waiting for the connection if it is down."""
        ...

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout_s: float
    ) -> list[PublishOutcome]:
        """Publish *messages* pipelined; one outcome each, in order."""
        ...

    def status(self) -> dict[str, Any]:
        """Connection state and counters for ``brokerctl status``."""
        ...

    async def aclose(self) -> None:
        """Close every connection; pending publishes become indeterminate."""
        ...
