"""Stripe's customer search query language, as far as the sandbox needs it.

``GET /v1/customers/search`` takes clauses ``metadata['k']:'v'``,
``email:'…'`` (case-insensitive) and ``name:'…'`` joined by ``AND``; a query
it cannot parse is refused with Stripe's 400. Separate from the account
because it is a small parser with no state.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from adapters.billing.params import Refusal
from adapters.billing.views import Customer

__all__ = ["customer_query"]

_SEARCH_CLAUSE = re.compile(
    r"""\s*(?:metadata\[(?P<q1>['"])(?P<key>[^'"]+)(?P=q1)\]|(?P<field>email|name))"""
    r"""\s*:\s*(?P<q2>['"])(?P<value>[^'"]*)(?P=q2)\s*"""
)


def customer_query(query: str) -> Callable[[Customer], bool]:
    """A predicate for the customers *query* finds.

    Raises:
        Refusal: 400, the query does not parse.
    """
    clauses = [_clause(part) for part in re.split(r"\s+AND\s+", query.strip())]

    def match(customer: Customer) -> bool:
        return all(_matches(customer, f, key, value) for f, key, value in clauses)

    return match


def _clause(text: str) -> tuple[str, str, str]:
    match = _SEARCH_CLAUSE.fullmatch(text)
    if match is None:
        raise Refusal(
            400,
            f"We were unable to parse your search query: {text!r}",
            param="query",
        )
    if match.group("key") is not None:
        return "metadata", match.group("key"), match.group("value")
    return match.group("field"), "", match.group("value")


def _matches(customer: Customer, field: str, key: str, value: str) -> bool:
    if field == "metadata":
        return customer.metadata.get(key) == value
    if field == "email":
        return (customer.email or "").lower() == value.lower()
    return customer.name == value
