"""Pure mapping between canonical documents and SAP S/4HANA Cloud's OData views.

Out: a canonical `Order` becomes an ``A_SalesOrder`` deep insert; an
`Account` becomes an ``A_BusinessPartner`` with the customer role. Back: the
created order becomes `OrderBooked`, a refusal `OrderRejected`, the business
events `OrderBooked` (a sales order created in SAP), `ShipmentDispatched` and
`InvoiceIssued`, ``A_Product`` the catalogue.
No I/O here; the connector calls SAP, the ingress reads its events.

Decisions that are not obvious from the field names:

* ``PurchaseOrderByCustomer`` is the order's ``customer_ref`` (``Q2C-<crm
  id>``, ≤ 35 characters, derived from the deal, so every redelivery of the
  booking command carries the same one): what SAP's customer-reference check
  compares, what the connector looks up before it creates, and what SAP's
  events echo, which is how an event finds its deal again.
* The sales area comes from the legal entity when `MappingOptions.sales_areas`
  names it, else from the order's own ``sales_org`` / ``distribution_channel``
  / ``division``.
* Prices: each item carries one manual price condition
  (`MappingOptions.price_condition`, rate per 1 unit) so SAP books the
  quote's price instead of re-pricing. The rate is ``unit_price`` when
  quantity * unit price is the line's net amount, else the effective unit
  price ``net_amount / quantity`` (a line discount).
* Navigation properties go as ``{"results": [...]}``, the form SAP's OpenAPI
  description gives for deep inserts.
* Item numbers are the canonical line number * 10 (SAP's 10, 20, …);
  ``HigherLevelItem`` is the bundle parent's, ``ExternalItemID`` the line
  number. A line that is not shipped is item category ``TAD`` (service),
  else ``TAN``.
* A business partner is found by ``SearchTerm1``. SAP keeps it upper case and
  ≤ 20 characters, and a Salesforce id is case-sensitive and 18 long, so the
  term is ``Q2C`` + 17 base-32 characters of the SHA-256 of the canonical
  account id (`search_term`): deterministic, and 85 bits against collisions.
* Text longer than SAP's field: free text is cut to SAP's length, as SAP's
  own UI would (the name to 40, the street line to 60, the city to 40); a
  code that does not fit is left out rather than cut, since a cut code is a
  wrong one (``ExternalDocumentID`` > 40; a postal code > 10; a region > 3,
  which is a state name, not SAP's region key); what must be exact and has
  nowhere to go is refused with `ValueError` (payment terms without a key,
  a tax number > 60).
* The billing address is the partner's address: the whole street line goes
  into ``StreetName`` (``HouseNumber`` stays empty), postal code and region
  upper case, as SAP keeps them. An account without a billing address gets
  an address with its country only.
* The tax id is the VAT registration number: tax number category
  ``<country>0`` (``DE0``), for the account's country; upper case, without
  blanks; ``BPTaxNumber`` up to 20 characters, else ``BPTaxLongNumber``.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

import msgspec

from adapters.erp_cloud.edm import edm_decimal
from adapters.erp_cloud.views import (
    A_BusinessPartner,
    A_BusinessPartnerAddress,
    A_BusinessPartnerRole,
    A_BusinessPartnerTaxNumber,
    A_Customer,
    A_CustomerSalesArea,
    A_Product,
    A_SalesOrder,
    A_SalesOrderItem,
    A_SalesOrderItemPrElement,
    BillingDocumentEventData,
    DeliveryEventItem,
    Navigation,
    OutboundDeliveryEventData,
    SalesOrderEventData,
    SapNotice,
    expanded,
)
from adapters.fieldmap import FieldMapping
from canonical.commerce import (
    Account,
    Invoice,
    Order,
    OrderLine,
    PriceBookEntry,
    Product,
    Shipment,
    ShipmentLine,
)
from canonical.ids import DealRef, customer_ref
from canonical.q2c import InvoiceIssued, OrderBooked, OrderRejected, ShipmentDispatched
from canonical.scalars import Money

__all__ = [
    "FIELD_MAP",
    "SalesArea",
    "MappingOptions",
    "OrderContext",
    "search_term",
    "sales_area_of",
    "to_sales_order",
    "from_sales_order",
    "erp_order_number",
    "order_booked",
    "order_rejected",
    "sales_order_booked",
    "to_business_partner",
    "partner_name",
    "to_partner_address",
    "to_tax_number",
    "address_changes",
    "tax_changes",
    "shipment_dispatched",
    "invoice_issued",
    "catalogue_entry",
    "to_sales_area",
]

_ITEM_STEP = 10
_SERVICE_ITEM = "TAD"
_STANDARD_ITEM = "TAN"
_CUSTOMER_ROLE = "FLCU01"
_STATUS = {"A": "open", "B": "in_process", "C": "completed"}


class SalesArea(msgspec.Struct, frozen=True, kw_only=True):
    """An SAP sales area: sales organization, distribution channel, division."""

    sales_organization: str
    distribution_channel: str = "10"
    division: str = "00"


class MappingOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The tenant's customizing the mapping needs.

    Attributes:
        order_type: ``SalesOrderType`` of booked orders.
        price_condition: the condition type that carries a manual price in
            the tenant's pricing procedure (``PMP0`` by default).
        sender_system: ``SenderBusinessSystemName`` on every order.
        sales_areas: legal entity → sales area.
        payment_terms: canonical payment terms → SAP's key (≤ 4 characters);
            terms not listed are sent as they are when they fit.
        partner_grouping: ``BusinessPartnerGrouping`` of new partners.
        language: ``CorrespondenceLanguage`` of new partners.
    """

    order_type: str = "OR"
    price_condition: str = "PMP0"
    sender_system: str = "Q2C_BROKER"
    sales_areas: dict[str, SalesArea] = {}
    payment_terms: dict[str, str] = {}
    partner_grouping: str | None = None
    language: str = "EN"


