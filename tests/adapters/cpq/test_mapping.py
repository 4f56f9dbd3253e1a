"""CPQ mapping: quotes with bundles, statuses, products and prices, golden-pinned."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest

from adapters.cpq import mapping as m
from adapters.cpq import views as v
from adapters.cpq.client import decode_quote_model
from adapters.fieldmap import render
from broker.errors import SchemaInvalid
from canonical.commerce import PriceBookEntry, Product, Quote
from canonical.q2c import QuoteUpdateRequested

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "cpq"


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def as_json(value: Any) -> Any:
    return msgspec.json.decode(msgspec.json.encode(value))


CANONICAL = msgspec.json.decode(golden("quote.canonical.json"), type=Quote)
MODEL = msgspec.json.decode(golden("quote.model.json"), type=v.QuoteModel)


def test_the_golden_quote_model_maps_to_the_golden_canonical_quote() -> None:
    """Golden: QuoteReader's model → canonical quote; options name their parent."""
    assert m.quote_from_model(MODEL, default_currency="USD") == CANONICAL


def test_a_canonical_quote_round_trips_through_a_quote_model() -> None:
    """Canonical → model → canonical is the identity; it agrees with the golden."""
    model = m.quote_to_model(CANONICAL)
    assert m.quote_from_model(model, default_currency="USD") == CANONICAL
    exact = msgspec.json.Decoder(float_hook=Decimal)
    written = exact.decode(msgspec.json.Encoder(decimal_format="number").encode(model))
    pinned = exact.decode(golden("quote.model.json"))
    for field, value in written["record"].items():
        assert pinned["record"][field] == value, field
    for ours, theirs in zip(written["lineItems"], pinned["lineItems"], strict=True):
        assert ours["key"] == theirs["key"]
        assert ours["parentItemKey"] == theirs["parentItemKey"]
        for field, value in ours["record"].items():
            assert theirs["record"].get(field) == value, field


def test_records_map_like_the_model_through_required_by() -> None:
    """Quote and line records (SOQL) give the same quote as the model."""
    lines = [item.record for item in MODEL.line_items]
    assert (
        m.quote_from_records(MODEL.record, lines, default_currency="USD") == CANONICAL
    )


def test_lines_without_numbers_are_numbered_in_order() -> None:
    """No SBQQ__Number__c: 1, 2, …; the parent link still resolves by id."""
    parent = v.QuoteLine(
        Id="a0R000000000001AAA",
        SBQQ__ProductCode__c="GW-1",
        SBQQ__Quantity__c=Decimal(1),
        SBQQ__ListPrice__c=Decimal(10),
    )
    option = v.QuoteLine(
        Id="a0R000000000002AAA",
        SBQQ__ProductCode__c="OPT-1",
        SBQQ__Quantity__c=Decimal(2),
        SBQQ__ListPrice__c=Decimal(3),
        SBQQ__CustomerPrice__c=Decimal("2.50"),
        SBQQ__RequiredBy__c="a0R000000000001AAA",
    )
    quote = msgspec.structs.replace(MODEL.record, SBQQ__NetAmount__c=None)
    mapped = m.quote_from_records(quote, [parent, option], default_currency="EUR")
    assert [(x.number, x.parent, x.unit_price, x.net_total) for x in mapped.lines] == [
        (1, None, Decimal(10), Decimal(10)),
        (2, 1, Decimal("2.50"), Decimal("5.00")),
    ]
    assert mapped.net_total.amount == Decimal("15.00")


@pytest.mark.parametrize(
    ("status", "ordered", "expected"),
    [
        ("Draft", None, "draft"),
        ("In Review", None, "in_review"),
        ("Approved", None, "approved"),
        ("Presented", None, "approved"),
        ("Denied", None, "denied"),
        ("Rejected", None, "denied"),
        ("Accepted", None, "accepted"),
        ("Accepted", True, "ordered"),
        ("Approved", True, "ordered"),
    ],
)
def test_the_status_picklist_and_the_ordered_flag_map(
    status: str, ordered: bool | None, expected: str
) -> None:
    """The picklist maps; an ordered quote is ordered whatever it says."""
    record = msgspec.structs.replace(
        MODEL.record, SBQQ__Status__c=status, SBQQ__Ordered__c=ordered
    )
    model = msgspec.structs.replace(MODEL, record=record)
    assert m.quote_from_model(model, default_currency="USD").status == expected


def test_an_unknown_status_is_schema_invalid() -> None:
    """A picklist value the broker does not know is not guessed."""
    record = msgspec.structs.replace(MODEL.record, SBQQ__Status__c="Escalated")
    with pytest.raises(SchemaInvalid, match="Escalated"):
        m.quote_from_model(
            msgspec.structs.replace(MODEL, record=record), default_currency="USD"
        )


def test_the_tax_country_falls_back_to_billing_then_to_the_caller() -> None:
    """Shipping country, else billing country, else the fallback, else refused."""
    record = msgspec.structs.replace(
        MODEL.record, SBQQ__ShippingCountry__c=None, SBQQ__BillingCountry__c="at"
    )
    assert m.quote_from_records(record, [], default_currency="EUR").tax_country == "AT"
    bare = msgspec.structs.replace(record, SBQQ__BillingCountry__c=None)
    assert (
        m.quote_from_records(
            bare, [], default_currency="EUR", fallback_country="CH"
        ).tax_country
        == "CH"
    )
    with pytest.raises(SchemaInvalid, match="country"):
        m.quote_from_records(bare, [], default_currency="EUR")


