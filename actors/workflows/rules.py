"""Quote validation against the ERP's reference data.

`ReferenceData` joins the ERP's catalogue (products and price book entries)
with the operator's tables (``config/reference.toml``: regions, legal
entities, payment terms, tax jurisdictions, eligibility, revenue classes).
`validate_quote` checks a quote against it and reports every broken rule at
once, so an operator fixes a quote in one pass (`validate_for_order` adds,
before an order is built from it, that the quote is the customer's). It is
pure, deterministic and allocation-light: the quote-to-cash workflow runs
it in ``apply`` for every approved quote, and the process API runs it
behind ``POST /api/v1/quotes/{id}/validate`` within a latency budget.

The catalogue decides what a SKU is: a line's family, and whether it is
active, come from the `Product`, not from the copy on the quote line.
A bundle component sold at zero needs a zero floor in the price book.
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from broker import ConfigError
from broker.config import Section, read_toml
from canonical.commerce import Account, PriceBookEntry, Product, Quote, QuoteLine
from canonical.scalars import ISO_3166, ISO_4217, MINOR_UNITS, CountryCode

__all__ = [
    "ViolationCode",
    "Violation",
    "ValidationResult",
    "Regions",
    "LegalEntityAssignment",
    "LegalEntity",
    "PaymentTermsRule",
    "PaymentTerms",
    "TaxCodes",
    "TaxJurisdiction",
    "Eligibility",
    "RevenueClasses",
    "ReferencePolicy",
    "ReferenceData",
    "load_reference_policy",
    "build_reference",
    "validate_quote",
    "validate_for_order",
    "format_amount",
]

ViolationCode = Literal[
    "empty_quote",
    "account_blocked",
    "not_eligible",
    "no_tax_jurisdiction",
    "currency_mismatch",
    "bundle_parent_missing",
    "unknown_sku",
    "inactive_sku",
    "price_below_floor",
    "quantity_not_whole",
    "billing_interval_mismatch",
    "total_mismatch",
    "account_mismatch",
]

Code = Annotated[str, Meta(min_length=1, max_length=40)]
EntityCode = Annotated[str, Meta(pattern=r"^[A-Z0-9]{1,4}\Z")]
SalesOrg = Annotated[str, Meta(min_length=1, max_length=4)]
TwoChars = Annotated[str, Meta(min_length=1, max_length=2)]
Plant = Annotated[str, Meta(min_length=1, max_length=4)]
TermsKey = Annotated[str, Meta(min_length=1, max_length=4)]
TaxCode = Annotated[str, Meta(min_length=1, max_length=2)]
Family = Annotated[str, Meta(min_length=1, max_length=40)]
Treatment = Literal["standard", "reduced", "exempt"]


# --- results -------------------------------------------------------------------


class Violation(msgspec.Struct, frozen=True, kw_only=True):
    """One broken rule.

    Attributes:
        code: which rule (``price_below_floor``).
        message: for the operator, naming the SKU and amounts
            (``line 2 SKU-ABC: unit price 80.00 EUR below floor 90.00 EUR``).
        line: the quote line number; None for the quote as a whole.
        sku: the line's SKU, when the rule is about a line.
    """

    code: ViolationCode
    message: str
    line: int | None = None
    sku: str | None = None


class ValidationResult(msgspec.Struct, frozen=True, kw_only=True):
    """The verdict: ``ok`` exactly when there are no violations."""

    ok: bool
    violations: tuple[Violation, ...] = ()

    def messages(self) -> tuple[str, ...]:
        """The messages, in order (for `BusinessException.violations`)."""
        return tuple(v.message for v in self.violations)


# --- the operator's tables (config/reference.toml) ---------------------------------


class _Section(Section, frozen=True):
    """Base for the reference file's tables."""


def _check_countries(where: str, codes: Iterable[str]) -> None:
    for code in codes:
        if code not in ISO_3166:
            raise ValueError(f"{where}: {code!r} is not an ISO 3166-1 country code")


class Regions(_Section, frozen=True):
    """``[regions]``: an account's sales region, by its country."""

    default: Code
    by_country: dict[CountryCode, Code] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_countries("regions", self.by_country)

    def for_country(self, country: str) -> str:
        """The region of an account in *country*."""
        return self.by_country.get(country, self.default)


