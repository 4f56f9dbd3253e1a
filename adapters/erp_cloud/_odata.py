"""Server-side OData V2 plumbing for the sandbox: rendering, errors, queries.

Internal: used by the sandbox modules only. It renders views the way SAP
Gateway does (``__metadata`` on every entity, ``__deferred`` for navigation
properties not expanded), answers with SAP's error body, reads the subset of
the query options the sandbox supports (``$filter`` as ``Field eq 'value'``
terms joined by ``and``; ``$top``, ``$skip``, ``$inlinecount``, ``$expand``)
and checks request bodies against the limits the views declare.

A handler that refuses a request raises `Refused`; the dispatcher turns it
into the error response of the service at hand.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Generic, Protocol, TypeVar

import msgspec
from aiohttp import web

from adapters.erp_cloud import edm
from adapters.erp_cloud.views import (
    ErrorApplication,
    ErrorDetail,
    ErrorMessage,
    InnerError,
    ODataError,
    ODataErrorBody,
    expanded,
    field_limits,
)

__all__ = [
    "EntitySpec",
    "Record",
    "Refused",
    "Query",
    "Clock",
    "alpha",
    "render",
    "entity_uri",
    "json_response",
    "error_response",
    "read_one",
    "read_many",
    "MAX_PAGE_SIZE",
    "body_of",
    "convert",
    "changes",
    "detail",
    "invalid",
    "parse_filter",
    "parse_key",
    "PreconditionCounters",
    "check_if_match",
    "matches",
    "nav_entries",
    "check_limits",
]


@functools.cache
def _fields(view: type[Any]) -> tuple[msgspec.structs.FieldInfo, ...]:
    """A view's fields (resolving a Struct's annotations is slow: once per view)."""
    return msgspec.structs.fields(view)


E = TypeVar("E", bound=msgspec.Struct)
_TERM = re.compile(r"\s*(\w+)\s+eq\s+'((?:[^']|'')*)'\s*")
_KEY_PART = re.compile(r"(?:(\w+)=)?'((?:[^']|'')*)'")


@dataclass(frozen=True, kw_only=True)
class EntitySpec:
    """How one entity type is addressed and rendered.

    Attributes:
        set_name: the entity set (``A_SalesOrderItem``).
        type_name: ``__metadata.type`` (``API_SALES_ORDER_SRV.A_SalesOrderItemType``).
        keys: key properties, in URI order.
        view: the view Struct the entities are held in.
        many: to-many navigation properties and their entity specs.
        one: to-one navigation properties and their entity specs.
    """

    set_name: str
    type_name: str
    keys: tuple[str, ...]
    view: type[msgspec.Struct]
    many: Mapping[str, EntitySpec] = field(default_factory=dict)
    one: Mapping[str, EntitySpec] = field(default_factory=dict)

    @property
    def navigations(self) -> frozenset[str]:
        """Every navigation property name."""
        return frozenset(self.many) | frozenset(self.one)


@dataclass(kw_only=True)
class Record(Generic[E]):
    """A stored entity with the instant of its last change (its ETag)."""

    entity: E
    changed_at: datetime

    @property
    def etag(self) -> str:
        """``W/"datetimeoffset'…'"``."""
        return edm.etag_for(self.changed_at)


class Refused(Exception):
    """Raised by a handler to answer with SAP's error body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: Sequence[ErrorDetail] = (),
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = tuple(details)


#: The request key under which the sandbox puts its page size (`read_many`).
MAX_PAGE_SIZE = web.RequestKey("max_page_size", int)


@dataclass(frozen=True, kw_only=True)
class Query:
    """The query options of one read."""

    terms: list[tuple[str, str]]
    top: int | None = None
    skip: int = 0
    inlinecount: bool = False
    expand: frozenset[str] = frozenset()

    @classmethod
    def of(cls, request: web.Request, spec: EntitySpec) -> Query:
        """Read ``$filter``, ``$top``, ``$skip``, ``$inlinecount``, ``$expand``.

        ``$skiptoken`` (the server's own paging, see `read_many`) is read as
        a ``$skip``.

        Raises:
            Refused: an unsupported filter, a bad number, an unknown property.
        """
        params = request.query
        try:
            terms = parse_filter(params["$filter"]) if "$filter" in params else []
            top = int(params["$top"]) if "$top" in params else None
            skip = int(params.get("$skiptoken", params.get("$skip", "0")))
        except ValueError as exc:
            raise Refused(400, "ZQ2C_SANDBOX/002", str(exc)) from exc
        if (top is not None and top < 0) or skip < 0:
            raise Refused(400, "ZQ2C_SANDBOX/002", "$top and $skip must be ≥ 0")
        names = {f.encode_name for f in _fields(spec.view)}
        for name, _ in terms:
            if name not in names:
                raise Refused(
                    400,
                    "ZQ2C_SANDBOX/003",
                    f"Property {name} not found in type {spec.type_name}",
                )
        expand: set[str] = set()
        for path in filter(None, params.get("$expand", "").split(",")):
            parts = path.strip().split("/")
            expand.update("/".join(parts[: n + 1]) for n in range(len(parts)))
        return cls(
            terms=terms,
            top=top,
            skip=skip,
            inlinecount=params.get("$inlinecount") == "allpages",
            expand=frozenset(expand),
        )


