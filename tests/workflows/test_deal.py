"""The deal workflow, applied event by event (pure: no engine, no I/O).

The engine's inbox makes a redelivered message a no-op before it gets here;
these tests pin what the workflow itself decides: which commands, once each,
in whatever order the facts arrive, and which business exceptions.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.q2c import deal_view
from actors.workflows.catalogue import demo_reference
from actors.workflows.deal import DealState, DealWorkflow
from actors.workflows.routing import RoutingRegistry
from actors.workflows.rules import validate_for_order
from broker import Emit
from broker.codec import encode_event
from broker.workflow import is_ordered, unheld_types
from canonical import Envelope, Money
from canonical.commerce import (
    Account,
    Invoice,
    Opportunity,
    Quote,
    QuoteLine,
    Shipment,
    Subscription,
)
from canonical.q2c import (
    BusinessException,
    DealCompleted,
    InvoiceIssued,
    InvoicePaid,
    OpportunityCreated,
    OpportunityUpdated,
    OpportunityUpdateRequested,
    OrderBooked,
    OrderBookingRequested,
    OrderRejected,
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

ROUTING = Path(__file__).resolve().parents[2] / "config" / "routing.toml"
REF = demo_reference()
DEAL = "deal-006Hn00000A1b2cIAB"
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
ACCOUNT = Account(
    id="acct-001Hn00000XyZ12IAF", name="Nordwind", country="DE", currency="EUR"
)
_ids = itertools.count()


def eur(amount: str) -> Money:
    return Money(amount=Decimal(amount), currency="EUR")


def line(
    n: int,
    sku: str,
    qty: int | str,
    price: str,
    *,
    recurring: bool = False,
    physical: bool = True,
    term: int | None = None,
) -> QuoteLine:
    p, q = Decimal(price), Decimal(qty)
    return QuoteLine(
        number=n,
        sku=sku,
        quantity=q,
        list_price=p,
        unit_price=p,
        net_total=p * q,
        recurring=recurring,
        physical=physical,
        term_months=term or (1 if recurring else None),
    )


def quote(*lines: QuoteLine) -> Quote:
    total = sum((ln.net_total for ln in lines), start=Decimal(0))
    return Quote(
        id="quote-a0QHn000001AbCdMAK",
        opportunity_id="opp-006Hn00000A1b2cIAB",
        account_id=ACCOUNT.id,
        currency="EUR",
        lines=lines,
        net_total=eur(str(total)),
        status="approved",
        tax_country="DE",
    )


MIXED = quote(
    line(1, "HW-SRV-1U", 2, "4200.00"),
    line(2, "SAAS-ANL", 10, "30.00", recurring=True, physical=False),
)
SAAS_ONLY = quote(line(1, "SAAS-ANL", 10, "30.00", recurring=True, physical=False))
OPPORTUNITY = OpportunityCreated(
    opportunity=Opportunity(
        id="opp-006Hn00000A1b2cIAB",
        account=ACCOUNT,
        name="Rollout",
        stage="Prospecting",
    )
)


def envelope(event: Any, at: datetime = NOW) -> Envelope:
    n = next(_ids)
    return Envelope(
        id=f"m-{n}",
        source="/test",
        type=type(event).__struct_config__.tag,
        time=at,
        correlation_id=DEAL,
        idempotency_key=f"k-{n}",
        data=encode_event(event),
    )


class Deal:
    """One deal instance driven through the workflow, keeping what was emitted."""

    def __init__(self, wf: DealWorkflow) -> None:
        self.wf = wf
        self.state: DealState = wf.initial(DEAL)
        self.emitted: list[Emit] = []

    def feed(self, *events: Any, at: datetime = NOW) -> list[Emit]:
        """Apply *events* in order; return what they emitted."""
        out: list[Emit] = []
        for event in events:
            applied = self.wf.apply(self.state, event, envelope(event, at))
            self.state = applied.state
            out.extend(applied.emits)
        self.emitted.extend(out)
        return out

    def stage(self) -> str:
        """The deal's stage now (a call, so checks in sequence do not narrow it)."""
        return self.state.stage

    def open_exceptions(self) -> tuple[str, ...]:
        """The exceptions still holding the deal (a call, like `stage`)."""
        return self.state.open_exceptions

    def of(self, kind: type[Any]) -> list[Any]:
        """Every emitted event of *kind* so far."""
        return [e.event for e in self.emitted if isinstance(e.event, kind)]


@pytest.fixture
def deal() -> Deal:
    return Deal(
        DealWorkflow(
            routing=RoutingRegistry(ROUTING), reference=lambda: REF, booking_sla_s=600
        )
    )


def booked(d: Deal, total: Money, number: str = "4711") -> OrderBooked:
    order = d.state.order
    assert order is not None
    return OrderBooked(
        order_id=order.id,
        deal_id=DEAL,
        erp=order.erp,
        erp_order_id=number,
        status="A",
        net_total=total,
        customer_ref=order.customer_ref,
    )


def rejected(d: Deal, message: str) -> OrderRejected:
    """The ERP's refusal of the deal's order (SAP message V1/320)."""
    order = d.state.order
    assert order is not None
    return OrderRejected(
        order_id=order.id,
        deal_id=DEAL,
        erp=order.erp,
        code="V1/320",
        message=message,
        net_total=order.net_total,
    )


def invoice(d: Deal, amount: Money) -> InvoiceIssued:
    order = d.state.order
    assert order is not None
    return InvoiceIssued(
        invoice=Invoice(id="inv-1", order_id=order.id, number="9001", amount=amount),
        deal_id=DEAL,
        erp=order.erp,
    )


