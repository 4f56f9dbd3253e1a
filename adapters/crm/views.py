"""Salesforce REST and Change Data Capture payloads, spelled as Salesforce spells them.

sObject fields keep their API names (``AccountId``, ``Broker_Key__c``) so a
view reads like the org's ``describe``; envelope keys in camelCase
(``totalSize``, ``entityName``) are snake_case here with ``rename="camel"``.
Every view is a tolerant reader: unknown fields are ignored and optional
fields default to None. With ``omit_defaults`` a record view is also the body
of a create or PATCH: only the fields that were set are sent.

Dates and date-times come in two forms: ISO strings from REST and the CometD
feed, epoch milliseconds (date-times) or days (dates) from the Pub/Sub API.
Views accept both (`SfDateTime`, `SfDate`); `as_datetime` and `as_date`
normalise them.

The custom fields ``Broker_Key__c`` (unique external id),
``Broker_Command_Key__c``, ``Broker_Status__c`` and ``ERP_Order_Number__c``
belong to the broker's own package in the org.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Annotated, ClassVar, Generic, TypeVar

import msgspec
from msgspec import Meta

__all__ = [
    # ids
    "is_id",
    "to_id18",
    "key_prefix",
    "KEY_PREFIXES",
    # scalars
    "SfDateTime",
    "SfDate",
    "as_datetime",
    "as_date",
    "format_datetime",
    # REST envelope
    "Attributes",
    "SObject",
    "Address",
    "Account",
    "Contact",
    "Opportunity",
    "OpportunityLineItem",
    "QueryResult",
    "SaveResult",
    "ApiError",
    "ApiErrors",
    "TokenResponse",
    "OAuthError",
    # change data capture
    "ChangeType",
    "ChangeEventHeader",
    "ChangeOrigin",
    "parse_change_origin",
    "is_bitmap_encoded",
    "CometdEvent",
    "CometdData",
    "CometdMessage",
    "PubSubEvent",
    "ChangeEvent",
    "UndecodableChange",
    "decode_cometd",
    "decode_cometd_each",
    "decode_pubsub",
]

S = TypeVar("S", bound="SObject")

# --- ids -----------------------------------------------------------------------

_ID = re.compile(r"[A-Za-z0-9]{15}(?:[A-Za-z0-9]{3})?")
_SUFFIX_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ012345"

#: Key prefixes of the objects the broker touches (custom ones are per org).
KEY_PREFIXES: dict[str, str] = {
    "Account": "001",
    "Contact": "003",
    "Opportunity": "006",
    "OpportunityLineItem": "00k",
    "User": "005",
    "Product2": "01t",
    "PricebookEntry": "01u",
    "Pricebook2": "01s",
}


def _suffix(id15: str) -> str:
    # Each 5-character chunk gives one character: bit i is set when the
    # i-th character of the chunk is an upper-case letter.
    out = []
    for start in (0, 5, 10):
        bits = 0
        for i, ch in enumerate(id15[start : start + 5]):
            if "A" <= ch <= "Z":
                bits |= 1 << i
        out.append(_SUFFIX_ALPHABET[bits])
    return "".join(out)


def to_id18(value: str) -> str:
    """The 18-character form of a 15- or 18-character record id, checked.

    A 15-character id is case-sensitive: the 3-character suffix encodes which
    of its letters are upper-case. An 18-character id is meant to survive
    case-insensitive systems: if its letters are all of one case and the
    suffix disagrees, the case is restored from the suffix.

    Raises:
        ValueError: not 15 or 18 letters and digits, or a suffix that does not
            fit its id (and cannot be explained by a lost case).
    """
    if not _ID.fullmatch(value):
        raise ValueError(f"{value!r} is not a 15- or 18-character Salesforce id")
    if len(value) == 15:
        return value + _suffix(value)
    head, suffix = value[:15], value[15:].upper()
    if _suffix(head) == suffix:
        return head + suffix
    if head != head.lower() and head != head.upper():
        raise ValueError(f"{value!r}: the checksum suffix does not match the id")
    chars = list(head)
    for chunk, code in enumerate(suffix):
        bits = _SUFFIX_ALPHABET.find(code)
        if bits < 0:
            raise ValueError(f"{value!r} has an invalid checksum suffix")
        for i in range(5):
            pos = chunk * 5 + i
            if bits >> i & 1:
                if not chars[pos].isalpha():
                    raise ValueError(f"{value!r} has an invalid checksum suffix")
                chars[pos] = chars[pos].upper()
            else:
                chars[pos] = chars[pos].lower()
    return "".join(chars) + suffix


def is_id(value: str) -> bool:
    """Whether *value* is a well-formed 15- or 18-character record id."""
    try:
        to_id18(value)
    except ValueError:
        return False
    return True


def key_prefix(record_id: str) -> str:
    """The object's key prefix: the first three characters (``001`` = Account)."""
    return record_id[:3]


