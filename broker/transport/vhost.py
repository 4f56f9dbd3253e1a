"""The memory transport's broker model: exchanges, queues and bindings.

`Vhost` holds what one `Topology` declares, as RabbitMQ would hold it in a
virtual host, and routes a message through it:

* exchanges: topic (``*`` one word, ``#`` zero or more), direct, fanout,
  ``x-consistent-hash`` (a stable hash of the hash property, default the
  routing key, picks one binding; weights are treated as equal), the default
  exchange ``""`` (routes to the queue named by the routing key), and
  exchange-to-exchange bindings;
* an exchange's ``alternate-exchange`` (argument first, then policy) takes
  what none of its bindings matched;
* queues take their limits from queue arguments first, then from the one
  matching policy (highest priority): ``max-length`` with reject-publish
  or drop-head (counting ready messages, as RabbitMQ does), ``message-ttl``,
  ``dead-letter-exchange`` / ``-routing-key`` / ``-strategy`` and
  ``delivery-limit``.

What happens to a message once it is in a queue (delivery, acks, TTLs and
dead-lettering) is `MemoryTransport`'s business, in `broker.transport.memory`.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.errors import ConfigError
from broker.transport import Delivery
from broker.transport.topology import (
    BindingSpec,
    ExchangeSpec,
    QueueSpec,
    Topology,
    topic_matches,
)

if TYPE_CHECKING:
    from broker.transport.memory import MemorySubscription

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "Vhost",
    "topic_matches",
    # the model's parts, for MemoryTransport
    "Message",
    "Entry",
    "Queue",
]

#: Queue bound when neither the topology nor the constructor sets one.
DEFAULT_MAX_LENGTH = 100_000


@dataclass(frozen=True, kw_only=True, slots=True)
class Message:
    """One published message, shared by every queue it was routed to."""

    body: bytes
    exchange: str
    routing_key: str
    message_id: str | None
    correlation_id: str | None
    type: str | None
    content_type: str | None
    headers: dict[str, Any]


class Entry:
    """A message's life in one queue: redeliveries and, in TTL queues, its due time.

    *id* names it in the queue journal (`broker.transport.journal`), when
    the transport keeps one; ``delivered`` is true while a consumer holds it.
    """

    __slots__ = ("delivered", "delivery_count", "due", "id", "message", "redelivered")

    def __init__(self, message: Message, *, due: float = math.inf, id: int = 0) -> None:
        self.message = message
        self.id = id
        self.redelivered = False
        self.delivered = False
        self.delivery_count = 0
        self.due = due

    def delivery(self, tag: int) -> Delivery:
        """The `Delivery` of this entry under delivery *tag*."""
        msg = self.message
        headers = dict(msg.headers)
        if self.delivery_count:
            headers["x-delivery-count"] = self.delivery_count
        return Delivery(
            tag=tag,
            body=msg.body,
            exchange=msg.exchange,
            routing_key=msg.routing_key,
            redelivered=self.redelivered,
            message_id=msg.message_id,
            correlation_id=msg.correlation_id,
            type=msg.type,
            content_type=msg.content_type,
            headers=headers,
        )


class Queue:
    """A queue's settings, resolved once from its arguments and policy."""

    def __init__(
        self, spec: QueueSpec, settings: dict[str, Any], max_length: int | None
    ) -> None:
        self.name = spec.name
        self.single_active = spec.single_active_consumer
        ttl_ms = settings.get("message-ttl")
        self.ttl_s: float | None = None if ttl_ms is None else int(ttl_ms) / 1000
        if max_length is None:
            max_length = int(settings.get("max-length", DEFAULT_MAX_LENGTH))
        self.max_length = max_length
        #: Past max-length the oldest ready message goes (drop-head) instead
        #: of the publish being refused (reject-publish).
        self.drop_head = settings.get("overflow") == "drop-head"
        self.dead_letter_exchange: str | None = settings.get("dead-letter-exchange")
        self.dead_letter_routing_key: str | None = settings.get(
            "dead-letter-routing-key"
        )
        self.at_least_once = settings.get("dead-letter-strategy") == "at-least-once"
        limit = settings.get("delivery-limit")
        self.delivery_limit: int | None = None if limit is None else int(limit)
        self.ready: deque[Entry] = deque()
        #: Dead letters the target did not take yet (at-least-once); they
        #: count toward this queue's length, as on RabbitMQ.
        self.parked: deque[Entry] = deque()
        self.subscriptions: list[MemorySubscription] = []
        self.next_consumer = 0

    def is_full(self) -> bool:
        """Whether a publish to this queue is rejected (reject-publish)."""
        return not self.drop_head and self.at_max_length()

    def at_max_length(self) -> bool:
        """Whether the queue holds its ``max-length`` (or more)."""
        return len(self.ready) + len(self.parked) >= self.max_length

    def counts(self) -> dict[str, int]:
        """Ready (parked dead letters included), unacked and consumer counts."""
        return {
            "ready": len(self.ready) + len(self.parked),
            "unacked": sum(len(s._unacked) for s in self.subscriptions),
            "consumers": len(self.subscriptions),
        }


