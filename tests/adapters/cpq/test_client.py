"""CpqClient against the sandbox org: quotes with lines, status writes."""

from __future__ import annotations

from decimal import Decimal
from typing import cast

import pytest

from adapters.cpq import views as v
from adapters.cpq.client import CpqClient
from adapters.crm.client import SalesforceClient
from adapters.crm.views import QueryResult
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
            await read("a0Q000000000001EAA")
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


async def test_the_account_rides_along_with_the_quote_in_one_request(
    org: Org,
) -> None:
    """With account_fields the quote carries its account; one API request."""
    quote, _, _ = bundle(org)
    before = org.sandbox.counts["api_requests"]
    record, lines = await CpqClient(org.client).quote_with_lines(
        quote, account_fields=("Id", "Name", "BillingCountryCode")
    )
    assert org.sandbox.counts["api_requests"] == before + 1
    assert record.SBQQ__Account__r is not None
    assert record.SBQQ__Account__r.Id == record.SBQQ__Account__c
    assert (record.SBQQ__Account__r.Name, len(lines)) == ("Acme", 2)


async def test_an_id_that_is_no_id_is_not_found_without_a_request(org: Org) -> None:
    """A validation request's path may name anything; the org is not asked."""
    before = org.sandbox.counts["api_requests"]
    with pytest.raises(UpstreamRejected) as caught:
        await CpqClient(org.client).quote_with_lines("quote') OR Id != ('")
    assert caught.value.code == "NOT_FOUND"
    assert org.sandbox.counts["api_requests"] == before


class _PagedLines:
    """A client whose org pages the quote's lines: the first page only inline."""

    system = "crm"

    def __init__(self, lines: tuple[v.QuoteLine, ...]) -> None:
        self.lines = lines
        self.selects: list[dict[str, object]] = []

    async def query(self, text: str, view: type[v.Quote]) -> tuple[v.Quote, ...]:
        page = QueryResult(
            total_size=len(self.lines), done=False, records=self.lines[:1]
        )
        return (view(Id="a0Q000000000001EAA", SBQQ__LineItems__r=page),)

    async def select(
        self, view: type[v.QuoteLine], fields: object, where: dict[str, object]
    ) -> tuple[v.QuoteLine, ...]:
        self.selects.append(where)
        return self.lines


async def test_lines_the_org_pages_are_read_with_a_query_of_their_own() -> None:
    """A child relationship that is not ``done`` is not taken for the whole."""
    lines = tuple(
        v.QuoteLine(Id=f"a0R00000000000{n}AAA", SBQQ__Number__c=Decimal(n))
        for n in (2, 1, 3)
    )
    client = _PagedLines(lines)
    _, read = await CpqClient(cast(SalesforceClient, client)).quote_with_lines(
        "a0Q000000000001EAA"
    )
    assert [line.SBQQ__Number__c for line in read] == [1, 2, 3]
    assert client.selects == [{"SBQQ__Quote__c": "a0Q000000000001EAA"}]
