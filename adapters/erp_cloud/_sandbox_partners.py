"""The sandbox's master data: business partners, customers, sales areas, products.

Internal: used by `adapters.erp_cloud.sandbox` only. Serves
``API_BUSINESS_PARTNER`` (``A_BusinessPartner`` with its roles, addresses,
tax numbers and customer, ``A_Customer``, ``A_CustomerSalesArea``; the
addresses and tax numbers live in `PartnerDetails`) and the sandbox's
``API_PRODUCT_SRV`` (``A_Product``), and answers the order book's questions:
does this sold-to exist in that sales area, what does a product cost.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar

import msgspec
from aiohttp import web

from adapters.erp_cloud import _odata as od
from adapters.erp_cloud._sandbox_partner_details import (
    ADDRESS,
    TAX_NUMBER,
    PartnerDetails,
)
from adapters.erp_cloud.edm import EdmDateTime
from adapters.erp_cloud.views import (
    A_BusinessPartner,
    A_BusinessPartnerRole,
    A_Customer,
    A_CustomerSalesArea,
    A_Product,
    Navigation,
    expanded,
)

if TYPE_CHECKING:
    from adapters.erp_cloud.sandbox import Counters

__all__ = [
    "PartnerBook",
    "area_key",
    "PARTNER",
    "CUSTOMER",
    "SALES_AREA",
    "PRODUCT",
]

T = TypeVar("T")
_BP = "API_BUSINESS_PARTNER"

SALES_AREA = od.EntitySpec(
    set_name="A_CustomerSalesArea",
    type_name=f"{_BP}.A_CustomerSalesAreaType",
    keys=("Customer", "SalesOrganization", "DistributionChannel", "Division"),
    view=A_CustomerSalesArea,
)
CUSTOMER = od.EntitySpec(
    set_name="A_Customer",
    type_name=f"{_BP}.A_CustomerType",
    keys=("Customer",),
    view=A_Customer,
    many={"to_CustomerSalesArea": SALES_AREA},
)
PARTNER = od.EntitySpec(
    set_name="A_BusinessPartner",
    type_name=f"{_BP}.A_BusinessPartnerType",
    keys=("BusinessPartner",),
    view=A_BusinessPartner,
    many={
        "to_BusinessPartnerRole": od.EntitySpec(
            set_name="A_BusinessPartnerRole",
            type_name=f"{_BP}.A_BusinessPartnerRoleType",
            keys=("BusinessPartner", "BusinessPartnerRole"),
            view=A_BusinessPartnerRole,
        ),
        "to_BusinessPartnerAddress": ADDRESS,
        "to_BusinessPartnerTax": TAX_NUMBER,
    },
    one={"to_Customer": CUSTOMER},
)
PRODUCT = od.EntitySpec(
    set_name="A_Product",
    type_name="API_PRODUCT_SRV.A_ProductType",
    keys=("Product",),
    view=A_Product,
)

_UPDATABLE = frozenset(
    {
        "OrganizationBPName1",
        "SearchTerm1",
        "SearchTerm2",
        "CorrespondenceLanguage",
        "BusinessPartnerIsBlocked",
        "BusinessPartnerGrouping",
    }
)
_CREATED_EXPAND = frozenset(
    {
        "to_BusinessPartnerRole",
        "to_BusinessPartnerAddress",
        "to_BusinessPartnerTax",
        "to_Customer",
        "to_Customer/to_CustomerSalesArea",
    }
)

AreaKey = tuple[str, str, str, str]


def area_key(area: A_CustomerSalesArea) -> AreaKey:
    """``(Customer, SalesOrganization, DistributionChannel, Division)``."""
    return (
        area.Customer or "",
        area.SalesOrganization,
        area.DistributionChannel,
        area.Division,
    )


class PartnerBook:
    """Business partners (with their customer data) and products, in memory."""

    def __init__(self, *, counters: Counters, clock: od.Clock, first: int = 0) -> None:
        self._counters = counters
        self._clock = clock
        self.partners: dict[str, od.Record[A_BusinessPartner]] = {}
        self.customers: dict[str, A_Customer] = {}
        self.products: dict[str, A_Product] = {}
        self.details = PartnerDetails(
            counters=counters, clock=clock, exists=self.partners.__contains__
        )
        self._next = first + 1_000_001

    def seed_products(self, products: Iterable[A_Product]) -> None:
        """Add (or replace) products."""
        for product in products:
            self.products[product.Product] = product

    def seed_customer(
        self,
        customer: str,
        *,
        name: str,
        sales_areas: Iterable[A_CustomerSalesArea],
        search_term: str | None = None,
    ) -> None:
        """Add a business partner that is a customer in *sales_areas*."""
        partner = A_BusinessPartner(
            BusinessPartnerCategory="2",
            OrganizationBPName1=name,
            SearchTerm1=search_term,
            to_BusinessPartnerRole=(
                A_BusinessPartnerRole(BusinessPartnerRole="FLCU01"),
            ),
            to_Customer=A_Customer(to_CustomerSalesArea=tuple(sales_areas)),
        )
        self._store(partner, od.alpha(customer))

    def sales_area(
        self, customer: str, organization: str, channel: str, division: str
    ) -> A_CustomerSalesArea | None:
        """The customer's data in one sales area, if it is defined there."""
        found = self.customers.get(od.alpha(customer))
        if found is None:
            return None
        wanted = (organization, channel, division)
        for area in expanded(found.to_CustomerSalesArea):
            if area_key(area)[1:] == wanted:
                return area
        return None

    async def route(
        self,
        request: web.Request,
        *,
        entity_set: str,
        key: str | None,
        method: str,
        base: str,
    ) -> web.StreamResponse | None:
        """Answer a request for one of this book's entity sets; None if not one."""
        reading = method in ("GET", "HEAD")
        match (entity_set, key is None):
            case ("A_BusinessPartner", True) if method == "POST":
                return await self._create(request, base)
            case ("A_BusinessPartner", True) if reading:
                return od.read_many(
                    request, base, PARTNER, self.partners, finish=self._joined
                )
            case ("A_BusinessPartner", False) if method == "PATCH":
                return await self._patch(request, self._find(self.partners, key))
            case ("A_BusinessPartner", False) if reading:
                found = self._joined(self._find(self.partners, key))
                return od.read_one(request, base, PARTNER, found)
            case ("A_Customer", True) if reading:
                return od.read_many(request, base, CUSTOMER, self.customers)
            case ("A_Customer", False) if reading:
                found_customer = self._find(self.customers, key)
                return od.read_one(request, base, CUSTOMER, found_customer)
            case ("A_CustomerSalesArea", True) if method == "POST":
                return await self._create_sales_area(request, base)
            case ("A_CustomerSalesArea", True) if reading:
                areas = {
                    "/".join(area_key(a)): a
                    for c in self.customers.values()
                    for a in expanded(c.to_CustomerSalesArea)
                }
                return od.read_many(request, base, SALES_AREA, areas)
            case ("A_Product", True) if reading:
                return od.read_many(request, base, PRODUCT, self.products)
            case ("A_Product", False) if reading:
                assert key is not None
                product = self.products.get(key)
                if product is None:
                    raise od.Refused(404, "ZQ2C_SANDBOX/040", f"No product {key!r}")
                return od.read_one(request, base, PRODUCT, product)
            case ("A_BusinessPartner" | "A_Customer" | "A_CustomerSalesArea", _):
                raise od.Refused(405, "ZQ2C_SANDBOX/041", f"{method} not allowed")
            case ("A_Product", _):
                raise od.Refused(405, "ZQ2C_SANDBOX/041", f"{method} not allowed")
        return await self.details.route(
            request, entity_set=entity_set, key=key, method=method, base=base
        )

    def _find(self, table: dict[str, T], key: str | None) -> T:
        found = table.get(od.alpha(key or ""))
        if found is None:
            raise od.Refused(404, "ZQ2C_SANDBOX/040", f"Resource {key!r} not found")
        return found

    def _joined(
        self, record: od.Record[A_BusinessPartner]
    ) -> od.Record[A_BusinessPartner]:
        customer = self.customers.get(record.entity.Customer or "")
        entity = msgspec.structs.replace(record.entity, to_Customer=customer)
        entity = self.details.join(entity)
        return od.Record(entity=entity, changed_at=record.changed_at)

    async def _create(self, request: web.Request, base: str) -> web.Response:
        partner = od.convert(await od.body_of(request, PARTNER), A_BusinessPartner)
        problems = []
        if partner.BusinessPartnerCategory not in ("1", "2", "3"):
            text = "Enter a BusinessPartnerCategory (1, 2 or 3)"
            problems.append(od.detail("012", text, "BusinessPartnerCategory"))
        number = od.alpha(partner.BusinessPartner or "")
        if number in self.partners:
            text = f"Business partner {number} already exists"
            problems.append(od.detail("026", text, "BusinessPartner"))
        problems.extend(self.details.problems(partner))
        if problems:
            raise od.invalid(problems)
        if not number:
            while str(self._next) in self.partners:
                self._next += 1
            number = str(self._next)
        record = self._joined(self._store(partner, number))
        self._counters.business_partners_created += 1
        body = od.render(
            base, PARTNER, record.entity, expand=_CREATED_EXPAND, etag=record.etag
        )
        uri = od.entity_uri(base, PARTNER, record.entity)
        return od.json_response(
            {"d": body}, status=201, headers={"ETag": record.etag, "Location": uri}
        )

    def _store(
        self, partner: A_BusinessPartner, number: str
    ) -> od.Record[A_BusinessPartner]:
        now = self._clock.tick()
        roles = tuple(
            msgspec.structs.replace(r, BusinessPartner=number)
            for r in expanded(partner.to_BusinessPartnerRole)
        )
        is_customer = partner.to_Customer is not None or any(
            r.BusinessPartnerRole.startswith("FLCU") for r in roles
        )
        name = partner.OrganizationBPName1 or partner.BusinessPartnerFullName or ""
        if is_customer:
            given = partner.to_Customer or A_Customer()
            areas = tuple(
                msgspec.structs.replace(a, Customer=number)
                for a in expanded(given.to_CustomerSalesArea)
            )
            self.customers[number] = msgspec.structs.replace(
                given,
                Customer=number,
                CustomerAccountGroup=given.CustomerAccountGroup or "CUST",
                CustomerName=name[:80],
                to_CustomerSalesArea=Navigation(results=areas),
            )
        stored = msgspec.structs.replace(
            partner,
            metadata=None,
            BusinessPartner=number,
            Customer=number if is_customer else None,
            BusinessPartnerFullName=name,
            SearchTerm1=(partner.SearchTerm1 or "").upper() or None,
            SearchTerm2=(partner.SearchTerm2 or "").upper() or None,
            BusinessPartnerIsBlocked=bool(partner.BusinessPartnerIsBlocked),
            BusinessPartnerUUID=str(uuid.uuid4()),
            LastChangeDate=_day(now),
            to_BusinessPartnerRole=Navigation(results=roles),
            to_BusinessPartnerAddress=None,
            to_BusinessPartnerTax=None,
            to_Customer=None,
        )
        record = od.Record(entity=stored, changed_at=now)
        self.partners[number] = record
        self.details.add(number, partner, now)
        return record

    async def _patch(
        self, request: web.Request, record: od.Record[A_BusinessPartner]
    ) -> web.Response:
        od.check_if_match(request, record, self._counters)
        wanted = od.changes(await od.body_of(request, PARTNER), _UPDATABLE)
        partial = od.convert(wanted, A_BusinessPartner)
        values = {name: getattr(partial, name) for name in wanted}
        for term in ("SearchTerm1", "SearchTerm2"):
            if values.get(term):
                values[term] = values[term].upper()
        entity = msgspec.structs.replace(record.entity, **values)
        if "OrganizationBPName1" in values:
            name = entity.OrganizationBPName1 or ""
            entity = msgspec.structs.replace(entity, BusinessPartnerFullName=name)
            customer = self.customers.get(entity.Customer or "")
            if customer is not None:
                self.customers[customer.Customer or ""] = msgspec.structs.replace(
                    customer, CustomerName=name[:80]
                )
        record.entity = entity
        record.changed_at = self._clock.tick()
        self._counters.business_partners_changed += 1
        return web.Response(status=204, headers={"ETag": record.etag})

    async def _create_sales_area(self, request: web.Request, base: str) -> web.Response:
        area = od.convert(await od.body_of(request, SALES_AREA), A_CustomerSalesArea)
        customer = self.customers.get(od.alpha(area.Customer or ""))
        if customer is None:
            text = f"Customer {area.Customer} does not exist"
            raise od.invalid([od.detail("020", text, "Customer")])
        areas = expanded(customer.to_CustomerSalesArea)
        stored = msgspec.structs.replace(area, Customer=customer.Customer)
        if any(area_key(a) == area_key(stored) for a in areas):
            text = "The customer is already defined in this sales area"
            raise od.invalid([od.detail("026", text, "SalesOrganization")])
        self.customers[customer.Customer or ""] = msgspec.structs.replace(
            customer, to_CustomerSalesArea=Navigation(results=(*areas, stored))
        )
        self._counters.sales_areas_created += 1
        body = od.render(base, SALES_AREA, stored)
        return od.json_response({"d": body}, status=201)


def _day(now: datetime) -> EdmDateTime:
    return EdmDateTime.of(datetime(now.year, now.month, now.day, tzinfo=UTC))
