from __future__ import annotations

import functools
from collections.abc import Callable
from decimal import ROUND_CEILING, Decimal
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.workflows.catalogue import REFERENCE_TOML, demo_catalogue, demo_reference
from actors.workflows.rules import (
    ReferenceData,
    ValidationResult,
    Violation,
    build_reference,
    format_amount,
    load_reference_policy,
    validate_for_order,
    validate_quote,
)
from broker.errors import ConfigError
from canonical.commerce import Account, PriceBookEntry, Product, Quote, QuoteLine
from canonical.scalars import Money

ACCOUNT = Account(id="acct-1", name="Muster GmbH", country="DE", currency="EUR")
Validator = Callable[[Quote, Account, ReferenceData], ValidationResult]


@functools.cache
def ref() -> ReferenceData:
    return demo_reference()


def line(
    number: int,
    sku: str,
    unit_price: str,
    quantity: str = "1",
    *,
    parent: int | None = None,
) -> QuoteLine:
    price, qty = Decimal(unit_price), Decimal(quantity)
    return QuoteLine(
        number=number,
        sku=sku,
        quantity=qty,
        list_price=price,
        unit_price=price,
        net_total=price * qty,
        parent=parent,
    )


def quote(
    *lines: QuoteLine,
    currency: str = "EUR",
    tax_country: str = "DE",
    total: Money | None = None,
    account: Account = ACCOUNT,
) -> Quote:
    if total is None:
        amount = sum((ln.net_total for ln in lines), Decimal(0))
        total = Money(amount=amount, currency=currency)
    return Quote(
        id="quote-1",
        opportunity_id="opp-1",
        account_id=account.id,
        currency=currency,
        lines=lines,
        net_total=total,
        status="approved",
        tax_country=tax_country,
    )


def only(result: ValidationResult) -> Violation:
    assert not result.ok
    assert len(result.violations) == 1, result.violations
    return result.violations[0]


# --- a good quote -------------------------------------------------------------------


def test_a_quote_at_list_price_passes() -> None:
    """Catalogue SKUs at list price, consistent totals, a taxable country: ok."""
    q = quote(
        line(1, "HW-SRV-1U", "4200.00", "2"),
        line(2, "HW-NET-SW48", "2900.00", parent=1),
        line(3, "SAAS-PLAT-STD", "45.00", "50"),
        line(4, "SVC-INSTALL", "1400.00", "3"),
    )
    assert validate_quote(q, ACCOUNT, ref()) == ValidationResult(ok=True)


# --- every code ---------------------------------------------------------------------


def test_price_at_the_floor_passes_a_cent_below_does_not() -> None:
    """The floor is inclusive; the message names line, SKU and both amounts."""
    at_floor = quote(line(1, "SVC-CONSULT", "1600.00"), line(2, "HW-SRV-1U", "3570.00"))
    assert validate_quote(at_floor, ACCOUNT, ref()).ok

    below = quote(line(1, "SVC-CONSULT", "1600.00"), line(2, "HW-SRV-1U", "3569.99"))
    v = only(validate_quote(below, ACCOUNT, ref()))
    assert v == Violation(
        code="price_below_floor",
        message="line 2 HW-SRV-1U: unit price 3569.99 EUR below floor 3570.00 EUR",
        line=2,
        sku="HW-SRV-1U",
    )


def test_amounts_in_messages_show_the_minor_unit() -> None:
    """A price written "3000" reads "3000.00 EUR"; JPY has no decimals."""
    v = only(validate_quote(quote(line(1, "HW-SRV-1U", "3000")), ACCOUNT, ref()))
    assert (
        v.message == "line 1 HW-SRV-1U: unit price 3000.00 EUR below floor 3570.00 EUR"
    )
    assert format_amount(Decimal("1500"), "JPY") == "1500 JPY"
    assert format_amount(Decimal("0.125"), "EUR") == "0.125 EUR"
    assert format_amount(Decimal("7.5"), "KWD") == "7.500 KWD"


def test_unknown_sku() -> None:
    """A SKU the catalogue lacks is named; no price check follows for it."""
    v = only(validate_quote(quote(line(1, "NOPE-1", "1.00")), ACCOUNT, ref()))
    assert (v.code, v.line, v.sku) == ("unknown_sku", 1, "NOPE-1")
    assert v.message == "line 1 NOPE-1: unknown SKU"


def test_inactive_sku() -> None:
    """A product the ERP no longer sells is refused even at list price."""
    v = only(validate_quote(quote(line(1, "HW-SRV-LEGACY", "5200.00")), ACCOUNT, ref()))
    assert (v.code, v.line) == ("inactive_sku", 1)
    assert "HW-SRV-LEGACY" in v.message


