"""Change events in, canonical events out: the signed webhook and the feed poller.

Both paths apply the same rules to each change event (`inbound_from_change`):

* An echo of the broker's own write (``changeOrigin`` names our client id)
  gives nothing.
* An account CREATE carries every field: it becomes ``crm.account.changed``
  at once. Any other account change carries only what changed, so it
  becomes ``crm.record.read_required`` and the CRM connector reads the
  record back.
* An opportunity CREATE needs its account, which the event lacks: read back.
  Other opportunity changes are no canonical fact.
* A quote whose ``SBQQ__Status__c`` becomes Approved or Denied is read back
  (with its lines) into ``cpq.quote.approved`` / ``cpq.quote.denied``.
* Gap and overflow events say only which records changed: read back.
  A wildcard id (``001*``) or none at all says every record of the object
  may have changed: one more read-back naming no record, besides those of
  the ids that are real, which the connector dead-letters as a resync the
  operator must run (`adapters.crm.connector.ResyncRequired`).
* Changes to objects no canonical event speaks of give nothing.

The dedupe id of each canonical event is ``<transactionKey>/<sequenceNumber>/
<record id>``: the same change delivered twice, by either path, has the
same id and idempotency key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import msgspec

from adapters import signing as signature
from adapters.cpq.views import Quote, QuoteStatus
from adapters.crm.client import SalesforceClient, SalesforceSettings
from adapters.crm.mapping import account_from_sf
from adapters.crm.views import (
    Account,
    ChangeEvent,
    ChangeType,
    UndecodableChange,
    decode_cometd,
    decode_cometd_each,
    decode_pubsub,
    is_bitmap_encoded,
    to_id18,
)
from broker.connector import Inbound, RefusedPart
from broker.errors import SchemaInvalid
from canonical.ids import ACCOUNT, OPPORTUNITY, QUOTE, deal_id
from canonical.q2c import AccountChanged, RecordReadRequired

__all__ = [
    "SOURCE",
    "ChangePoll",
    "SalesforceWebhook",
    "inbound_from_change",
    "poll_changes",
]

#: CloudEvents ``source`` of events taken from the org.
SOURCE = "/crm/salesforce"

_SUBJECTS = {"Account": ACCOUNT, "Opportunity": OPPORTUNITY, "SBQQ__Quote__c": QUOTE}
_SHAPE = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
_READ_STATUSES = frozenset({QuoteStatus.APPROVED, QuoteStatus.DENIED})


class SalesforceWebhook:
    """``POST /webhooks/<system>``: change events pushed by the signing relay.

    Implements `broker.connector.WebhookSource`. The body is one CometD
    message, an array of them, or one decoded Pub/Sub event.

    Args:
        secrets: the active signing secrets (two during a rotation).
        client_id: our ``Sforce-Call-Options`` client id: its changes are echoes.
        default_currency: for single-currency orgs.
        system: the path segment after ``/webhooks/``.
        source: CloudEvents ``source`` of the events.
        tolerance_s: how far ``t`` may be from now, either way.
    """

    def __init__(
        self,
        *,
        secrets: Sequence[str],
        client_id: str,
        default_currency: str = "USD",
        system: str = "crm",
        source: str = SOURCE,
        tolerance_s: float = signature.DEFAULT_TOLERANCE_S,
    ) -> None:
        if not secrets or not all(secrets):
            raise ValueError("at least one webhook secret is needed, none empty")
        self._secrets = tuple(secrets)
        self._client_id = client_id
        self._currency = default_currency
        self._system = system
        self._source = source
        self._tolerance_s = tolerance_s

    @classmethod
    def from_settings(
        cls, settings: SalesforceSettings, *, system: str = "crm", source: str = SOURCE
    ) -> SalesforceWebhook:
        """The webhook of the org *settings* describe (secrets, client id, currency).

        Raises:
            ValueError: the settings name no webhook secret.
        """
        return cls(
            secrets=settings.webhook_secrets,
            client_id=settings.client_id,
            default_currency=settings.default_currency,
            system=system,
            source=source,
            tolerance_s=settings.webhook_tolerance_s,
        )

    def __repr__(self) -> str:
        return f"<SalesforceWebhook {self._system} {len(self._secrets)} secret(s)>"

    @property
    def system(self) -> str:
        """The path segment after ``/webhooks/``."""
        return self._system

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float) -> None:
        """Check ``X-Q2C-Signature`` over the raw body.

        Raises:
            SignatureInvalid: missing, malformed, wrong, or outside tolerance.
        """
        wanted = signature.HEADER.lower()
        header = next((v for k, v in headers.items() if k.lower() == wanted), None)
        signature.verify(
            header, body, self._secrets, now=now, tolerance_s=self._tolerance_s
        )

    def parse(self, headers: Mapping[str, str], body: bytes) -> Sequence[Inbound]:
        """The canonical events of the pushed change events (none for echoes).

        Raises:
            SchemaInvalid: the body is not a change event in either form, or
                is nested deeper than the JSON decoder goes (RecursionError).
        """
        try:
            events = decode_cometd(body)
        except (msgspec.DecodeError, RecursionError) as cometd_error:
            try:
                events = (decode_pubsub(body),)
            except (msgspec.DecodeError, RecursionError):
                raise SchemaInvalid(
                    f"{self._system}: not a change event: {cometd_error}"
                ) from cometd_error
        return self._inbound(events)

    def parse_parts(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[Sequence[Inbound], Sequence[RefusedPart]]:
        """`parse`, message by message for a CometD batch.

        A message of the batch that is not a change event we can read is
        handed back as a refused part (kept as a dead letter of its own) and
        the others are taken: one bad event spoils no other. A body none of
        whose messages can be read is judged whole, as `parse` does.

        Raises:
            SchemaInvalid: the body is not a change event in either form.
        """
        try:
            messages = decode_cometd_each(body)
        except (msgspec.DecodeError, RecursionError):
            return self.parse(headers, body), ()
        events = [m for m in messages if isinstance(m, ChangeEvent)]
        if not events:
            return self.parse(headers, body), ()
        refused = [
            RefusedPart(
                m.body,
                SchemaInvalid(f"{self._system}: not a change event we read: {m.error}"),
            )
            for m in messages
            if isinstance(m, UndecodableChange)
        ]
        return self._inbound(events), refused

    def _inbound(self, events: Sequence[ChangeEvent]) -> list[Inbound]:
        return [
            inbound
            for event in events
            for inbound in inbound_from_change(
                event,
                client_id=self._client_id,
                default_currency=self._currency,
                source=self._source,
            )
        ]


def inbound_from_change(
    event: ChangeEvent, *, client_id: str, default_currency: str, source: str = SOURCE
) -> list[Inbound]:
    """The canonical events one change event stands for (rules: module docstring)."""
    header = event.header
    entity = header.entity_name
    if header.origin.client == client_id or entity not in _SUBJECTS:
        return []
    kind = header.change_type
    if kind.is_gap:
        return _read_back(event, source)
    if entity == "Account":
        if kind is ChangeType.CREATE and len(header.record_ids) == 1:
            created = _account_created(event, default_currency, source)
            if created is not None:
                return [created]
        return _read_back(event, source)
    if entity == "Opportunity":
        return _read_back(event, source) if kind is ChangeType.CREATE else []
    if kind is ChangeType.DELETE:
        return []
    try:
        quote = event.record(Quote)
    except (msgspec.ValidationError, RecursionError):
        return _read_back(event, source)
    if quote.SBQQ__Status__c not in _READ_STATUSES:
        return []
    return _read_back(event, source, deal_of=quote.SBQQ__Opportunity2__c)


class ChangePoll(NamedTuple):
    """One read of the change feed (`poll_changes`).

    Attributes:
        inbound: the canonical events of the change events read.
        resume_at: the replay id to resume after: that of the last message
            read whose replay id is readable, unreadable ones included.
        undecodable: the messages that are not change events we can read;
            keep them (as dead letters) before moving to *resume_at*.
    """

    inbound: list[Inbound]
    resume_at: int
    undecodable: list[UndecodableChange]


async def poll_changes(
    client: SalesforceClient,
    channel: str,
    after_replay_id: int,
    limit: int,
    *,
    wait_s: float = 0.0,
    source: str = SOURCE,
) -> ChangePoll:
    """Read the change feed once: canonical events, the unreadable, where to resume.

    A change-feed reader persists ``resume_at`` after it has published the
    events and kept the undecodable ones (at-least-once; the dedupe id makes
    repeats harmless, and a dead letter kept again counts one more attempt).
    One message that cannot be read costs the others of its batch nothing,
    and does not hold the feed. With nothing new, the replay id comes back
    unchanged.

    Raises:
        UpstreamRejected: ``INVALID_REPLAY_ID`` when *after_replay_id* is
            older than the org retains: re-read the records, resume at ``-1``;
            ``MALFORMED_RESPONSE`` when the answer is not JSON at all.
        UpstreamUnavailable: the org is down, slow or limiting us.
    """
    read = await client.replay_each(
        channel, after_replay_id, limit=limit, wait_s=wait_s
    )
    inbound: list[Inbound] = []
    undecodable: list[UndecodableChange] = []
    resume_at = after_replay_id
    for event in read:
        if isinstance(event, UndecodableChange):
            undecodable.append(event)
            if event.replay_id is not None:
                resume_at = event.replay_id
            continue
        resume_at = event.replay_id
        inbound.extend(
            inbound_from_change(
                event,
                client_id=client.settings.client_id,
                default_currency=client.settings.default_currency,
                source=source,
            )
        )
    return ChangePoll(inbound, resume_at, undecodable)


def _inbound(
    event: ChangeEvent,
    canonical: object,
    record_id: str,
    *,
    correlation_id: str,
    subject: str | None,
    source: str,
) -> Inbound:
    header = event.header
    change = f"{header.transaction_key}/{header.sequence_number}"
    return Inbound(
        event=canonical,
        id=f"{change}/{record_id or '*'}",
        source=source,
        correlation_id=correlation_id,
        idempotency_key=f"sfdc:{header.entity_name}:{record_id or '*'}:{change}",
        subject=subject,
        time=header.committed_at,
    )


def _normalised(record_id: str) -> str | None:
    if not _SHAPE.fullmatch(record_id):
        return None
    return to_id18(record_id) if len(record_id) == 15 else record_id


def _read_back(
    event: ChangeEvent, source: str, *, deal_of: str | None = None
) -> list[Inbound]:
    header = event.header
    entity = header.entity_name
    kind = header.change_type.value
    ids = [rid for rid in map(_normalised, header.record_ids) if rid is not None]
    out = []
    if not ids or len(ids) < len(header.record_ids):
        # A wildcard (``001*``) or no id at all: every record may have
        # changed. The ids that are real are still read back, below.
        whole = RecordReadRequired(entity=entity, native_ids=(), change_type=kind)
        out.append(
            _inbound(
                event,
                whole,
                "",
                correlation_id=f"crm.{entity}",
                subject=None,
                source=source,
            )
        )
    deal = _normalised(deal_of) if deal_of else None
    for rid in ids:
        subject = _SUBJECTS[entity] + rid
        if entity == "Opportunity":
            correlation = deal_id(rid)
        elif deal is not None:
            correlation = deal_id(deal)
        else:
            correlation = subject
        command = RecordReadRequired(entity=entity, native_ids=(rid,), change_type=kind)
        out.append(
            _inbound(
                event,
                command,
                rid,
                correlation_id=correlation,
                subject=subject,
                source=source,
            )
        )
    return out


def _account_created(
    event: ChangeEvent, default_currency: str, source: str
) -> Inbound | None:
    header = event.header
    rid = _normalised(header.record_ids[0])
    if rid is None:
        return None
    try:
        account = account_from_sf(
            event.record(Account), default_currency=default_currency, record_id=rid
        )
    except (msgspec.ValidationError, SchemaInvalid, RecursionError):
        return None  # the read-back will say what is wrong with the record
    fields = () if is_bitmap_encoded(header.changed_fields) else header.changed_fields
    changed = AccountChanged(
        account=account, change="created", native_id=rid, changed_fields=fields
    )
    return _inbound(
        event,
        changed,
        rid,
        correlation_id=account.id,
        subject=account.id,
        source=source,
    )