class Clock:
    """Change instants that strictly increase, so no two ETags are equal."""

    def __init__(self) -> None:
        self._last = datetime(2000, 1, 1, tzinfo=UTC)

    def tick(self) -> datetime:
        """Now, or just after the previous tick when the clock has not moved."""
        now = datetime.now(UTC)
        if now <= self._last:
            now = self._last + timedelta(microseconds=1)
        self._last = now
        return now


def alpha(key: str) -> str:
    """SAP's ALPHA conversion, output side: ``"0005200000"`` → ``"5200000"``."""
    return str(int(key)) if key.isdigit() else key


# --- rendering ------------------------------------------------------------------


def entity_uri(base: str, spec: EntitySpec, entity: msgspec.Struct) -> str:
    """The URI of *entity*: ``<base>/Set('k')`` or ``<base>/Set(K1='a',K2='b')``."""
    values = [str(getattr(entity, k) or "") for k in spec.keys]
    if len(values) == 1:
        key = edm.odata_literal(values[0])
    else:
        pairs = zip(spec.keys, values, strict=True)
        key = ",".join(f"{k}={edm.odata_literal(v)}" for k, v in pairs)
    return f"{base}/{spec.set_name}({key})"


def render(
    base: str,
    spec: EntitySpec,
    entity: msgspec.Struct,
    *,
    expand: frozenset[str] = frozenset(),
    etag: str | None = None,
    path: str = "",
) -> dict[str, Any]:
    """*entity* as SAP writes it: every property, ``__metadata``, navigations.

    A navigation named in *expand* (``to_Item``, ``to_Item/to_PricingElement``)
    is written inline; any other is ``{"__deferred": {"uri": ...}}``. An
    entity written inline keeps the ETag its own ``metadata`` carries.
    """
    uri = entity_uri(base, spec, entity)
    meta: dict[str, Any] = {"id": uri, "uri": uri, "type": spec.type_name}
    if etag is not None:
        meta["etag"] = etag
    out: dict[str, Any] = {"__metadata": meta}
    for info in _fields(spec.view):
        name = info.encode_name
        if name != "__metadata" and name not in spec.navigations:
            out[name] = edm.to_builtins(getattr(entity, info.name))
    for name, child in spec.many.items():
        if f"{path}{name}" in expand:
            out[name] = {
                "results": [
                    render(
                        base,
                        child,
                        c,
                        expand=expand,
                        etag=_etag_of(c),
                        path=f"{path}{name}/",
                    )
                    for c in expanded(getattr(entity, name))
                ]
            }
        else:
            out[name] = {"__deferred": {"uri": f"{uri}/{name}"}}
    for name, child in spec.one.items():
        target = getattr(entity, name)
        if f"{path}{name}" in expand and target is not None:
            inner = f"{path}{name}/"
            out[name] = render(base, child, target, expand=expand, path=inner)
        else:
            out[name] = {"__deferred": {"uri": f"{uri}/{name}"}}
    return out


def _etag_of(entity: msgspec.Struct) -> str | None:
    metadata = getattr(entity, "metadata", None)
    etag = getattr(metadata, "etag", None)
    return etag if isinstance(etag, str) else None