def confirmed(d: Deal, sub: Subscription) -> tuple[Any, ...]:
    """What the systems answer after a booking: CRM, CPQ, billing and the invoice."""
    order = d.state.order
    assert order is not None
    return (
        OpportunityUpdated(
            opportunity_id="opp-006Hn00000A1b2cIAB",
            stage="Closed Won",
            native_id="006Hn00000A1b2cIAB",
        ),
        QuoteUpdated(quote_id=order.quote_id, status="ordered", native_id="a0Q"),
        SubscriptionCreated(
            subscription_id=sub.id,
            deal_id=DEAL,
            order_id=order.id,
            native_id="sub_1",
            amount_per_period=sub.amount_per_period,
            status="active",
        ),
        invoice(d, order.net_total),
    )


def test_a_deal_runs_from_opportunity_to_completion(deal: Deal) -> None:
    deal.feed(OPPORTUNITY)
    out = deal.feed(QuoteApproved(quote=MIXED))
    request = next(e for e in out if isinstance(e.event, OrderBookingRequested))
    order = request.event.order
    # hardware has not moved for DE01: the mixed order stays on the legacy ERP
    assert order.erp == "legacy"
    assert request.routing_key == "q2c.sys.erp_legacy"
    assert order.net_total == eur("8700.00")
    assert order.customer_ref == "Q2C-006Hn00000A1b2cIAB"
    timer = next(e for e in out if isinstance(e.event, TimerElapsed))
    assert timer.delay_s == 600
    assert deal.stage() == "ordering"

    out = deal.feed(booked(deal, order.net_total))
    routed = {e.routing_key: type(e.event) for e in out}
    assert routed == {
        "q2c.sys.crm": OpportunityUpdateRequested,
        "q2c.sys.cpq": QuoteUpdateRequested,
        "q2c.sys.billing": SubscriptionRequested,
    }
    sub = deal.of(SubscriptionRequested)[0].subscription
    assert sub.amount_per_period == eur("300.00")

    deal.feed(*confirmed(deal, sub))
    assert not deal.of(DealCompleted), "the hardware has not shipped yet"
    assert not deal.wf.finished(deal.state)
    deal.feed(
        ShipmentDispatched(
            shipment=Shipment(id="ship-1", order_id=order.id, number="8001"),
            deal_id=DEAL,
            erp="legacy",
        )
    )
    (done,) = deal.of(DealCompleted)
    assert done.erp_order_id == "4711"
    assert deal.stage() == "completed"
    assert deal.wf.finished(deal.state)  # its state may go after the retention
    # a late timer after booking is no breach
    deal.feed(TimerElapsed(deal_id=DEAL, timer="booking_sla", due_at=NOW))
    assert not deal.of(SlaBreached)


def test_facts_arriving_out_of_order_wait_for_each_other(deal: Deal) -> None:
    assert deal.feed(QuoteApproved(quote=SAAS_ONLY)) == []
    out = deal.feed(OPPORTUNITY)
    (request,) = [e.event for e in out if isinstance(e.event, OrderBookingRequested)]
    assert request.order.erp == "cloud"  # wave 3 moved DE01 saas to the cloud
    assert deal.state.route_rule.startswith("wave:")


def test_each_command_is_issued_once(deal: Deal) -> None:
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    ev = booked(deal, eur("300.00"))
    deal.feed(ev)
    deal.feed(ev, QuoteApproved(quote=SAAS_ONLY), OPPORTUNITY)
    assert len(deal.of(OrderBookingRequested)) == 1
    assert len(deal.of(OpportunityUpdateRequested)) == 1
    assert len(deal.of(SubscriptionRequested)) == 1


def test_a_price_below_floor_is_a_business_exception_naming_sku_and_amount(
    deal: Deal,
) -> None:
    cheap = quote(line(1, "HW-SRV-1U", 1, "100.00"))
    out = deal.feed(OPPORTUNITY, QuoteApproved(quote=cheap))
    (exc,) = [e.event for e in out if isinstance(e.event, BusinessException)]
    assert exc.kind == "quote_rejected"
    assert exc.document == "quote"
    assert exc.amount == eur("100.00")
    assert any("HW-SRV-1U" in v and "100.00 EUR" in v for v in exc.violations)
    assert not deal.of(OrderBookingRequested)
    crm = deal.of(OpportunityUpdateRequested)
    assert crm[0].stage == "Needs Attention"
    assert deal.stage() == "exception"


def test_a_revised_quote_approved_after_a_refusal_goes_on_to_an_order(
    deal: Deal,
) -> None:
    """Below floor, then revised and approved: the deal leaves its exception."""
    cheap = quote(line(1, "HW-SRV-1U", 1, "100.00"))
    deal.feed(OPPORTUNITY, QuoteApproved(quote=cheap))
    assert deal.stage() == "exception"
    out = deal.feed(QuoteApproved(quote=SAAS_ONLY))
    assert [type(e.event) for e in out].count(OrderBookingRequested) == 1
    assert deal.stage() == "ordering"
    assert (deal.state.exceptions, deal.state.violations) == ((), ())
    # A later refusal of the deal is raised afresh.
    deal.feed(booked(deal, eur("300.00")), invoice(deal, eur("310.00")))
    assert [e.kind for e in deal.of(BusinessException)] == [
        "quote_rejected",
        "invoice_mismatch",
    ]


