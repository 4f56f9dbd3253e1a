"""Native views of SAP S/4HANA Cloud's OData V2 payloads (JSON verbose).

Field names are SAP's own (``A_SalesOrder.SoldToParty``, ``to_Item``), so a
view reads like the API reference; the string limits are the ``maxLength``
values of SAP's OpenAPI description of ``API_SALES_ORDER_SRV`` and the
``MaxLength`` facets of ``API_BUSINESS_PARTNER``'s ``$metadata`` (a
conformance test reads both files and compares). Every view is tolerant:
unknown fields are ignored and every field SAP may leave out defaults to
``None``, which the encoder then omits, so a view encodes as a valid
request body too.

Shapes of the verbose format:

- an entity: ``{"d": {...}}``; a collection: ``{"d": {"results": [...]}}``;
- ``__metadata`` (``id``, ``uri``, ``type``, ``etag``) on every entity read;
- a navigation property is ``{"__deferred": {"uri"}}`` when not expanded,
  ``{"results": [...]}`` when expanded, and in deep-insert requests either
  ``{"results": [...]}`` or a bare array; `ToMany` accepts all three and
  `expanded` reads the entities out of any of them;
- errors: ``{"error": {"code", "message": {"lang", "value"}, "innererror":
  {..., "errordetails": [...]}}}``; warnings on a success: the
  ``sap-message`` response header (`SapNotice`).

Decode with `adapters.erp_cloud.edm.decode` so ``/Date(...)/`` values become
`EdmDateTime` / `EdmDateTimeOffset`.
"""

# ruff: noqa: N801, N815  # entity and navigation names are SAP's: A_SalesOrder, to_Item

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Annotated, Any, Generic, TypeVar, Union

import msgspec
from msgspec import Meta

from adapters.erp_cloud.edm import EdmDateTime, EdmDateTimeOffset

__all__ = [
    # OData plumbing
    "View",
    "Entity",
    "Metadata",
    "Deferred",
    "Navigation",
    "ToMany",
    "expanded",
    "Single",
    "Results",
    "Collection",
    "FieldLimit",
    "field_limits",
    # API_SALES_ORDER_SRV
    "A_SalesOrder",
    "A_SalesOrderItem",
    "A_SalesOrderHeaderPartner",
    "A_SalesOrderItemPartner",
    "A_SalesOrderHeaderPrElement",
    "A_SalesOrderItemPrElement",
    # API_BUSINESS_PARTNER
    "A_BusinessPartner",
    "A_BusinessPartnerRole",
    "A_BusinessPartnerAddress",
    "A_BusinessPartnerTaxNumber",
    "A_Customer",
    "A_CustomerSalesArea",
    # API_PRODUCT_SRV (sandbox stand-in for products with their prices)
    "A_Product",
    # Errors and messages
    "ErrorMessage",
    "ErrorDetail",
    "ErrorApplication",
    "InnerError",
    "ODataErrorBody",
    "ODataError",
    "SapNotice",
    # Business events (CloudEvents from SAP Event Mesh)
    "BusinessEvent",
    "SALES_ORDER_CREATED",
    "OUTBOUND_DELIVERY_CREATED",
    "BILLING_DOCUMENT_CREATED",
    "SalesOrderEventData",
    "OutboundDeliveryEventData",
    "DeliveryEventItem",
    "BillingDocumentEventData",
]

T = TypeVar("T")

