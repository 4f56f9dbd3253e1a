"""The sandbox's Stripe account: objects in memory and the rules that change them.

No HTTP here: `adapters.billing.sandbox` decodes requests into form params,
calls one method per endpoint and serialises what comes back. Parameters are
checked the way Stripe checks them (unknown, missing, mistyped → 400 with
``parameter_unknown``/``parameter_missing``/…) *before* anything changes;
such refusals carry ``stored=False`` because Stripe saves no idempotent
result for a request that failed validation. Refusals found while executing
(a referenced object does not exist, an invoice is not a draft) carry
``stored=True``: execution had begun, so Stripe saves and replays them.

Payment is instantaneous here: a subscription or invoice collected
automatically is paid the moment its invoice is finalized. Every change
that Stripe reports by webhook appends an `Event` to `StripeAccount.outbox`.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import TypeVar

import msgspec

from adapters.billing.params import (
    Params,
    Refusal,
    check_known,
    missing_param,
    read_bool,
    read_decimal,
    read_dict,
    read_enum,
    read_int,
    read_list,
    read_metadata,
    read_str,
)
from adapters.billing.pricing import (
    ItemSpec,
    item_spec,
    period_s,
    price_from_params,
    subscription_invoice,
    with_item_lines,
)
from adapters.billing.search import customer_query
from adapters.billing.views import (
    API_VERSION,
    Address,
    Customer,
    Event,
    EventData,
    EventRequest,
    Invoice,
    InvoiceItem,
    Price,
    Product,
    SearchResult,
    StatusTransitions,
    StripeList,
    Subscription,
    SubscriptionItem,
)

__all__ = ["Refusal", "StripeAccount", "Params"]

S = TypeVar("S", bound=msgspec.Struct)

_ALNUM = string.ascii_letters + string.digits
_CUSTOMER_FIELDS = frozenset(
    {"email", "name", "address", "description", "metadata", "expand"}
)
_ADDRESS_FIELDS = ("line1", "line2", "city", "postal_code", "state", "country")


class StripeAccount:
    """One test-mode Stripe account, in memory.

    A test double: nothing is ever pruned, so state grows with every call.
    """

    def __init__(self, *, clock: Callable[[], float], seed: int = 0) -> None:
        self._clock = clock
        self._ids = random.Random(f"stripe-ids-{seed}")
        self.customers: dict[str, Customer] = {}
        self.customer_created_at: dict[str, float] = {}
        self.products: dict[str, Product] = {}
        self.prices: dict[str, Price] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self.invoices: dict[str, Invoice] = {}
        self.invoice_items: dict[str, InvoiceItem] = {}
        self.events: dict[str, Event] = {}
        #: Events not yet handed to the webhook sender.
        self.outbox: list[Event] = []
        self._invoice_numbers = 0

    def new_id(self, prefix: str) -> str:
        """A fresh id in Stripe's shape: ``cus_`` + 14 letters and digits."""
        return f"{prefix}_{''.join(self._ids.choices(_ALNUM, k=14))}"

    def now(self) -> int:
        """Unix seconds, as every Stripe timestamp."""
        return int(self._clock())

    # --- customers ------------------------------------------------------------

    def create_customer(self, params: Params) -> Customer:
        """``POST /v1/customers``."""
        check_known(params, _CUSTOMER_FIELDS)
        customer = Customer(
            id=self.new_id("cus"),
            created=self.now(),
            email=read_str(params, "email"),
            name=read_str(params, "name"),
            address=_address(params, None),
            description=read_str(params, "description"),
            metadata=read_metadata(params, {}),
        )
        self.customers[customer.id] = customer
        self.customer_created_at[customer.id] = self._clock()
        return customer

    def update_customer(self, customer_id: str, params: Params) -> Customer:
        """``POST /v1/customers/{id}``: set fields; metadata merges, ``""`` unsets."""
        check_known(params, _CUSTOMER_FIELDS)
        address = _address(params, None)
        current = self._get(self.customers, "customer", customer_id, "id", 404)
        changes: dict[str, object] = {
            name: value or None
            for name in ("email", "name", "description")
            if (value := read_str(params, name)) is not None
        }
        if address is not None:
            changes["address"] = address
        updated = msgspec.structs.replace(
            current, metadata=read_metadata(params, current.metadata), **changes
        )
        self.customers[customer_id] = updated
        return updated

    def search_customers(
        self, query: str, *, limit: int, lag_s: float
    ) -> SearchResult[Customer]:
        """``GET /v1/customers/search``: ``metadata['k']:'v'``, ``email:``, ``name:``.

        Clauses combine with ``AND``. Customers created less than *lag_s* ago
        are not found yet, as Stripe's search index lags behind writes.
        """
        match = customer_query(query)
        visible_before = self._clock() - lag_s
        found = [
            c
            for c in self.customers.values()
            if self.customer_created_at[c.id] <= visible_before and match(c)
        ]
        return SearchResult(
            data=tuple(found[:limit]),
            has_more=len(found) > limit,
            url="/v1/customers/search",
        )

    # --- catalogue ------------------------------------------------------------

    def create_product(self, params: Params) -> Product:
        """``POST /v1/products``; a caller-chosen ``id`` must be new."""
        check_known(
            params, {"id", "name", "active", "description", "metadata", "expand"}
        )
        name = read_str(params, "name", required=True)
        product_id = read_str(params, "id")
        active = read_bool(params, "active")
        if product_id is not None and product_id in self.products:
            raise Refusal(
                400,
                f"Product already exists: {product_id!r}",
                code="resource_already_exists",
                param="id",
                stored=True,
            )
        product = Product(
            id=product_id or self.new_id("prod"),
            name=name or "",
            active=True if active is None else active,
            created=self.now(),
            metadata=read_metadata(params, {}),
        )
        self.products[product.id] = product
        return product

    def create_price(self, params: Params) -> Price:
        """``POST /v1/prices``: ``product`` or ``product_data[name]``."""
        check_known(
            params,
            {
                "currency", "unit_amount", "unit_amount_decimal", "product",
                "product_data", "recurring", "nickname", "lookup_key", "active",
                "metadata", "expand",
            },
        )  # fmt: skip
        product_data = read_dict(params, "product_data")
        if product_data is not None:
            check_known(product_data, {"name", "metadata"}, "product_data")
            name = read_str(
                product_data, "name", required=True, param="product_data[name]"
            )
        elif read_str(params, "product") is None:
            raise missing_param("product")
        price = price_from_params(
            params, "", price_id=self.new_id("price"), now=self.now()
        )
        product_id = read_str(params, "product")
        if product_id is not None:
            self._get(self.products, "product", product_id, "product", 400)
        if product_data is not None:
            product = self.create_product({"name": name or ""})
            price = msgspec.structs.replace(price, product=product.id)
        self.prices[price.id] = price
        return price

    # --- subscriptions --------------------------------------------------------

    def create_subscription(
        self, params: Params, request: EventRequest
    ) -> Subscription:
        """``POST /v1/subscriptions``; its first invoice is finalized at once."""
        check_known(
            params,
            {
                "customer", "items", "metadata", "collection_method", "days_until_due",
                "description", "currency", "expand",
            },
        )  # fmt: skip
        customer_id = read_str(params, "customer", required=True) or ""
        method, days_until_due = _collection(params)
        raw_items = read_list(params, "items")
        if not raw_items:
            raise missing_param("items")
        specs = [
            item_spec(raw, i, new_price_id=self.new_id("price"), now=self.now())
            for i, raw in enumerate(raw_items)
        ]
        metadata = read_metadata(params, {})
        # Execution begins: from here refusals are saved under the idempotency key.
        self._get(self.customers, "customer", customer_id, "customer", 400)
        prices = [self._item_price(spec, i) for i, spec in enumerate(specs)]
        intervals = {
            (p.recurring.interval, p.recurring.interval_count)
            for p, _ in prices
            if p.recurring is not None
        }
        if len(intervals) > 1:
            raise Refusal(
                400,
                "All prices on a subscription must have the same recurring.interval "
                "and recurring.interval_count.",
                param="items",
                stored=True,
            )
        currencies = {p.currency for p, _ in prices}
        if len(currencies) > 1:
            raise Refusal(
                400,
                "All prices on a subscription must have the same currency.",
                param="items",
                stored=True,
            )
        sub_id = self.new_id("sub")
        start = self.now()
        items = tuple(
            SubscriptionItem(
                id=self.new_id("si"),
                price=price,
                quantity=quantity,
                subscription=sub_id,
                current_period_start=start,
                current_period_end=start + period_s(price),
                metadata=item_metadata,
                created=start,
            )
            for (price, quantity), (_, _, item_metadata) in zip(
                prices, specs, strict=True
            )
        )
        subscription = Subscription(
            id=sub_id,
            customer=customer_id,
            status="active",
            items=StripeList(
                data=items, url=f"/v1/subscription_items?subscription={sub_id}"
            ),
            currency=currencies.pop(),
            collection_method=method,
            days_until_due=days_until_due,
            description=read_str(params, "description"),
            metadata=metadata,
            created=start,
            start_date=start,
        )
        invoice = subscription_invoice(subscription, new_id=self.new_id, now=self.now())
        self.invoices[invoice.id] = invoice
        subscription = msgspec.structs.replace(subscription, latest_invoice=invoice.id)
        self.subscriptions[sub_id] = subscription
        self._emit("customer.subscription.created", subscription, request)
        self._finalize(invoice.id, request)
        return subscription

    # --- invoices -------------------------------------------------------------

    def create_invoice_item(self, params: Params) -> InvoiceItem:
        """``POST /v1/invoiceitems``: pending, or attached to a draft ``invoice``."""
        check_known(
            params,
            {
                "customer", "amount", "currency", "unit_amount_decimal", "quantity",
                "price", "description", "invoice", "metadata", "period", "expand",
            },
        )  # fmt: skip
        customer_id = read_str(params, "customer", required=True) or ""
        amount = read_int(params, "amount")
        unit_decimal = read_decimal(params, "unit_amount_decimal")
        quantity = read_int(params, "quantity")
        price_id = read_str(params, "price")
        currency = read_str(params, "currency")
        if price_id is None and currency is None:
            raise missing_param("currency")
        if price_id is None and amount is None and unit_decimal is None:
            raise missing_param("amount")
        invoice_id = read_str(params, "invoice")
        self._get(self.customers, "customer", customer_id, "customer", 400)
        if price_id is not None:
            price = self._get(self.prices, "price", price_id, "price", 400)
            currency, unit_decimal = price.currency, price.minor_amount()
        if invoice_id is not None:
            invoice = self._get(self.invoices, "invoice", invoice_id, "invoice", 400)
            _require_draft(invoice)
        qty = quantity if quantity is not None else 1
        if amount is None:
            amount = int(
                (Decimal(unit_decimal or 0) * qty).quantize(
                    Decimal(1), rounding=ROUND_HALF_UP
                )
            )
        item = InvoiceItem(
            id=self.new_id("ii"),
            customer=customer_id,
            amount=amount,
            currency=(currency or "").lower(),
            description=read_str(params, "description"),
            invoice=invoice_id,
            quantity=qty,
            unit_amount_decimal=str(unit_decimal) if unit_decimal is not None else None,
            metadata=read_metadata(params, {}),
            date=self.now(),
        )
        self.invoice_items[item.id] = item
        if invoice_id is not None:
            self.invoices[invoice_id] = with_item_lines(
                self.invoices[invoice_id], self.invoice_items.values()
            )
        return item

    def create_invoice(self, params: Params) -> Invoice:
        """``POST /v1/invoices``: a draft; pending items only with ``include``."""
        check_known(
            params,
            {
                "customer", "collection_method", "days_until_due", "description",
                "metadata", "auto_advance", "pending_invoice_items_behavior",
                "currency", "expand",
            },
        )  # fmt: skip
        customer_id = read_str(params, "customer", required=True) or ""
        method, days_until_due = _collection(params)
        behavior = read_enum(
            params, "pending_invoice_items_behavior", ("include", "exclude")
        )
        auto_advance = read_bool(params, "auto_advance")
        self._get(self.customers, "customer", customer_id, "customer", 400)
        pending = [
            i for i in self.invoice_items.values()
            if i.customer == customer_id and i.invoice is None
        ]  # fmt: skip
        currency = read_str(params, "currency") or (
            pending[0].currency if pending else "usd"
        )
        now = self.now()
        invoice = Invoice(
            id=self.new_id("in"),
            customer=customer_id,
            currency=currency.lower(),
            status="draft",
            billing_reason="manual",
            collection_method=method,
            auto_advance=auto_advance if auto_advance is not None else False,
            description=read_str(params, "description"),
            due_date=now + days_until_due * 86_400
            if days_until_due is not None
            else None,
            period_start=now,
            period_end=now,
            status_transitions=StatusTransitions(),
            metadata=read_metadata(params, {}),
            created=now,
        )
        if behavior == "include":
            for item in pending:
                if item.currency == invoice.currency:
                    attached = msgspec.structs.replace(item, invoice=invoice.id)
                    self.invoice_items[item.id] = attached
        self.invoices[invoice.id] = with_item_lines(
            invoice, self.invoice_items.values()
        )
        return self.invoices[invoice.id]

    def finalize_invoice(
        self, invoice_id: str, params: Params, request: EventRequest
    ) -> Invoice:
        """``POST /v1/invoices/{id}/finalize``: draft → open (→ paid if automatic)."""
        check_known(params, {"auto_advance", "expand"})
        invoice = self._get(self.invoices, "invoice", invoice_id, "id", 404)
        _require_draft(invoice)
        return self._finalize(invoice_id, request)

    def pay_invoice(
        self, invoice_id: str, params: Params, request: EventRequest
    ) -> Invoice:
        """``POST /v1/invoices/{id}/pay``: open → paid."""
        check_known(params, {"paid_out_of_band", "expand"})
        invoice = self._get(self.invoices, "invoice", invoice_id, "id", 404)
        if invoice.status != "open":
            raise Refusal(
                400,
                f"Invoice is {invoice.status}; only open invoices can be paid.",
                code="invoice_not_open",
                stored=True,
            )
        return self._pay(invoice_id, request)

    # --- reads ----------------------------------------------------------------

    def retrieve(self, kind: str, object_id: str) -> msgspec.Struct:
        """``GET /v1/<kind>s/{id}``.

        Raises:
            Refusal: 404 ``resource_missing``.
        """
        table: dict[str, msgspec.Struct] = {
            "customer": self.customers,
            "product": self.products,
            "price": self.prices,
            "subscription": self.subscriptions,
            "invoice": self.invoices,
            "invoiceitem": self.invoice_items,
            "event": self.events,
        }[kind]  # type: ignore[assignment]  # each table maps ids to one view type
        return self._get(table, kind, object_id, "id", 404)

    # --- internals ------------------------------------------------------------

    def _get(
        self, table: dict[str, S], kind: str, object_id: str, param: str, status: int
    ) -> S:
        found = table.get(object_id)
        if found is None:
            raise Refusal(
                status,
                f"No such {kind}: '{object_id}'",
                code="resource_missing",
                param=param,
                stored=True,
            )
        return found

    def _item_price(self, spec: ItemSpec, index: int) -> tuple[Price, int]:
        source, quantity, _ = spec
        if isinstance(source, Price):
            product_id = source.product if isinstance(source.product, str) else ""
            self._get(
                self.products,
                "product",
                product_id,
                f"items[{index}][price_data][product]",
                400,
            )
            self.prices[source.id] = source
            return source, quantity
        price = self._get(self.prices, "price", source, f"items[{index}][price]", 400)
        if price.recurring is None:
            raise Refusal(
                400,
                f"The price specified ({price.id}) is set to type=one_time but this "
                "field only accepts prices with type=recurring.",
                param=f"items[{index}][price]",
                stored=True,
            )
        return price, quantity

    def _finalize(self, invoice_id: str, request: EventRequest) -> Invoice:
        self._invoice_numbers += 1
        invoice = self.invoices[invoice_id]
        invoice = msgspec.structs.replace(
            invoice,
            status="open",
            number=f"SBX-{self._invoice_numbers:06d}",
            status_transitions=StatusTransitions(finalized_at=self.now()),
        )
        self.invoices[invoice_id] = invoice
        self._emit("invoice.finalized", invoice, request)
        if (
            invoice.collection_method == "charge_automatically"
            or invoice.amount_due == 0
        ):
            return self._pay(invoice_id, request)
        return invoice

    def _pay(self, invoice_id: str, request: EventRequest) -> Invoice:
        invoice = self.invoices[invoice_id]
        transitions = invoice.status_transitions or StatusTransitions()
        invoice = msgspec.structs.replace(
            invoice,
            status="paid",
            amount_paid=invoice.amount_due,
            amount_remaining=0,
            status_transitions=msgspec.structs.replace(transitions, paid_at=self.now()),
        )
        self.invoices[invoice_id] = invoice
        self._emit("invoice.paid", invoice, request)
        return invoice

    def _emit(
        self, event_type: str, obj: msgspec.Struct, request: EventRequest
    ) -> None:
        event = Event(
            id=self.new_id("evt"),
            api_version=API_VERSION,
            created=self.now(),
            data=EventData(object=msgspec.Raw(msgspec.json.encode(obj))),
            type=event_type,
            request=request,
        )
        self.events[event.id] = event
        self.outbox.append(event)


def _address(params: Params, current: Address | None) -> Address | None:
    raw = read_dict(params, "address")
    if raw is None:
        return current
    check_known(raw, _ADDRESS_FIELDS, "address")
    return Address(
        **{f: read_str(raw, f, param=f"address[{f}]") or None for f in _ADDRESS_FIELDS}
    )


def _collection(params: Params) -> tuple[str, int | None]:
    """``collection_method`` (charge by default) and ``days_until_due``.

    Sending the invoice needs its days until due.
    """
    method = read_enum(
        params, "collection_method", ("charge_automatically", "send_invoice")
    )
    days_until_due = read_int(params, "days_until_due")
    if method == "send_invoice" and days_until_due is None:
        raise missing_param("days_until_due")
    return method or "charge_automatically", days_until_due


def _require_draft(invoice: Invoice) -> None:
    if invoice.status != "draft":
        raise Refusal(
            400,
            f"This invoice is already finalized (status {invoice.status}); only "
            "draft invoices can be changed or finalized.",
            code="invoice_not_editable",
            stored=True,
        )