def test_a_line_without_a_product_code_is_schema_invalid() -> None:
    """The SKU is the line's identity downstream: no code, no quote."""
    line = v.QuoteLine(Id="a0R000000000001AAA", SBQQ__Quantity__c=Decimal(1))
    with pytest.raises(SchemaInvalid, match="product code"):
        m.quote_from_records(MODEL.record, [line], default_currency="EUR")


@pytest.mark.parametrize("quantity", ["0", "-2"])
def test_a_line_of_no_or_negative_quantity_is_schema_invalid(quantity: str) -> None:
    """Refused as a bad quote (a 400 from /validate), not a crash (a 500)."""
    line = v.QuoteLine(
        Id="a0R000000000001AAA",
        SBQQ__ProductCode__c="SAAS-ANL",
        SBQQ__Quantity__c=Decimal(quantity),
        SBQQ__ListPrice__c=Decimal(30),
    )
    with pytest.raises(SchemaInvalid, match="a0R000000000001AAA"):
        m.quote_from_records(MODEL.record, [line], default_currency="EUR")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("SBQQ__Quantity__c", "1e999999"),  # times a price: decimal.Overflow
        ("SBQQ__Number__c", "NaN"),  # int(): ValueError
        ("SBQQ__Number__c", "Infinity"),  # int(): OverflowError
        ("SBQQ__Number__c", "1e1000000"),  # int(): ~30 s of CPU
        ("SBQQ__SubscriptionTerm__c", "-Infinity"),
        ("SBQQ__NetPrice__c", "sNaN"),
        ("SBQQ__NetTotal__c", "1e-999999"),
    ],
)
def test_absurd_line_numbers_are_schema_invalid_before_any_arithmetic(
    field: str, value: str
) -> None:
    """Checked where read (adapters.decimals): refused by name, no CPU burnt."""
    body = msgspec.json.encode(
        {
            "Id": "a0R000000000001AAA",
            "SBQQ__ProductCode__c": "SAAS-ANL",
            "SBQQ__Quantity__c": 1,
            "SBQQ__ListPrice__c": 30,
            "SBQQ__SubscriptionPricing__c": "Fixed Price",
            field: value,
        }
    )
    line = msgspec.json.decode(body, type=v.QuoteLine)
    with pytest.raises(SchemaInvalid, match=f"a0R000000000001AAA: {field} "):
        m.quote_from_records(MODEL.record, [line], default_currency="EUR")


def test_the_quote_update_body_is_the_golden_patch() -> None:
    """Golden: ordered → SBQQ__Ordered__c, status kept verbatim, order number."""
    command = QuoteUpdateRequested(
        quote_id="quote-a0QHn000001AbCdMAK", status="ordered", order_number="4711"
    )
    body = m.quote_update(command, key="q2c:deal-006Hn00000A1b2cIAB:cpq-update:1")
    assert as_json(body) == msgspec.json.decode(golden("quote_update.native.json"))


def test_a_picklist_status_is_written_to_the_picklist() -> None:
    """A canonical status with a picklist value sets SBQQ__Status__c; others do not."""
    accepted = m.quote_update(
        QuoteUpdateRequested(quote_id="q", status="accepted"), key="k"
    )
    assert accepted.SBQQ__Status__c == "Accepted"
    assert accepted.SBQQ__Ordered__c is None
    booked = m.quote_update(
        QuoteUpdateRequested(quote_id="q", status="booked"), key="k"
    )
    assert (booked.SBQQ__Status__c, booked.Broker_Status__c) == (None, "booked")


def test_the_golden_product_and_price_map_both_ways() -> None:
    """Golden: Product2 and PricebookEntry bodies for a product sync, and back."""
    pinned = msgspec.json.decode(golden("product.canonical.json"))
    product = msgspec.convert(pinned["product"], Product)
    price = msgspec.convert(pinned["prices"][0], PriceBookEntry)
    native = msgspec.json.decode(golden("product.native.json"))
    record = m.product_to_sf(product)
    entry = m.price_to_sf(price, product_id=None, pricebook_id=None)
    assert (
        msgspec.json.decode(
            msgspec.json.Encoder(decimal_format="number").encode(record)
        )
        == native["product"]
    )
    assert (
        msgspec.json.decode(msgspec.json.Encoder(decimal_format="number").encode(entry))
        == native["prices"][0]
    )
    assert m.product_from_sf(record) == product
    assert m.price_from_sf(entry, sku=product.sku) == price
    assert m.price_key(price.sku, price.currency) == "SAAS-FLEET-PRO:EUR"


def test_the_service_router_body_decodes_in_either_form() -> None:
    """A JSON string holding the model (Apex REST) or the model itself."""
    plain = golden("quote.model.json")
    wrapped = msgspec.json.encode(plain.decode())
    assert decode_quote_model(wrapped) == decode_quote_model(plain) == MODEL
    with pytest.raises(msgspec.DecodeError):
        decode_quote_model(b'"not a model"')


def test_the_field_map_renders() -> None:
    """The field map prints as a table naming both sides."""
    table = render("CPQ", m.FIELD_MAP)
    assert "SBQQ__RequiredBy__c" in table
    assert "quote.lines[].parent" in table