class Vhost:
    """The exchanges, queues and bindings of one `Topology`, and routing.

    Internal: the model behind `MemoryTransport`; not for use outside
    broker/transport/.

    Args:
        topology: exchanges, queues, bindings and policies to emulate.
        max_length: when given, the bound of every queue, overriding the
            topology; otherwise queue argument, then policy, then
            `DEFAULT_MAX_LENGTH`.

    Raises:
        ConfigError: a binding names an exchange or queue not in *topology*.
    """

    def __init__(self, topology: Topology, *, max_length: int | None) -> None:
        self.exchanges: dict[str, ExchangeSpec] = {
            e.name: e for e in topology.exchanges
        }
        #: Exchange -> its alternate exchange.
        self.alternates = {
            e.name: alternate
            for e in topology.exchanges
            if (alternate := _alternate(e, topology)) in self.exchanges
        }
        self.queues = {
            q.name: Queue(q, _settings(q, topology), max_length)
            for q in topology.queues
        }
        self.bindings: dict[str, list[BindingSpec]] = {}
        for binding in topology.bindings:
            known = (
                self.queues if binding.destination_type == "queue" else self.exchanges
            )
            if binding.source not in self.exchanges or binding.destination not in known:
                raise ConfigError(
                    f"binding {binding.source!r} -> {binding.destination!r} names "
                    "an exchange or queue the topology does not declare"
                )
            self.bindings.setdefault(binding.source, []).append(binding)

    def __repr__(self) -> str:
        return f"<Vhost {len(self.exchanges)} exchanges {len(self.queues)} queues>"

    def route(self, message: Message) -> list[Queue]:
        """The queues *message* reaches, each once, in binding order."""
        if not message.exchange:
            q = self.queues.get(message.routing_key)
            return [] if q is None else [q]
        if message.exchange not in self.exchanges:
            return []
        found: dict[str, Queue] = {}
        self._route_exchange(message.exchange, message, {message.exchange}, found)
        return list(found.values())

    def _route_exchange(
        self, name: str, message: Message, seen: set[str], found: dict[str, Queue]
    ) -> None:
        exchange = self.exchanges[name]
        bindings = self.bindings.get(name, [])
        key = message.routing_key
        match exchange.type:
            case "fanout":
                chosen = bindings
            case "direct":
                chosen = [b for b in bindings if b.routing_key == key]
            case "topic":
                chosen = [b for b in bindings if topic_matches(b.routing_key, key)]
            case "x-consistent-hash":
                hashed = _hash_key(exchange, message).encode()
                chosen = (
                    [bindings[zlib.crc32(hashed) % len(bindings)]] if bindings else []
                )
        alternate = self.alternates.get(name)
        if not chosen and alternate is not None and alternate not in seen:
            seen.add(alternate)
            self._route_exchange(alternate, message, seen, found)
        for binding in chosen:
            if binding.destination_type == "queue":
                found.setdefault(binding.destination, self.queues[binding.destination])
            elif binding.destination not in seen:
                seen.add(binding.destination)
                self._route_exchange(binding.destination, message, seen, found)


def _alternate(exchange: ExchangeSpec, topology: Topology) -> str | None:
    """The alternate exchange of *exchange*: its argument beats its policy."""
    if (name := exchange.arguments.get("alternate-exchange")) is not None:
        return str(name)
    policies = [
        p
        for p in topology.policies
        if p.apply_to in ("exchanges", "all") and re.search(p.pattern, exchange.name)
    ]
    if not policies:
        return None
    name = max(policies, key=lambda p: p.priority).definition.get("alternate-exchange")
    return None if name is None else str(name)


def _settings(queue: QueueSpec, topology: Topology) -> dict[str, Any]:
    """The effective settings of *queue*: its ``x-`` arguments beat its policy."""
    policies = [
        p
        for p in topology.policies
        if p.apply_to in ("queues", "all") and re.search(p.pattern, queue.name)
    ]
    settings: dict[str, Any] = {}
    if policies:
        settings.update(max(policies, key=lambda p: p.priority).definition)
    for name, value in queue.arguments.items():
        if name.startswith("x-"):
            settings[name.removeprefix("x-")] = value
    return settings


def _hash_key(exchange: ExchangeSpec, message: Message) -> str:
    """What a consistent-hash exchange hashes: a property, a header, or the key."""
    if (prop := exchange.arguments.get("hash-property")) is not None:
        value = {
            "correlation_id": message.correlation_id,
            "message_id": message.message_id,
        }.get(prop)
        return value or ""
    if (header := exchange.arguments.get("hash-header")) is not None:
        return str(message.headers.get(header, ""))
    return message.routing_key
