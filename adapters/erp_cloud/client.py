"""A typed async client for SAP S/4HANA Cloud's OData V2 APIs.

`SapClient` speaks ``API_SALES_ORDER_SRV``, ``API_BUSINESS_PARTNER`` and
``API_PRODUCT_SRV`` as a communication user (HTTP Basic). Modifying calls
need SAP's CSRF handshake: the first one fetches a token (``HEAD`` on the
service root with ``X-CSRF-Token: Fetch``); the token is bound to the session
cookie SAP sets, which the client's cookie jar keeps. When SAP drops the
session and answers 403 ``x-csrf-token: Required``, the client fetches a new
token and repeats the call once.

Errors are translated here and nowhere else: 429, 5xx, timeouts and
connection failures raise `UpstreamUnavailable` (with ``Retry-After`` when
given); a stale ``If-Match`` (412) raises `ConcurrencyConflict` (read again,
then retry); other refusals raise `SapRejected`, an `UpstreamRejected` with
SAP's T100 code (``V1/302``) and the ``errordetails``. Warnings on a success
arrive in the ``sap-message`` header and are returned as `SapNotice` values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Annotated, Any, Final, Protocol, Self, TypeVar, cast

import aiohttp
import msgspec
from msgspec import Meta
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from adapters.erp_cloud import edm
from adapters.erp_cloud.views import (
    A_BusinessPartner,
    A_BusinessPartnerAddress,
    A_BusinessPartnerTaxNumber,
    A_CustomerSalesArea,
    A_Product,
    A_SalesOrder,
    Collection,
    Entity,
    ErrorDetail,
    ODataError,
    SapNotice,
    Single,
)
from adapters.session import read_bounded, retry_after_s
from broker.config import Section
from broker.errors import (
    ConcurrencyConflict,
    UpstreamRejected,
    UpstreamUnavailable,
)

__all__ = [
    "SapApi",
    "SapSettings",
    "SapClient",
    "SapRejected",
    "SALES_ORDER_SERVICE",
    "BUSINESS_PARTNER_SERVICE",
    "PRODUCT_SERVICE",
    "MAX_PAGES",
]

T = TypeVar("T")
_E = TypeVar("_E", bound=Entity)

SALES_ORDER_SERVICE: Final = "API_SALES_ORDER_SRV"
BUSINESS_PARTNER_SERVICE: Final = "API_BUSINESS_PARTNER"
PRODUCT_SERVICE: Final = "API_PRODUCT_SRV"
_ROOT = "/sap/opu/odata/sap"
#: The most pages `SapClient.list_products` follows (1,000 rows a page at
#: SAP's usual size: ten million products).
MAX_PAGES: Final = 10_000
_NOTICE = msgspec.json.Decoder(SapNotice | list[SapNotice])
#: What a partner is read with: its customer and sales areas, addresses, tax numbers.
_PARTNER_EXPAND = ",".join(
    (
        "to_Customer",
        "to_Customer/to_CustomerSalesArea",
        "to_BusinessPartnerAddress",
        "to_BusinessPartnerTax",
    )
)


class SapSettings(Section, frozen=True):
    """``[systems.<name>]`` for an S/4HANA Cloud tenant.

    Attributes:
        base_url: the tenant's API host (``https://my000000-api.s4hana.cloud.sap``);
            the services live under ``/sap/opu/odata/sap/``.
        username: the communication user of the communication arrangement.
        password: its password (from the environment, never a file in the
            repository).
        sap_client: sent as the ``sap-client`` query parameter when set
            (on-premise and private cloud systems with several clients).
        timeout_s: per request.
        system: the name in errors (``erp_cloud``).
    """

    base_url: Annotated[str, Meta(pattern=r"^https?://")]
    username: Annotated[str, Meta(min_length=1)]
    password: str = ""
    sap_client: Annotated[str, Meta(pattern=r"^\d{3}\Z")] | None = None
    timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    system: str = "erp_cloud"

    def __repr__(self) -> str:
        return (
            f"SapSettings(base_url={self.base_url!r}, username={self.username!r}, "
            f"password={'***' if self.password else ''!r}, system={self.system!r})"
        )


class SapRejected(UpstreamRejected):
    """SAP refused the request: its T100 ``code`` and the ``errordetails``.

    Attributes:
        status: the HTTP status (400 for validation errors).
        details: SAP's ``innererror.errordetails``, one per problem.
    """

    def __init__(
        self,
        system: str,
        detail: str,
        *,
        code: str,
        status: int,
        details: Sequence[ErrorDetail] = (),
    ) -> None:
        super().__init__(system, detail, code=code)
        self.status = status
        self.details = tuple(details)


class SapApi(Protocol):
    """What the connector needs from SAP; `SapClient` implements it."""

    async def find_orders(
        self, sold_to: str, po_ref: str, *, top: int = 50
    ) -> tuple[A_SalesOrder, ...]:
        """Orders of *sold_to* with customer reference *po_ref*."""
        ...

    async def create_order(
        self, order: A_SalesOrder
    ) -> tuple[A_SalesOrder, tuple[SapNotice, ...]]:
        """Deep-insert an order; the created order and SAP's warnings."""
        ...

    async def find_business_partners(
        self, search_term: str
    ) -> tuple[A_BusinessPartner, ...]:
        """Partners by ``SearchTerm1``, with customer and sales areas."""
        ...

    async def create_business_partner(
        self, partner: A_BusinessPartner
    ) -> A_BusinessPartner:
        """Deep-insert a partner."""
        ...

    async def update_business_partner(
        self, partner: str, changes: A_BusinessPartner, *, etag: str
    ) -> str:
        """PATCH a partner; the new ETag."""
        ...

    async def create_sales_area(self, area: A_CustomerSalesArea) -> A_CustomerSalesArea:
        """Extend a customer to a sales area."""
        ...

    async def create_partner_address(
        self, address: A_BusinessPartnerAddress
    ) -> A_BusinessPartnerAddress:
        """Add an address to a partner; SAP numbers it."""
        ...

    async def update_partner_address(
        self,
        partner: str,
        address_id: str,
        changes: A_BusinessPartnerAddress,
        *,
        etag: str,
    ) -> str:
        """PATCH one address of a partner; the new ETag."""
        ...

    async def create_tax_number(
        self, tax: A_BusinessPartnerTaxNumber
    ) -> A_BusinessPartnerTaxNumber:
        """Add a tax number to a partner."""
        ...

    async def update_tax_number(
        self,
        partner: str,
        tax_type: str,
        changes: A_BusinessPartnerTaxNumber,
        *,
        etag: str,
    ) -> str:
        """PATCH a partner's tax number of one category; the new ETag."""
        ...