def test_the_same_refused_quote_read_again_is_not_refused_again(deal: Deal) -> None:
    """A change-feed re-read or a resent approval of it is no revision.

    The refusal stands, raised once: one exception, one Needs Attention.
    """
    cheap = quote(line(1, "HW-SRV-1U", 1, "100.00"))
    deal.feed(OPPORTUNITY, QuoteApproved(quote=cheap))
    assert deal.feed(QuoteApproved(quote=cheap)) == []
    (refused,) = deal.of(BusinessException)
    assert (refused.kind, refused.amount) == ("quote_rejected", eur("100.00"))
    assert [u.stage for u in deal.of(OpportunityUpdateRequested)] == ["Needs Attention"]
    assert deal.stage() == "exception"
    assert deal.state.exceptions == ("quote_rejected",)
    # Revised, it goes on.
    deal.feed(QuoteApproved(quote=SAAS_ONLY))
    assert deal.stage() == "ordering"


def test_recurring_lines_billing_cannot_bill_are_refused_at_validation(
    deal: Deal,
) -> None:
    """Mixed terms or a fractional recurring quantity: refused before booking.

    The billing platform bills one subscription's items on one interval, in
    whole units; booked, such an order would wait for a subscription forever.
    """
    mixed_terms = quote(
        line(1, "SAAS-ANL", 10, "30.00", recurring=True, physical=False, term=1),
        line(2, "SAAS-SUP-PREM", 1, "1500.00", recurring=True, physical=False, term=12),
    )
    deal.feed(OPPORTUNITY, QuoteApproved(quote=mixed_terms))
    (refused,) = deal.of(BusinessException)
    assert refused.kind == "quote_rejected"
    (violation,) = refused.violations
    assert "line 1 SAAS-ANL every 1 month," in violation
    assert "line 2 SAAS-SUP-PREM every 12 months" in violation
    assert not deal.of(OrderBookingRequested)

    fractional = Deal(deal.wf)
    backup = line(1, "SAAS-BACKUP-TB", "2.5", "22.50", recurring=True, physical=False)
    fractional.feed(OPPORTUNITY, QuoteApproved(quote=quote(backup)))
    (refused,) = fractional.of(BusinessException)
    assert refused.violations == (
        "line 1 SAAS-BACKUP-TB: recurring quantity 2.5 is not a whole number;"
        " subscriptions are billed in whole units",
    )
    assert not fractional.of(OrderBookingRequested)

    # One term for every recurring line (a yearly one too) is billable.
    yearly = Deal(deal.wf)
    yearly.feed(
        OPPORTUNITY,
        QuoteApproved(
            quote=quote(
                line(1, "HW-SRV-1U", 1, "4200.00"),
                line(
                    2, "SAAS-ANL", 10, "30.00", recurring=True, physical=False, term=12
                ),
                line(
                    3,
                    "SAAS-SUP-PREM",
                    1,
                    "1500.00",
                    recurring=True,
                    physical=False,
                    term=12,
                ),
            )
        ),
    )
    assert not yearly.of(BusinessException)
    assert len(yearly.of(OrderBookingRequested)) == 1


def test_an_order_booked_after_its_fallout_goes_on(deal: Deal) -> None:
    """The ERP refused the order, a clerk fixed it there and it was booked.

    The deal leaves its exception and goes on from the booking (CRM, CPQ,
    subscription); the fallout raised stays raised, once.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(rejected(deal, "credit block"))
    assert deal.stage() == "exception"

    out = deal.feed(booked(deal, order.net_total))
    routed = {e.routing_key: type(e.event) for e in out}
    assert routed == {
        "q2c.sys.crm": OpportunityUpdateRequested,
        "q2c.sys.cpq": QuoteUpdateRequested,
        "q2c.sys.billing": SubscriptionRequested,
    }
    assert deal.stage() == "fulfilling"
    assert deal.state.crm_wanted is not None
    assert deal.state.crm_wanted.stage == "Closed Won"
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))
    assert deal.stage() == "completed"
    assert len(deal.of(DealCompleted)) == 1
    assert [e.kind for e in deal.of(BusinessException)] == ["order_fallout"]
    assert deal.state.exceptions == ("order_fallout",)


def test_a_completed_deal_stays_completed_whatever_comes_later(deal: Deal) -> None:
    """A second billing document (a credit memo), a late rejection: no reopening."""
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, order.net_total))
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))
    assert deal.stage() == "completed"
    credit = Invoice(id="inv-2", order_id=order.id, number="9002", amount=eur("-300"))
    deal.feed(
        InvoiceIssued(invoice=credit, deal_id=DEAL, erp=order.erp),
        rejected(deal, "late"),
    )
    assert deal.stage() == "completed"
    assert deal.state.invoice is not None
    assert deal.state.invoice.id == "inv-1"
    assert not deal.of(BusinessException)


def test_order_fallout_and_invoice_mismatch_are_business_exceptions(deal: Deal) -> None:
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(rejected(deal, "sold-to not in sales area"))
    (fallout,) = deal.of(BusinessException)
    assert (fallout.kind, fallout.document_id) == ("order_fallout", order.id)

    other = Deal(deal.wf)
    other.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    other.feed(booked(other, eur("300.00")), invoice(other, eur("310.00")))
    (mismatch,) = other.of(BusinessException)
    assert mismatch.kind == "invoice_mismatch"
    assert mismatch.amount == eur("310.00")
    assert not other.of(DealCompleted)


def test_an_order_not_booked_in_time_breaches_its_sla_once(deal: Deal) -> None:
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    due = NOW + timedelta(seconds=600)
    timer = TimerElapsed(deal_id=DEAL, timer="booking_sla", due_at=due)
    deal.feed(timer, at=due)
    deal.feed(timer, at=due)
    (breach,) = deal.of(SlaBreached)
    assert breach.stage == "booking"
    assert breach.amount == eur("300.00")


def test_a_deal_keeps_its_erp_when_routing_changes(deal: Deal, tmp_path: Path) -> None:
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    assert deal.state.erp == "cloud"
    legacy_only = tmp_path / "routing.toml"
    legacy_only.write_text('default-erp = "legacy"\n')
    moved = Deal(
        DealWorkflow(routing=RoutingRegistry(legacy_only), reference=lambda: REF)
    )
    moved.state = deal.state
    moved.feed(booked(deal, eur("300.00")))
    assert moved.state.erp == "cloud"
    assert moved.of(OpportunityUpdateRequested)


def test_results_bind_the_documents_native_ids_in_the_xref(deal: Deal) -> None:
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    event = booked(deal, eur("300.00"))
    applied = deal.wf.apply(deal.state, event, envelope(event))
    (entry,) = applied.xref
    assert (entry.kind, entry.system, entry.native_id) == ("order", "erp_cloud", "4711")
    order = deal.state.order
    assert order is not None
    assert entry.canonical_id == order.id
    assert not deal.wf.apply(deal.state, OPPORTUNITY, envelope(OPPORTUNITY)).xref


def test_a_subscription_invoice_paid_is_shown_on_the_subscription(deal: Deal) -> None:
    """Stripe's invoice paid is the subscription's, not the ERP's order invoice."""
    deal.feed(OPPORTUNITY, QuoteApproved(quote=MIXED))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, order.net_total))
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))
    stripe_invoice = Invoice(
        id="inv-sub-1", order_id=order.id, number="in_1", amount=eur("300.00")
    )
    deal.feed(InvoicePaid(invoice=stripe_invoice, deal_id=DEAL, native_id="in_1"))
    view = {d.kind: d for d in deal_view(deal.state, 1).documents}
    assert view["subscription"].status == "invoice paid"
    assert view["invoice"].status != "paid"


