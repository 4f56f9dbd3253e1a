"""The small subset of SOQL the Salesforce sandbox answers, and a builder for it.

Accepted: ``SELECT f1, f2 FROM Type [WHERE cond [AND cond ...]] [ORDER BY f
[ASC|DESC]] [LIMIT n]`` where each condition is ``Field = literal`` or
``Field IN (literal, ...)`` and a literal is a quoted string, ``true``,
``false``, ``null`` or a number. The select list may also name

* a parent's field through a lookup, one level up: ``Account.Name`` on an
  Opportunity (the lookup ``AccountId``; a custom ``X__c`` is ``X__r``);
* a child relationship as a subquery: ``(SELECT f1, f2 FROM SBQQ__LineItems__r
  [WHERE ...] [ORDER BY f] [LIMIT n])``, itself without relationships.

So one request reads a record with its parent and children, as integrations
do to stay within an org's API request limits. Anything else (``OR``,
functions, deeper paths, nested subqueries) is a ``MALFORMED_QUERY``, as an
org would answer for text it cannot parse.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal

import msgspec

__all__ = [
    "Query",
    "Condition",
    "Literal",
    "ParentField",
    "SoqlError",
    "parse",
    "quote",
    "select",
    "subquery",
]

Literal = str | bool | Decimal | None


class SoqlError(ValueError):
    """The text is outside the supported subset."""


class Condition(msgspec.Struct, frozen=True, kw_only=True):
    """``field = value`` (one value) or ``field IN (values)``."""

    field: str
    values: tuple[Literal, ...]


class ParentField(msgspec.Struct, frozen=True, kw_only=True):
    """``relationship.field`` in a select list: a field of the record a lookup names."""

    relationship: str
    field: str


class Query(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed query; in a subquery, ``sobject`` is the child relationship's name."""

    fields: tuple[str, ...]
    sobject: str
    where: tuple[Condition, ...] = ()
    order_by: str | None = None
    descending: bool = False
    limit: int | None = None
    parents: tuple[ParentField, ...] = ()
    children: tuple[Query, ...] = ()


