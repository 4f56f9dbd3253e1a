from __future__ import annotations

import functools
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.workflows.catalogue import demo_catalogue, demo_reference
from actors.workflows.enrich import customer_ref, enrich_order, tax_code
from actors.workflows.routing import RouteDecision
from actors.workflows.rules import (
    ReferenceData,
    TaxCodes,
    TaxJurisdiction,
)
from canonical.commerce import Account, Order, Quote, QuoteLine
from canonical.ids import deal_of_customer_ref
from canonical.scalars import Money

LEGACY = RouteDecision(erp="legacy", rule="default")
CLOUD = RouteDecision(erp="cloud", rule="wave:w1", wave="w1")


@functools.cache
def ref() -> ReferenceData:
    return demo_reference()


def account(country: str, *, tax_id: str | None = None) -> Account:
    return Account(
        id="acct-1", name="Customer", country=country, currency="EUR", tax_id=tax_id
    )


def line(number: int, sku: str, net: str, quantity: str = "1") -> QuoteLine:
    qty = Decimal(quantity)
    return QuoteLine(
        number=number,
        sku=sku,
        quantity=qty,
        list_price=Decimal(net) / qty,
        unit_price=Decimal(net) / qty,
        net_total=Decimal(net),
    )


ALL_FAMILIES = (
    line(1, "HW-SRV-1U", "4200.00"),
    line(2, "SW-DEV-SEAT", "1200.00"),
    line(3, "SAAS-ANL", "300.00", "10"),
    line(4, "SVC-CONSULT", "1600.00"),
)


def quote(*lines: QuoteLine, currency: str = "EUR", tax_country: str = "DE") -> Quote:
    lines = lines or ALL_FAMILIES
    total = sum((ln.net_total for ln in lines), Decimal(0))
    return Quote(
        id="quote-1",
        opportunity_id="opp-1",
        account_id="acct-1",
        currency=currency,
        lines=lines,
        net_total=Money(amount=total, currency=currency),
        status="approved",
        tax_country=tax_country,
    )


def enrich(
    q: Quote,
    acct: Account,
    decision: RouteDecision = LEGACY,
    reference: ReferenceData | None = None,
) -> Order:
    return enrich_order(
        q,
        acct,
        decision,
        reference or ref(),
        deal_id="deal-1",
        order_id="order-1",
    )


# --- organisation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("country", "entity", "sales_org", "channel", "region"),
    [
        ("DE", "DE01", "1010", "10", "EMEA"),
        ("AT", "DE01", "1010", "10", "EMEA"),
        ("CH", "DE01", "1010", "10", "EMEA"),
        ("US", "US01", "1710", "10", "AMER"),
        ("CA", "US01", "1710", "10", "AMER"),
        ("GB", "GB01", "1510", "10", "EMEA"),
        ("IE", "GB01", "1510", "10", "EMEA"),
        ("FR", "NL01", "1110", "20", "EMEA"),
        ("BR", "NL01", "1110", "20", "AMER"),
        ("ZW", "NL01", "1110", "20", "INTL"),
    ],
)
def test_legal_entity_sales_area_and_region_follow_the_account_country(
    country: str, entity: str, sales_org: str, channel: str, region: str
) -> None:
    """The account's country picks the entity (default NL01) and the region."""
    order = enrich(quote(), account(country))
    assert (order.legal_entity, order.sales_org) == (entity, sales_org)
    assert (order.distribution_channel, order.division) == (channel, "00")
    assert order.region == region


def test_plant_revenue_class_and_flags_per_line() -> None:
    """Hardware ships from the entity's plant; the rest from its service plant."""
    order = enrich(quote(), account("US"))
    got = [
        (ln.sku, ln.plant, ln.revenue_class, ln.recurring, ln.physical)
        for ln in order.lines
    ]
    assert got == [
        ("HW-SRV-1U", "1710", "product", False, True),
        ("SW-DEV-SEAT", "1790", "licence", False, False),
        ("SAAS-ANL", "1790", "subscription", True, False),
        ("SVC-CONSULT", "1790", "services", False, False),
    ]