Str1 = Annotated[str, Meta(max_length=1)]
Str2 = Annotated[str, Meta(max_length=2)]
Str3 = Annotated[str, Meta(max_length=3)]
Str4 = Annotated[str, Meta(max_length=4)]
Str5 = Annotated[str, Meta(max_length=5)]
Str6 = Annotated[str, Meta(max_length=6)]
Str8 = Annotated[str, Meta(max_length=8)]
Str9 = Annotated[str, Meta(max_length=9)]
Str10 = Annotated[str, Meta(max_length=10)]
Str20 = Annotated[str, Meta(max_length=20)]
Str35 = Annotated[str, Meta(max_length=35)]
Str40 = Annotated[str, Meta(max_length=40)]
Str60 = Annotated[str, Meta(max_length=60)]
Str80 = Annotated[str, Meta(max_length=80)]
Str81 = Annotated[str, Meta(max_length=81)]
#: Edm.Decimal without decimals (a pricing unit: ``multipleOf: 1``).
Dec0 = Annotated[Decimal, Meta(extra={"scale": 0})]
#: Edm.Decimal with 3 decimals (amounts, quantities: ``multipleOf: 0.001``).
Dec3 = Annotated[Decimal, Meta(extra={"scale": 3})]
#: Edm.Decimal with 9 decimals (condition rates: ``multipleOf: 1e-9``).
Dec9 = Annotated[Decimal, Meta(extra={"scale": 9})]


class View(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    rename={
        "metadata": "__metadata",
        "deferred": "__deferred",
        "count": "__count",
        "next": "__next",
    },
):
    """Base of every SAP view: frozen, tolerant, ``None`` fields left out."""


class Metadata(View, frozen=True, kw_only=True):
    """``__metadata`` of an entity read from SAP."""

    id: str | None = None
    uri: str | None = None
    type: str | None = None
    etag: str | None = None


class Deferred(View, frozen=True, kw_only=True):
    """``__deferred``: a navigation property that was not expanded."""

    uri: str


class Navigation(View, Generic[T], frozen=True, kw_only=True):
    """A to-many navigation: ``{"results": [...]}`` or ``{"__deferred": {...}}``."""

    results: tuple[T, ...] | None = None
    deferred: Deferred | None = None


#: A to-many navigation in any of its three wire forms (see the module doc).
ToMany = Union[Navigation[T], tuple[T, ...]]  # noqa: UP007  # a generic alias needs Union


def expanded(nav: ToMany[T] | None) -> tuple[T, ...]:
    """The entities of a navigation property (empty when deferred or absent)."""
    if nav is None:
        return ()
    if isinstance(nav, Navigation):
        return nav.results or ()
    return nav


class Entity(View, frozen=True, kw_only=True):
    """An entity: carries ``__metadata`` when read from SAP."""

    metadata: Metadata | None = None


class Single(View, Generic[T], frozen=True, kw_only=True):
    """``{"d": <entity>}``."""

    d: T


class Results(View, Generic[T], frozen=True, kw_only=True):
    """A collection's ``d``: ``results``, ``__count`` (``$inlinecount``), ``__next``."""

    results: tuple[T, ...] = ()
    count: str | None = None
    next: str | None = None


class Collection(View, Generic[T], frozen=True, kw_only=True):
    """``{"d": {"results": [...]}}``."""

    d: Results[T]


# --- API_SALES_ORDER_SRV -----------------------------------------------------


class A_SalesOrderHeaderPartner(Entity, frozen=True, kw_only=True):
    """``A_SalesOrderHeaderPartnerType``: a partner function (AG, WE, RE)."""

    SalesOrder: Str10 | None = None
    PartnerFunction: Str2
    Customer: Str10 | None = None
    Supplier: Str10 | None = None
    Personnel: Str8 | None = None
    ContactPerson: Str10 | None = None


class A_SalesOrderItemPartner(Entity, frozen=True, kw_only=True):
    """``A_SalesOrderItemPartnerType``: a partner function on one item."""

    SalesOrder: Str10 | None = None
    SalesOrderItem: Str6 | None = None
    PartnerFunction: Str2
    Customer: Str10 | None = None
    Supplier: Str10 | None = None


class A_SalesOrderHeaderPrElement(Entity, frozen=True, kw_only=True):
    """``A_SalesOrderHeaderPrElementType``, minimal: one header pricing condition."""

    SalesOrder: Str10 | None = None
    PricingProcedureStep: Str3 | None = None
    PricingProcedureCounter: Str3 | None = None
    ConditionType: Str4 | None = None
    ConditionRateValue: Dec9 | None = None
    ConditionCurrency: Str5 | None = None
    ConditionQuantity: Dec0 | None = None
    ConditionAmount: Dec3 | None = None
    TransactionCurrency: Str5 | None = None