class OrderContext(msgspec.Struct, frozen=True, kw_only=True):
    """What a canonical `Order` holds that an SAP order does not."""

    order_id: str
    deal_id: str
    quote_id: str
    account: Account
    legal_entity: str
    region: str
    tax_country: str
    currency: str
    payment_terms: str


FIELD_MAP: tuple[FieldMapping, ...] = (
    FieldMapping("(MappingOptions.order_type)", "SalesOrderType", "OR by default"),
    FieldMapping("order.legal_entity", "SalesOrganization", "via sales_areas"),
    FieldMapping("order.sales_org", "SalesOrganization", "when no sales area"),
    FieldMapping("order.distribution_channel", "DistributionChannel"),
    FieldMapping("order.division", "OrganizationDivision"),
    FieldMapping("order.account.id", "SoldToParty", "BP found by SearchTerm1"),
    FieldMapping("order.customer_ref", "PurchaseOrderByCustomer", "the dedupe key"),
    FieldMapping("order.id", "ExternalDocumentID", "when ≤ 40 characters"),
    FieldMapping("(MappingOptions.sender_system)", "SenderBusinessSystemName"),
    FieldMapping("order.currency", "TransactionCurrency"),
    FieldMapping("order.payment_terms", "CustomerPaymentTerms", "payment_terms map"),
    FieldMapping("order.net_total", "TotalNetAmount", "computed by SAP; read back"),
    FieldMapping("order.lines[].number", "to_Item[].SalesOrderItem", "* 10"),
    FieldMapping("order.lines[].number", "to_Item[].ExternalItemID"),
    FieldMapping("order.lines[].parent", "to_Item[].HigherLevelItem", "* 10"),
    FieldMapping("order.lines[].sku", "to_Item[].Material"),
    FieldMapping("order.lines[].quantity", "to_Item[].RequestedQuantity", "≤ 3 dp"),
    FieldMapping("order.lines[].plant", "to_Item[].ProductionPlant", "if set"),
    FieldMapping(
        "order.lines[].physical", "to_Item[].SalesOrderItemCategory", "TAN/TAD"
    ),
    FieldMapping(
        "order.lines[].unit_price",
        "to_Item[].to_PricingElement[].ConditionRateValue",
        "PMP0 per 1; net/qty on discounted lines",
    ),
    FieldMapping("order.lines[].net_amount", "to_Item[].NetAmount", "computed by SAP"),
    FieldMapping("account.id", "A_BusinessPartner.SearchTerm1", "search_term()"),
    FieldMapping("account.name", "A_BusinessPartner.OrganizationBPName1", "first 40"),
    FieldMapping("account.currency", "A_CustomerSalesArea.Currency"),
    FieldMapping(
        "account.billing_address.street",
        "A_BusinessPartnerAddress.StreetName",
        "whole line, first 60",
    ),
    FieldMapping(
        "account.billing_address.city", "A_BusinessPartnerAddress.CityName", "first 40"
    ),
    FieldMapping(
        "account.billing_address.postal_code",
        "A_BusinessPartnerAddress.PostalCode",
        "upper case; left out when > 10",
    ),
    FieldMapping(
        "account.billing_address.region",
        "A_BusinessPartnerAddress.Region",
        "upper case; left out when > 3",
    ),
    FieldMapping(
        "account.billing_address.country",
        "A_BusinessPartnerAddress.Country",
        "else account.country",
    ),
    FieldMapping("(MappingOptions.language)", "A_BusinessPartnerAddress.Language"),
    FieldMapping(
        "account.country", "A_BusinessPartnerTaxNumber.BPTaxType", "<country>0 (DE0)"
    ),
    FieldMapping(
        "account.tax_id",
        "A_BusinessPartnerTaxNumber.BPTaxNumber",
        "upper case, no blanks; ≤ 20",
    ),
    FieldMapping(
        "account.tax_id",
        "A_BusinessPartnerTaxNumber.BPTaxLongNumber",
        "when > 20; refused when > 60",
    ),
    FieldMapping("(SAP event) PurchaseOrderByCustomer", "deal_id, order_id", "Q2C-X"),
    FieldMapping("shipment.number", "OutboundDelivery"),
    FieldMapping("invoice.number", "BillingDocument"),
    FieldMapping("invoice.amount", "TotalNetAmount + TransactionCurrency"),
    FieldMapping("product.sku", "A_Product.Product"),
    FieldMapping("product.family", "A_Product.ProductGroup"),
    FieldMapping("product.physical", "A_Product.ProductType", "SERV/DIEN → False"),
    FieldMapping("price.list_price / floor_price", "A_Product.ListPrice / PriceFloor"),
)


