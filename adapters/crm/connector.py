"""The CRM connector: write a deal's progress back, and read changed records back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, final

import structlog

from adapters.cpq.client import CpqClient
from adapters.cpq.mapping import quote_from_records
from adapters.cpq.views import QuoteStatus
from adapters.crm import views as v
from adapters.crm.client import SalesforceClient
from adapters.crm.mapping import (
    ACCOUNT_FIELDS,
    OPPORTUNITY_FIELDS,
    account_from_sf,
    command_key,
    native_id,
    opportunity_from_sf,
    opportunity_update,
)
from adapters.crm.soql import select
from broker.errors import PermanentError, UnknownMessageType, UpstreamRejected
from canonical import Envelope, Event
from canonical.commerce import Account, Quote
from canonical.ids import OPPORTUNITY
from canonical.q2c import (
    AccountChanged,
    OpportunityCreated,
    OpportunityUpdated,
    OpportunityUpdateRequested,
    QuoteApproved,
    QuoteDenied,
    RecordReadRequired,
)

__all__ = ["CrmConnector", "ResyncRequired"]

_log = structlog.get_logger(__name__)

_CHANGE: dict[str, Literal["created", "updated", "deleted", "undeleted"]] = {
    "CREATE": "created",
    "GAP_CREATE": "created",
    "DELETE": "deleted",
    "GAP_DELETE": "deleted",
    "UNDELETE": "undeleted",
    "GAP_UNDELETE": "undeleted",
}
_CREATED = frozenset({"CREATE", "GAP_CREATE"})


class ResyncRequired(PermanentError):
    """A read-back names no record: an object's changes are lost to the feed.

    A ``GAP_OVERFLOW`` (more than 100,000 changes in one transaction) or a
    wildcard record id (``001*``) says that any record of the object may
    have changed. Reading them all is not the connector's to start; the
    command is dead-lettered with this reason so an operator sees it, runs a
    resync of the object, then purges the dead letter (replaying it only
    fails again). Not counted against the circuit breaker.
    """

    reason = "resync_required"


@final
class CrmConnector:
    """Implements `broker.connector.Connector` for a Salesforce org.

    ``crm.opportunity.update_requested`` writes the stage, ERP order number
    and status note to the opportunity, stamped with the command's key in
    ``Broker_Command_Key__c``. Redelivery is safe: a command whose key the
    record already carries is answered without a second write, and the
    write itself sets values, so even a repeat races to the same state.

    ``crm.record.read_required`` (from the change feed) reads the records
    back and answers with the canonical facts: ``crm.account.changed``,
    ``crm.opportunity.created``, ``cpq.quote.approved`` /
    ``cpq.quote.denied`` (quotes need *cpq*). Reading has no effect to repeat.
    One that names no record (an overflow, a wildcard id) raises
    `ResyncRequired`: the changes are lost to the feed, and only an
    operator's resync of the object recovers them.

    Args:
        crm: the org's client.
        cpq: the CPQ client on the same org, for quote read-backs.
        system: the configured system name.
    """

    def __init__(
        self,
        crm: SalesforceClient,
        *,
        cpq: CpqClient | None = None,
        system: str = "crm",
    ) -> None:
        self._crm = crm
        self._cpq = cpq
        self._system = system
        self._currency = crm.settings.default_currency

    def __repr__(self) -> str:
        return f"<CrmConnector {self._system}>"

    @property
    def system(self) -> str:
        """The configured system name."""
        return self._system

    @property
    def commands(self) -> Mapping[str, type[Any]]:
        """The commands this connector carries out."""
        return {
            "crm.opportunity.update_requested": OpportunityUpdateRequested,
            "crm.record.read_required": RecordReadRequired,
        }

    async def handle(
        self, command: Any, envelope: Envelope, *, first_attempt: bool = False
    ) -> Sequence[Event]:
        """Carry out *command*; see the class docstring.

        Raises:
            UpstreamUnavailable: the org is down, slow or limiting us.
            UpstreamRejected: the org refused (e.g. ``NOT_FOUND``).
            SchemaInvalid: a record the org returned does not map.
            ResyncRequired: a read-back that names no record.
            UnknownMessageType: not a command of this connector.
        """
        match command:
            case OpportunityUpdateRequested():
                return await self._update_opportunity(command, envelope, first_attempt)
            case RecordReadRequired():
                return await self._read_back(command)
            case _:
                raise UnknownMessageType(
                    f"{self._system}: no handler for {type(command).__name__}"
                )

    async def _update_opportunity(
        self, command: OpportunityUpdateRequested, envelope: Envelope, first: bool
    ) -> list[Event]:
        record_id = native_id(command.opportunity_id, OPPORTUNITY)
        key = command_key(envelope.idempotency_key)
        # The org has no idempotency facility: a repeat finds its own stamp.
        # Only a repeat can, so a first attempt writes without looking.
        if first or not await self._crm.carries_key(v.Opportunity, record_id, key):
            await self._crm.update(record_id, opportunity_update(command, key=key))
        return [
            OpportunityUpdated(
                opportunity_id=command.opportunity_id,
                stage=command.stage,
                native_id=record_id,
            )
        ]

    async def _read_back(self, command: RecordReadRequired) -> list[Event]:
        ids = [v.to_id18(i) for i in command.native_ids if v.is_id(i)]
        if not ids:
            # An overflow names no records; a full resync is an operator's call.
            raise ResyncRequired(
                f"{self._system}: {command.change_type} names no {command.entity} "
                f"record ({', '.join(command.native_ids) or 'no ids'}): changes "
                f"were lost to the change feed; resync {command.entity} from the org"
            )
        if len(ids) < len(command.native_ids):
            # The ingress sends a wildcard on its own; a command that mixes
            # one with real ids still has those read, and says what it lost.
            _log.warning(
                "crm_resync_required",
                system=self._system,
                entity=command.entity,
                change_type=command.change_type,
                ignored=[i for i in command.native_ids if not v.is_id(i)],
            )
        if command.entity == "Account":
            return await self._accounts(
                ids, _CHANGE.get(command.change_type, "updated")
            )
        if command.entity == "Opportunity" and command.change_type in _CREATED:
            return await self._opportunities(ids)
        if command.entity == "SBQQ__Quote__c" and self._cpq is not None:
            return await self._quotes(self._cpq, ids)
        return []

    async def _accounts(
        self,
        ids: Sequence[str],
        change: Literal["created", "updated", "deleted", "undeleted"],
    ) -> list[Event]:
        records = await self._crm.query(
            select("Account", ACCOUNT_FIELDS, {"Id": ids}),
            v.Account,
            include_deleted=True,
        )
        return [
            AccountChanged(
                account=account_from_sf(rec, default_currency=self._currency),
                change=change,
                native_id=rec.Id or "",
            )
            for rec in records
        ]

    async def read_quote(self, quote_id: str) -> tuple[Quote, Account]:
        """A CPQ quote in any status, with its account: for synchronous validation.

        Raises:
            UpstreamRejected: ``NOT_FOUND`` for an unknown quote or account,
                ``NOT_CONFIGURED`` without a CPQ client.
            UpstreamUnavailable: the org is down, slow or limiting us.
        """
        if self._cpq is None:
            raise UpstreamRejected(self._system, "no CPQ client", code="NOT_CONFIGURED")
        quote, lines = await self._cpq.quote_with_lines(
            quote_id, account_fields=ACCOUNT_FIELDS
        )
        if quote.SBQQ__Account__r is None:
            raise UpstreamRejected(
                self._system,
                f"quote {quote_id} has no readable account",
                code="NOT_FOUND",
            )
        account = account_from_sf(
            quote.SBQQ__Account__r, default_currency=self._currency
        )
        canonical = quote_from_records(
            quote,
            lines,
            default_currency=self._currency,
            fallback_country=account.country,
        )
        return canonical, account

    async def _opportunities(self, ids: Sequence[str]) -> list[Event]:
        # One request: each opportunity with its account's fields.
        fields = [*OPPORTUNITY_FIELDS, *(f"Account.{name}" for name in ACCOUNT_FIELDS)]
        opps = await self._crm.query(
            select("Opportunity", fields, {"Id": ids}), v.Opportunity
        )
        events: list[Event] = []
        for opp in opps:
            if opp.Account is None:
                raise UpstreamRejected(
                    self._system,
                    f"Opportunity {opp.Id} has no readable account",
                    code="NOT_FOUND",
                )
            account = account_from_sf(opp.Account, default_currency=self._currency)
            deal = opportunity_from_sf(opp, account, default_currency=self._currency)
            events.append(OpportunityCreated(opportunity=deal))
        return events

    async def _quotes(self, cpq: CpqClient, ids: Sequence[str]) -> list[Event]:
        events: list[Event] = []
        for quote_id in ids:
            try:
                quote, lines = await cpq.quote_with_lines(
                    quote_id, account_fields=ACCOUNT_FIELDS
                )
            except UpstreamRejected as exc:
                if exc.code in ("NOT_FOUND", "ENTITY_IS_DELETED"):
                    continue
                raise
            if quote.SBQQ__Status__c not in (QuoteStatus.APPROVED, QuoteStatus.DENIED):
                continue
            fallback = None
            if quote.SBQQ__Account__r is not None and not (
                quote.SBQQ__ShippingCountry__c or quote.SBQQ__BillingCountry__c
            ):
                fallback = account_from_sf(
                    quote.SBQQ__Account__r, default_currency=self._currency
                ).country
            canonical = quote_from_records(
                quote, lines, default_currency=self._currency, fallback_country=fallback
            )
            if quote.SBQQ__Status__c == QuoteStatus.APPROVED:
                events.append(QuoteApproved(quote=canonical))
            else:
                events.append(QuoteDenied(quote=canonical))
        return events