# --- scalars -------------------------------------------------------------------

#: Epoch milliseconds a `datetime` can hold (years 1 to 9999): a value
#: outside is refused when decoded, not an OverflowError when converted.
EpochMillis = Annotated[int, Meta(ge=-62_135_596_800_000, le=253_402_300_799_999)]
#: Days since the epoch a `date` can hold (years 1 to 9999).
EpochDays = Annotated[int, Meta(ge=-719_162, le=2_932_896)]
#: A date-time: ISO 8601 (``2024-01-15T10:30:00.000+0000``) or epoch milliseconds.
SfDateTime = datetime | EpochMillis
#: A date: ISO 8601 (``2024-03-31``) or days since the epoch (Pub/Sub).
SfDate = date | EpochDays

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def as_datetime(value: SfDateTime | None) -> datetime | None:
    """A timezone-aware datetime from either form of `SfDateTime`."""
    if value is None or isinstance(value, datetime):
        return value
    return _EPOCH + timedelta(milliseconds=value)


def as_date(value: SfDate | None) -> date | None:
    """A date from either form of `SfDate`."""
    if value is None or isinstance(value, date):
        return value
    return _EPOCH.date() + timedelta(days=value)


def format_datetime(value: datetime) -> str:
    """Salesforce's own rendering: ``2024-01-15T10:30:00.000+0000`` (UTC)."""
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}+0000"


# --- REST records --------------------------------------------------------------