class LegalEntityAssignment(_Section, frozen=True):
    """``[legal-entity]``: which legal entity sells to an account, by its country."""

    default: EntityCode
    by_country: dict[CountryCode, EntityCode] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_countries("legal-entity", self.by_country)

    def for_country(self, country: str) -> str:
        """The legal entity that sells to an account in *country*."""
        return self.by_country.get(country, self.default)


class LegalEntity(_Section, frozen=True):
    """``[entities.<code>]``: a legal entity's home and ERP organisation data."""

    country: CountryCode
    sales_org: SalesOrg
    plant: Plant
    service_plant: Plant
    distribution_channel: TwoChars = "10"
    division: TwoChars = "00"

    def __post_init__(self) -> None:
        _check_countries("country", (self.country,))


class PaymentTermsRule(_Section, frozen=True):
    """``[[payment-terms.rules]]``: terms for account countries and an amount band."""

    countries: Annotated[tuple[str, ...], Meta(min_length=1)]
    terms: TermsKey
    min_total: dict[Annotated[str, Meta(pattern=r"^[A-Z]{3}\Z")], Decimal] = (
        msgspec.field(default_factory=dict)
    )

    def __post_init__(self) -> None:
        _check_countries("countries", (c for c in self.countries if c != "*"))
        for currency, amount in self.min_total.items():
            if currency not in ISO_4217:
                raise ValueError(f"min-total: {currency!r} is not an ISO 4217 code")
            if not amount.is_finite() or amount < 0:
                raise ValueError(f"min-total: {currency} {amount} is not an amount")

    def matches(self, country: str, currency: str, total: Decimal) -> bool:
        """Whether the rule applies to an account in *country* and this total."""
        if "*" not in self.countries and country not in self.countries:
            return False
        if not self.min_total:
            return True
        floor = self.min_total.get(currency)
        return floor is not None and total >= floor


class PaymentTerms(_Section, frozen=True):
    """``[payment-terms]``: the first matching rule's terms, else the default."""

    default: TermsKey
    rules: tuple[PaymentTermsRule, ...] = ()

    def for_order(self, country: str, currency: str, total: Decimal) -> str:
        """The payment-terms key for an account in *country* and an order total."""
        for rule in self.rules:
            if rule.matches(country, currency, total):
                return rule.terms
        return self.default


class TaxCodes(_Section, frozen=True):
    """The ERP tax code per treatment; ``standard`` is required."""

    standard: TaxCode
    reduced: TaxCode | None = None
    exempt: TaxCode | None = None
    reverse_charge: TaxCode | None = None


class TaxJurisdiction(_Section, frozen=True):
    """``[tax.<country>]``: a country we can invoice in, and its tax codes."""

    codes: TaxCodes
    families: dict[Family, Treatment] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        for family, treatment in self.families.items():
            if getattr(self.codes, treatment) is None:
                raise ValueError(
                    f"family {family!r} is {treatment} but there is no {treatment} code"
                )


class Eligibility(_Section, frozen=True):
    """``[eligibility]``: who may buy, and what each country may buy."""

    blocked_accounts: frozenset[str] = frozenset()
    blocked_countries: frozenset[CountryCode] = frozenset()
    families_by_country: dict[CountryCode, frozenset[Family]] = msgspec.field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        _check_countries("blocked-countries", self.blocked_countries)
        _check_countries("families-by-country", self.families_by_country)


class RevenueClasses(_Section, frozen=True):
    """``[revenue-classes]``: recurring, then physical, then family, then default."""

    default: Code
    recurring: Code = "subscription"
    physical: Code = "product"
    by_family: dict[Family, Code] = msgspec.field(default_factory=dict)


class ReferencePolicy(_Section, frozen=True):
    """The whole reference file; read it with `load_reference_policy`."""

    regions: Regions
    legal_entity: LegalEntityAssignment
    entities: dict[EntityCode, LegalEntity]
    payment_terms: PaymentTerms
    tax: dict[CountryCode, TaxJurisdiction]
    revenue_classes: RevenueClasses
    eligibility: Eligibility = Eligibility()

    def __post_init__(self) -> None:
        _check_countries("tax", self.tax)
        assigned = {self.legal_entity.default, *self.legal_entity.by_country.values()}
        missing = sorted(assigned - self.entities.keys())
        if missing:
            raise ValueError(f"legal entities {missing} have no [entities] table")


