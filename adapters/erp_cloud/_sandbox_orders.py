"""The sandbox's sales orders: deep insert, reads, PATCH, and the events after.

Internal: used by `adapters.erp_cloud.sandbox` only. Serves
``API_SALES_ORDER_SRV``'s ``A_SalesOrder`` (and ``to_Item`` below one order).
A create is checked the way SAP checks it (required header fields, sold-to
defined in the order's sales area, materials known when products are seeded,
bundle parents present, the customer-reference check), priced (an item
condition's rate, else the product's list price) and numbered; then, when a
push URL is set, the order's business events are delivered in the background.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING

import anyio
import msgspec
from aiohttp import web

from adapters.erp_cloud import _odata as od
from adapters.erp_cloud import edm
from adapters.erp_cloud._push import Pusher
from adapters.erp_cloud._sandbox_partners import PartnerBook
from adapters.erp_cloud.edm import EdmDateTime, EdmDateTimeOffset
from adapters.erp_cloud.views import (
    BILLING_DOCUMENT_CREATED,
    OUTBOUND_DELIVERY_CREATED,
    SALES_ORDER_CREATED,
    A_CustomerSalesArea,
    A_SalesOrder,
    A_SalesOrderHeaderPartner,
    A_SalesOrderHeaderPrElement,
    A_SalesOrderItem,
    A_SalesOrderItemPartner,
    A_SalesOrderItemPrElement,
    BillingDocumentEventData,
    BusinessEvent,
    DeliveryEventItem,
    ErrorDetail,
    Navigation,
    OutboundDeliveryEventData,
    SalesOrderEventData,
    SapNotice,
    expanded,
)

if TYPE_CHECKING:
    from adapters.erp_cloud.sandbox import Counters, Knobs

__all__ = ["OrderBook", "ORDER", "ITEM"]

_SO = "API_SALES_ORDER_SRV"
_SERVICE_TYPES = frozenset({"SERV", "DIEN"})
_CENT = Decimal("0.01")
_REQUIRED = (
    "SalesOrderType",
    "SalesOrganization",
    "DistributionChannel",
    "OrganizationDivision",
    "SoldToParty",
)
_UPDATABLE = frozenset(
    {
        "PurchaseOrderByCustomer",
        "CustomerPurchaseOrderDate",
        "RequestedDeliveryDate",
        "PricingDate",
        "CustomerPaymentTerms",
        "IncotermsClassification",
        "ExternalDocumentID",
        "ExternalDocLastChangeDateTime",
        "SenderBusinessSystemName",
    }
)

ITEM = od.EntitySpec(
    set_name="A_SalesOrderItem",
    type_name=f"{_SO}.A_SalesOrderItemType",
    keys=("SalesOrder", "SalesOrderItem"),
    view=A_SalesOrderItem,
    many={
        "to_Partner": od.EntitySpec(
            set_name="A_SalesOrderItemPartner",
            type_name=f"{_SO}.A_SalesOrderItemPartnerType",
            keys=("SalesOrder", "SalesOrderItem", "PartnerFunction"),
            view=A_SalesOrderItemPartner,
        ),
        "to_PricingElement": od.EntitySpec(
            set_name="A_SalesOrderItemPrElement",
            type_name=f"{_SO}.A_SalesOrderItemPrElementType",
            keys=(
                "SalesOrder",
                "SalesOrderItem",
                "PricingProcedureStep",
                "PricingProcedureCounter",
            ),
            view=A_SalesOrderItemPrElement,
        ),
    },
)
ORDER = od.EntitySpec(
    set_name="A_SalesOrder",
    type_name=f"{_SO}.A_SalesOrderType",
    keys=("SalesOrder",),
    view=A_SalesOrder,
    many={
        "to_Item": ITEM,
        "to_Partner": od.EntitySpec(
            set_name="A_SalesOrderHeaderPartner",
            type_name=f"{_SO}.A_SalesOrderHeaderPartnerType",
            keys=("SalesOrder", "PartnerFunction"),
            view=A_SalesOrderHeaderPartner,
        ),
        "to_PricingElement": od.EntitySpec(
            set_name="A_SalesOrderHeaderPrElement",
            type_name=f"{_SO}.A_SalesOrderHeaderPrElementType",
            keys=("SalesOrder", "PricingProcedureStep", "PricingProcedureCounter"),
            view=A_SalesOrderHeaderPrElement,
        ),
    },
)
#: A deep insert's response carries every entity it created.
_CREATED_EXPAND = frozenset(
    {
        "to_Item",
        "to_Item/to_Partner",
        "to_Item/to_PricingElement",
        "to_Partner",
        "to_PricingElement",
    }
)


class OrderBook:
    """Sales orders in memory, and the business events that follow each create."""

    def __init__(
        self,
        *,
        knobs: Knobs,
        counters: Counters,
        clock: od.Clock,
        partners: PartnerBook,
        pusher: Pusher,
        source: str,
        first: int = 0,
    ) -> None:
        self._knobs = knobs
        self._counters = counters
        self._clock = clock
        self._partners = partners
        self._pusher = pusher
        self._source = source
        self.orders: dict[str, od.Record[A_SalesOrder]] = {}
        self._next = first + 1
        self._next_document = first

    async def route(
        self,
        request: web.Request,
        *,
        entity_set: str,
        key: str | None,
        nav: str | None,
        method: str,
        base: str,
    ) -> web.StreamResponse | None:
        """Answer a request for ``A_SalesOrder``; None for any other entity set."""
        if entity_set != "A_SalesOrder":
            return None
        reading = method in ("GET", "HEAD")
        if key is None and method == "POST":
            return await self._create(request, base)
        if key is None and reading:
            return od.read_many(request, base, ORDER, self.orders)
        record = self.orders.get(od.alpha(key or ""))
        if record is None:
            raise od.Refused(404, "ZQ2C_SANDBOX/040", f"Sales order {key!r} not found")
        if nav == "to_Item" and reading:
            items = {i.SalesOrderItem or "": i for i in expanded(record.entity.to_Item)}
            return od.read_many(request, base, ITEM, items)
        if nav is None and method == "PATCH":
            return await self._patch(request, record)
        if nav is None and reading:
            return od.read_one(request, base, ORDER, record)
        raise od.Refused(405, "ZQ2C_SANDBOX/041", f"{method} not allowed here")

    # -- create --------------------------------------------------------------------

    async def _create(self, request: web.Request, base: str) -> web.Response:
        order = od.convert(await od.body_of(request, ORDER), A_SalesOrder)
        problems = self._problems(order)
        if problems:
            raise od.invalid(problems)
        notices = self._duplicate_check(order)
        now = self._clock.tick()
        booked = self._book(order, now)
        number = booked.SalesOrder or ""
        record = od.Record(entity=booked, changed_at=now)
        self.orders[number] = record
        self._counters.orders_created += 1
        if self._knobs.push_url:
            self._pusher.spawn(self._lifecycle(number))
        headers = {"ETag": record.etag, "Location": od.entity_uri(base, ORDER, booked)}
        if notices:
            # One object, the others in its details, as SAP Gateway sends it;
            # json.dumps escapes non-ASCII, which a header value cannot carry.
            head, *rest = notices
            notice = msgspec.structs.replace(head, details=tuple(rest))
            headers["sap-message"] = json.dumps(edm.to_builtins(notice))
        body = od.render(base, ORDER, booked, expand=_CREATED_EXPAND, etag=record.etag)
        return od.json_response({"d": body}, status=201, headers=headers)

    def _problems(self, order: A_SalesOrder) -> list[ErrorDetail]:
        problems = [
            od.detail("012", f"Enter a value for {name}", name)
            for name in _REQUIRED
            if not getattr(order, name)
        ]
        number = od.alpha(order.SalesOrder or "")
        if number in self.orders:
            text = f"Sales order {number} already exists"
            problems.append(od.detail("026", text, "SalesOrder"))
        sold_to = od.alpha(order.SoldToParty or "")
        if sold_to and sold_to not in self._partners.customers:
            text = f"Sold-to party {sold_to} does not exist"
            problems.append(od.detail("020", text, "SoldToParty"))
        elif sold_to and self._area(order) is None:
            text = (
                f"Sold-to party {sold_to} is not defined for sales area "
                f"{order.SalesOrganization}/{order.DistributionChannel}/"
                f"{order.OrganizationDivision}"
            )
            problems.append(od.detail("021", text, "SoldToParty"))
        elif sold_to and self._partners.customers[sold_to].OrderIsBlockedForCustomer:
            text = f"Sold-to party {sold_to} is blocked for sales orders"
            problems.append(od.detail("025", text, "SoldToParty"))
        elif order.PurchaseOrderByCustomer in self._knobs.refuse_refs:
            text = f"Credit limit exceeded for sold-to party {sold_to}"
            problems.append(od.detail("027", text, "SoldToParty"))
        problems.extend(self._item_problems(expanded(order.to_Item)))
        return problems

    def _item_problems(self, items: tuple[A_SalesOrderItem, ...]) -> list[ErrorDetail]:
        if not items:
            return [od.detail("012", "An order needs at least one item", "to_Item")]
        problems: list[ErrorDetail] = []
        numbers = [od.alpha(i.SalesOrderItem) for i in items if i.SalesOrderItem]
        if len(set(numbers)) != len(numbers):
            text = "Item numbers are not unique"
            problems.append(od.detail("024", text, "to_Item/SalesOrderItem"))
        products = self._partners.products
        for index, item in enumerate(items, start=1):
            where = f"to_Item({index})"
            if not item.Material:
                text = "Enter a value for Material"
                problems.append(od.detail("012", text, f"{where}/Material"))
            elif products and item.Material not in products:
                text = f"Material {item.Material} is not defined"
                problems.append(od.detail("022", text, f"{where}/Material"))
            if item.RequestedQuantity is None or item.RequestedQuantity <= 0:
                text = "Enter a requested quantity greater than zero"
                problems.append(od.detail("013", text, f"{where}/RequestedQuantity"))
            parent = item.HigherLevelItem
            if parent and od.alpha(parent) not in numbers:
                text = f"Higher-level item {parent} does not exist"
                problems.append(od.detail("023", text, f"{where}/HigherLevelItem"))
        return problems

    def _duplicate_check(self, order: A_SalesOrder) -> list[SapNotice]:
        """SAP's customer-reference check: a warning, or an error when blocking."""
        reference = order.PurchaseOrderByCustomer
        sold_to = od.alpha(order.SoldToParty or "")
        earlier = [
            number
            for number, r in self.orders.items()
            if reference
            and r.entity.PurchaseOrderByCustomer == reference
            and r.entity.SoldToParty == sold_to
        ]
        if not earlier:
            return []
        text = (
            f"Purchase order number {reference} already exists for sold-to party "
            f"{sold_to} (sales order {earlier[0]})"
        )
        if self._knobs.block_duplicate_po:
            self._counters.duplicate_po_refused += 1
            raise od.invalid([od.detail("030", text, "PurchaseOrderByCustomer")])
        self._counters.duplicate_po_warnings += 1
        notice = SapNotice(
            code="ZQ2C_SANDBOX/030",
            message=text,
            severity="warning",
            target="PurchaseOrderByCustomer",
        )
        return [notice]

    def _area(self, order: A_SalesOrder) -> A_CustomerSalesArea | None:
        return self._partners.sales_area(
            order.SoldToParty or "",
            order.SalesOrganization or "",
            order.DistributionChannel or "",
            order.OrganizationDivision or "",
        )

    def _book(self, order: A_SalesOrder, now: datetime) -> A_SalesOrder:
        number = od.alpha(order.SalesOrder or "")
        if not number:
            while str(self._next) in self.orders:
                self._next += 1
            number = str(self._next)
        area = self._area(order)
        currency = order.TransactionCurrency or (area and area.Currency) or "USD"
        items = tuple(
            self._book_item(item, number, index, currency)
            for index, item in enumerate(expanded(order.to_Item), start=1)
        )
        sold_to = od.alpha(order.SoldToParty or "")
        partners = {
            p.PartnerFunction: msgspec.structs.replace(p, SalesOrder=number)
            for p in expanded(order.to_Partner)
        }
        for function in ("AG", "WE", "RE"):
            partners.setdefault(
                function,
                A_SalesOrderHeaderPartner(
                    SalesOrder=number, PartnerFunction=function, Customer=sold_to
                ),
            )
        header_conditions = tuple(
            msgspec.structs.replace(p, SalesOrder=number)
            for p in expanded(order.to_PricingElement)
        )
        today = EdmDateTime.of(datetime(now.year, now.month, now.day, tzinfo=UTC))
        return msgspec.structs.replace(
            order,
            metadata=None,
            SalesOrder=number,
            SoldToParty=sold_to,
            TransactionCurrency=currency,
            TotalNetAmount=sum((i.NetAmount or Decimal(0) for i in items), Decimal(0)),
            CustomerPaymentTerms=order.CustomerPaymentTerms
            or (area.CustomerPaymentTerms if area else None),
            SalesOrderDate=order.SalesOrderDate or today,
            CreationDate=today,
            PricingDate=order.PricingDate or today,
            LastChangeDateTime=EdmDateTimeOffset.of(now),
            OverallSDProcessStatus="A",
            OverallTotalDeliveryStatus="A",
            TotalCreditCheckStatus="A",
            to_Item=Navigation(results=items),
            to_Partner=Navigation(results=tuple(partners.values())),
            to_PricingElement=Navigation(results=header_conditions),
        )

    def _book_item(
        self, item: A_SalesOrderItem, number: str, index: int, currency: str
    ) -> A_SalesOrderItem:
        item_no = od.alpha(item.SalesOrderItem or "") or str(index * 10)
        quantity = item.RequestedQuantity or Decimal(0)
        product = self._partners.products.get(item.Material or "")
        price = (product.ListPrice if product else None) or Decimal(0)
        for element in expanded(item.to_PricingElement):
            if element.ConditionRateValue is not None:
                price = element.ConditionRateValue / (
                    element.ConditionQuantity or Decimal(1)
                )
        net = (quantity * price).quantize(_CENT, rounding=ROUND_HALF_UP)
        conditions = tuple(
            msgspec.structs.replace(
                element,
                SalesOrder=number,
                SalesOrderItem=item_no,
                PricingProcedureStep=element.PricingProcedureStep or f"{step}0",
                PricingProcedureCounter=element.PricingProcedureCounter or "1",
                ConditionCurrency=element.ConditionCurrency or currency,
                ConditionAmount=net if element.ConditionRateValue is not None else None,
                TransactionCurrency=currency,
            )
            for step, element in enumerate(expanded(item.to_PricingElement), start=1)
        )
        partners = tuple(
            msgspec.structs.replace(p, SalesOrder=number, SalesOrderItem=item_no)
            for p in expanded(item.to_Partner)
        )
        unit = item.RequestedQuantityUnit or (product.BaseUnit if product else None)
        return msgspec.structs.replace(
            item,
            metadata=None,
            SalesOrder=number,
            SalesOrderItem=item_no,
            HigherLevelItem=od.alpha(item.HigherLevelItem or "") or None,
            SalesOrderItemCategory=item.SalesOrderItemCategory or "TAN",
            RequestedQuantityUnit=unit or "PC",
            TransactionCurrency=currency,
            NetAmount=net,
            SDProcessStatus="A",
            DeliveryStatus="A",
            to_Partner=Navigation(results=partners),
            to_PricingElement=Navigation(results=conditions),
        )

    # -- change --------------------------------------------------------------------

    async def _patch(
        self, request: web.Request, record: od.Record[A_SalesOrder]
    ) -> web.Response:
        od.check_if_match(request, record, self._counters)
        wanted = od.changes(await od.body_of(request, ORDER), _UPDATABLE)
        partial = od.convert(wanted, A_SalesOrder)
        now = self._clock.tick()
        record.entity = msgspec.structs.replace(
            record.entity,
            LastChangeDateTime=EdmDateTimeOffset.of(now),
            **{name: getattr(partial, name) for name in wanted},
        )
        record.changed_at = now
        self._counters.orders_changed += 1
        return web.Response(status=204, headers={"ETag": record.etag})

    # -- business events -----------------------------------------------------------

    async def _lifecycle(self, number: str) -> None:
        """Created → (delay) → delivery of shipped items → billing document."""
        order = self.orders[number].entity
        created = SalesOrderEventData(
            SalesOrder=number,
            SalesOrderType=order.SalesOrderType,
            SalesOrganization=order.SalesOrganization,
            DistributionChannel=order.DistributionChannel,
            OrganizationDivision=order.OrganizationDivision,
            SoldToParty=order.SoldToParty,
            PurchaseOrderByCustomer=order.PurchaseOrderByCustomer,
            TotalNetAmount=edm.edm_decimal(order.TotalNetAmount or Decimal(0)),
            TransactionCurrency=order.TransactionCurrency,
            OverallSDProcessStatus=order.OverallSDProcessStatus,
            EventRaisedDateTime=datetime.now(UTC),
        )
        await self._pusher.deliver(self._event(SALES_ORDER_CREATED, created))
        if self._knobs.fulfilment_delay_s > 0:
            await anyio.sleep(self._knobs.fulfilment_delay_s)
        shipped = [i for i in expanded(order.to_Item) if self._shipped(i)]
        if shipped:
            self._mark_delivered(number)
            delivery = OutboundDeliveryEventData(
                OutboundDelivery=self._document_number(80_000_000),
                ShippingPoint=order.SalesOrganization,
                SoldToParty=order.SoldToParty,
                SalesOrder=number,
                PurchaseOrderByCustomer=order.PurchaseOrderByCustomer,
                Items=tuple(
                    DeliveryEventItem(
                        Material=i.Material or "",
                        ActualDeliveryQuantity=i.RequestedQuantity or Decimal(0),
                        DeliveryQuantityUnit=i.RequestedQuantityUnit,
                        ReferenceSDDocumentItem=i.SalesOrderItem,
                    )
                    for i in shipped
                ),
                EventRaisedDateTime=datetime.now(UTC),
            )
            await self._pusher.deliver(self._event(OUTBOUND_DELIVERY_CREATED, delivery))
        billed = (
            (order.TotalNetAmount or Decimal(0))
            + self._knobs.invoice_delta
            + self._knobs.invoice_deltas.get(order.PurchaseOrderByCustomer or "", 0)
        )
        billing = BillingDocumentEventData(
            BillingDocument=self._document_number(90_000_000),
            BillingDocumentType="F2",
            SalesOrganization=order.SalesOrganization,
            SoldToParty=order.SoldToParty,
            SalesOrder=number,
            PurchaseOrderByCustomer=order.PurchaseOrderByCustomer,
            TotalNetAmount=edm.edm_decimal(billed),
            TransactionCurrency=order.TransactionCurrency,
            EventRaisedDateTime=datetime.now(UTC),
        )
        await self._pusher.deliver(self._event(BILLING_DOCUMENT_CREATED, billing))

    def _mark_delivered(self, number: str) -> None:
        record = self.orders[number]
        record.changed_at = self._clock.tick()
        record.entity = msgspec.structs.replace(
            record.entity,
            OverallTotalDeliveryStatus="C",
            LastChangeDateTime=EdmDateTimeOffset.of(record.changed_at),
        )

    def _document_number(self, base: int) -> str:
        self._next_document += 1
        return str(base + self._next_document)

    def _shipped(self, item: A_SalesOrderItem) -> bool:
        product = self._partners.products.get(item.Material or "")
        return product is None or product.ProductType not in _SERVICE_TYPES

    def _event(self, event_type: str, data: msgspec.Struct) -> BusinessEvent:
        return BusinessEvent(
            specversion="1.0",
            type=event_type,
            source=self._source,
            id=str(uuid.uuid4()),
            time=datetime.now(UTC),
            datacontenttype="application/json",
            data=msgspec.Raw(edm.encode(data)),
        )