class _View(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Attributes(_View, frozen=True, kw_only=True):
    """The ``attributes`` block of every record: its type and REST url."""

    type: str
    url: str | None = None


class SObject(_View, frozen=True, kw_only=True, omit_defaults=True):
    """Base of the record views; ``sobject_type`` is the API name of the object."""

    sobject_type: ClassVar[str] = ""

    attributes: Attributes | None = None
    Id: str | None = None
    IsDeleted: bool | None = None
    CreatedDate: SfDateTime | None = None
    LastModifiedDate: SfDateTime | None = None
    SystemModstamp: SfDateTime | None = None


class Address(_View, frozen=True, kw_only=True, omit_defaults=True, rename="pascal"):
    """A compound address (``BillingAddress``); read-only, write the flat fields."""

    street: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None
    state_code: str | None = None
    country_code: str | None = None
    latitude: Decimal | None = None
    longitude: Decimal | None = None
    geocode_accuracy: str | None = None


class Account(SObject, frozen=True, kw_only=True):
    """``Account``: the customer. ``CurrencyIsoCode`` exists in multicurrency orgs."""

    sobject_type: ClassVar[str] = "Account"

    Name: str | None = None
    AccountNumber: str | None = None
    Type: str | None = None
    Industry: str | None = None
    Phone: str | None = None
    Website: str | None = None
    BillingStreet: str | None = None
    BillingCity: str | None = None
    BillingState: str | None = None
    BillingStateCode: str | None = None
    BillingPostalCode: str | None = None
    BillingCountry: str | None = None
    BillingCountryCode: str | None = None
    BillingAddress: Address | None = None
    ShippingStreet: str | None = None
    ShippingCity: str | None = None
    ShippingState: str | None = None
    ShippingStateCode: str | None = None
    ShippingPostalCode: str | None = None
    ShippingCountry: str | None = None
    ShippingCountryCode: str | None = None
    ShippingAddress: Address | None = None
    CurrencyIsoCode: str | None = None
    OwnerId: str | None = None
    Tax_Id__c: str | None = None
    Broker_Key__c: str | None = None


class Contact(SObject, frozen=True, kw_only=True):
    """``Contact``: a person at an account; ``LastName`` is required."""

    sobject_type: ClassVar[str] = "Contact"

    AccountId: str | None = None
    FirstName: str | None = None
    LastName: str | None = None
    Email: str | None = None
    Phone: str | None = None
    MailingStreet: str | None = None
    MailingCity: str | None = None
    MailingState: str | None = None
    MailingPostalCode: str | None = None
    MailingCountry: str | None = None
    MailingCountryCode: str | None = None
    MailingAddress: Address | None = None
    OwnerId: str | None = None
    Broker_Key__c: str | None = None


class Opportunity(SObject, frozen=True, kw_only=True):
    """``Opportunity``: a deal. ``Name``, ``StageName`` and ``CloseDate`` are required.

    ``SBQQ__PrimaryQuote__c`` is added by the CPQ package; the ``Broker_*``
    and ``ERP_*`` fields are where the broker writes the deal's progress.
    ``Account`` is the parent record, present when a query selects its
    fields (``Account.Name``).
    """

    sobject_type: ClassVar[str] = "Opportunity"

    AccountId: str | None = None
    Name: str | None = None
    StageName: str | None = None
    CloseDate: SfDate | None = None
    Amount: Decimal | None = None
    Probability: Decimal | None = None
    Pricebook2Id: str | None = None
    CurrencyIsoCode: str | None = None
    IsClosed: bool | None = None
    IsWon: bool | None = None
    ForecastCategoryName: str | None = None
    HasOpportunityLineItem: bool | None = None
    SyncedQuoteId: str | None = None
    OwnerId: str | None = None
    SBQQ__PrimaryQuote__c: str | None = None
    Broker_Key__c: str | None = None
    Broker_Command_Key__c: str | None = None
    Broker_Status__c: str | None = None
    ERP_Order_Number__c: str | None = None
    Account: Account | None = None


class OpportunityLineItem(SObject, frozen=True, kw_only=True):
    """``OpportunityLineItem``: a product on a deal, priced by unit or in total."""

    sobject_type: ClassVar[str] = "OpportunityLineItem"

    OpportunityId: str | None = None
    PricebookEntryId: str | None = None
    Product2Id: str | None = None
    ProductCode: str | None = None
    Name: str | None = None
    Quantity: Decimal | None = None
    UnitPrice: Decimal | None = None
    TotalPrice: Decimal | None = None
    ListPrice: Decimal | None = None
    Discount: Decimal | None = None
    ServiceDate: SfDate | None = None
    SortOrder: int | None = None
    Description: str | None = None
    Broker_Key__c: str | None = None


class QueryResult(
    _View, Generic[S], frozen=True, kw_only=True, omit_defaults=True, rename="camel"
):
    """One page of a SOQL query; follow ``next_records_url`` while ``done`` is false."""

    total_size: int
    done: bool
    records: tuple[S, ...]
    next_records_url: str | None = None


class ApiError(_View, frozen=True, kw_only=True, rename="camel"):
    """One entry of the error array every non-2xx REST response carries."""

    message: str = ""
    error_code: str = ""
    fields: tuple[str, ...] | None = None


ApiErrors = tuple[ApiError, ...]


class SaveResult(_View, frozen=True, kw_only=True):
    """The body of a create or of an upsert that created: ``{id, success, errors}``."""

    id: str
    success: bool
    errors: ApiErrors = ()
    created: bool | None = None


class TokenResponse(_View, frozen=True, kw_only=True):
    """The OAuth 2.0 token endpoint's answer; ``instance_url`` is the API base."""

    access_token: str
    instance_url: str
    token_type: str = "Bearer"
    id: str | None = None
    issued_at: str | None = None
    signature: str | None = None


class OAuthError(_View, frozen=True, kw_only=True):
    """The token endpoint's refusal: ``{"error": "invalid_client", ...}``."""

    error: str
    error_description: str = ""


# --- change data capture -------------------------------------------------------


class ChangeType(enum.StrEnum):
    """``ChangeEventHeader.changeType``; the ``GAP_*`` kinds carry no field values."""

    CREATE = "CREATE"
    UPDATE = "UPDATE"
    DELETE = "DELETE"
    UNDELETE = "UNDELETE"
    GAP_CREATE = "GAP_CREATE"
    GAP_UPDATE = "GAP_UPDATE"
    GAP_DELETE = "GAP_DELETE"
    GAP_UNDELETE = "GAP_UNDELETE"
    GAP_OVERFLOW = "GAP_OVERFLOW"

    @property
    def is_gap(self) -> bool:
        """A gap or overflow: the event says *that* records changed, not *how*."""
        return self.value.startswith("GAP_")


class ChangeOrigin(_View, frozen=True, kw_only=True):
    """``changeOrigin`` split: ``com/salesforce/api/<api>/<version>;client=<id>``."""

    api: str | None = None
    version: str | None = None
    client: str | None = None


def parse_change_origin(value: str) -> ChangeOrigin:
    """Split a ``changeOrigin``; an empty one (UI, Apex) gives all None.

    ``client`` is the ``Sforce-Call-Options: client=`` value of the API call
    that made the change, verbatim (``SfdcInternalAPI/`` keeps its slash).
    """
    if not value:
        return ChangeOrigin()
    path, *options = value.split(";")
    client = None
    for option in options:
        key, _, val = option.partition("=")
        if key.strip() == "client":
            client = val.strip()
    parts = path.split("/")
    if len(parts) >= 5 and parts[:3] == ["com", "salesforce", "api"]:
        return ChangeOrigin(api=parts[3], version=parts[4], client=client)
    return ChangeOrigin(client=client)


_BITMAP = re.compile(r"(?:\d+-)?0x[0-9A-Fa-f]+")


def is_bitmap_encoded(fields: tuple[str, ...]) -> bool:
    """Whether field lists are Pub/Sub bitmaps (``0x400000``, ``4-0x01``), not names."""
    return any(_BITMAP.fullmatch(f) for f in fields)


class ChangeEventHeader(_View, frozen=True, kw_only=True, rename="camel"):
    """The header of every change event (field lists as received, never decoded).

    Attributes:
        record_ids: 18-character ids, or a ``<prefix>*`` wildcard.
        changed_fields: names (``BillingAddress.City``) or, from the Pub/Sub
            API, bitmaps (see `is_bitmap_encoded`); kept as strings.
        change_origin: see `parse_change_origin`; empty for UI and Apex changes.
        commit_timestamp: epoch milliseconds, within what a `datetime` holds.
    """

    entity_name: str
    record_ids: tuple[str, ...]
    change_type: ChangeType
    change_origin: str = ""
    transaction_key: str
    sequence_number: int
    commit_timestamp: EpochMillis
    commit_number: int | None = None
    commit_user: str | None = None
    changed_fields: tuple[str, ...] = ()
    diff_fields: tuple[str, ...] = ()
    nulled_fields: tuple[str, ...] = ()

    @property
    def origin(self) -> ChangeOrigin:
        """`changeOrigin` parsed."""
        return parse_change_origin(self.change_origin)

    @property
    def committed_at(self) -> datetime:
        """``commitTimestamp`` as a UTC datetime."""
        return _EPOCH + timedelta(milliseconds=self.commit_timestamp)


class _HeaderOnly(_View, frozen=True, kw_only=True):
    ChangeEventHeader: ChangeEventHeader


class CometdEvent(_View, frozen=True, kw_only=True, rename="camel"):
    """``data.event`` of a CometD message."""

    replay_id: int


class CometdData(_View, frozen=True, kw_only=True):
    """``data`` of a CometD message: schema id, payload and replay id."""

    schema: str | None = None
    payload: msgspec.Raw
    event: CometdEvent


class CometdMessage(_View, frozen=True, kw_only=True):
    """A change event as the Streaming API (CometD) delivers it."""

    channel: str
    data: CometdData


class PubSubEvent(_View, frozen=True, kw_only=True, rename="camel"):
    """A change event from the Pub/Sub API, after Avro decoding."""

    id: str | None = None
    schema_id: str | None = None
    replay_id: int
    payload: msgspec.Raw


class ChangeEvent(_View, frozen=True, kw_only=True):
    """One change event, whichever transport brought it.

    ``payload`` stays raw: decode it with `record` into the view of
    ``header.entity_name`` (unknown keys, such as the header, are ignored).
    """

    replay_id: int
    header: ChangeEventHeader
    payload: msgspec.Raw
    channel: str | None = None
    schema_id: str | None = None
    event_id: str | None = None

    def record(self, view: type[S]) -> S:
        """The payload's field values as *view*.

        Raises:
            msgspec.ValidationError: a value does not fit the view.
        """
        return msgspec.json.decode(self.payload, type=view)


def _header(payload: msgspec.Raw) -> ChangeEventHeader:
    return msgspec.json.decode(payload, type=_HeaderOnly).ChangeEventHeader


def _from_cometd(m: CometdMessage) -> ChangeEvent:
    return ChangeEvent(
        replay_id=m.data.event.replay_id,
        header=_header(m.data.payload),
        payload=m.data.payload,
        channel=m.channel,
        schema_id=m.data.schema,
    )


def decode_cometd(body: bytes) -> tuple[ChangeEvent, ...]:
    """Change events from one CometD message or an array of them.

    Raises:
        msgspec.DecodeError: not JSON, or not change events (a
            `msgspec.ValidationError` names the path).
    """
    messages = msgspec.json.decode(body, type=CometdMessage | list[CometdMessage])
    if isinstance(messages, CometdMessage):
        messages = [messages]
    return tuple(_from_cometd(m) for m in messages)


class UndecodableChange(msgspec.Struct, frozen=True, kw_only=True):
    """A message of a change-feed batch that is not a change event we can read.

    Attributes:
        body: the message's own bytes, as received.
        error: why it is not readable (the decoder's message, with the path).
        replay_id: its ``data.event.replayId``, if that much is readable.
    """

    body: bytes
    error: str
    replay_id: int | None = None


class _ReplayData(_View, frozen=True, kw_only=True):
    event: CometdEvent


class _ReplayOnly(_View, frozen=True, kw_only=True):
    data: _ReplayData


def decode_cometd_each(body: bytes) -> tuple[ChangeEvent | UndecodableChange, ...]:
    """`decode_cometd`, message by message: one bad message spoils no other.

    A message that is not a change event we can read (an unknown
    ``changeType``, a missing or mistyped field) comes back in its place as
    an `UndecodableChange`, with its bytes and, when readable, its replay id.

    Raises:
        msgspec.DecodeError: the body is not JSON.
    """
    try:
        messages = msgspec.json.decode(body, type=list[msgspec.Raw])
    except msgspec.ValidationError:
        messages = [msgspec.Raw(body)]  # one message, not an array
    return tuple(_decode_one(bytes(m)) for m in messages)


def _decode_one(body: bytes) -> ChangeEvent | UndecodableChange:
    try:
        return _from_cometd(msgspec.json.decode(body, type=CometdMessage))
    except (msgspec.DecodeError, RecursionError) as exc:
        error = str(exc) or type(exc).__name__
    try:
        replay_id: int | None = msgspec.json.decode(
            body, type=_ReplayOnly
        ).data.event.replay_id
    except (msgspec.DecodeError, RecursionError):
        replay_id = None
    return UndecodableChange(body=body, error=error, replay_id=replay_id)


def decode_pubsub(body: bytes) -> ChangeEvent:
    """A change event in its decoded Pub/Sub form (``id``, ``schemaId``, ``payload``).

    Raises:
        msgspec.DecodeError: not JSON, or not a change event.
    """
    event = msgspec.json.decode(body, type=PubSubEvent)
    return ChangeEvent(
        replay_id=event.replay_id,
        header=_header(event.payload),
        payload=event.payload,
        schema_id=event.schema_id,
        event_id=event.id,
    )
