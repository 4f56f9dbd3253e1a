"""The sandbox's objects: customers, search, lists, prices, subscriptions, invoices."""

from __future__ import annotations

import msgspec
import pytest

from adapters.billing import StripeClient, StripeSandbox
from adapters.billing.form import FormValue
from adapters.billing.views import Customer, Price, StripeList, Subscription
from broker.errors import UpstreamRejected

pytestmark = pytest.mark.anyio


async def test_search_finds_customers_by_metadata_email_and_name(
    client: StripeClient,
) -> None:
    """``metadata['k']:'v'``, ``email:``, ``name:`` and ``AND`` are understood."""
    a = await client.create_customer(
        idempotency_key="a",
        params={"name": "Acme", "email": "ap@acme.example", "metadata": {"k": "1"}},
    )
    await client.create_customer(
        idempotency_key="b", params={"name": "Beta", "metadata": {"k": "2"}}
    )
    assert await client.find_customer_by_metadata("k", "1") == a
    assert await client.find_customer_by_metadata("k", "3") is None
    page = await client.search_customers(
        "metadata['k']:'1' AND email:'AP@acme.example'"
    )
    assert [c.id for c in page.data] == [a.id]
    assert (await client.search_customers('name:"Beta"')).data[0].name == "Beta"


async def test_search_queries_it_cannot_parse_are_refused(client: StripeClient) -> None:
    """A malformed query is a 400 naming the ``query`` param."""
    with pytest.raises(UpstreamRejected, match="param query"):
        await client.search_customers("metadata.k = 1")


