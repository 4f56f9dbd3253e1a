"""The in-memory org behind `SalesforceSandbox`: records, rules and change log.

It keeps what an org would: records per object with 18-character ids and
the right key prefixes, required and read-only fields, lookups that must
point at live records, the unique ``Broker_Key__c`` external id, soft
deletion (``queryAll`` still sees deleted rows), and a few things the CPQ
package does by itself (line prices and totals, one primary quote per
opportunity). Every committed write appends change events, one per record
touched, sharing the transaction's ``transactionKey``.

`Org` is the one interface and owns the rules of a write; the stored
records, their indexes and derived fields live in `adapters.crm.records`,
and the change log in `adapters.crm.changelog`.

A test double: records are kept for the life of the object. Only the change
log is bounded (``retain_events``); a reader asking for a replay id older
than the oldest retained event is refused, as an org refuses one past its
72-hour retention.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from adapters.crm import soql
from adapters.crm.changelog import ChangeLog, ChangeRecord, Transaction
from adapters.crm.records import Records, as_decimal
from adapters.crm.schema import (
    API_VERSION,
    SPECS,
    Fields,
    ObjectSpec,
    OrgError,
)
from adapters.crm.views import ChangeType, format_datetime, is_id, to_id18

__all__ = ["Org", "ChangeRecord", "Transaction"]


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
        self._records = Records()
        self._seq = rng.randrange(62**5)
        self.user_id = to_id18("005" + "8c0000" + _base62(rng.randrange(62**6), 6))
        self.org_id = to_id18("00D" + "8c0000" + _base62(rng.randrange(62**6), 6))
        self.standard_pricebook_id = to_id18("01s8c0000" + _base62(1, 6))
        self.counts: Counter[str] = Counter()
        self._changes = ChangeLog(
            rng=rng,
            clock=clock,
            retain_events=retain_events,
            user_id=self.user_id,
            counts=self.counts,
            on_change=on_change,
        )
        created = format_datetime(datetime.fromtimestamp(clock(), UTC))
        self._records.by_object["Pricebook2"][self.standard_pricebook_id] = {
            "Id": self.standard_pricebook_id,
            "Name": "Standard Price Book",
            "IsStandard": True,
            "IsActive": True,
            "IsDeleted": False,
            "CreatedDate": created,
            "LastModifiedDate": created,
            "SystemModstamp": created,
        }

    # --- change log ---------------------------------------------------------

    @property
    def log(self) -> deque[ChangeRecord]:
        """The retained change events, oldest first."""
        return self._changes.log

    @property
    def last_replay_id(self) -> int:
        """The replay id of the newest change event."""
        return self._changes.last_replay_id

    @property
    def evicted_through(self) -> int:
        """The replay id of the newest event evicted from `log` (0: none yet)."""
        return self._changes.evicted_through

    @property
    def on_change(self) -> Callable[[ChangeRecord], None] | None:
        """Called with each committed change event."""
        return self._changes.on_change

    @on_change.setter
    def on_change(self, callback: Callable[[ChangeRecord], None] | None) -> None:
        self._changes.on_change = callback

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
        stored = self._records.lookup(sobject, record_id)
        if stored is None:
            raise OrgError(404, "NOT_FOUND", "The requested resource does not exist")
        if stored.get("IsDeleted") and not deleted:
            raise OrgError(404, "ENTITY_IS_DELETED", "entity is deleted")
        return {**stored, **self._records.derived(sobject, stored)}

    def find(self, sobject: str, field_name: str, value: str) -> str | None:
        """The id of the live record whose external id *field_name* is *value*."""
        return self._records.find(sobject, field_name, value)

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
        _check_columns(spec, query)
        for parent in query.parents:
            if parent.relationship not in spec.parents:
                raise _unknown_relationship(
                    "INVALID_FIELD", parent.relationship, "field path"
                )
            target = SPECS[spec.parents[parent.relationship][1]]
            _check_columns(target, soql.Query(fields=(parent.field,), sobject=""))
        for child in query.children:
            if child.sobject not in spec.children:
                raise _unknown_relationship(
                    "INVALID_TYPE", child.sobject, "FROM part of query call"
                )
            _check_columns(SPECS[spec.children[child.sobject][0]], child)
        rows = self._records.select(spec, query, deleted=deleted)
        self._relate(spec, query, rows)
        return rows

    def _relate(self, spec: ObjectSpec, query: soql.Query, rows: list[Fields]) -> None:
        """Put each row's parents and children under their relationship names."""
        for relationship in _by_relationship(query.parents):
            lookup, target = spec.parents[relationship]
            for row in rows:
                parent = self._records.lookup(target, row.get(lookup) or "")
                row[relationship] = (
                    None
                    if parent is None or parent.get("IsDeleted")
                    else {**parent, **self._records.derived(target, parent)}
                )
        ids = tuple(row["Id"] for row in rows)
        for child in query.children:
            child_object, lookup = spec.children[child.sobject]
            found = self._records.select(
                SPECS[child_object],
                msgspec.structs.replace(
                    child,
                    sobject=child_object,
                    where=(soql.Condition(field=lookup, values=ids), *child.where),
                    limit=None,
                ),
                deleted=False,
            )
            grouped: dict[str, list[Fields]] = {}
            for record in found:
                grouped.setdefault(to_id18(record[lookup]), []).append(record)
            for row in rows:
                row[child.sobject] = grouped.get(row["Id"], [])[: child.limit]

    def project(self, query: soql.Query, row: Fields) -> Fields:
        """*row* as the query returns it: the selected fields, parents and children.

        Each record carries its ``attributes``; a parent the lookup does not
        name is ``null``, and so is a child relationship with no rows, as
        the REST API renders them.
        """
        record = self._select(query.sobject, query.fields, row)
        spec = SPECS[query.sobject]
        for relationship, names in _by_relationship(query.parents).items():
            related = row[relationship]
            target = spec.parents[relationship][1]
            record[relationship] = (
                None if related is None else self._select(target, names, related)
            )
        for child in query.children:
            child_object = spec.children[child.sobject][0]
            rows = row[child.sobject]
            record[child.sobject] = (
                {
                    "totalSize": len(rows),
                    "done": True,
                    "records": [
                        self._select(child_object, child.fields, r) for r in rows
                    ],
                }
                if rows
                else None
            )
        return record

    def _select(self, sobject: str, fields: tuple[str, ...], row: Fields) -> Fields:
        record = self.with_attributes(
            sobject, {"Id": row["Id"], **{f: row.get(f) for f in fields}}
        )
        if "Id" not in fields:
            del record["Id"]
        return record

    def quote_model(self, quote_id: str) -> dict[str, Any]:
        """The QuoteModel of a quote, as ``SBQQ.QuoteAPI.QuoteReader`` returns it.

        Raises:
            OrgError: 404 ``NOT_FOUND``.
        """
        quote = self.get("SBQQ__Quote__c", quote_id)
        lines = self._records.lines(quote["Id"])
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
                as_decimal(x.get("SBQQ__CustomerPrice__c"))
                * as_decimal(x.get("SBQQ__Quantity__c"))
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
        self._changes.commit(txn)

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
        self._records.insert(spec, record, seq=self._seq)
        txn.created(sobject, record)
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
        record = self._records.lookup(sobject, record_id)
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
        self._records.index(spec, record["Id"], before, record)
        txn.updated(sobject, record["Id"], values, changed, now)
        self.counts["updates"] += 1
        self._after_write(txn, sobject, record)

    def delete(self, txn: Transaction, sobject: str, record_id: str) -> None:
        """Move a record to the recycle bin (``queryAll`` still returns it).

        Raises:
            OrgError: 404 for a missing record.
        """
        spec = self.spec(sobject)
        record = self._records.lookup(sobject, record_id)
        if record is None or record.get("IsDeleted"):
            raise OrgError(404, "NOT_FOUND", "The requested resource does not exist")
        before = dict(record)
        record["IsDeleted"] = True
        self._records.index(spec, record["Id"], before, {})
        txn.deleted(sobject, record["Id"])
        self.counts["deletes"] += 1

    def emit(
        self,
        txn: Transaction,
        sobject: str,
        record_ids: tuple[str, ...],
        change_type: ChangeType,
        *,
        wire_change_type: str | None = None,
    ) -> None:
        """Add a header-only event (a gap or overflow) to *txn*.

        *wire_change_type*, when given, is the ``changeType`` sent instead.
        """
        txn.header_only(
            sobject, record_ids, change_type, wire_change_type=wire_change_type
        )

    # --- internals ----------------------------------------------------------

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
            rec = self._records.lookup(target, ref) if is_id(ref) else None
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
            holder = self._records.find(spec.name, name, value) if value else None
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

    def _after_write(self, txn: Transaction, sobject: str, record: Fields) -> None:
        # The CPQ package keeps one primary quote per opportunity and points
        # the opportunity at it, in the same transaction.
        if sobject != "SBQQ__Quote__c" or not record.get("SBQQ__Primary__c"):
            return
        opp_id = record.get("SBQQ__Opportunity2__c")
        if not opp_id:
            return
        quotes = self._records.by_object["SBQQ__Quote__c"]
        for other in [
            quotes[i]
            for i in self._records.children(
                "SBQQ__Quote__c", "SBQQ__Opportunity2__c", [opp_id]
            )
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
        opp = self._records.by_object["Opportunity"][opp_id]
        if opp.get("SBQQ__PrimaryQuote__c") != record["Id"]:
            self.update(
                txn, "Opportunity", opp_id, {"SBQQ__PrimaryQuote__c": record["Id"]}
            )


def _by_relationship(
    parents: tuple[soql.ParentField, ...],
) -> dict[str, tuple[str, ...]]:
    """The parent fields of a select list, by relationship, in their order."""
    grouped: dict[str, tuple[str, ...]] = {}
    for parent in parents:
        grouped[parent.relationship] = (
            *grouped.get(parent.relationship, ()),
            parent.field,
        )
    return grouped


def _unknown_relationship(code: str, name: str, where: str) -> OrgError:
    """The org's refusal of a relationship it does not have, in its words."""
    return OrgError(
        400,
        code,
        f"Didn't understand relationship '{name}' in {where}. If you are"
        " attempting to use a custom relationship, be sure to append the '__r'"
        " after the custom relationship name.",
    )


def _check_columns(spec: ObjectSpec, query: soql.Query) -> None:
    """Every field *query* names (select list, filter, order) is one of *spec*'s."""
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


def _check_required(missing: list[str]) -> None:
    """Refuse a write that leaves required fields empty, as an org does."""
    if missing:
        raise OrgError(
            400,
            "REQUIRED_FIELD_MISSING",
            f"Required fields are missing: [{', '.join(missing)}]",
            tuple(missing),
        )
