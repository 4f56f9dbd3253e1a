"""The end of ``brokerd demo``: what happened to each deal, and the consistency check.

For every completed deal the quote, the order the ERP holds, the invoice
and the subscription must agree on amounts and, through the xref registry
alone, on ids; each ERP and the billing platform must hold exactly one
document per deal; and every injected fault must have ended its deal the
way it should. Separate from `actors.q2c_demo`, which drives the deals.
"""

from __future__ import annotations

import itertools
import statistics
import sys
from collections import Counter
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import msgspec

from actors.workflows.deal import DealState
from adapters.billing import StripeSandbox
from adapters.billing.mapping import amount_per_period
from adapters.erp_cloud import SapSandbox
from adapters.erp_legacy.sandbox import LegacyErpSandbox
from broker import Daemon
from broker.store import DeadLetterFilter
from canonical.ids import subscription_id

if TYPE_CHECKING:
    from actors.q2c_demo import Plan

__all__ = ["print_report", "report_demo"]


async def report_demo(
    daemon: Daemon,
    plan: Plan,
    outcome: dict[str, Any],
    elapsed: float,
    sap: SapSandbox,
    legacy: LegacyErpSandbox,
    stripe: StripeSandbox,
) -> tuple[dict[str, Any], bool]:
    """The demo's figures and whether every check passed.

    Problems found are printed as they are found (the first twenty).
    """
    store = daemon.runtime.store
    decoder = msgspec.json.Decoder(DealState)
    states: dict[str, DealState] = {}
    for deal in plan.opportunities:
        record = await store.load_saga("deal", deal)
        if record is not None:
            states[deal] = decoder.decode(record.state)
    done: dict[str, str] = outcome["done"]
    kinds = Counter(done.values())

    # --- stage times --------------------------------------------------------------
    spans: dict[str, list[float]] = {}
    # "ordering" is dated by the same fact as "quoted" (the approval): a span
    # between them would always be 0. The daemon's work is in quoted->booked.
    order = ("opened", "quoted", "booked", "invoiced", "completed")
    for s in states.values():
        for a, b in itertools.pairwise(order):
            if a in s.stages and b in s.stages:
                dt = (s.stages[b] - s.stages[a]).total_seconds()
                spans.setdefault(f"{a}->{b}", []).append(max(dt, 0.0))
        if "opened" in s.stages and "completed" in s.stages:
            dt = (s.stages["completed"] - s.stages["opened"]).total_seconds()
            spans.setdefault("end to end", []).append(dt)

    # --- consistency ------------------------------------------------------------
    sap_orders = {
        r.entity.PurchaseOrderByCustomer: r.entity for r in sap.orders.orders.values()
    }
    legacy_orders = Counter(po for (_, po) in legacy.orders)
    legacy_totals = {po: total for (_, po), total in legacy.order_totals.items()}
    subs = {
        sub.metadata.get("q2c_deal_id"): sub
        for sub in stripe.account.subscriptions.values()
    }
    sap_refs = Counter(
        r.entity.PurchaseOrderByCustomer for r in sap.orders.orders.values()
    )
    subs_by_deal = Counter(
        sub.metadata.get("q2c_deal_id") for sub in stripe.account.subscriptions.values()
    )
    problems: list[str] = []
    for deal, kind in done.items():
        st = states.get(deal)
        if st is None:
            problems.append(f"{deal}: no state")
            continue
        if kind != "completed":
            continue
        order_doc, quote, invoice = st.order, st.quote, st.invoice
        if order_doc is None or quote is None or invoice is None:
            problems.append(f"{deal}: completed without order, quote or invoice")
            continue
        priced = plan.quote_totals.get(deal)
        if priced is None or quote.net_total.amount != priced:
            problems.append(
                f"{deal}: the CPQ priced {priced}, the daemon read {quote.net_total}"
            )
        if not (
            quote.net_total == order_doc.net_total == invoice.amount == st.booked_total
        ):
            problems.append(
                f"{deal}: quote {quote.net_total}, order {order_doc.net_total}, "
                f"booked {st.booked_total}, invoice {invoice.amount} differ"
            )
        ref = order_doc.customer_ref
        if order_doc.erp == "cloud":
            erp_order = sap_orders.get(ref)
            if erp_order is None or sap_refs[ref] != 1:
                problems.append(f"{deal}: SAP holds {sap_refs[ref]} orders for {ref}")
            elif (erp_order.SalesOrder or "").lstrip("0") != (
                st.erp_order_id or ""
            ).lstrip("0") or erp_order.TotalNetAmount != order_doc.net_total.amount:
                problems.append(f"{deal}: SAP order {erp_order.SalesOrder} disagrees")
        elif legacy_orders[ref] != 1:
            problems.append(f"{deal}: legacy ERP holds {legacy_orders[ref]} orders")
        elif _decimal(legacy_totals.get(ref)) != order_doc.net_total.amount:
            problems.append(
                f"{deal}: legacy order total {legacy_totals.get(ref)}, "
                f"order {order_doc.net_total}"
            )
        other = legacy_orders[ref] if order_doc.erp == "cloud" else sap_refs[ref]
        if other:
            problems.append(f"{deal}: {other} orders in the ERP it was not routed to")
        if st.needs_subscription and (
            st.subscription_native_id is None or subs_by_deal[deal] != 1
        ):
            problems.append(f"{deal}: {subs_by_deal[deal]} subscriptions in billing")
        elif st.needs_subscription:
            billed = amount_per_period(subs[deal])
            recurring = sum(
                (ln.net_amount for ln in order_doc.lines if ln.recurring), Decimal(0)
            )
            if not (
                billed == st.subscription_amount
                and billed.amount == recurring.quantize(billed.amount)
            ):
                problems.append(
                    f"{deal}: billing charges {billed} a period, the order's "
                    f"recurring lines {recurring}, recorded {st.subscription_amount}"
                )
        if not st.needs_subscription and subs_by_deal[deal]:
            problems.append(f"{deal}: a subscription without recurring lines")
    problems.extend(
        await _check_xref(store, plan, states, done, sap_orders, legacy, stripe)
    )

    # --- injected faults, accounted for ------------------------------------------
    def kinds_of(deals_: set[str]) -> Counter[str]:
        return Counter(done.get(d, "missing") for d in deals_)

    faults = {
        "below floor -> quote_rejected": (plan.below_floor, "quote_rejected"),
        "denied -> quote_denied": (plan.denied, "quote_denied"),
        "refused by ERP -> order_fallout": (plan.refused, "order_fallout"),
        "invoice off -> invoice_mismatch": (plan.mismatched, "invoice_mismatch"),
    }
    for name, (deals_, expected) in faults.items():
        got = kinds_of(deals_)
        if got[expected] != len(deals_):
            problems.append(f"{name}: expected {len(deals_)}, got {dict(got)}")
    injected = set().union(*(d for d, _ in faults.values()))
    unexplained = [d for d, k in done.items() if k != "completed" and d not in injected]
    problems.extend(f"{d}: unexpected {done[d]}" for d in unexplained[:10])

    # This run's dead letters must be exactly its poison payloads (an earlier
    # run's, on PostgreSQL, are older), each refused as not an event.
    letters = await store.list_dead_letters(DeadLetterFilter(status=None, limit=10_000))
    fresh = [d for d in letters if d.last_seen >= plan.started_at]
    poison = [d for d in fresh if d.queue == "/webhooks/erp_cloud"]
    if len(poison) != plan.poison_posted or len(fresh) != plan.poison_posted:
        problems.append(
            f"dead letters this run: {len(fresh)} ({len(poison)} of the "
            f"{plan.poison_posted} poison payloads), expected the poison only"
        )

    counters = daemon.runtime.metrics.snapshot()
    counts = await store.counts()
    out_of_order = sum(1 for s in states.values() if s.out_of_order)
    breaker = counters.get("gateway_breaker_opened", 0)
    report: dict[str, Any] = {
        "deals": len(plan.opportunities),
        "completed": kinds["completed"],
        "business exceptions": {k: v for k, v in kinds.items() if k != "completed"},
        "sla breaches (booking)": len(outcome["breaches"]),
        "routed to cloud / legacy ERP": (
            f"{sum(1 for s in states.values() if s.erp == 'cloud')} / "
            f"{sum(1 for s in states.values() if s.erp == 'legacy')}"
        ),
        "duplicates suppressed": counters.get("messages_duplicate", 0),
        "crm events replayed": plan.replayed_events,
        "stripe duplicate webhooks": stripe.counts.get("webhook_duplicates_sent", 0),
        "facts out of order (waited)": out_of_order,
        "cloud ERP outage": f"{plan.outage_s:.0f} s, breaker opened {breaker:g}x",
        "retries": counters.get("messages_retried", 0),
        "dead letters": counts.get("dead_letters", 0),
        "poison payloads posted": plan.poison_posted,
        "seconds": round(elapsed, 1),
        "deals/s": round(len(plan.opportunities) / elapsed, 1),
    }
    for span, values in spans.items():
        report[f"p50/p99 {span}"] = _p50_p99(values)
    report["consistency problems"] = len(problems)
    for p in problems[:20]:
        _say(f"  ! {p}")
    ok = not problems and len(done) == len(plan.opportunities)
    return report, ok


