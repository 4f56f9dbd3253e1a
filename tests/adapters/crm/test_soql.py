"""The SOQL subset: what the sandbox parses and what the client builds."""

from __future__ import annotations

from decimal import Decimal

import pytest

from adapters.crm import soql


def test_a_full_query_of_the_subset_parses() -> None:
    """Fields, object, AND-ed equality and IN, ORDER BY and LIMIT are read."""
    q = soql.parse(
        "select Id, Name from Account where Name = 'O\\'Hara' and IsDeleted = false"
        " and Id in ('001a', '001b') and AnnualRevenue = 12.5 and Site = null"
        " order by Name desc limit 5"
    )
    assert q == soql.Query(
        fields=("Id", "Name"),
        sobject="Account",
        where=(
            soql.Condition(field="Name", values=("O'Hara",)),
            soql.Condition(field="IsDeleted", values=(False,)),
            soql.Condition(field="Id", values=("001a", "001b")),
            soql.Condition(field="AnnualRevenue", values=(Decimal("12.5"),)),
            soql.Condition(field="Site", values=(None,)),
        ),
        order_by="Name",
        descending=True,
        limit=5,
    )


@pytest.mark.parametrize(
    "text",
    [
        "SELECT Account.Owner.Name FROM Opportunity",
        "SELECT Id FROM Account WHERE Name = 'a' OR Name = 'b'",
        "SELECT Id, (SELECT Id, (SELECT Id FROM Cases) FROM Contacts) FROM Account",
        "SELECT Id, (SELECT Account.Name FROM Contacts) FROM Account",
        "SELECT Id, (SELECT Id FROM Contacts FROM Account",
        "SELECT Id FROM Account)",
        "SELECT Id, FROM Account",
        "SELECT Id FROM Account WHERE Name LIKE 'A%'",
        "DELETE FROM Account",
    ],
)
def test_text_outside_the_subset_is_refused(text: str) -> None:
    """Deep paths, OR, nested subqueries, LIKE: a malformed query, not a guess."""
    with pytest.raises(soql.SoqlError):
        soql.parse(text)


def test_select_quotes_values_so_they_parse_back() -> None:
    """A value with quotes and backslashes survives the round trip."""
    text = soql.select(
        "Opportunity",
        ["Id", "StageName"],
        {"Name": "it's a \\ deal", "Id": ["006a", "006b"], "IsWon": True},
        order_by="Id",
        limit=10,
    )
    q = soql.parse(text)
    assert q.where == (
        soql.Condition(field="Name", values=("it's a \\ deal",)),
        soql.Condition(field="Id", values=("006a", "006b")),
        soql.Condition(field="IsWon", values=(True,)),
    )
    assert (q.order_by, q.limit) == ("Id", 10)


def test_parents_and_a_child_subquery_parse() -> None:
    """``Rel.Field`` items and ``(SELECT ... FROM Rel ...)`` are read apart."""
    q = soql.parse(
        "SELECT Id, Account.Name, (SELECT Id, Name FROM SBQQ__LineItems__r"
        " WHERE Name = 'a, (b) FROM c' ORDER BY SBQQ__Number__c DESC LIMIT 2),"
        " SBQQ__Account__r.BillingCountry FROM SBQQ__Quote__c WHERE Id = 'a0Q'"
    )
    assert q.fields == ("Id",)
    assert q.sobject == "SBQQ__Quote__c"
    assert q.parents == (
        soql.ParentField(relationship="Account", field="Name"),
        soql.ParentField(relationship="SBQQ__Account__r", field="BillingCountry"),
    )
    assert q.children == (
        soql.Query(
            fields=("Id", "Name"),
            sobject="SBQQ__LineItems__r",
            where=(soql.Condition(field="Name", values=("a, (b) FROM c",)),),
            order_by="SBQQ__Number__c",
            descending=True,
            limit=2,
        ),
    )
    assert q.where == (soql.Condition(field="Id", values=("a0Q",)),)


def test_a_from_inside_a_string_is_not_the_query_s() -> None:
    """The outer ``FROM`` is found outside quotes and parentheses."""
    q = soql.parse("SELECT Id FROM Account WHERE Name = ' FROM Contact'")
    assert (q.sobject, q.where[0].values) == ("Account", (" FROM Contact",))


def test_select_builds_relationship_items_that_parse_back() -> None:
    """`select` with parent fields and a `subquery` item round-trips."""
    text = soql.select(
        "Opportunity",
        [
            "Id",
            "Account.Name",
            soql.subquery("OpportunityLineItems", ["Id"], order_by="SortOrder"),
        ],
        {"Id": ["006a"]},
    )
    q = soql.parse(text)
    assert q.parents == (soql.ParentField(relationship="Account", field="Name"),)
    assert q.children[0].sobject == "OpportunityLineItems"
    assert q.children[0].order_by == "SortOrder"
