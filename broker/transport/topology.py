"""What the daemon declares on the broker, derived from config and the app.

Every name starts with ``q2c.`` and says what it is, so the management UI
explains itself:

* ``q2c.events`` (topic): every canonical event, routing key = event type.
* ``q2c.wf.<workflow>`` (consistent-hash on the AMQP ``correlation_id``),
  bound to ``q2c.events`` for each event type the workflow handles, feeding
  ``q2c.wf.<workflow>.<n>``: quorum queues with single-active-consumer, so
  one deal's messages are handled in order by one daemon, with fail-over.
* ``q2c.sys.<system>``: one quorum queue per external system.
* ``q2c.retry.<delay>`` (fanout exchange + quorum queue with a fixed TTL):
  a message waits there, then dead-letters through the default exchange back
  to the queue named by its routing key, i.e. the queue it came from.
* ``q2c.dead`` (fanout exchange + quorum queue): dead letters, for humans.
* ``q2c.unrouted`` (fanout exchange + quorum queue, the newest 10,000 kept):
  ``q2c.events``'s alternate exchange, for events no binding takes (nobody
  subscribed to them): not returned to the publisher, not a routing bug.
* Policies (not queue arguments, so operators can change them live):
  ``q2c.work`` (delivery-limit backstop, at-least-once dead-lettering,
  max-length with reject-publish), ``q2c.retry``, ``q2c.dead``,
  ``q2c.events`` (the alternate exchange) and ``q2c.unrouted``.

`build_topology` is pure; `broker.transport.amqp` declares the result and
`broker.transport.memory` routes by it.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Literal

import msgspec

from broker.config import TopologyConfig

__all__ = [
    "EVENTS_EXCHANGE",
    "DEAD_EXCHANGE",
    "DEAD_QUEUE",
    "ExchangeSpec",
    "QueueSpec",
    "BindingSpec",
    "PolicySpec",
    "RETRY_PREFIX",
    "UNROUTED",
    "UNROUTED_MAX_LENGTH",
    "Topology",
    "WorkflowRoute",
    "build_topology",
    "retry_label",
    "retry_exchange",
    "shard_queue",
    "topic_matches",
]

EVENTS_EXCHANGE = "q2c.events"
DEAD_EXCHANGE = "q2c.dead"
#: Where ``q2c.events`` sends an event no binding takes (its alternate
#: exchange): a fanout exchange and a bounded queue of the same name.
UNROUTED = "q2c.unrouted"
#: The newest events nobody subscribed to that ``q2c.unrouted`` keeps.
UNROUTED_MAX_LENGTH = 10_000
DEAD_QUEUE = "q2c.dead"

ExchangeType = Literal["topic", "direct", "fanout", "x-consistent-hash"]


class ExchangeSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A durable exchange."""

    name: str
    type: ExchangeType
    arguments: dict[str, Any] = {}


class QueueSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A durable queue (quorum unless ``arguments`` say otherwise)."""

    name: str
    arguments: dict[str, Any] = {}

    @property
    def single_active_consumer(self) -> bool:
        """Whether only one consumer at a time receives messages."""
        return bool(self.arguments.get("x-single-active-consumer"))

    @property
    def message_ttl_ms(self) -> int | None:
        """The fixed per-queue TTL, for retry tiers."""
        ttl = self.arguments.get("x-message-ttl")
        return int(ttl) if ttl is not None else None


class BindingSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Route from *source* exchange to a queue or exchange."""

    source: str
    destination: str
    destination_type: Literal["queue", "exchange"] = "queue"
    routing_key: str = ""


class PolicySpec(msgspec.Struct, frozen=True, kw_only=True):
    """A RabbitMQ policy; at most one applies to a queue, so patterns are disjoint."""

    name: str
    pattern: str
    definition: dict[str, Any]
    apply_to: str = "queues"
    priority: int = 0


class WorkflowRoute(msgspec.Struct, frozen=True, kw_only=True):
    """What the broker needs to know about one workflow to route to it."""

    name: str
    event_types: tuple[str, ...]


class Topology(msgspec.Struct, frozen=True, kw_only=True):
    """Everything to declare, in declaration order."""

    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]
    bindings: tuple[BindingSpec, ...]
    policies: tuple[PolicySpec, ...]
    retry_tiers_s: tuple[float, ...]

    def takes(self, event_type: str) -> bool:
        """Whether a binding of ``q2c.events`` takes events of *event_type*.

        One that none takes goes to ``q2c.unrouted``: a reader nobody
        configured. The ingress asks first, and refuses a vendor's event
        that nothing here would read, so that the vendor keeps it.
        """
        return any(
            b.source == EVENTS_EXCHANGE and topic_matches(b.routing_key, event_type)
            for b in self.bindings
        )

    def queue(self, name: str) -> QueueSpec:
        """Return the queue called *name*.

        Raises:
            KeyError: no such queue in this topology.
        """
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)


@lru_cache(maxsize=4096)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """Whether topic binding key *pattern* matches *routing_key*.

    Words are separated by dots; ``*`` matches exactly one word and ``#``
    zero or more, as in AMQP 0-9-1.
    """
    words = routing_key.split(".") if routing_key else []
    # The positions in `words` the pattern consumed so far can end at.
    ends = {0}
    for part in pattern.split(".") if pattern else []:
        if part == "#":
            ends = set(range(min(ends), len(words) + 1))
        else:
            ends = {
                i + 1
                for i in ends
                if i < len(words) and (part == "*" or words[i] == part)
            }
            if not ends:
                return False
    return len(words) in ends


