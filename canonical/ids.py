"""Canonical ids, and the one rule that ties every document of a deal together.

A deal is named after the CRM opportunity that started it: opportunity
``opp-<crm id>`` is deal ``deal-<crm id>``, its order is ``order-<crm id>``
and the order's customer reference, the one field every ERP echoes back on
confirmations, invoices and deliveries, is ``Q2C-<crm id>`` (22 characters for
an 18-character Salesforce id, within SAP's 35). So any system's message about
any document of the deal leads back to the deal's correlation id without a
lookup.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "DealRef",
    "ACCOUNT",
    "OPPORTUNITY",
    "QUOTE",
    "deal_id",
    "order_id",
    "subscription_id",
    "customer_ref",
    "deal_of_customer_ref",
    "deal_of_opportunity",
    "deal_ref",
]

#: Id prefixes of the records the CRM and CPQ master: ``<prefix><crm id>``.
ACCOUNT = "acct-"
OPPORTUNITY = "opp-"
QUOTE = "quote-"

_REF_PREFIX = "Q2C-"


def _native(prefix: str, canonical: str) -> str:
    head, sep, rest = canonical.partition("-")
    if not sep or head != prefix or not rest:
        raise ValueError(f"{canonical!r} is not a canonical {prefix} id")
    return rest


def deal_id(crm_opportunity_id: str) -> str:
    """The deal (correlation id) started by CRM opportunity *crm_opportunity_id*."""
    return f"deal-{crm_opportunity_id}"


def deal_of_opportunity(opportunity: str) -> str:
    """``opp-X`` → ``deal-X``."""
    return deal_id(_native(OPPORTUNITY[:-1], opportunity))


def order_id(deal: str) -> str:
    """``deal-X`` → ``order-X``: one order per deal."""
    return f"order-{_native('deal', deal)}"


def subscription_id(deal: str) -> str:
    """``deal-X`` → ``sub-X``: the subscription of the deal's recurring lines."""
    return f"sub-{_native('deal', deal)}"


def customer_ref(deal: str) -> str:
    """The ERP customer reference (PO number) of the deal's order: ``Q2C-X``.

    Raises:
        ValueError: the reference would exceed SAP's 35 characters.
    """
    ref = _REF_PREFIX + _native("deal", deal)
    if len(ref) > 35:
        raise ValueError(f"customer reference {ref!r} is longer than 35 characters")
    return ref


def deal_of_customer_ref(ref: str) -> str:
    """``Q2C-X`` → ``deal-X``, for confirmations and invoices that echo it.

    Raises:
        ValueError: not a reference the broker issued.
    """
    if not ref.startswith(_REF_PREFIX) or len(ref) == len(_REF_PREFIX):
        raise ValueError(f"{ref!r} is not a Q2C customer reference")
    return deal_id(ref[len(_REF_PREFIX) :])


class DealRef(msgspec.Struct, frozen=True, kw_only=True):
    """The deal, and its order, that an ERP document belongs to."""

    deal_id: str
    order_id: str


def deal_ref(reference: str | None) -> DealRef | None:
    """The deal behind a customer reference an ERP echoes; None if not one of ours."""
    if not reference:
        return None
    try:
        deal = deal_of_customer_ref(reference)
    except ValueError:
        return None
    return DealRef(deal_id=deal, order_id=order_id(deal))
