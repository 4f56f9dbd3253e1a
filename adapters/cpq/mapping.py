"""Pure mapping between canonical quotes and products and Salesforce CPQ records.

Decisions that are not obvious from the field names:

* Line numbers are ``SBQQ__Number__c`` (1, 2, … when the org leaves it
  empty). A bundle option's ``parent`` is its parent line's number, found
  through ``SBQQ__RequiredBy__c`` (records) or ``parentItemKey`` (a
  QuoteModel, whose ``key`` the mapping sets to the line number).
* A line is recurring when ``SBQQ__SubscriptionPricing__c`` is set; it is
  physical as ``Physical__c`` says (a formula over the product's flag, which
  the product sync writes), else when it is not recurring.
* Status: the picklist maps one to one where it can; ``Presented`` counts as
  approved and ``Rejected`` as denied. ``SBQQ__Ordered__c`` wins: an ordered
  quote is ``ordered`` whatever its picklist says. Writing ``ordered`` sets
  the flag and leaves the picklist alone. The status written back is also
  kept verbatim in ``Broker_Status__c``.
* Tax country: ``SBQQ__ShippingCountry__c``, else ``SBQQ__BillingCountry__c``
  (both must hold ISO codes), else the caller's fallback (the account's).
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from adapters.cpq import views as v
from adapters.crm.mapping import canonical_id, checked, native_id
from adapters.crm.views import as_date
from adapters.decimals import bounded
from adapters.fieldmap import FieldMapping
from broker.errors import SchemaInvalid
from canonical.commerce import PriceBookEntry, Product, Quote, QuoteLine, QuoteStatus
from canonical.ids import ACCOUNT, OPPORTUNITY, QUOTE
from canonical.q2c import QuoteUpdateRequested
from canonical.scalars import Money

__all__ = [
    "FIELD_MAP",
    "STATUS_FROM_CPQ",
    "STATUS_TO_CPQ",
    "SUBSCRIPTION_PRICING",
    "quote_from_records",
    "quote_from_model",
    "quote_to_model",
    "quote_update",
    "product_to_sf",
    "product_from_sf",
    "price_key",
    "price_to_sf",
    "price_from_sf",
]

STATUS_FROM_CPQ: dict[str, QuoteStatus] = {
    v.QuoteStatus.DRAFT: "draft",
    v.QuoteStatus.IN_REVIEW: "in_review",
    v.QuoteStatus.APPROVED: "approved",
    v.QuoteStatus.PRESENTED: "approved",
    v.QuoteStatus.DENIED: "denied",
    v.QuoteStatus.REJECTED: "denied",
    v.QuoteStatus.ACCEPTED: "accepted",
}
STATUS_TO_CPQ: dict[str, str] = {
    "draft": v.QuoteStatus.DRAFT,
    "in_review": v.QuoteStatus.IN_REVIEW,
    "approved": v.QuoteStatus.APPROVED,
    "denied": v.QuoteStatus.DENIED,
    "accepted": v.QuoteStatus.ACCEPTED,
}
#: ``SBQQ__SubscriptionPricing__c`` written for a recurring line or product.
SUBSCRIPTION_PRICING = "Fixed Price"

FIELD_MAP: tuple[FieldMapping, ...] = (
    FieldMapping("quote.id", "SBQQ__Quote__c.Id", "quote- + 18-character id"),
    FieldMapping("quote.opportunity_id", "SBQQ__Opportunity2__c", "opp- + id"),
    FieldMapping("quote.account_id", "SBQQ__Account__c", "acct- + id"),
    FieldMapping("quote.currency", "CurrencyIsoCode", "else default-currency"),
    FieldMapping("quote.net_total", "SBQQ__NetAmount__c", "QuoteModel: netTotal"),
    FieldMapping(
        "quote.status",
        "SBQQ__Status__c + SBQQ__Ordered__c",
        "Presented → approved, Rejected → denied; Ordered wins",
    ),
    FieldMapping("quote.primary", "SBQQ__Primary__c"),
    FieldMapping(
        "quote.tax_country",
        "SBQQ__ShippingCountry__c",
        "else SBQQ__BillingCountry__c, else the account's",
    ),
    FieldMapping("quote.start_date", "SBQQ__StartDate__c"),
    FieldMapping("quote.lines[].number", "SBQQ__Number__c", "QuoteModel: key"),
    FieldMapping("quote.lines[].sku", "SBQQ__ProductCode__c"),
    FieldMapping("quote.lines[].product_name", "SBQQ__ProductName__c"),
    FieldMapping("quote.lines[].family", "SBQQ__ProductFamily__c"),
    FieldMapping("quote.lines[].quantity", "SBQQ__Quantity__c"),
    FieldMapping("quote.lines[].list_price", "SBQQ__ListPrice__c"),
    FieldMapping("quote.lines[].unit_price", "SBQQ__NetPrice__c"),
    FieldMapping("quote.lines[].net_total", "SBQQ__NetTotal__c"),
    FieldMapping(
        "quote.lines[].recurring",
        "SBQQ__SubscriptionPricing__c",
        f"set ⇔ recurring ({SUBSCRIPTION_PRICING!r})",
    ),
    FieldMapping("quote.lines[].physical", "Physical__c", "else not recurring"),
    FieldMapping("quote.lines[].term_months", "SBQQ__SubscriptionTerm__c"),
    FieldMapping(
        "quote.lines[].parent",
        "SBQQ__RequiredBy__c",
        "parent line's number; QuoteModel: parentItemKey",
    ),
    FieldMapping("update.status", "SBQQ__Status__c", "known statuses; ordered → flag"),
    FieldMapping("update.status", "Broker_Status__c", "verbatim"),
    FieldMapping("update.order_number", "ERP_Order_Number__c"),
    FieldMapping("(idempotency key)", "Broker_Command_Key__c", "as for the CRM"),
    FieldMapping("product.sku", "Product2.ProductCode + Broker_Key__c"),
    FieldMapping("product.name", "Product2.Name"),
    FieldMapping("product.family", "Product2.Family"),
    FieldMapping("product.recurring", "Product2.SBQQ__SubscriptionPricing__c"),
    FieldMapping("product.physical", "Product2.Physical__c"),
    FieldMapping("product.active", "Product2.IsActive"),
    FieldMapping("price.list_price", "PricebookEntry.UnitPrice", "standard book"),
    FieldMapping("price.floor_price", "PricebookEntry.Floor_Price__c"),
    FieldMapping("price.currency", "PricebookEntry.CurrencyIsoCode"),
    FieldMapping("(price key)", "PricebookEntry.Broker_Key__c", "<sku>:<currency>"),
)


def _status(quote: v.Quote) -> QuoteStatus:
    if quote.SBQQ__Ordered__c:
        return "ordered"
    status = STATUS_FROM_CPQ.get(quote.SBQQ__Status__c or v.QuoteStatus.DRAFT)
    if status is None:
        raise SchemaInvalid(
            f"crm: quote {quote.Id}: unknown SBQQ__Status__c {quote.SBQQ__Status__c!r}"
        )
    return status


def _tax_country(quote: v.Quote, fallback: str | None) -> str:
    for value in (quote.SBQQ__ShippingCountry__c, quote.SBQQ__BillingCountry__c):
        if value:
            return value.upper()
    if fallback is None:
        raise SchemaInvalid(f"crm: quote {quote.Id} has no shipping or billing country")
    return fallback


def _line(line: v.QuoteLine, number: int, parent: int | None) -> QuoteLine:
    quantity = _bounded(line, "SBQQ__Quantity__c")
    if not line.SBQQ__ProductCode__c or quantity is None:
        raise SchemaInvalid(
            f"crm: quote line {line.Id} has no product code or quantity"
        )
    list_price = _bounded(line, "SBQQ__ListPrice__c") or Decimal(0)
    unit_price = next(
        (
            p
            for p in (
                _bounded(line, "SBQQ__NetPrice__c"),
                _bounded(line, "SBQQ__CustomerPrice__c"),
            )
            if p is not None
        ),
        list_price,
    )
    net_total = _bounded(line, "SBQQ__NetTotal__c")
    recurring = bool(line.SBQQ__SubscriptionPricing__c)
    term = _bounded(line, "SBQQ__SubscriptionTerm__c")
    try:
        return QuoteLine(
            number=number,
            sku=line.SBQQ__ProductCode__c,
            product_name=line.SBQQ__ProductName__c or "",
            family=line.SBQQ__ProductFamily__c or "",
            quantity=quantity,
            list_price=list_price,
            unit_price=unit_price,
            net_total=net_total if net_total is not None else unit_price * quantity,
            recurring=recurring,
            physical=line.Physical__c
            if line.Physical__c is not None
            else not recurring,
            term_months=int(term) if recurring and term is not None else None,
            parent=parent,
        )
    except ValueError as exc:  # a zero or negative quantity, say
        raise SchemaInvalid(f"crm: quote line {line.Id}: {exc}") from exc


def _bounded(line: v.QuoteLine, field: str) -> Decimal | None:
    """The line's number *field*, refused (naming it) when it is absurd.

    Checked before any arithmetic or ``int()``: ``NaN``, ``Infinity`` or
    ``1e999999`` would otherwise raise decimal errors, or burn seconds of CPU.
    """
    value: Decimal | None = getattr(line, field)
    if value is None:
        return None
    try:
        return bounded(value, field)
    except ValueError as exc:
        raise SchemaInvalid(f"crm: quote line {line.Id}: {exc}") from exc


def _numbers(lines: Sequence[v.QuoteLine]) -> list[int]:
    numbers = [_bounded(line, "SBQQ__Number__c") for line in lines]
    return [
        int(number) if number is not None else n
        for n, number in enumerate(numbers, start=1)
    ]


def _quote(
    quote: v.Quote,
    lines: tuple[QuoteLine, ...],
    net_total: Decimal | None,
    *,
    default_currency: str,
    fallback_country: str | None,
) -> Quote:
    if not quote.Id or not quote.SBQQ__Opportunity2__c or not quote.SBQQ__Account__c:
        raise SchemaInvalid("crm: a quote needs an Id, an opportunity and an account")
    currency = quote.CurrencyIsoCode or default_currency
    total = net_total if net_total is not None else quote.SBQQ__NetAmount__c
    if total is None:
        total = sum((line.net_total for line in lines), Decimal(0))
    try:
        result = Quote(
            id=canonical_id(QUOTE, quote.Id),
            opportunity_id=canonical_id(OPPORTUNITY, quote.SBQQ__Opportunity2__c),
            account_id=canonical_id(ACCOUNT, quote.SBQQ__Account__c),
            currency=currency,
            lines=lines,
            net_total=Money(amount=total, currency=currency),
            status=_status(quote),
            primary=bool(quote.SBQQ__Primary__c),
            tax_country=_tax_country(quote, fallback_country),
            start_date=as_date(quote.SBQQ__StartDate__c),
        )
    except ValueError as exc:
        raise SchemaInvalid(f"crm: quote {quote.Id}: {exc}") from exc
    return checked(result)


def quote_from_records(
    quote: v.Quote,
    lines: Sequence[v.QuoteLine],
    *,
    default_currency: str,
    fallback_country: str | None = None,
) -> Quote:
    """The canonical quote of a quote record and its line records.

    Args:
        quote: the ``SBQQ__Quote__c`` record.
        lines: its lines, in line-number order.
        default_currency: for single-currency orgs.
        fallback_country: the tax country when the quote names none.

    Raises:
        SchemaInvalid: a missing link, code or country, or invalid values.
    """
    numbers = _numbers(lines)
    by_id = {line.Id: n for line, n in zip(lines, numbers, strict=True) if line.Id}
    mapped = tuple(
        _line(line, n, by_id.get(line.SBQQ__RequiredBy__c or ""))
        for line, n in zip(lines, numbers, strict=True)
    )
    return _quote(
        quote,
        mapped,
        None,
        default_currency=default_currency,
        fallback_country=fallback_country,
    )


def quote_from_model(
    model: v.QuoteModel,
    *,
    default_currency: str,
    fallback_country: str | None = None,
) -> Quote:
    """The canonical quote of a CPQ API QuoteModel.

    Raises:
        SchemaInvalid: a missing link, code or country, or invalid values.
    """
    records = [item.record for item in model.line_items]
    numbers = _numbers(records)
    by_key = {item.key: n for item, n in zip(model.line_items, numbers, strict=True)}
    by_id = {rec.Id: n for rec, n in zip(records, numbers, strict=True) if rec.Id}
    mapped = tuple(
        _line(
            item.record,
            n,
            by_key.get(item.parent_item_key)
            if item.parent_item_key is not None
            else by_id.get(item.record.SBQQ__RequiredBy__c or ""),
        )
        for item, n in zip(model.line_items, numbers, strict=True)
    )
    return _quote(
        model.record,
        mapped,
        model.net_total,
        default_currency=default_currency,
        fallback_country=fallback_country,
    )


def quote_to_model(quote: Quote) -> v.QuoteModel:
    """The QuoteModel whose `quote_from_model` is *quote*."""
    parents = {line.parent for line in quote.lines if line.parent is not None}
    status = STATUS_TO_CPQ.get(quote.status, v.QuoteStatus.ACCEPTED)
    record = v.Quote(
        Id=native_id(quote.id, QUOTE),
        SBQQ__Opportunity2__c=native_id(quote.opportunity_id, OPPORTUNITY),
        SBQQ__Account__c=native_id(quote.account_id, ACCOUNT),
        SBQQ__Primary__c=quote.primary,
        SBQQ__Status__c=status,
        SBQQ__Ordered__c=quote.status == "ordered",
        SBQQ__StartDate__c=quote.start_date,
        SBQQ__NetAmount__c=quote.net_total.amount,
        SBQQ__ShippingCountry__c=quote.tax_country,
        CurrencyIsoCode=quote.currency,
    )
    items = tuple(
        v.QuoteLineModel(
            key=line.number,
            parent_item_key=line.parent,
            record=v.QuoteLine(
                SBQQ__Number__c=Decimal(line.number),
                SBQQ__ProductCode__c=line.sku,
                SBQQ__ProductName__c=line.product_name or None,
                SBQQ__ProductFamily__c=line.family or None,
                SBQQ__Quantity__c=line.quantity,
                SBQQ__ListPrice__c=line.list_price,
                SBQQ__NetPrice__c=line.unit_price,
                SBQQ__NetTotal__c=line.net_total,
                SBQQ__SubscriptionPricing__c=SUBSCRIPTION_PRICING
                if line.recurring
                else None,
                SBQQ__SubscriptionTerm__c=Decimal(line.term_months)
                if line.term_months is not None
                else None,
                SBQQ__Bundle__c=True if line.number in parents else None,
                Physical__c=line.physical,
            ),
        )
        for line in quote.lines
    )
    return v.QuoteModel(
        record=record,
        line_items=items,
        next_key=max((line.number for line in quote.lines), default=0) + 1,
        net_total=quote.net_total.amount,
    )


def quote_update(command: QuoteUpdateRequested, *, key: str) -> v.Quote:
    """The PATCH body that writes the order's status to the quote.

    A canonical quote status sets ``SBQQ__Status__c`` (``ordered`` sets
    ``SBQQ__Ordered__c`` instead); any status is kept in ``Broker_Status__c``.
    """
    return v.Quote(
        SBQQ__Status__c=STATUS_TO_CPQ.get(command.status),
        SBQQ__Ordered__c=True if command.status == "ordered" else None,
        Broker_Status__c=command.status,
        ERP_Order_Number__c=command.order_number,
        Broker_Command_Key__c=key,
    )


def product_to_sf(product: Product) -> v.Product2:
    """The ``Product2`` upserted for *product* (keyed by its SKU)."""
    return v.Product2(
        Name=product.name,
        ProductCode=product.sku,
        Family=product.family,
        IsActive=product.active,
        SBQQ__SubscriptionPricing__c=SUBSCRIPTION_PRICING
        if product.recurring
        else None,
        Physical__c=product.physical,
        Broker_Key__c=product.sku,
    )


def product_from_sf(record: v.Product2) -> Product:
    """The canonical product of a ``Product2`` record.

    Raises:
        SchemaInvalid: no code or name, or invalid values.
    """
    sku = record.ProductCode or record.Broker_Key__c
    if not sku or not record.Name:
        raise SchemaInvalid(f"crm: Product2 {record.Id} has no ProductCode or Name")
    recurring = bool(record.SBQQ__SubscriptionPricing__c)
    return checked(
        Product(
            sku=sku,
            name=record.Name,
            family=record.Family or "",
            recurring=recurring,
            physical=record.Physical__c
            if record.Physical__c is not None
            else not recurring,
            active=record.IsActive is not False,
        )
    )


def price_key(sku: str, currency: str) -> str:
    """``Broker_Key__c`` of a price book entry: ``<sku>:<currency>``."""
    return f"{sku}:{currency}"


def price_to_sf(
    entry: PriceBookEntry, *, product_id: str | None, pricebook_id: str | None
) -> v.PricebookEntry:
    """The ``PricebookEntry`` upserted for *entry*.

    The price book and product are set only on creation (the fields cannot
    be updated): pass None for an entry that exists.
    """
    return v.PricebookEntry(
        Pricebook2Id=pricebook_id,
        Product2Id=product_id,
        UnitPrice=entry.list_price,
        Floor_Price__c=entry.floor_price,
        CurrencyIsoCode=entry.currency,
        IsActive=True,
    )


def price_from_sf(record: v.PricebookEntry, *, sku: str) -> PriceBookEntry:
    """The canonical price of a ``PricebookEntry`` of product *sku*.

    Raises:
        SchemaInvalid: no price or currency, or invalid values.
    """
    if record.UnitPrice is None or not record.CurrencyIsoCode:
        raise SchemaInvalid(f"crm: PricebookEntry {record.Id} has no price or currency")
    floor = (
        record.Floor_Price__c if record.Floor_Price__c is not None else record.UnitPrice
    )
    try:
        price = PriceBookEntry(
            sku=sku,
            currency=record.CurrencyIsoCode,
            list_price=record.UnitPrice,
            floor_price=floor,
        )
    except ValueError as exc:
        raise SchemaInvalid(f"crm: PricebookEntry {record.Id}: {exc}") from exc
    return checked(price)