def test_no_tax_jurisdiction() -> None:
    """A tax country we cannot invoice in is named."""
    q = quote(line(1, "SW-DEV-SEAT", "1200.00"), tax_country="BR")
    v = only(validate_quote(q, ACCOUNT, ref()))
    assert v.code == "no_tax_jurisdiction"
    assert v.line is None
    assert "tax country BR" in v.message


@pytest.mark.parametrize("validate", [validate_quote, validate_for_order])
def test_deleted_and_blocked_accounts(validate: Validator) -> None:
    """A deleted account and one on the blocked list are both account_blocked.

    The quote is made out to that account (its opportunity's): checked for
    an order (as the deal and the endpoint do) it is refused for that alone.
    """
    deleted = msgspec.structs.replace(ACCOUNT, deleted=True)
    blocked = msgspec.structs.replace(ACCOUNT, id="acct-blocked-001")
    for account, word in ((deleted, "deleted"), (blocked, "blocked")):
        q = quote(line(1, "SW-DEV-SEAT", "1200.00"), account=account)
        v = only(validate(q, account, ref()))
        assert v.code == "account_blocked"
        assert v.message == f"account {account.id} (Muster GmbH) is {word}"


def test_a_quote_for_another_account_is_refused_for_an_order_first() -> None:
    """validate_for_order: account_mismatch first, then what validate_quote says."""
    other = msgspec.structs.replace(ACCOUNT, id="acct-2", name="Other AG")
    q = quote(line(1, "SW-DEV-SEAT", "1200.00"), tax_country="BR", account=other)
    assert [v.code for v in validate_quote(q, ACCOUNT, ref()).violations] == [
        "no_tax_jurisdiction"
    ]
    result = validate_for_order(q, ACCOUNT, ref())
    assert [v.code for v in result.violations] == [
        "account_mismatch",
        "no_tax_jurisdiction",
    ]
    assert result.violations[0].message == (
        "quote quote-1 (1200.00 EUR) is for account acct-2, but its opportunity"
        " is for account acct-1 (Muster GmbH)"
    )


def test_blocked_countries_for_account_and_tax_country() -> None:
    """Both the buyer's country and the ship-to country are screened."""
    q = quote(line(1, "SW-DEV-SEAT", "1200.00"))
    by_account = msgspec.structs.replace(ACCOUNT, country="KP")
    v = only(validate_quote(q, by_account, ref()))
    assert (v.code, v.message) == (
        "not_eligible",
        "account country KP: we do not sell there",
    )

    ship_to_ru = quote(line(1, "SW-DEV-SEAT", "1200.00"), tax_country="RU")
    codes = [v.code for v in validate_quote(ship_to_ru, ACCOUNT, ref()).violations]
    assert codes == ["not_eligible", "no_tax_jurisdiction"]


def test_family_not_sold_to_the_tax_country() -> None:
    """CN may buy software but not hardware: only the hardware line is refused."""
    q = quote(
        line(1, "SW-DEV-SEAT", "1200.00"),
        line(2, "HW-SRV-1U", "4200.00"),
        tax_country="CN",
    )
    lines = [v for v in validate_quote(q, ACCOUNT, ref()).violations if v.line]
    assert lines == [
        Violation(
            code="not_eligible",
            message="line 2 HW-SRV-1U: family hardware is not sold to tax country CN",
            line=2,
            sku="HW-SRV-1U",
        )
    ]


def test_currency_mismatch_header_and_lines() -> None:
    """A total in another currency, and a SKU with no price in the quote's currency."""
    q = quote(
        line(1, "SW-DEV-SEAT", "150000"),
        currency="JPY",
        total=Money(amount=Decimal("1000.00"), currency="EUR"),
    )
    result = validate_quote(q, ACCOUNT, ref())
    assert [(v.code, v.line) for v in result.violations] == [
        ("currency_mismatch", None),
        ("currency_mismatch", 1),
    ]
    assert result.messages() == (
        "quote in JPY but its net total is in EUR",
        "line 1 SW-DEV-SEAT: no JPY price in the price book",
    )


def test_total_mismatch_is_judged_at_the_minor_unit() -> None:
    """A cent off is a mismatch; a sub-cent rounding difference is not."""
    lines = (line(1, "SVC-CONSULT", "1600.004"),)
    exact = quote(*lines, total=Money(amount=Decimal("1600.00"), currency="EUR"))
    assert validate_quote(exact, ACCOUNT, ref()).ok

    off = quote(*lines, total=Money(amount=Decimal("1600.01"), currency="EUR"))
    v = only(validate_quote(off, ACCOUNT, ref()))
    assert v.code == "total_mismatch"
    assert v.message == (
        "lines sum to 1600.00 EUR but the quote net total is 1600.01 EUR"
    )


