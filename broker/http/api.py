"""The process API's types and its OpenAPI document. Internal to `broker.http`."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, final

import msgspec

from broker.errors import (
    BrokerError,
)

__all__ = [
    "API_PREFIX",
    "OPENAPI_PATH",
    "WEBHOOK_PATH",
    "ApiError",
    "ApiRequest",
    "ApiResponse",
    "ApiRoute",
    "ErrorBody",
    "RouteHandler",
    "WebhookAccepted",
    "openapi_document",
]

API_PREFIX: Final = "/api/v1"
WEBHOOK_PATH: Final = "/webhooks/{system}"
OPENAPI_PATH: Final = "/openapi.json"

_T = TypeVar("_T")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_PATH = re.compile(r"^(/[A-Za-z0-9._~-]+|/\{[A-Za-z_][A-Za-z0-9_]*\})+$")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    """The body of every error answer."""

    error: str
    detail: str


class WebhookAccepted(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The 202 answer to a webhook: the message ids its events were published as.

    ``refused`` (left out when none) counts the parts of a batch that could
    not be read: each is kept as a dead letter of its own (``brokerctl dlq
    list``), the rest taken.
    """

    accepted: int
    message_ids: list[str]
    refused: int = 0


class ApiError(BrokerError):
    """Raise from a route handler to answer with a JSON error.

    Args:
        status: the HTTP status.
        code: the short machine-readable ``error``.
        detail: the human-readable ``detail``; shown to the client.
        retry_after_s: sent as ``Retry-After`` (rounded up), if given.
        headers: further response headers (``WWW-Authenticate`` with a 401).
    """

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        retry_after_s: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after_s = retry_after_s
        self.headers = dict(headers or {})