def crm_updated(stage: str) -> OpportunityUpdated:
    return OpportunityUpdated(
        opportunity_id="opp-006Hn00000A1b2cIAB",
        stage=stage,
        native_id="006Hn00000A1b2cIAB",
    )


def test_an_older_crm_write_landing_last_is_written_over_again(deal: Deal) -> None:
    """Closed Won retried past Needs Attention: the CRM gets Needs Attention again."""
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    deal.feed(booked(deal, eur("300.00")), invoice(deal, eur("310.00")))
    closed_won, attention = deal.of(OpportunityUpdateRequested)
    assert (closed_won.stage, attention.stage) == ("Closed Won", "Needs Attention")

    assert deal.feed(crm_updated("Needs Attention")) == []
    [again] = deal.feed(crm_updated("Closed Won"))  # the retried write landed

    assert again.event == attention
    assert again.routing_key == "q2c.sys.crm"
    assert again.key_suffix == "rewrite-1"
    assert deal.feed(crm_updated("Needs Attention")) == []


def test_crm_writes_confirmed_in_order_are_not_written_again(deal: Deal) -> None:
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    deal.feed(booked(deal, eur("300.00")), crm_updated("Closed Won"))
    deal.feed(invoice(deal, eur("310.00")), crm_updated("Needs Attention"))

    assert [u.stage for u in deal.of(OpportunityUpdateRequested)] == [
        "Closed Won",
        "Needs Attention",
    ]
    assert deal.state.crm_rewrites == 0


def test_a_cancellation_before_the_invoice_is_not_the_orders_invoice(
    deal: Deal,
) -> None:
    """A billing document that is no invoice raises no mismatch; the invoice counts."""
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, order.net_total))
    cancellation = Invoice(
        id="inv-0",
        order_id=order.id,
        number="9000",
        amount=eur("-300.00"),
        status="cancellation",
    )
    deal.feed(InvoiceIssued(invoice=cancellation, deal_id=DEAL, erp=order.erp))
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))

    assert deal.stage() == "completed"
    assert not deal.of(BusinessException)
    assert deal.state.invoice is not None
    assert deal.state.invoice.id == "inv-1"


def test_a_wrong_invoice_corrected_by_a_right_one_completes_the_deal(
    deal: Deal,
) -> None:
    """Mismatch raised once; the right invoice issued later lets the deal finish."""
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, order.net_total), invoice(deal, eur("310.00")))
    assert deal.stage() == "exception"
    right = Invoice(id="inv-2", order_id=order.id, number="9002", amount=eur("300.00"))
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(
        *confirmed(deal, sub)[:3],
        InvoiceIssued(invoice=right, deal_id=DEAL, erp=order.erp),
    )

    assert deal.stage() == "completed"
    assert [e.kind for e in deal.of(BusinessException)] == ["invoice_mismatch"]
    assert deal.state.invoice == right
    # Won, attention, attention again (Closed Won's late confirmation), won.
    assert [u.stage for u in deal.of(OpportunityUpdateRequested)] == [
        "Closed Won",
        "Needs Attention",
        "Needs Attention",
        "Closed Won",
    ]


