"""Quote-to-cash events and commands, named ``<domain>.<entity>.<past-tense verb>``.

Facts from a system carry that system's domain (``crm``, ``cpq``, ``erp``,
``billing``); facts the broker itself establishes carry ``q2c``. A command to
a system is the fact that the broker decided to ask for something
(``erp.order.booking_requested``); the system actor answers it with the
system's fact (``erp.order.booked`` or ``erp.order.rejected``).

Every type starts at schema version 1; `canonical.upcast` turns older
versions into the current shape before they are decoded.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta

from canonical.base import Event, UtcDatetime
from canonical.commerce import (
    Account,
    ErpKind,
    Id,
    Invoice,
    Opportunity,
    Order,
    PriceBookEntry,
    Product,
    Quote,
    Shipment,
    Subscription,
)
from canonical.ids import deal_of_opportunity
from canonical.scalars import Money

__all__ = [
    # account and catalogue sync
    "AccountChanged",
    "CustomerSyncRequested",
    "CustomerSynced",
    "CustomerChanged",
    "ProductChanged",
    "ProductSyncRequested",
    "ProductSynced",
    "RecordReadRequired",
    # the deal
    "OpportunityCreated",
    "QuoteApproved",
    "QuoteDenied",
    "OrderBookingRequested",
    "OrderSubmitted",
    "OrderBooked",
    "OrderRejected",
    "OpportunityUpdateRequested",
    "OpportunityUpdated",
    "QuoteUpdateRequested",
    "QuoteUpdated",
    "SubscriptionRequested",
    "SubscriptionCreated",
    "InvoiceIssued",
    "InvoicePaid",
    "ShipmentDispatched",
    "TimerElapsed",
    "SlaBreached",
    "BusinessException",
    "ExceptionKind",
    "DealCompleted",
    "DEAL_EVENTS",
    "SYNC_EVENTS",
    "ALL_EVENTS",
]

Text = Annotated[str, Meta(max_length=2000)]


# --- account and catalogue sync -------------------------------------------------


class AccountChanged(Event, frozen=True, kw_only=True, tag="crm.account.changed"):
    """A CRM account was created, updated or deleted (from its change feed)."""

    account: Account
    change: Literal["created", "updated", "deleted", "undeleted"]
    native_id: str
    changed_fields: tuple[str, ...] = ()

    def correlation(self) -> str:
        """The account's sync instance."""
        return self.account.id


class CustomerSyncRequested(
    Event, frozen=True, kw_only=True, tag="erp.customer.sync_requested"
):
    """Command: make the ERP's customer (business partner) match *account*."""

    account: Account
    #: Hash of the fields written, echoed back by `CustomerSynced`.
    content_hash: str


class CustomerSynced(Event, frozen=True, kw_only=True, tag="erp.customer.synced"):
    """The ERP's customer now matches the account."""

    account_id: Id
    system: str
    native_id: str
    content_hash: str

    def correlation(self) -> str:
        """The account's sync instance."""
        return self.account_id


class CustomerChanged(Event, frozen=True, kw_only=True, tag="erp.customer.changed"):
    """The ERP reported a change to a customer (possibly our own write, echoed)."""

    account: Account
    system: str
    native_id: str
    content_hash: str

    def correlation(self) -> str:
        """The account's sync instance."""
        return self.account.id


class ProductChanged(Event, frozen=True, kw_only=True, tag="erp.product.changed"):
    """The ERP (product master) created or changed a product or its prices."""

    product: Product
    prices: tuple[PriceBookEntry, ...] = ()

    def correlation(self) -> str:
        """The product's sync instance (its SKU)."""
        return self.product.sku


class ProductSyncRequested(
    Event, frozen=True, kw_only=True, tag="cpq.product.sync_requested"
):
    """Command: upsert the product and its price book entries in the CPQ."""

    product: Product
    prices: tuple[PriceBookEntry, ...] = ()


class ProductSynced(Event, frozen=True, kw_only=True, tag="cpq.product.synced"):
    """The CPQ catalogue now has the product."""

    sku: str
    native_id: str

    def correlation(self) -> str:
        """The product's sync instance (its SKU)."""
        return self.sku


class RecordReadRequired(
    Event, frozen=True, kw_only=True, tag="crm.record.read_required"
):
    """A change feed lost detail (gap or overflow): re-read these records."""

    entity: str
    native_ids: tuple[str, ...]
    change_type: str


# --- the deal ------------------------------------------------------------------


class OpportunityCreated(
    Event, frozen=True, kw_only=True, tag="crm.opportunity.created"
):
    """A deal starts: the CRM has a new opportunity."""

    opportunity: Opportunity

    def correlation(self) -> str:
        """The deal the opportunity starts."""
        return deal_of_opportunity(self.opportunity.id)


class QuoteApproved(Event, frozen=True, kw_only=True, tag="cpq.quote.approved"):
    """The CPQ approved a quote; the primary one goes to order."""

    quote: Quote

    def correlation(self) -> str:
        """The deal of the quote's opportunity."""
        return deal_of_opportunity(self.quote.opportunity_id)


class QuoteDenied(Event, frozen=True, kw_only=True, tag="cpq.quote.denied"):
    """The CPQ's approval process denied a quote."""

    quote: Quote
    reason: Text = ""

    def correlation(self) -> str:
        """The deal of the quote's opportunity."""
        return deal_of_opportunity(self.quote.opportunity_id)


class OrderBookingRequested(
    Event, frozen=True, kw_only=True, tag="erp.order.booking_requested"
):
    """Command: book *order* in the ERP it was routed to."""

    order: Order