def load_reference_policy(path: Path) -> ReferencePolicy:
    """Read and check the reference file (blocking: call it off the event loop).

    Raises:
        ConfigError: naming the file and, for a bad value, its key path.
    """
    raw = read_toml(path)
    try:
        return msgspec.convert(raw, ReferencePolicy)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_keyed_error(raw) or exc}") from exc


# msgspec's error path shows a table key as ``[...]``; for the tables keyed by
# entity or country, convert each entry alone to name it.
_KEYED_TABLES: tuple[tuple[str, type[_Section]], ...] = (
    ("entities", LegalEntity),
    ("tax", TaxJurisdiction),
)


def _keyed_error(raw: dict[str, Any]) -> str | None:
    """The first invalid entry of a keyed table, with its full key path."""
    for name, entry_type in _KEYED_TABLES:
        table = raw.get(name)
        if not isinstance(table, dict):
            continue
        for key, value in table.items():
            try:
                msgspec.convert(value, entry_type)
            except msgspec.ValidationError as exc:
                message, sep, where = str(exc).rpartition(" - at `$")
                if not sep:
                    return f"{exc} - at `$.{name}.{key}`"
                return f"{message} - at `$.{name}.{key}{where}"
    return None


# --- reference data ----------------------------------------------------------------


class ReferenceData(msgspec.Struct, frozen=True, kw_only=True):
    """The catalogue and the operator's tables; build it with `build_reference`.

    Attributes:
        products: by SKU.
        prices: by (SKU, currency).
        policy: the operator's tables.
    """

    products: dict[str, Product]
    prices: dict[tuple[str, str], PriceBookEntry]
    policy: ReferencePolicy


def build_reference(
    products: Iterable[Product],
    prices: Iterable[PriceBookEntry],
    policy: ReferencePolicy,
) -> ReferenceData:
    """Index the ERP's catalogue and join it with the operator's tables.

    Raises:
        ValueError: a SKU or (SKU, currency) appears twice, or a floor price
            is above its list price.
    """
    by_sku: dict[str, Product] = {}
    for product in products:
        if product.sku in by_sku:
            raise ValueError(f"{product.sku}: product listed twice")
        by_sku[product.sku] = product
    by_key: dict[tuple[str, str], PriceBookEntry] = {}
    for entry in prices:
        key = (entry.sku, entry.currency)
        if key in by_key:
            raise ValueError(f"{entry.sku}: two {entry.currency} price book entries")
        if entry.floor_price > entry.list_price:
            raise ValueError(
                f"{entry.sku}: floor {format_amount(entry.floor_price, entry.currency)}"
                f" above list {format_amount(entry.list_price, entry.currency)}"
            )
        by_key[key] = entry
    return ReferenceData(products=by_sku, prices=by_key, policy=policy)


# --- validation ----------------------------------------------------------------------


def format_amount(amount: Decimal, currency: str) -> str:
    """``80.00 EUR``: at least the currency's minor-unit places, never fewer digits."""
    places = MINOR_UNITS.get(currency, 2)
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -places:
        amount = amount.quantize(Decimal(1).scaleb(-places))
    return f"{amount} {currency}"


def _quantized(amount: Decimal, currency: str) -> Decimal:
    return amount.quantize(Decimal(1).scaleb(-MINOR_UNITS.get(currency, 2)))