def test_lines_are_added_up_as_the_order_will_carry_them() -> None:
    """Each line rounded first, as enrichment books it: 2 x 1500.005 is 3000.00."""
    lines = (line(1, "SVC-CONSULT", "1500.005"), line(2, "SVC-CONSULT", "1500.005"))
    total = Money(amount=Decimal("3000.01"), currency="EUR")
    v = only(validate_quote(quote(*lines, total=total), ACCOUNT, ref()))
    assert v.code == "total_mismatch"
    booked = quote(*lines, total=Money(amount=Decimal("3000.00"), currency="EUR"))
    assert validate_quote(booked, ACCOUNT, ref()).ok


def test_bundle_parent_missing() -> None:
    """An option naming a line not on the quote, or itself, has no parent."""
    q = quote(
        line(1, "HW-SRV-1U", "4200.00"),
        line(2, "HW-NET-SW48", "2900.00", parent=1),
        line(3, "HW-GW-EDGE", "780.00", parent=9),
        line(4, "SVC-INSTALL", "1400.00", parent=4),
    )
    result = validate_quote(q, ACCOUNT, ref())
    assert [(v.code, v.line) for v in result.violations] == [
        ("bundle_parent_missing", 3),
        ("bundle_parent_missing", 4),
    ]
    assert result.violations[0].message == (
        "line 3 HW-GW-EDGE: bundle parent line 9 is not on the quote"
    )


def test_empty_quote() -> None:
    """No lines: one violation, no total to compare."""
    q = quote(total=Money(amount=Decimal(0), currency="EUR"))
    v = only(validate_quote(q, ACCOUNT, ref()))
    assert (v.code, v.message) == ("empty_quote", "quote quote-1 has no lines")


def test_all_violations_are_reported_in_a_fixed_order() -> None:
    """Quote-level first, then lines in quote order, then the total."""
    q = quote(
        line(1, "NOPE-1", "1.00"),
        line(2, "HW-SRV-1U", "1.00", parent=7),
        line(3, "HW-SRV-LEGACY", "1.00"),
        tax_country="BR",
        total=Money(amount=Decimal("99.00"), currency="EUR"),
    )
    account = msgspec.structs.replace(ACCOUNT, deleted=True)
    result = validate_quote(q, account, ref())
    assert [(v.code, v.line) for v in result.violations] == [
        ("account_blocked", None),
        ("no_tax_jurisdiction", None),
        ("unknown_sku", 1),
        ("bundle_parent_missing", 2),
        ("price_below_floor", 2),
        ("inactive_sku", 3),
        ("price_below_floor", 3),
        ("total_mismatch", None),
    ]
    assert validate_quote(q, account, ref()) == result


# --- properties ---------------------------------------------------------------------

_PRODUCTS, _PRICES = demo_catalogue()
_ACTIVE = [p for p in _PRODUCTS if p.active]
_BY_KEY = {(e.sku, e.currency): e for e in _PRICES}


@st.composite
def priced_lines(draw: st.DrawFn) -> tuple[str, list[QuoteLine]]:
    currency = draw(st.sampled_from(["EUR", "USD", "GBP", "CHF"]))
    products = draw(st.lists(st.sampled_from(_ACTIVE), min_size=1, max_size=8))
    lines = []
    for number, product in enumerate(products, start=1):
        entry = _BY_KEY[(product.sku, currency)]
        # Anywhere from the floor to the list price, rounded up to the cent.
        share = Decimal(draw(st.integers(0, 100))) / 100
        price = entry.floor_price + (entry.list_price - entry.floor_price) * share
        price = price.quantize(Decimal("0.01"), rounding=ROUND_CEILING)
        qty = Decimal(draw(st.integers(1, 500)))
        lines.append(
            QuoteLine(
                number=number,
                sku=product.sku,
                quantity=qty,
                list_price=entry.list_price,
                unit_price=price,
                net_total=price * qty,
            )
        )
    return currency, lines


@given(priced_lines())
def test_prices_between_floor_and_list_always_pass(
    drawn: tuple[str, list[QuoteLine]],
) -> None:
    """A quote from the active catalogue at or above the floor has no violation."""
    currency, lines = drawn
    q = quote(*lines, currency=currency)
    assert validate_quote(q, ACCOUNT, ref()) == ValidationResult(ok=True)