def test_flags_come_from_the_catalogue_not_the_quote_line() -> None:
    """QuoteLine defaults physical=True; the ERP's product says SaaS is not shipped."""
    saas = ALL_FAMILIES[2]
    assert saas.physical
    assert not saas.recurring
    (enriched,) = enrich(quote(saas), account("DE")).lines
    assert enriched.recurring
    assert not enriched.physical
    assert enriched.plant == "1090"


def test_the_operator_tables_drive_enrichment() -> None:
    """Change a plant and a revenue class in the policy: the order follows."""
    base = ref()
    de01 = msgspec.structs.replace(base.policy.entities["DE01"], plant="1020")
    classes = msgspec.structs.replace(
        base.policy.revenue_classes, by_family={"software": "software"}
    )
    policy = msgspec.structs.replace(
        base.policy,
        entities={**base.policy.entities, "DE01": de01},
        revenue_classes=classes,
    )
    reference = msgspec.structs.replace(base, policy=policy)
    order = enrich(quote(), account("DE"), reference=reference)
    assert order.lines[0].plant == "1020"
    assert [ln.revenue_class for ln in order.lines] == [
        "product",
        "software",
        "subscription",
        "licence",  # services no longer mapped: the default
    ]


# --- tax ----------------------------------------------------------------------------


def test_domestic_lines_are_standard_rated() -> None:
    """A DE business buying from DE01 pays German VAT: no reverse charge at home."""
    order = enrich(quote(), account("DE", tax_id="DE123456789"))
    assert {ln.tax_code for ln in order.lines} == {"A1"}


def test_family_treatment_per_jurisdiction() -> None:
    """US: services exempt (U0), everything else standard (U1)."""
    order = enrich(quote(tax_country="US"), account("US"))
    assert [ln.tax_code for ln in order.lines] == ["U1", "U1", "U1", "U0"]


def test_cross_border_business_sale_is_reverse_charged() -> None:
    """GB01 sells to an Irish company: reverse charge; to an Irish consumer: IE VAT."""
    business = enrich(quote(tax_country="IE"), account("IE", tax_id="IE1234567T"))
    consumer = enrich(quote(tax_country="IE"), account("IE"))
    assert {ln.tax_code for ln in business.lines} == {"R3"}
    assert {ln.tax_code for ln in consumer.lines} == {"I1"}


def test_tax_treatment_precedence() -> None:
    """Exempt, then reverse charge, then reduced, then standard."""
    j = TaxJurisdiction(
        codes=TaxCodes(standard="S", reduced="R", exempt="E", reverse_charge="X"),
        families={"books": "reduced", "health": "exempt"},
    )
    b2b_abroad = {"business_buyer": True, "cross_border": True}
    b2c_abroad = {"business_buyer": False, "cross_border": True}
    assert tax_code(j, "health", **b2b_abroad) == "E"
    assert tax_code(j, "books", **b2b_abroad) == "X"
    assert tax_code(j, "books", **b2c_abroad) == "R"
    assert tax_code(j, "hardware", **b2c_abroad) == "S"
    no_rc = msgspec.structs.replace(
        j, codes=TaxCodes(standard="S", reduced="R", exempt="E")
    )
    assert tax_code(no_rc, "books", **b2b_abroad) == "R"


# --- payment terms ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("country", "currency", "net", "terms"),
    [
        ("DE", "EUR", "1000.00", "NT14"),
        ("AT", "EUR", "249999.99", "NT14"),
        ("AT", "EUR", "250000.00", "NT60"),
        ("US", "USD", "1000.00", "NT30"),
        ("US", "USD", "275000.00", "NT60"),
        ("US", "EUR", "260000.00", "NT60"),
        ("US", "JPY", "99999999", "NT30"),
        ("JP", "JPY", "1000", "NT60"),
        ("FR", "GBP", "214999.99", "NT30"),
    ],
)
def test_payment_terms_by_country_and_amount_band(
    country: str, currency: str, net: str, terms: str
) -> None:
    """Amount bands (inclusive, in the order currency), then country, then default."""
    q = quote(line(1, "SVC-MIGRATE", net), currency=currency)
    assert enrich(q, account(country)).payment_terms == terms


# --- ids, totals, the wire ----------------------------------------------------------