def search_term(account_id: str) -> str:
    """``SearchTerm1`` of the business partner of canonical account *account_id*."""
    digest = hashlib.sha256(account_id.encode("utf-8")).digest()
    return "Q2C" + base64.b32encode(digest).decode("ascii")[:17]


def sales_area_of(order: Order, options: MappingOptions) -> SalesArea:
    """The order's sales area: its legal entity's, else its own fields."""
    configured = options.sales_areas.get(order.legal_entity)
    if configured is not None:
        return configured
    return SalesArea(
        sales_organization=order.sales_org,
        distribution_channel=order.distribution_channel,
        division=order.division,
    )


def _payment_terms(terms: str, options: MappingOptions) -> str:
    mapped = options.payment_terms.get(terms, terms)
    if not mapped or len(mapped) > 4:
        raise ValueError(
            f"payment terms {terms!r} have no SAP key (≤ 4 characters); "
            "add them to the payment-terms map"
        )
    return mapped


def _item_number(line: int) -> str:
    number = line * _ITEM_STEP
    if number > 999_999:
        raise ValueError(f"line {line} does not fit SAP's 6-digit item number")
    return str(number)


def _rate(line: OrderLine) -> Decimal:
    exact = (line.quantity * line.unit_price).quantize(
        line.net_amount, rounding=ROUND_HALF_UP
    )
    if exact == line.net_amount:
        return edm_decimal(line.unit_price, places=9)
    return edm_decimal(line.net_amount / line.quantity, places=9)