class A_SalesOrderItemPrElement(Entity, frozen=True, kw_only=True):
    """``A_SalesOrderItemPrElementType``, minimal: one item pricing condition.

    A manual price is ``ConditionType`` ``PMP0`` (or ``PR00``) with
    ``ConditionRateValue`` per ``ConditionQuantity`` units.
    """

    SalesOrder: Str10 | None = None
    SalesOrderItem: Str6 | None = None
    PricingProcedureStep: Str3 | None = None
    PricingProcedureCounter: Str3 | None = None
    ConditionType: Str4 | None = None
    ConditionRateValue: Dec9 | None = None
    ConditionCurrency: Str5 | None = None
    ConditionQuantity: Dec0 | None = None
    ConditionAmount: Dec3 | None = None
    TransactionCurrency: Str5 | None = None


class A_SalesOrderItem(Entity, frozen=True, kw_only=True):
    """``A_SalesOrderItemType``; ``HigherLevelItem`` makes the item a bundle child."""

    SalesOrder: Str10 | None = None
    SalesOrderItem: Str6 | None = None
    HigherLevelItem: Str6 | None = None
    SalesOrderItemCategory: Str4 | None = None
    SalesOrderItemText: Str40 | None = None
    PurchaseOrderByCustomer: Str35 | None = None
    ExternalItemID: Str40 | None = None
    Material: Str40 | None = None
    RequestedQuantity: Dec3 | None = None
    RequestedQuantityUnit: Str3 | None = None
    TransactionCurrency: Str5 | None = None
    NetAmount: Dec3 | None = None
    ProductionPlant: Str4 | None = None
    PricingDate: EdmDateTime | None = None
    SDProcessStatus: Str1 | None = None
    DeliveryStatus: Str1 | None = None
    to_Partner: ToMany[A_SalesOrderItemPartner] | None = None
    to_PricingElement: ToMany[A_SalesOrderItemPrElement] | None = None


class A_SalesOrder(Entity, frozen=True, kw_only=True):
    """``A_SalesOrderType``: the header, and the deep-insert request body.

    ``SalesOrder`` is ``None`` on a create with internal numbering.
    ``PurchaseOrderByCustomer`` + ``SoldToParty`` is what SAP's duplicate
    customer-reference check compares.
    """

    SalesOrder: Str10 | None = None
    SalesOrderType: Str4 | None = None
    SalesOrganization: Str4 | None = None
    DistributionChannel: Str2 | None = None
    OrganizationDivision: Str2 | None = None
    SoldToParty: Str10 | None = None
    PurchaseOrderByCustomer: Str35 | None = None
    CustomerPurchaseOrderDate: EdmDateTime | None = None
    SalesOrderDate: EdmDateTime | None = None
    CreationDate: EdmDateTime | None = None
    RequestedDeliveryDate: EdmDateTime | None = None
    PricingDate: EdmDateTime | None = None
    TransactionCurrency: Str5 | None = None
    TotalNetAmount: Dec3 | None = None
    CustomerPaymentTerms: Str4 | None = None
    IncotermsClassification: Str3 | None = None
    ExternalDocumentID: Str40 | None = None
    SenderBusinessSystemName: Str60 | None = None
    LastChangeDateTime: EdmDateTimeOffset | None = None
    ExternalDocLastChangeDateTime: EdmDateTimeOffset | None = None
    OverallSDProcessStatus: Str1 | None = None
    OverallTotalDeliveryStatus: Str1 | None = None
    TotalCreditCheckStatus: Str1 | None = None
    to_Item: ToMany[A_SalesOrderItem] | None = None
    to_Partner: ToMany[A_SalesOrderHeaderPartner] | None = None
    to_PricingElement: ToMany[A_SalesOrderHeaderPrElement] | None = None


# --- API_BUSINESS_PARTNER ----------------------------------------------------