def validate_quote(
    quote: Quote, account: Account, ref: ReferenceData
) -> ValidationResult:
    """Check *quote* (for *account*, its customer) against the reference data.

    Every violation is reported, in a fixed order: the quote as a whole
    first, then each line in quote order, then what the lines must agree on,
    then the totals.

    The recurring lines (recurring by the catalogue) become one subscription
    on the billing platform, which bills whole quantities, and all the items
    of a subscription on one interval: a recurring line with a fractional
    quantity, or recurring lines with different terms (``term_months``, none
    being monthly), are refused here rather than booked and then refused by
    the billing platform.
    """
    policy = ref.policy
    eligibility = policy.eligibility
    currency = quote.currency
    found: list[Violation] = []

    def add(
        code: ViolationCode, message: str, line: int | None = None, sku: str = ""
    ) -> None:
        found.append(Violation(code=code, message=message, line=line, sku=sku or None))

    if not quote.lines:
        add("empty_quote", f"quote {quote.id} has no lines")
    if account.deleted:
        add("account_blocked", f"account {account.id} ({account.name}) is deleted")
    elif account.id in eligibility.blocked_accounts:
        add("account_blocked", f"account {account.id} ({account.name}) is blocked")
    roles = {quote.tax_country: "tax country", account.country: "account country"}
    for country, role in sorted(roles.items(), key=lambda item: item[1]):
        if country in eligibility.blocked_countries:
            add("not_eligible", f"{role} {country}: we do not sell there")
    if quote.tax_country not in policy.tax:
        add(
            "no_tax_jurisdiction",
            f"tax country {quote.tax_country}: no tax jurisdiction to invoice in",
        )
    if quote.net_total.currency != currency:
        add(
            "currency_mismatch",
            f"quote in {currency} but its net total is in {quote.net_total.currency}",
        )

    numbers = {line.number for line in quote.lines}
    allowed = eligibility.families_by_country.get(quote.tax_country)
    #: Recurring lines and their billing interval in months.
    recurring: list[tuple[QuoteLine, int]] = []
    for line in quote.lines:
        where = f"line {line.number} {line.sku}"
        if line.parent is not None and (
            line.parent == line.number or line.parent not in numbers
        ):
            add(
                "bundle_parent_missing",
                f"{where}: bundle parent line {line.parent} is not on the quote",
                line.number,
                line.sku,
            )
        product = ref.products.get(line.sku)
        if product is None:
            add("unknown_sku", f"{where}: unknown SKU", line.number, line.sku)
            continue
        if not product.active:
            add(
                "inactive_sku",
                f"{where}: SKU is inactive (no longer sold)",
                line.number,
                line.sku,
            )
        if allowed is not None and product.family not in allowed:
            add(
                "not_eligible",
                f"{where}: family {product.family} is not sold"
                f" to tax country {quote.tax_country}",
                line.number,
                line.sku,
            )
        if product.recurring:
            recurring.append((line, line.term_months or 1))
            if line.quantity != line.quantity.to_integral_value():
                add(
                    "quantity_not_whole",
                    f"{where}: recurring quantity {line.quantity} is not a whole"
                    " number; subscriptions are billed in whole units",
                    line.number,
                    line.sku,
                )
        entry = ref.prices.get((line.sku, currency))
        if entry is None:
            add(
                "currency_mismatch",
                f"{where}: no {currency} price in the price book",
                line.number,
                line.sku,
            )
            continue
        if line.unit_price < entry.floor_price:
            add(
                "price_below_floor",
                f"{where}: unit price {format_amount(line.unit_price, currency)}"
                f" below floor {format_amount(entry.floor_price, currency)}",
                line.number,
                line.sku,
            )

    if len({months for _, months in recurring}) > 1:
        terms = ", ".join(
            f"line {line.number} {line.sku} every {months} month"
            + ("s" if months != 1 else "")
            for line, months in recurring
        )
        add(
            "billing_interval_mismatch",
            f"recurring lines bill on different intervals ({terms}); one"
            " subscription bills all its lines on one interval: quote them"
            " with one term",
        )

    if quote.lines and quote.net_total.currency == currency:
        # Each line as the order will carry it (rounded to the currency),
        # then added up: what enrichment books is what is checked here.
        lines_total = sum(
            (_quantized(line.net_total, currency) for line in quote.lines), Decimal(0)
        )
        if _quantized(lines_total, currency) != _quantized(
            quote.net_total.amount, currency
        ):
            add(
                "total_mismatch",
                f"lines sum to {format_amount(lines_total, currency)} but the quote"
                f" net total is {format_amount(quote.net_total.amount, currency)}",
            )
    return ValidationResult(ok=not found, violations=tuple(found))


def validate_for_order(
    quote: Quote, account: Account, ref: ReferenceData
) -> ValidationResult:
    """Check *quote* before an order for *account* (the opportunity's) is built.

    The quote must be that account's: the order is built for the
    opportunity's account, so a quote made out to another customer
    (``account_mismatch``, reported first) would be booked, billed and
    shipped to the wrong one. Then everything `validate_quote` checks.
    """
    result = validate_quote(quote, account, ref)
    if quote.account_id == account.id:
        return result
    total = quote.net_total
    mismatch = Violation(
        code="account_mismatch",
        message=(
            f"quote {quote.id} ({format_amount(total.amount, total.currency)}) is"
            f" for account {quote.account_id}, but its opportunity is for account"
            f" {account.id} ({account.name})"
        ),
    )
    return ValidationResult(ok=False, violations=(mismatch, *result.violations))