def to_sales_order(
    order: Order, *, sold_to: str, options: MappingOptions
) -> A_SalesOrder:
    """The deep insert that books *order* for customer *sold_to*.

    Raises:
        ValueError: payment terms without an SAP key, or a line number too
            large for SAP's item numbers.
    """
    area = sales_area_of(order, options)
    items = tuple(
        A_SalesOrderItem(
            SalesOrderItem=_item_number(line.number),
            HigherLevelItem=None if line.parent is None else _item_number(line.parent),
            SalesOrderItemCategory=_STANDARD_ITEM if line.physical else _SERVICE_ITEM,
            ExternalItemID=str(line.number),
            Material=line.sku,
            RequestedQuantity=edm_decimal(line.quantity),
            ProductionPlant=line.plant or None,
            to_PricingElement=Navigation(
                results=(
                    A_SalesOrderItemPrElement(
                        ConditionType=options.price_condition,
                        ConditionRateValue=_rate(line),
                        ConditionCurrency=order.currency,
                        ConditionQuantity=Decimal(1),
                    ),
                )
            ),
        )
        for line in order.lines
    )
    return A_SalesOrder(
        SalesOrderType=options.order_type,
        SalesOrganization=area.sales_organization,
        DistributionChannel=area.distribution_channel,
        OrganizationDivision=area.division,
        SoldToParty=sold_to,
        PurchaseOrderByCustomer=order.customer_ref,
        ExternalDocumentID=order.id if len(order.id) <= 40 else None,
        SenderBusinessSystemName=options.sender_system,
        TransactionCurrency=order.currency,
        CustomerPaymentTerms=_payment_terms(order.payment_terms, options),
        to_Item=Navigation(results=items),
    )


def from_sales_order(sales_order: A_SalesOrder, context: OrderContext) -> Order:
    """The canonical `Order` an SAP order (read back, or a request) describes.

    Raises:
        ValueError: an item without material or quantity, or a value that
            does not fit the canonical model.
    """
    currency = sales_order.TransactionCurrency or context.currency
    lines = tuple(_line_of(item) for item in expanded(sales_order.to_Item))
    total = sales_order.TotalNetAmount
    if total is None:
        total = sum((line.net_amount for line in lines), Decimal(0))
    return Order(
        id=context.order_id,
        deal_id=context.deal_id,
        quote_id=context.quote_id,
        account=context.account,
        currency=currency,
        lines=lines,
        net_total=Money(amount=total, currency=currency),
        payment_terms=sales_order.CustomerPaymentTerms or context.payment_terms,
        legal_entity=context.legal_entity,
        sales_org=sales_order.SalesOrganization or "",
        distribution_channel=sales_order.DistributionChannel or "10",
        division=sales_order.OrganizationDivision or "00",
        region=context.region,
        erp="cloud",
        customer_ref=sales_order.PurchaseOrderByCustomer or _ref_of(context),
        tax_country=context.tax_country,
    )


def _ref_of(context: OrderContext) -> str:
    return customer_ref(context.deal_id)


def _line_of(item: A_SalesOrderItem) -> OrderLine:
    if not item.Material or item.RequestedQuantity is None:
        raise ValueError(f"item {item.SalesOrderItem} has no material or quantity")
    number = _line_number(item.ExternalItemID, item.SalesOrderItem)
    parent = (
        None
        if not item.HigherLevelItem
        else int(item.HigherLevelItem) // _ITEM_STEP or int(item.HigherLevelItem)
    )
    rates = [
        e.ConditionRateValue / (e.ConditionQuantity or Decimal(1))
        for e in expanded(item.to_PricingElement)
        if e.ConditionRateValue is not None
    ]
    unit_price = rates[-1] if rates else Decimal(0)
    net = item.NetAmount
    if net is None:
        net = (item.RequestedQuantity * unit_price).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_UP
        )
    return OrderLine(
        number=number,
        sku=item.Material,
        quantity=item.RequestedQuantity,
        unit_price=unit_price,
        net_amount=net,
        physical=item.SalesOrderItemCategory != _SERVICE_ITEM,
        parent=parent,
        plant=item.ProductionPlant or "",
    )


def _line_number(external: str | None, item: str | None) -> int:
    if external and external.isdigit():
        return int(external)
    if item and item.isdigit():
        return int(item) // _ITEM_STEP or int(item)
    raise ValueError(f"item {item!r} has no usable number")


def erp_order_number(number: str) -> str:
    """SAP's sales order number in its external form: ``0000004711`` → ``4711``.

    The OData API returns it so; the business events and some tenants' create
    responses send it zero-padded. Every booking takes its number from here,
    so the echo of a create names the order as the create's response did.
    """
    return str(int(number)) if number.isdigit() else number


