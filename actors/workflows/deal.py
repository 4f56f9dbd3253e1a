"""The deal: one quote-to-cash process, from CRM opportunity to invoice.

One instance per deal (correlation id ``deal-<crm opportunity id>``). The
workflow is written as *record, then decide*: every event first becomes a
fact in the state (whatever order the facts arrive in: a quote approval may
overtake the opportunity, an invoice may overtake the booking), then
`_decide` looks at the facts and issues what has become possible and was not
issued before. Each command is issued once (a flag in the state) and carries
an idempotency key derived from the event that caused it, so a redelivered
event changes nothing.

Stages and what moves them on:

- opened: ``crm.opportunity.created`` recorded.
- quoted: ``cpq.quote.approved`` (the primary quote) recorded; once the
  opportunity is known too, the quote is validated in memory.
- ordering: a valid quote is routed and enriched into an order;
  ``erp.order.booking_requested`` goes to the routed ERP and the booking SLA
  timer is set.
- booked: ``erp.order.booked``; the CRM and CPQ are told the order number
  and recurring lines get a ``billing.subscription.requested``.
- fulfilling: waiting for ``erp.invoice.issued``, ``erp.shipment.dispatched``
  (physical lines), ``billing.subscription.created`` (recurring lines) and the
  CRM/CPQ updates.
- completed: all of the above, the invoice agreeing with the order:
  ``q2c.deal.completed``.
- exception: a business rule stopped the deal (quote rejected by validation,
  quote denied, order fallout before a booking, booked total ≠ order,
  invoice ≠ order): ``q2c.exception.raised`` and the CRM opportunity marked
  for attention (once the opportunity is known: a denial that overtook it is
  written when it arrives). Each exception stays open until the fact that
  lifts it: a later invoice of the order's amount (the wrong one cancelled,
  a right one issued) lifts an invoice mismatch; a revised primary quote
  approved afterwards (not the same quote read back again) lifts a quote
  refusal; an ``erp.order.booked`` of the deal's order after its fallout (a
  clerk keyed it in the ERP: an ORDRSP from the legacy ERP, a
  ``SalesOrder.Created`` from the cloud ERP), or at the order's total after
  a booking mismatch, lifts those. The deal goes on once none is open;
  what was raised stays in its history (``exceptions``), what is open is
  ``open_exceptions``.

The order is checked against the ERP's booking before anyone is told: a
booked total other than the order's is a ``booking_mismatch``, and the CRM,
the CPQ and billing wait. A second booking of the order under another ERP
number (a re-sent order file booked twice) is a ``duplicate_booking``
reported to the operator; the first number stays the order's (state and
xref), and the deal goes on from it. The same number again is a repeat (a
redelivery, or the cloud ERP's ``SalesOrder.Created`` echoing our own
create): nothing is issued again and nothing recorded is lost, its warnings
join the booking's. A refusal of the order once it is booked (the ERP
refusing a re-sent order file as a duplicate) does not undo the booking:
it is kept as a booking warning, and raises no fallout.

Business exceptions name the document and the amount they hold up; they are
events for the operator, not dead letters. Integration errors (a malformed
payload, a vendor that keeps failing) never reach this module: the engine
dead-letters them, and later messages of the deal are held behind them.

The CRM opportunity shows the deal's latest word (``Closed Won`` with the
order number, or ``Needs Attention`` with the exception). Writes to it can
overtake each other (one waits in a retry tier while a later one succeeds,
and the org keeps whichever lands last), so a confirmation of any stage but
the latest one requested writes the latest one again.

A deal keeps the ERP it was routed to: the routing decision is taken once,
when the order is built, and stored in the state; a routing reload changes
only deals that have not ordered yet. It is taken, and the booking SLA is
dated, as of the quote's approval (the order became possible then), not of
whichever fact happened to complete the pair.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, final

import msgspec

from actors.workflows.enrich import enrich_order
from actors.workflows.routing import RoutingRegistry
from actors.workflows.rules import ReferenceData, validate_for_order
from broker import Applied, Emit, XrefEntry
from canonical import Envelope, Money
from canonical.commerce import (
    Account,
    Invoice,
    Opportunity,
    Order,
    Quote,
    Shipment,
    Subscription,
    SubscriptionItem,
)
from canonical.ids import deal_of_opportunity, order_id, subscription_id
from canonical.q2c import (
    DEAL_EVENTS,
    BusinessException,
    DealCompleted,
    ExceptionKind,
    InvoiceIssued,
    InvoicePaid,
    OpportunityCreated,
    OpportunityUpdated,
    OpportunityUpdateRequested,
    OrderBooked,
    OrderBookingRequested,
    OrderRejected,
    OrderSubmitted,
    QuoteApproved,
    QuoteDenied,
    QuoteUpdated,
    QuoteUpdateRequested,
    ShipmentDispatched,
    SlaBreached,
    SubscriptionCreated,
    SubscriptionRequested,
    TimerElapsed,
)

__all__ = [
    "DealState",
    "DealWorkflow",
    "Stage",
    "account_of",
    "open_exceptions_of",
    "system_queue",
]

Stage = Literal[
    "opened", "quoted", "ordering", "booked", "fulfilling", "completed", "exception"
]

#: The timer that bounds booking: set when the order is requested.
BOOKING_SLA = "booking_sla"


def system_queue(system: str) -> str:
    """The queue a system actor consumes: ``q2c.sys.<system>``."""
    return f"q2c.sys.{system}"


class DealState(msgspec.Struct, kw_only=True):
    """Everything known about one deal. Mutable while one event is applied.

    ``stages`` records when each stage was first reached (the fact's time),
    for the report's time per stage and for ``GET /api/v1/deals/{id}``.
    """

    deal_id: str = ""
    stage: Stage = "opened"
    opportunity: Opportunity | None = None
    quote: Quote | None = None
    order: Order | None = None
    erp: Literal["cloud", "legacy"] | None = None
    route_rule: str = ""
    wave: str | None = None
    erp_order_id: str | None = None
    erp_status: str | None = None
    booked_total: Money | None = None
    booking_warnings: tuple[str, ...] = ()
    submitted_document: str | None = None
    crm_native_id: str | None = None
    #: The latest progress written to the CRM opportunity: what it must show.
    crm_wanted: OpportunityUpdateRequested | None = None
    #: Times `crm_wanted` was written again after an older write landed last.
    crm_rewrites: int = 0
    cpq_native_id: str | None = None
    subscription_native_id: str | None = None
    subscription_amount: Money | None = None
    invoice: Invoice | None = None
    #: The billing platform collected one of the subscription's invoices
    #: (not the ERP's invoice of the order: nothing reports that one paid).
    invoice_paid: bool = False
    shipment: Shipment | None = None
    #: Commands and announcements already issued (each once).
    issued: tuple[str, ...] = ()
    #: Business exceptions raised, by kind: the history (lifted ones stay).
    exceptions: tuple[ExceptionKind, ...] = ()
    violations: tuple[str, ...] = ()
    #: Business exceptions raised and not lifted: the deal is in ``exception``
    #: exactly while one is open. (A state stored before this field has none
    #: here; `open_exceptions_of` derives them from the history.)
    open_exceptions: tuple[ExceptionKind, ...] = ()
    #: When the quote the order is built from was approved: the time the
    #: order became possible, whichever of quote and opportunity came last.
    approved_at: datetime | None = None
    #: Other ERP numbers the order was booked under: duplicates to cancel in
    #: the ERP (``erp_order_id``, the first, stays the order's).
    duplicate_orders: tuple[str, ...] = ()
    sla_breached: bool = False
    #: Facts that arrived before the fact they follow (and waited for it).
    out_of_order: int = 0
    stages: dict[str, datetime] = {}

    # -- derived ---------------------------------------------------------------

    @property
    def needs_subscription(self) -> bool:
        """The order has recurring lines."""
        return self.order is not None and any(ln.recurring for ln in self.order.lines)

    @property
    def needs_shipment(self) -> bool:
        """The order has physical lines."""
        return self.order is not None and any(ln.physical for ln in self.order.lines)


@final
class DealWorkflow:
    """The deal process manager (pure: `apply` does no I/O).

    Args:
        routing: the coexistence routing table (reloadable; read at order time).
        reference: the ERP reference data quotes are validated against; a
            callable so a catalogue refresh is seen by the next quote.
        booking_sla_s: how long an order may take to be booked.
    """

    name = "deal"
    state_type = DealState
    #: A deal's facts wait behind one that failed (retry or dead letter).
    ordered = True
    #: Its timers do not: a deal stuck behind a parked message is the deal
    #: whose booking SLA must still fall due.
    unheld = frozenset({"q2c.timer.elapsed"})

    def __init__(
        self,
        *,
        routing: RoutingRegistry,
        reference: Callable[[], ReferenceData],
        booking_sla_s: float = 900.0,
    ) -> None:
        self._routing = routing
        self._reference = reference
        self._booking_sla_s = booking_sla_s
        # The rules' names are checked against what quotes are validated
        # against: a typo in the routing file is logged at load and reload.
        routing.check_names(reference)

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """Every event that moves a deal."""
        return DEAL_EVENTS

    def initial(self, correlation_id: str) -> DealState:
        """A deal nothing is known about yet."""
        return DealState(deal_id=correlation_id)

    def finished(self, state: DealState) -> bool:
        """Whether the deal is over: completed (an open exception is not).

        An instance that never started (a late fact of a deal the retention
        deleted already) is over too. A finished deal nothing changed for
        ``[core] finished-retention-days`` is deleted (`broker.retention`).
        """
        return state.stage == "completed" or _unstarted(state)

    def apply(
        self, state: DealState, event: Any, envelope: Envelope
    ) -> Applied[DealState]:
        """Record the fact, then issue what it made possible.

        A fact that can only follow an order, for a deal that has not started
        (none of opportunity, quote, order is known), records nothing: it is
        a late one of a deal the retention deleted (an annual subscription's
        payment, a duplicate booking), not the start of a new deal.
        """
        if _unstarted(state) and not isinstance(event, _STARTERS):
            return Applied(state, [], xref=[])
        s = msgspec.structs.replace(state, stages=dict(state.stages))
        s.open_exceptions = open_exceptions_of(s)
        emits: list[Emit] = []
        if s.stage == "exception" and not s.open_exceptions:
            _resume_stored(s, emits)
        self._record(s, event, envelope, emits)
        self._decide(s, envelope, emits)
        return Applied(s, emits, xref=_xref(event, s))

    # -- record ----------------------------------------------------------------

    def _record(
        self, s: DealState, event: Any, env: Envelope, emits: list[Emit]
    ) -> None:
        at = env.time
        match event:
            case OpportunityCreated(opportunity=opp):
                if deal_of_opportunity(opp.id) != s.deal_id:
                    raise ValueError(f"{opp.id} does not belong to deal {s.deal_id}")
                s.opportunity = opp
                _reached(s, "opened", at)
                if (
                    s.stage == "exception"
                    and s.crm_wanted is None
                    and s.quote is not None
                    and s.open_exceptions
                ):
                    # Raised before the opportunity was known (only the quote
                    # can be: a denial that overtook it), so the CRM could
                    # not be told then. It is now.
                    kind = s.open_exceptions[-1]
                    note = _note(kind, "quote", s.quote.id, s.quote.net_total)
                    _tell_crm(s, emits, "Needs Attention", note, key_suffix=kind)
            case QuoteApproved(quote=quote):
                if quote.primary and s.order is None:
                    s.out_of_order += s.opportunity is None
                    revised = quote != s.quote
                    s.quote = quote
                    if revised:
                        # A re-read of the same quote is the same approval.
                        s.approved_at = at
                    if (
                        revised
                        and s.stage == "exception"
                        and set(s.open_exceptions) <= _QUOTE_KINDS
                    ):
                        # The rep revised the denied or refused quote and it
                        # was approved: the deal goes on from it (a new
                        # refusal of it is raised afresh). The same quote
                        # read back again (a change-feed re-read, a resent
                        # approval) is no revision: its refusal stands, and
                        # is not raised twice.
                        s.exceptions, s.violations = (), ()
                        s.open_exceptions = ()
                        s.stage = "quoted"
                    _reached(s, "quoted", at)
            case QuoteDenied(quote=quote, reason=reason):
                if quote.primary and s.order is None:
                    s.quote = quote
                    self._exception(
                        s,
                        emits,
                        "quote_denied",
                        "quote",
                        quote.id,
                        quote.net_total,
                        (reason,) if reason else (),
                        at,
                    )
            case OrderSubmitted(document=document):
                s.submitted_document = document
            case OrderBooked() as booked:
                if s.erp_order_id in (None, booked.erp_order_id):
                    self._booked(s, emits, booked, at)
                elif _rebooked(s, booked):
                    # The clerk keyed a right order for the mismatched one:
                    # the new number is the order's, the old one a duplicate.
                    _replaced_booking(s, emits, booked)
                    self._booked(s, emits, booked, at)
                else:
                    _duplicate_booking(s, emits, booked)
            case OrderRejected() as rejected:
                if s.erp_order_id is not None:
                    # Booked already: the ERP refused a copy of the order
                    # (a re-sent order file, as a duplicate PO). The booking
                    # stands; the refusal is kept with its warnings.
                    _refused_after_booking(s, rejected)
                else:
                    s.erp_status = "rejected"
                    self._exception(
                        s,
                        emits,
                        "order_fallout",
                        "order",
                        rejected.order_id,
                        rejected.net_total,
                        (f"{rejected.code}: {rejected.message}",),
                        at,
                    )
            case OpportunityUpdated(native_id=native_id, stage=stage):
                s.crm_native_id = native_id
                wanted = s.crm_wanted
                if wanted is not None and stage != wanted.stage:
                    # An older write landed, perhaps after the latest one.
                    s.crm_rewrites += 1
                    _send_crm(s, emits, wanted, f"rewrite-{s.crm_rewrites}")
            case QuoteUpdated(native_id=native_id):
                s.cpq_native_id = native_id
            case SubscriptionCreated() as sub:
                s.subscription_native_id = sub.native_id
                s.subscription_amount = sub.amount_per_period
                _reached(s, "subscribed", at)
            case InvoiceIssued(invoice=invoice):
                # The order's invoice is its first invoice; other billing
                # documents of it (a cancellation, a credit memo: status
                # other than "issued") are not this deal's to compare, and
                # must not reopen a completed deal.
                if invoice.status != "issued":
                    pass
                elif s.invoice is None or s.invoice.id == invoice.id:
                    s.out_of_order += s.erp_order_id is None
                    s.invoice = invoice
                    _reached(s, "invoiced", at)
                elif _mismatch_corrected(s, invoice):
                    # The wrong invoice was cancelled and a right one issued:
                    # it is the order's invoice now, and the deal goes on
                    # (unless another exception is still open); the CRM
                    # shows it won again.
                    s.invoice = invoice
                    if _lift(s, "invoice_mismatch", "fulfilling"):
                        _won_again(
                            s,
                            emits,
                            f"invoice {invoice.number} corrected",
                            f"corrected-{invoice.id}",
                        )
            case InvoicePaid():
                s.invoice_paid = True
            case ShipmentDispatched(shipment=shipment):
                s.out_of_order += s.erp_order_id is None
                s.shipment = shipment
                _reached(s, "shipped", at)
            case TimerElapsed(timer=timer, due_at=due_at):
                if timer == BOOKING_SLA and self._booking_late(s):
                    assert s.order is not None
                    s.sla_breached = True
                    emits.append(
                        Emit(
                            event=SlaBreached(
                                deal_id=s.deal_id,
                                stage="booking",
                                document="order",
                                document_id=s.order.id,
                                amount=s.order.net_total,
                                due_at=due_at,
                            ),
                            subject=s.order.id,
                        )
                    )
            case _:
                raise TypeError(f"deal cannot apply {type(event).__name__}")

    def _booked(
        self, s: DealState, emits: list[Emit], booked: OrderBooked, at: datetime
    ) -> None:
        """Record the ERP's booking of the order (or its repeat); check its total.

        A repeat (the same number at the total recorded: a redelivery, the
        cloud ERP's echo of our own create) only adds the warnings not
        recorded yet (the echo carries none, and may overtake the booking
        that does): status, total and everything issued stay. The same
        number at another total is the ERP's new word on the order: recorded
        and checked.
        """
        s.booking_warnings = _merged(s.booking_warnings, booked.warnings)
        repeat = (
            s.erp_order_id == booked.erp_order_id and s.booked_total == booked.net_total
        )
        if not repeat:
            s.erp_order_id = booked.erp_order_id
            s.erp_status = booked.status
            s.booked_total = booked.net_total
        order = s.order
        if order is not None and booked.order_id == order.id:
            # A clerk fixed the refused order in the ERP and it was booked
            # after all: the deal goes on from the booking. The exception
            # raised stays raised (in `exceptions`).
            resumed = _lift(s, "order_fallout", "ordering")
            if booked.net_total == order.net_total:
                # The ERP confirmed it at the order's total (a clerk
                # corrected the booked order, or keyed a right one).
                resumed = _lift(s, "booking_mismatch", "ordering") or resumed
                if resumed:
                    _won_again(
                        s,
                        emits,
                        f"order {booked.erp_order_id} booked in the"
                        f" {booked.erp} ERP at {booked.net_total}",
                        f"rebooked-{booked.erp_order_id}",
                    )
            else:
                # Checked before the CRM, the CPQ or billing hear of it: a
                # deal booked at another total would be won, provisioned and
                # then invoiced at an amount nobody can match.
                self._exception(
                    s,
                    emits,
                    "booking_mismatch",
                    "order",
                    order.id,
                    order.net_total,
                    (
                        f"order {order.id} is {order.net_total}, the {booked.erp}"
                        f" ERP booked it as order {booked.erp_order_id}"
                        f" at {booked.net_total}",
                    ),
                    at,
                )
        if s.stage not in ("completed", "exception"):
            _reached(s, "booked", at)

    @staticmethod
    def _booking_late(s: DealState) -> bool:
        return (
            s.order is not None
            and s.erp_order_id is None
            and s.erp_status != "rejected"
            and not s.sla_breached
        )

    # -- decide ----------------------------------------------------------------

    def _decide(self, s: DealState, env: Envelope, emits: list[Emit]) -> None:
        if s.stage == "exception":
            return
        if s.order is None:
            if s.opportunity is not None and s.quote is not None:
                self._order(s, env, emits)
            return
        order = s.order
        if s.erp_order_id is None:
            return
        stage_note = f"order {s.erp_order_id} booked in the {s.erp} ERP"
        if _once(s, "crm_update"):
            _tell_crm(s, emits, "Closed Won", stage_note, order_number=s.erp_order_id)
        if _once(s, "cpq_update"):
            emits.append(
                Emit(
                    event=QuoteUpdateRequested(
                        quote_id=order.quote_id,
                        status="ordered",
                        order_number=s.erp_order_id,
                    ),
                    exchange="",
                    routing_key=system_queue("cpq"),
                    subject=order.quote_id,
                )
            )
        if s.needs_subscription and _once(s, "subscription"):
            emits.append(
                Emit(
                    event=SubscriptionRequested(
                        subscription=_subscription(order), deal_id=s.deal_id
                    ),
                    exchange="",
                    routing_key=system_queue("billing"),
                    subject=order.id,
                )
            )
        if s.stage == "booked":
            _reached(s, "fulfilling", env.time)
        if s.invoice is not None and s.invoice.amount != order.net_total:
            self._exception(
                s,
                emits,
                "invoice_mismatch",
                "invoice",
                s.invoice.id,
                s.invoice.amount,
                (
                    f"invoice {s.invoice.number} is {s.invoice.amount}, "
                    f"order {s.erp_order_id} is {order.net_total}",
                ),
                env.time,
            )
            return
        if self._complete(s) and _once(s, "completed"):
            _reached(s, "completed", env.time)
            emits.append(
                Emit(
                    event=DealCompleted(
                        deal_id=s.deal_id,
                        quote_id=order.quote_id,
                        order_id=order.id,
                        erp=order.erp,
                        erp_order_id=s.erp_order_id,
                        net_total=order.net_total,
                        invoice_number=s.invoice.number if s.invoice else None,
                        subscription_id=s.subscription_native_id,
                        completed_at=env.time,
                    ),
                    subject=s.deal_id,
                )
            )

    @staticmethod
    def _complete(s: DealState) -> bool:
        return (
            s.erp_order_id is not None
            and s.crm_native_id is not None
            and s.cpq_native_id is not None
            and s.invoice is not None
            and (not s.needs_subscription or s.subscription_native_id is not None)
            and (not s.needs_shipment or s.shipment is not None)
        )

    def _order(self, s: DealState, env: Envelope, emits: list[Emit]) -> None:
        """Validate the approved quote; route, enrich and request booking."""
        assert s.opportunity is not None
        assert s.quote is not None
        quote, account = s.quote, s.opportunity.account
        ref = self._reference()
        result = validate_for_order(quote, account, ref)
        if not result.ok:
            self._exception(
                s,
                emits,
                "quote_rejected",
                "quote",
                quote.id,
                quote.net_total,
                tuple(v.message for v in result.violations),
                env.time,
            )
            return
        # The order became possible when the quote was approved (on an
        # opportunity that existed already), whichever fact arrived last:
        # that time decides the wave and dates the SLA, so neither depends
        # on arrival order, and a replay decides alike.
        at = s.approved_at or s.stages.get("quoted") or env.time
        decision = self._routing.route_order(quote, account, ref, at=at)
        order = enrich_order(
            quote,
            account,
            decision,
            ref,
            deal_id=s.deal_id,
            order_id=order_id(s.deal_id),
        )
        s.order, s.erp, s.route_rule, s.wave = (
            order,
            decision.erp,
            decision.rule,
            decision.wave,
        )
        _reached(s, "ordering", env.time)
        s.issued = (*s.issued, "booking")
        emits.append(
            Emit(
                event=OrderBookingRequested(order=order),
                exchange="",
                routing_key=system_queue(f"erp_{order.erp}"),
                subject=order.id,
            )
        )
        # The SLA runs from the approval: the timer falls due then, not a
        # full SLA after whichever fact came last (at once if that was late
        # already; never later than the SLA, should the fact that completed
        # the pair carry an earlier time than the approval).
        due_at = at + timedelta(seconds=self._booking_sla_s)
        left_s = (due_at - env.time).total_seconds()
        emits.append(
            Emit(
                event=TimerElapsed(deal_id=s.deal_id, timer=BOOKING_SLA, due_at=due_at),
                subject=order.id,
                key_suffix=BOOKING_SLA,
                delay_s=max(0.0, min(self._booking_sla_s, left_s)),
            )
        )

    @staticmethod
    def _exception(
        s: DealState,
        emits: list[Emit],
        kind: ExceptionKind,
        document: str,
        document_id: str,
        amount: Money,
        violations: tuple[str, ...],
        at: datetime,
    ) -> None:
        """Raise a business exception once per kind, stopping the deal; tell the CRM.

        The deal stays stopped until the exception is lifted (`_lift`); once
        lifted, the same kind raised again (a later booking at a wrong total)
        stops it again. A completed deal is done: a late fact about it raises
        nothing.
        """
        if kind in s.open_exceptions or s.stage == "completed":
            return
        _report(s, emits, kind, document, document_id, amount, violations)
        s.open_exceptions = (*s.open_exceptions, kind)
        s.stage = "exception"
        _reached(s, "exception", at)
        _tell_crm(
            s,
            emits,
            "Needs Attention",
            _note(kind, document, document_id, amount),
            key_suffix=kind,
        )


def _report(
    s: DealState,
    emits: list[Emit],
    kind: ExceptionKind,
    document: str,
    document_id: str,
    amount: Money,
    violations: tuple[str, ...],
) -> None:
    """Announce a business exception and keep it in the deal's history."""
    if kind not in s.exceptions:
        s.exceptions = (*s.exceptions, kind)
    s.violations = (*s.violations, *violations)
    emits.append(
        Emit(
            event=BusinessException(
                deal_id=s.deal_id,
                kind=kind,
                document=document,
                document_id=document_id,
                amount=amount,
                violations=violations,
            ),
            subject=document_id,
            key_suffix=kind,
        )
    )


def _note(kind: str, document: str, document_id: str, amount: Money) -> str:
    """What the CRM opportunity shows of a business exception."""
    return f"{kind.replace('_', ' ')}: {document} {document_id} ({amount})"


def _duplicate_booking(s: DealState, emits: list[Emit], booked: OrderBooked) -> None:
    """The order booked again under another ERP number: report it, keep the first.

    The first booking stays the order's (its number, total and xref), and
    the deal goes on from it: the duplicate is the operator's to cancel in
    the ERP, reported once per number, on a completed deal too (it is a live
    ERP order all the same).
    """
    number = booked.erp_order_id
    if number in s.duplicate_orders:
        return
    s.duplicate_orders = (*s.duplicate_orders, number)
    _report(
        s,
        emits,
        "duplicate_booking",
        "order",
        booked.order_id,
        booked.net_total,
        (
            f"order {booked.order_id} booked twice: {s.erp} ERP order"
            f" {s.erp_order_id} (kept) and {booked.erp} ERP order {number}"
            f" ({booked.net_total}), a duplicate to cancel",
        ),
    )


def _rebooked(s: DealState, booked: OrderBooked) -> bool:
    """*booked*, under another number, replaces a booking at a wrong total.

    The booking mismatch is open and the new booking is of the order at its
    total: a clerk keyed a right order (the wrong one is to be cancelled).
    """
    return (
        "booking_mismatch" in s.open_exceptions
        and s.order is not None
        and booked.order_id == s.order.id
        and booked.net_total == s.order.net_total
    )


def _replaced_booking(s: DealState, emits: list[Emit], booked: OrderBooked) -> None:
    """Report the mismatched booking as the duplicate to cancel; forget it.

    Its number joins ``duplicate_orders`` (reported once) and the order is
    unbooked, so `DealWorkflow._booked` takes *booked* as the order's.
    """
    old = s.erp_order_id
    assert old is not None
    if old not in s.duplicate_orders:
        s.duplicate_orders = (*s.duplicate_orders, old)
        _report(
            s,
            emits,
            "duplicate_booking",
            "order",
            booked.order_id,
            s.booked_total or booked.net_total,
            (
                f"order {booked.order_id} booked twice: {s.erp} ERP order {old}"
                f" ({s.booked_total}), a duplicate to cancel, and {booked.erp}"
                f" ERP order {booked.erp_order_id} ({booked.net_total}) (kept)",
            ),
        )
    s.erp_order_id, s.erp_status, s.booked_total = None, None, None


def _refused_after_booking(s: DealState, rejected: OrderRejected) -> None:
    """Keep the ERP's refusal of an order it booked already, as a booking warning.

    The refusal is of a copy (a re-sent order file refused as a duplicate
    PO): the booking, its status and the deal's stage stand, and no fallout
    is raised. The same refusal again is recorded once.
    """
    note = (
        f"{rejected.code}: {rejected.message} (refused after the order was"
        f" booked as {s.erp_order_id}; the booking stands)"
    )
    s.booking_warnings = _merged(s.booking_warnings, (note,))


def _merged(kept: tuple[str, ...], new: tuple[str, ...]) -> tuple[str, ...]:
    """*kept*, then those of *new* not in it, in order."""
    return (*kept, *(w for w in dict.fromkeys(new) if w not in kept))


def _xref(event: Any, s: DealState) -> list[XrefEntry]:
    """The native ids a result announces for the deal's documents.

    Systems are named by their role (``crm``, ``cpq``, ``erp_cloud``,
    ``erp_legacy``, ``billing``), so a report can join any deal's documents
    across the systems through the registry alone. The order keeps the
    number it was first booked under (*s* is the state after *event*): a
    duplicate booking binds nothing.
    """
    match event:
        case OrderBooked(order_id=oid, erp=erp, erp_order_id=native):
            if native != s.erp_order_id:
                return []
            return [_entry("order", oid, f"erp_{erp}", native)]
        case OpportunityUpdated(opportunity_id=oid, native_id=native):
            return [_entry("opportunity", oid, "crm", native)]
        case QuoteUpdated(quote_id=qid, native_id=native):
            return [_entry("quote", qid, "cpq", native)]
        case SubscriptionCreated(subscription_id=sid, native_id=native):
            return [_entry("subscription", sid, "billing", native)]
        case InvoiceIssued(invoice=invoice, erp=erp):
            return [_entry("invoice", invoice.id, f"erp_{erp}", invoice.number)]
        case ShipmentDispatched(shipment=shipment, erp=erp):
            return [_entry("shipment", shipment.id, f"erp_{erp}", shipment.number)]
        case _:
            return []


def _entry(kind: str, canonical_id: str, system: str, native_id: str) -> XrefEntry:
    return XrefEntry(
        kind=kind, canonical_id=canonical_id, system=system, native_id=native_id
    )


#: Facts that start a deal; any other needs a deal started (`_unstarted`).
_STARTERS = (OpportunityCreated, QuoteApproved, QuoteDenied)


def _unstarted(s: DealState) -> bool:
    """Nothing that starts a deal is known: no opportunity, quote or order."""
    return s.opportunity is None and s.quote is None and s.order is None


def _resume_stored(s: DealState, emits: list[Emit]) -> None:
    """Go on with a stored deal in ``exception`` of which none is open.

    The stage is the latest one its facts reached; `DealWorkflow._decide`
    then issues what they made possible. A status the previous release
    overwrote with ``rejected`` after the booking is the booking's again.
    """
    if s.erp_order_id is not None and s.erp_status == "rejected":
        s.erp_status = "open"
    reached = [st for st in _ORDERED_STAGES[:-1] if st in s.stages]
    s.stage = reached[-1] if reached else "opened"  # type: ignore[assignment]
    _won_again(s, emits, f"order {s.erp_order_id} booked", "resumed")


def _won_again(s: DealState, emits: list[Emit], note: str, key_suffix: str) -> None:
    """The deal left its exceptions: the CRM, told it was won before, shows it again.

    Before it was told (``crm_update`` not issued) `DealWorkflow._decide`
    tells it, once; a deal the CRM shows won already is left alone.
    """
    wanted = s.crm_wanted
    if (
        "crm_update" in s.issued
        and s.erp_order_id is not None
        and (wanted is None or wanted.stage != "Closed Won")
    ):
        _tell_crm(
            s,
            emits,
            "Closed Won",
            note,
            order_number=s.erp_order_id,
            key_suffix=key_suffix,
        )


#: Exceptions a revised, approved quote lifts (no order was made yet).
_QUOTE_KINDS: frozenset[str] = frozenset({"quote_denied", "quote_rejected"})


def _mismatch_corrected(s: DealState, invoice: Invoice) -> bool:
    """*invoice*, a later one, matches the order its first invoice did not."""
    return (
        "invoice_mismatch" in s.open_exceptions
        and s.order is not None
        and invoice.amount == s.order.net_total
    )


def _lift(s: DealState, kind: ExceptionKind, resume: Stage) -> bool:
    """Close the open exception *kind*; once none is open, go on at *resume*.

    Returns whether the deal left its exception.
    """
    if kind not in s.open_exceptions:
        return False
    s.open_exceptions = tuple(k for k in s.open_exceptions if k != kind)
    if s.open_exceptions:
        return False
    s.stage = resume
    return True


def open_exceptions_of(state: DealState) -> tuple[ExceptionKind, ...]:
    """The business exceptions holding the deal: raised and not lifted.

    Also for a state stored before they were kept (`_open_in_stored`).
    """
    if state.stage == "exception" and not state.open_exceptions:
        return _open_in_stored(state)
    return state.open_exceptions


def _open_in_stored(s: DealState) -> tuple[ExceptionKind, ...]:
    """The open exceptions of a deal in ``exception`` stored before they were kept.

    Such a state has the history alone. A kind raised is open unless the
    fact that lifts it is already recorded: the order booked (before or
    after its fallout), an invoice of the order's amount after a mismatch. A
    quote's refusal is cleared from the history when lifted. None open: the
    deal goes on from its facts (`_resume_stored`).
    """
    return tuple(k for k in s.exceptions if not _lifted_in_stored(s, k))


def _lifted_in_stored(s: DealState, kind: ExceptionKind) -> bool:
    if kind == "order_fallout":
        # Booked: the previous release raised fallout for a refusal that
        # came after the booking too (and set the status to ``rejected``).
        return s.erp_order_id is not None
    if kind == "duplicate_booking":
        return True  # reported, never holds the deal
    if kind == "invoice_mismatch":
        return (
            s.order is not None
            and s.invoice is not None
            and s.invoice.amount == s.order.net_total
        )
    return False


def _reached(s: DealState, stage: str, at: datetime) -> None:
    """Record when *stage* was first reached; move the stage forward.

    Facts carry their systems' clocks (an IDoc's time has whole seconds), so
    a stage is never dated before one reached earlier: stage times only grow.
    """
    if stage not in s.stages:
        s.stages[stage] = max(at, *s.stages.values()) if s.stages else at
    if (
        stage in _ORDERED_STAGES
        and s.stage != "exception"
        and _ORDERED_STAGES.index(stage) > _ORDERED_STAGES.index(s.stage)
    ):
        s.stage = stage  # type: ignore[assignment]


_ORDERED_STAGES = ("opened", "quoted", "ordering", "booked", "fulfilling", "completed")


def _tell_crm(
    s: DealState,
    emits: list[Emit],
    stage: str,
    note: str,
    *,
    order_number: str | None = None,
    key_suffix: str = "",
) -> None:
    """Write *stage* and *note* to the deal's CRM opportunity, if it is known."""
    if s.opportunity is None:
        return
    update = OpportunityUpdateRequested(
        opportunity_id=s.opportunity.id,
        stage=stage,
        order_number=order_number,
        status_note=note,
    )
    _send_crm(s, emits, update, key_suffix)


def _send_crm(
    s: DealState,
    emits: list[Emit],
    update: OpportunityUpdateRequested,
    key_suffix: str = "",
) -> None:
    """Write *update* to the CRM opportunity; it is now what the CRM must show."""
    s.crm_wanted = update
    emits.append(
        Emit(
            event=update,
            exchange="",
            routing_key=system_queue("crm"),
            subject=update.opportunity_id,
            key_suffix=key_suffix,
        )
    )


def _once(s: DealState, what: str) -> bool:
    """True the first time *what* is asked for; marks it issued."""
    if what in s.issued:
        return False
    s.issued = (*s.issued, what)
    return True


def _subscription(order: Order) -> Subscription:
    """The billing subscription for the order's recurring lines."""
    items = tuple(
        SubscriptionItem(
            sku=ln.sku,
            quantity=ln.quantity,
            unit_amount=ln.unit_price,
            interval_months=ln.term_months or 1,
        )
        for ln in order.lines
        if ln.recurring
    )
    per_period = sum(
        (ln.net_amount for ln in order.lines if ln.recurring), start=Decimal(0)
    )
    return Subscription(
        id=subscription_id(order.deal_id),
        account=order.account,
        order_id=order.id,
        currency=order.currency,
        items=items,
        amount_per_period=Money(amount=per_period, currency=order.currency).quantized(),
    )


def account_of(state: DealState) -> Account | None:
    """The deal's account, once the opportunity is known."""
    return state.opportunity.account if state.opportunity else None
