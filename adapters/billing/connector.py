"""The billing system actor's handler: provision subscriptions in Stripe.

One command, ``billing.subscription.requested``, becomes up to four kinds
of calls, each safe to repeat when the command is redelivered:

1. find the customer by ``metadata[q2c_account_id]``; if search finds none,
   create it under the key ``q2c:customer:<account id>``. Search trails
   writes by up to a minute, so two commands for one account may both miss;
   the account-derived key makes Stripe replay the first creation to the
   second instead of creating a twin (for 24 h, after which search has long
   caught up);
2. bring name and address up to date (only when they differ);
3. make sure each SKU's product exists (``q2c-sku-<SKU>``, a caller-chosen
   id: a second creation is refused as ``resource_already_exists``). A
   product seen once is not asked after again, until Stripe refuses a
   subscription (it may have been removed in the meantime); Stripe's request
   rate limits are low, 25 a second in test mode;
4. create the subscription under a key derived from the envelope's
   idempotency key, so a redelivery gets Stripe's stored answer back.

Stripe keeps idempotency keys for at least 24 hours; a redelivery later
than that would create a second subscription. Redeliveries come within
minutes (retry tiers) or from the dead-letter queue by an operator's hand.

Stripe has no business refusal the canonical model describes for billing,
so refusals are not turned into events: `UpstreamRejected` propagates (the
command is dead-lettered) and `UpstreamUnavailable` too (retried later).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, final

from adapters.billing.client import StripeApi, idempotency_key
from adapters.billing.mapping import (
    META_ACCOUNT,
    customer_create_params,
    customer_update_params,
    product_id,
    product_params,
    subscription_created,
    subscription_params,
)
from broker.errors import SchemaInvalid, UnknownMessageType, UpstreamRejected
from canonical import Envelope
from canonical.commerce import Account
from canonical.q2c import SubscriptionCreated, SubscriptionRequested

__all__ = ["BillingConnector"]

#: SKUs whose products are known to exist, at most: any catalogue stays bounded.
_KNOWN_PRODUCTS = 10_000


@final
class BillingConnector:
    """`broker.connector.Connector` for a Stripe billing account."""

    def __init__(self, stripe: StripeApi, *, system: str = "billing") -> None:
        self._stripe = stripe
        self._system = system
        self._products: set[str] = set()  # SKUs whose product exists

    @property
    def system(self) -> str:
        """The configured system name; its queue is ``q2c.sys.<system>``."""
        return self._system

    @property
    def commands(self) -> Mapping[str, type[Any]]:
        """The one command this system carries out."""
        return {"billing.subscription.requested": SubscriptionRequested}

    async def handle(
        self, command: Any, envelope: Envelope, *, first_attempt: bool = False
    ) -> Sequence[Any]:
        """Provision the subscription; return ``billing.subscription.created``.

        Raises:
            UpstreamUnavailable: Stripe is down, slow or rate-limiting us.
            UpstreamRejected: Stripe refused a request.
            SchemaInvalid: the subscription cannot be expressed in Stripe
                (a fractional quantity, no items), or Stripe's answer holds a
                price no arithmetic should touch (``unit_amount_decimal``).
            UnknownMessageType: *command* is not a billing command.
        """
        if not isinstance(command, SubscriptionRequested):
            raise UnknownMessageType(
                f"{self._system} has no command {type(command).__name__}"
            )
        return [await self._subscribe(command, envelope)]

    async def _subscribe(
        self, command: SubscriptionRequested, envelope: Envelope
    ) -> SubscriptionCreated:
        try:
            subscription_request = subscription_params(command, "")
        except ValueError as exc:
            raise SchemaInvalid(str(exc)) from exc
        customer_id = await self._customer(command.subscription.account, envelope)
        skus = sorted({item.sku for item in command.subscription.items})
        for sku in skus:
            await self._product(sku)
        try:
            native = await self._stripe.create_subscription(
                idempotency_key=idempotency_key(
                    envelope.idempotency_key, "subscription"
                ),
                params={**subscription_request, "customer": customer_id},
            )
        except UpstreamRejected:
            # A product removed in Stripe since we saw it: look again next time.
            self._products.difference_update(skus)
            raise
        try:
            return subscription_created(native, command)
        except ValueError as exc:
            raise SchemaInvalid(
                f"{self._system}: subscription {native.id}: {exc}"
            ) from exc

    async def _customer(self, account: Account, envelope: Envelope) -> str:
        customer = await self._stripe.find_customer_by_metadata(
            META_ACCOUNT, account.id
        )
        if customer is None:
            customer = await self._stripe.create_customer(
                idempotency_key=idempotency_key("q2c", "customer", account.id),
                params=customer_create_params(account),
            )
        update = customer_update_params(account, customer)
        if update:
            customer = await self._stripe.update_customer(
                customer.id,
                idempotency_key=idempotency_key(envelope.idempotency_key, "customer"),
                params=update,
            )
        return customer.id

    async def _product(self, sku: str) -> None:
        if sku in self._products:
            return
        if await self._stripe.retrieve_product(product_id(sku)) is None:
            try:
                await self._stripe.create_product(
                    idempotency_key=idempotency_key("q2c", "product", sku),
                    params=product_params(sku),
                )
            except UpstreamRejected as exc:
                # Another command created it between our read and our write.
                if exc.code != "resource_already_exists":
                    raise
        if len(self._products) >= _KNOWN_PRODUCTS:
            self._products.pop()
        self._products.add(sku)
