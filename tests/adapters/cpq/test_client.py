"""CpqClient against the sandbox org: quotes with lines, status writes."""

from __future__ import annotations

from decimal import Decimal

import pytest

from adapters.cpq import views as v
from adapters.cpq.client import CpqClient
from broker.errors import UpstreamRejected
from tests.adapters.crm.harness import Org

pytestmark = pytest.mark.anyio


def bundle(org: Org) -> tuple[str, str, str]:
    sb = org.sandbox
    opp = sb.create_opportunity(sb.seed_account("Acme", country_code="DE"), "Deal")
    quote = sb.create_quote(opp, SBQQ__ShippingCountry__c="DE")
    parent = sb.add_quote_line(
        quote, product_code="GW-1", quantity=Decimal(2), list_price=Decimal("100.00")
    )
    option = sb.add_quote_line(
        quote,
        product_code="OPT-1",
        quantity=Decimal(1),
        list_price=Decimal("10.00"),
        net_price=Decimal("9.00"),
        required_by=parent,
    )
    return quote, parent, option


async def test_the_quote_reader_gives_the_model_with_bundle_keys(org: Org) -> None:
    """read_quote: the ServiceRouter's (double-encoded) QuoteModel, decoded."""
    quote, parent, option = bundle(org)
    model = await CpqClient(org.client).read_quote(quote)
    assert model.record.Id == quote
    assert [(i.record.Id, i.key, i.parent_item_key) for i in model.line_items] == [
        (parent, 1, None),
        (option, 2, 1),
    ]
    assert model.net_total == Decimal("209.00")


async def test_a_quote_and_its_lines_are_read_by_query(org: Org) -> None:
    """quote_with_lines: the record and its lines in line-number order."""
    quote, parent, option = bundle(org)
    record, lines = await CpqClient(org.client).quote_with_lines(quote)
    assert record.SBQQ__Status__c == "Draft"
    assert record.SBQQ__NetAmount__c == Decimal("209.00")
    assert [(line.Id, line.SBQQ__RequiredBy__c) for line in lines] == [
        (parent, None),
        (option, parent),
    ]
    assert lines[1].SBQQ__NetTotal__c == Decimal("9.00")


async def test_a_missing_quote_is_not_found(org: Org) -> None:
    """Both readers say NOT_FOUND for a quote that is not there."""
    cpq = CpqClient(org.client)
    for read in (cpq.read_quote, cpq.quote_with_lines):
        with pytest.raises(UpstreamRejected) as caught:
            await read("a0Q000000000001AAA")
        assert caught.value.code == "NOT_FOUND"


async def test_the_ordered_flag_and_status_are_written(org: Org) -> None:
    """update_quote PATCHes only the fields given."""
    quote, _, _ = bundle(org)
    cpq = CpqClient(org.client)
    await cpq.update_quote(
        quote, v.Quote(SBQQ__Ordered__c=True, ERP_Order_Number__c="1")
    )
    record, _ = await cpq.quote_with_lines(quote)
    assert (record.SBQQ__Ordered__c, record.SBQQ__Status__c) == (True, "Draft")
    with pytest.raises(UpstreamRejected) as caught:
        await cpq.update_quote(quote, v.Quote(SBQQ__NetAmount__c=Decimal(1)))
    assert caught.value.code == "INVALID_FIELD_FOR_INSERT_UPDATE"
