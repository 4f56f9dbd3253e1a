"""BillingConnector against the sandbox: one command, exactly one subscription."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import msgspec
import pytest

from adapters.billing import (
    BillingConnector,
    StripeClient,
    StripeSandbox,
    idempotency_key,
)
from adapters.billing.form import FormValue
from adapters.billing.mapping import (
    META_ACCOUNT,
    META_DEAL,
    customer_create_params,
    product_params,
)
from adapters.billing.views import Subscription
from broker.errors import (
    SchemaInvalid,
    UnknownMessageType,
    UpstreamRejected,
    UpstreamUnavailable,
)
from canonical import Envelope
from canonical.commerce import SubscriptionItem
from canonical.q2c import SubscriptionCreated, SubscriptionRequested

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).resolve().parents[2] / "contract" / "golden" / "billing"


# Read once at import: the tests below run on the event loop.
COMMAND = msgspec.json.decode(
    (GOLDEN / "subscription_requested.json").read_bytes(), type=SubscriptionRequested
)


def command(**changes: object) -> SubscriptionRequested:
    cmd = COMMAND
    if not changes:
        return cmd
    return msgspec.structs.replace(
        cmd, subscription=msgspec.structs.replace(cmd.subscription, **changes)
    )


def envelope(
    key: str = "billing.subscription.requested:sub-0061x00000AbCdE",
) -> Envelope:
    return Envelope(
        id="msg-1",
        source="/q2c/deal",
        type="billing.subscription.requested",
        time=datetime(2026, 1, 1, tzinfo=UTC),
        correlation_id="deal-0061x00000AbCdE",
        idempotency_key=key,
    )


async def test_the_connector_declares_its_command(client: StripeClient) -> None:
    """One command tag, mapped to its Struct; the system name is configurable."""
    connector = BillingConnector(client, system="stripe-eu")
    assert connector.system == "stripe-eu"
    assert connector.commands == {
        "billing.subscription.requested": SubscriptionRequested
    }


async def test_a_subscription_request_creates_customer_products_and_subscription(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """The outcome reports Stripe's id, status and per-period amount."""
    (created,) = await BillingConnector(client).handle(command(), envelope())
    assert isinstance(created, SubscriptionCreated)
    assert created.deal_id == "deal-0061x00000AbCdE"
    assert created.status == "active"
    assert str(created.amount_per_period) == "218.38 EUR"
    native = sandbox.account.subscriptions[created.native_id]
    assert native.metadata[META_DEAL] == "deal-0061x00000AbCdE"
    (customer,) = sandbox.account.customers.values()
    assert customer.metadata == {META_ACCOUNT: "acct-0011x00000XyZaB"}
    assert customer.name == "Acme Maschinenbau GmbH"
    assert customer.address is not None
    assert customer.address.city == "Stuttgart"
    assert sorted(sandbox.account.products) == [
        "q2c-sku-ARCHIVE-TB",
        "q2c-sku-SEAT-PRO",
        "q2c-sku-SUPPORT-24X7",
    ]