@final
class ApiRequest:
    """What a process API handler gets: the request, read and framework-free.

    Attributes:
        method: ``GET``, ``POST`` ...
        path: the full path, e.g. ``/api/v1/deals/d-1``.
        params: the path template's variables, e.g. ``{"deal_id": "d-1"}``.
        query: the query string's parameters.
        headers: case-insensitive.
        body: the raw body (at most ``max-body-bytes``).
    """

    __slots__ = ("body", "headers", "method", "params", "path", "query")

    def __init__(
        self,
        *,
        method: str,
        path: str,
        params: Mapping[str, str],
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        self.method = method
        self.path = path
        self.params = params
        self.query = query
        self.headers = headers
        self.body = body

    def json(self, type_: type[_T]) -> _T:
        """Decode the body as *type_* (a msgspec Struct, say).

        Raises:
            ApiError: 400 ``bad_request``, naming what does not match.
        """
        try:
            return msgspec.json.decode(self.body, type=type_)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
            raise ApiError(400, "bad_request", str(exc)) from exc


@final
class ApiResponse:
    """A handler's answer when it is not a plain 200 with a JSON body.

    A handler may also return any msgspec-encodable value: 200 with it as JSON.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self,
        body: object = None,
        *,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.headers = dict(headers or {})


#: A process API handler: an `ApiRequest` in, an `ApiResponse` (or any
#: msgspec-encodable value, answered 200) out. It may raise `ApiError`;
#: a `PermanentError` answers 400, a `TransientError` or `ActorStopped` 503.
RouteHandler = Callable[[ApiRequest], Awaitable[object]]


@dataclass(frozen=True, kw_only=True, slots=True)
class ApiRoute:
    """One process API route, as registered through `Runtime.http_route`.

    Attributes:
        method: the HTTP method.
        path: under ``/api/v1``, with ``{name}`` variables: ``/deals/{deal_id}``.
        handler: the coroutine function that answers.
        summary: the OpenAPI summary.
        operation: more of the OpenAPI Operation Object (``parameters``,
            ``responses``, ``tags``, ``operationId`` ...); it wins over what
            is generated.
        request_type: the JSON body's type: documented as ``requestBody``.
        response_type: the 200 answer's type: documented under ``responses``.

    Raises:
        ValueError: an unknown method or a path that is not a template.
    """

    method: str
    path: str
    handler: RouteHandler
    summary: str
    operation: Mapping[str, Any] = field(default_factory=dict)
    request_type: Any = None
    response_type: Any = None

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ValueError(
                f"HTTP method {self.method!r} is not one of {sorted(_METHODS)}"
            )
        if not _PATH.match(self.path) or self.path.startswith(API_PREFIX):
            raise ValueError(
                f"route path {self.path!r}: expected /segment/{{variable}}/... "
                f"relative to {API_PREFIX}"
            )
        if self.path == OPENAPI_PATH:
            raise ValueError(f"{API_PREFIX}{OPENAPI_PATH} is the server's own")

    @property
    def full_path(self) -> str:
        """The path served: ``/api/v1`` + `path`."""
        return API_PREFIX + self.path


def _schema_ref(
    by_type: Mapping[Any, dict[str, Any]], type_: Any
) -> dict[str, Any] | None:
    return None if type_ is None else by_type[type_]


def _json_content(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": dict(schema)}}


def _ecma_patterns(schema: Any) -> Any:
    r"""*schema* with each ``pattern``'s Python end anchor ``\Z`` written ``$``.

    The types anchor with ``\Z`` (Python's ``$`` also matches before a final
    newline); JSON Schema patterns are ECMA-262, where ``$`` is the end of
    the input and ``\Z`` is no anchor at all. Tuples (the top-level schemas
    `msgspec.json.schema_components` returns) come back as lists.
    """
    if isinstance(schema, dict):
        return {
            k: (
                v[:-2] + "$"
                if k == "pattern" and isinstance(v, str) and v.endswith("\\Z")
                else _ecma_patterns(v)
            )
            for k, v in schema.items()
        }
    if isinstance(schema, (list, tuple)):
        return [_ecma_patterns(v) for v in schema]
    return schema


def openapi_document(
    routes: Sequence[ApiRoute],
    systems: Sequence[str],
    *,
    title: str = "Q2C Broker",
    version: str = "0",
    bearer: bool = False,
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the process API, the webhooks and the probes.

    Schemas of the routes' Struct types go to ``components/schemas`` (through
    `msgspec.json.schema_components`) and are referenced from the operations.
    With *bearer* (``api-tokens`` set), the routes need a bearer token.
    """
    types: list[Any] = [ErrorBody, WebhookAccepted]
    for route in routes:
        for t in (route.request_type, route.response_type):
            if t is not None and t not in types:
                types.append(t)
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schemas, components = _ecma_patterns(schemas), _ecma_patterns(components)
    by_type = dict(zip(types, schemas, strict=True))
    error = _json_content(by_type[ErrorBody])
    retry_after = {
        "Retry-After": {
            "description": "Seconds to wait before retrying",
            "schema": {"type": "integer"},
        }
    }

    def fails(description: str, *, retry: bool = False) -> dict[str, Any]:
        answer: dict[str, Any] = {"description": description, "content": error}
        if retry:
            answer["headers"] = retry_after
        return answer

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "summary": route.summary,
            "operationId": _operation_id(route),
        }
        named = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAM.findall(route.path)
        ]
        if named:
            op["parameters"] = named
        request = _schema_ref(by_type, route.request_type)
        if request is not None:
            op["requestBody"] = {"required": True, "content": _json_content(request)}
        response = _schema_ref(by_type, route.response_type)
        op["responses"] = {
            "200": {"description": "OK"}
            | ({"content": _json_content(response)} if response is not None else {}),
            "429": fails("Too many API requests in flight", retry=True),
            "default": fails("An error"),
        }
        if bearer:
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = fails("No bearer token, or not one of ours")
        op.update(route.operation)
        paths.setdefault(route.full_path, {})[route.method.lower()] = op

    paths[WEBHOOK_PATH] = {
        "post": {
            "summary": "Receive a signed event from an external system",
            "operationId": "post_webhook",
            "parameters": [
                {
                    "name": "system",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": sorted(systems)},
                }
            ],
            "requestBody": {
                "required": True,
                "description": "The vendor's payload, signed as the vendor signs it",
                "content": {"*/*": {"schema": {}}},
            },
            "responses": {
                "202": {
                    "description": "Every event it carried is durably queued",
                    "content": _json_content(by_type[WebhookAccepted]),
                },
                "400": fails("Not a payload of this system (dead-lettered)"),
                "401": fails("Signature missing, wrong or outside its tolerance"),
                "404": fails("No such system"),
                "413": fails("Body over the size limit"),
                "429": fails("Too many webhook requests in flight", retry=True),
                "500": fails("An event could not be routed"),
                "503": fails("The broker refused or did not confirm", retry=True),
            },
        }
    }
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths["/healthz"] = {
        "get": {
            "summary": "The process answers",
            "responses": {"200": {"description": "Alive"}},
        }
    }
    paths["/readyz"] = {
        "get": {
            "summary": "The transport is connected and the store answers",
            "responses": {"200": {"description": "Ready"}, "503": fails("Not ready")},
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics",
            "responses": {"200": {"description": "Exposition format", "content": text}},
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": components}
        | (
            {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
            if bearer
            else {}
        ),
    }


def _operation_id(route: ApiRoute) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", route.path).strip("_")
    return f"{route.method.lower()}_{words}"
