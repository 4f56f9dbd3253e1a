"""Turn a validated quote into the order an ERP books.

Every table comes from the reference data (``config/reference.toml``), none
from constants here:

- **legal entity** by the account's country, and from it the sales
  organisation, distribution channel and division;
- **region** by the account's country;
- **payment terms**: the first ``[[payment-terms.rules]]`` entry matching the
  account's country and the order's net total (in its currency), else the
  default;
- **plant** per line: the entity's plant for physical lines, its service plant
  for the others;
- **tax code** per line, in the quote's tax country: ``exempt`` if the family
  is exempt there; else ``reverse-charge`` when that country has a
  reverse-charge code, the account has a tax id and the selling entity is
  registered elsewhere; else the family's treatment there (``standard`` when
  not listed);
- **revenue class** per line: recurring, then physical, then by family, then
  the default.

Whether a line is recurring or physical comes from the catalogue's `Product`
(the ERP masters it), not from the quote line. Amounts are quantized to the
currency's minor unit; the order's net total is the sum of its lines. The
customer reference (SAP ``PurchaseOrderByCustomer``, at most 35 characters)
is derived from the order id alone, so a retried booking carries the same
reference and the ERP's duplicate check finds it.

The functions are pure. They expect a quote that passed `validate_quote`;
given an unknown SKU or a tax country with no jurisdiction they raise
`ValueError` (a bug in the caller, not a business exception).
"""

from __future__ import annotations

from decimal import Decimal

from actors.workflows.routing import RouteDecision
from actors.workflows.rules import ReferenceData, TaxJurisdiction
from canonical import ids
from canonical.commerce import Account, Order, OrderLine, Product, Quote, QuoteLine
from canonical.scalars import MINOR_UNITS, Money

__all__ = [
    "customer_ref",
    "tax_code",
    "revenue_class",
    "enrich_order",
]


def customer_ref(deal_id: str) -> str:
    """The order's customer reference: ``Q2C-<crm id>`` (see `canonical.ids`).

    Readable in the ERP and reversible: every confirmation, delivery and
    invoice that echoes it leads back to the deal without a lookup.

    Raises:
        ValueError: the reference would exceed the ERP's 35 characters.
    """
    return ids.customer_ref(deal_id)


def _product(ref: ReferenceData, line: QuoteLine) -> Product:
    product = ref.products.get(line.sku)
    if product is None:
        raise ValueError(f"line {line.number} {line.sku}: unknown SKU (not validated?)")
    return product


def _jurisdiction(ref: ReferenceData, country: str) -> TaxJurisdiction:
    jurisdiction = ref.policy.tax.get(country)
    if jurisdiction is None:
        raise ValueError(f"tax country {country}: no tax jurisdiction (not validated?)")
    return jurisdiction


def tax_code(
    jurisdiction: TaxJurisdiction,
    family: str,
    *,
    business_buyer: bool,
    cross_border: bool,
) -> str:
    """The ERP tax code for a line of *family* in *jurisdiction*.

    Args:
        jurisdiction: the tax country's table.
        family: the product family.
        business_buyer: the account has a tax id.
        cross_border: the selling entity is registered outside the tax country.
    """
    codes = jurisdiction.codes
    treatment = jurisdiction.families.get(family, "standard")
    if treatment == "exempt" and codes.exempt is not None:
        return codes.exempt
    if business_buyer and cross_border and codes.reverse_charge is not None:
        return codes.reverse_charge
    if treatment == "reduced" and codes.reduced is not None:
        return codes.reduced
    return codes.standard


def revenue_class(product: Product, ref: ReferenceData) -> str:
    """The revenue class of a line selling *product*."""
    classes = ref.policy.revenue_classes
    if product.recurring:
        return classes.recurring
    if product.physical:
        return classes.physical
    return classes.by_family.get(product.family, classes.default)


def _quantized(amount: Decimal, currency: str) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-MINOR_UNITS.get(currency, 2)))


def enrich_order(
    quote: Quote,
    account: Account,
    decision: RouteDecision,
    ref: ReferenceData,
    *,
    deal_id: str,
    order_id: str,
) -> Order:
    """Build the order for the ERP *decision* chose from a validated *quote*.

    Raises:
        ValueError: a SKU is unknown or the tax country has no jurisdiction
            (`validate_quote` reports both).
    """
    policy = ref.policy
    currency = quote.currency
    entity_code = policy.legal_entity.for_country(account.country)
    entity = policy.entities[entity_code]
    jurisdiction = _jurisdiction(ref, quote.tax_country)
    business_buyer = bool(account.tax_id)
    cross_border = entity.country != quote.tax_country

    lines: list[OrderLine] = []
    total = Decimal(0)
    for line in quote.lines:
        product = _product(ref, line)
        net = _quantized(line.net_total, currency)
        total += net
        lines.append(
            OrderLine(
                number=line.number,
                sku=line.sku,
                quantity=line.quantity,
                unit_price=line.unit_price,
                net_amount=net,
                recurring=product.recurring,
                physical=product.physical,
                term_months=line.term_months,
                parent=line.parent,
                plant=entity.plant if product.physical else entity.service_plant,
                tax_code=tax_code(
                    jurisdiction,
                    product.family,
                    business_buyer=business_buyer,
                    cross_border=cross_border,
                ),
                revenue_class=revenue_class(product, ref),
            )
        )
    net_total = Money(amount=total, currency=currency).quantized()
    return Order(
        id=order_id,
        deal_id=deal_id,
        quote_id=quote.id,
        account=account,
        currency=currency,
        lines=tuple(lines),
        net_total=net_total,
        payment_terms=policy.payment_terms.for_order(
            account.country, currency, net_total.amount
        ),
        legal_entity=entity_code,
        sales_org=entity.sales_org,
        distribution_channel=entity.distribution_channel,
        division=entity.division,
        region=policy.regions.for_country(account.country),
        erp=decision.erp,
        customer_ref=customer_ref(deal_id),
        tax_country=quote.tax_country,
    )