def test_customer_ref_is_the_deal_reference() -> None:
    """Q2C- and the deal's CRM id: readable in the ERP, and it leads back."""
    assert customer_ref("deal-1") == "Q2C-1"
    assert deal_of_customer_ref(customer_ref("deal-006Hn00000A1b2cIAB")) == (
        "deal-006Hn00000A1b2cIAB"
    )
    assert enrich(quote(), account("DE")).customer_ref == "Q2C-1"


@given(st.from_regex(r"deal-[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_customer_ref_never_exceeds_35_characters(deal: str) -> None:
    """A reference that would not fit the ERP's 35 characters is refused, not cut."""
    if len(deal) - len("deal-") <= 31:
        assert len(customer_ref(deal)) <= 35
        assert deal_of_customer_ref(customer_ref(deal)) == deal
    else:
        with pytest.raises(ValueError, match="35"):
            customer_ref(deal)


def test_totals_are_quantized_per_line_and_summed() -> None:
    """Line amounts round half-even to cents; the order total is their sum."""
    q = quote(
        line(1, "SVC-CONSULT", "10.005"),
        line(2, "SVC-CONSULT", "10.015"),
        line(3, "SVC-CONSULT", "0.001"),
    )
    order = enrich(q, account("DE"))
    assert [ln.net_amount for ln in order.lines] == [
        Decimal("10.00"),
        Decimal("10.02"),
        Decimal("0.00"),
    ]
    assert order.net_total == Money(amount=Decimal("20.02"), currency="EUR")


def test_zero_decimal_currency_total() -> None:
    """JPY has no minor unit: amounts are whole yen."""
    order = enrich(
        quote(line(1, "SVC-CONSULT", "176000.4"), currency="JPY"), account("JP")
    )
    assert order.net_total == Money(amount=Decimal("176000"), currency="JPY")
    assert str(order.net_total) == "176000 JPY"


def test_the_order_carries_the_decision_and_the_quote() -> None:
    """ERP from the stored decision; ids, currency and tax country from the quote."""
    q = quote(tax_country="AT")
    order = enrich(q, account("DE"), CLOUD)
    assert order.erp == "cloud"
    assert (order.id, order.deal_id, order.quote_id) == ("order-1", "deal-1", "quote-1")
    assert (order.currency, order.tax_country) == ("EUR", "AT")
    assert order.account == account("DE")
    assert [ln.tax_code for ln in order.lines] == ["B1"] * 4


def test_the_order_is_valid_on_the_wire() -> None:
    """Every constraint of the canonical Order (lengths, ids, codes) holds."""
    order = enrich(quote(), account("GB"), CLOUD)
    wire = msgspec.json.encode(order)
    assert msgspec.json.decode(wire, type=Order) == order


def test_unvalidated_input_is_a_bug() -> None:
    """An unknown SKU or tax country raises instead of guessing."""
    with pytest.raises(ValueError, match="NOPE-1"):
        enrich(quote(line(1, "NOPE-1", "1.00")), account("DE"))
    with pytest.raises(ValueError, match="tax country BR"):
        enrich(quote(tax_country="BR"), account("DE"))


_PRODUCTS, _PRICES = demo_catalogue()


@given(
    st.lists(
        st.tuples(
            st.sampled_from([p.sku for p in _PRODUCTS if p.active]),
            st.decimals(min_value=0, max_value=100_000, places=3),
        ),
        min_size=1,
        max_size=10,
    ),
    st.sampled_from(["DE", "US", "GB", "IE", "FR", "JP", "CA"]),
)
def test_enriched_orders_add_up(drawn: list[tuple[str, Decimal]], country: str) -> None:
    """For any valid quote: the total is the sum of the lines, in cents, ref ≤ 35."""
    lines = tuple(line(n, sku, str(net)) for n, (sku, net) in enumerate(drawn, 1))
    q = quote(*lines, tax_country=country)
    order = enrich(q, account(country))
    assert order.net_total.amount == sum(ln.net_amount for ln in order.lines)
    assert order.net_total.amount.as_tuple().exponent == -2
    assert len(order.customer_ref) <= 35
    assert len(order.lines) == len(q.lines)
