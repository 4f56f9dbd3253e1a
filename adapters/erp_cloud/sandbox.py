"""An SAP S/4HANA Cloud that fits in a test: OData V2 over aiohttp, in memory.

`SapSandbox` serves, under ``/sap/opu/odata/sap/``:

- ``API_SALES_ORDER_SRV``: ``A_SalesOrder`` deep insert (``to_Item`` and the
  other navigations as ``{"results": [...]}`` or as a bare array), read by
  key with an ETag, the collection with ``$filter`` (``Field eq '...'``
  terms joined by ``and``), ``$top``, ``$skip``, ``$inlinecount``,
  ``$expand``, server-driven paging (``__next``); ``PATCH`` with
  ``If-Match`` (412 when stale, 428 when absent);
- ``API_BUSINESS_PARTNER``: ``A_BusinessPartner`` (deep create with roles,
  addresses, tax numbers, customer and sales areas; read, with ``$expand``;
  ``$filter`` by ``SearchTerm1``; ``PATCH``), ``A_BusinessPartnerAddress``
  and ``A_BusinessPartnerTaxNumber`` (read, create, ``PATCH`` with
  ``If-Match``; one tax number per category), ``A_Customer``,
  ``A_CustomerSalesArea`` (read, create);
- ``API_PRODUCT_SRV``: ``A_Product``, read only, seeded with
  `SapSandbox.seed_products`: the sandbox's stand-in for pricing conditions
  (list price and price floor on the product; see `A_Product`).

On the wire it behaves like SAP: HTTP Basic auth (401 otherwise); the CSRF
handshake (a GET or HEAD with ``X-CSRF-Token: Fetch`` returns
``x-csrf-token`` and a session cookie; a POST/PATCH/DELETE without both is
refused 403 with ``x-csrf-token: Required``); SAP's error body with
``errordetails`` for validation errors (``maxLength`` and decimal places as
published in SAP's OpenAPI description, held in the views' annotations);
warnings in the ``sap-message`` header; weak ETags derived from
``LastChangeDateTime``. SAP offers no idempotency key: the sandbox applies
the customer-reference check SAP applies by default, so a second order with
the same ``SoldToParty`` + ``PurchaseOrderByCustomer`` is created with a
duplicate warning in ``sap-message``, or refused with 400 when the
``block_duplicate_po`` knob is on.

After an order is created, and when ``push_url`` is set, the sandbox pushes
SAP's business events to it as CloudEvents (see `adapters.erp_cloud._push`):
``SalesOrder.Created`` carrying the order's total and status (whoever
created it: an order a clerk keys in SAP is announced alike), then after
``fulfilment_delay_s`` an ``OutboundDelivery.Created`` for orders with
shipped items and a ``BillingDocument.Created`` carrying the billed amount
(plus ``invoice_delta``, to provoke an invoice mismatch).

Message codes in the ``ZQ2C_SANDBOX`` class are the sandbox's own, in SAP's
``<class>/<number>`` shape. All state is in memory and grows without bound
(orders, partners, CSRF sessions): it is a test double, not a server.
"""

from __future__ import annotations

import base64
import binascii
import math
import random
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Annotated, Any, Final

import anyio
import msgspec
from aiohttp import web
from msgspec import Meta

from adapters.erp_cloud import _odata as od
from adapters.erp_cloud._push import Pusher, PushSettings
from adapters.erp_cloud._sandbox_orders import OrderBook
from adapters.erp_cloud._sandbox_partners import PartnerBook
from adapters.erp_cloud.views import A_CustomerSalesArea, A_Product
from adapters.numbering import first_number
from adapters.serving import serve
from broker.limits import TokenBucket

__all__ = ["Knobs", "SapSandbox", "ROOT"]

#: Where SAP serves OData V2 services.
ROOT: Final = "/sap/opu/odata/sap"
_WRITES = frozenset({"POST", "PUT", "PATCH", "MERGE", "DELETE"})
#: The entity sets each service serves.
_SERVICES: Final = {
    "API_SALES_ORDER_SRV": ("A_SalesOrder",),
    "API_BUSINESS_PARTNER": (
        "A_BusinessPartner",
        "A_BusinessPartnerAddress",
        "A_BusinessPartnerTaxNumber",
        "A_Customer",
        "A_CustomerSalesArea",
    ),
    "API_PRODUCT_SRV": ("A_Product",),
}
_PATH = re.compile(r"(?P<set>\w+)(?:\((?P<key>[^)]*)\))?(?:/(?P<nav>\w+))?")

