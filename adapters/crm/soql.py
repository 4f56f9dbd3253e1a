"""The small subset of SOQL the Salesforce sandbox answers, and a builder for it.

Accepted: ``SELECT f1, f2 FROM Type [WHERE cond [AND cond ...]] [ORDER BY f
[ASC|DESC]] [LIMIT n]`` where each condition is ``Field = literal`` or
``Field IN (literal, ...)`` and a literal is a quoted string, ``true``,
``false``, ``null`` or a number. Anything else (relationship fields,
subqueries, ``OR``, functions) is a ``MALFORMED_QUERY``, as an org would
answer for text it cannot parse.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from decimal import Decimal

import msgspec

__all__ = ["Query", "Condition", "Literal", "SoqlError", "parse", "quote", "select"]

Literal = str | bool | Decimal | None


class SoqlError(ValueError):
    """The text is outside the supported subset."""


class Condition(msgspec.Struct, frozen=True, kw_only=True):
    """``field = value`` (one value) or ``field IN (values)``."""

    field: str
    values: tuple[Literal, ...]


class Query(msgspec.Struct, frozen=True, kw_only=True):
    """A parsed query."""

    fields: tuple[str, ...]
    sobject: str
    where: tuple[Condition, ...] = ()
    order_by: str | None = None
    descending: bool = False
    limit: int | None = None


_QUERY = re.compile(
    r"""^\s*SELECT\s+(?P<fields>[\w\s,]+?)\s+FROM\s+(?P<sobject>\w+)
    (?:\s+WHERE\s+(?P<where>.+?))?
    (?:\s+ORDER\s+BY\s+(?P<order>\w+)(?:\s+(?P<dir>ASC|DESC))?)?
    (?:\s+LIMIT\s+(?P<limit>\d+))?\s*$""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)
_LITERAL = r"'(?:[^'\\]|\\.)*'|true|false|null|-?\d+(?:\.\d+)?"
_CONDITION = re.compile(
    rf"""\s*(?P<field>\w+)\s*(?:
        =\s*(?P<value>{_LITERAL})
      | IN\s*\((?P<values>\s*(?:{_LITERAL})(?:\s*,\s*(?:{_LITERAL}))*\s*)\)
    )\s*""",
    re.IGNORECASE | re.VERBOSE,
)
_AND = re.compile(r"\s+AND\s+", re.IGNORECASE)
_ITEM = re.compile(_LITERAL, re.IGNORECASE)
_FIELD = re.compile(r"\w+")


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
    m = _QUERY.match(text)
    if m is None:
        raise SoqlError(f"unsupported or malformed query: {text[:200]!r}")
    fields = tuple(f.strip() for f in m["fields"].split(","))
    if not all(_FIELD.fullmatch(f) for f in fields):
        raise SoqlError(f"unsupported field list: {m['fields']!r}")
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
        fields=fields,
        sobject=m["sobject"],
        where=tuple(where),
        order_by=m["order"],
        descending=(m["dir"] or "").upper() == "DESC",
        limit=int(m["limit"]) if m["limit"] else None,
    )


def quote(value: str) -> str:
    """A SOQL string literal: quoted, with quotes and backslashes escaped."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


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