def retry_label(delay_s: float) -> str:
    """``5.0`` → ``"5s"``, ``0.5`` → ``"500ms"``: the tier's name suffix."""
    if float(delay_s).is_integer():
        return f"{int(delay_s)}s"
    return f"{round(delay_s * 1000)}ms"


#: What every retry tier's exchange and queue name starts with.
RETRY_PREFIX = "q2c.retry."


def retry_exchange(delay_s: float) -> str:
    """The exchange a message is published to in order to wait *delay_s*."""
    return f"{RETRY_PREFIX}{retry_label(delay_s)}"


def shard_queue(workflow: str, shard: int) -> str:
    """The name of one shard queue of *workflow*."""
    return f"q2c.wf.{workflow}.{shard}"


def build_topology(cfg: TopologyConfig, workflows: Sequence[WorkflowRoute]) -> Topology:
    """Derive the whole broker topology from config and the app's workflows."""
    quorum = {"x-queue-type": "quorum"}
    exchanges = [
        ExchangeSpec(name=EVENTS_EXCHANGE, type="topic"),
        ExchangeSpec(name=DEAD_EXCHANGE, type="fanout"),
    ]
    exchanges.append(ExchangeSpec(name=UNROUTED, type="fanout"))
    queues = [
        QueueSpec(name=DEAD_QUEUE, arguments=quorum),
        QueueSpec(name=UNROUTED, arguments=quorum),
    ]
    bindings = [
        BindingSpec(source=DEAD_EXCHANGE, destination=DEAD_QUEUE),
        BindingSpec(source=UNROUTED, destination=UNROUTED),
    ]

    for delay_s in cfg.retry_tiers_s:
        name = retry_exchange(delay_s)
        exchanges.append(ExchangeSpec(name=name, type="fanout"))
        queues.append(
            QueueSpec(
                name=name,
                arguments={
                    **quorum,
                    "x-message-ttl": round(delay_s * 1000),
                    # The default exchange routes by the message's own routing
                    # key, which the retry publish set to the origin queue.
                    "x-dead-letter-exchange": "",
                },
            )
        )
        bindings.append(BindingSpec(source=name, destination=name))

    for wf in workflows:
        hub = f"q2c.wf.{wf.name}"
        exchanges.append(
            ExchangeSpec(
                name=hub,
                type="x-consistent-hash",
                arguments={"hash-property": "correlation_id"},
            )
        )
        bindings.extend(
            BindingSpec(
                source=EVENTS_EXCHANGE,
                destination=hub,
                destination_type="exchange",
                routing_key=event_type,
            )
            for event_type in wf.event_types
        )
        for shard in range(cfg.shards):
            queue = shard_queue(wf.name, shard)
            queues.append(
                QueueSpec(
                    name=queue,
                    arguments={**quorum, "x-single-active-consumer": True},
                )
            )
            # Binding keys of a consistent-hash exchange are weights.
            bindings.append(BindingSpec(source=hub, destination=queue, routing_key="1"))

    queues.extend(
        QueueSpec(name=f"q2c.sys.{system}", arguments=quorum) for system in cfg.systems
    )

    for queue, event_types in sorted(cfg.event_queues.items()):
        if all(q.name != queue for q in queues):  # a system's queue is declared
            queues.append(QueueSpec(name=queue, arguments=quorum))
        bindings.extend(
            BindingSpec(source=EVENTS_EXCHANGE, destination=queue, routing_key=t)
            for t in event_types
        )

    policies = (
        PolicySpec(
            name="q2c.work",
            pattern=r"^q2c\.(wf|sys|events)\.",
            definition={
                "delivery-limit": cfg.delivery_limit,
                "dead-letter-exchange": DEAD_EXCHANGE,
                "dead-letter-strategy": "at-least-once",
                "overflow": "reject-publish",
                "max-length": cfg.queue_max_length,
            },
        ),
        PolicySpec(
            name="q2c.retry",
            pattern=r"^q2c\.retry\.",
            definition={
                "dead-letter-strategy": "at-least-once",
                "overflow": "reject-publish",
                "max-length": cfg.queue_max_length,
            },
        ),
        PolicySpec(
            name="q2c.dead",
            pattern=r"^q2c\.dead$",
            definition={
                "overflow": "reject-publish",
                "max-length": cfg.queue_max_length,
            },
        ),
        # An event nobody subscribed to is not a routing bug: it goes to
        # q2c.unrouted (the newest kept, for a look in the management UI)
        # instead of back to the publisher, whose outbox would park it.
        PolicySpec(
            name="q2c.events",
            pattern=r"^q2c\.events$",
            definition={"alternate-exchange": UNROUTED},
            apply_to="exchanges",
        ),
        PolicySpec(
            name="q2c.unrouted",
            pattern=r"^q2c\.unrouted$",
            definition={"overflow": "drop-head", "max-length": UNROUTED_MAX_LENGTH},
        ),
    )
    return Topology(
        exchanges=tuple(exchanges),
        queues=tuple(queues),
        bindings=tuple(bindings),
        policies=policies,
        retry_tiers_s=tuple(cfg.retry_tiers_s),
    )
