"""The rows a consumer writes about the messages it handles. Internal.

Both consumers of the engine, the workflow group commit (`broker.commit`) and
the system actor (`broker.gateway`), record outcomes the same way:

* a message that follows from another (`follow_up`) carries an id derived
  from its idempotency key, the cause's id as causation and the cause's trace;
* a dead letter (`dead_letter`) keeps the original bytes and headers, with a
  copy on ``q2c.dead`` and a journal row, in the same transaction;
* a retry (`retry`) is a copy of the delivery that waits in a TTL tier and
  dead-letters back to its origin queue, its attempt counted in a header.
"""

from __future__ import annotations

import hashlib
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from broker.codec import encode_envelope, encode_event
from broker.errors import TransientError
from broker.store import (
    UNAVAILABLE_SINCE_HEADER,
    WAITS_HEADER,
    DeadLetterRecord,
    JournalRecord,
    OutboxRecord,
)
from broker.transport import Delivery
from broker.transport.topology import DEAD_EXCHANGE, retry_exchange
from canonical.envelope import Envelope
from canonical.upcast import current_version

if TYPE_CHECKING:
    from broker.retry import RetryPolicy

__all__ = [
    "ATTEMPT_HEADER",
    "UNAVAILABLE_SINCE_HEADER",
    "WAITS_HEADER",
    "unavailable_since",
    "waits_of",
    "next_tier",
    "dead_letter",
    "follow_up",
    "journal",
    "letter_id",
    "message_id_for",
    "plain_headers",
    "retry",
]


#: Delivery attempts so far, counted durably in the message itself.
ATTEMPT_HEADER = "x-q2c-attempt"


def message_id_for(idempotency_key: str) -> str:
    """The message id of an emitted message: the same fact, the same id.

    A 128-bit BLAKE2b of the key, in hex: as unique as a UUID, ten times
    cheaper than ``uuid5`` on the hot path.
    """
    return hashlib.blake2b(idempotency_key.encode(), digest_size=16).hexdigest()


def letter_id(d: Delivery) -> str:
    """The message id a delivery's dead letter is kept under."""
    return d.message_id or "sha256:" + hashlib.sha256(d.body).hexdigest()


def plain_headers(headers: dict[str, Any] | None) -> dict[str, str | int]:
    """Headers reduced to the str/int values the outbox can carry."""
    if not headers:
        return {}
    return {
        k: v
        for k, v in headers.items()
        if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))
    }


def journal(env: Envelope, stage: str, detail: str = "") -> JournalRecord:
    """A journal row about *env*."""
    return JournalRecord(
        message_id=env.id,
        correlation_id=env.correlation_id,
        stage=stage,
        type=env.type,
        detail=detail,
    )


def follow_up(
    cause: Envelope,
    event: Any,
    *,
    tag: str,
    key: str,
    source: str,
    now: datetime,
    exchange: str,
    routing_key: str,
    correlation_id: str,
    subject: str | None,
    delay_s: float = 0.0,
) -> OutboxRecord:
    """The outbox row of *event*, caused by *cause*, under idempotency key *key*."""
    msg_id = message_id_for(key)
    body = encode_envelope(
        Envelope(
            id=msg_id,
            source=source,
            type=tag,
            time=now,
            subject=subject,
            correlation_id=correlation_id,
            causation_id=cause.id,
            idempotency_key=key,
            traceparent=cause.traceparent,
            schema_version=current_version(tag),
            data=encode_event(event),
        )
    )
    return OutboxRecord(
        message_id=msg_id,
        exchange=exchange,
        routing_key=routing_key,
        body=body,
        correlation_id=correlation_id,
        type=tag,
        delay_s=delay_s,
    )


