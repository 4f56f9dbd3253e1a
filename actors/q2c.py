"""The quote-to-cash application: workflows, reference data, routing, process API.

`QuoteToCash` is what `actors.tree` registers: the deal, account-sync and
catalog-sync workflows, the external systems (`actors.systems`), the routing
watcher, and the process API:

- ``GET /api/v1/deals/{correlation_id}``: every stage of one deal across the
  systems, with the documents' ids in each system;
- ``POST /api/v1/quotes/{quote_id}/validate``: the synchronous quote check
  (price floor, SKU validity, tax jurisdiction, eligibility) against the
  ERP's reference data, answered within ``validate-budget-s``; the same check
  the deal makes before it orders (`validate_for_order`) once the account of
  the quote's opportunity is known, so a quote made out to another account
  is refused here too (``account_mismatch``).

Its settings are the ``[app]`` table of the configuration (`AppSettings`).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import final

import anyio
import msgspec
import structlog

from actors.systems import Systems
from actors.workflows.catalogue import REFERENCE_TOML
from actors.workflows.deal import (
    DealState,
    DealWorkflow,
    account_of,
    open_exceptions_of,
)
from actors.workflows.routing import RoutingRegistry
from actors.workflows.rules import (
    ReferenceData,
    ReferencePolicy,
    ValidationResult,
    build_reference,
    load_reference_policy,
    validate_for_order,
    validate_quote,
)
from actors.workflows.sync import AccountSyncWorkflow, CatalogSyncWorkflow
from broker import (
    Actor,
    ChildSpec,
    ConfigError,
    Context,
    RetryLater,
    Runtime,
    UpstreamRejected,
)
from broker.config import Section
from broker.http import ApiError, ApiRequest
from canonical import Money
from canonical.commerce import Account, PriceBookEntry, Product, Quote
from canonical.ids import deal_of_opportunity, subscription_id

__all__ = ["AppSettings", "QuoteToCash", "ReferenceHolder", "DealView"]

_log = structlog.get_logger(__name__)
#: Where deals' outcomes wait for downstream readers (bounded by ``q2c.work``).
OUTCOMES_QUEUE = "q2c.events.deal-outcomes"
ROUTING_TOML = Path(__file__).resolve().parents[1] / "config" / "routing.toml"


class AppSettings(Section, frozen=True):
    """``[app]``: the quote-to-cash application's own settings.

    Attributes:
        routing_file: coexistence routing (legacy vs cloud ERP); watched and
            reloaded when it changes. Empty: the shipped ``config/routing.toml``.
        reference_file: tax, eligibility and enrichment tables. Empty: the
            shipped ``config/reference.toml``.
        routing_poll_s: how often the routing file is checked for changes.
        booking_sla_s: an order not booked within this raises ``q2c.sla.breached``.
        validate_budget_s: the latency budget of the synchronous quote check.
        crm_system: the system that re-reads CRM records for change events.
    """

    routing_file: str = ""
    reference_file: str = ""
    routing_poll_s: float = 2.0
    booking_sla_s: float = 900.0
    validate_budget_s: float = 0.5
    crm_system: str = "crm"


@final
class ReferenceHolder:
    """The ERP reference data quotes are validated against, refreshed in place.

    The catalogue comes from the ERP (products, list and floor prices), the
    tables from the reference file. Until the ERP's catalogue is loaded a
    quote cannot be judged: asking raises `RetryLater` and the message waits.
    """

    def __init__(self, policy: ReferencePolicy) -> None:
        self._policy = policy
        self._products: dict[str, Product] = {}
        self._prices: dict[tuple[str, str], PriceBookEntry] = {}
        self._current: ReferenceData | None = None

    def __call__(self) -> ReferenceData:
        """The current reference data.

        Raises:
            RetryLater: the ERP's catalogue has not been read yet.
        """
        if self._current is None:
            raise RetryLater("the ERP's catalogue is not loaded yet")
        return self._current

    @property
    def ready(self) -> bool:
        """The catalogue has been loaded."""
        return self._current is not None

    def update(self, products: list[Product], prices: list[PriceBookEntry]) -> None:
        """Merge the ERP's products and prices (newer wins) and rebuild.

        A price whose floor is above its list price is left out, and logged:
        one bad entry in the ERP must not keep every other price from use.
        Its SKU then has no price, and quotes with it are refused for that.
        """
        self._products.update({p.sku: p for p in products})
        for price in prices:
            if price.floor_price > price.list_price:
                _log.warning(
                    "catalogue_price_refused",
                    sku=price.sku,
                    currency=price.currency,
                    reason="floor price above list price",
                )
                self._prices.pop((price.sku, price.currency), None)
                continue
            self._prices[(price.sku, price.currency)] = price
        self._current = build_reference(
            self._products.values(), self._prices.values(), self._policy
        )


class StageView(msgspec.Struct, frozen=True, kw_only=True):
    """One stage of a deal and when it was reached."""

    stage: str
    at: datetime


class DocumentView(msgspec.Struct, frozen=True, kw_only=True):
    """One document of a deal, with its id in each system that holds it."""

    kind: str
    id: str
    amount: Money | None = None
    native_ids: dict[str, str] = {}
    status: str | None = None


class DealView(msgspec.Struct, frozen=True, kw_only=True):
    """``GET /api/v1/deals/{correlation_id}``: the deal across the systems.

    ``exceptions`` is every business exception raised (the history),
    ``open_exceptions`` those not lifted yet: the deal is stopped exactly
    while one is open. ``duplicate_orders`` are the other ERP numbers the
    order was booked under, for the operator to cancel in the ERP.
    """

    deal_id: str
    stage: str
    erp: str | None
    route_rule: str
    wave: str | None
    stages: list[StageView]
    documents: list[DocumentView]
    exceptions: list[str]
    violations: list[str]
    sla_breached: bool
    version: int
    # Added later: defaulted, so a reader of an older daemon's view decodes it.
    open_exceptions: list[str] = []
    duplicate_orders: list[str] = []


class ViolationView(msgspec.Struct, frozen=True, kw_only=True):
    """One broken rule."""

    code: str
    message: str
    line: int | None = None
    sku: str | None = None


class ValidateRequest(msgspec.Struct, frozen=True, kw_only=True):
    """``POST /api/v1/quotes/{quote_id}/validate``: the quote and its account.

    The account is the customer the order would be for: the quote's
    opportunity's. A quote made out to another is refused
    (``account_mismatch``), as the deal would refuse it.
    """

    quote: Quote
    account: Account


class ValidateResponse(msgspec.Struct, frozen=True, kw_only=True):
    """The verdict on a quote."""

    quote_id: str
    ok: bool
    violations: list[ViolationView]
    duration_ms: float


_state_decoder = msgspec.json.Decoder(DealState)


@final
class QuoteToCash:
    """Registers the quote-to-cash application with the runtime."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        try:
            self.settings = msgspec.convert(rt.cfg.app, AppSettings, strict=False)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"[app]: {exc}") from exc
        s = self.settings
        # Read once at start-up, before the event loop serves anything.
        self.routing = RoutingRegistry(Path(s.routing_file or ROUTING_TOML))
        self.reference = ReferenceHolder(
            load_reference_policy(Path(s.reference_file or REFERENCE_TOML))
        )
        self.systems = Systems(rt)
        self.systems.catalogue = self.reference.update
        # Deals' outcomes for downstream readers (reporting, alerting): a
        # queue of their own, so the announcements are never unroutable.
        rt.bind_events(
            OUTCOMES_QUEUE,
            ["q2c.deal.completed", "q2c.exception.raised", "q2c.sla.breached"],
        )
        if s.crm_system in rt.cfg.systems:
            rt.bind_events(f"q2c.sys.{s.crm_system}", ["crm.record.read_required"])
        self.deal = DealWorkflow(
            routing=self.routing,
            reference=self.reference,
            booking_sla_s=s.booking_sla_s,
        )
        self.workflows = [
            rt.workflow(self.deal),
            rt.workflow(AccountSyncWorkflow()),
            rt.workflow(CatalogSyncWorkflow()),
        ]
        rt.http_route(
            "GET",
            "/deals/{correlation_id}",
            self.get_deal,
            summary="Every stage of one deal across CRM, CPQ, ERP and billing",
            response_type=DealView,
        )
        rt.http_route(
            "POST",
            "/quotes/{quote_id}/validate",
            self.validate,
            summary="Validate a quote against the ERP's reference data (synchronous)",
            request_type=ValidateRequest,
            response_type=ValidateResponse,
        )

    def watcher(self) -> ChildSpec:
        """The routing file watcher."""
        return ChildSpec(
            id="routing-watcher",
            start=lambda: _RoutingWatcher(self.routing, self.settings.routing_poll_s),
            shutdown_s=5.0,
        )

    async def get_deal(self, request: ApiRequest) -> DealView:
        """The deal's state as the deal workflow holds it.

        Raises:
            ApiError: 404 when no deal has that correlation id.
        """
        cid = request.params["correlation_id"]
        record = await self.rt.store.load_saga("deal", cid)
        if record is None:
            raise ApiError(404, "not_found", f"no deal {cid!r}")
        return deal_view(_state_decoder.decode(record.state), record.version)

    async def validate(self, request: ApiRequest) -> ValidateResponse:
        """Validate a quote within the latency budget.

        The quote and its account come in the body (``ValidateRequest``), or,
        with an empty body, are read from the CPQ and the CRM by the quote's
        id (``quote-<cpq id>``), within the same budget.

        The quote is checked as the deal checks it before ordering
        (`validate_for_order`: made out to its opportunity's account, then
        everything else) whenever that account is known: from the deal of
        the quote's opportunity once it recorded the opportunity (what the
        deal will check against), else from the body. A quote read from the
        CPQ comes with its own account, which says nothing of the
        opportunity's: without a deal that knows it, the quote is checked
        for that account alone (`validate_quote`).

        Raises:
            ApiError: 400 for a body about another quote or an id that is not
                a CPQ quote's; 404 for a quote the CPQ does not know; 503 while
                the reference data is loading or without a CRM to read from;
                504 over the budget.
        """
        quote_id = request.params["quote_id"]
        if not self.reference.ready:
            raise ApiError(
                503,
                "reference_not_loaded",
                "the ERP catalogue is loading",
                retry_after_s=5.0,
            )
        budget = self.settings.validate_budget_s
        started = time.perf_counter()
        result: ValidationResult | None = None
        with anyio.move_on_after(budget):
            opportunity: Account | None = None
            if request.body.strip():
                body = request.json(ValidateRequest)
                if body.quote.id != quote_id:
                    raise ApiError(
                        400, "quote_mismatch", f"the body is quote {body.quote.id}"
                    )
                quote, account = body.quote, body.account
                opportunity = account
            else:
                quote, account = await self._read_quote(quote_id)
            recorded = await self._opportunity_account(quote)
            if recorded is not None:
                opportunity = recorded
            ref = self.reference()
            if opportunity is None:
                result = validate_quote(quote, account, ref)
            else:
                result = validate_for_order(quote, opportunity, ref)
        if result is None:
            raise ApiError(504, "budget_exceeded", f"validation took over {budget}s")
        return ValidateResponse(
            quote_id=quote_id,
            ok=result.ok,
            violations=[
                ViolationView(code=v.code, message=v.message, line=v.line, sku=v.sku)
                for v in result.violations
            ],
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    async def _opportunity_account(self, quote: Quote) -> Account | None:
        """The account of *quote*'s opportunity, if its deal has recorded it."""
        try:
            cid = deal_of_opportunity(quote.opportunity_id)
        except ValueError:
            return None
        record = await self.rt.store.load_saga("deal", cid)
        if record is None:
            return None
        return account_of(_state_decoder.decode(record.state))

    async def _read_quote(self, quote_id: str) -> tuple[Quote, Account]:
        crm = self.systems.crm()
        if crm is None:
            raise ApiError(
                503,
                "no_crm",
                "no CRM is connected to read the quote from; send it in the body",
            )
        native = quote_id.removeprefix("quote-")
        if native == quote_id or not native:
            raise ApiError(
                400, "not_a_cpq_quote", f"{quote_id!r} is not quote-<cpq id>"
            )
        try:
            return await crm.read_quote(native)
        except UpstreamRejected as exc:
            if exc.code == "NOT_FOUND":
                raise ApiError(
                    404, "not_found", f"the CPQ has no quote {native}"
                ) from exc
            raise


def deal_view(s: DealState, version: int) -> DealView:
    """What ``GET /api/v1/deals/{id}`` shows of a deal's state."""
    docs: list[DocumentView] = []
    if s.opportunity is not None:
        docs.append(
            DocumentView(
                kind="opportunity",
                id=s.opportunity.id,
                amount=s.opportunity.amount,
                native_ids=_native({"crm": s.crm_native_id}),
            )
        )
    if s.quote is not None:
        docs.append(
            DocumentView(
                kind="quote",
                id=s.quote.id,
                amount=s.quote.net_total,
                native_ids=_native({"cpq": s.cpq_native_id}),
                status=s.quote.status,
            )
        )
    if s.order is not None:
        docs.append(
            DocumentView(
                kind="order",
                id=s.order.id,
                amount=s.order.net_total,
                native_ids=_native(
                    {
                        f"erp_{s.order.erp}": s.erp_order_id,
                        "customer_ref": s.order.customer_ref,
                    }
                ),
                status=s.erp_status,
            )
        )
    if s.subscription_native_id is not None:
        docs.append(
            DocumentView(
                kind="subscription",
                id=subscription_id(s.deal_id),
                amount=s.subscription_amount,
                native_ids={"billing": s.subscription_native_id},
                # The billing platform's invoices are the subscription's.
                status="invoice paid" if s.invoice_paid else None,
            )
        )
    if s.invoice is not None:
        docs.append(
            DocumentView(
                kind="invoice",
                id=s.invoice.id,
                amount=s.invoice.amount,
                native_ids=_native({f"erp_{s.erp}": s.invoice.number}),
                status=s.invoice.status,
            )
        )
    if s.shipment is not None:
        docs.append(
            DocumentView(
                kind="shipment",
                id=s.shipment.id,
                native_ids=_native({f"erp_{s.erp}": s.shipment.number}),
            )
        )
    return DealView(
        deal_id=s.deal_id,
        stage=s.stage,
        erp=s.erp,
        route_rule=s.route_rule,
        wave=s.wave,
        stages=[
            StageView(stage=k, at=v) for k, v in sorted(s.stages.items(), key=_by_time)
        ],
        documents=docs,
        exceptions=list(s.exceptions),
        violations=list(s.violations),
        sla_breached=s.sla_breached,
        version=version,
        open_exceptions=list(open_exceptions_of(s)),
        duplicate_orders=list(s.duplicate_orders),
    )


def _by_time(item: tuple[str, datetime]) -> datetime:
    return item[1]


def _native(ids: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in ids.items() if v is not None}


@final
class _RoutingWatcher(Actor[None]):
    """Reloads ``routing.toml`` when it changes; an invalid edit keeps the old table."""

    def __init__(self, registry: RoutingRegistry, interval_s: float) -> None:
        self._registry = registry
        self._interval_s = interval_s

    async def on_start(self, ctx: Context[None]) -> None:
        ctx.start_soon(self._watch)

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """Takes no messages."""

    async def _watch(self) -> None:
        while True:
            await anyio.sleep(self._interval_s)
            result = await anyio.to_thread.run_sync(self._registry.maybe_reload)
            if result is None:
                continue
            if result.reloaded:
                _log.info("routing_reloaded", path=str(self._registry.path))
            elif result.error:
                _log.error(
                    "routing_reload_refused",
                    path=str(self._registry.path),
                    error=result.error,
                    hint="the previous routing table stays in force",
                )
