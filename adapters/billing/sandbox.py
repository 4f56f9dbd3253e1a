"""A Stripe look-alike on the wire, for tests, the demo and the bench.

What it reproduces of Stripe's v1 API:

- auth: ``Authorization: Bearer sk_test_…`` (or HTTP basic with the key as
  user name); anything else is a 401 with Stripe's error body;
- form-encoded request bodies with nested keys, JSON responses, the
  ``Stripe-Version`` header (validated and echoed; the pinned version when
  absent) and a ``Request-Id`` on every answer;
- idempotency: a POST's ``Idempotency-Key`` (≤ 255 characters, scoped to the
  API key) stores the first response, status and body, once the endpoint
  has begun executing (a 500 raised while executing included) and replays it
  with ``Idempotent-Replayed: true``; the same key with other parameters is
  a 400 ``idempotency_error``; a key still executing is a 409
  ``idempotency_key_in_use``. Validation failures are not stored. Keys are
  kept until `StripeSandbox.prune_idempotency_keys` (Stripe: after 24 h);
- customers (create, update, retrieve, list, search by
  ``metadata['k']:'v'``, ``email:``, ``name:``), products, prices,
  subscriptions (with inline ``price_data``; list by customer and status),
  invoice items, invoices (create, finalize, pay) and events (retrieve);
  lists paginate as Stripe's do (`adapters.billing.listing`);
- webhooks: ``customer.subscription.created``, ``invoice.finalized`` and
  ``invoice.paid`` delivered by `WebhookSender` (signed, retried, maybe
  duplicated, in no guaranteed order).

Knobs (`Knobs`), settable from Python or ``POST /_sandbox/knobs``: latency,
faults before execution (``error_rate``: 500 or 503, nothing stored, safe to
retry), faults during execution (``execution_error_rate``: a 500 that is
stored and replayed under its key, as Stripe does), a full outage (every
call 503), a rate limit (429 with ``Retry-After``), duplicate webhooks, and
search lag (Stripe's search index trails writes by up to a minute).
``GET /_sandbox/state`` returns object and event counts.

A test double: every object, event and idempotency key is kept in memory
for the sandbox's lifetime, without bound.
"""

from __future__ import annotations

import base64
import math
import random
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Annotated, Any, final

import anyio
import msgspec
from aiohttp import web
from msgspec import Meta

from adapters.billing.account import StripeAccount
from adapters.billing.delivery import WebhookEndpoint, WebhookSender
from adapters.billing.form import CONTENT_TYPE as FORM_CONTENT_TYPE
from adapters.billing.form import FormError, decode_form, form_pairs
from adapters.billing.listing import list_customers, list_subscriptions
from adapters.billing.params import Params, Refusal, read_int, read_str
from adapters.billing.views import API_VERSION, EventRequest
from adapters.serving import serve

__all__ = ["Knobs", "StripeSandbox"]

Rate = Annotated[float, Meta(ge=0, le=1)]
_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(\.[a-z]+)?")
_MAX_KEY = 255

_Handler = Callable[[re.Match[str], Params, EventRequest], msgspec.Struct]
_Fingerprint = tuple[str, str, tuple[tuple[str, str], ...]]


