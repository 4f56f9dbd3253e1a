"""``brokerd demo``: deals from CRM opportunity to invoice, through all five systems.

On the embedded default (in-process transport, SQLite) it needs nothing but
the installed package; configured for RabbitMQ and Postgres it runs there.
It starts the five sandboxes (Salesforce CRM + CPQ, SAP S/4HANA, the legacy
ERP's IDoc folders, Stripe) on 127.0.0.1, points the daemon at them, and
drives N deals the way users would: accounts and opportunities in the CRM,
quotes configured and approved in the CPQ. Everything after that is the
daemon's work: change events pushed to its webhooks, quotes validated,
orders routed to the legacy or the cloud ERP by migration wave and booked,
status written back to the CRM and CPQ, subscriptions provisioned, invoices
and shipments received.

Faults injected, each accounted for in the report: duplicated webhook
deliveries (replayed CRM change events, Stripe's own duplicates), a cloud-ERP
outage in the middle (its circuit breaker opens and closes), one poison
payload, quotes below their price floor, a denied quote, orders the ERPs
refuse and invoices that do not match. Facts that arrive out of order (an
ERP's invoice before its booking is answered, say) are not staged: the
report counts those the run met.

The report ends with the consistency check: for every completed deal, the
quote, the order the ERP holds, the invoice and the subscription agree on
ids and amounts, and each ERP and the billing platform hold exactly one
document per deal.
"""

from __future__ import annotations

import random
import shutil
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec

from actors.q2c_demo_report import print_report, report_demo
from actors.workflows.catalogue import demo_catalogue
from adapters import signing
from adapters.billing import StripeSandbox
from adapters.billing.delivery import WebhookEndpoint
from adapters.billing.sandbox import Knobs as StripeKnobs
from adapters.crm.sandbox import SalesforceSandbox
from adapters.erp_cloud import SapSandbox
from adapters.erp_cloud.mapping import SUBSCRIPTION_TYPE
from adapters.erp_cloud.views import A_Product
from adapters.erp_legacy.sandbox import LegacyErpSandbox
from adapters.numbering import NUMBER_BLOCKS
from broker import Config, Daemon
from canonical import Envelope
from canonical.ids import customer_ref, deal_id
from canonical.q2c import BusinessException, DealCompleted, SlaBreached

__all__ = [
    "Plan",
    "Sandboxes",
    "drive_deals",
    "run_demo",
    "start_sandboxes",
    "systems_tables",
]

OUTPUT_QUEUE = "q2c.events.demo"
_WORK = Path("var/demo")
_SF_CLIENT = "q2c-broker"
_SF_SECRET = "demo-sf-client-secret"
_SAP_USER, _SAP_PASSWORD = "Q2C_COMM_USER", "demo-sap-password"
_STRIPE_KEY = "sk_test_q2cdemo"
_CRM_HOOK, _SAP_HOOK, _STRIPE_HOOK = "demo-crm-relay", "demo-sap-events", "whsec_demo"
_COUNTRIES = ("DE", "DE", "AT", "CH", "GB", "GB", "US", "NL", "FR", "IE")
_CENT = Decimal("0.01")


@dataclass
class Plan:
    """What the demo asked for, to hold the daemon's results against."""

    opportunities: dict[str, str] = field(default_factory=dict)  # deal -> quote
    below_floor: set[str] = field(default_factory=set)
    denied: set[str] = field(default_factory=set)
    refused: set[str] = field(default_factory=set)
    mismatched: set[str] = field(default_factory=set)
    quote_totals: dict[str, Decimal] = field(default_factory=dict)
    replayed_events: int = 0
    poison_posted: int = 0
    outage_s: float = 0.0
    #: When the deals started: dead letters seen since are this run's.
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))