def test_only_the_deals_timers_pass_a_hold(deal: Deal) -> None:
    """The engine holds a deal's facts behind a parked one, but not its timers."""
    assert is_ordered(deal.wf)
    timer_type = TimerElapsed.__struct_config__.tag
    assert unheld_types(deal.wf) == {timer_type}
    assert timer_type in deal.wf.events


def test_a_right_invoice_lifts_a_mismatch_after_a_fixed_fallout(deal: Deal) -> None:
    """Fallout fixed, then a wrong invoice and a right one: the deal completes.

    The fallout, lifted by the booking, stays in the history but no longer
    holds the deal: the right invoice lifts the mismatch, the one exception
    still open.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(rejected(deal, "credit block"), booked(deal, order.net_total))
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub)[:3], invoice(deal, eur("310.00")))
    assert deal.stage() == "exception"

    right = Invoice(id="inv-2", order_id=order.id, number="9002", amount=eur("300.00"))
    deal.feed(InvoiceIssued(invoice=right, deal_id=DEAL, erp=order.erp))

    assert deal.stage() == "completed"
    assert len(deal.of(DealCompleted)) == 1
    assert deal.state.crm_wanted is not None
    assert deal.state.crm_wanted.stage == "Closed Won"
    assert deal.state.exceptions == ("order_fallout", "invoice_mismatch")
    assert deal.open_exceptions() == ()


def _stored_before_open_exceptions(state: DealState) -> DealState:
    """*state* as the daemon stored it before open exceptions were kept."""
    raw = msgspec.json.decode(msgspec.json.encode(state))
    for added in ("open_exceptions", "approved_at", "duplicate_orders"):
        raw.pop(added, None)
    return msgspec.json.decode(msgspec.json.encode(raw), type=DealState)


def test_a_deal_stuck_in_a_stored_state_is_lifted_by_the_right_invoice(
    deal: Deal,
) -> None:
    """A state stored by the previous release still decodes, and is not stuck.

    It holds only the history (fallout, then mismatch): what is still open
    is derived from the facts recorded, so the right invoice lifts it.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(rejected(deal, "credit block"), booked(deal, order.net_total))
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub)[:3], invoice(deal, eur("310.00")))
    deal.state = _stored_before_open_exceptions(deal.state)
    assert deal.stage() == "exception"

    right = Invoice(id="inv-2", order_id=order.id, number="9002", amount=eur("300.00"))
    deal.feed(InvoiceIssued(invoice=right, deal_id=DEAL, erp=order.erp))

    assert deal.stage() == "completed"
    assert len(deal.of(DealCompleted)) == 1


def test_a_second_booking_under_another_number_is_a_duplicate_the_first_stays(
    deal: Deal,
) -> None:
    """A re-sent order file booked twice: reported by both numbers and amount.

    The first number stays the order's, in the state and in the xref; the
    deal goes on from it. The same number again, or the duplicate again, is
    a repeat that changes nothing.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    first = booked(deal, order.net_total)
    deal.feed(first)
    again = booked(deal, order.net_total, number="4712")

    applied = deal.wf.apply(deal.state, again, envelope(again))

    assert applied.xref == []
    (dup,) = [e.event for e in applied.emits]
    assert isinstance(dup, BusinessException)
    assert (dup.kind, dup.document, dup.document_id) == (
        "duplicate_booking",
        "order",
        order.id,
    )
    assert dup.amount == eur("300.00")
    (violation,) = dup.violations
    assert "4711" in violation
    assert "4712" in violation
    assert "300.00 EUR" in violation
    deal.state = applied.state
    assert deal.state.erp_order_id == "4711"
    assert deal.state.duplicate_orders == ("4712",)

    assert deal.feed(again, first) == []
    (entry,) = deal.wf.apply(deal.state, first, envelope(first)).xref
    assert entry.native_id == "4711"
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))
    (done,) = deal.of(DealCompleted)
    assert done.erp_order_id == "4711"


def test_a_quote_for_another_account_than_the_opportunitys_is_refused(
    deal: Deal,
) -> None:
    """A quote made out to another customer than the opportunity's is refused.

    The order would be built for the opportunity's account: the refusal
    names the quote, both accounts and the amount. Revised for the right
    account, the quote goes on to an order.
    """
    wrong = msgspec.structs.replace(SAAS_ONLY, account_id="acct-001Hn00000OtHeRIAF")
    (first, *_) = validate_for_order(wrong, ACCOUNT, REF).violations
    assert first.code == "account_mismatch"

    deal.feed(OPPORTUNITY, QuoteApproved(quote=wrong))

    (refused,) = deal.of(BusinessException)
    assert (refused.kind, refused.document, refused.amount) == (
        "quote_rejected",
        "quote",
        eur("300.00"),
    )
    (violation,) = refused.violations
    for named in (wrong.id, wrong.account_id, ACCOUNT.id, "300.00 EUR"):
        assert named in violation
    assert not deal.of(OrderBookingRequested)
    assert deal.stage() == "exception"
    deal.feed(QuoteApproved(quote=SAAS_ONLY))
    assert len(deal.of(OrderBookingRequested)) == 1


def test_routing_and_the_booking_sla_are_dated_by_the_approval(deal: Deal) -> None:
    """Whichever fact arrives last, the order is routed as of the approval.

    The opportunity was created before DE01's wave 3 moved SaaS to the cloud
    ERP, the quote approved after it: both arrival orders route to the cloud
    by wave 3, and date the booking SLA from the approval.
    """
    created = datetime(2025, 12, 1, 9, 0, tzinfo=UTC)
    late = Deal(deal.wf)
    deal.feed(OPPORTUNITY, at=created)
    deal.feed(QuoteApproved(quote=SAAS_ONLY))
    late.feed(QuoteApproved(quote=SAAS_ONLY))
    late.feed(OPPORTUNITY, at=created)

    for d in (deal, late):
        assert (d.state.erp, d.state.wave) == ("cloud", "wave-3-dach-digital")
        (timer,) = d.of(TimerElapsed)
        assert timer.due_at == NOW + timedelta(seconds=600)


def test_a_booking_at_another_total_stops_the_deal_before_anyone_is_told(
    deal: Deal,
) -> None:
    """The ERP booked 330.00 EUR (or 300.00 USD) for a 300.00 EUR order.

    A business exception names the order, the ERP number and both totals;
    the CRM is told Needs Attention, not Closed Won, and neither the CPQ nor
    billing hears of the booking. Confirmed again at the order's total (a
    clerk corrected it), the deal goes on from the booking.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None

    out = deal.feed(booked(deal, eur("330.00")))

    assert [type(e.event) for e in out] == [
        BusinessException,
        OpportunityUpdateRequested,
    ]
    (exc,) = deal.of(BusinessException)
    assert (exc.kind, exc.document, exc.document_id, exc.amount) == (
        "booking_mismatch",
        "order",
        order.id,
        eur("300.00"),
    )
    (violation,) = exc.violations
    for named in (order.id, "4711", "300.00 EUR", "330.00 EUR"):
        assert named in violation
    assert [u.stage for u in deal.of(OpportunityUpdateRequested)] == ["Needs Attention"]
    assert deal.stage() == "exception"

    other = Deal(deal.wf)
    other.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    usd = Money(amount=Decimal("300.00"), currency="USD")
    other.feed(booked(other, usd))
    assert [e.kind for e in other.of(BusinessException)] == ["booking_mismatch"]
    assert not other.of(SubscriptionRequested)

    out = deal.feed(booked(deal, order.net_total))
    assert {type(e.event) for e in out} == {
        OpportunityUpdateRequested,
        QuoteUpdateRequested,
        SubscriptionRequested,
    }
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))
    assert deal.stage() == "completed"


