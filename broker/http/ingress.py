"""Vendor events as canonical envelopes on ``q2c.events``. Internal to `broker.http`.

Each event becomes a CloudEvents envelope published to ``q2c.events`` with
routing key = its type; its id is `webhook_message_id` of the vendor's source
and event id, so a resent event gets the same message id, whether it came by
webhook or by a poller. A payload refused before it became an event is kept
by `keep_refused`, as a dead letter of the ingress.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from broker import letters
from broker.codec import encode_envelope, encode_event, utcnow
from broker.connector import Inbound
from broker.errors import PermanentError, PublishFailed
from broker.letters import message_id_for
from broker.outbox import OutboxFeed
from broker.store import BatchWrite, DeadLetterRecord, Store
from broker.transport import Delivery, OutgoingMessage, PublishOutcome, Transport
from broker.transport.topology import EVENTS_EXCHANGE
from canonical.envelope import Envelope
from canonical.upcast import current_version

__all__ = [
    "Refused",
    "inbound_message",
    "keep_refused",
    "publish_inbound",
    "webhook_message_id",
]


def webhook_message_id(source: str, vendor_id: str) -> str:
    """The message id of a webhook event: the same vendor event, the same id."""
    return message_id_for(f"{source}#{vendor_id}")


def _event_type(event: object) -> str:
    tag = getattr(type(event), "__struct_config__", None)
    if tag is None or not isinstance(tag.tag, str):
        raise TypeError(f"{type(event).__name__} is not a tagged canonical event")
    return tag.tag


async def publish_inbound(
    transport: Transport,
    events: Sequence[Inbound],
    *,
    timeout_s: float,
    takes: Callable[[str], bool] = lambda event_type: True,
) -> None:
    """Publish events taken from a vendor (a poller's, not a webhook's) with confirms.

    The ids are the same as the webhook's would be, so an event seen both
    ways, or read again after a crash, is one message to the inbox.

    *takes* says whether the topology routes an event type to a reader
    (`broker.runtime.Runtime.takes_event`); an event nothing reads is not
    published (``q2c.events``' alternate exchange would keep it, bounded).

    Raises:
        PublishFailed: not every event was confirmed, or one is of a type
            nothing reads; nothing may be acknowledged to the vendor side
            (the file stays, the replay id stays where it was).
    """
    if not events:
        return
    messages = [inbound_message(inbound) for inbound in events]
    unread = sorted({m.routing_key for m in messages if not takes(m.routing_key)})
    if unread:
        raise PublishFailed(f"no queue takes event type(s) {unread}")
    outcomes = await transport.publish(messages, timeout_s=timeout_s)
    failed = [o.name for o in outcomes if o is not PublishOutcome.ACK]
    if failed:
        raise PublishFailed(
            f"{len(failed)} of {len(messages)} events not confirmed: "
            f"{sorted(set(failed))}"
        )


def inbound_message(inbound: Inbound) -> OutgoingMessage:
    """The envelope of one webhook event, ready to publish to ``q2c.events``."""
    event_type = _event_type(inbound.event)
    message_id = webhook_message_id(inbound.source, inbound.id)
    envelope = Envelope(
        id=message_id,
        source=inbound.source,
        type=event_type,
        time=inbound.time or utcnow(),
        subject=inbound.subject,
        correlation_id=inbound.correlation_id,
        idempotency_key=inbound.idempotency_key,
        traceparent=inbound.traceparent,
        schema_version=current_version(event_type),
        data=encode_event(inbound.event),
    )
    return OutgoingMessage(
        exchange=EVENTS_EXCHANGE,
        routing_key=event_type,
        body=encode_envelope(envelope),
        message_id=message_id,
        correlation_id=inbound.correlation_id,
        type=event_type,
    )


class Refused(NamedTuple):
    """A payload an ingress refused: what its dead letter keeps.

    Its message id is *prefix* and the SHA-256 of *body*, so the same
    payload refused again is one dead letter, one more attempt.
    """

    prefix: str
    body: bytes
    error: PermanentError
    headers: Mapping[str, str] = {}
    correlation_id: str | None = None


async def keep_refused(
    store: Store, feed: OutboxFeed | None, queue: str, refused: Sequence[Refused]
) -> list[DeadLetterRecord]:
    """Keep *refused* payloads as dead letters of *queue*, in one write.

    Each is kept like a delivery's dead letter: the row with its bytes and
    reason, its copy on ``q2c.dead`` (handed to the relay through *feed*)
    and its journal entry.

    Raises:
        TransientError: the store is unavailable; nothing was kept.
    """
    made = [
        letters.dead_letter(
            queue,
            Delivery(
                tag=0,
                body=r.body,
                message_id=f"{r.prefix}:sha256:{hashlib.sha256(r.body).hexdigest()}",
                headers=dict(r.headers),
            ),
            reason=r.error.reason,
            detail=str(r.error),
            attempts=1,
            correlation_id=r.correlation_id,
            type_=None,
        )
        for r in refused
    ]
    rows = await store.commit_batch(
        BatchWrite(
            consumer="ingress",
            workflow="ingress",
            dead_letters=[record for record, _, _ in made],
            outbox=[copy for _, copy, _ in made],
            journal=[entry for _, _, entry in made],
        )
    )
    if feed is not None:
        feed.offer(rows)
    return [record for record, _, _ in made]