async def test_search_lags_behind_writes_when_told_to(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """With ``search_lag_s``, a new customer is not found yet."""
    sandbox.knobs.search_lag_s = 3600
    await client.create_customer(idempotency_key="c", params={"metadata": {"k": "1"}})
    assert await client.find_customer_by_metadata("k", "1") is None


async def test_customer_updates_merge_metadata_and_unset_with_empty_values(
    client: StripeClient,
) -> None:
    """Metadata merges key by key; ``""`` removes a key."""
    customer = await client.create_customer(
        idempotency_key="c", params={"metadata": {"a": "1", "b": "2"}}
    )
    updated = await client.update_customer(
        customer.id,
        idempotency_key="u",
        params={"name": "New", "metadata": {"b": "", "c": "3"}},
    )
    assert updated.name == "New"
    assert updated.metadata == {"a": "1", "c": "3"}
    assert await client.retrieve_customer(customer.id) == updated


async def test_prices_with_product_data_and_fractional_cents(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """``product_data`` creates the product; ``unit_amount_decimal`` keeps fractions."""
    price = await client.create_price(
        idempotency_key="p",
        params={
            "currency": "usd",
            "unit_amount_decimal": "1050.5",
            "product_data": {"name": "Storage"},
            "recurring": {"interval": "month"},
        },
    )
    assert isinstance(price, Price)
    assert price.unit_amount is None
    assert price.unit_amount_decimal == "1050.5"
    assert price.type == "recurring"
    assert isinstance(price.product, str)
    assert sandbox.account.products[price.product].name == "Storage"
    with pytest.raises(UpstreamRejected) as caught:
        await client.create_price(
            idempotency_key="p2",
            params={"currency": "usd", "unit_amount": 5, "product": "prod_nope"},
        )
    assert caught.value.code == "resource_missing"


async def test_subscriptions_refuse_one_time_prices_and_mixed_intervals(
    client: StripeClient,
) -> None:
    """Recurring prices only, all on one interval."""
    customer = await client.create_customer(idempotency_key="c", params={})
    await client.create_product(
        idempotency_key="p", params={"id": "prod_a", "name": "A"}
    )
    one_time = await client.create_price(
        idempotency_key="o",
        params={"currency": "usd", "unit_amount": 100, "product": "prod_a"},
    )
    with pytest.raises(UpstreamRejected, match="type=one_time"):
        await client.create_subscription(
            idempotency_key="s1",
            params={"customer": customer.id, "items": [{"price": one_time.id}]},
        )

    def item(interval: str) -> FormValue:
        return {
            "price_data": {
                "currency": "usd",
                "product": "prod_a",
                "unit_amount": 100,
                "recurring": {"interval": interval},
            }
        }

    with pytest.raises(UpstreamRejected, match=r"same recurring\.interval"):
        await client.create_subscription(
            idempotency_key="s2",
            params={"customer": customer.id, "items": [item("month"), item("year")]},
        )


async def test_invoice_flow_draft_finalize_pay(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Pending items join an invoice with ``include``; finalize opens, pay pays."""
    customer = await client.create_customer(idempotency_key="c", params={})
    await client.create_invoice_item(
        idempotency_key="i1",
        params={"customer": customer.id, "amount": 1500, "currency": "eur"},
    )
    await client.create_invoice_item(
        idempotency_key="i2",
        params={
            "customer": customer.id,
            "unit_amount_decimal": "333.5",
            "quantity": 3,
            "currency": "eur",
        },
    )
    draft = await client.create_invoice(
        idempotency_key="inv",
        params={
            "customer": customer.id,
            "collection_method": "send_invoice",
            "days_until_due": 30,
            "pending_invoice_items_behavior": "include",
        },
    )
    assert draft.status == "draft"
    assert [line.amount for line in draft.lines.data] == [1500, 1001]
    assert draft.total == draft.amount_due == 2501
    opened = await client.finalize_invoice(draft.id, idempotency_key="fin")
    assert opened.status == "open"
    assert opened.number is not None
    with pytest.raises(UpstreamRejected) as caught:
        await client.finalize_invoice(draft.id, idempotency_key="fin-again")
    assert caught.value.code == "invoice_not_editable"
    paid = await client.pay_invoice(draft.id, idempotency_key="pay")
    assert (paid.status, paid.amount_paid, paid.amount_remaining) == ("paid", 2501, 0)
    assert await client.retrieve_invoice(draft.id) == paid
    types = [e.type for e in sandbox.account.events.values()]
    assert types == ["invoice.finalized", "invoice.paid"]


async def test_invoices_exclude_pending_items_by_default(client: StripeClient) -> None:
    """Without ``include`` a new invoice starts empty, as in current API versions."""
    customer = await client.create_customer(idempotency_key="c", params={})
    await client.create_invoice_item(
        idempotency_key="i",
        params={"customer": customer.id, "amount": 1500, "currency": "usd"},
    )
    draft = await client.create_invoice(
        idempotency_key="inv", params={"customer": customer.id}
    )
    assert draft.lines.data == ()
    assert draft.total == 0


async def test_items_can_be_added_to_a_draft_only(client: StripeClient) -> None:
    """An item attached to a draft updates its totals; a finalized one refuses."""
    customer = await client.create_customer(idempotency_key="c", params={})
    draft = await client.create_invoice(
        idempotency_key="inv",
        params={
            "customer": customer.id,
            "currency": "usd",
            "collection_method": "send_invoice",
            "days_until_due": 7,
        },
    )
    await client.create_invoice_item(
        idempotency_key="i",
        params={
            "customer": customer.id,
            "invoice": draft.id,
            "amount": 700,
            "currency": "usd",
        },
    )
    assert (await client.retrieve_invoice(draft.id)).total == 700
    await client.finalize_invoice(draft.id, idempotency_key="f")
    with pytest.raises(UpstreamRejected) as caught:
        await client.create_invoice_item(
            idempotency_key="late",
            params={
                "customer": customer.id,
                "invoice": draft.id,
                "amount": 1,
                "currency": "usd",
            },
        )
    assert caught.value.code == "invoice_not_editable"


async def test_customers_are_listed_newest_first_by_creation_time(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """``GET /v1/customers`` sees a customer at once, however far search lags."""
    sandbox.knobs.search_lag_s = 3600
    old = await client.create_customer(
        idempotency_key="o", params={"metadata": {"k": "1"}}
    )
    sandbox.account.customers[old.id] = msgspec.structs.replace(old, created=1000)
    new = await client.create_customer(
        idempotency_key="n", params={"metadata": {"k": "1"}}
    )
    assert await client.find_customer_by_metadata("k", "1") is None
    found = await client.find_customer_by_metadata("k", "1", created_since=2000)
    assert found == new
    page = await client.get("/v1/customers", {"limit": 1}, StripeList[Customer])
    assert ([c.id for c in page.data], page.has_more) == ([new.id], True)
    rest = await client.get(
        "/v1/customers", {"starting_after": new.id}, StripeList[Customer]
    )
    assert ([c.id for c in rest.data], rest.has_more) == ([old.id], False)
    back = await client.get(
        "/v1/customers", {"ending_before": old.id}, StripeList[Customer]
    )
    assert [c.id for c in back.data] == [new.id]
    with pytest.raises(UpstreamRejected) as caught:
        await client.get(
            "/v1/customers", {"starting_after": "cus_nope"}, StripeList[Customer]
        )
    assert caught.value.code == "resource_missing"


async def test_subscriptions_are_found_by_metadata_across_pages(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Paging through a customer's subscriptions, canceled ones included."""
    customer = await client.create_customer(idempotency_key="c", params={})
    other = await client.create_customer(idempotency_key="o", params={})
    await client.create_product(
        idempotency_key="p", params={"id": "prod_a", "name": "A"}
    )
    item: FormValue = {
        "price_data": {
            "currency": "usd",
            "product": "prod_a",
            "unit_amount": 100,
            "recurring": {"interval": "month"},
        }
    }
    made = [
        await client.create_subscription(
            idempotency_key=f"s{i}",
            params={
                "customer": owner.id,
                "items": [item],
                "metadata": {"q2c_subscription_id": f"sub-{i}"},
            },
        )
        for i, owner in enumerate([customer, customer, other, customer, customer])
    ]
    first = made[0]
    sandbox.account.subscriptions[first.id] = msgspec.structs.replace(
        first, status="canceled"
    )
    found = await client.find_subscription_by_metadata(
        customer.id, "q2c_subscription_id", "sub-0", page_size=2
    )
    assert found is not None
    assert (found.id, found.status) == (first.id, "canceled")
    assert (
        await client.find_subscription_by_metadata(
            customer.id, "q2c_subscription_id", "sub-2", page_size=2
        )
        is None
    )  # another customer's
    default = await client.get(
        "/v1/subscriptions", {"customer": customer.id}, StripeList[Subscription]
    )
    assert [s.id for s in default.data] == [made[4].id, made[3].id, made[1].id]
    with pytest.raises(UpstreamRejected, match="param status"):
        await client.get(
            "/v1/subscriptions", {"status": "gone"}, StripeList[Subscription]
        )