async def test_a_redelivered_command_has_exactly_one_effect(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Same envelope again: the same answer; still one subscription.

    A redelivery finds the subscription; a retry that raced its first
    attempt would have Stripe replay the create instead.
    """
    connector = BillingConnector(client)
    first = await connector.handle(command(), envelope(), first_attempt=True)
    again = await connector.handle(command(), envelope())
    assert first == again
    assert len(sandbox.account.subscriptions) == 1
    assert len(sandbox.account.customers) == 1


async def test_an_existing_customer_is_found_by_metadata(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """A customer tagged with the account id is reused, and brought up to date."""
    existing = await client.create_customer(
        idempotency_key="older",
        params={"name": "Old Name", "metadata": {META_ACCOUNT: "acct-0011x00000XyZaB"}},
    )
    (created,) = await BillingConnector(client).handle(command(), envelope())
    assert isinstance(created, SubscriptionCreated)
    assert sandbox.account.subscriptions[created.native_id].customer == existing.id
    assert list(sandbox.account.customers) == [existing.id]
    assert sandbox.account.customers[existing.id].name == "Acme Maschinenbau GmbH"


async def test_search_lag_does_not_create_a_twin_customer(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Two deals of one account while search lags: one customer, two subscriptions."""
    sandbox.knobs.search_lag_s = 3600
    connector = BillingConnector(client)
    await connector.handle(command(), envelope("deal-a"))
    await connector.handle(command(id="sub-0061x00000OtHeR"), envelope("deal-b"))
    assert len(sandbox.account.customers) == 1
    assert len(sandbox.account.subscriptions) == 2


async def test_products_created_elsewhere_in_between_are_fine(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """A product that already exists is used, not created again."""
    await client.create_product(
        idempotency_key="someone-else", params={"id": "q2c-sku-SEAT-PRO", "name": "x"}
    )
    await BillingConnector(client).handle(command(), envelope())
    assert sandbox.account.products["q2c-sku-SEAT-PRO"].name == "x"
    assert len(sandbox.account.products) == 3


async def test_unmappable_subscriptions_fail_before_any_call(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """A fractional quantity is SchemaInvalid, and Stripe is not touched."""
    items = (
        SubscriptionItem(
            sku="SEAT-PRO", quantity=Decimal("1.5"), unit_amount=Decimal(1)
        ),
    )
    with pytest.raises(SchemaInvalid, match="not a whole number"):
        await BillingConnector(client).handle(command(items=items), envelope())
    assert sandbox.counts["requests"] == 0


async def test_an_answer_with_an_absurd_unit_amount_is_schema_invalid(
    client: StripeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``unit_amount_decimal`` 1e999999 in Stripe's answer: refused, no CPU burnt."""
    native = msgspec.json.decode(
        (GOLDEN / "stripe_subscription.json").read_bytes(), type=Subscription
    )
    item = native.items.data[0]
    price = msgspec.structs.replace(item.price, unit_amount_decimal="1e999999")
    items = msgspec.structs.replace(
        native.items, data=(msgspec.structs.replace(item, price=price),)
    )

    async def created(**_: object) -> Subscription:
        return msgspec.structs.replace(native, items=items)

    monkeypatch.setattr(client, "create_subscription", created)
    with pytest.raises(SchemaInvalid, match="unit_amount_decimal 1E\\+999999"):
        await BillingConnector(client).handle(command(), envelope())


async def test_a_stripe_refusal_propagates_with_its_code(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """No canonical billing rejection exists: the refusal is raised."""
    items = (
        SubscriptionItem(sku="SEAT-PRO", quantity=Decimal(1), unit_amount=Decimal(-5)),
    )
    with pytest.raises(UpstreamRejected) as caught:
        await BillingConnector(client).handle(command(items=items), envelope())
    assert caught.value.code == "parameter_invalid_integer"
    assert sandbox.account.subscriptions == {}


async def test_an_outage_is_transient(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Stripe down: UpstreamUnavailable, for the runtime to retry."""
    sandbox.knobs.outage = True
    with pytest.raises(UpstreamUnavailable):
        await BillingConnector(client).handle(command(), envelope())


async def test_a_retry_after_a_fault_still_has_one_effect(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Faults on the way fail the attempt; the retry completes it once."""
    connector = BillingConnector(client)
    sandbox.knobs.error_rate = 0.5
    outcome: list[SubscriptionCreated] = []
    for _ in range(30):
        try:
            (created,) = await connector.handle(command(), envelope())
        except UpstreamUnavailable:
            continue
        assert isinstance(created, SubscriptionCreated)
        outcome.append(created)
        break
    assert outcome, "no attempt got through"
    sandbox.knobs.error_rate = 0.0
    assert await connector.handle(command(), envelope()) == outcome
    assert len(sandbox.account.subscriptions) == 1
    assert len(sandbox.account.customers) == 1


async def test_other_commands_are_not_understood(client: StripeClient) -> None:
    """A command of another system is a permanent error."""
    with pytest.raises(UnknownMessageType, match="billing has no command"):
        await BillingConnector(client).handle(object(), envelope())


async def test_a_product_seen_once_is_not_asked_after_again(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """The second subscription of the same SKUs: the customer search and the create.

    A first attempt does not look for its subscription either: nothing can
    exist yet.
    """
    connector = BillingConnector(client)
    await connector.handle(command(), envelope("deal-a"))
    before = sandbox.counts["requests"]
    (created,) = await connector.handle(
        command(id="sub-0061x00000OtHeR"), envelope("deal-b"), first_attempt=True
    )
    assert isinstance(created, SubscriptionCreated)
    assert sandbox.counts["requests"] - before == 2


async def test_a_product_removed_since_is_created_again_after_the_refusal(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Stripe's refusal drops what the connector knew; the next command recreates.

    The product was made by hand (our creation's idempotency key would have
    Stripe replay the old answer for a day, whatever happened since).
    """
    await client.create_product(
        idempotency_key="by-hand", params={"id": "q2c-sku-SEAT-PRO", "name": "x"}
    )
    connector = BillingConnector(client)
    await connector.handle(command(), envelope("deal-a"))
    removed = sorted(sandbox.account.products)
    del sandbox.account.products["q2c-sku-SEAT-PRO"]  # removed in the dashboard
    with pytest.raises(UpstreamRejected) as refused:
        await connector.handle(command(id="sub-0061x00000OtHeR"), envelope("deal-b"))
    assert refused.value.code == "resource_missing"
    (created,) = await connector.handle(
        command(id="sub-0061x00000OtHeR"), envelope("deal-c")
    )
    assert isinstance(created, SubscriptionCreated)
    assert sorted(sandbox.account.products) == removed


# --- re-drives, stored failures and shared keys ----------------------------------


async def test_a_redrive_after_stripe_pruned_the_keys_finds_the_subscription(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """A re-drive a day later (keys pruned): the subscription is found, not made twice.

    The answer is the existing subscription; no second subscription and no
    second invoice.
    """
    connector = BillingConnector(client)
    first = await connector.handle(command(), envelope("deal-A:sub"))
    assert sandbox.prune_idempotency_keys() > 0  # Stripe, after 24 hours
    again = await connector.handle(
        command(), envelope("deal-A:sub"), first_attempt=False
    )
    assert again == first
    assert len(sandbox.account.subscriptions) == 1
    assert len(sandbox.account.invoices) == 1
    assert len(sandbox.account.customers) == 1


@pytest.mark.parametrize("search_lag_s", [0, 3600])
async def test_a_stored_500_on_the_account_key_does_not_block_its_deals(
    sandbox: StripeSandbox, client: StripeClient, search_lag_s: float
) -> None:
    """Stripe replays a 500 stored under ``q2c:customer:<account>``; deals go through.

    Deals A (again), B and C of the account all succeed, with one customer,
    whether or not search has caught up with it.
    """
    sandbox.knobs.search_lag_s = search_lag_s
    connector = BillingConnector(client)
    sandbox.knobs.execution_error_rate = 1.0
    with pytest.raises(UpstreamUnavailable, match="HTTP 500"):
        await connector.handle(command(id="sub-A"), envelope("deal-A"))
    sandbox.knobs.execution_error_rate = 0.0
    for deal in ("A", "B", "C"):
        (created,) = await connector.handle(
            command(id=f"sub-{deal}"), envelope(f"deal-{deal}")
        )
        assert isinstance(created, SubscriptionCreated)
    assert len(sandbox.account.customers) == 1
    assert len(sandbox.account.subscriptions) == 3


async def test_concurrent_deals_past_a_stored_500_still_make_one_customer(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Two deals racing past a poisoned account key converge on one customer.

    The fresh key is derived from the poisoned one, so both commands use
    the same; the loser of the race meets a 409 and retries.
    """
    account = COMMAND.subscription.account
    sandbox.knobs.execution_error_rate = 1.0
    with pytest.raises(UpstreamUnavailable):
        await client.create_customer(
            idempotency_key=idempotency_key("q2c", "customer", account.id),
            params=customer_create_params(account),
        )
    sandbox.knobs.execution_error_rate = 0.0
    sandbox.knobs.search_lag_s = 3600
    sandbox.knobs.latency_s = 0.05
    connector = BillingConnector(client)
    done: list[str] = []

    async def deal(name: str) -> None:
        for _ in range(20):
            try:
                await connector.handle(command(id=f"sub-{name}"), envelope(name))
            except UpstreamUnavailable:
                continue
            done.append(name)
            return

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(deal, "deal-B")
            tg.start_soon(deal, "deal-C")
    assert sorted(done) == ["deal-B", "deal-C"]
    assert len(sandbox.account.customers) == 1
    assert len(sandbox.account.subscriptions) == 2


async def test_a_customer_that_appeared_while_search_lags_is_not_twinned(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Past a stored 500, a customer search cannot see yet is found in the list.

    Stripe's 500s are indeterminate: the failed request may have made the
    customer after all. Creating it again under a fresh key would twin it.
    """
    account = COMMAND.subscription.account
    sandbox.knobs.execution_error_rate = 1.0
    with pytest.raises(UpstreamUnavailable):
        await client.create_customer(
            idempotency_key=idempotency_key("q2c", "customer", account.id),
            params=customer_create_params(account),
        )
    sandbox.knobs.execution_error_rate = 0.0
    sandbox.knobs.search_lag_s = 3600
    made = await client.create_customer(
        idempotency_key="made-after-all", params=customer_create_params(account)
    )
    (created,) = await BillingConnector(client).handle(command(), envelope())
    assert isinstance(created, SubscriptionCreated)
    assert list(sandbox.account.customers) == [made.id]


async def test_a_stored_500_on_a_product_key_does_not_block_its_sku(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """Stripe replays a 500 stored under ``q2c:product:<sku>``; the SKU still works."""
    sandbox.knobs.execution_error_rate = 1.0
    with pytest.raises(UpstreamUnavailable):
        await client.create_product(
            idempotency_key=idempotency_key("q2c", "product", "SEAT-PRO"),
            params=product_params("SEAT-PRO"),
        )
    sandbox.knobs.execution_error_rate = 0.0
    for deal in ("A", "B"):
        await BillingConnector(client).handle(
            command(id=f"sub-{deal}"), envelope(f"deal-{deal}")
        )
    assert "q2c-sku-SEAT-PRO" in sandbox.account.products
    assert len(sandbox.account.products) == 3
    assert len(sandbox.account.subscriptions) == 2


async def test_a_stored_500_on_the_subscription_key_is_looked_past(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """The command's own key poisoned: found absent, created under a fresh key."""
    connector = BillingConnector(client)
    await connector.handle(command(id="sub-X"), envelope("deal-X"))
    sandbox.knobs.execution_error_rate = 1.0  # the subscription is the only write
    with pytest.raises(UpstreamUnavailable, match="POST /v1/subscriptions"):
        await connector.handle(command(id="sub-A"), envelope("deal-A"))
    sandbox.knobs.execution_error_rate = 0.0
    (created,) = await connector.handle(command(id="sub-A"), envelope("deal-A"))
    assert isinstance(created, SubscriptionCreated)
    again = await connector.handle(command(id="sub-A"), envelope("deal-A"))
    assert again == [created]
    assert len(sandbox.account.subscriptions) == 2


async def test_a_retry_after_another_deal_moved_the_customer_is_not_refused(
    sandbox: StripeSandbox, client: StripeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The customer update's key follows its parameters: no ``idempotency_error``.

    Deal A updates the customer and fails on the subscription; deal B moves
    the customer; A's retry computes another update, which is a new request
    rather than a reuse of A's first key with other parameters.
    """
    real = client.create_subscription
    calls = 0

    async def times_out_once(
        *, idempotency_key: str, params: Mapping[str, FormValue]
    ) -> Subscription:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise UpstreamUnavailable("billing", "POST /v1/subscriptions: timeout")
        return await real(idempotency_key=idempotency_key, params=params)

    monkeypatch.setattr(client, "create_subscription", times_out_once)
    connector = BillingConnector(client)
    deal_a = command()
    with pytest.raises(UpstreamUnavailable, match="timeout"):
        await connector.handle(deal_a, envelope("deal-A:sub"))
    account = deal_a.subscription.account
    assert account.billing_address is not None
    moved = msgspec.structs.replace(
        account,
        billing_address=msgspec.structs.replace(account.billing_address, city="Berlin"),
    )
    await connector.handle(command(id="sub-B", account=moved), envelope("deal-B:sub"))
    (created,) = await connector.handle(
        deal_a, envelope("deal-A:sub"), first_attempt=False
    )
    assert isinstance(created, SubscriptionCreated)
    assert sandbox.counts["idempotency_conflicts"] == 0
    assert len(sandbox.account.customers) == 1
    assert len(sandbox.account.subscriptions) == 2


async def test_the_same_customer_update_is_sent_once(
    sandbox: StripeSandbox, client: StripeClient
) -> None:
    """A redelivery repeating the same update has Stripe replay it."""
    existing = await client.create_customer(
        idempotency_key="older",
        params={"name": "Old Name", "metadata": {META_ACCOUNT: "acct-0011x00000XyZaB"}},
    )
    connector = BillingConnector(client)
    await connector.handle(command(), envelope())
    # Back to the old name, as if the update had not been seen; same command.
    sandbox.account.customers[existing.id] = existing
    replays = sandbox.counts["idempotent_replays"]
    await connector.handle(command(), envelope(), first_attempt=True)
    assert sandbox.counts["idempotent_replays"] - replays == 2  # update, subscription
    assert sandbox.account.customers[existing.id].name == "Old Name"
