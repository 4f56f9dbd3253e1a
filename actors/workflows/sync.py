"""Master-data sync: accounts CRM → ERP, products ERP → CPQ, through the xref.

Both are one instance per entity (``acct-…`` for accounts, the SKU for
products) and remember the hash of what they last wrote, which is how an echo
is told from a change: the ERP announcing the customer we just wrote carries
the same content hash and causes nothing (counted), while a change made in
the ERP itself carries another. Echoes of our writes to Salesforce never get
this far: the CRM ingress drops changes whose ``changeOrigin`` names our
client id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import msgspec

from actors.workflows.deal import system_queue
from broker import Applied, Emit, XrefEntry
from canonical import Envelope
from canonical.commerce import Account, PriceBookEntry, Product
from canonical.hashing import content_hash
from canonical.q2c import (
    AccountChanged,
    CustomerChanged,
    CustomerSynced,
    CustomerSyncRequested,
    ProductChanged,
    ProductSynced,
    ProductSyncRequested,
)

__all__ = [
    "AccountSyncState",
    "AccountSyncWorkflow",
    "CatalogState",
    "CatalogSyncWorkflow",
    "erp_fields_hash",
]


def erp_fields_hash(account: Account) -> str:
    """Hash of the account fields the ERP customer carries."""
    return content_hash(
        (
            account.name,
            account.country,
            account.currency,
            account.billing_address,
            account.tax_id,
            account.deleted,
        )
    )


class AccountSyncState(msgspec.Struct, frozen=True, kw_only=True):
    """One account's sync: what we asked the ERP for and what it holds."""

    account: Account | None = None
    requested_hash: str | None = None
    written_hash: str | None = None
    erp_customer: str | None = None
    syncs_requested: int = 0
    #: Times the latest request was sent again after an older write landed.
    rewrites: int = 0
    echoes_suppressed: int = 0
    #: The ERP changed the customer itself (CRM is master: reported, not copied).
    erp_drift: bool = False


@final
class AccountSyncWorkflow:
    """CRM account changes → ERP customer (business partner) in the cloud ERP."""

    name = "account"
    state_type = AccountSyncState

    def __init__(self, *, erp_system: str = "erp_cloud") -> None:
        self._erp_system = erp_system

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """Account changes from the CRM; customer facts from the ERP."""
        return {
            "crm.account.changed": AccountChanged,
            "erp.customer.synced": CustomerSynced,
            "erp.customer.changed": CustomerChanged,
        }

    def initial(self, correlation_id: str) -> AccountSyncState:
        """An account never synced."""
        return AccountSyncState()

    def _sync(self, account: Account, digest: str, key_suffix: str = "") -> Emit:
        return Emit(
            event=CustomerSyncRequested(account=account, content_hash=digest),
            exchange="",
            routing_key=system_queue(self._erp_system),
            subject=account.id,
            key_suffix=key_suffix,
        )

    def apply(
        self, state: AccountSyncState, event: Any, envelope: Envelope
    ) -> Applied[AccountSyncState]:
        """Ask for a sync when the ERP-relevant fields changed; spot echoes."""
        match event:
            case AccountChanged(account=account, native_id=crm_id):
                digest = erp_fields_hash(account)
                known = [_xref("account", account.id, "crm", crm_id)]
                # Only what was asked for last: a change back to what was
                # written before, while a newer write is on its way, must be
                # sent again, or that newer write would be the ERP's last word.
                if digest == state.requested_hash:
                    return Applied(
                        msgspec.structs.replace(state, account=account), xref=known
                    )
                new = msgspec.structs.replace(
                    state,
                    account=account,
                    requested_hash=digest,
                    syncs_requested=state.syncs_requested + 1,
                )
                return Applied(new, [self._sync(account, digest)], xref=known)
            case CustomerSynced(
                account_id=account_id,
                system=system,
                native_id=native_id,
                content_hash=digest,
            ):
                new = msgspec.structs.replace(
                    state, written_hash=digest, erp_customer=native_id
                )
                xref = [_xref("account", account_id, system, native_id, digest)]
                latest = state.requested_hash
                if state.account is None or latest is None or digest == latest:
                    return Applied(new, xref=xref)
                # An older write landed, perhaps after the latest one (which
                # waited in a retry tier): the ERP's last word may be stale.
                new = msgspec.structs.replace(new, rewrites=state.rewrites + 1)
                again = self._sync(state.account, latest, f"rewrite-{new.rewrites}")
                return Applied(new, [again], xref=xref)
            case CustomerChanged(content_hash=digest):
                if digest == state.written_hash:
                    return Applied(
                        msgspec.structs.replace(
                            state, echoes_suppressed=state.echoes_suppressed + 1
                        )
                    )
                return Applied(msgspec.structs.replace(state, erp_drift=True))
            case _:
                raise TypeError(f"account sync cannot apply {type(event).__name__}")


class CatalogState(msgspec.Struct, frozen=True, kw_only=True):
    """One product's sync to the CPQ."""

    product: Product | None = None
    prices: tuple[PriceBookEntry, ...] = ()
    requested_hash: str | None = None
    cpq_product: str | None = None
    syncs_requested: int = 0
    unchanged: int = 0


@final
class CatalogSyncWorkflow:
    """ERP product and price changes → CPQ products and price book entries."""

    name = "catalog"
    state_type = CatalogState

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """Product changes from the ERP; sync results from the CPQ."""
        return {
            "erp.product.changed": ProductChanged,
            "cpq.product.synced": ProductSynced,
        }

    def initial(self, correlation_id: str) -> CatalogState:
        """A product never synced."""
        return CatalogState()

    def apply(
        self, state: CatalogState, event: Any, envelope: Envelope
    ) -> Applied[CatalogState]:
        """Forward a real change to the CPQ; drop a repeat of what it has."""
        match event:
            case ProductChanged(product=product, prices=prices):
                digest = content_hash((product, prices))
                if digest == state.requested_hash:
                    return Applied(
                        msgspec.structs.replace(state, unchanged=state.unchanged + 1)
                    )
                new = msgspec.structs.replace(
                    state,
                    product=product,
                    prices=prices,
                    requested_hash=digest,
                    syncs_requested=state.syncs_requested + 1,
                )
                return Applied(
                    new,
                    [
                        Emit(
                            event=ProductSyncRequested(product=product, prices=prices),
                            exchange="",
                            routing_key=system_queue("cpq"),
                            subject=product.sku,
                        )
                    ],
                )
            case ProductSynced(sku=sku, native_id=native_id):
                return Applied(
                    msgspec.structs.replace(state, cpq_product=native_id),
                    xref=[_xref("product", sku, "cpq", native_id)],
                )
            case _:
                raise TypeError(f"catalog sync cannot apply {type(event).__name__}")


def _xref(
    kind: str, canonical_id: str, system: str, native_id: str, digest: str = ""
) -> XrefEntry:
    return XrefEntry(
        kind=kind,
        canonical_id=canonical_id,
        system=system,
        native_id=native_id,
        content_hash=digest,
    )