_QUERY = re.compile(
    r"""^\s*FROM\s+(?P<sobject>\w+)
    (?:\s+WHERE\s+(?P<where>.+?))?
    (?:\s+ORDER\s+BY\s+(?P<order>\w+)(?:\s+(?P<dir>ASC|DESC))?)?
    (?:\s+LIMIT\s+(?P<limit>\d+))?\s*$""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_QUOTED = r"'(?:[^'\\]|\\.)*'"
_LITERAL = rf"{_QUOTED}|true|false|null|-?\d+(?:\.\d+)?"
_CONDITION = re.compile(
    rf"""\s*(?P<field>\w+)\s*(?:
        =\s*(?P<value>{_LITERAL})
      | IN\s*\((?P<values>\s*(?:{_LITERAL})(?:\s*,\s*(?:{_LITERAL}))*\s*)\)
    )\s*""",
    re.IGNORECASE | re.VERBOSE,
)
_AND = re.compile(r"\s+AND\s+", re.IGNORECASE)
_ITEM = re.compile(_LITERAL, re.IGNORECASE)
_SELECT = re.compile(r"^\s*SELECT\s+(?P<items>.+)$", re.IGNORECASE | re.DOTALL)
_FIELD = re.compile(r"\w+")
_PARENT_FIELD = re.compile(r"(?P<relationship>\w+)\.(?P<field>\w+)")
_SUBQUERY = re.compile(r"\(\s*(?P<text>SELECT\s.*)\)", re.IGNORECASE | re.DOTALL)
#: What the select list is cut at, and what hides a cut from it (quotes, parentheses).
_TOKEN = re.compile(rf"{_QUOTED}|[(),]|\sFROM\s", re.IGNORECASE)


def _literal(text: str) -> Literal:
    low = text.lower()
    if text.startswith("'"):
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    if low in ("true", "false"):
        return low == "true"
    if low == "null":
        return None
    return Decimal(text)


def parse(text: str) -> Query:
    """Parse *text*.

    Raises:
        SoqlError: outside the supported subset.
    """
    select_list, rest = _split_from(text)
    head = _SELECT.match(select_list)
    m = _QUERY.match(rest)
    if head is None or m is None:
        raise SoqlError(f"unsupported or malformed query: {text[:200]!r}")
    fields: list[str] = []
    parents: list[ParentField] = []
    children: list[Query] = []
    for item in _top_level_items(head["items"]):
        if _FIELD.fullmatch(item):
            fields.append(item)
        elif p := _PARENT_FIELD.fullmatch(item):
            parents.append(
                ParentField(relationship=p["relationship"], field=p["field"])
            )
        elif (sub := _SUBQUERY.fullmatch(item)) is not None:
            child = parse(sub["text"])
            if child.parents or child.children:
                raise SoqlError(f"a subquery cannot reach further: {item[:200]!r}")
            children.append(child)
        else:
            raise SoqlError(f"unsupported field list item: {item[:200]!r}")
    where: list[Condition] = []
    if m["where"]:
        for part in _AND.split(m["where"]):
            c = _CONDITION.fullmatch(part)
            if c is None:
                raise SoqlError(f"unsupported condition: {part!r}")
            if c["value"] is not None:
                values: tuple[Literal, ...] = (_literal(c["value"]),)
            else:
                values = tuple(_literal(v) for v in _ITEM.findall(c["values"]))
            where.append(Condition(field=c["field"], values=values))
    return Query(
        fields=tuple(fields),
        sobject=m["sobject"],
        where=tuple(where),
        order_by=m["order"],
        descending=(m["dir"] or "").upper() == "DESC",
        limit=int(m["limit"]) if m["limit"] else None,
        parents=tuple(parents),
        children=tuple(children),
    )


def _top_level(text: str) -> Iterator[re.Match[str]]:
    """The commas and ``FROM``s of *text* outside quotes and parentheses, in order.

    Raises:
        SoqlError: a parenthesis closed that was not open.
    """
    depth = 0
    for token in _TOKEN.finditer(text):
        match token[0]:
            case "(":
                depth += 1
            case ")":
                depth -= 1
                if depth < 0:
                    raise SoqlError(f"unsupported or malformed query: {text[:200]!r}")
            case t if depth == 0 and not t.startswith("'"):
                yield token


def _split_from(text: str) -> tuple[str, str]:
    """*text* cut before its own ``FROM``: the select list, and the rest.

    Raises:
        SoqlError: no ``FROM`` outside parentheses, or unbalanced parentheses.
    """
    for token in _top_level(text):
        if token[0] != ",":
            return text[: token.start()], text[token.start() :]
    raise SoqlError(f"unsupported or malformed query: {text[:200]!r}")


def _top_level_items(select_list: str) -> list[str]:
    """The comma-separated items of a select list; a subquery is one item."""
    items: list[str] = []
    start = 0
    for token in _top_level(select_list):
        items.append(select_list[start : token.start()].strip())
        start = token.end()
    items.append(select_list[start:].strip())
    return items


def quote(value: str) -> str:
    """A SOQL string literal: quoted, with quotes and backslashes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def subquery(
    relationship: str,
    fields: Sequence[str],
    *,
    order_by: str | None = None,
) -> str:
    """A child relationship's subquery, as an item of `select`'s *fields*."""
    text = f"(SELECT {', '.join(fields)} FROM {relationship}"
    if order_by:
        text += f" ORDER BY {order_by}"
    return text + ")"


def select(
    sobject: str,
    fields: Sequence[str],
    where: Mapping[str, str | bool | Sequence[str]] | None = None,
    *,
    order_by: str | None = None,
    limit: int | None = None,
) -> str:
    """Build a query in the supported subset, quoting every value.

    A string or bool value becomes ``=``; a sequence becomes ``IN (...)``.
    *fields* may hold parent fields (``Account.Name``) and `subquery` items.
    """
    text = f"SELECT {', '.join(fields)} FROM {sobject}"
    conditions = []
    for field, value in (where or {}).items():
        if isinstance(value, bool):
            conditions.append(f"{field} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            conditions.append(f"{field} = {quote(value)}")
        else:
            conditions.append(f"{field} IN ({', '.join(quote(v) for v in value)})")
    if conditions:
        text += " WHERE " + " AND ".join(conditions)
    if order_by:
        text += f" ORDER BY {order_by}"
    if limit is not None:
        text += f" LIMIT {limit}"
    return text