def test_a_denial_before_the_opportunity_reaches_the_crm_when_it_arrives(
    deal: Deal,
) -> None:
    """A quote denied before the opportunity arrived is written to it on arrival.

    Needs Attention, naming the quote and its amount, once.
    """
    out = deal.feed(QuoteDenied(quote=SAAS_ONLY, reason="discount too deep"))
    assert [type(e.event) for e in out] == [BusinessException]
    out = deal.feed(OPPORTUNITY)

    (update,) = [e.event for e in out]
    assert isinstance(update, OpportunityUpdateRequested)
    assert update.opportunity_id == OPPORTUNITY.opportunity.id
    assert update.stage == "Needs Attention"
    assert update.status_note == f"quote denied: quote {SAAS_ONLY.id} (300.00 EUR)"
    assert deal.feed(OPPORTUNITY) == []
    assert deal.stage() == "exception"


def test_a_repeat_of_the_booking_changes_nothing_whichever_comes_first(
    deal: Deal,
) -> None:
    """The cloud ERP's echo of our create: the same number and total, no warnings.

    After the connector's booking (with SAP's duplicate-PO warning) the echo
    issues nothing, keeps the warning and binds the same number; arriving
    first, the echo books and the connector's booking then only adds its
    warning. Either way: one CRM, CPQ and billing command each.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    warning = "ZQ2C_SANDBOX/030: Purchase order number Q2C-1 already exists"
    connector = msgspec.structs.replace(
        booked(deal, order.net_total), status="open", warnings=(warning,)
    )
    echo = msgspec.structs.replace(booked(deal, order.net_total), status="open")
    late = Deal(deal.wf)
    late.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))

    deal.feed(connector)
    before = deal.state
    applied = deal.wf.apply(deal.state, echo, envelope(echo))
    assert applied.emits == []
    assert applied.state == before
    (entry,) = applied.xref
    assert (entry.canonical_id, entry.native_id) == (order.id, "4711")

    late.feed(echo)
    assert late.feed(connector) == []
    for d in (deal, applied, late):
        st = d.state
        assert (st.erp_order_id, st.erp_status, st.booked_total) == (
            "4711",
            "open",
            order.net_total,
        )
        assert st.booking_warnings == (warning,)
        assert st.stage == "fulfilling"
    for d in (deal, late):
        d.feed(echo, connector)
        assert len(d.of(OpportunityUpdateRequested)) == 1
        assert len(d.of(QuoteUpdateRequested)) == 1
        assert len(d.of(SubscriptionRequested)) == 1
        assert not d.of(BusinessException)


def test_a_refusal_after_the_booking_does_not_undo_it(deal: Deal) -> None:
    """The ERP refused a re-sent copy of a booked order (a duplicate PO).

    No fallout: the deal keeps its booking, status and stage, the refusal
    is kept once as a booking warning, and the deal completes.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, order.net_total))
    before = deal.state

    refusal = rejected(deal, "PO Q2C-006Hn00000A1b2cIAB already exists")
    assert deal.feed(refusal, refusal) == []

    assert deal.stage() == "fulfilling"
    assert deal.open_exceptions() == ()
    assert not deal.of(BusinessException)
    assert (deal.state.erp_order_id, deal.state.erp_status) == ("4711", "A")
    (note,) = deal.state.booking_warnings
    assert note.startswith("V1/320: PO Q2C-006Hn00000A1b2cIAB already exists")
    assert "4711" in note
    assert msgspec.structs.replace(deal.state, booking_warnings=()) == before
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))
    assert deal.stage() == "completed"
    assert [u.stage for u in deal.of(OpportunityUpdateRequested)] == ["Closed Won"]