class A_CustomerSalesArea(Entity, frozen=True, kw_only=True):
    """``A_CustomerSalesAreaType``: the customer in one sales area."""

    Customer: Str10 | None = None
    SalesOrganization: Str4
    DistributionChannel: Str2
    Division: Str2
    Currency: Str5 | None = None
    CustomerPaymentTerms: Str4 | None = None
    IncotermsClassification: Str3 | None = None
    SupplyingPlant: Str4 | None = None
    OrderIsBlockedForCustomer: Str2 | None = None
    DeletionIndicator: bool | None = None


class A_Customer(Entity, frozen=True, kw_only=True):
    """``A_CustomerType``: the customer role of a business partner.

    As ``to_Customer`` of an unexpanded business partner SAP sends only
    ``__deferred``; that decodes to an ``A_Customer`` with every field ``None``.
    """

    Customer: Str10 | None = None
    CustomerAccountGroup: Str4 | None = None
    CustomerName: Str80 | None = None
    OrderIsBlockedForCustomer: Str2 | None = None
    DeletionIndicator: bool | None = None
    to_CustomerSalesArea: ToMany[A_CustomerSalesArea] | None = None


class A_BusinessPartnerRole(Entity, frozen=True, kw_only=True):
    """``A_BusinessPartnerRoleType``: e.g. ``FLCU01`` (customer) on a partner."""

    BusinessPartner: Str10 | None = None
    BusinessPartnerRole: Str6


class A_BusinessPartnerAddress(Entity, frozen=True, kw_only=True):
    """``A_BusinessPartnerAddressType``, minimal: one postal address of a partner.

    Keyed by ``BusinessPartner`` and ``AddressID``, the address number SAP
    assigns on create (left out of a create request). ``PostalCode``,
    ``Region`` and ``Country`` are upper case in SAP; ``Region`` is SAP's
    region key (``BY``, ``CA``), not a state name.
    """

    BusinessPartner: Str10 | None = None
    AddressID: Str10 | None = None
    StreetName: Str60 | None = None
    HouseNumber: Str10 | None = None
    CityName: Str40 | None = None
    PostalCode: Str10 | None = None
    Region: Str3 | None = None
    Country: Str3 | None = None
    Language: Str2 | None = None


class A_BusinessPartnerTaxNumber(Entity, frozen=True, kw_only=True):
    """``A_BusinessPartnerTaxNumberType``: one tax number of a partner.

    Keyed by ``BusinessPartner`` and ``BPTaxType``, the tax number category
    (``DE0``: German VAT registration number); a partner has at most one
    number per category. A number longer than 20 characters is kept in
    ``BPTaxLongNumber``. ``BPTaxType`` is optional only so that a PATCH body
    (which must not repeat the key) is a view too.
    """

    BusinessPartner: Str10 | None = None
    BPTaxType: Str4 | None = None
    BPTaxNumber: Str20 | None = None
    BPTaxLongNumber: Str60 | None = None


class A_BusinessPartner(Entity, frozen=True, kw_only=True):
    """``A_BusinessPartnerType``, minimal: an organisation with its customer role.

    ``BusinessPartnerCategory`` is ``"1"`` person, ``"2"`` organisation,
    ``"3"`` group. ``SearchTerm1`` (upper case, ≤ 20) carries our account key.
    ``to_BusinessPartnerAddress`` and ``to_BusinessPartnerTax`` carry its
    addresses and tax numbers (in a deep insert, and when expanded on a read).
    """

    BusinessPartner: Str10 | None = None
    Customer: Str10 | None = None
    BusinessPartnerCategory: Str1 | None = None
    BusinessPartnerGrouping: Str4 | None = None
    BusinessPartnerFullName: Str81 | None = None
    OrganizationBPName1: Str40 | None = None
    SearchTerm1: Str20 | None = None
    SearchTerm2: Str20 | None = None
    CorrespondenceLanguage: Str2 | None = None
    BusinessPartnerIsBlocked: bool | None = None
    BusinessPartnerUUID: str | None = None
    LastChangeDate: EdmDateTime | None = None
    to_BusinessPartnerRole: ToMany[A_BusinessPartnerRole] | None = None
    to_BusinessPartnerAddress: ToMany[A_BusinessPartnerAddress] | None = None
    to_BusinessPartnerTax: ToMany[A_BusinessPartnerTaxNumber] | None = None
    to_Customer: A_Customer | None = None