def order_booked(
    order: Order, created: A_SalesOrder, notices: Sequence[SapNotice] = ()
) -> OrderBooked:
    """``erp.order.booked`` for the order SAP created (or had created before)."""
    currency = created.TransactionCurrency or order.currency
    total = created.TotalNetAmount
    return OrderBooked(
        order_id=order.id,
        deal_id=order.deal_id,
        erp="cloud",
        erp_order_id=erp_order_number(created.SalesOrder or ""),
        status=_STATUS.get(created.OverallSDProcessStatus or "", "open"),
        net_total=order.net_total
        if total is None
        else Money(amount=total, currency=currency),
        customer_ref=created.PurchaseOrderByCustomer or order.customer_ref,
        warnings=tuple(
            f"{n.code}: {n.message}" if n.code else n.message for n in notices
        ),
    )


def sales_order_booked(data: SalesOrderEventData, ref: DealRef) -> OrderBooked:
    """``erp.order.booked`` for a sales order SAP announced as created.

    For a refused order a clerk keyed in SAP by hand (with the deal's
    customer reference) this is the booking the deal resumes from; for an
    order the connector created it is the echo of that booking, with the
    same number, which the deal takes as a repeat. The number is in SAP's
    external form (`erp_order_number`), as `order_booked`'s is.

    Raises:
        ValueError: the event carries no amount or currency.
    """
    if data.TotalNetAmount is None or not data.TransactionCurrency:
        raise ValueError(f"sales order {data.SalesOrder} has no amount")
    number = data.SalesOrder
    return OrderBooked(
        order_id=ref.order_id,
        deal_id=ref.deal_id,
        erp="cloud",
        erp_order_id=erp_order_number(number),
        status=_STATUS.get(data.OverallSDProcessStatus or "", "open"),
        net_total=Money(amount=data.TotalNetAmount, currency=data.TransactionCurrency),
        customer_ref=data.PurchaseOrderByCustomer or customer_ref(ref.deal_id),
    )


def order_rejected(order: Order, *, code: str, message: str) -> OrderRejected:
    """``erp.order.rejected``: SAP refused the order (fallout)."""
    return OrderRejected(
        order_id=order.id,
        deal_id=order.deal_id,
        erp="cloud",
        code=code,
        message=message[:2000],
        net_total=order.net_total,
    )


def partner_name(account: Account) -> str:
    """``OrganizationBPName1``: the account's name, cut to SAP's 40 characters."""
    return _cut(account.name, 40)


def _cut(text: str, length: int) -> str:
    # SAP drops trailing blanks (ABAP CHAR); a cut that ends in one would
    # otherwise differ from what SAP keeps on every comparison.
    return text.strip()[:length].rstrip()


def to_business_partner(
    account: Account,
    *,
    areas: Iterable[SalesArea],
    payment_terms: str | None,
    options: MappingOptions,
) -> A_BusinessPartner:
    """A business partner (organisation) with the customer role in *areas*.

    It is created with its address (`to_partner_address`) and, when the
    account has a tax id, its VAT registration number (`to_tax_number`).

    Raises:
        ValueError: a tax id SAP has no room for (see `to_tax_number`).
    """
    tax = to_tax_number(account)
    return A_BusinessPartner(
        BusinessPartnerCategory="2",
        BusinessPartnerGrouping=options.partner_grouping,
        OrganizationBPName1=partner_name(account),
        SearchTerm1=search_term(account.id),
        CorrespondenceLanguage=options.language,
        to_BusinessPartnerRole=Navigation(
            results=(A_BusinessPartnerRole(BusinessPartnerRole=_CUSTOMER_ROLE),)
        ),
        to_BusinessPartnerAddress=Navigation(
            results=(to_partner_address(account, language=options.language),)
        ),
        to_BusinessPartnerTax=Navigation(results=() if tax is None else (tax,)),
        to_Customer=A_Customer(
            to_CustomerSalesArea=Navigation(
                results=tuple(
                    to_sales_area(area, account=account, payment_terms=payment_terms)
                    for area in areas
                )
            )
        ),
    )


#: The address fields an account with a billing address owns in SAP; without
#: one, it owns the country only (`address_changes`).
_ADDRESS_FIELDS = (
    "StreetName",
    "HouseNumber",
    "CityName",
    "PostalCode",
    "Region",
    "Country",
)
_TAX_NUMBER_MAX = 20
_TAX_LONG_NUMBER_MAX = 60


