"""The sandbox org's stored records: indexes, derived fields and query evaluation.

Internal to `adapters.crm.org`. `Records` keeps the rows of every object as
they were written, the indexes that answer an external id, an id or a lookup
without a scan of all records, and the creation order that queries answer
in. What an org computes rather than stores (compound addresses, ``IsWon``,
line and quote totals of the CPQ package) is derived here on read. `Org`
decides what may be written and records the change events; this module
only stores and reads, so it knows nothing of transactions or rules.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from adapters.crm import soql
from adapters.crm.schema import COMPOUND_OF, SPECS, Fields, ObjectSpec
from adapters.crm.views import is_id, to_id18

__all__ = ["Records", "as_decimal"]


class Records:
    """The records of one org, by object and id, with their indexes.

    Rows are stored without their derived fields; `derived` adds them.
    Deleted rows stay (``IsDeleted``), as ``queryAll`` still sees them.
    """

    def __init__(self) -> None:
        #: Object name → record id → stored fields.
        self.by_object: dict[str, dict[str, Fields]] = {name: {} for name in SPECS}
        self._keys: dict[tuple[str, str, str], str] = {}
        #: (object, lookup field) → referenced id → the ids of records pointing
        #: at it: the children of a record without a scan of all records.
        self._refs: dict[tuple[str, str], dict[str, set[str]]] = {}
        #: Record id → creation sequence, to answer in creation order.
        self._order: dict[str, int] = {}

    def lookup(self, sobject: str, record_id: str) -> Fields | None:
        """The stored record *record_id* (15 or 18 characters), deleted or not."""
        return self.by_object[sobject].get(_norm_id(record_id))

    def find(self, sobject: str, field_name: str, value: str) -> str | None:
        """The id of the live record whose external id *field_name* is *value*."""
        if field_name == "Id":
            rid = _norm_id(value)
            rec = self.by_object[sobject].get(rid)
            return rid if rec is not None and not rec.get("IsDeleted") else None
        return self._keys.get((sobject, field_name, value))

    def insert(self, spec: ObjectSpec, record: Fields, *, seq: int) -> None:
        """Store a new *record* created as number *seq*, and index it."""
        record_id = record["Id"]
        self.by_object[spec.name][record_id] = record
        self._order[record_id] = seq
        self.index(spec, record_id, {}, record)

    def index(
        self, spec: ObjectSpec, record_id: str, before: Fields, after: Fields
    ) -> None:
        """Move a record's external ids and lookups from *before* to *after*.

        An empty *after* is a deletion: the external ids are freed, the
        lookups kept.
        """
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

    def children(
        self, sobject: str, field: str, parent_ids: Sequence[Any]
    ) -> list[str]:
        """Ids of *sobject* records whose lookup *field* is one of *parent_ids*."""
        index = self._refs.get((sobject, field), {})
        found: set[str] = set()
        for parent in parent_ids:
            found |= index.get(to_id18(parent), set())
        return sorted(found, key=lambda i: self._order.get(i, -1))

    def select(
        self, spec: ObjectSpec, query: soql.Query, *, deleted: bool
    ) -> list[Fields]:
        """Whole records of *spec* matching *query*, in its order.

        The query's fields must already be known to be fields of *spec*.
        """
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
                        full = {**rec, **self.derived(spec.name, rec)}
                    value = full.get(c.field)
                if not any(_matches(value, v) for v in c.values):
                    break
            else:
                rows.append(full or {**rec, **self.derived(spec.name, rec)})
        if query.order_by:
            order_by = query.order_by
            rows.sort(
                key=lambda r: _sort_key(r.get(order_by)), reverse=query.descending
            )
        if query.limit is not None:
            rows = rows[: query.limit]
        return rows

    def lines(self, quote_id: str) -> list[Fields]:
        """The live lines of a quote with their derived fields, in line order."""
        lines = [
            {**line, **self.derived("SBQQ__QuoteLine__c", line)}
            for line in (
                self.by_object["SBQQ__QuoteLine__c"][i]
                for i in self.children(
                    "SBQQ__QuoteLine__c", "SBQQ__Quote__c", [quote_id]
                )
            )
            if not line.get("IsDeleted")
        ]
        lines.sort(
            key=lambda x: (
                as_decimal(x.get("SBQQ__Number__c")),
                x["CreatedDate"],
                x["Id"],
            )
        )
        return lines

    def derived(self, sobject: str, rec: Fields) -> Fields:
        """The fields an org computes for *rec* rather than stores."""
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
                for li in self.by_object["OpportunityLineItem"].values()
            )
        elif sobject == "OpportunityLineItem":
            if rec.get("UnitPrice") is not None and rec.get("TotalPrice") is None:
                out["TotalPrice"] = as_decimal(rec["UnitPrice"]) * as_decimal(
                    rec.get("Quantity")
                )
        elif sobject == "SBQQ__QuoteLine__c":
            customer = rec.get("SBQQ__CustomerPrice__c", rec.get("SBQQ__ListPrice__c"))
            net = rec.get("SBQQ__NetPrice__c", customer)
            out["SBQQ__CustomerPrice__c"] = customer
            out["SBQQ__NetPrice__c"] = net
            out["SBQQ__NetTotal__c"] = as_decimal(net) * as_decimal(
                rec.get("SBQQ__Quantity__c")
            )
        elif sobject == "SBQQ__Quote__c":
            lines = self.lines(rec["Id"])
            out["SBQQ__NetAmount__c"] = sum(
                (x["SBQQ__NetTotal__c"] for x in lines), Decimal(0)
            )
            out["SBQQ__ListAmount__c"] = sum(
                (
                    as_decimal(x.get("SBQQ__ListPrice__c"))
                    * as_decimal(x.get("SBQQ__Quantity__c"))
                    for x in lines
                ),
                Decimal(0),
            )
            out["SBQQ__LineItemCount__c"] = Decimal(len(lines))
        return out

    def _candidates(self, spec: ObjectSpec, query: soql.Query) -> list[Fields]:
        """The records a query's filter must look at: by id or lookup when it can."""
        records = self.by_object[spec.name]
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
                return [records[i] for i in self.children(spec.name, c.field, c.values)]
        return list(records.values())


def as_decimal(value: Any) -> Decimal:
    """*value* as a Decimal; ``None`` (an empty number field) counts as 0."""
    if value is None:
        return Decimal(0)
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _norm_id(record_id: str) -> str:
    return to_id18(record_id) if is_id(record_id) else record_id


def _matches(value: Any, literal: soql.Literal) -> bool:
    if literal is None:
        return value is None
    if isinstance(literal, bool):
        return value is literal
    if isinstance(literal, Decimal):
        return (
            value is not None
            and not isinstance(value, bool)
            and as_decimal(value) == literal
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
