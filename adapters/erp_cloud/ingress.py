"""SAP S/4HANA Cloud business events pushed to ``POST /webhooks/<system>``.

SAP Event Mesh delivers each event as one structured-mode CloudEvent, signed
with ``X-Q2C-Signature`` (`adapters.erp_cloud.signature`). What becomes of
each type:

- ``…OutboundDelivery.Created.v1`` → ``erp.shipment.dispatched``;
- ``…BillingDocument.Created.v1`` → ``erp.invoice.issued`` (the amount is
  what the deal compares with the order: a difference is an invoice
  mismatch);
- ``…SalesOrder.Created.v1`` → ``erp.order.booked`` (number, status, total),
  keyed on the sales order. An order a clerk keyed in SAP by hand after the
  deal's order fell out (with the deal's ``Q2C-…`` reference) lets the deal
  resume from that booking; for an order the connector created it is the
  echo of our own create, a second ``erp.order.booked`` with the same
  number, which the deal takes as a repeat. Without its total (the
  sandbox's addition, as the billing document's amount) it is dropped with
  a log line: it cannot stand as a booking, and for our own orders it is
  only the echo;
- any other ``sap.s4.beh.*`` type → nothing (a topic the subscription
  carries that the broker does not use).

A document whose ``PurchaseOrderByCustomer`` is not a ``Q2C-…`` reference
belongs to no deal and is dropped the same way (an order keyed in SAP for a
customer's own PO number is not ours). The event's ``source`` and
``id`` are the dedupe key; the idempotency key names the SAP document.

The event's time is the CloudEvent's ``time`` (RFC 3339), or, when SAP left
that out, the data's ``EventRaisedDateTime``, in UTC: both are set when SAP
raised the event and kept on every redelivery, so a resend after midnight
falls on the original's day in the inbox that dedups it (keyed by that day).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, final

import msgspec
import structlog

from adapters import signing as signature
from adapters.cloudevents import parse_structured
from adapters.erp_cloud import edm
from adapters.erp_cloud.mapping import (
    invoice_issued,
    sales_order_booked,
    shipment_dispatched,
)
from adapters.erp_cloud.views import (
    BILLING_DOCUMENT_CREATED,
    OUTBOUND_DELIVERY_CREATED,
    SALES_ORDER_CREATED,
    BillingDocumentEventData,
    OutboundDeliveryEventData,
    SalesOrderEventData,
)
from broker.connector import Inbound
from broker.errors import SchemaInvalid, SignatureInvalid
from canonical.ids import deal_ref

__all__ = ["SapEventWebhook"]

_log = structlog.get_logger(__name__)

D = TypeVar("D", bound=msgspec.Struct)

_SAP_EVENTS = "sap.s4.beh."


@final
class SapEventWebhook:
    """Implements `broker.connector.WebhookSource` for SAP business events.

    Args:
        secrets: the signing secrets in force (two while rotating).
        system: the path segment after ``/webhooks/``.
        tolerance_s: how far the signature's timestamp may be from now.
    """

    def __init__(
        self,
        secrets: Sequence[str],
        *,
        system: str = "erp_cloud",
        tolerance_s: float = signature.DEFAULT_TOLERANCE_S,
    ) -> None:
        if not secrets or not all(secrets):
            raise ValueError("SapEventWebhook needs at least one secret, none empty")
        self._secrets = tuple(secrets)
        self._system = system
        self._tolerance_s = tolerance_s

    def __repr__(self) -> str:
        return f"<SapEventWebhook {self._system} {len(self._secrets)} secrets>"

    @property
    def system(self) -> str:
        """The path segment after ``/webhooks/``."""
        return self._system

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float) -> None:
        """Check ``X-Q2C-Signature`` over the raw *body*.

        Raises:
            SignatureInvalid: missing, malformed, stale, or signed with no
                secret this webhook holds.
        """
        header = _header(headers, signature.HEADER)
        try:
            signature.verify(
                header,
                body,
                self._secrets,
                now=now,
                tolerance_s=self._tolerance_s,
            )
        except SignatureInvalid as exc:
            raise SignatureInvalid(f"{self._system}: {exc}") from exc

    def parse(self, headers: Mapping[str, str], body: bytes) -> Sequence[Inbound]:
        """The canonical events in one delivery (often none, see the module doc).

        Raises:
            SchemaInvalid: not a CloudEvent, not an SAP business event, a
                known type whose data is not what SAP sends, or a time that is
                no `datetime` once in UTC.
        """
        event = parse_structured(body)
        if not event.type.startswith(_SAP_EVENTS):
            raise SchemaInvalid(
                f"{self._system}: {event.type!r} is not an SAP business event"
            )
        if event.type == SALES_ORDER_CREATED:
            order = _data(event.id, event.data, SalesOrderEventData)
            ref = deal_ref(order.PurchaseOrderByCustomer)
            if ref is None:
                return []
            if order.TotalNetAmount is None or not order.TransactionCurrency:
                # Without its total it cannot stand as a booking. For an
                # order the connector created it is only the echo, already
                # reported; refusing it would dead-letter every order's echo
                # from a tenant whose events leave the total out.
                _log.info(
                    "sales_order_event_without_total",
                    system=self._system,
                    event_id=event.id,
                    sales_order=order.SalesOrder,
                    deal_id=ref.deal_id,
                )
                return []
            try:
                canonical: Any = sales_order_booked(order, ref)
            except ValueError as exc:
                raise SchemaInvalid(f"{self._system}: {exc}") from exc
            key = f"{self._system}:order.booked:{canonical.erp_order_id}"
            subject = canonical.order_id
            raised = order.EventRaisedDateTime
        elif event.type == OUTBOUND_DELIVERY_CREATED:
            delivery = _data(event.id, event.data, OutboundDeliveryEventData)
            ref = deal_ref(delivery.PurchaseOrderByCustomer)
            if ref is None:
                return []
            try:
                canonical = shipment_dispatched(delivery, ref, at=event.time)
            except ValueError as exc:
                raise SchemaInvalid(f"{self._system}: {exc}") from exc
            key = f"{self._system}:outbound-delivery:{delivery.OutboundDelivery}"
            subject = canonical.shipment.id
            raised = delivery.EventRaisedDateTime
        elif event.type == BILLING_DOCUMENT_CREATED:
            billing = _data(event.id, event.data, BillingDocumentEventData)
            ref = deal_ref(billing.PurchaseOrderByCustomer)
            if ref is None:
                return []
            try:
                canonical = invoice_issued(billing, ref, at=event.time)
            except ValueError as exc:
                raise SchemaInvalid(f"{self._system}: {exc}") from exc
            key = f"{self._system}:billing-document:{billing.BillingDocument}"
            subject = canonical.invoice.id
            raised = billing.EventRaisedDateTime
        else:
            return []
        # Checked first: a naive EventRaisedDateTime (no offset) is refused there.
        checked = _checked(self._system, event.id, canonical)
        return [
            Inbound(
                event=checked,
                id=event.id,
                source=event.source,
                correlation_id=ref.deal_id,
                idempotency_key=key,
                subject=subject,
                traceparent=event.traceparent,
                time=_utc(self._system, event.id, event.time or raised),
            )
        ]


def _utc(system: str, event_id: str, at: datetime | None) -> datetime | None:
    """*at* in UTC, or SchemaInvalid when UTC is past year 9999 or before year 1.

    ``9999-12-31T23:00:00-05:00`` parses, but its UTC instant is no `datetime`.
    A time without an offset is no instant either: refused, not read as the
    host's local time (the canonical events that carry the time refuse it
    already; an order's booking does not carry it).
    """
    if at is None:
        return None
    if at.utcoffset() is None:
        raise SchemaInvalid(
            f"{system}: event {event_id!r}: time {at.isoformat()} has no UTC offset"
        )
    try:
        return at.astimezone(UTC)
    except OverflowError as exc:
        raise SchemaInvalid(
            f"{system}: event {event_id!r}: time {at.isoformat()} is outside the "
            "years 1 to 9999 in UTC"
        ) from exc


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _data(event_id: str, data: bytes | None, view: type[D]) -> D:
    if data is None:
        raise SchemaInvalid(f"SAP event {event_id!r} carries no data")
    try:
        return edm.decode(data, view)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        raise SchemaInvalid(
            f"SAP event {event_id!r}: data is not a {view.__name__}: {exc}"
        ) from exc


def _checked(system: str, event_id: str, event: msgspec.Struct) -> Any:
    """*event* after a round trip through its own schema.

    Constructing a Struct does not apply its constraints (a SKU's pattern,
    an id's shape); decoding does, so a value SAP sent that the canonical
    model refuses is caught here, naming the field, not by a consumer.
    """
    try:
        return msgspec.convert(msgspec.to_builtins(event), type(event))
    except msgspec.ValidationError as exc:
        raise SchemaInvalid(
            f"{system}: event {event_id!r} does not fit {type(event).__name__}: {exc}"
        ) from exc
