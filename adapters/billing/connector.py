"""The billing system actor's handler: provision subscriptions in Stripe.

One command, ``billing.subscription.requested``, becomes up to four kinds
of calls, each safe to repeat when the command is redelivered:

1. find the customer by ``metadata[q2c_account_id]``; if search finds none,
   create it under the key ``q2c:customer:<account id>``. Search trails
   writes by up to a minute, so two commands for one account may both miss;
   the account-derived key makes Stripe replay the first creation to the
   second instead of creating a twin (for 24 h, after which search has long
   caught up);
2. bring name and address up to date (only when they differ), under a key
   derived from the command *and* the parameters sent: a retry sending the
   same update is replayed, one computed after another deal changed the
   customer is a new request (reusing the key for it would be refused);
3. make sure each SKU's product exists (``q2c-sku-<SKU>``, a caller-chosen
   id: a second creation is refused as ``resource_already_exists``). A
   product seen once is not asked after again, until Stripe refuses a
   subscription (it may have been removed in the meantime); Stripe's request
   rate limits are low, 25 a second in test mode;
4. create the subscription under a key derived from the envelope's
   idempotency key, so a redelivery gets Stripe's stored answer back.

Stripe prunes idempotency keys after 24 hours at the earliest, and an
operator may re-drive a dead letter days later. So an attempt that is not
the first looks for the subscription first (the customer's subscriptions,
every status, by ``metadata[q2c_subscription_id]``) and answers with the one
it finds instead of creating a second (and a second invoice).

A 500 that Stripe stored under a key is replayed to every request with it
for a day (`ReplayedServerError`). Under the shared keys of steps 1 and 3
that would block every deal of the account or SKU, so past one the object
is looked up (a 500's outcome is indeterminate: it may exist after all) and,
if it is not there, created under a successor key derived from the poisoned
one: concurrent commands derive the same successor, so they still make one
object between them. The command's own keys (steps 2 and 4) are handled
alike.

Stripe has no business refusal the canonical model describes for billing,
so refusals are not turned into events: `UpstreamRejected` propagates (the
command is dead-lettered) and `UpstreamUnavailable` too (retried later).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar, final

from adapters.billing.client import ReplayedServerError, StripeApi, idempotency_key
from adapters.billing.form import FormValue, encode_form
from adapters.billing.mapping import (
    META_ACCOUNT,
    META_SUBSCRIPTION,
    customer_create_params,
    customer_update_params,
    product_id,
    product_params,
    subscription_created,
    subscription_params,
)
from adapters.billing.views import Customer, Product, Subscription
from broker.errors import SchemaInvalid, UnknownMessageType, UpstreamRejected
from canonical import Envelope
from canonical.commerce import Account
from canonical.q2c import SubscriptionCreated, SubscriptionRequested

__all__ = ["BillingConnector"]

T = TypeVar("T")

#: SKUs whose products are known to exist, at most: any catalogue stays bounded.
_KNOWN_PRODUCTS = 10_000
#: Keys tried for one write: the first, then successors past stored 5xx.
_KEY_GENERATIONS = 4
#: How far back customers are listed when search may not show them yet:
#: Stripe's search trails writes by about a minute, longer in an incident.
_SEARCH_LAG_S = 3600


@final
class BillingConnector:
    """`broker.connector.Connector` for a Stripe billing account."""

    def __init__(
        self,
        stripe: StripeApi,
        *,
        system: str = "billing",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stripe = stripe
        self._system = system
        self._clock = clock
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

        Unless *first_attempt*, the subscription is looked for first, and one
        already made for the command is the answer.

        Raises:
            UpstreamUnavailable: Stripe is down, slow or rate-limiting us, or
                refused the API key.
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
        return [await self._subscribe(command, envelope, first_attempt=first_attempt)]

    async def _subscribe(
        self, command: SubscriptionRequested, envelope: Envelope, *, first_attempt: bool
    ) -> SubscriptionCreated:
        try:
            subscription_request = subscription_params(command, "")
        except ValueError as exc:
            raise SchemaInvalid(str(exc)) from exc
        customer_id = await self._customer(command.subscription.account, envelope)

        async def existing() -> Subscription | None:
            return await self._stripe.find_subscription_by_metadata(
                customer_id, META_SUBSCRIPTION, command.subscription.id
            )

        native = None if first_attempt else await existing()
        if native is None:
            native = await self._create_subscription(
                {**subscription_request, "customer": customer_id},
                idempotency_key(envelope.idempotency_key, "subscription"),
                existing,
                skus=sorted({item.sku for item in command.subscription.items}),
            )
        try:
            return subscription_created(native, command)
        except ValueError as exc:
            raise SchemaInvalid(
                f"{self._system}: subscription {native.id}: {exc}"
            ) from exc

    async def _create_subscription(
        self,
        params: Mapping[str, FormValue],
        key: str,
        existing: Callable[[], Awaitable[Subscription | None]],
        *,
        skus: Sequence[str],
    ) -> Subscription:
        for sku in skus:
            await self._product(sku)

        async def create(key: str) -> Subscription:
            return await self._stripe.create_subscription(
                idempotency_key=key, params=params
            )

        try:
            return await _past_stored_failures(key, create, existing)
        except UpstreamRejected:
            # A product removed in Stripe since we saw it: look again next time.
            self._products.difference_update(skus)
            raise

    async def _customer(self, account: Account, envelope: Envelope) -> str:
        customer = await self._stripe.find_customer_by_metadata(
            META_ACCOUNT, account.id
        )
        if customer is None:
            customer = await self._create_customer(account)
        update = customer_update_params(account, customer)
        if update:
            customer_id = customer.id

            async def send(key: str) -> Customer:
                return await self._stripe.update_customer(
                    customer_id, idempotency_key=key, params=update
                )

            async def resend() -> None:
                return None  # setting the same values twice is harmless

            digest = _digest(f"{customer_id}?{encode_form(update)}")
            key = idempotency_key(envelope.idempotency_key, "customer", digest)
            customer = await _past_stored_failures(key, send, resend)
        return customer.id

    async def _create_customer(self, account: Account) -> Customer:
        params = customer_create_params(account)

        async def create(key: str) -> Customer:
            return await self._stripe.create_customer(
                idempotency_key=key, params=params
            )

        async def existing() -> Customer | None:
            return await self._stripe.find_customer_by_metadata(
                META_ACCOUNT,
                account.id,
                created_since=int(self._clock()) - _SEARCH_LAG_S,
            )

        return await _past_stored_failures(
            idempotency_key("q2c", "customer", account.id), create, existing
        )

    async def _product(self, sku: str) -> None:
        if sku in self._products:
            return
        pid = product_id(sku)
        if await self._stripe.retrieve_product(pid) is None:
            params = product_params(sku)

            async def create(key: str) -> Product:
                return await self._stripe.create_product(
                    idempotency_key=key, params=params
                )

            async def existing() -> Product | None:
                return await self._stripe.retrieve_product(pid)

            try:
                await _past_stored_failures(
                    idempotency_key("q2c", "product", sku), create, existing
                )
            except UpstreamRejected as exc:
                # Another command created it between our read and our write.
                if exc.code != "resource_already_exists":
                    raise
        if len(self._products) >= _KNOWN_PRODUCTS:
            self._products.pop()
        self._products.add(sku)


async def _past_stored_failures(
    key: str,
    post: Callable[[str], Awaitable[T]],
    existing: Callable[[], Awaitable[T | None]],
) -> T:
    """``post(key)``; past a 5xx Stripe stored under it, look, then use a successor.

    The successors are derived from *key* alone, so every command posting
    the same object walks the same keys and Stripe still makes it once.
    *existing* finds the object a failed request may have made after all.

    Raises:
        ReplayedServerError: every key tried was poisoned (retry later:
            Stripe prunes the keys after a day).
    """
    for generation in range(_KEY_GENERATIONS):
        try:
            return await post(_successor(key, generation))
        except ReplayedServerError:
            if generation == _KEY_GENERATIONS - 1:
                raise
            found = await existing()
            if found is not None:
                return found
    raise AssertionError("unreachable: the last generation re-raises")


def _successor(key: str, generation: int) -> str:
    """*key* itself, then the keys to use past a stored 5xx under the one before."""
    return key if generation == 0 else idempotency_key(key, f"after-5xx-{generation}")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