async def _check_xref(
    store: Any,
    plan: Plan,
    states: dict[str, DealState],
    done: dict[str, str],
    sap_orders: dict[str | None, Any],
    legacy: LegacyErpSandbox,
    stripe: StripeSandbox,
) -> list[str]:
    """Each completed deal's documents, joined through the xref registry alone.

    The registry must name, for the quote, the order and the subscription,
    the very document each system holds: the CPQ quote the sales team
    approved, the ERP's order for the deal's customer reference, and the
    billing platform's subscription for the deal.
    """
    completed = [states[d] for d, k in done.items() if k == "completed" and d in states]
    orders = await store.xref_many("order", [s.order.id for s in completed if s.order])
    quotes = await store.xref_many("quote", [s.quote.id for s in completed if s.quote])
    subs = await store.xref_many(
        "subscription",
        [subscription_id(s.deal_id) for s in completed],
    )
    legacy_numbers = {po: number for (_, po), number in legacy.orders.items()}
    problems: list[str] = []
    for s in completed:
        assert s.order is not None
        assert s.quote is not None
        erp = f"erp_{s.order.erp}"
        native = orders.get(s.order.id, {}).get(erp)
        ref = s.order.customer_ref
        held = (
            (sap_orders[ref].SalesOrder if ref in sap_orders else None)
            if s.order.erp == "cloud"
            else legacy_numbers.get(ref)
        )
        if native is None or (held or "").lstrip("0") != native.native_id.lstrip("0"):
            problems.append(f"{s.deal_id}: xref order {native} but {erp} holds {held}")
        quote = quotes.get(s.quote.id, {}).get("cpq")
        if quote is None or quote.native_id != plan.opportunities[s.deal_id]:
            problems.append(f"{s.deal_id}: xref quote {quote} is not the CPQ's")
        if s.needs_subscription:
            entry = subs.get(subscription_id(s.deal_id), {}).get("billing")
            held_sub = (
                stripe.account.subscriptions.get(entry.native_id) if entry else None
            )
            if held_sub is None or held_sub.metadata.get("q2c_deal_id") != s.deal_id:
                problems.append(
                    f"{s.deal_id}: xref subscription {entry} not in billing"
                )
    return problems


def _p50_p99(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    q = statistics.quantiles(values, n=100, method="inclusive")
    return f"{q[49] * 1000:.0f} ms / {q[98] * 1000:.0f} ms"


def print_report(report: dict[str, Any], ok: bool) -> None:
    """The report as the demo's last lines, with the check's verdict."""
    _say("\nQ2C Broker demo: quote to cash")
    for key, value in report.items():
        _say(f"  {key:<34} {value}")
    _say(
        f"  {'check':<34} {'PASS' if ok else 'FAIL'}: every deal completed or "
        "stopped by the fault injected into it; quote, ERP order, invoice and "
        "subscription agree on amounts and, through the xref registry, on ids; one "
        "document per deal in each system"
    )


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _decimal(text: str | None) -> Decimal | None:
    try:
        return Decimal(text) if text is not None else None
    except InvalidOperation:
        return None