def test_the_deal_view_shows_open_exceptions_and_duplicate_orders(
    deal: Deal,
) -> None:
    """``GET /api/v1/deals/{id}`` shows what holds the deal and what to cancel.

    Also for a state stored before open exceptions were kept.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, eur("330.00")), booked(deal, eur("330.00"), "4712"))

    view = deal_view(deal.state, 3)

    assert view.open_exceptions == ["booking_mismatch"]
    assert view.exceptions == ["booking_mismatch", "duplicate_booking"]
    assert view.duplicate_orders == ["4712"]
    encoded = msgspec.json.decode(msgspec.json.encode(view))
    assert encoded["open_exceptions"] == ["booking_mismatch"]
    assert encoded["duplicate_orders"] == ["4712"]

    fallout = Deal(deal.wf)
    fallout.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    fallout.feed(rejected(fallout, "credit block"))
    stored = _stored_before_open_exceptions(fallout.state)
    assert stored.open_exceptions == ()
    assert deal_view(stored, 2).open_exceptions == ["order_fallout"]


def test_a_right_order_keyed_after_a_booking_mismatch_replaces_the_wrong_one(
    deal: Deal,
) -> None:
    """SAP booked 4711 at 330.00 for a 300.00 order; the clerk keyed 4712 at 300.00.

    4712 becomes the order's number (state and xref), 4711 is reported once
    as the duplicate to cancel, the mismatch is lifted and the deal
    completes on 4712. Either booking again changes nothing.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, eur("330.00")))
    right = booked(deal, order.net_total, number="4712")

    applied = deal.wf.apply(deal.state, right, envelope(right))

    (entry,) = applied.xref
    assert (entry.canonical_id, entry.native_id) == (order.id, "4712")
    (dup,) = [e.event for e in applied.emits if isinstance(e.event, BusinessException)]
    assert (dup.kind, dup.document_id) == ("duplicate_booking", order.id)
    (violation,) = dup.violations
    assert "4711 (330.00 EUR), a duplicate to cancel" in violation
    assert "4712 (300.00 EUR) (kept)" in violation
    deal.state = applied.state
    deal.emitted.extend(applied.emits)
    assert (deal.state.erp_order_id, deal.state.booked_total) == ("4712", eur("300"))
    assert deal.state.duplicate_orders == ("4711",)
    assert deal.open_exceptions() == ()
    assert deal.stage() == "fulfilling"
    assert deal.state.crm_wanted is not None
    assert (deal.state.crm_wanted.stage, deal.state.crm_wanted.order_number) == (
        "Closed Won",
        "4712",
    )

    assert deal.feed(booked(deal, eur("330.00")), right) == []
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))
    (done,) = deal.of(DealCompleted)
    assert done.erp_order_id == "4712"
    assert [e.kind for e in deal.of(BusinessException)] == [
        "booking_mismatch",
        "duplicate_booking",
    ]


def test_a_booking_mismatch_after_a_lifted_one_stops_the_deal_again(
    deal: Deal,
) -> None:
    """330.00, corrected to 300.00, then 330.00 again: the deal stops again.

    A lifted exception is history, not immunity: the later wrong total is
    raised (and the CRM told) afresh, and the deal does not complete on it.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, eur("330.00")), booked(deal, order.net_total))
    assert deal.stage() == "fulfilling"

    out = deal.feed(booked(deal, eur("330.00")))

    assert [type(e.event) for e in out] == [
        BusinessException,
        OpportunityUpdateRequested,
    ]
    assert [e.kind for e in deal.of(BusinessException)] == ["booking_mismatch"] * 2
    assert deal.stage() == "exception"
    assert deal.open_exceptions() == ("booking_mismatch",)
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub))
    assert not deal.of(DealCompleted)
    assert deal.stage() == "exception"


def test_a_lift_shows_the_crm_the_deal_won_again_after_it_was_told_otherwise(
    deal: Deal,
) -> None:
    """Closed Won, then Needs Attention: once nothing is open, Closed Won again.

    A booking at a wrong total after the win, and a wrong invoice: the right
    invoice lifts its mismatch (the booking's still holds, nothing is told),
    the right booking the last one, and the CRM is told Closed Won, as a new
    command. The deal completes.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, order.net_total))
    sub = deal.of(SubscriptionRequested)[0].subscription
    deal.feed(*confirmed(deal, sub)[:3], invoice(deal, eur("310.00")))
    deal.feed(booked(deal, eur("330.00")))
    assert deal.open_exceptions() == ("invoice_mismatch", "booking_mismatch")
    right = Invoice(id="inv-2", order_id=order.id, number="9002", amount=eur("300.00"))

    assert deal.feed(InvoiceIssued(invoice=right, deal_id=DEAL, erp=order.erp)) == []
    out = deal.feed(booked(deal, order.net_total))

    crm = [e for e in out if isinstance(e.event, OpportunityUpdateRequested)]
    (update,) = crm
    assert (update.event.stage, update.event.order_number) == ("Closed Won", "4711")
    assert update.key_suffix  # a new command, not the first Closed Won again
    assert [u.stage for u in deal.of(OpportunityUpdateRequested)] == [
        "Closed Won",
        "Needs Attention",
        "Needs Attention",
        "Closed Won",
    ]
    assert deal.stage() == "completed"
    assert len(deal.of(DealCompleted)) == 1


