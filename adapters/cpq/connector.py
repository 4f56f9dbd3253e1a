"""The CPQ connector: write the order's status to the quote, and sync the catalogue."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, final

from adapters.cpq import views as v
from adapters.cpq.client import CpqClient
from adapters.cpq.mapping import price_key, price_to_sf, product_to_sf, quote_update
from adapters.crm.mapping import command_key, native_id
from adapters.crm.soql import select
from broker.errors import UnknownMessageType, UpstreamRejected
from canonical import Envelope, Event
from canonical.ids import QUOTE
from canonical.q2c import (
    ProductSynced,
    ProductSyncRequested,
    QuoteUpdated,
    QuoteUpdateRequested,
)

__all__ = ["CpqConnector"]


@final
class CpqConnector:
    """Implements `broker.connector.Connector` for Salesforce CPQ.

    ``cpq.quote.update_requested`` writes the status (``ordered`` sets
    ``SBQQ__Ordered__c``) and the ERP order number to the quote, stamped
    with the command's key in ``Broker_Command_Key__c``; a redelivered
    command finds its key there and writes nothing.

    ``cpq.product.sync_requested`` upserts the ``Product2`` keyed by SKU and
    one standard-price-book ``PricebookEntry`` per currency keyed by
    ``<sku>:<currency>`` (both in ``Broker_Key__c``): upsert by external id
    is Salesforce's idempotency facility, so a repeat updates in place.

    Args:
        cpq: the CPQ client.
        system: the configured system name.
    """

    def __init__(self, cpq: CpqClient, *, system: str = "cpq") -> None:
        self._cpq = cpq
        self._crm = cpq.crm
        self._system = system
        self._pricebook_id: str | None = None

    def __repr__(self) -> str:
        return f"<CpqConnector {self._system}>"

    @property
    def system(self) -> str:
        """The configured system name."""
        return self._system

    @property
    def commands(self) -> Mapping[str, type[Any]]:
        """The commands this connector carries out."""
        return {
            "cpq.quote.update_requested": QuoteUpdateRequested,
            "cpq.product.sync_requested": ProductSyncRequested,
        }

    async def handle(
        self, command: Any, envelope: Envelope, *, first_attempt: bool = False
    ) -> Sequence[Event]:
        """Carry out *command*; see the class docstring.

        Raises:
            UpstreamUnavailable: the org is down, slow or limiting us.
            UpstreamRejected: the org refused (e.g. ``NOT_FOUND``).
            UnknownMessageType: not a command of this connector.
        """
        match command:
            case QuoteUpdateRequested():
                return await self._update_quote(command, envelope, first_attempt)
            case ProductSyncRequested():
                return await self._sync_product(command)
            case _:
                raise UnknownMessageType(
                    f"{self._system}: no handler for {type(command).__name__}"
                )

    async def _update_quote(
        self, command: QuoteUpdateRequested, envelope: Envelope, first: bool
    ) -> list[Event]:
        record_id = native_id(command.quote_id, QUOTE)
        key = command_key(envelope.idempotency_key)
        # As for an opportunity: only a repeat can find its own stamp.
        if first or not await self._crm.carries_key(v.Quote, record_id, key):
            await self._cpq.update_quote(record_id, quote_update(command, key=key))
        return [
            QuoteUpdated(
                quote_id=command.quote_id, status=command.status, native_id=record_id
            )
        ]

    async def _sync_product(self, command: ProductSyncRequested) -> list[Event]:
        product = command.product
        saved = await self._cpq.upsert_product(product_to_sf(product), sku=product.sku)
        product_id = saved.id or await self._id_of(v.Product2, product.sku)
        for price in command.prices:
            key = price_key(price.sku, price.currency)
            exists = await self._crm.find(v.PricebookEntry, key) is not None
            entry = price_to_sf(
                price,
                product_id=None if exists else product_id,
                pricebook_id=None if exists else await self._standard_pricebook(),
            )
            await self._cpq.upsert_price(entry, key=key)
        return [ProductSynced(sku=product.sku, native_id=product_id)]

    async def _id_of(self, view: type[v.Product2], key: str) -> str:
        record = await self._crm.find(view, key)
        if record is None or record.Id is None:
            raise UpstreamRejected(
                self._system, f"{view.sobject_type} {key} vanished", code="NOT_FOUND"
            )
        return record.Id

    async def _standard_pricebook(self) -> str:
        if self._pricebook_id is None:
            books = await self._crm.query(
                select("Pricebook2", ("Id",), {"IsStandard": True}),
                v.Pricebook2,
            )
            if not books or books[0].Id is None:
                raise UpstreamRejected(
                    self._system, "the org has no standard price book", code="NOT_FOUND"
                )
            self._pricebook_id = books[0].Id
        return self._pricebook_id
