"""The seams between the engine and the adapters of external systems.

A *connector* is what a system actor runs for each command taken from its
queue ``q2c.sys.<system>``: it maps the canonical command to the vendor's
calls (passing the vendor's own idempotency facility) and returns the
canonical events that report the outcome. The system actor around it owns
everything else: the token bucket, the concurrency cap, the circuit breaker,
retries, dead letters and publishing the results with a confirm.

A *webhook source* is what the ingress server runs for ``POST
/webhooks/<system>``: it checks the system's signature on the raw body and
turns the vendor payload into canonical events. An echo of our own write, or
a payload that needs nothing, parses to no events at all.

Both are implemented in ``adapters/``; the engine only knows these shapes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import msgspec

from broker.errors import PermanentError
from canonical import Envelope, UtcDatetime

__all__ = ["Connector", "Inbound", "PartsSource", "RefusedPart", "WebhookSource"]


class Connector(Protocol):
    """One external system, as its system actor calls it."""

    @property
    def system(self) -> str:
        """The system's configured name; its queue is ``q2c.sys.<system>``."""
        ...

    @property
    def commands(self) -> Mapping[str, type[Any]]:
        """Command type tag → canonical Struct, for every command it accepts."""
        ...

    async def handle(
        self, command: Any, envelope: Envelope, *, first_attempt: bool = False
    ) -> Sequence[Any]:
        """Carry out *command*; return the canonical events reporting the outcome.

        Must be safe to call again for the same envelope (a redelivery after a
        crash): pass ``envelope.idempotency_key`` in the vendor's own form.

        *first_attempt* is true when no earlier attempt of this command can
        have reached the system: its delivery is not a redelivery and it has
        not come back from a retry tier. A connector may then skip a read that
        only guards against its own earlier attempt (a vendor with no
        idempotency facility of its own); false is always safe.

        Raises:
            UpstreamUnavailable: the system is down, slow or rate-limiting us;
                the command is retried later and the breaker counts a failure.
            UpstreamRejected: the system refused the request for good; a
                connector that can describe the refusal as a business outcome
                (order fallout) returns an event instead of raising.
        """
        ...


class Inbound(msgspec.Struct, frozen=True, kw_only=True):
    """One canonical event taken from a vendor payload, ready to publish.

    Attributes:
        event: the canonical event Struct (its tag is the envelope type).
        id: the vendor's own event id, unique per distinct event (a resent
            duplicate keeps it); with ``source`` it is the dedupe key.
        source: URI-reference of the vendor system (``/crm/salesforce``).
        correlation_id: the deal (or account, or product) this belongs to.
        idempotency_key: deterministic from the business fact.
        subject: the business document it is about.
        traceparent: the vendor's W3C trace context, when it sent one.
        time: when the fact happened, by the vendor's clock (UTC); the
            arrival time when absent. A replay keeps it, so its inbox key
            falls on the same day as the original's.
    """

    event: Any
    id: str
    source: str
    correlation_id: str
    idempotency_key: str
    subject: str | None = None
    traceparent: str | None = None
    time: UtcDatetime | None = None


class WebhookSource(Protocol):
    """A system that pushes to ``POST /webhooks/<system>``."""

    @property
    def system(self) -> str:
        """The path segment after ``/webhooks/``."""
        ...

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float) -> None:
        """Check the signature over the raw *body* (headers case-insensitive).

        Raises:
            SignatureInvalid: missing, malformed, wrong, or outside tolerance.
        """
        ...

    def parse(self, headers: Mapping[str, str], body: bytes) -> Sequence[Inbound]:
        """Map a verified payload to canonical events (empty for an echo).

        Raises:
            SchemaInvalid: the payload is not what this system sends.
        """
        ...


class RefusedPart(NamedTuple):
    """One part of a pushed batch that cannot be read: its bytes and why."""

    body: bytes
    error: PermanentError


@runtime_checkable
class PartsSource(WebhookSource, Protocol):
    """A `WebhookSource` whose payload is a batch that may be read part by part.

    The ingress takes the parts it can read and keeps each other one as a
    dead letter of its own, instead of refusing the whole batch for one.
    """

    def parse_parts(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[Sequence[Inbound], Sequence[RefusedPart]]:
        """The canonical events of the readable parts, and the refused parts.

        Raises:
            SchemaInvalid: the payload as a whole is not what this system sends.
        """
        ...