def dead_letter(
    queue: str,
    d: Delivery,
    *,
    reason: str,
    detail: str,
    attempts: int,
    correlation_id: str | None,
    type_: str | None,
) -> tuple[DeadLetterRecord, OutboxRecord, JournalRecord]:
    """The dead-letter record of *d*, its copy for ``q2c.dead`` and its journal row."""
    message_id = letter_id(d)
    detail = detail[:2000]
    headers = plain_headers(d.headers)
    record = DeadLetterRecord(
        message_id=message_id,
        queue=queue,
        routing_key=d.routing_key,
        reason=reason,
        detail=detail,
        body=d.body,
        headers=headers,
        attempts=attempts,
        correlation_id=correlation_id,
        type=type_,
    )
    copy = OutboxRecord(
        message_id=message_id,
        exchange=DEAD_EXCHANGE,
        routing_key=queue,
        body=d.body,
        correlation_id=correlation_id,
        type=type_,
        headers={
            **headers,
            "x-q2c-reason": reason,
            "x-q2c-detail": detail[:500],
            "x-q2c-queue": queue,
            ATTEMPT_HEADER: attempts,
        },
    )
    entry = JournalRecord(
        message_id=message_id,
        correlation_id=correlation_id,
        stage="dead_lettered",
        type=type_,
        detail=f"{reason}: {detail[:200]}",
    )
    return record, copy, entry


def retry(
    queue: str,
    d: Delivery,
    *,
    message_id: str,
    attempt: int,
    tier: float,
    error: str,
    unavailable_since: int | None = None,
) -> OutboxRecord:
    """The copy of a failed delivery that waits in tier *tier*, then comes back.

    *unavailable_since* (epoch seconds) marks a wait: a failure that says
    nothing of the message (its system unavailable, something it needs not
    there yet), and since when the message has met only those
    (`UNAVAILABLE_SINCE_HEADER`). A wait does not spend an attempt: the
    copy keeps *attempt* and counts the run in `WAITS_HEADER`. None is a
    failure of the message: the next attempt, and the run of waits ends.
    """
    headers = plain_headers(d.headers)
    headers.pop(UNAVAILABLE_SINCE_HEADER, None)
    headers["x-q2c-reason"] = error[:500]
    if unavailable_since is None:
        headers.pop(WAITS_HEADER, None)
        headers[ATTEMPT_HEADER] = attempt + 1
    else:
        headers[UNAVAILABLE_SINCE_HEADER] = unavailable_since
        headers[WAITS_HEADER] = waits_of(d) + 1
        headers[ATTEMPT_HEADER] = attempt
    return OutboxRecord(
        message_id=message_id,
        exchange=retry_exchange(tier),
        routing_key=queue,  # the tier dead-letters by routing key: back to *queue*
        body=d.body,
        correlation_id=d.correlation_id,
        type=d.type,
        headers=headers,
    )


def unavailable_since(d: Delivery) -> int | None:
    """Since when (epoch seconds) *d* has failed only for want of its system."""
    raw = d.headers.get(UNAVAILABLE_SINCE_HEADER) if d.headers else None
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def waits_of(d: Delivery) -> int:
    """How many waits in a row *d* has met (0: none, or the run ended)."""
    raw = d.headers.get(WAITS_HEADER) if d.headers else None
    return raw if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0 else 0


def next_tier(
    policy: RetryPolicy, error: BaseException | None, d: Delivery, attempt: int
) -> tuple[float | None, int | None, str]:
    """Where *d*, failed with *error* on *attempt*, goes next.

    Returns the retry tier (None: dead-letter it), since when a wait's run
    has lasted (None for a failure of the message: pass it to `retry`), and
    the dead letter's reason should there be no tier. A wait (a
    `TransientError` that does not spend attempts) goes up the tiers by its
    run of waits until ``unavailable-max-s``; any other failure by its
    attempt until ``max-attempts``.
    """
    if isinstance(error, TransientError) and not error.spends_attempts:
        now = int(time.time())
        since = unavailable_since(d) or now
        tier = policy.wait_for(waits_of(d) + 1, since, now)
        return tier, since, "unavailable_too_long"
    return policy.tier_for(attempt), None, "attempts_exhausted"