def to_partner_address(
    account: Account, *, language: str | None = None
) -> A_BusinessPartnerAddress:
    """The partner's address: the account's billing address, else its country.

    Street and city are cut to SAP's length (60, 40) like the name; a postal
    code longer than 10 characters or a region longer than 3 (a state name,
    not SAP's region key) is left out, not cut. *language* is the address's
    ``Language`` (SAP's logon language when None).
    """
    address = account.billing_address
    if address is None:
        return A_BusinessPartnerAddress(Country=account.country, Language=language)
    postal_code = address.postal_code.strip().upper()
    region = (address.region or "").strip().upper()
    return A_BusinessPartnerAddress(
        StreetName=_cut(address.street, 60) or None,
        CityName=_cut(address.city, 40) or None,
        PostalCode=postal_code if 0 < len(postal_code) <= 10 else None,
        Region=region if 0 < len(region) <= 3 else None,
        Country=address.country,
        Language=language,
    )


def to_tax_number(account: Account) -> A_BusinessPartnerTaxNumber | None:
    """The account's VAT registration number, of category ``<country>0``; None without.

    The tax id is upper-cased and its blanks removed (``de 123 456 789`` is
    ``DE123456789``), as SAP keeps it; up to 20 characters it is
    ``BPTaxNumber``, longer ``BPTaxLongNumber``.

    Raises:
        ValueError: the tax id is longer than 60 characters: SAP has no room
            for it, and a cut tax number would be a wrong one on invoices.
    """
    number = "".join((account.tax_id or "").split()).upper()
    if not number:
        return None
    if len(number) > _TAX_LONG_NUMBER_MAX:
        raise ValueError(
            f"tax id of account {account.id} has {len(number)} characters; "
            f"SAP keeps at most {_TAX_LONG_NUMBER_MAX}"
        )
    short = len(number) <= _TAX_NUMBER_MAX
    return A_BusinessPartnerTaxNumber(
        BPTaxType=f"{account.country}0",
        BPTaxNumber=number if short else None,
        BPTaxLongNumber=None if short else number,
    )


def address_changes(
    current: A_BusinessPartnerAddress, account: Account
) -> A_BusinessPartnerAddress | None:
    """The PATCH that gives SAP's *current* address the account's; None if it has it.

    With a billing address the account owns street, house number, city,
    postal code, region and country: each that differs is written, and one
    the account lacks is cleared (``""``; the house number, say, since the
    whole street line is in ``StreetName``). Without one it owns only the
    country: an address kept in SAP is not wiped because the CRM has none.
    Empty and absent compare equal.
    """
    wanted = to_partner_address(account)
    owned = _ADDRESS_FIELDS if account.billing_address is not None else ("Country",)
    changes = {
        name: getattr(wanted, name) or ""
        for name in owned
        if (getattr(wanted, name) or "") != (getattr(current, name) or "")
    }
    if not changes:
        return None
    return msgspec.structs.replace(A_BusinessPartnerAddress(), **changes)


def tax_changes(
    current: A_BusinessPartnerTaxNumber, wanted: A_BusinessPartnerTaxNumber
) -> A_BusinessPartnerTaxNumber | None:
    """The PATCH that gives *current* the number of *wanted*; None if it has it.

    The number is compared as SAP means it (the long field when set, else the
    short one), so an SAP that copies a short number into the long field
    too reads as unchanged. A change writes the field the new number belongs
    in and clears the other when SAP has something in it.
    """
    if _tax_number_of(current) == _tax_number_of(wanted):
        return None
    changes: dict[str, str] = {}
    for name in ("BPTaxNumber", "BPTaxLongNumber"):
        value = getattr(wanted, name) or ""
        if value or getattr(current, name):
            changes[name] = value
    return msgspec.structs.replace(A_BusinessPartnerTaxNumber(), **changes)


def _tax_number_of(tax: A_BusinessPartnerTaxNumber) -> str:
    return tax.BPTaxLongNumber or tax.BPTaxNumber or ""


def to_sales_area(
    area: SalesArea,
    *,
    account: Account,
    payment_terms: str | None,
    customer: str | None = None,
) -> A_CustomerSalesArea:
    """The customer's data in one sales area."""
    return A_CustomerSalesArea(
        Customer=customer,
        SalesOrganization=area.sales_organization,
        DistributionChannel=area.distribution_channel,
        Division=area.division,
        Currency=account.currency,
        CustomerPaymentTerms=payment_terms,
    )


