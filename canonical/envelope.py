"""The envelope every message travels in.

It is a CloudEvents 1.0 event in structured JSON mode: the required context
attributes (``specversion``, ``id``, ``source``, ``type``), the optional ones
we use (``time``, ``subject``, ``datacontenttype``), and extension attributes
for the integration (CloudEvents extension names are lower-case letters and
digits only, hence ``correlationid`` on the wire for ``correlation_id``).
``data`` stays raw bytes until the type is known, so the envelope can be read,
routed and dead-lettered without knowing the schema of what it carries.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from canonical.base import UtcDatetime

__all__ = ["Envelope", "CONTENT_TYPE"]

#: AMQP content type of a structured-mode CloudEvent.
CONTENT_TYPE = "application/cloudevents+json"

# CloudEvents requires id, source and type to be non-empty; an empty
# idempotency key would make every such message a duplicate of the first.
_Required = Annotated[str, Meta(min_length=1)]


class Envelope(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    rename={
        "correlation_id": "correlationid",
        "causation_id": "causationid",
        "idempotency_key": "idempotencykey",
        "schema_version": "schemaversion",
    },
):
    """Canonical message metadata plus the raw event data.

    Attributes:
        id: unique per message; the AMQP ``message_id``.
        source: URI-reference of the producer (``/q2c/ledger``, ``/crm/acme``).
        type: the event tag, also the AMQP routing key.
        time: when the fact happened; `broker.codec.decode_envelope` turns
            any offset into UTC, so ``time.date()`` is the UTC day.
        subject: the business document this is about, if any.
        correlation_id: the thread of one deal (or one account, for the ledger).
        causation_id: the id of the message that caused this one.
        idempotency_key: deterministic from the business fact; duplicates share it.
        traceparent: W3C trace context of the producer, passed through;
            `broker.codec.decode_envelope` drops an invalid one.
        schema_version: version of ``type``'s data schema, for upcasting.
        data: the event, still encoded.
    """

    # Every envelope written so far spells it out as "1.0"; absent reads as 1.0.
    specversion: Literal["1.0"] = "1.0"
    id: _Required
    source: _Required
    type: _Required
    time: UtcDatetime
    subject: str | None = None
    datacontenttype: str = "application/json"
    correlation_id: _Required
    causation_id: str | None = None
    idempotency_key: _Required
    traceparent: str | None = None
    schema_version: int = 1
    data: msgspec.Raw = msgspec.Raw(b"null")