# --- API_PRODUCT_SRV (sandbox) -----------------------------------------------


class A_Product(Entity, frozen=True, kw_only=True):
    """A product with its prices: the sandbox's stand-in for pricing conditions.

    ``Product``, ``ProductType`` and ``ProductGroup`` are SAP's ``A_Product``
    fields (``ProductType`` ``SERV`` / ``DIEN`` is a service, anything else is
    shipped). SAP keeps prices in pricing condition records, not on the
    product; the sandbox flattens the list price (``PR00``) and the floor
    below which a quote needs approval into ``ListPrice`` / ``PriceFloor`` so
    quote validation has one reference list to read.
    """

    Product: Str40
    ProductType: Str4 | None = None
    ProductGroup: Str9 | None = None
    ProductDescription: Str40 | None = None
    BaseUnit: Str3 | None = None
    ListPrice: Dec3 | None = None
    PriceFloor: Dec3 | None = None
    Currency: Str5 | None = None
    IsMarkedForDeletion: bool | None = None


# --- errors and messages -----------------------------------------------------


class ErrorMessage(View, frozen=True, kw_only=True):
    """``error.message``: the text in the logon language."""

    lang: str = "en"
    value: str


class ErrorDetail(View, frozen=True, kw_only=True):
    """One entry of ``innererror.errordetails``."""

    code: str
    message: str
    propertyref: str = ""
    severity: str = "error"
    target: str = ""


class ErrorApplication(View, frozen=True, kw_only=True):
    """``innererror.application``: which service answered."""

    component_id: str | None = None
    service_namespace: str | None = None
    service_id: str | None = None
    service_version: str | None = None


class InnerError(View, frozen=True, kw_only=True):
    """``error.innererror``: service-specific; these are SAP Gateway's members."""

    application: ErrorApplication | None = None
    transactionid: str | None = None
    timestamp: str | None = None
    Error_Resolution: dict[str, str] | None = None
    errordetails: tuple[ErrorDetail, ...] = ()


class ODataErrorBody(View, frozen=True, kw_only=True):
    """``error``: a T100 code (``<class>/<number>``) and its message."""

    code: str
    message: ErrorMessage
    innererror: InnerError | None = None


class ODataError(View, frozen=True, kw_only=True):
    """The body of every 4xx/5xx SAP Gateway answers in JSON."""

    error: ODataErrorBody


class SapNotice(View, frozen=True, kw_only=True):
    """The ``sap-message`` header (a warning or info on a successful call).

    The top-level message may carry more in ``details``, each shaped alike.
    """

    code: str = ""
    message: str = ""
    severity: str = ""
    target: str = ""
    details: tuple[SapNotice, ...] = ()

    def flatten(self) -> tuple[SapNotice, ...]:
        """This message and its details, without the nesting."""
        head = msgspec.structs.replace(self, details=())
        return (head, *(d for n in self.details for d in n.flatten()))


# --- business events ---------------------------------------------------------

#: CloudEvents ``type`` of the business events the adapter reads.
SALES_ORDER_CREATED = "sap.s4.beh.salesorder.v1.SalesOrder.Created.v1"
OUTBOUND_DELIVERY_CREATED = "sap.s4.beh.outbounddelivery.v1.OutboundDelivery.Created.v1"
BILLING_DOCUMENT_CREATED = "sap.s4.beh.billingdocument.v1.BillingDocument.Created.v1"


class BusinessEvent(View, frozen=True, kw_only=True):
    """A CloudEvents 1.0 event (structured JSON) as SAP Event Mesh delivers it."""

    specversion: str
    type: str
    source: str
    id: str
    time: datetime | None = None
    subject: str | None = None
    datacontenttype: str | None = None
    traceparent: str | None = None
    data: msgspec.Raw = msgspec.Raw(b"null")