def shipment_dispatched(
    data: OutboundDeliveryEventData, ref: DealRef, *, at: datetime | None
) -> ShipmentDispatched:
    """``erp.shipment.dispatched`` for an outbound delivery.

    Raises:
        ValueError: an item's ``ActualDeliveryQuantity`` is not a quantity the
            canonical model takes (zero, negative, not finite, too large);
            the message names the delivery, the item and the field.
    """
    return ShipmentDispatched(
        shipment=Shipment(
            id=f"shipment-cloud-{data.OutboundDelivery}",
            order_id=ref.order_id,
            number=data.OutboundDelivery,
            lines=tuple(_shipment_line(data, item) for item in data.Items),
            dispatched_at=data.EventRaisedDateTime or at,
        ),
        deal_id=ref.deal_id,
        erp="cloud",
    )


def _shipment_line(
    data: OutboundDeliveryEventData, item: DeliveryEventItem
) -> ShipmentLine:
    try:
        return ShipmentLine(sku=item.Material, quantity=item.ActualDeliveryQuantity)
    except ValueError as exc:
        raise ValueError(
            f"outbound delivery {data.OutboundDelivery} item {item.Material}: "
            f"ActualDeliveryQuantity: {exc}"
        ) from exc


#: Billing document types that are not an invoice, and what they are
#: (``Invoice.status``); F1/F2 and the other F types are invoices ("issued").
BILLING_DOCUMENT_KINDS = {
    "S1": "cancellation",
    "S2": "cancellation",
    "G2": "credit_memo",
    "RE": "credit_memo",
    "L2": "debit_memo",
}


def invoice_issued(
    data: BillingDocumentEventData, ref: DealRef, *, at: datetime | None
) -> InvoiceIssued:
    """``erp.invoice.issued`` for a billing document.

    Its ``status`` says what the document is: ``issued`` for an invoice
    (``BillingDocumentType`` F…, or none given), else the kind named in
    `BILLING_DOCUMENT_KINDS` (a cancellation, a credit memo), or
    ``other:<type>``: not the order's invoice.

    Raises:
        ValueError: the event carries no amount or currency.
    """
    if data.TotalNetAmount is None or not data.TransactionCurrency:
        raise ValueError(f"billing document {data.BillingDocument} has no amount")
    kind = data.BillingDocumentType
    status = (
        "issued"
        if not kind or kind.startswith("F")
        else BILLING_DOCUMENT_KINDS.get(kind, f"other:{kind}")
    )
    return InvoiceIssued(
        invoice=Invoice(
            id=f"invoice-cloud-{data.BillingDocument}",
            order_id=ref.order_id,
            number=data.BillingDocument,
            amount=Money(amount=data.TotalNetAmount, currency=data.TransactionCurrency),
            status=status,
            issued_at=data.EventRaisedDateTime or at,
        ),
        deal_id=ref.deal_id,
        erp="cloud",
    )


#: The product type the tenant uses for products billed per period.
SUBSCRIPTION_TYPE = "ZSUB"


def catalogue_entry(
    product: A_Product, *, default_currency: str
) -> tuple[Product, PriceBookEntry | None]:
    """A product of ``API_PRODUCT_SRV`` and its price book entry (None: unpriced).

    Product type ``SERV``/``DIEN`` is a service and ``ZSUB`` (the tenant's own
    type for subscriptions) is billed per period; neither ships.
    """
    canonical = Product(
        sku=product.Product,
        name=product.ProductDescription or product.Product,
        family=product.ProductGroup or "UNGROUPED",
        recurring=product.ProductType == SUBSCRIPTION_TYPE,
        physical=product.ProductType not in ("SERV", "DIEN", SUBSCRIPTION_TYPE),
        active=not product.IsMarkedForDeletion,
    )
    if product.ListPrice is None:
        return canonical, None
    price = PriceBookEntry(
        sku=product.Product,
        currency=product.Currency or default_currency,
        list_price=product.ListPrice,
        floor_price=product.PriceFloor
        if product.PriceFloor is not None
        else product.ListPrice,
    )
    return canonical, price
