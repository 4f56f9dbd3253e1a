"""Stripe webhooks into canonical events: ``POST /webhooks/billing``.

`verify` checks ``Stripe-Signature`` over the raw body with every
configured endpoint secret (two while one is being rotated). `parse` reads
the Event envelope and maps what the deal needs:

- ``invoice.paid`` for a subscription the broker created →
  ``billing.invoice.paid`` (correlated to the deal through the
  subscription metadata Stripe copied onto the invoice);
- ``customer.subscription.created`` → nothing: the broker created that
  subscription itself and already reported ``billing.subscription.created``
  (an echo of our own write), or someone else did and no deal waits on it;
- every other type, and invoices of subscriptions that are not ours → nothing.

Stripe delivers at least once and in no order: the dedupe id is the
event's ``id`` (a resent duplicate keeps it), and the idempotency key is
the business fact itself (that invoice was paid), so two distinct events
about one payment still count once. The event's time is its ``created``
(unix seconds, UTC), which every retry keeps: Stripe retries for three
days, and the inbox that dedups is keyed by the day of that time, so a
resend after midnight must fall on the original's day, not its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import final

import msgspec

from adapters.billing.mapping import invoice_paid
from adapters.billing.signature import DEFAULT_TOLERANCE_S, HEADER, verify
from adapters.billing.views import Event, Invoice
from broker.connector import Inbound
from broker.errors import ConfigError, SchemaInvalid
from canonical.q2c import InvoicePaid

__all__ = ["StripeWebhook", "SOURCE"]

#: The CloudEvents ``source`` of everything that arrives from Stripe.
SOURCE = "/billing/stripe"

_event_decoder = msgspec.json.Decoder(Event)
_paid_decoder = msgspec.json.Decoder(InvoicePaid)


@final
class StripeWebhook:
    """`broker.connector.WebhookSource` for one Stripe webhook endpoint."""

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        system: str = "billing",
        source: str = SOURCE,
    ) -> None:
        if not secrets or not all(secrets):
            raise ConfigError(f"systems.{system}: no webhook signing secret configured")
        self._secrets = tuple(secrets)
        self._tolerance_s = tolerance_s
        self._system = system
        self._source = source

    def __repr__(self) -> str:
        return f"<StripeWebhook {self._system} {len(self._secrets)} secrets>"

    @property
    def system(self) -> str:
        """The path segment after ``/webhooks/``."""
        return self._system

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float) -> None:
        """Check ``Stripe-Signature`` against the raw *body*.

        Raises:
            SignatureInvalid: missing, malformed, no matching ``v1``, or a
                timestamp outside the tolerance.
        """
        header = next(
            (v for k, v in headers.items() if k.lower() == HEADER.lower()), None
        )
        verify(body, header, self._secrets, now=now, tolerance_s=self._tolerance_s)

    def parse(self, headers: Mapping[str, str], body: bytes) -> Sequence[Inbound]:
        """Map a verified Stripe event to canonical events (often none).

        Raises:
            SchemaInvalid: the body is not a Stripe event (or is nested deeper
                than the JSON decoder goes, or its ``created`` is no time a
                `datetime` holds), or its object is not what its type promises.
        """
        try:
            event = _event_decoder.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            raise SchemaInvalid(f"{self._system}: not a Stripe event: {exc}") from exc
        if event.object != "event":
            raise SchemaInvalid(
                f"{self._system}: object is {event.object!r}, not 'event'"
            )
        if event.type != "invoice.paid":
            return []
        try:
            invoice = msgspec.json.decode(event.data.object, type=Invoice)
        except (msgspec.ValidationError, RecursionError) as exc:
            raise SchemaInvalid(
                f"{self._system}: event {event.id} ({event.type}) does not carry an "
                f"invoice: {exc}"
            ) from exc
        if invoice.object != "invoice":
            raise SchemaInvalid(
                f"{self._system}: event {event.id} ({event.type}) carries a "
                f"{invoice.object!r}, not an invoice"
            )
        try:
            paid = invoice_paid(invoice)
            if paid is None:
                return []
            # Constructing a Struct does not check its constraints; decoding does.
            paid = _paid_decoder.decode(msgspec.json.encode(paid))
        except (ValueError, msgspec.ValidationError) as exc:
            raise SchemaInvalid(
                f"{self._system}: event {event.id} ({event.type}): {exc}"
            ) from exc
        return [
            Inbound(
                event=paid,
                id=event.id,
                source=self._source,
                correlation_id=paid.deal_id,
                idempotency_key=f"billing.invoice.paid:{invoice.id}",
                subject=paid.invoice.id,
                time=datetime.fromtimestamp(event.created, UTC),
            )
        ]