@given(
    st.lists(st.sampled_from(_PRODUCTS), min_size=1, max_size=6),
    st.sampled_from(["EUR", "USD", "GBP", "CHF"]),
    st.sampled_from(["DE", "BR", "CN", "RU", "US"]),
)
def test_list_price_never_reports_price_below_floor(
    products: list[Product], currency: str, tax_country: str
) -> None:
    """Whatever else is wrong with it, a quote at list price is not below floor."""
    lines = [
        line(n, p.sku, str(_BY_KEY[(p.sku, currency)].list_price))
        for n, p in enumerate(products, start=1)
    ]
    result = validate_quote(
        quote(*lines, currency=currency, tax_country=tax_country), ACCOUNT, ref()
    )
    assert "price_below_floor" not in {v.code for v in result.violations}


# --- building the reference data ----------------------------------------------------


def test_demo_catalogue_has_every_family() -> None:
    """About twenty products over four families, with the flags each family implies."""
    products, prices = demo_catalogue()
    assert len(products) == 20
    by_family = {p.family: p for p in products}
    assert set(by_family) == {"hardware", "software", "saas", "services"}
    assert by_family["hardware"].physical
    assert not by_family["hardware"].recurring
    assert by_family["saas"].recurring
    assert not by_family["saas"].physical
    assert not by_family["software"].physical
    assert not by_family["services"].physical
    assert all(e.floor_price <= e.list_price for e in prices)
    assert len(prices) == 4 * len(products)


def test_build_reference_refuses_inconsistent_catalogues() -> None:
    """Duplicate SKUs or prices, and a floor above list, are errors, named."""
    policy = load_reference_policy(REFERENCE_TOML)
    product = Product(sku="X-1", name="X", family="software", physical=False)
    price = PriceBookEntry(
        sku="X-1", currency="EUR", list_price=Decimal(10), floor_price=Decimal(9)
    )
    with pytest.raises(ValueError, match="X-1: product listed twice"):
        build_reference([product, product], [], policy)
    with pytest.raises(ValueError, match="X-1: two EUR price book entries"):
        build_reference([product], [price, price], policy)
    upside_down = msgspec.structs.replace(price, floor_price=Decimal(11))
    with pytest.raises(ValueError, match=r"floor 11\.00 EUR above list 10\.00 EUR"):
        build_reference([product], [upside_down], policy)


def test_shipped_reference_tables_load() -> None:
    """config/reference.toml is valid and assigns the documented legal entities."""
    policy = load_reference_policy(REFERENCE_TOML)
    assert policy.legal_entity.for_country("CH") == "DE01"
    assert policy.legal_entity.for_country("FR") == policy.legal_entity.default
    assert set(policy.entities) >= {"DE01", "US01", "GB01"}


_MINIMAL = """
[regions]
default = "INTL"

[legal-entity]
default = "DE01"

[entities.DE01]
country = "DE"
sales-org = "1010"
plant = "1010"
service-plant = "1090"

[payment-terms]
default = "NT30"

[tax.DE]
codes = { standard = "A1" }

[revenue-classes]
default = "licence"
"""


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (
            ('default = "INTL"', 'default = "INTL"\ndefualt = "X"'),
            r"defualt.*\$\.regions",
        ),
        (('default = "DE01"', 'default = "XX01"'), r"XX01.*no \[entities\] table"),
        (
            (
                '{ standard = "A1" }',
                '{ standard = "A1" }\nfamilies = { saas = "reduced" }',
            ),
            r"no reduced code.*\$\.tax\.DE",
        ),
        (
            ('sales-org = "1010"', 'sales-org = "10100"'),
            r"\$\.entities\.DE01\.sales-org",
        ),
        (("[tax.DE]", "[tax.XX]"), r"'XX' is not an ISO 3166-1"),
        (
            (
                'default = "NT30"',
                'default = "NT30"\n[[payment-terms.rules]]\ncountries = ["*"]\n'
                'terms = "NT60"\nmin-total = { EUX = "1" }',
            ),
            r"EUX",
        ),
        (('[revenue-classes]\ndefault = "licence"', ""), r"revenue-classes"),
    ],
)
def test_invalid_reference_tables_name_file_and_key(
    tmp_path: Path, edit: tuple[str, str], pattern: str
) -> None:
    """Typos, unknown entities, missing codes, bad lengths: refused, with the path."""
    path = tmp_path / "bad-reference.toml"
    load_reference_policy(_write(path, _MINIMAL))  # the base is valid
    old, new = edit
    assert old in _MINIMAL
    _write(path, _MINIMAL.replace(old, new))
    with pytest.raises(ConfigError, match=r"bad-reference\.toml") as info:
        load_reference_policy(path)
    assert info.match(pattern)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
