"""Stripe's list endpoints, as far as the sandbox needs them.

``GET /v1/customers`` (filters ``created``, ``email``) and
``GET /v1/subscriptions`` (filters ``customer``, ``status``) answer a list
object, newest first, ``limit`` (1 to 100, 10 by default) objects a page, with
``has_more``. ``starting_after=<id>`` continues after the last object of a
page, ``ending_before=<id>`` goes back from the first; an id that does not
exist is refused (``resource_missing``). Subscriptions are listed without
the canceled ones unless ``status`` asks for them (``all``, ``ended``,
``canceled``). Unlike search, lists read the objects themselves: a customer
created a moment ago is listed at once.

No state here: the sandbox hands over the account's objects in creation
order, and gets the page back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from adapters.billing.params import (
    Params,
    Refusal,
    check_known,
    read_dict,
    read_enum,
    read_int,
    read_str,
)
from adapters.billing.views import Customer, StripeList, Subscription

__all__ = ["list_customers", "list_subscriptions"]

_PAGE = ("limit", "starting_after", "ending_before", "expand")
_STATUSES = (
    "active", "past_due", "unpaid", "canceled", "incomplete",
    "incomplete_expired", "trialing", "paused", "all", "ended",
)  # fmt: skip
_ENDED = frozenset({"canceled", "incomplete_expired"})
_RANGE = ("gt", "gte", "lt", "lte")


class _Listed(Protocol):
    @property
    def id(self) -> str: ...


L = TypeVar("L", bound=_Listed)


def list_customers(
    customers: Iterable[Customer], params: Params
) -> StripeList[Customer]:
    """``GET /v1/customers``: ``created`` (exact, or ``gt``/``gte``/``lt``/``lte``).

    ``email`` filters too.

    Raises:
        Refusal: 400 for an unknown or malformed parameter or cursor.
    """
    check_known(params, {"created", "email", *_PAGE})
    email = read_str(params, "email")
    created = _created_range(params)

    def keep(customer: Customer) -> bool:
        return created(customer.created) and (email is None or customer.email == email)

    return _page(list(customers), params, keep, url="/v1/customers", kind="customer")


def list_subscriptions(
    subscriptions: Iterable[Subscription], params: Params
) -> StripeList[Subscription]:
    """``GET /v1/subscriptions``: by ``customer`` and ``status``.

    Canceled subscriptions are listed only when ``status`` asks for them.

    Raises:
        Refusal: 400 for an unknown or malformed parameter or cursor.
    """
    check_known(params, {"customer", "status", *_PAGE})
    customer = read_str(params, "customer")
    status = read_enum(params, "status", _STATUSES)

    def keep(subscription: Subscription) -> bool:
        if customer is not None and subscription.customer_id != customer:
            return False
        if status is None:
            return subscription.status != "canceled"
        if status == "ended":
            return subscription.status in _ENDED
        return status in ("all", subscription.status)

    return _page(
        list(subscriptions), params, keep, url="/v1/subscriptions", kind="subscription"
    )


def _page(
    oldest_first: list[L],
    params: Params,
    keep: Callable[[L], bool],
    *,
    url: str,
    kind: str,
) -> StripeList[L]:
    limit = read_int(params, "limit")
    if limit is not None and not 1 <= limit <= 100:
        raise Refusal(400, "limit must be between 1 and 100", param="limit")
    size = limit or 10
    newest_first = oldest_first[::-1]
    after = read_str(params, "starting_after")
    before = read_str(params, "ending_before")
    if after is not None and before is not None:
        raise Refusal(
            400,
            "You may only specify one of these parameters: ending_before, "
            "starting_after.",
        )
    if after is not None:
        start = _at(newest_first, after, kind) + 1
        found = [o for o in newest_first[start:] if keep(o)]
        return StripeList(data=tuple(found[:size]), has_more=len(found) > size, url=url)
    if before is not None:
        found = [o for o in newest_first[: _at(newest_first, before, kind)] if keep(o)]
        return StripeList(
            data=tuple(found[-size:]), has_more=len(found) > size, url=url
        )
    found = [o for o in newest_first if keep(o)]
    return StripeList(data=tuple(found[:size]), has_more=len(found) > size, url=url)


def _at(objects: list[L], object_id: str, kind: str) -> int:
    for i, o in enumerate(objects):
        if o.id == object_id:
            return i
    raise Refusal(
        400,
        f"No such {kind}: '{object_id}'",
        code="resource_missing",
        param="starting_after/ending_before",
    )


def _created_range(params: Params) -> Callable[[int], bool]:
    raw = params.get("created")
    if raw is None:
        return lambda created: True
    if isinstance(raw, str):
        exact = read_int(params, "created")
        return lambda created: exact is None or created == exact
    bounds = read_dict(params, "created") or {}
    check_known(bounds, _RANGE, "created")
    gt, gte, lt, lte = (read_int(bounds, op, param=f"created[{op}]") for op in _RANGE)
    return lambda c: (
        (gt is None or c > gt)
        and (gte is None or c >= gte)
        and (lt is None or c < lt)
        and (lte is None or c <= lte)
    )
