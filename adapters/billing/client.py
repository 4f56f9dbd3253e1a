"""An async client for the parts of Stripe's v1 API the broker uses.

One `aiohttp.ClientSession` per client. Every POST is form-encoded and
carries an ``Idempotency-Key`` the caller derives from the business fact
(so a redelivered command replays Stripe's stored answer instead of acting
twice); every request pins ``Stripe-Version``. Failures are translated here
and nowhere else:

- 429, 5xx, a 409 ``idempotency_key_in_use``, timeouts and connection errors
  → `UpstreamUnavailable` (``retry_after_s`` from ``Retry-After``);
- 401 and 403, the API key refused (invalid, expired, revoked, or a
  restricted key without the permission) → `UpstreamUnavailable` too: every
  command would fail alike until the key is fixed, so the breaker should
  count it, open and hold the commands, not dead-letter each one. The
  message says the key was refused and leaves out Stripe's own, which quotes
  part of the key;
- any other 4xx → `UpstreamRejected` with Stripe's ``error.code`` (or its
  ``error.type`` when there is no code) as ``code``.

A 500 that Stripe stored under the key is replayed for every retry with that
key for at least 24 hours: that is a `ReplayedServerError` (still an
`UpstreamUnavailable`), because retrying the same key cannot cure it and a
caller may want to look the object up and go on under another key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Annotated, Protocol, TypeVar

import aiohttp
import msgspec
from msgspec import Meta

from adapters.billing.form import CONTENT_TYPE as FORM_CONTENT_TYPE
from adapters.billing.form import FormValue, encode_form
from adapters.billing.views import (
    API_VERSION,
    Customer,
    ErrorBody,
    Event,
    Invoice,
    InvoiceItem,
    Price,
    Product,
    SearchResult,
    StripeList,
    Subscription,
)
from adapters.session import SessionClient, read_bounded, retry_after_s
from broker.config import Section
from broker.errors import UpstreamRejected, UpstreamUnavailable

__all__ = [
    "StripeSettings",
    "StripeApi",
    "StripeClient",
    "ReplayedServerError",
    "idempotency_key",
]

T = TypeVar("T")


class _Identified(Protocol):
    @property
    def id(self) -> str: ...


L = TypeVar("L", bound=_Identified)

_MAX_KEY = 255
_PAGE_SIZE = 100  # Stripe's largest ``limit``
#: What a 401 or 403 says, instead of Stripe's message (it quotes the key).
_KEY_REFUSED = {
    401: "the API key was refused (missing, invalid, expired or revoked); "
    "check the configured api_key",
    403: "the API key was refused for this request (a restricted key without "
    "the permission); check the configured api_key",
}


class StripeSettings(Section, frozen=True):
    """``[systems.billing]``: where Stripe is and how to talk to it.

    Attributes:
        api_key: the secret key (``sk_live_…``/``sk_test_…``); from the
            environment, never from a file in the repository.
        base_url: ``https://api.stripe.com``, or a sandbox.
        api_version: pinned on every request; match the webhook endpoint's.
        timeout_s: per request, connect to last byte.
        webhook_secrets: every active endpoint secret (two during rotation).
        webhook_tolerance_s: accepted age of a webhook signature.
    """

    api_key: str
    base_url: str = "https://api.stripe.com"
    api_version: str = API_VERSION
    timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    webhook_secrets: tuple[str, ...] = ()
    webhook_tolerance_s: Annotated[float, Meta(gt=0)] = 300.0

    def __repr__(self) -> str:
        return (
            f"StripeSettings(base_url={self.base_url!r}, api_version="
            f"{self.api_version!r}, api_key='***', webhook_secrets="
            f"{len(self.webhook_secrets)} configured)"
        )


class ReplayedServerError(UpstreamUnavailable):
    """Stripe replayed a 5xx it stored under the request's idempotency key.

    Stripe saves the first answer once execution has begun, a 500 included,
    and replays it for every request with that key until it prunes the key
    (after 24 hours at the earliest). Transient like any 5xx, but repeating
    the same key cannot cure it; whether the failed request changed anything
    is not known (Stripe calls a 500's outcome indeterminate).
    """


def idempotency_key(*parts: str) -> str:
    """Join *parts* into one key of at most 255 characters, deterministically.

    Longer keys keep a readable head and end in a hash of the whole, so the
    same parts always give the same key.
    """
    key = ":".join(parts)
    if len(key) <= _MAX_KEY:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{key[: _MAX_KEY - len(digest) - 1]}~{digest}"


class StripeApi(Protocol):
    """The calls the billing connector makes; `StripeClient` implements them."""

    async def find_customer_by_metadata(
        self, key: str, value: str, *, created_since: int | None = None
    ) -> Customer | None:
        """The first customer whose ``metadata[key]`` is *value*, if any.

        With *created_since* (unix seconds), customers created since then
        are listed too, which search may not see yet.
        """
        ...

    async def find_subscription_by_metadata(
        self, customer_id: str, key: str, value: str
    ) -> Subscription | None:
        """The customer's subscription whose ``metadata[key]`` is *value*, if any."""
        ...

    async def create_customer(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Customer:
        """``POST /v1/customers``."""
        ...

    async def update_customer(
        self, customer_id: str, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Customer:
        """``POST /v1/customers/{id}``."""
        ...

    async def retrieve_product(self, product_id: str) -> Product | None:
        """``GET /v1/products/{id}``; None when it does not exist."""
        ...

    async def create_product(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Product:
        """``POST /v1/products``."""
        ...

    async def create_subscription(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Subscription:
        """``POST /v1/subscriptions``."""
        ...


class StripeClient(SessionClient):
    """Typed calls to Stripe's v1 API on one session.

    Use as ``async with StripeClient(settings) as stripe: ...`` or call
    `aclose`. A session passed in is borrowed, not closed.
    """

    def __init__(
        self,
        settings: StripeSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        system: str = "billing",
    ) -> None:
        self.settings = settings
        self.system = system
        super().__init__(session)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._base = settings.base_url.rstrip("/")

    # --- customers ---------------------------------------------------------------

    async def create_customer(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Customer:
        """``POST /v1/customers`` (``name``, ``email``, ``metadata``…)."""
        return await self.post("/v1/customers", params, idempotency_key, Customer)

    async def update_customer(
        self, customer_id: str, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Customer:
        """``POST /v1/customers/{id}``; metadata keys merge, ``""`` unsets one."""
        path = f"/v1/customers/{customer_id}"
        return await self.post(path, params, idempotency_key, Customer)

    async def retrieve_customer(self, customer_id: str) -> Customer:
        """``GET /v1/customers/{id}``."""
        return await self.get(f"/v1/customers/{customer_id}", {}, Customer)

    async def search_customers(
        self, query: str, *, limit: int = 10
    ) -> SearchResult[Customer]:
        """``GET /v1/customers/search`` with Stripe's search query language.

        Stripe's search index trails writes (up to a minute): a customer
        created moments ago may not be found yet.
        """
        params: dict[str, FormValue] = {"query": query, "limit": limit}
        return await self.get("/v1/customers/search", params, SearchResult[Customer])

    async def find_customer_by_metadata(
        self,
        key: str,
        value: str,
        *,
        created_since: int | None = None,
        page_size: int = _PAGE_SIZE,
    ) -> Customer | None:
        """The first customer whose ``metadata[key]`` is *value*, if any.

        Search first. Search trails writes, so with *created_since* (unix
        seconds) the customers created since then are also listed
        (``GET /v1/customers?created[gte]=…``, read from the objects
        themselves) and checked one by one.
        """
        quoted = value.replace("\\", "\\\\").replace("'", "\\'")
        page = await self.search_customers(f"metadata['{key}']:'{quoted}'", limit=1)
        if page.data:
            return page.data[0]
        if created_since is None:
            return None
        return await self._first_listed(
            "/v1/customers",
            {"created": {"gte": created_since}},
            StripeList[Customer],
            lambda customer: customer.metadata.get(key) == value,
            page_size,
        )

    # --- catalogue ---------------------------------------------------------------

    async def create_product(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Product:
        """``POST /v1/products`` (a caller-chosen ``id`` is allowed)."""
        return await self.post("/v1/products", params, idempotency_key, Product)

    async def retrieve_product(self, product_id: str) -> Product | None:
        """``GET /v1/products/{id}``; None when Stripe has no such product."""
        try:
            return await self.get(f"/v1/products/{product_id}", {}, Product)
        except UpstreamRejected as exc:
            if exc.code == "resource_missing":
                return None
            raise

    async def create_price(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Price:
        """``POST /v1/prices``."""
        return await self.post("/v1/prices", params, idempotency_key, Price)

    # --- subscriptions and invoices ----------------------------------------------

    async def create_subscription(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Subscription:
        """``POST /v1/subscriptions`` (``customer``, ``items[i][price_data]``…)."""
        return await self.post(
            "/v1/subscriptions", params, idempotency_key, Subscription
        )

    async def find_subscription_by_metadata(
        self, customer_id: str, key: str, value: str, *, page_size: int = _PAGE_SIZE
    ) -> Subscription | None:
        """The customer's subscription whose ``metadata[key]`` is *value*, if any.

        Pages through ``GET /v1/subscriptions?customer=…&status=all`` (every
        status, canceled ones too): a list reads the objects themselves, so
        a subscription created a moment ago is there, unlike in search.
        """
        return await self._first_listed(
            "/v1/subscriptions",
            {"customer": customer_id, "status": "all"},
            StripeList[Subscription],
            lambda subscription: subscription.metadata.get(key) == value,
            page_size,
        )

    async def retrieve_subscription(self, subscription_id: str) -> Subscription:
        """``GET /v1/subscriptions/{id}``."""
        return await self.get(f"/v1/subscriptions/{subscription_id}", {}, Subscription)

    async def create_invoice_item(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> InvoiceItem:
        """``POST /v1/invoiceitems``."""
        return await self.post("/v1/invoiceitems", params, idempotency_key, InvoiceItem)

    async def create_invoice(
        self, *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Invoice:
        """``POST /v1/invoices`` (a draft)."""
        return await self.post("/v1/invoices", params, idempotency_key, Invoice)

    async def finalize_invoice(
        self, invoice_id: str, *, idempotency_key: str
    ) -> Invoice:
        """``POST /v1/invoices/{id}/finalize``."""
        path = f"/v1/invoices/{invoice_id}/finalize"
        return await self.post(path, {}, idempotency_key, Invoice)

    async def pay_invoice(self, invoice_id: str, *, idempotency_key: str) -> Invoice:
        """``POST /v1/invoices/{id}/pay``."""
        return await self.post(
            f"/v1/invoices/{invoice_id}/pay", {}, idempotency_key, Invoice
        )

    async def retrieve_invoice(self, invoice_id: str) -> Invoice:
        """``GET /v1/invoices/{id}``."""
        return await self.get(f"/v1/invoices/{invoice_id}", {}, Invoice)

    async def retrieve_event(self, event_id: str) -> Event:
        """``GET /v1/events/{id}``: the event as Stripe has it now."""
        return await self.get(f"/v1/events/{event_id}", {}, Event)

    # --- transport -----------------------------------------------------------------

    async def post(
        self,
        path: str,
        params: Mapping[str, FormValue],
        idempotency_key: str,
        into: type[T],
    ) -> T:
        """Form-encoded POST with an ``Idempotency-Key``; decode the answer *into*.

        Raises:
            ReplayedServerError: Stripe replayed a 5xx stored under the key.
            UpstreamUnavailable: retry later (429, 5xx, key in use, API key
                refused, network).
            UpstreamRejected: Stripe refused the request (other 4xx).
            ValueError: *idempotency_key* is empty.
        """
        if not idempotency_key:
            raise ValueError("every Stripe POST needs an idempotency key")
        headers = {
            "Content-Type": FORM_CONTENT_TYPE,
            "Idempotency-Key": _bounded(idempotency_key),
        }
        body = encode_form(params).encode()
        return await self._call("POST", path, into, data=body, headers=headers)

    async def get(self, path: str, params: Mapping[str, FormValue], into: type[T]) -> T:
        """GET with form-encoded query parameters; decode the answer *into*.

        Raises:
            UpstreamUnavailable: retry later (429, 5xx, API key refused,
                network).
            UpstreamRejected: Stripe refused the request (other 4xx).
        """
        query = encode_form(params)
        return await self._call("GET", f"{path}?{query}" if query else path, into)

    async def _first_listed(
        self,
        path: str,
        params: Mapping[str, FormValue],
        into: type[StripeList[L]],
        match: Callable[[L], bool],
        page_size: int,
    ) -> L | None:
        """The first object of a Stripe list (newest first) that *match*es."""
        query: dict[str, FormValue] = {**params, "limit": page_size}
        while True:
            page = await self.get(path, query, into)
            for obj in page.data:
                if match(obj):
                    return obj
            if not page.has_more or not page.data:
                return None
            query["starting_after"] = page.data[-1].id

    async def _call(
        self,
        method: str,
        path: str,
        into: type[T],
        *,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> T:
        url = f"{self._base}{path}"
        what = f"{method} {path.split('?')[0]}"
        all_headers = {
            "Authorization": f"Bearer {self.settings.api_key}",
            "Stripe-Version": self.settings.api_version,
            "User-Agent": "q2c-broker",
            **(headers or {}),
        }
        try:
            async with self._session.request(
                method, url, data=data, headers=all_headers, timeout=self._timeout
            ) as resp:
                body = await read_bounded(resp)
                status, replayed = resp.status, "Idempotent-Replayed" in resp.headers
                retry_after = retry_after_s(resp.headers.get("Retry-After"))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamUnavailable(
                self.system, f"{what}: {type(exc).__name__}: {exc}"
            ) from exc
        if status < 300:
            try:
                return msgspec.json.decode(body, type=into)
            except (
                msgspec.DecodeError,
                msgspec.ValidationError,
                RecursionError,
            ) as exc:
                raise UpstreamRejected(
                    self.system,
                    f"{what}: unreadable answer: {exc}",
                    code="invalid_response",
                ) from exc
        raise self._failure(what, status, body, retry_after, replayed)

    def _failure(
        self,
        what: str,
        status: int,
        body: bytes,
        retry_after: float | None,
        replayed: bool,
    ) -> UpstreamUnavailable | UpstreamRejected:
        if status in _KEY_REFUSED:
            detail = f"{what}: HTTP {status}: {_KEY_REFUSED[status]}"
            return UpstreamUnavailable(self.system, detail, retry_after_s=retry_after)
        try:
            error = msgspec.json.decode(body, type=ErrorBody).error
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            error = None
        code = (error.code or error.type) if error is not None else f"http_{status}"
        detail = f"{what}: HTTP {status} {code}"
        if error is not None and error.message:
            detail += f": {error.message}"
        if error is not None and error.param:
            detail += f" (param {error.param})"
        if replayed:
            detail += " [replayed: Stripe stored this answer under the idempotency key]"
        if replayed and status >= 500:
            return ReplayedServerError(self.system, detail, retry_after_s=retry_after)
        if status == 429 or status >= 500 or code == "idempotency_key_in_use":
            return UpstreamUnavailable(self.system, detail, retry_after_s=retry_after)
        return UpstreamRejected(self.system, detail, code=code)


def _bounded(key: str) -> str:
    return key if len(key) <= _MAX_KEY else idempotency_key(key)
