"""The sandbox's Python helpers: records created and changed as a user would.

Internal to `adapters.crm.sandbox`, whose `SalesforceSandbox` has them as
methods. Changes made here have an empty ``changeOrigin``, like changes made
in the UI or by an approval process, so the broker never takes them for
echoes of its own writes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from adapters.cpq.views import QuoteStatus
from adapters.crm import soql
from adapters.crm.org import Org
from adapters.crm.views import ChangeType

__all__ = ["UserActions"]


class UserActions:
    """Seeding and approvals for tests and demos; needs ``org`` and ``_clock``."""

    org: Org
    _clock: Callable[[], float]

    def seed_account(
        self,
        name: str,
        *,
        country_code: str = "US",
        currency: str | None = None,
        **fields: Any,
    ) -> str:
        """Create an account as a user would (empty ``changeOrigin``); return its id."""
        body = {"Name": name, "BillingCountryCode": country_code, **fields}
        if currency is not None:
            body["CurrencyIsoCode"] = currency
        with self.org.transaction() as txn:
            return self.org.create(txn, "Account", body)

    def create_opportunity(
        self,
        account_id: str,
        name: str,
        *,
        stage: str = "Prospecting",
        close_date: date | None = None,
        amount: Decimal | None = None,
        **fields: Any,
    ) -> str:
        """Create an opportunity as a user would; return its id."""
        when = close_date or (
            datetime.fromtimestamp(self._clock(), UTC).date() + timedelta(days=30)
        )
        body = {
            "AccountId": account_id,
            "Name": name,
            "StageName": stage,
            "CloseDate": when,
            **fields,
        }
        if amount is not None:
            body["Amount"] = amount
        with self.org.transaction() as txn:
            return self.org.create(txn, "Opportunity", body)

    def create_quote(
        self,
        opportunity_id: str,
        *,
        primary: bool = True,
        status: str = QuoteStatus.DRAFT,
        **fields: Any,
    ) -> str:
        """Create a CPQ quote on an opportunity (and its account); return its id."""
        opp = self.org.get("Opportunity", opportunity_id)
        body = {
            "SBQQ__Opportunity2__c": opp["Id"],
            "SBQQ__Account__c": opp.get("AccountId"),
            "SBQQ__Primary__c": primary,
            "SBQQ__Status__c": status,
            **fields,
        }
        with self.org.transaction() as txn:
            return self.org.create(txn, "SBQQ__Quote__c", body)

    def add_quote_line(
        self,
        quote_id: str,
        *,
        product_code: str,
        quantity: Decimal,
        list_price: Decimal,
        net_price: Decimal | None = None,
        required_by: str | None = None,
        **fields: Any,
    ) -> str:
        """Add a line (an option of the bundle line *required_by*, if given)."""
        siblings = soql.Query(
            fields=("Id",),
            sobject="SBQQ__QuoteLine__c",
            where=(soql.Condition(field="SBQQ__Quote__c", values=(quote_id,)),),
        )
        number = 1 + len(self.org.query(siblings))
        body = {
            "SBQQ__Quote__c": quote_id,
            "SBQQ__ProductCode__c": product_code,
            "SBQQ__ProductName__c": fields.pop("name", product_code),
            "SBQQ__Number__c": number,
            "SBQQ__Quantity__c": quantity,
            "SBQQ__ListPrice__c": list_price,
            **fields,
        }
        if net_price is not None:
            body["SBQQ__NetPrice__c"] = net_price
        if required_by is not None:
            body["SBQQ__RequiredBy__c"] = required_by
        with self.org.transaction() as txn:
            return self.org.create(txn, "SBQQ__QuoteLine__c", body)

    def set_quote_status(self, quote_id: str, status: str) -> None:
        """Set ``SBQQ__Status__c`` as the approval process would (one change event)."""
        with self.org.transaction() as txn:
            self.org.update(
                txn, "SBQQ__Quote__c", quote_id, {"SBQQ__Status__c": status}
            )

    def approve_quote(self, quote_id: str) -> None:
        """Approve a quote: ``SBQQ__Status__c = Approved``, and its change event."""
        self.set_quote_status(quote_id, QuoteStatus.APPROVED)

    def emit_gap(
        self,
        entity: str,
        record_ids: tuple[str, ...],
        change_type: ChangeType = ChangeType.GAP_UPDATE,
    ) -> None:
        """Append a gap (or overflow) event, as an org does for lost detail."""
        with self.org.transaction() as txn:
            self.org.emit(txn, entity, record_ids, change_type)

    def emit_unknown_change(
        self, entity: str, record_ids: tuple[str, ...], change_type: str
    ) -> None:
        """Append a header-only event whose ``changeType`` is *change_type*.

        A kind of change a later org release could send that the broker does
        not know (``MERGE``, say): well-formed otherwise.
        """
        with self.org.transaction() as txn:
            self.org.emit(
                txn,
                entity,
                record_ids,
                ChangeType.GAP_UPDATE,
                wire_change_type=change_type,
            )
