"""The cloud ERP's connector: book orders and keep customers in SAP S/4HANA Cloud."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, final

import msgspec
import structlog

from adapters.erp_cloud.client import SapApi, SapRejected
from adapters.erp_cloud.mapping import (
    MappingOptions,
    SalesArea,
    address_changes,
    order_booked,
    order_rejected,
    partner_name,
    sales_area_of,
    search_term,
    tax_changes,
    to_business_partner,
    to_partner_address,
    to_sales_area,
    to_sales_order,
    to_tax_number,
)
from adapters.erp_cloud.views import (
    A_BusinessPartner,
    A_BusinessPartnerTaxNumber,
    Entity,
    expanded,
)
from broker.errors import UnknownMessageType, UpstreamRejected
from broker.keyed_lock import KeyedLock, Locks
from canonical import Envelope
from canonical.commerce import Account, Order
from canonical.q2c import CustomerSynced, CustomerSyncRequested, OrderBookingRequested

__all__ = ["SapConnector"]

_log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Code of a refusal the broker itself raises before SAP is called.
MAPPING_REFUSED = "Q2C/MAPPING"


@final
class SapConnector:
    """Implements `broker.connector.Connector` for SAP S/4HANA Cloud.

    ``erp.order.booking_requested``: make sure the account is a customer in
    the order's sales area (business partner found by ``SearchTerm1``,
    created when absent, extended to the sales area when missing), then look
    for an order of that sold-to with the order's customer reference, and
    create one only if there is none.

    Redelivery is safe although SAP offers no idempotency key: every step
    reads before it writes, keyed on values derived from the command (the
    account id's search term; ``customer_ref``, which the deal determines,
    as it determines the command's idempotency key). A command redelivered
    after SAP created the order but before its answer arrived finds that
    order and reports it as booked; nothing is created twice. Two deliveries
    racing each other could both create; SAP's customer-reference check then
    flags the second, and its warning travels in ``OrderBooked.warnings``.

    ``erp.customer.sync_requested``: the same customer lookup, in the
    configured sales areas. A new partner is created with its address and
    tax number. An existing one is compared with the account and only what
    differs is written, each with ``If-Match``: its name (and blocked flag,
    for a deleted account); its first address (added when it has none);
    its tax number of the category for the account's country (added when
    missing; a number the account lacks is never deleted). A sync of what
    SAP already holds writes nothing.

    Failures: SAP's 400 on the order (a validation or business error) and an
    order the mapping cannot express (or whose new customer it cannot)
    become ``erp.order.rejected`` (order fallout, an operator's case). An
    account the mapping cannot express raises `UpstreamRejected` with code
    ``Q2C/MAPPING`` before anything is written. Every other refusal raises
    `SapRejected` (dead letter); outages, throttling and a stale ETag raise
    transient errors and the command is retried.

    Args:
        client: the SAP API (`SapClient`).
        system: the configured system name.
        options: the tenant's customizing (`MappingOptions`).
        customer_areas: sales areas a customer sync creates customers in.
        locks: where finding and creating an account's partner take turns:
            by default in this process; the daemon passes a
            `SharedKeyedLock`, so daemons sharing the queue take turns too.
    """

    def __init__(
        self,
        client: SapApi,
        *,
        system: str = "erp_cloud",
        options: MappingOptions | None = None,
        customer_areas: Sequence[SalesArea] = (),
        locks: Locks | None = None,
    ) -> None:
        self._client = client
        self._system = system
        self._options = options or MappingOptions()
        self._customer_areas = tuple(customer_areas)
        # Finding an account's partner and creating it when missing is one
        # step per account: SAP has no unique key that would refuse a second
        # partner for two commands (a sync and a booking) running at once.
        self._accounts = KeyedLock() if locks is None else locks

    def __repr__(self) -> str:
        return f"<SapConnector {self._system}>"

    @property
    def system(self) -> str:
        """The configured system name."""
        return self._system

    @property
    def commands(self) -> Mapping[str, type[Any]]:
        """Book an order; sync a customer."""
        return {
            "erp.order.booking_requested": OrderBookingRequested,
            "erp.customer.sync_requested": CustomerSyncRequested,
        }

    async def handle(
        self, command: Any, envelope: Envelope, *, first_attempt: bool = False
    ) -> Sequence[Any]:
        """Carry out one command.

        Returns:
            ``[OrderBooked]`` or ``[OrderRejected]`` for a booking;
            ``[CustomerSynced]`` for a customer sync (nothing for a deleted
            account SAP never knew).

        Raises:
            SapRejected: SAP refused a call other than the order create.
            UpstreamUnavailable: SAP is down, slow or throttling.
            ConcurrencyConflict: the partner changed while it was patched.
            UpstreamRejected: an account the mapping cannot express (code
                ``Q2C/MAPPING``; see `to_tax_number`).
            UnknownMessageType: a command this connector does not take.
        """
        match command:
            case OrderBookingRequested(order=order):
                return await self._book(order)
            case CustomerSyncRequested(account=account, content_hash=digest):
                return await self._sync(account, digest)
            case _:
                raise UnknownMessageType(
                    f"{self._system} does not take {type(command).__name__}"
                )

    async def _book(self, order: Order) -> Sequence[Any]:
        area = sales_area_of(order, self._options)
        try:
            # Mapped before any call: an order SAP cannot take is fallout now.
            draft = to_sales_order(order, sold_to="", options=self._options)
        except ValueError as exc:
            return [order_rejected(order, code=MAPPING_REFUSED, message=str(exc))]
        async with self._accounts.hold(self._partner_key(order.account)):
            try:
                sold_to = await self._customer(
                    order.account,
                    await self._partner(order.account),
                    (area,),
                    payment_terms=draft.CustomerPaymentTerms,
                )
            except UpstreamRejected as exc:
                if exc.code != MAPPING_REFUSED:
                    raise
                return [order_rejected(order, code=exc.code, message=exc.detail)]
        existing = await self._client.find_orders(sold_to, order.customer_ref)
        if existing:
            return [order_booked(order, existing[0])]
        insert = msgspec.structs.replace(draft, SoldToParty=sold_to)
        try:
            created, notices = await self._client.create_order(insert)
        except SapRejected as exc:
            if exc.status != 400:
                raise
            return [order_rejected(order, code=exc.code, message=exc.detail)]
        return [order_booked(order, created, notices)]

    async def _sync(self, account: Account, digest: str) -> Sequence[Any]:
        # Mapped first: an account SAP cannot take changes nothing at all.
        tax = self._mapped(account, lambda: to_tax_number(account))
        async with self._accounts.hold(self._partner_key(account)):
            found = await self._partner(account)
            if found is None and account.deleted:
                return []
            customer = await self._customer(account, found, self._customer_areas)
            if found is not None:
                await self._patch_partner(found, account, tax)
        return [
            CustomerSynced(
                account_id=account.id,
                system=self._system,
                native_id=customer,
                content_hash=digest,
            )
        ]

    def _partner_key(self, account: Account) -> str:
        return f"{self._system}:business-partner:{account.id}"

    async def _partner(self, account: Account) -> A_BusinessPartner | None:
        found = await self._client.find_business_partners(search_term(account.id))
        return found[0] if found else None

    async def _customer(
        self,
        account: Account,
        partner: A_BusinessPartner | None,
        areas: Sequence[SalesArea],
        *,
        payment_terms: str | None = None,
    ) -> str:
        """The customer number of *account*, defined in every one of *areas*.

        *partner* is what `_partner` found for it; None creates one.
        """
        if partner is None:
            draft = self._mapped(
                account,
                lambda: to_business_partner(
                    account,
                    areas=areas,
                    payment_terms=payment_terms,
                    options=self._options,
                ),
            )
            partner = await self._client.create_business_partner(draft)
        customer = partner.Customer or partner.BusinessPartner or ""
        for area in areas:
            if not _defined_in(partner, area):
                await self._extend(account, customer, area, payment_terms)
        return customer

    async def _extend(
        self,
        account: Account,
        customer: str,
        area: SalesArea,
        payment_terms: str | None,
    ) -> None:
        sales_area = to_sales_area(
            area, account=account, payment_terms=payment_terms, customer=customer
        )
        try:
            await self._client.create_sales_area(sales_area)
        except SapRejected:
            # A redelivery may race the first attempt; if the area exists now,
            # the goal is met, whatever the refusal said.
            partner = await self._partner(account)
            if partner is None or not _defined_in(partner, area):
                raise

    def _mapped(self, account: Account, mapping: Callable[[], T]) -> T:
        """*mapping*'s result; its `ValueError` as a refusal before any call."""
        try:
            return mapping()
        except ValueError as exc:
            raise UpstreamRejected(
                self._system,
                f"account {account.id} cannot be a business partner: {exc}",
                code=MAPPING_REFUSED,
            ) from exc

    async def _patch_partner(
        self,
        partner: A_BusinessPartner,
        account: Account,
        tax: A_BusinessPartnerTaxNumber | None,
    ) -> None:
        """Write what SAP's *partner* holds differently from *account*, only that.

        *tax* is the account's tax number (`to_tax_number`).
        """
        number = partner.BusinessPartner
        if not number:
            return
        name = partner_name(account)
        changes = A_BusinessPartner(
            OrganizationBPName1=name if partner.OrganizationBPName1 != name else None,
            BusinessPartnerIsBlocked=True
            if account.deleted and not partner.BusinessPartnerIsBlocked
            else None,
        )
        if changes != A_BusinessPartner():
            await self._client.update_business_partner(
                number, changes, etag=_etag(partner)
            )
        await self._patch_address(partner, number, account)
        if tax is not None:
            await self._patch_tax_number(partner, number, tax)

    async def _patch_address(
        self, partner: A_BusinessPartner, number: str, account: Account
    ) -> None:
        if partner.to_BusinessPartnerAddress is None:
            # Read without its addresses (not expanded): nothing says it has
            # none, and adding one at each sync would pile them up.
            _log.warning("partner_read_without", part="addresses", partner=number)
            return
        addresses = expanded(partner.to_BusinessPartnerAddress)
        if not addresses:
            address = to_partner_address(account, language=self._options.language)
            await self._client.create_partner_address(
                msgspec.structs.replace(address, BusinessPartner=number)
            )
            return
        first = addresses[0]
        changes = address_changes(first, account)
        if changes is not None and first.AddressID:
            await self._client.update_partner_address(
                number, first.AddressID, changes, etag=_etag(first)
            )

    async def _patch_tax_number(
        self, partner: A_BusinessPartner, number: str, tax: A_BusinessPartnerTaxNumber
    ) -> None:
        if partner.to_BusinessPartnerTax is None:
            _log.warning("partner_read_without", part="tax numbers", partner=number)
            return
        tax_type = tax.BPTaxType or ""
        current = next(
            (
                t
                for t in expanded(partner.to_BusinessPartnerTax)
                if t.BPTaxType == tax_type
            ),
            None,
        )
        if current is None:
            await self._client.create_tax_number(
                msgspec.structs.replace(tax, BusinessPartner=number)
            )
            return
        changes = tax_changes(current, tax)
        if changes is not None:
            await self._client.update_tax_number(
                number, tax_type, changes, etag=_etag(current)
            )


def _etag(entity: Entity) -> str:
    """The ETag *entity* was read with; ``*`` (no check) when SAP sent none."""
    etag = entity.metadata.etag if entity.metadata is not None else None
    return etag or "*"


def _defined_in(partner: A_BusinessPartner, area: SalesArea) -> bool:
    customer = partner.to_Customer
    if customer is None:
        return False
    wanted = (area.sales_organization, area.distribution_channel, area.division)
    return any(
        (a.SalesOrganization, a.DistributionChannel, a.Division) == wanted
        for a in expanded(customer.to_CustomerSalesArea)
    )