@dataclass
class Sandboxes:
    """The five systems on 127.0.0.1, and where the daemon finds them."""

    crm: SalesforceSandbox
    sap: SapSandbox
    legacy: LegacyErpSandbox
    stripe: StripeSandbox
    urls: dict[str, str]
    idoc_out: Path
    idoc_in: Path

    def push_to(self, http: str) -> None:
        """Point every system's webhooks at the daemon listening on *http*."""
        self.crm.knobs.push_url = f"{http}/webhooks/crm"
        self.crm.knobs.push_secrets = [_CRM_HOOK]
        self.sap.knobs.push_url = f"{http}/webhooks/erp_cloud"
        self.sap.knobs.push_secrets = [_SAP_HOOK]
        self.stripe.webhook.url = f"{http}/webhooks/billing"

    def systems(self, *, fast: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``[systems]`` tables that point the daemon at these sandboxes."""
        return systems_tables(self.urls, self.idoc_out, self.idoc_in, fast=fast)


async def start_sandboxes(
    stack: AsyncExitStack,
    workdir: Path,
    *,
    stripe_duplicates: float = 0.0,
    seed: int | None = None,
) -> Sandboxes:
    """Start the five sandboxes (closed by *stack*); the ERP holds the catalogue."""
    idoc_out, idoc_in = workdir / "idoc" / "outbound", workdir / "idoc" / "inbound"
    for folder in (idoc_out, idoc_in):
        await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
    products, prices = demo_catalogue()
    # Fresh ids and numbers in every system each run (unless a seed is given):
    # documents of an earlier run on the same database and queues are never
    # mistaken for this run's, and the xref registry, which remembers them,
    # is never asked to bind one native id to two deals. The ERPs' numbers
    # come in blocks picked by the clock: runs less than a quarter of an hour
    # apart never share one.
    run = seed if seed is not None else time.time_ns() % 2**31
    block = (seed if seed is not None else int(time.time())) % NUMBER_BLOCKS
    crm = SalesforceSandbox(
        client_id=_SF_CLIENT,
        client_secret=_SF_SECRET,
        retain_events=500_000,
        seed=run,
    )
    urls = {"crm": await crm.start()}
    stack.push_async_callback(crm.aclose)
    sap = SapSandbox(username=_SAP_USER, password=_SAP_PASSWORD, number_block=block)
    sap.seed_products(_sap_catalogue(products, prices))
    urls["sap"] = await sap.start()
    stack.push_async_callback(sap.aclose)
    legacy = LegacyErpSandbox(idoc_out, idoc_in, interval_s=0.02, number_block=block)
    await legacy.start()
    stack.push_async_callback(legacy.aclose)
    stripe = StripeSandbox(
        api_keys=(_STRIPE_KEY,),
        knobs=StripeKnobs(duplicate_rate=stripe_duplicates),
        webhook=WebhookEndpoint(secrets=[_STRIPE_HOOK]),
        seed=run,
    )
    urls["stripe"] = await stripe.start()
    stack.push_async_callback(stripe.aclose)
    return Sandboxes(crm, sap, legacy, stripe, urls, idoc_out, idoc_in)


async def run_demo(
    cfg: Config, *, deals: int = 1000, entries: int | None = None
) -> int:
    """Run the demo; return 0 when every check passed."""
    del entries  # the ledger demo's size
    if cfg.daemon.store == "sqlite" or cfg.daemon.transport == "memory":
        # A fresh run: no store or queue journal of an earlier one.
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(_WORK, ignore_errors=True))
    rng = random.Random(11)
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, _WORK, stripe_duplicates=0.05)
        sap, legacy, stripe = boxes.sap, boxes.legacy, boxes.stripe
        cfg = _demo_config(cfg, boxes)
        daemon = Daemon(cfg)
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(60):
                await daemon.started.wait()
            http = daemon.runtime.http_url
            boxes.push_to(http)
            _say(
                f"driving {deals} deals through CRM, CPQ, SAP S/4HANA, the legacy "
                f"ERP and Stripe on {cfg.daemon.transport}/{cfg.daemon.store}"
            )
            plan = Plan()
            started = time.perf_counter()
            sub = await daemon.runtime.transport.subscribe(OUTPUT_QUEUE, prefetch=2000)
            outcome: dict[str, Any] = {}
            async with anyio.create_task_group() as inner:
                inner.start_soon(drive_deals, boxes, deals, rng, plan, http)
                with anyio.fail_after(max(300.0, deals * 0.6)):
                    outcome = await _collect(sub, deals, plan)
            elapsed = time.perf_counter() - started
            await sub.close()
            _say("")
            report, ok = await report_demo(
                daemon, plan, outcome, elapsed, sap, legacy, stripe
            )
            daemon.request_shutdown("demo finished")
    print_report(report, ok)
    return 0 if ok else 1


def _sap_catalogue(products: list[Any], prices: list[Any]) -> list[A_Product]:
    """The demo catalogue as the ERP's product master holds it (EUR prices)."""
    eur = {p.sku: p for p in prices if p.currency == "EUR"}
    return [
        A_Product(
            Product=p.sku,
            ProductType=SUBSCRIPTION_TYPE
            if p.family == "saas"
            else ("SERV" if p.family == "services" else "FERT"),
            ProductGroup=p.family,
            ProductDescription=p.name[:40],
            BaseUnit="PCE",
            ListPrice=eur[p.sku].list_price,
            PriceFloor=eur[p.sku].floor_price,
            Currency="EUR",
            IsMarkedForDeletion=not p.active,
        )
        for p in products
        if p.sku in eur
    ]


def systems_tables(
    urls: dict[str, str],
    idoc_out: Path,
    idoc_in: Path,
    *,
    fast: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``[systems]`` for sandboxes at *urls* (crm, sap, stripe) and IDoc folders."""
    fast = fast or {
        "rate-per-s": 2000.0,
        "burst": 200,
        "concurrency": 16,
        "prefetch": 32,
    }
    crm_url, sap_url, stripe_url = urls["crm"], urls["sap"], urls["stripe"]
    return {
        "crm": {
            "kind": "salesforce-crm",
            "login-url": crm_url,
            "client-id": _SF_CLIENT,
            "client-secret": _SF_SECRET,
            "default-currency": "EUR",
            "webhook-secrets": [_CRM_HOOK],
            "gateway": fast,
        },
        "cpq": {
            "kind": "salesforce-cpq",
            "login-url": crm_url,
            "client-id": _SF_CLIENT,
            "client-secret": _SF_SECRET,
            "default-currency": "EUR",
            "gateway": fast,
        },
        "erp_cloud": {
            "kind": "sap-s4",
            "base-url": sap_url,
            "username": _SAP_USER,
            "password": _SAP_PASSWORD,
            "webhook-secrets": [_SAP_HOOK],
            "gateway": {
                **fast,
                "breaker-failures": 3,
                "breaker-reset-s": 1.0,
                "breaker-reset-max-s": 4.0,
            },
        },
        "erp_legacy": {
            "kind": "idoc",
            "outbound-dir": str(idoc_out),
            "inbound-dir": str(idoc_in),
            "poll-interval-s": 0.05,
            "settle-s": 0.02,
            "max-pending-files": 5000,
            "gateway": fast,
        },
        "billing": {
            "kind": "stripe",
            "api-key": _STRIPE_KEY,
            "base-url": stripe_url,
            "webhook-secrets": [_STRIPE_HOOK],
            "gateway": fast,
        },
    }


def _demo_config(cfg: Config, boxes: Sandboxes) -> Config:
    systems = boxes.systems()
    topology = msgspec.structs.replace(
        cfg.topology,
        systems=tuple(sorted(set(cfg.topology.systems) | set(systems))),
        retry_tiers_s=(0.5, 2.0, 5.0),
        event_queues={
            **cfg.topology.event_queues,
            OUTPUT_QUEUE: (
                "q2c.deal.completed",
                "q2c.exception.raised",
                "q2c.sla.breached",
            ),
        },
    )
    return msgspec.structs.replace(
        cfg,
        topology=topology,
        core=msgspec.structs.replace(cfg.core, max_attempts=8, relay_poll_s=0.5),
        sqlite=msgspec.structs.replace(cfg.sqlite, path=str(_WORK / "q2c.sqlite3")),
        memory=msgspec.structs.replace(
            cfg.memory, journal=str(_WORK / "q2c.queues.sqlite3")
        ),
        control=msgspec.structs.replace(
            cfg.control, socket_path=str(_WORK / "brokerd.sock")
        ),
        http=msgspec.structs.replace(cfg.http, port=0),
        systems={**cfg.systems, **systems},
        app={**cfg.app, "booking-sla-s": 10.0},
    )


async def drive_deals(
    boxes: Sandboxes,
    deals: int,
    rng: random.Random,
    plan: Plan,
    http: str,
    *,
    faults: bool = True,
    pace: bool = True,
) -> None:
    """Create accounts, opportunities and quotes as sales users would."""
    crm, sap, legacy = boxes.crm, boxes.sap, boxes.legacy
    products, prices = demo_catalogue()
    eur = {p.sku: p for p in prices if p.currency == "EUR"}
    sellable = [p for p in products if p.active and p.sku in eur]
    accounts = [
        crm.seed_account(
            f"Customer {n:04d}",
            country_code=_COUNTRIES[n % len(_COUNTRIES)],
            currency="EUR",
        )
        for n in range(max(4, deals // 4))
    ]
    for n in range(deals):
        account = accounts[rng.randrange(len(accounts))]
        opportunity = crm.create_opportunity(account, f"Deal {n:05d}")
        deal = deal_id(opportunity)
        quote = crm.create_quote(opportunity)
        plan.opportunities[deal] = quote
        below = faults and n % 97 == 13
        total = Decimal(0)
        for i, product in enumerate(rng.sample(sellable, rng.randint(1, 3))):
            entry = eur[product.sku]
            qty = Decimal(rng.randint(1, 10))
            span = entry.list_price - entry.floor_price
            price = (entry.floor_price + span * Decimal(rng.random())).quantize(
                _CENT, ROUND_HALF_EVEN
            )
            if below and i == 0:
                price = (entry.floor_price * Decimal("0.8")).quantize(_CENT)
            price = max(price, Decimal("0.01"))
            total += price * qty
            crm.add_quote_line(
                quote,
                product_code=product.sku,
                quantity=qty,
                list_price=entry.list_price,
                net_price=price,
                name=product.name,
            )
        plan.quote_totals[deal] = total
        ref = customer_ref(deal)
        if below:
            plan.below_floor.add(deal)
        elif not faults:
            pass
        elif n % 199 == 7:
            plan.denied.add(deal)
        elif n % 149 == 31:
            plan.refused.add(deal)
            sap.knobs.refuse_refs = sap.knobs.refuse_refs | {ref}
            legacy.knobs.refuse_refs = legacy.knobs.refuse_refs | {ref}
        elif n % 173 == 5:
            plan.mismatched.add(deal)
            sap.knobs.invoice_deltas = {
                **sap.knobs.invoice_deltas,
                ref: Decimal("1.00"),
            }
            legacy.knobs.invoice_deltas = {
                **legacy.knobs.invoice_deltas,
                ref: Decimal("1.00"),
            }
        if deal in plan.denied:
            crm.set_quote_status(quote, "Denied")
        else:
            crm.approve_quote(quote)
        if faults and n == deals * 2 // 5:
            plan.outage_s = 4.0
            _say(f"  cloud ERP outage for {plan.outage_s:.0f} s (deal {n})")
            sap.knobs.outage = True
            await anyio.sleep(plan.outage_s)
            sap.knobs.outage = False
        if faults and n == deals // 2:
            plan.poison_posted += await _poison(http)
        if n % 20 == 0:
            # A sales team's pace, not a bulk load (the benchmark goes flat out).
            await anyio.sleep(0.05 if pace else 0)
    if faults:
        plan.replayed_events = await _replay_crm_events(crm, http, rng)


async def _poison(http: str) -> int:
    """One payload correctly signed but not an event at all: 400 and a dead letter."""
    body = b'{"specversion": "1.0", "id": 42, "data": [}'
    header = signing.sign([_SAP_HOOK], body, timestamp=int(time.time()))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{http}/webhooks/erp_cloud",
            data=body,
            headers={"Content-Type": "application/json", signing.HEADER: header},
        ) as response,
    ):
        await response.read()
        if response.status != 400:
            raise RuntimeError(f"the poison payload got {response.status}, not 400")
    _say("  posted one poison payload to /webhooks/erp_cloud")
    return 1


async def _replay_crm_events(
    crm: SalesforceSandbox, http: str, rng: random.Random
) -> int:
    """Deliver a tenth of the CRM's change events a second time (at-least-once)."""
    replayed = 0
    async with aiohttp.ClientSession() as session:
        records = list(crm.org.log)
        for record in rng.sample(records, len(records) // 10):
            body = msgspec.json.encode(record.cometd())
            header = signing.sign([_CRM_HOOK], body, timestamp=int(time.time()))
            async with session.post(
                f"{http}/webhooks/crm",
                data=body,
                headers={
                    "Content-Type": "application/json",
                    signing.HEADER: header,
                },
            ) as response:
                answer = await response.read()
                # A record the broker takes no event from (a line, an echo of
                # its own write) is answered 202 with nothing accepted.
                if response.status == 202 and msgspec.json.decode(answer)["accepted"]:
                    replayed += 1
    _say(f"  replayed {replayed} CRM change events (duplicates)")
    return replayed


async def _collect(sub: Any, deals: int, plan: Plan) -> dict[str, Any]:
    """Read the deals' outcomes until every deal has one."""
    envelope = msgspec.json.Decoder(Envelope)
    completed = msgspec.json.Decoder(DealCompleted)
    raised = msgspec.json.Decoder(BusinessException)
    breached = msgspec.json.Decoder(SlaBreached)
    done: dict[str, str] = {}
    exceptions: dict[str, BusinessException] = {}
    breaches: dict[str, SlaBreached] = {}
    while len(done) < deals:
        batch = await sub.batch(2000)
        for d in batch:
            env = envelope.decode(d.body)
            if env.correlation_id not in plan.opportunities:
                continue  # left in the queue by an earlier run
            if env.type == "q2c.deal.completed":
                done.setdefault(completed.decode(env.data).deal_id, "completed")
            elif env.type == "q2c.exception.raised":
                exc = raised.decode(env.data)
                exceptions.setdefault(exc.deal_id, exc)
                done.setdefault(exc.deal_id, exc.kind)
            elif env.type == "q2c.sla.breached":
                b = breached.decode(env.data)
                breaches.setdefault(b.deal_id, b)
        sub.ack(batch[-1].tag, multiple=True)
        _progress(len(done), deals)
    return {"done": done, "exceptions": exceptions, "breaches": breaches}


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)


def _progress(done: int, total: int) -> None:
    if sys.stdout.isatty():
        print(f"\r  deals finished {done}/{total}", end="", flush=True)