def json_response(
    payload: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON answer with SAP Gateway's headers."""
    return web.Response(
        status=status,
        body=edm.encode(payload),
        content_type="application/json",
        charset="utf-8",
        headers={"dataserviceversion": "2.0", **(headers or {})},
    )


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    service: str,
    details: Sequence[ErrorDetail] = (),
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """SAP's OData error body, ``{"error": {...}}``, with *status*."""
    now = datetime.now(UTC)
    component = "SD-SLS-API" if service == "API_SALES_ORDER_SRV" else "LO-MD-BP"
    body = ODataError(
        error=ODataErrorBody(
            code=code,
            message=ErrorMessage(lang="en", value=message),
            innererror=InnerError(
                application=ErrorApplication(
                    component_id=component,
                    service_namespace="/SAP/",
                    service_id=service,
                    service_version="0001",
                ),
                transactionid=uuid.uuid4().hex.upper(),
                timestamp=now.strftime("%Y%m%d%H%M%S.") + f"{now.microsecond:06d}0",
                Error_Resolution={
                    "SAP_Transaction": "Search the gateway error log for the "
                    "transaction id and timestamp above",
                },
                errordetails=tuple(details),
            ),
        )
    )
    return json_response(body, status=status, headers=headers)


def read_one(
    request: web.Request, base: str, spec: EntitySpec, found: Record[Any] | Any
) -> web.Response:
    """``{"d": <entity>}``, with an ``ETag`` header for a `Record`."""
    query = Query.of(request, spec)
    if isinstance(found, Record):
        body = render(base, spec, found.entity, expand=query.expand, etag=found.etag)
        return json_response({"d": body}, headers={"ETag": found.etag})
    return json_response({"d": render(base, spec, found, expand=query.expand)})


def read_many(
    request: web.Request,
    base: str,
    spec: EntitySpec,
    table: Mapping[str, Record[Any] | Any],
    *,
    finish: Callable[[Record[Any]], Record[Any]] | None = None,
) -> web.Response:
    """``{"d": {"results": [...]}}`` of the rows of *table* the query selects.

    Rows are filtered first, and only the page returned gets *finish* (for
    example, joining a navigation property) and its ETag: a read by key
    field stays a cheap scan however large the table grows.

    Server-driven paging, as SAP Gateway does it: when more rows are
    selected than ``request[MAX_PAGE_SIZE]`` (set by the sandbox from its
    knob), the page is cut there and ``__next`` links the rest, with a
    ``$skiptoken``.
    """
    query = Query.of(request, spec)
    selected = [
        r
        for r in table.values()
        if matches(r.entity if isinstance(r, Record) else r, query.terms)
    ]
    end = len(selected) if query.top is None else query.skip + query.top
    max_page = request.get(MAX_PAGE_SIZE)
    cut = max_page is not None and min(end, len(selected)) - query.skip > max_page
    if cut:
        assert max_page is not None
        end = query.skip + max_page
    results = []
    for row in selected[query.skip : end]:
        if isinstance(row, Record):
            done = finish(row) if finish is not None else row
            rendered = render(
                base, spec, done.entity, expand=query.expand, etag=done.etag
            )
        else:
            rendered = render(base, spec, row, expand=query.expand, etag=None)
        results.append(rendered)
    d: dict[str, Any] = {"results": results}
    if query.inlinecount:
        d["__count"] = str(len(selected))
    if cut:
        params = {k: v for k, v in request.query.items() if k != "$skip"}
        params["$skiptoken"] = str(end)
        if query.top is not None:
            params["$top"] = str(query.top - (end - query.skip))
        d["__next"] = str(request.url.with_query(params))
    return json_response({"d": d})


# --- request bodies ---------------------------------------------------------------


def detail(number: str, message: str, target: str) -> ErrorDetail:
    """An ``errordetails`` entry in the sandbox's message class."""
    code = f"ZQ2C_SANDBOX/{number}"
    return ErrorDetail(code=code, message=message, propertyref=target, target=target)


def invalid(problems: Sequence[ErrorDetail]) -> Refused:
    """A 400 naming the first problem, with all of them as ``errordetails``."""
    return Refused(400, problems[0].code, problems[0].message, details=problems)


async def body_of(request: web.Request, spec: EntitySpec) -> dict[str, Any]:
    """The JSON object in the request, unwrapped from ``{"d": ...}`` if wrapped.

    Every property is checked against the limits *spec*'s view declares.

    Raises:
        Refused: not a JSON object, or some property beyond its limit.
    """
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError as exc:
        raise Refused(400, "ZQ2C_SANDBOX/001", f"Malformed JSON body: {exc}") from exc
    if isinstance(body, dict) and len(body) == 1 and isinstance(body.get("d"), dict):
        body = body["d"]
    if not isinstance(body, dict):
        raise Refused(400, "ZQ2C_SANDBOX/001", "The body must be a JSON object")
    problems: list[ErrorDetail] = []
    check_limits(body, spec, target=spec.set_name, out=problems)
    if problems:
        raise invalid(problems)
    return body


def convert(raw: Mapping[str, Any], view: type[E]) -> E:
    """*raw* as *view*.

    Raises:
        Refused: a property of the wrong type.
    """
    try:
        return edm.convert(raw, view)
    except msgspec.ValidationError as exc:
        raise Refused(400, "ZQ2C_SANDBOX/001", f"Invalid request body: {exc}") from exc


def changes(raw: Mapping[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """The properties a PATCH sets (``__metadata`` ignored).

    Raises:
        Refused: a property outside *allowed* (keys, read-only fields).
    """
    wanted = {k: v for k, v in raw.items() if k != "__metadata"}
    refused = sorted(set(wanted) - allowed)
    if refused:
        raise invalid(
            [detail("014", f"Property {n} cannot be changed", n) for n in refused]
        )
    return wanted


class PreconditionCounters(Protocol):
    """Where `check_if_match` counts the changes it refuses (the sandbox's counters)."""

    precondition_required: int
    precondition_failed: int


def check_if_match(
    request: web.Request, record: Record[Any], counters: PreconditionCounters
) -> None:
    """Optimistic locking: 428 without ``If-Match``, 412 when it is stale.

    Raises:
        Refused: the precondition is missing or failed.
    """
    given = (request.headers.get("If-Match") or "").strip()
    if not given:
        counters.precondition_required += 1
        raise Refused(
            428,
            "ZQ2C_SANDBOX/051",
            "This change needs an If-Match header with the entity's ETag",
        )
    if given != "*" and given != record.etag:
        counters.precondition_failed += 1
        raise Refused(
            412,
            "ZQ2C_SANDBOX/050",
            "The entity was changed since it was read (ETag mismatch)",
        )


def parse_key(text: str) -> str:
    """The key of ``Set('k')``; a compound key's values are joined with ``/``.

    Raises:
        Refused: not a key predicate.
    """
    parts = _KEY_PART.findall(text)
    if not parts:
        raise Refused(404, "ZQ2C_SANDBOX/040", f"Invalid key predicate ({text})")
    return "/".join(value.replace("''", "'") for _, value in parts)


def parse_filter(text: str) -> list[tuple[str, str]]:
    """``A eq 'x' and B eq 'y'`` → ``[("A", "x"), ("B", "y")]``.

    Raises:
        ValueError: any other ``$filter`` form (the sandbox supports no more).
    """
    terms: list[tuple[str, str]] = []
    for part in re.split(r"\s+and\s+", text.strip()):
        match = _TERM.fullmatch(part)
        if match is None:
            raise ValueError(f"unsupported $filter term {part!r}")
        terms.append((match.group(1), match.group(2).replace("''", "'")))
    return terms


def matches(entity: msgspec.Struct, terms: list[tuple[str, str]]) -> bool:
    """Whether every ``(property, value)`` equals the entity's property as text."""
    for name, value in terms:
        actual = getattr(entity, name, None)
        if actual is None or str(edm.to_builtins(actual)) != value:
            return False
    return True


def nav_entries(value: Any) -> list[Any] | None:
    """The entries of a navigation in a request: ``{"results": [..]}`` or ``[..]``.

    Returns None for anything else.
    """
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and isinstance(value.get("results"), list):
        results: list[Any] = value["results"]
        return results
    return None


def check_limits(
    raw: Mapping[str, Any], spec: EntitySpec, *, target: str, out: list[ErrorDetail]
) -> None:
    """Append one error detail per property of *raw* beyond its declared limit.

    Strings longer than their ``maxLength`` and decimals with more digits
    after the point than their scale are reported; navigation properties are
    checked recursively against their own entity specs.
    """
    limits = field_limits(spec.view)
    for name, value in raw.items():
        limit = limits.get(name)
        where = f"{target}/{name}"
        if limit is not None and limit.max_length is not None:
            if isinstance(value, str) and len(value) > limit.max_length:
                text = f"Value of {name} is longer than {limit.max_length} characters"
                out.append(detail("010", text, where))
        elif limit is not None and limit.scale is not None and value is not None:
            if not _fits_scale(value, limit.scale):
                text = f"Value of {name} is not a decimal with ≤ {limit.scale} places"
                out.append(detail("011", text, where))
        elif name in spec.many:
            for index, entry in enumerate(nav_entries(value) or (), start=1):
                if isinstance(entry, dict):
                    child = spec.many[name]
                    check_limits(entry, child, target=f"{where}({index})", out=out)
        elif name in spec.one and isinstance(value, dict):
            check_limits(value, spec.one[name], target=where, out=out)


def _fits_scale(value: Any, scale: int) -> bool:
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return False
    return number.is_finite() and edm.decimal_places(number) <= scale