class Knobs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fault and timing controls, changeable while the sandbox runs.

    Attributes:
        latency_s: added to every API call (inside execution for writes,
            so a concurrent retry of the same key meets a 409).
        error_rate: fraction of writes answered 500/503 before executing.
        outage: every API call answered 503.
        rate_limit_per_s: API calls allowed per second; beyond it, 429.
        execution_error_rate: fraction of writes failing with a stored 500.
        duplicate_rate: fraction of webhook events delivered twice.
        search_lag_s: how long a new customer stays invisible to search.
    """

    latency_s: Annotated[float, Meta(ge=0)] = 0.0
    error_rate: Rate = 0.0
    outage: bool = False
    rate_limit_per_s: Annotated[float, Meta(gt=0)] | None = None
    execution_error_rate: Rate = 0.0
    duplicate_rate: Rate = 0.0
    search_lag_s: Annotated[float, Meta(ge=0)] = 0.0


class _Stored(msgspec.Struct, frozen=True):
    fingerprint: _Fingerprint
    status: int
    body: bytes
    request_id: str


class _RateLimited(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("rate limited")
        self.retry_after_s = retry_after_s


@final
class StripeSandbox:
    """An in-memory Stripe account behind an aiohttp app.

    Attributes:
        app: the aiohttp application (serve it with `start` or a TestServer).
        knobs: fault and timing controls.
        account: the objects, for assertions.
        webhook: the webhook endpoint (URL and signing secrets).
        counts: what happened, as served by ``GET /_sandbox/state``.
    """

    def __init__(
        self,
        *,
        api_keys: Sequence[str] = ("sk_test_sandbox",),
        knobs: Knobs | None = None,
        webhook: WebhookEndpoint | None = None,
        seed: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.knobs = knobs if knobs is not None else Knobs()
        self.account = StripeAccount(clock=clock, seed=seed)
        self.webhook = webhook if webhook is not None else WebhookEndpoint()
        self.counts: Counter[str] = Counter()
        if not api_keys or not all(k.startswith("sk_test_") for k in api_keys):
            raise ValueError(
                "the sandbox accepts test-mode secret keys (sk_test_…) only"
            )
        self._api_keys = frozenset(api_keys)
        self._faults = random.Random(seed)
        self._stored: dict[tuple[str, str], _Stored] = {}
        self._executing: set[tuple[str, str]] = set()
        self._window: deque[float] = deque()
        self._sender = WebhookSender(
            self.webhook,
            counts=self.counts,
            duplicate_rate=lambda: self.knobs.duplicate_rate,
            clock=clock,
            seed=seed,
        )
        self._runner: web.AppRunner | None = None
        #: The base URL once `start` has run.
        self.url: str | None = None
        self._routes: list[tuple[str, re.Pattern[str], _Handler]] = self._table()
        self.app = web.Application()
        self.app.router.add_post("/_sandbox/knobs", self._set_knobs)
        self.app.router.add_post("/_sandbox/webhook", self._set_webhook)
        self.app.router.add_get("/_sandbox/state", self._state)
        self.app.router.add_route("*", "/v1/{tail:.*}", self._v1)
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve the app; return its base URL (``http://127.0.0.1:<port>``)."""
        self._runner, self.url = await serve(self.app, host, port)
        return self.url

    def prune_idempotency_keys(self) -> int:
        """Forget every stored idempotency key, as Stripe does after 24 hours.

        Returns how many were forgotten. A request repeated on a pruned key
        executes again.
        """
        pruned = len(self._stored)
        self._stored.clear()
        return pruned

    async def aclose(self) -> None:
        """Stop serving and cancel pending webhook deliveries."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
            self.url = None

    # --- the API --------------------------------------------------------------

    def _table(self) -> list[tuple[str, re.Pattern[str], _Handler]]:
        a = self.account
        routes: list[tuple[str, str, _Handler]] = [
            ("POST", r"customers", lambda m, p, r: a.create_customer(p)),
            (
                "GET",
                r"customers",
                lambda m, p, r: list_customers(a.customers.values(), p),
            ),
            ("GET", r"customers/search", self._search),
            (
                "POST",
                r"customers/(?P<id>[^/]+)",
                lambda m, p, r: a.update_customer(m["id"], p),
            ),
            ("POST", r"products", lambda m, p, r: a.create_product(p)),
            ("POST", r"prices", lambda m, p, r: a.create_price(p)),
            ("POST", r"subscriptions", lambda m, p, r: a.create_subscription(p, r)),
            (
                "GET",
                r"subscriptions",
                lambda m, p, r: list_subscriptions(a.subscriptions.values(), p),
            ),
            ("POST", r"invoiceitems", lambda m, p, r: a.create_invoice_item(p)),
            ("POST", r"invoices", lambda m, p, r: a.create_invoice(p)),
            (
                "POST",
                r"invoices/(?P<id>[^/]+)/finalize",
                lambda m, p, r: a.finalize_invoice(m["id"], p, r),
            ),
            (
                "POST",
                r"invoices/(?P<id>[^/]+)/pay",
                lambda m, p, r: a.pay_invoice(m["id"], p, r),
            ),
        ]  # fmt: skip
        for kind, path in (
            ("customer", "customers"),
            ("product", "products"),
            ("price", "prices"),
            ("subscription", "subscriptions"),
            ("invoice", "invoices"),
            ("invoiceitem", "invoiceitems"),
            ("event", "events"),
        ):
            routes.append(("GET", rf"{path}/(?P<id>[^/]+)", self._retriever(kind)))
        return [(method, re.compile(rf"/v1/{path}"), fn) for method, path, fn in routes]

    def _retriever(self, kind: str) -> _Handler:
        def retrieve(m: re.Match[str], p: Params, r: EventRequest) -> msgspec.Struct:
            return self.account.retrieve(kind, m["id"])

        return retrieve

    def _search(self, m: re.Match[str], p: Params, r: EventRequest) -> msgspec.Struct:
        query = read_str(p, "query", required=True) or ""
        limit = read_int(p, "limit")
        if limit is not None and not 1 <= limit <= 100:
            raise Refusal(400, "limit must be between 1 and 100", param="limit")
        return self.account.search_customers(
            query, limit=limit or 10, lag_s=self.knobs.search_lag_s
        )

    async def _v1(self, request: web.Request) -> web.StreamResponse:
        self.counts["requests"] += 1
        request_id = self.account.new_id("req")
        version = API_VERSION
        try:
            self._check_outage()
            api_key = self._authenticate(request)
            version = self._version(request)
            self._rate_limit()
            handler, match = self._route(request)
            params, pairs = await self._params(request)
            if request.method != "POST":
                if self.knobs.latency_s:
                    await anyio.sleep(self.knobs.latency_s)
                result = handler(match, params, EventRequest(id=request_id))
                return _json(200, msgspec.json.encode(result), request_id, version)
            self._inject_fault()
            return await self._write(
                request, api_key, (handler, match, params, pairs), request_id, version
            )
        except _RateLimited as limited:
            self.counts["rate_limited"] += 1
            refusal = Refusal(
                429, "Too many requests hit the API too quickly.", code="rate_limit"
            )
            response = _json(429, _error(refusal, request_id), request_id, version)
            response.headers["Retry-After"] = str(
                max(1, math.ceil(limited.retry_after_s))
            )
            return response
        except Refusal as refusal:
            body = _error(refusal, request_id)
            response = _json(refusal.status, body, request_id, version)
            if refusal.status == 401:
                response.headers["WWW-Authenticate"] = 'Basic realm="Stripe"'
            return response

    async def _write(
        self,
        request: web.Request,
        api_key: str,
        call: tuple[_Handler, re.Match[str], Params, list[tuple[str, str]]],
        request_id: str,
        version: str,
    ) -> web.StreamResponse:
        handler, match, params, pairs = call
        key = request.headers.get("Idempotency-Key")
        fingerprint: _Fingerprint = (request.method, request.path, tuple(sorted(pairs)))
        slot: tuple[str, str] | None = None
        if key is not None:
            if len(key) > _MAX_KEY:
                raise Refusal(
                    400,
                    f"Idempotency-Key has {len(key)} characters; at most {_MAX_KEY}.",
                )
            slot = (api_key, key)
            stored = self._stored.get(slot)
            if stored is not None:
                return self._replay(stored, fingerprint, key, request_id, version)
            if slot in self._executing:
                self.counts["idempotency_in_use"] += 1
                raise Refusal(
                    409,
                    "There is currently another in-progress request using this "
                    f"idempotency key ('{key}'). Retry the request later.",
                    type="idempotency_error",
                    code="idempotency_key_in_use",
                )
            self._executing.add(slot)
        try:
            if self.knobs.latency_s:
                await anyio.sleep(self.knobs.latency_s)
            req = EventRequest(id=request_id, idempotency_key=key)
            status, body, keep = self._execute(handler, match, params, req)
        finally:
            if slot is not None:
                self._executing.discard(slot)
        if slot is not None and keep:
            self._stored[slot] = _Stored(fingerprint, status, body, request_id)
        return _json(status, body, request_id, version)

    def _execute(
        self, handler: _Handler, match: re.Match[str], params: Params, req: EventRequest
    ) -> tuple[int, bytes, bool]:
        """Run one endpoint: ``(status, body, whether Stripe would store it)``."""
        request_id = req.id or ""
        rate = self.knobs.execution_error_rate
        if rate and self._faults.random() < rate:
            self.counts["execution_errors"] += 1
            failure = Refusal(
                500,
                "An unknown error occurred while processing your request.",
                type="api_error",
            )
            return 500, _error(failure, request_id), True
        try:
            result = handler(match, params, req)
        except Refusal as refusal:
            return refusal.status, _error(refusal, request_id), refusal.stored
        self.counts["writes_executed"] += 1
        self._dispatch_events()
        return 200, msgspec.json.encode(result), True

    def _replay(
        self,
        stored: _Stored,
        fingerprint: _Fingerprint,
        key: str,
        request_id: str,
        version: str,
    ) -> web.StreamResponse:
        if stored.fingerprint != fingerprint:
            self.counts["idempotency_conflicts"] += 1
            raise Refusal(
                400,
                "Keys for idempotent requests can only be used with the same "
                "parameters they were first used with. Try using a key other than "
                f"'{key}' if you meant to execute a different request.",
                type="idempotency_error",
            )
        self.counts["idempotent_replays"] += 1
        response = _json(stored.status, stored.body, request_id, version)
        response.headers["Idempotent-Replayed"] = "true"
        response.headers["Original-Request"] = stored.request_id
        return response

    def _dispatch_events(self) -> None:
        events, self.account.outbox = self.account.outbox, []
        for event in events:
            self.counts["events"] += 1
            if self.webhook.url is not None:
                pending = msgspec.structs.replace(event, pending_webhooks=1)
                self.account.events[event.id] = pending
                self._sender.submit(pending)

    # --- the request pipeline -------------------------------------------------

    def _check_outage(self) -> None:
        if self.knobs.outage:
            self.counts["outage_refusals"] += 1
            raise Refusal(
                503,
                "Stripe is temporarily unavailable (sandbox outage).",
                type="api_error",
            )

    def _authenticate(self, request: web.Request) -> str:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                key = (
                    base64.b64decode(credentials, validate=True).decode().split(":")[0]
                )
            except (ValueError, UnicodeDecodeError):
                key = ""
        if not key:
            self.counts["auth_failures"] += 1
            raise Refusal(
                401,
                "You did not provide an API key. You need to provide your API key in "
                "the Authorization header, using Bearer auth (e.g. 'Authorization: "
                "Bearer YOUR_SECRET_KEY').",
            )
        if key not in self._api_keys:
            self.counts["auth_failures"] += 1
            raise Refusal(401, f"Invalid API Key provided: {_redacted(key)}")
        return key

    def _version(self, request: web.Request) -> str:
        version = request.headers.get("Stripe-Version")
        if version is None:
            return API_VERSION
        if not _VERSION.fullmatch(version):
            raise Refusal(400, f"Invalid Stripe API version: {version}")
        return version

    def _rate_limit(self) -> None:
        rate = self.knobs.rate_limit_per_s
        if rate is None:
            return
        now = time.monotonic()
        while self._window and now - self._window[0] >= 1.0:
            self._window.popleft()
        if len(self._window) >= rate:
            raise _RateLimited(1.0 - (now - self._window[0]))
        self._window.append(now)

    def _route(self, request: web.Request) -> tuple[_Handler, re.Match[str]]:
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is not None and method == request.method:
                return handler, match
        raise Refusal(
            404, f"Unrecognized request URL ({request.method}: {request.path})."
        )

    async def _params(
        self, request: web.Request
    ) -> tuple[Params, list[tuple[str, str]]]:
        if request.method == "POST":
            raw = await request.read()
            if raw and request.content_type != FORM_CONTENT_TYPE:
                raise Refusal(
                    400,
                    f"Request bodies must be {FORM_CONTENT_TYPE}, "
                    f"not {request.content_type}.",
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Refusal(400, "Request body is not UTF-8.") from exc
        else:
            text = request.query_string
        try:
            return decode_form(text), form_pairs(text)
        except FormError as exc:
            raise Refusal(400, f"Invalid request: {exc}") from exc

    def _inject_fault(self) -> None:
        rate = self.knobs.error_rate
        if rate and self._faults.random() < rate:
            self.counts["injected_errors"] += 1
            status = self._faults.choice((500, 503))
            raise Refusal(
                status,
                "An error occurred with our connection to Stripe. (sandbox fault)",
                type="api_error",
            )

    # --- sandbox control ------------------------------------------------------

    async def _set_knobs(self, request: web.Request) -> web.Response:
        return await _merge_into(request, self.knobs, Knobs)

    async def _set_webhook(self, request: web.Request) -> web.Response:
        return await _merge_into(request, self.webhook, WebhookEndpoint)

    async def _state(self, request: web.Request) -> web.Response:
        a = self.account
        state = {
            "objects": {
                "customers": len(a.customers),
                "products": len(a.products),
                "prices": len(a.prices),
                "subscriptions": len(a.subscriptions),
                "invoices": len(a.invoices),
                "invoice_items": len(a.invoice_items),
                "events": len(a.events),
                "idempotency_keys": len(self._stored),
            },
            "counts": dict(self.counts),
            "knobs": msgspec.structs.asdict(self.knobs),
            "webhook_url": self.webhook.url,
        }
        return web.Response(
            body=msgspec.json.encode(state), content_type="application/json"
        )

    async def _on_startup(self, app: web.Application) -> None:
        await self._sender.start()

    async def _on_cleanup(self, app: web.Application) -> None:
        await self._sender.aclose()


def _json(status: int, body: bytes, request_id: str, version: str) -> web.Response:
    return web.Response(
        status=status,
        body=body,
        content_type="application/json",
        headers={"Request-Id": request_id, "Stripe-Version": version},
    )


def _error(refusal: Refusal, request_id: str) -> bytes:
    return msgspec.json.encode(refusal.body(request_id))


def _redacted(key: str) -> str:
    prefix = key[:8] if key.startswith(("sk_", "rk_")) else ""
    return f"{prefix}****{key[-4:]}" if len(key) > 12 else "****"


async def _merge_into(
    request: web.Request, target: msgspec.Struct, kind: type[msgspec.Struct]
) -> web.Response:
    """Apply a JSON object of field values to a mutable Struct, all or nothing."""
    try:
        changes = msgspec.json.decode(await request.read(), type=dict[str, Any])
        merged = msgspec.convert(
            {**msgspec.structs.asdict(target), **changes}, kind, strict=False
        )
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return web.json_response({"error": str(exc)}, status=400)
    for field in msgspec.structs.fields(kind):
        setattr(target, field.name, getattr(merged, field.name))
    return web.Response(
        body=msgspec.json.encode(target), content_type="application/json"
    )