class OrderSubmitted(Event, frozen=True, kw_only=True, tag="erp.order.submitted"):
    """The order went to an asynchronous ERP (an IDoc written); booking follows."""

    order_id: Id
    deal_id: Id
    erp: ErpKind
    document: str


class OrderBooked(Event, frozen=True, kw_only=True, tag="erp.order.booked"):
    """The ERP booked the order and gave it a number."""

    order_id: Id
    deal_id: Id
    erp: ErpKind
    erp_order_id: str
    status: str
    net_total: Money
    customer_ref: str
    #: Warnings the ERP attached (e.g. SAP's duplicate customer reference).
    warnings: tuple[str, ...] = ()


class OrderRejected(Event, frozen=True, kw_only=True, tag="erp.order.rejected"):
    """The ERP refused the order: order fallout, a business exception."""

    order_id: Id
    deal_id: Id
    erp: ErpKind
    code: str
    message: Text
    net_total: Money


class OpportunityUpdateRequested(
    Event, frozen=True, kw_only=True, tag="crm.opportunity.update_requested"
):
    """Command: write the deal's progress back to the CRM opportunity."""

    opportunity_id: Id
    stage: str
    order_number: str | None = None
    status_note: Text = ""


class OpportunityUpdated(
    Event, frozen=True, kw_only=True, tag="crm.opportunity.updated"
):
    """The CRM opportunity shows the deal's progress."""

    opportunity_id: Id
    stage: str
    native_id: str


class QuoteUpdateRequested(
    Event, frozen=True, kw_only=True, tag="cpq.quote.update_requested"
):
    """Command: write the order's status back to the CPQ quote."""

    quote_id: Id
    status: str
    order_number: str | None = None


class QuoteUpdated(Event, frozen=True, kw_only=True, tag="cpq.quote.updated"):
    """The CPQ quote shows the order's status."""

    quote_id: Id
    status: str
    native_id: str


class SubscriptionRequested(
    Event, frozen=True, kw_only=True, tag="billing.subscription.requested"
):
    """Command: provision the billing subscription for the order's recurring lines."""

    subscription: Subscription
    deal_id: Id


class SubscriptionCreated(
    Event, frozen=True, kw_only=True, tag="billing.subscription.created"
):
    """The billing platform has the subscription."""

    subscription_id: Id
    deal_id: Id
    order_id: Id
    native_id: str
    amount_per_period: Money
    status: str


class InvoiceIssued(Event, frozen=True, kw_only=True, tag="erp.invoice.issued"):
    """The ERP invoiced the order."""

    invoice: Invoice
    deal_id: Id
    erp: ErpKind


class InvoicePaid(Event, frozen=True, kw_only=True, tag="billing.invoice.paid"):
    """The billing platform collected a subscription invoice."""

    invoice: Invoice
    deal_id: Id
    native_id: str


class ShipmentDispatched(
    Event, frozen=True, kw_only=True, tag="erp.shipment.dispatched"
):
    """The ERP shipped the order's physical lines."""

    shipment: Shipment
    deal_id: Id
    erp: ErpKind


class TimerElapsed(Event, frozen=True, kw_only=True, tag="q2c.timer.elapsed"):
    """A durable timer the deal set for itself has run out."""

    deal_id: Id
    timer: str
    due_at: UtcDatetime


class SlaBreached(Event, frozen=True, kw_only=True, tag="q2c.sla.breached"):
    """A stage did not finish within its SLA."""

    deal_id: Id
    stage: str
    document: str
    document_id: str
    amount: Money
    due_at: UtcDatetime


ExceptionKind = Literal[
    "quote_rejected",
    "quote_denied",
    "order_fallout",
    "booking_mismatch",
    "duplicate_booking",
    "invoice_mismatch",
]


class BusinessException(Event, frozen=True, kw_only=True, tag="q2c.exception.raised"):
    """A business rule stopped a deal: not an integration error, an operator's case.

    Attributes:
        kind: which rule.
        document: the document kind (``quote``, ``order``, ``invoice``).
        document_id: its canonical id.
        amount: the revenue it holds up.
        violations: each broken rule, readable (``SKU-1: price 80 below floor 90``).
    """

    deal_id: Id
    kind: ExceptionKind
    document: str
    document_id: str
    amount: Money
    violations: tuple[Text, ...] = ()


class DealCompleted(Event, frozen=True, kw_only=True, tag="q2c.deal.completed"):
    """Every stage of the deal is done and its documents agree."""

    deal_id: Id
    quote_id: Id
    order_id: Id
    erp: ErpKind
    erp_order_id: str
    net_total: Money
    invoice_number: str | None = None
    subscription_id: str | None = None
    completed_at: UtcDatetime


def _by_tag(*types: type[Event]) -> dict[str, type[Any]]:
    return {str(t.__struct_config__.tag): t for t in types}


DEAL_EVENTS = _by_tag(
    OpportunityCreated,
    QuoteApproved,
    QuoteDenied,
    OrderSubmitted,
    OrderBooked,
    OrderRejected,
    OpportunityUpdated,
    QuoteUpdated,
    SubscriptionCreated,
    InvoiceIssued,
    InvoicePaid,
    ShipmentDispatched,
    TimerElapsed,
)

SYNC_EVENTS = _by_tag(
    AccountChanged,
    CustomerSynced,
    CustomerChanged,
    ProductChanged,
    ProductSynced,
)

ALL_EVENTS = _by_tag(
    *DEAL_EVENTS.values(),
    *SYNC_EVENTS.values(),
    CustomerSyncRequested,
    ProductSyncRequested,
    RecordReadRequired,
    OrderBookingRequested,
    OpportunityUpdateRequested,
    QuoteUpdateRequested,
    SubscriptionRequested,
    SlaBreached,
    BusinessException,
    DealCompleted,
)