class SalesOrderEventData(View, frozen=True, kw_only=True):
    """``data`` of ``sap.s4.beh.salesorder.v1.SalesOrder.*.v1``.

    SAP's own payload names the order and its sales area; the sandbox adds
    ``PurchaseOrderByCustomer``, the order's total (``TotalNetAmount``,
    ``TransactionCurrency``) and its status (``OverallSDProcessStatus``),
    so an order keyed in SAP can be traced to its deal and booked there
    without a read-back (as the billing document carries its amount).
    """

    SalesOrder: str
    SalesOrderType: str | None = None
    SalesOrganization: str | None = None
    DistributionChannel: str | None = None
    OrganizationDivision: str | None = None
    SoldToParty: str | None = None
    PurchaseOrderByCustomer: str | None = None
    TotalNetAmount: Decimal | None = None
    TransactionCurrency: str | None = None
    OverallSDProcessStatus: str | None = None
    EventRaisedDateTime: datetime | None = None


class DeliveryEventItem(View, frozen=True, kw_only=True):
    """One delivered item inside the sandbox's outbound-delivery event."""

    Material: str
    ActualDeliveryQuantity: Decimal
    DeliveryQuantityUnit: str | None = None
    ReferenceSDDocumentItem: str | None = None


class OutboundDeliveryEventData(View, frozen=True, kw_only=True):
    """``data`` of ``sap.s4.beh.outbounddelivery.v1.OutboundDelivery.Created.v1``.

    ``SalesOrder``, ``PurchaseOrderByCustomer`` and ``Items`` are the
    sandbox's additions: SAP's notification names only the delivery.
    """

    OutboundDelivery: str
    ShippingPoint: str | None = None
    SoldToParty: str | None = None
    SalesOrder: str | None = None
    PurchaseOrderByCustomer: str | None = None
    Items: tuple[DeliveryEventItem, ...] = ()
    EventRaisedDateTime: datetime | None = None


class BillingDocumentEventData(View, frozen=True, kw_only=True):
    """``data`` of ``sap.s4.beh.billingdocument.v1.BillingDocument.Created.v1``.

    The billed amount (``TotalNetAmount``, ``TransactionCurrency``) and the
    order references are the sandbox's additions: SAP's notification names
    only the document and reading it back is left to the consumer.
    """

    BillingDocument: str
    BillingDocumentType: str | None = None
    SalesOrganization: str | None = None
    SoldToParty: str | None = None
    SalesOrder: str | None = None
    PurchaseOrderByCustomer: str | None = None
    TotalNetAmount: Decimal | None = None
    TransactionCurrency: str | None = None
    EventRaisedDateTime: datetime | None = None


# --- introspection -----------------------------------------------------------


class FieldLimit(msgspec.Struct, frozen=True, kw_only=True):
    """What a view enforces on one scalar field: string length or decimal scale."""

    max_length: int | None = None
    scale: int | None = None


@functools.cache
def field_limits(view: type[msgspec.Struct]) -> Mapping[str, FieldLimit]:
    """Wire name → limit, for each string or decimal field of *view*.

    The sandbox validates requests with it and the conformance test compares
    it with SAP's published contracts, so the limits live in one place: the
    annotations above. Worked out once per view (reading a view's fields
    evaluates its annotations, which cost more than the request they check)
    and read-only.
    """
    limits: dict[str, FieldLimit] = {}
    for field in msgspec.structs.fields(view):
        limit = _limit_of(field.type)
        if limit is not None:
            limits[field.encode_name] = limit
    return MappingProxyType(limits)


def _limit_of(annotation: Any) -> FieldLimit | None:
    if typing.get_origin(annotation) in (Union, types.UnionType):
        found = [_limit_of(a) for a in typing.get_args(annotation)]
        return next((f for f in found if f is not None), None)
    if typing.get_origin(annotation) is not Annotated:
        if annotation is str:
            return FieldLimit()
        return None
    base, *metas = typing.get_args(annotation)
    for meta in metas:
        if not isinstance(meta, Meta):
            continue
        if base is str:
            return FieldLimit(max_length=meta.max_length)
        if base is Decimal and meta.extra is not None:
            return FieldLimit(scale=int(meta.extra["scale"]))
    return None