def test_a_stored_fallout_raised_after_the_booking_does_not_hold_the_deal(
    deal: Deal,
) -> None:
    """The previous release raised fallout for a refusal after the booking.

    Such a stored state (status ``rejected``, stage ``exception``, only the
    history) has nothing open: the deal goes on from its facts, with the
    booking's status back, tells the CRM it is won again, and completes.
    """
    deal.feed(OPPORTUNITY, QuoteApproved(quote=SAAS_ONLY))
    order = deal.state.order
    assert order is not None
    deal.feed(booked(deal, order.net_total))
    attention = OpportunityUpdateRequested(
        opportunity_id=OPPORTUNITY.opportunity.id,
        stage="Needs Attention",
        status_note=f"order fallout: order {order.id} (300.00 EUR)",
    )
    old = msgspec.structs.replace(
        deal.state,
        stage="exception",
        erp_status="rejected",
        exceptions=("order_fallout",),
        crm_wanted=attention,
        stages={**deal.state.stages, "exception": NOW},
    )
    deal.state = _stored_before_open_exceptions(old)
    assert deal_view(deal.state, 2).open_exceptions == []

    sub = deal.of(SubscriptionRequested)[0].subscription
    out = deal.feed(*confirmed(deal, sub))

    assert deal.stage() == "completed"
    assert deal.state.erp_status == "open"
    assert len(deal.of(DealCompleted)) == 1
    (won,) = [e.event for e in out if isinstance(e.event, OpportunityUpdateRequested)]
    assert (won.stage, won.order_number) == ("Closed Won", "4711")


def test_late_facts_of_a_deleted_deal_start_nothing(deal: Deal) -> None:
    """After the retention deleted a deal, its late facts record nothing.

    A payment, a booking, a refusal, an invoice, a shipment, a subscription,
    a CRM or CPQ confirmation or a timer, for a deal with no opportunity,
    quote or order: the state stays as it was, nothing is issued or bound,
    and the empty instance counts as finished (its row goes after the
    retention too). A quote approved before its opportunity still waits.
    """
    order_ref = "order-006Hn00000A1b2cIAB"
    empty = deal.state
    paid = Invoice(id="inv-9", order_id=order_ref, number="in_9", amount=eur("300"))
    late: list[Any] = [
        InvoicePaid(invoice=paid, deal_id=DEAL, native_id="in_9"),
        OrderBooked(
            order_id=order_ref,
            deal_id=DEAL,
            erp="cloud",
            erp_order_id="4712",
            status="open",
            net_total=eur("300.00"),
            customer_ref="Q2C-006Hn00000A1b2cIAB",
        ),
        OrderRejected(
            order_id=order_ref,
            deal_id=DEAL,
            erp="cloud",
            code="V1/320",
            message="PO already exists",
            net_total=eur("300.00"),
        ),
        InvoiceIssued(invoice=paid, deal_id=DEAL, erp="cloud"),
        ShipmentDispatched(
            shipment=Shipment(id="ship-1", order_id=order_ref, number="8001"),
            deal_id=DEAL,
            erp="cloud",
        ),
        SubscriptionCreated(
            subscription_id="sub-006Hn00000A1b2cIAB",
            deal_id=DEAL,
            order_id=order_ref,
            native_id="sub_1",
            amount_per_period=eur("300.00"),
            status="active",
        ),
        crm_updated("Closed Won"),
        QuoteUpdated(quote_id=SAAS_ONLY.id, status="ordered", native_id="a0Q"),
        TimerElapsed(deal_id=DEAL, timer="booking_sla", due_at=NOW),
    ]
    for event in late:
        applied = deal.wf.apply(
            empty, event, envelope(event, NOW + timedelta(days=400))
        )
        assert (applied.state, applied.emits, applied.xref) == (empty, [], []), event
    assert deal.wf.finished(empty)

    assert deal.feed(QuoteApproved(quote=SAAS_ONLY)) == []
    assert not deal.wf.finished(deal.state)
    deal.feed(OPPORTUNITY)
    assert len(deal.of(OrderBookingRequested)) == 1


def test_the_booking_sla_timer_falls_due_when_the_sla_does(deal: Deal) -> None:
    """The SLA runs from the approval, not from the fact that completed the pair.

    The opportunity arriving two hours after the approval finds the SLA
    breached already: the timer fires at once. Four minutes after, it fires
    six minutes later; a completing fact dated before the approval waits no
    longer than the SLA.
    """
    deal.feed(QuoteApproved(quote=SAAS_ONLY))
    deal.feed(OPPORTUNITY, at=NOW + timedelta(hours=2))
    soon, early = Deal(deal.wf), Deal(deal.wf)
    soon.feed(QuoteApproved(quote=SAAS_ONLY))
    soon.feed(OPPORTUNITY, at=NOW + timedelta(minutes=4))
    early.feed(QuoteApproved(quote=SAAS_ONLY))
    early.feed(OPPORTUNITY, at=NOW - timedelta(days=1))

    for d, delay_s in ((deal, 0.0), (soon, 360.0), (early, 600.0)):
        (timer,) = [e for e in d.emitted if isinstance(e.event, TimerElapsed)]
        assert timer.event.due_at == NOW + timedelta(seconds=600)
        assert timer.delay_s == delay_s