class _Reply(msgspec.Struct, frozen=True):
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


class SapClient:
    """Calls SAP on one `aiohttp.ClientSession`; close it with `aclose`.

    The session's cookie jar keeps SAP's session cookie, to which the CSRF
    token is bound; it accepts cookies from IP-address hosts too, as a
    sandbox on 127.0.0.1 needs. *trace_configs* go to that session (the
    daemon counts requests with one).
    """

    def __init__(
        self,
        settings: SapSettings,
        *,
        trace_configs: Sequence[aiohttp.TraceConfig] = (),
    ) -> None:
        self._settings = settings
        self._trace_configs = list(trace_configs)
        self._system = settings.system
        self._root = settings.base_url.rstrip("/") + _ROOT
        self._authorization = aiohttp.encode_basic_auth(
            settings.username, settings.password
        )
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None

    def __repr__(self) -> str:
        state = "token" if self._token else "no token"
        return f"<SapClient {self._system} {self._settings.base_url} {state}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP session (a later call opens a new one)."""
        if self._session is not None:
            session, self._session = self._session, None
            self._token = None
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        # Opened on first use, inside the event loop that will run it.
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.CookieJar(unsafe=True),
                timeout=aiohttp.ClientTimeout(total=self._settings.timeout_s),
                trace_configs=self._trace_configs,
            )
        return self._session

    # -- sales orders ------------------------------------------------------------

    async def find_orders(
        self, sold_to: str, po_ref: str, *, top: int = 50
    ) -> tuple[A_SalesOrder, ...]:
        """The orders of *sold_to* with customer reference *po_ref* (oldest first).

        The read that makes a create safe to repeat: SAP has no idempotency
        key, so the caller looks for its own reference before creating.
        """
        flt = (
            f"SoldToParty eq {edm.odata_literal(sold_to)} and "
            f"PurchaseOrderByCustomer eq {edm.odata_literal(po_ref)}"
        )
        params = {"$filter": flt, "$top": str(top)}
        reply = await self._call("GET", SALES_ORDER_SERVICE, "/A_SalesOrder", params)
        return self._decode(reply, Collection[A_SalesOrder]).d.results

    async def get_order(self, sales_order: str) -> tuple[A_SalesOrder, str | None]:
        """One order with its items, and its ETag for a later `update_order`."""
        path = f"/A_SalesOrder({edm.odata_literal(sales_order)})"
        params = {"$expand": "to_Item,to_Item/to_PricingElement,to_Partner"}
        reply = await self._call("GET", SALES_ORDER_SERVICE, path, params)
        order = self._decode(reply, Single[A_SalesOrder]).d
        return order, reply.headers.get("ETag") or _etag_of(order)

    async def create_order(
        self, order: A_SalesOrder
    ) -> tuple[A_SalesOrder, tuple[SapNotice, ...]]:
        """Deep-insert *order* (header with items, partners, conditions).

        Returns:
            The created order as SAP returned it, and the warnings SAP
            attached (a repeated customer reference is one).

        Raises:
            SapRejected: a validation error (400) or another refusal.
            UpstreamUnavailable: SAP is down, slow or rate-limiting.
        """
        reply = await self._call(
            "POST",
            SALES_ORDER_SERVICE,
            "/A_SalesOrder",
            body=edm.encode(msgspec.structs.replace(order, metadata=None)),
        )
        return self._decode(reply, Single[A_SalesOrder]).d, _notices(reply)

    async def update_order(
        self, sales_order: str, changes: A_SalesOrder, *, etag: str
    ) -> str:
        """PATCH the header fields set in *changes*; returns the new ETag.

        Raises:
            ConcurrencyConflict: *etag* is stale: the order changed since read.
        """
        path = f"/A_SalesOrder({edm.odata_literal(sales_order)})"
        reply = await self._call(
            "PATCH",
            SALES_ORDER_SERVICE,
            path,
            body=edm.encode(changes),
            headers={"If-Match": etag},
        )
        return reply.headers.get("ETag", "")

    # -- business partners -------------------------------------------------------

    async def find_business_partners(
        self, search_term: str
    ) -> tuple[A_BusinessPartner, ...]:
        """Partners whose ``SearchTerm1`` is *search_term*.

        Each with its customer and sales areas, its addresses and its tax
        numbers, every one with its own ETag.
        """
        params = {
            "$filter": f"SearchTerm1 eq {edm.odata_literal(search_term.upper())}",
            "$expand": _PARTNER_EXPAND,
        }
        reply = await self._call(
            "GET", BUSINESS_PARTNER_SERVICE, "/A_BusinessPartner", params
        )
        return self._decode(reply, Collection[A_BusinessPartner]).d.results

    async def get_business_partner(
        self, partner: str
    ) -> tuple[A_BusinessPartner, str | None]:
        """One partner (expanded as `find_business_partners`), and its ETag."""
        path = f"/A_BusinessPartner({edm.odata_literal(partner)})"
        params = {"$expand": _PARTNER_EXPAND}
        reply = await self._call("GET", BUSINESS_PARTNER_SERVICE, path, params)
        found = self._decode(reply, Single[A_BusinessPartner]).d
        return found, reply.headers.get("ETag") or _etag_of(found)

    async def create_business_partner(
        self, partner: A_BusinessPartner
    ) -> A_BusinessPartner:
        """Deep-insert a partner (with roles, customer and sales areas)."""
        reply = await self._call(
            "POST",
            BUSINESS_PARTNER_SERVICE,
            "/A_BusinessPartner",
            body=edm.encode(partner),
        )
        return self._decode(reply, Single[A_BusinessPartner]).d

    async def update_business_partner(
        self, partner: str, changes: A_BusinessPartner, *, etag: str
    ) -> str:
        """PATCH the fields set in *changes*; returns the new ETag.

        Raises:
            ConcurrencyConflict: *etag* is stale.
        """
        path = f"/A_BusinessPartner({edm.odata_literal(partner)})"
        return await self._patch_bp(path, changes, etag)

    async def create_sales_area(self, area: A_CustomerSalesArea) -> A_CustomerSalesArea:
        """Extend a customer to one more sales area."""
        reply = await self._call(
            "POST",
            BUSINESS_PARTNER_SERVICE,
            "/A_CustomerSalesArea",
            body=edm.encode(area),
        )
        return self._decode(reply, Single[A_CustomerSalesArea]).d

    async def create_partner_address(
        self, address: A_BusinessPartnerAddress
    ) -> A_BusinessPartnerAddress:
        """Add *address* to the partner it names; SAP assigns the ``AddressID``.

        Raises:
            SapRejected: an unknown partner or an invalid address (400).
        """
        return await self._create_bp("/A_BusinessPartnerAddress", address)

    async def update_partner_address(
        self,
        partner: str,
        address_id: str,
        changes: A_BusinessPartnerAddress,
        *,
        etag: str,
    ) -> str:
        """PATCH the fields set in *changes* on one address; returns the new ETag.

        Raises:
            ConcurrencyConflict: *etag* is stale.
        """
        key = _key(BusinessPartner=partner, AddressID=address_id)
        path = f"/A_BusinessPartnerAddress{key}"
        return await self._patch_bp(path, changes, etag)

    async def create_tax_number(
        self, tax: A_BusinessPartnerTaxNumber
    ) -> A_BusinessPartnerTaxNumber:
        """Add *tax* to the partner it names.

        Raises:
            SapRejected: an unknown partner, or it has a number of that
                category already (400).
        """
        return await self._create_bp("/A_BusinessPartnerTaxNumber", tax)

    async def update_tax_number(
        self,
        partner: str,
        tax_type: str,
        changes: A_BusinessPartnerTaxNumber,
        *,
        etag: str,
    ) -> str:
        """PATCH the partner's tax number of category *tax_type*; the new ETag.

        Raises:
            ConcurrencyConflict: *etag* is stale.
        """
        key = _key(BusinessPartner=partner, BPTaxType=tax_type)
        path = f"/A_BusinessPartnerTaxNumber{key}"
        return await self._patch_bp(path, changes, etag)

    async def _create_bp(self, path: str, entity: _E) -> _E:
        """POST an ``API_BUSINESS_PARTNER`` entity (metadata dropped); SAP's copy."""
        reply = await self._call(
            "POST",
            BUSINESS_PARTNER_SERVICE,
            path,
            body=edm.encode(msgspec.structs.replace(entity, metadata=None)),
        )
        answer = cast("type[Single[_E]]", Single[type(entity)])  # type: ignore[misc]
        return self._decode(reply, answer).d

    async def _patch_bp(self, path: str, changes: msgspec.Struct, etag: str) -> str:
        """PATCH an ``API_BUSINESS_PARTNER`` entity with ``If-Match``; its new ETag."""
        reply = await self._call(
            "PATCH",
            BUSINESS_PARTNER_SERVICE,
            path,
            body=edm.encode(changes),
            headers={"If-Match": etag},
        )
        return reply.headers.get("ETag", "")

    # -- products ----------------------------------------------------------------

    async def list_products(
        self, *, product_group: str | None = None, top: int | None = None
    ) -> tuple[A_Product, ...]:
        """Products with their list price and floor, optionally of one group.

        Every page: SAP Gateway answers a large read a page at a time, with a
        ``__next`` link to the rest, which is followed (at most `MAX_PAGES`).

        Raises:
            UpstreamUnavailable: the links do not advance, or there are more
                than `MAX_PAGES` of them.
        """
        params: dict[str, str] = {}
        if product_group is not None:
            params["$filter"] = f"ProductGroup eq {edm.odata_literal(product_group)}"
        if top is not None:
            params["$top"] = str(top)
        products: list[A_Product] = []
        for _ in range(MAX_PAGES):
            reply = await self._call("GET", PRODUCT_SERVICE, "/A_Product", params)
            page = self._decode(reply, Collection[A_Product]).d
            products.extend(page.results)
            if page.next is None or not page.results:
                return tuple(products)
            following = {
                k: v for k, v in URL(page.next).query.items() if k.startswith("$")
            }
            if following == params:
                raise UpstreamUnavailable(
                    self._system,
                    f"the product list's next link does not advance: {page.next[:200]}",
                )
            params = following
        raise UpstreamUnavailable(
            self._system, f"the product list runs to more than {MAX_PAGES} pages"
        )

    # -- the wire ----------------------------------------------------------------

    async def _call(
        self,
        method: str,
        service: str,
        path: str,
        params: Mapping[str, str] | None = None,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> _Reply:
        writing = method not in ("GET", "HEAD")
        for attempt in (1, 2):
            sent = CIMultiDict({"Accept": "application/json", **(headers or {})})
            if writing:
                if self._token is None:
                    self._token = await self._fetch_token(service)
                sent["X-CSRF-Token"] = self._token
                sent["Content-Type"] = "application/json"
            reply = await self._send(method, service, path, params, body, sent)
            if (
                writing
                and attempt == 1
                and reply.status == 403
                and reply.headers.get("x-csrf-token", "").lower() == "required"
            ):
                # The session (and its token) expired: fetch anew, once.
                self._token = None
                continue
            self._raise_for(method, path, reply)
            return reply
        raise UpstreamUnavailable(
            self._system, f"{method} {path}: CSRF token refused again after a refetch"
        )

    async def _fetch_token(self, service: str) -> str:
        headers = CIMultiDict({"X-CSRF-Token": "Fetch", "Accept": "application/json"})
        reply = await self._send("HEAD", service, "/", None, None, headers)
        self._raise_for("HEAD", "/ (CSRF token fetch)", reply)
        token = reply.headers.get("x-csrf-token", "")
        if not token or token.lower() == "required":
            raise UpstreamUnavailable(
                self._system, f"{service} returned no CSRF token on fetch"
            )
        return token

    async def _send(
        self,
        method: str,
        service: str,
        path: str,
        params: Mapping[str, str] | None,
        body: bytes | None,
        headers: CIMultiDict[str],
    ) -> _Reply:
        query = dict(params or {})
        if self._settings.sap_client:
            query["sap-client"] = self._settings.sap_client
        url = f"{self._root}/{service}{path}"
        headers["Authorization"] = self._authorization
        try:
            async with self._http().request(
                method, url, params=query, data=body, headers=headers
            ) as response:
                data = await read_bounded(response)
                return _Reply(response.status, response.headers, data)
        except TimeoutError as exc:
            raise UpstreamUnavailable(
                self._system,
                f"{method} {service}{path} timed out after "
                f"{self._settings.timeout_s:g} s",
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                self._system, f"{method} {service}{path}: {type(exc).__name__}: {exc}"
            ) from exc

    def _raise_for(self, method: str, path: str, reply: _Reply) -> None:
        status = reply.status
        if 200 <= status < 300:
            return
        where = f"{method} {path}"
        error = _error_of(reply.body)
        said = (
            f"{error.error.code}: {error.error.message.value}"
            if error is not None
            else reply.body[:200].decode("utf-8", "replace").strip()
        )
        if status == 429 or status >= 500:
            raise UpstreamUnavailable(
                self._system,
                f"{where} answered {status}: {said}",
                retry_after_s=retry_after_s(reply.headers.get("Retry-After")),
            )
        if status == 412:
            raise ConcurrencyConflict(
                f"{self._system}: {where} answered 412: the entity changed since "
                "it was read; read it again for a fresh ETag"
            )
        if (
            status == 403
            and reply.headers.get("x-csrf-token", "").lower() == "required"
        ):
            raise UpstreamUnavailable(
                self._system, f"{where}: CSRF token refused ({said})"
            )
        inner = error.error.innererror if error is not None else None
        details = inner.errordetails if inner is not None else ()
        extra = "; ".join(d.message for d in details if d.message not in said)
        raise SapRejected(
            self._system,
            f"{where} answered {status}: {said}" + (f" ({extra})" if extra else ""),
            code=error.error.code if error is not None else f"HTTP{status}",
            status=status,
            details=details,
        )

    def _decode(self, reply: _Reply, type_: type[T]) -> T:
        try:
            return edm.decode(reply.body, type_)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
            # A proxy's error page with status 200 looks like this; it passes.
            raise UpstreamUnavailable(
                self._system, f"unreadable answer ({reply.status}): {exc}"
            ) from exc


def _error_of(body: bytes) -> ODataError | None:
    try:
        return edm.decode(body, ODataError)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


def _notices(reply: _Reply) -> tuple[SapNotice, ...]:
    """Every message of the ``sap-message`` headers, flattened."""
    found: list[SapNotice] = []
    for value in reply.headers.getall("sap-message", ()):
        try:
            decoded = _NOTICE.decode(value.encode())
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            # Still a message SAP meant the caller to see: keep its text.
            found.append(SapNotice(message=value, severity="warning"))
            continue
        for notice in decoded if isinstance(decoded, list) else [decoded]:
            found.extend(notice.flatten())
    return tuple(found)


def _key(**values: str) -> str:
    """A compound key predicate: ``(A='1',B='x')``."""
    pairs = ",".join(f"{k}={edm.odata_literal(v)}" for k, v in values.items())
    return f"({pairs})"


def _etag_of(entity: Any) -> str | None:
    metadata = getattr(entity, "metadata", None)
    return metadata.etag if metadata is not None else None
