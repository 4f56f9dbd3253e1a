"""The in-memory org behind `SalesforceSandbox`: records, rules and change log.

It keeps what an org would: records per object with 18-character ids and
the right key prefixes, required and read-only fields, lookups that must
point at live records, the unique ``Broker_Key__c`` external id, soft
deletion (``queryAll`` still sees deleted rows), and a few things the CPQ
package does by itself (line prices and totals, one primary quote per
opportunity). Every committed write appends change events, one per record
touched, sharing the transaction's ``transactionKey``.

A test double: records are kept for the life of the object. Only the change
log is bounded (``retain_events``); a reader asking for a replay id older
than the oldest retained event is refused, as an org refuses one past its
72-hour retention.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from adapters.crm import soql
from adapters.crm.schema import (
    API_VERSION,
    COMPOUND_OF,
    SPECS,
    Fields,
    ObjectSpec,
    OrgError,
    change_field_name,
    compound_fields,
    entity_channel,
)
from adapters.crm.views import (
    ChangeEventHeader,
    ChangeType,
    format_datetime,
    is_id,
    to_id18,
)

__all__ = ["Org", "ChangeRecord", "Transaction"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ChangeRecord:
    """One committed change event, kept in the log until evicted."""

    replay_id: int
    entity: str
    header: ChangeEventHeader
    fields: Fields

    def cometd(self, channel: str | None = None) -> dict[str, Any]:
        """The CometD message delivering this event on *channel*."""
        schema = base64.urlsafe_b64encode(hashlib.sha256(self.entity.encode()).digest())
        return {
            "data": {
                "schema": schema[:22].decode(),
                "payload": {
                    "ChangeEventHeader": msgspec.to_builtins(self.header),
                    **self.fields,
                },
                "event": {"replayId": self.replay_id},
            },
            "channel": channel or entity_channel(self.entity),
        }


@dataclass(kw_only=True)
class _Change:
    entity: str
    record_id: str
    change_type: ChangeType
    fields: Fields
    changed: tuple[str, ...] = ()
    nulled: tuple[str, ...] = ()


class Transaction:
    """The changes of one write, committed to the log together (`Org.transaction`)."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.changes: list[_Change] = []


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _base62(n: int, width: int) -> str:
    out = []
    for _ in range(width):
        n, r = divmod(n, 62)
        out.append(_BASE62[r])
    return "".join(reversed(out))