NonNegative = Annotated[float, Meta(ge=0)]


class Knobs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Behaviour switches, settable from Python or ``POST /_sandbox/knobs``.

    Attributes:
        latency_s: added before every call is answered.
        error_rate: fraction of write calls answered 500 or 503 (seeded).
        outage: every call is answered 503.
        rate_limit_per_s: beyond it, calls are answered 429 with Retry-After.
        block_duplicate_po: a repeated customer reference is an error, not a
            warning (SAP's "Check customer reference" set to error).
        push_url: where business events go; None sends none.
        push_secrets: signing secrets; two while one is being rotated.
        push_max_attempts: deliveries per event before it is dropped.
        push_backoff_s: first retry delay; doubles per attempt (≤ 30 s).
        fulfilment_delay_s: between the order event and the delivery and
            billing events.
        invoice_delta: added to the billed amount (invoice mismatch).
        invoice_deltas: per customer reference, added to that order's bill.
        refuse_refs: customer references whose orders are refused with a
            business error (order fallout).
        forbidden_services: services the communication user has no
            authorization for: every call to them is answered 403.
        max_page_size: server-driven paging, as SAP Gateway's: a read that
            selects more rows answers this many and a ``__next`` link
            (``$skiptoken``) to the rest.
    """

    latency_s: NonNegative = 0.0
    error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.0
    outage: bool = False
    rate_limit_per_s: Annotated[float, Meta(gt=0)] | None = None
    block_duplicate_po: bool = False
    push_url: str | None = None
    push_secrets: list[str] = msgspec.field(
        default_factory=lambda: ["sandbox-push-secret"]
    )
    push_max_attempts: Annotated[int, Meta(ge=1, le=20)] = 5
    push_backoff_s: NonNegative = 0.5
    fulfilment_delay_s: NonNegative = 0.0
    invoice_delta: Decimal = Decimal(0)
    invoice_deltas: dict[str, Decimal] = {}
    refuse_refs: frozenset[str] = frozenset()
    forbidden_services: frozenset[str] = frozenset()
    max_page_size: Annotated[int, Meta(ge=1)] = 1000


@dataclass(kw_only=True)
class Counters:
    """What the sandbox did, for ``GET /_sandbox/state``."""

    #: Every request to the APIs, whatever the answer: what a tenant is metered on.
    requests: int = 0
    auth_refused: int = 0
    csrf_tokens_issued: int = 0
    csrf_refused: int = 0
    rate_limited: int = 0
    outage_refused: int = 0
    injected_errors: int = 0
    forbidden: int = 0
    validation_errors: int = 0
    duplicate_po_warnings: int = 0
    duplicate_po_refused: int = 0
    precondition_failed: int = 0
    precondition_required: int = 0
    orders_created: int = 0
    orders_changed: int = 0
    business_partners_created: int = 0
    business_partners_changed: int = 0
    sales_areas_created: int = 0
    #: Addresses and tax numbers added (by their own POST; those a partner's
    #: deep insert brings count as its create) and changed.
    partner_addresses_created: int = 0
    partner_addresses_changed: int = 0
    tax_numbers_created: int = 0
    tax_numbers_changed: int = 0


class SapSandbox:
    """SAP S/4HANA Cloud's sales-order, business-partner and product APIs, faked.

    Start it with `start` (or mount `app` in aiohttp's ``TestServer``) and
    close it with `aclose`, which also cancels event deliveries in flight.

    *number_block* moves every number it hands out (partners, orders,
    deliveries, billing documents) up by that many millions, as a fresh
    number range: a run against a broker whose store remembers an earlier
    run's documents must not hand out their numbers again.
    """

    def __init__(
        self,
        *,
        username: str = "Q2C_COMM_USER",
        password: str = "sandbox-password",
        seed: int = 0,
        system_id: str = "S4H",
        client: str = "100",
        knobs: Knobs | None = None,
        number_block: int = 0,
    ) -> None:
        self.knobs = knobs or Knobs()
        self.counters = Counters()
        self._credentials = f"{username}:{password}".encode()
        self._random = random.Random(seed)
        self._cookie = f"SAP_SESSIONID_{system_id}_{client}"
        self._sessions: dict[str, str] = {}
        self._bucket: TokenBucket | None = None
        self._pusher = Pusher(self._push_settings)
        clock = od.Clock()
        first = first_number(number_block)
        self.partners = PartnerBook(counters=self.counters, clock=clock, first=first)
        self.orders = OrderBook(
            knobs=self.knobs,
            counters=self.counters,
            clock=clock,
            partners=self.partners,
            pusher=self._pusher,
            source=f"/default/sap.s4.beh/{system_id}",
            first=first,
        )
        self._runner: web.AppRunner | None = None
        #: The base URL once `start` has run.
        self.url: str | None = None
        self.app = web.Application(middlewares=[self._middleware])
        self.app.router.add_get("/_sandbox/state", self._state)
        self.app.router.add_get("/_sandbox/knobs", self._get_knobs)
        self.app.router.add_post("/_sandbox/knobs", self._set_knobs)
        self.app.router.add_route("*", ROOT + "/{service}", self._dispatch)
        self.app.router.add_route("*", ROOT + "/{service}/{path:.*}", self._dispatch)
        self.app.on_cleanup.append(self._on_cleanup)

    def __repr__(self) -> str:
        return (
            f"<SapSandbox {len(self.orders.orders)} orders, "
            f"{len(self.partners.partners)} partners, "
            f"{self._pusher.pending} pushes pending>"
        )

    # -- lifecycle -------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on *host*:*port* (0 picks a free port); return the base URL."""
        self._runner, self.url = await serve(self.app, host, port)
        return self.url

    async def aclose(self) -> None:
        """Stop serving and cancel event deliveries still in flight."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        else:
            await self._pusher.aclose()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self._pusher.aclose()

    # -- seeding and inspection --------------------------------------------------

    def seed_products(self, products: Iterable[A_Product]) -> None:
        """Add (or replace) products in ``API_PRODUCT_SRV``."""
        self.partners.seed_products(products)

    def seed_customer(
        self,
        customer: str,
        *,
        name: str,
        sales_areas: Iterable[A_CustomerSalesArea],
        search_term: str | None = None,
    ) -> None:
        """Add a business partner that is a customer in *sales_areas*."""
        self.partners.seed_customer(
            customer, name=name, sales_areas=sales_areas, search_term=search_term
        )

    def expire_sessions(self) -> None:
        """Forget every CSRF session, as an application server restart would."""
        self._sessions.clear()

    @property
    def pushes_pending(self) -> int:
        """Event deliveries still running (including back-off waits)."""
        return self._pusher.pending

    # -- the wire ----------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        if request.path.startswith("/_sandbox/"):
            return await handler(request)
        service = request.match_info.get("service", "")
        self.counters.requests += 1
        knobs = self.knobs
        if knobs.latency_s > 0:
            await anyio.sleep(knobs.latency_s)
        if knobs.outage:
            self.counters.outage_refused += 1
            return od.error_response(
                503,
                "ZQ2C_SANDBOX/503",
                "The service is temporarily unavailable",
                service=service,
                headers={"Retry-After": "1"},
            )
        wait_s = self._take_token()
        if wait_s is not None:
            self.counters.rate_limited += 1
            return od.error_response(
                429,
                "ZQ2C_SANDBOX/429",
                "Too many requests",
                service=service,
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
        if not self._authenticated(request):
            self.counters.auth_refused += 1
            return web.Response(
                status=401,
                text="Logon failed",
                headers={"WWW-Authenticate": 'Basic realm="SAP NetWeaver"'},
            )
        if service in knobs.forbidden_services:
            self.counters.forbidden += 1
            return od.error_response(
                403,
                "/IWFND/CM_CONSUMER/101",
                f"No authorization to access service {service}",
                service=service,
            )
        if request.method in _WRITES:
            if not self._csrf_valid(request):
                self.counters.csrf_refused += 1
                return web.Response(
                    status=403,
                    text="CSRF token validation failed",
                    headers={"x-csrf-token": "Required"},
                )
            if knobs.error_rate > 0 and self._random.random() < knobs.error_rate:
                self.counters.injected_errors += 1
                status = self._random.choice((500, 503))
                return od.error_response(
                    status,
                    f"ZQ2C_SANDBOX/{status}",
                    "Internal error in the backend",
                    service=service,
                )
        response = await handler(request)
        if request.method in ("GET", "HEAD") and (
            request.headers.get("X-CSRF-Token", "").lower() == "fetch"
        ):
            self._issue_token(request, response)
        return response

    def _take_token(self) -> float | None:
        """None when the call may go, else the seconds to wait.

        The bucket holds one second's worth of calls (at least one) and
        starts full whenever a limit is applied.
        """
        rate = self.knobs.rate_limit_per_s
        if rate is None:
            self._bucket = None
            return None
        if self._bucket is None or self._bucket.rate_per_s != rate:
            self._bucket = TokenBucket(rate, max(1.0, rate))
        return self._bucket.try_take() or None

    def _authenticated(self, request: web.Request) -> bool:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(given, self._credentials)

    def _csrf_valid(self, request: web.Request) -> bool:
        session = request.cookies.get(self._cookie)
        token = request.headers.get("X-CSRF-Token", "")
        expected = self._sessions.get(session or "")
        return expected is not None and secrets.compare_digest(token, expected)

    def _issue_token(self, request: web.Request, response: web.StreamResponse) -> None:
        session = request.cookies.get(self._cookie)
        if session is None or session not in self._sessions:
            session = secrets.token_urlsafe(24)
            self._sessions[session] = secrets.token_urlsafe(18)
            self.counters.csrf_tokens_issued += 1
        response.headers["x-csrf-token"] = self._sessions[session]
        response.set_cookie(self._cookie, session, path="/", httponly=True)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        service = request.match_info["service"]
        request[od.MAX_PAGE_SIZE] = self.knobs.max_page_size
        try:
            return await self._route(request, service)
        except od.Refused as refused:
            if refused.status == 400:
                self.counters.validation_errors += 1
            return od.error_response(
                refused.status,
                refused.code,
                refused.message,
                service=service,
                details=refused.details,
            )

    async def _route(self, request: web.Request, service: str) -> web.StreamResponse:
        method = "PATCH" if request.method == "MERGE" else request.method
        path = request.match_info.get("path", "").rstrip("/")
        if service not in _SERVICES:
            raise od.Refused(404, "ZQ2C_SANDBOX/040", f"No service {service}")
        if not path:
            if method not in ("GET", "HEAD"):
                raise od.Refused(405, "ZQ2C_SANDBOX/041", f"{method} not allowed")
            return od.json_response({"d": {"EntitySets": list(_SERVICES[service])}})
        match = _PATH.fullmatch(path)
        if match is None or match["set"] not in _SERVICES[service]:
            raise od.Refused(404, "ZQ2C_SANDBOX/040", f"No resource {path!r}")
        key = None if match["key"] is None else od.parse_key(match["key"])
        base = f"{request.url.origin()}{ROOT}/{service}"
        response = await self.orders.route(
            request,
            entity_set=match["set"],
            key=key,
            nav=match["nav"],
            method=method,
            base=base,
        )
        if response is None and match["nav"] is None:
            response = await self.partners.route(
                request, entity_set=match["set"], key=key, method=method, base=base
            )
        if response is None:
            raise od.Refused(404, "ZQ2C_SANDBOX/040", f"No resource {path!r}")
        return response

    # -- control -----------------------------------------------------------------

    def state(self) -> dict[str, int]:
        """The counts ``GET /_sandbox/state`` reports."""
        counts: dict[str, int] = {
            f.name: getattr(self.counters, f.name) for f in fields(self.counters)
        }
        stats = self._pusher.stats
        return counts | {
            "orders": len(self.orders.orders),
            "business_partners": len(self.partners.partners),
            "products": len(self.partners.products),
            "events_delivered": stats.delivered,
            "event_attempts_failed": stats.failed_attempts,
            "events_dropped": stats.dropped,
            "pushes_pending": self._pusher.pending,
        }

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.state())

    async def _get_knobs(self, request: web.Request) -> web.Response:
        shown = msgspec.to_builtins(self.knobs)
        shown["push_secrets"] = [f"…{s[-4:]}" for s in self.knobs.push_secrets]
        return web.json_response(shown)

    async def _set_knobs(self, request: web.Request) -> web.Response:
        try:
            changes = msgspec.json.decode(await request.read(), type=dict[str, Any])
            merged = msgspec.to_builtins(self.knobs) | changes
            new = msgspec.convert(merged, Knobs, strict=False)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        for name in Knobs.__struct_fields__:
            setattr(self.knobs, name, getattr(new, name))
        return await self._get_knobs(request)

    def _push_settings(self) -> PushSettings | None:
        knobs = self.knobs
        if not knobs.push_url or not knobs.push_secrets:
            return None
        return PushSettings(
            url=knobs.push_url,
            secrets=tuple(knobs.push_secrets),
            max_attempts=knobs.push_max_attempts,
            backoff_s=knobs.push_backoff_s,
        )