class Org:
    """Records, rules and change log of one in-memory org.

    Args:
        rng: source of ids, transaction keys and replay-id steps.
        clock: seconds since the epoch, for ``LastModifiedDate`` and
            ``commitTimestamp``.
        retain_events: how many change events the log keeps.
        on_change: called with each committed change event.
    """

    def __init__(
        self,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        retain_events: int = 10_000,
        on_change: Callable[[ChangeRecord], None] | None = None,
    ) -> None:
        self._rng = rng
        self._clock = clock
        self.on_change = on_change
        self._records: dict[str, dict[str, Fields]] = {name: {} for name in SPECS}
        self._keys: dict[tuple[str, str, str], str] = {}
        #: (object, lookup field) → referenced id → the ids of records pointing
        #: at it: the children of a record without a scan of all records.
        self._refs: dict[tuple[str, str], dict[str, set[str]]] = {}
        #: Record id → creation sequence, to answer in creation order.
        self._order: dict[str, int] = {}
        self._seq = rng.randrange(62**5)
        self.user_id = to_id18("005" + "8c0000" + _base62(rng.randrange(62**6), 6))
        self.org_id = to_id18("00D" + "8c0000" + _base62(rng.randrange(62**6), 6))
        self.standard_pricebook_id = to_id18("01s8c0000" + _base62(1, 6))
        self.log: deque[ChangeRecord] = deque(maxlen=retain_events)
        self.evicted_through = 0
        self.last_replay_id = rng.randrange(10_000, 20_000)
        self._commit_number = rng.randrange(10**12, 10**13)
        self.counts: Counter[str] = Counter()
        created = format_datetime(datetime.fromtimestamp(clock(), UTC))
        self._records["Pricebook2"][self.standard_pricebook_id] = {
            "Id": self.standard_pricebook_id,
            "Name": "Standard Price Book",
            "IsStandard": True,
            "IsActive": True,
            "IsDeleted": False,
            "CreatedDate": created,
            "LastModifiedDate": created,
            "SystemModstamp": created,
        }

    # --- reading ------------------------------------------------------------

    def spec(self, sobject: str) -> ObjectSpec:
        """The object's spec.

        Raises:
            OrgError: 404 ``NOT_FOUND`` for an object the org does not have.
        """
        try:
            return SPECS[sobject]
        except KeyError:
            raise OrgError(
                404, "NOT_FOUND", "The requested resource does not exist"
            ) from None

    def get(self, sobject: str, record_id: str, *, deleted: bool = False) -> Fields:
        """The record with its derived fields (no ``attributes``).

        Raises:
            OrgError: 404 ``NOT_FOUND`` (or ``ENTITY_IS_DELETED``).
        """
        self.spec(sobject)
        stored = self._records[sobject].get(self._norm_id(record_id))
        if stored is None:
            raise OrgError(404, "NOT_FOUND", "The requested resource does not exist")
        if stored.get("IsDeleted") and not deleted:
            raise OrgError(404, "ENTITY_IS_DELETED", "entity is deleted")
        return {**stored, **self._derived(sobject, stored)}

    def find(self, sobject: str, field_name: str, value: str) -> str | None:
        """The id of the live record whose external id *field_name* is *value*."""
        if field_name == "Id":
            rid = self._norm_id(value)
            rec = self._records[sobject].get(rid)
            return rid if rec is not None and not rec.get("IsDeleted") else None
        return self._keys.get((sobject, field_name, value))

    def query(self, query: soql.Query, *, deleted: bool = False) -> list[Fields]:
        """Whole records matching *query*, in its order; the caller projects them.

        Raises:
            OrgError: 400 ``INVALID_TYPE`` or ``INVALID_FIELD``.
        """
        if query.sobject not in SPECS:
            raise OrgError(
                400,
                "INVALID_TYPE",
                f"sObject type '{query.sobject}' is not supported.",
            )
        spec = SPECS[query.sobject]
        names = [*query.fields, *(c.field for c in query.where)]
        if query.order_by:
            names.append(query.order_by)
        for name in names:
            if name not in spec.fields:
                raise OrgError(
                    400,
                    "INVALID_FIELD",
                    f"No such column '{name}' on entity '{spec.name}'.",
                )
        rows: list[dict[str, Any]] = []
        for rec in self._candidates(spec, query):
            if not deleted and rec.get("IsDeleted"):
                continue
            # Derived fields are computed only for rows that need them.
            full: dict[str, Any] | None = None
            for c in query.where:
                if c.field in rec:
                    value = rec[c.field]
                else:
                    if full is None:
                        full = {**rec, **self._derived(spec.name, rec)}
                    value = full.get(c.field)
                if not any(_matches(value, v) for v in c.values):
                    break
            else:
                rows.append(full or {**rec, **self._derived(spec.name, rec)})
        if query.order_by:
            order_by = query.order_by
            rows.sort(
                key=lambda r: _sort_key(r.get(order_by)), reverse=query.descending
            )
        if query.limit is not None:
            rows = rows[: query.limit]
        return rows

    def quote_model(self, quote_id: str) -> dict[str, Any]:
        """The QuoteModel of a quote, as ``SBQQ.QuoteAPI.QuoteReader`` returns it.

        Raises:
            OrgError: 404 ``NOT_FOUND``.
        """
        quote = self.get("SBQQ__Quote__c", quote_id)
        lines = self._lines(quote["Id"])
        keys = {line["Id"]: n for n, line in enumerate(lines, start=1)}
        items = [
            {
                "record": self.with_attributes("SBQQ__QuoteLine__c", line),
                "key": keys[line["Id"]],
                "parentItemKey": keys.get(line.get("SBQQ__RequiredBy__c") or ""),
                "parentGroupKey": None,
                "productQuantityEditable": True,
                "productHasDimensions": False,
                "descriptionLocked": False,
                "amountDiscountProrated": False,
                "configurationType": "Allowed" if line.get("SBQQ__Bundle__c") else None,
            }
            for line in lines
        ]
        customer = sum(
            (
                _dec(x.get("SBQQ__CustomerPrice__c")) * _dec(x.get("SBQQ__Quantity__c"))
                for x in lines
            ),
            Decimal(0),
        )
        return {
            "record": self.with_attributes("SBQQ__Quote__c", quote),
            "lineItems": items,
            "lineItemGroups": [],
            "nextKey": len(lines) + 1,
            "netTotal": quote.get("SBQQ__NetAmount__c", Decimal(0)),
            "netNonSegmentTotal": quote.get("SBQQ__NetAmount__c", Decimal(0)),
            "customerTotal": customer,
            "calculationRequired": False,
        }

    def with_attributes(self, sobject: str, record: Fields) -> Fields:
        """*record* with its ``attributes`` block first, as the REST API renders it."""
        url = f"/services/data/v{API_VERSION}/sobjects/{sobject}/{record.get('Id', '')}"
        return {"attributes": {"type": sobject, "url": url}, **record}

    # --- writing ------------------------------------------------------------

    @contextmanager
    def transaction(self, origin: str = "") -> Iterator[Transaction]:
        """Group writes; their change events are committed together on exit.

        *origin* becomes each event's ``changeOrigin``. Nothing is committed
        if the block raises.
        """
        txn = Transaction(origin)
        yield txn
        self._commit(txn)

    def create(self, txn: Transaction, sobject: str, body: Mapping[str, Any]) -> str:
        """Insert a record; returns its 18-character id.

        Raises:
            OrgError: unknown or read-only field, wrong type, missing required
                field, dangling lookup, or a duplicate ``Broker_Key__c``.
        """
        spec = self.spec(sobject)
        values = self._validate(spec, body, record_id=None)
        missing = [f for f in spec.required if values.get(f) is None]
        _check_required(missing)
        self._seq += 1
        record_id = to_id18(spec.prefix + "8c0000" + _base62(self._seq, 6))
        now = format_datetime(datetime.fromtimestamp(self._clock(), UTC))
        record: Fields = {
            "Id": record_id,
            **{k: v for k, v in values.items() if v is not None},
            "IsDeleted": False,
            "CreatedDate": now,
            "LastModifiedDate": now,
            "SystemModstamp": now,
        }
        self._records[sobject][record_id] = record
        self._order[record_id] = self._seq
        self._index(spec, record_id, {}, record)
        payload = {
            k: v
            for k, v in record.items()
            if k not in ("Id", "IsDeleted", "SystemModstamp")
        }
        txn.changes.append(
            _Change(
                entity=sobject,
                record_id=record_id,
                change_type=ChangeType.CREATE,
                fields=compound_fields(payload),
            )
        )
        self.counts["creates"] += 1
        self._after_write(txn, sobject, record)
        return record_id

    def update(
        self, txn: Transaction, sobject: str, record_id: str, body: Mapping[str, Any]
    ) -> None:
        """PATCH a record: set the given fields; ``null`` clears one.

        Raises:
            OrgError: as `create`, or 404 for a missing record.
        """
        spec = self.spec(sobject)
        record = self._records[sobject].get(self._norm_id(record_id))
        if record is None or record.get("IsDeleted"):
            raise OrgError(404, "NOT_FOUND", "The requested resource does not exist")
        values = self._validate(spec, body, record_id=record["Id"])
        missing = [f for f in spec.required if f in values and values[f] is None]
        _check_required(missing)
        before = dict(record)
        changed = [k for k, v in values.items() if record.get(k) != v]
        for k, v in values.items():
            if v is None:
                record.pop(k, None)
            else:
                record[k] = v
        now = format_datetime(datetime.fromtimestamp(self._clock(), UTC))
        record["LastModifiedDate"] = record["SystemModstamp"] = now
        self._index(spec, record["Id"], before, record)
        payload = {k: values[k] for k in changed}
        payload["LastModifiedDate"] = now
        txn.changes.append(
            _Change(
                entity=sobject,
                record_id=record["Id"],
                change_type=ChangeType.UPDATE,
                fields=compound_fields(payload),
                changed=tuple(
                    change_field_name(k) for k in ("LastModifiedDate", *changed)
                ),
                nulled=tuple(
                    change_field_name(k) for k in changed if values[k] is None
                ),
            )
        )
        self.counts["updates"] += 1
        self._after_write(txn, sobject, record)

    def delete(self, txn: Transaction, sobject: str, record_id: str) -> None:
        """Move a record to the recycle bin (``queryAll`` still returns it).

        Raises:
            OrgError: 404 for a missing record.
        """
        spec = self.spec(sobject)
        record = self._records[sobject].get(self._norm_id(record_id))
        if record is None or record.get("IsDeleted"):
            raise OrgError(404, "NOT_FOUND", "The requested resource does not exist")
        before = dict(record)
        record["IsDeleted"] = True
        self._index(spec, record["Id"], before, {})
        txn.changes.append(
            _Change(
                entity=sobject,
                record_id=record["Id"],
                change_type=ChangeType.DELETE,
                fields={},
            )
        )
        self.counts["deletes"] += 1

    def emit(
        self,
        txn: Transaction,
        sobject: str,
        record_ids: tuple[str, ...],
        change_type: ChangeType,
    ) -> None:
        """Add a header-only event (a gap or overflow) to *txn*."""
        for rid in record_ids or ("",):
            txn.changes.append(
                _Change(
                    entity=sobject, record_id=rid, change_type=change_type, fields={}
                )
            )

    # --- internals ----------------------------------------------------------

    def _norm_id(self, record_id: str) -> str:
        return to_id18(record_id) if is_id(record_id) else record_id

    def _validate(
        self, spec: ObjectSpec, body: Mapping[str, Any], *, record_id: str | None
    ) -> Fields:
        for name in body:
            if name not in spec.fields:
                raise OrgError(
                    400,
                    "INVALID_FIELD",
                    f"No such column '{name}' on sobject of type {spec.name}",
                    (name,),
                )
            if name not in spec.writable:
                raise OrgError(
                    400,
                    "INVALID_FIELD_FOR_INSERT_UPDATE",
                    f"Unable to create/update fields: {name}. Please check the "
                    "security settings of this field and verify that it is "
                    "read/write for your profile or permission set.",
                    (name,),
                )
        try:
            view = msgspec.convert(dict(body), spec.view)
        except msgspec.ValidationError as exc:
            raise OrgError(400, "JSON_PARSER_ERROR", str(exc)) from None
        typed = msgspec.to_builtins(view, builtin_types=(Decimal,))
        values: Fields = {name: typed.get(name) for name in body}
        for name, target in spec.references.items():
            ref = values.get(name)
            if ref is None:
                continue
            rec = self._records[target].get(self._norm_id(ref)) if is_id(ref) else None
            if rec is None or rec.get("IsDeleted"):
                raise OrgError(
                    400,
                    "INVALID_CROSS_REFERENCE_KEY",
                    f"invalid cross reference id: {ref}",
                    (name,),
                )
            values[name] = rec["Id"]
        for name in spec.external_ids:
            value = values.get(name)
            holder = self._keys.get((spec.name, name, value)) if value else None
            if holder is not None and holder != record_id:
                self.counts["duplicates_refused"] += 1
                raise OrgError(
                    400,
                    "DUPLICATE_VALUE",
                    f"duplicate value found: {name} duplicates value on record "
                    f"with id: {holder}",
                    (name,),
                )
        return values

    def _index(
        self, spec: ObjectSpec, record_id: str, before: Fields, after: Fields
    ) -> None:
        for name in spec.external_ids:
            if before.get(name):
                self._keys.pop((spec.name, name, before[name]), None)
            if after.get(name):
                self._keys[(spec.name, name, after[name])] = record_id
        if not after:
            return  # a deleted record keeps its lookups: queryAll still finds it
        for name in spec.references:
            old, new = before.get(name), after.get(name)
            if old == new:
                continue
            index = self._refs.setdefault((spec.name, name), {})
            if isinstance(old, str) and is_id(old):
                index.get(to_id18(old), set()).discard(record_id)
            if isinstance(new, str) and is_id(new):
                index.setdefault(to_id18(new), set()).add(record_id)

    def _children(
        self, sobject: str, field: str, parent_ids: Sequence[Any]
    ) -> list[str]:
        """Ids of *sobject* records whose lookup *field* is one of *parent_ids*."""
        index = self._refs.get((sobject, field), {})
        found: set[str] = set()
        for parent in parent_ids:
            found |= index.get(to_id18(parent), set())
        return sorted(found, key=lambda i: self._order.get(i, -1))

    def _candidates(self, spec: ObjectSpec, query: soql.Query) -> list[Fields]:
        """The records a query's filter must look at: by id or lookup when it can."""
        records = self._records[spec.name]
        for c in query.where:
            if not c.values or not all(
                isinstance(v, str) and is_id(v) for v in c.values
            ):
                continue
            if c.field == "Id":
                ids = {to_id18(v) for v in c.values if isinstance(v, str)}
                ordered = sorted(
                    ids & records.keys(), key=lambda i: self._order.get(i, -1)
                )
                return [records[i] for i in ordered]
            if c.field in spec.references:
                return [
                    records[i] for i in self._children(spec.name, c.field, c.values)
                ]
        return list(records.values())

    def _after_write(self, txn: Transaction, sobject: str, record: Fields) -> None:
        # The CPQ package keeps one primary quote per opportunity and points
        # the opportunity at it, in the same transaction.
        if sobject != "SBQQ__Quote__c" or not record.get("SBQQ__Primary__c"):
            return
        opp_id = record.get("SBQQ__Opportunity2__c")
        if not opp_id:
            return
        quotes = self._records["SBQQ__Quote__c"]
        for other in [
            quotes[i]
            for i in self._children("SBQQ__Quote__c", "SBQQ__Opportunity2__c", [opp_id])
        ]:
            if (
                other["Id"] != record["Id"]
                and other.get("SBQQ__Opportunity2__c") == opp_id
                and other.get("SBQQ__Primary__c")
                and not other.get("IsDeleted")
            ):
                self.update(
                    txn, "SBQQ__Quote__c", other["Id"], {"SBQQ__Primary__c": False}
                )
        opp = self._records["Opportunity"][opp_id]
        if opp.get("SBQQ__PrimaryQuote__c") != record["Id"]:
            self.update(
                txn, "Opportunity", opp_id, {"SBQQ__PrimaryQuote__c": record["Id"]}
            )

    def _lines(self, quote_id: str) -> list[Fields]:
        lines = [
            {**line, **self._derived("SBQQ__QuoteLine__c", line)}
            for line in (
                self._records["SBQQ__QuoteLine__c"][i]
                for i in self._children(
                    "SBQQ__QuoteLine__c", "SBQQ__Quote__c", [quote_id]
                )
            )
            if not line.get("IsDeleted")
        ]
        lines.sort(
            key=lambda x: (_dec(x.get("SBQQ__Number__c")), x["CreatedDate"], x["Id"])
        )
        return lines

    def _derived(self, sobject: str, rec: Fields) -> Fields:
        out: Fields = {}
        if sobject in ("Account", "Contact"):
            for flat, (compound, part) in COMPOUND_OF.items():
                if rec.get(flat) is not None:
                    out.setdefault(compound, {})[part] = rec[flat]
        elif sobject == "Opportunity":
            stage = str(rec.get("StageName", ""))
            out["IsClosed"] = stage.startswith("Closed")
            out["IsWon"] = stage == "Closed Won"
            out["HasOpportunityLineItem"] = any(
                li.get("OpportunityId") == rec["Id"] and not li.get("IsDeleted")
                for li in self._records["OpportunityLineItem"].values()
            )
        elif sobject == "OpportunityLineItem":
            if rec.get("UnitPrice") is not None and rec.get("TotalPrice") is None:
                out["TotalPrice"] = _dec(rec["UnitPrice"]) * _dec(rec.get("Quantity"))
        elif sobject == "SBQQ__QuoteLine__c":
            customer = rec.get("SBQQ__CustomerPrice__c", rec.get("SBQQ__ListPrice__c"))
            net = rec.get("SBQQ__NetPrice__c", customer)
            out["SBQQ__CustomerPrice__c"] = customer
            out["SBQQ__NetPrice__c"] = net
            out["SBQQ__NetTotal__c"] = _dec(net) * _dec(rec.get("SBQQ__Quantity__c"))
        elif sobject == "SBQQ__Quote__c":
            lines = self._lines(rec["Id"])
            out["SBQQ__NetAmount__c"] = sum(
                (x["SBQQ__NetTotal__c"] for x in lines), Decimal(0)
            )
            out["SBQQ__ListAmount__c"] = sum(
                (
                    _dec(x.get("SBQQ__ListPrice__c")) * _dec(x.get("SBQQ__Quantity__c"))
                    for x in lines
                ),
                Decimal(0),
            )
            out["SBQQ__LineItemCount__c"] = Decimal(len(lines))
        return out

    def _commit(self, txn: Transaction) -> None:
        if not txn.changes:
            return
        key = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        self._commit_number += self._rng.randrange(1, 50)
        stamp = int(self._clock() * 1000)
        for seq, change in enumerate(txn.changes, start=1):
            self.last_replay_id += self._rng.randrange(1, 5)
            header = ChangeEventHeader(
                entity_name=change.entity,
                record_ids=(change.record_id,) if change.record_id else (),
                change_type=change.change_type,
                change_origin=txn.origin,
                transaction_key=key,
                sequence_number=seq,
                commit_timestamp=stamp,
                commit_number=self._commit_number,
                commit_user=self.user_id,
                changed_fields=change.changed,
                nulled_fields=change.nulled,
            )
            if len(self.log) == self.log.maxlen:
                self.evicted_through = self.log[0].replay_id
            record = ChangeRecord(
                replay_id=self.last_replay_id,
                entity=change.entity,
                header=header,
                fields=change.fields,
            )
            self.log.append(record)
            self.counts["change_events"] += 1
            if self.on_change is not None:
                self.on_change(record)


def _dec(value: Any) -> Decimal:
    if value is None:
        return Decimal(0)
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _matches(value: Any, literal: soql.Literal) -> bool:
    if literal is None:
        return value is None
    if isinstance(literal, bool):
        return value is literal
    if isinstance(literal, Decimal):
        return (
            value is not None and not isinstance(value, bool) and _dec(value) == literal
        )
    if not isinstance(value, str):
        return False
    if value[:15].lower() != literal[:15].lower():
        return False  # cheap: neither an equal id nor equal text
    if is_id(literal) and is_id(value):
        return to_id18(value) == to_id18(literal)
    # SOQL compares text case-insensitively.
    return value.lower() == literal.lower()


def _sort_key(value: Any) -> tuple[bool, Decimal, str]:
    if isinstance(value, Decimal | int) and not isinstance(value, bool):
        return (value is None, Decimal(value), "")
    return (value is None, Decimal(0), "" if value is None else str(value))


def _check_required(missing: list[str]) -> None:
    """Refuse a write that leaves required fields empty, as an org does."""
    if missing:
        raise OrgError(
            400,
            "REQUIRED_FIELD_MISSING",
            f"Required fields are missing: [{', '.join(missing)}]",
            tuple(missing),
        )
