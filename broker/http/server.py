"""The HTTP server: webhook ingress, the process API, health and metrics.

Routes:

* ``POST /webhooks/{system}``: a vendor pushes an event (see below).
* ``/api/v1/...``: the process API, routes registered by the application
  through `Runtime.http_route`; ``GET /api/v1/openapi.json`` describes them
  (OpenAPI 3.1, JSON Schema generated from the registrants' Structs). With
  ``api-tokens`` set, a call needs ``Authorization: Bearer <token>`` (401
  otherwise); past ``api-max-inflight`` calls in hand, 429.
* ``GET /healthz`` (the process answers), ``GET /readyz`` (the transport is
  connected and the store answers: 200 or 503), ``GET /metrics``
  (Prometheus text from the daemon's registry).

A webhook is answered only once its fate is known, so that nothing is
acknowledged that is not durable (DESIGN.md §4-5):

====================================================  ======================
what happened                                         answer
====================================================  ======================
no source registered for ``system``                   404
``max-inflight`` webhook requests already in hand     429 + ``Retry-After``
body over ``max-body-bytes`` (declared or streamed)    413, before reading
``source.verify`` raised `SignatureInvalid`           401, logged, counted
``source.parse`` raised a `PermanentError`            400 + a dead letter
no event (an echo of our own write)                   202, nothing published
every event confirmed by the broker (``ACK``)         202
a queue refused one (``NACK``), or no answer          503 + ``Retry-After``
an event matched no queue (``RETURNED``)              500, logged as error
====================================================  ======================

Each event becomes a CloudEvents envelope published to ``q2c.events`` with
routing key = its type. Its id is `webhook_message_id` of the vendor's
source and event id, so a vendor resending the same event produces the same
message id and (from the adapter) the same idempotency key: the replay is
answered 202 again and the workflows' inbox drops the duplicate downstream.

An unparseable payload is dead-lettered (original bytes, reason, headers
without credentials or signatures) in queue ``/webhooks/<system>``, for an
operator to read, with its copy on ``q2c.dead`` and a journal entry, like a
delivery's dead letter; replaying such a record through the outbox cannot route
(there is no such broker queue): fix the adapter and have the vendor resend.
Unauthenticated traffic is never stored.

Every answer is JSON; an error is ``{"error": <code>, "detail": <text>}``
and never carries a stack trace. Every request is one ``http_request`` log
line (method, path, status, ``duration_ms``), never with bodies or headers.
"""

from __future__ import annotations

import contextvars
import hmac
import importlib.metadata
import ipaddress
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import final

import anyio
import msgspec
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from broker.actor import Actor, Context
from broker.config import HttpConfig
from broker.connector import PartsSource, RefusedPart, WebhookSource
from broker.errors import (
    ActorStopped,
    ConfigError,
    PermanentError,
    SignatureInvalid,
    TransientError,
    TransportUnavailable,
)
from broker.http.api import (
    API_PREFIX,
    OPENAPI_PATH,
    WEBHOOK_PATH,
    ApiError,
    ApiRequest,
    ApiResponse,
    ApiRoute,
    ErrorBody,
    WebhookAccepted,
    openapi_document,
)
from broker.http.ingress import Refused, inbound_message, keep_refused
from broker.metrics import Metrics
from broker.outbox import OutboxFeed
from broker.store import Store
from broker.transport import PublishOutcome, Transport

__all__ = ["HttpServer"]


_log = structlog.get_logger(__name__)
_encoder = msgspec.json.Encoder(decimal_format="string")
#: Header names that may carry credentials: never stored with a dead letter.
_SECRET_HEADER = re.compile(
    r"auth|signature|cookie|token|secret|api-?key|password|credential", re.I
)
_READY_TIMEOUT_S = 5.0
#: Per-request fields for the ``http_request`` line, filled in by handlers.
_fields: contextvars.ContextVar[dict[str, object]] = contextvars.ContextVar(
    "q2c_http_fields"
)


def _package_version() -> str:
    try:
        return importlib.metadata.version("q2c-broker")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _json(
    body: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_encoder.encode(body),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _error(
    status: int,
    code: str,
    detail: str,
    *,
    retry_after_s: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    extra = dict(headers or {})
    if retry_after_s is not None:
        extra["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return _json(ErrorBody(error=code, detail=detail), status, extra)


def _unroutable(system: str, types: set[str], fields: dict[str, object]) -> ApiError:
    """The 500 for events of *types*, which no queue takes; logged as an error."""
    fields["outcome"] = "unroutable"
    unroutable = sorted(types)
    _log.error(
        "webhook_unroutable",
        system=system,
        types=unroutable,
        hint="no queue is bound to q2c.events for these types",
    )
    return ApiError(500, "unroutable", f"no queue takes event type(s) {unroutable}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _safe_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers worth keeping with a dead letter: no credentials.

    Bytes that are not UTF-8 (aiohttp hands them on as surrogate escapes,
    which no store can encode) become U+FFFD: the body is kept as sent.
    """
    return {
        _printable(name): _printable(value[:1000])
        for name, value in headers.items()
        if not _SECRET_HEADER.search(name)
    }


def _printable(text: str) -> str:
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@final
class HttpServer(Actor[None]):
    """Serves HTTP as a supervised child; takes no messages.

    Owns: the listening socket and every request in hand. ``on_start`` binds
    (a bind failure raises `ConfigError` naming the address, crashing the
    child: the root supervisor gives up and the daemon exits non-zero);
    then a background task holds the server. A stop cancels that task, which
    closes the listener at once (intake stops first), lets the requests in
    hand finish within ``publish-timeout-s`` + 1 s, then closes connections.
    The same cleanup runs after a crash, so a restart can bind again.

    Args:
        cfg: the ``[http]`` section.
        sources: webhook sources by system name.
        routes: the process API.
        store: for dead letters and readiness.
        transport: for publishing and readiness.
        metrics: the daemon's registry and counters.
        on_listening: called with the base URL once bound, None once closed.
        title: the OpenAPI document's title.
        feed: the relay's hand-over, for the ``q2c.dead`` copy of a webhook's
            dead letter (without it, the outbox poller publishes the copy).
        takes: whether the topology routes an event type to a reader
            (`broker.runtime.Runtime.takes_event`): an event nothing reads is
            refused (500) before it is published, so that the vendor keeps it.
    """

    def __init__(
        self,
        *,
        cfg: HttpConfig,
        sources: Mapping[str, WebhookSource],
        routes: Sequence[ApiRoute],
        store: Store,
        transport: Transport,
        metrics: Metrics,
        on_listening: Callable[[str | None], None] = lambda url: None,
        title: str = "Q2C Broker",
        feed: OutboxFeed | None = None,
        takes: Callable[[str], bool] = lambda event_type: True,
    ) -> None:
        self._cfg = cfg
        self._takes = takes
        self._feed = feed
        self._sources = dict(sources)
        self._routes = list(routes)
        self._store = store
        self._transport = transport
        self._metrics = metrics
        self._on_listening = on_listening
        self._title = title
        self._inflight = 0
        self._api_inflight = 0
        self._grace_s = cfg.publish_timeout_s + 1.0

    @property
    def inflight(self) -> int:
        """Webhook requests in hand."""
        return self._inflight

    def __repr__(self) -> str:
        return (
            f"<HttpServer {self._cfg.host}:{self._cfg.port} "
            f"{self._inflight}/{self._cfg.max_inflight} webhooks in flight>"
        )

    async def on_start(self, ctx: Context[None]) -> None:
        """Bind and start serving.

        Raises:
            ConfigError: the address cannot be bound (in use, not local, ...).
        """
        runner = web.AppRunner(
            self._application(),
            access_log=None,  # one http_request line per request instead
            handle_signals=False,
            shutdown_timeout=self._grace_s,
            keepalive_timeout=self._cfg.keepalive_timeout_s,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._cfg.host, self._cfg.port)
            await site.start()
        except OSError as exc:
            await self._cleanup(runner)
            where = f"{self._cfg.host}:{self._cfg.port}"
            raise ConfigError(f"[http] cannot listen on {where}: {exc}") from exc
        except BaseException:
            await self._cleanup(runner)
            raise
        host, port = runner.addresses[0][:2]
        base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self._on_listening(base)
        ctx.log.info("http_listening", host=host, port=port)
        if self._routes and not self._cfg.api_tokens and not _is_loopback(host):
            ctx.log.warning(
                "http_api_open",
                host=host,
                hint="the process API answers anyone who reaches this address; "
                "set [http] api-tokens or listen on 127.0.0.1",
            )
        ctx.start_soon(self._hold, runner, ctx, name=f"{ctx.id}.serve")

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """Takes no messages."""

    async def _hold(self, runner: web.AppRunner, ctx: Context[None]) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            self._on_listening(None)
            await self._cleanup(runner)
            ctx.log.info("http_stopped")

    async def _cleanup(self, runner: web.AppRunner) -> None:
        # Shielded: this also runs while the child is being cancelled, and a
        # listener left open would make the restart fail to bind.
        with anyio.CancelScope(shield=True), anyio.move_on_after(self._grace_s + 1):
            await runner.cleanup()

    def _application(self) -> web.Application:
        app = web.Application(
            middlewares=[self._middleware], client_max_size=self._cfg.max_body_bytes
        )
        app.router.add_post(WEBHOOK_PATH, self._webhook)
        app.router.add_get(API_PREFIX + OPENAPI_PATH, self._openapi)
        for route in self._routes:
            app.router.add_route(route.method, route.full_path, self._api(route))
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics_text)
        return app

    # --- every request --------------------------------------------------------

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Errors become JSON; every request becomes one log line."""
        fields: dict[str, object] = {}
        token = _fields.set(fields)
        started = time.perf_counter()
        status = 499  # stays so if the request is cancelled (client gone, shutdown)
        try:
            try:
                response = await handler(request)
            except ApiError as exc:
                response = _error(
                    exc.status,
                    exc.code,
                    exc.detail,
                    retry_after_s=exc.retry_after_s,
                    headers=exc.headers,
                )
            except web.HTTPException as exc:  # the router's 404 and 405
                allow = (
                    {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
                )
                code = exc.reason.lower().replace(" ", "_")
                response = _error(exc.status, code, exc.reason, headers=allow)
            except Exception:  # noqa: BLE001 - a bug answers 500 without its traceback, which goes to the log
                _log.exception(
                    "http_handler_failed", method=request.method, path=request.path
                )
                response = _error(500, "internal_error", "internal error; see the log")
            status = response.status
            return response
        finally:
            _fields.reset(token)
            _log.info(
                "http_request",
                method=request.method,
                path=request.path[:200],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                **fields,
            )

    async def _read_body(self, request: web.Request) -> bytes:
        """The body, refused with 413 past ``max-body-bytes`` without buffering more.

        Raises:
            ApiError: 413 past the limit; 408 when the body has not all
                arrived within ``body-timeout-s``.
        """
        timeout_s = self._cfg.body_timeout_s
        try:
            with anyio.fail_after(timeout_s):
                return await self._read_body_within_limit(request)
        except TimeoutError:
            raise ApiError(
                408,
                "body_timeout",
                f"the body did not arrive within {timeout_s:g} s",
            ) from None

    async def _read_body_within_limit(self, request: web.Request) -> bytes:
        limit = self._cfg.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise ApiError(
                413,
                "body_too_large",
                f"Content-Length {declared} is over the {limit}-byte limit",
            )
        body = bytearray()
        while chunk := await request.content.read(limit + 1 - len(body)):
            body += chunk
            if len(body) > limit:
                raise ApiError(
                    413, "body_too_large", f"the body is over the {limit}-byte limit"
                )
        return bytes(body)

    # --- webhooks -------------------------------------------------------------

    async def _webhook(self, request: web.Request) -> web.StreamResponse:
        system = request.match_info["system"]
        source = self._sources.get(system)
        if source is None:
            self._metrics.webhook_requests.labels("_unknown", "unknown_system").inc()
            raise ApiError(
                404, "unknown_system", f"no webhook source for {system[:64]!r}"
            )
        fields = _fields.get()
        fields.update(system=system, outcome="error")
        if self._inflight >= self._cfg.max_inflight:
            fields["outcome"] = "throttled"
            self._metrics.webhook_requests.labels(system, "throttled").inc()
            raise self._too_many(self._inflight, "webhook")
        self._inflight += 1
        try:
            return await self._ingest(request, system, source, fields)
        finally:
            self._inflight -= 1
            self._metrics.webhook_requests.labels(system, str(fields["outcome"])).inc()

    async def _ingest(
        self,
        request: web.Request,
        system: str,
        source: WebhookSource,
        fields: dict[str, object],
    ) -> web.StreamResponse:
        retry_after_s = self._cfg.retry_after_s
        try:
            body = await self._read_body(request)
        except ApiError as exc:
            fields["outcome"] = "body_timeout" if exc.status == 408 else "too_large"
            raise
        fields["size_bytes"] = len(body)
        try:
            source.verify(request.headers, body, now=time.time())
        except SignatureInvalid as exc:
            fields["outcome"] = "signature_invalid"
            # The detail is what the client is told; signatures and secrets
            # never reach it, nor the log.
            _log.warning("webhook_signature_invalid", system=system, detail=str(exc))
            raise ApiError(401, "signature_invalid", str(exc)) from exc
        parts: Sequence[RefusedPart] = ()
        try:
            if isinstance(source, PartsSource):
                events, parts = source.parse_parts(request.headers, body)
            else:
                events = source.parse(request.headers, body)
        except PermanentError as exc:
            fields["outcome"] = "dead_letter_failed"
            await self._dead_letter(system, request, [(body, exc)])
            fields["outcome"] = exc.reason
            raise ApiError(400, exc.reason, str(exc)) from exc
        fields["events"] = len(events)
        if parts:
            # Kept before anything is published or answered: the sender
            # takes a 202 as "all of it is ours now".
            fields["refused"] = len(parts)
            await self._dead_letter(system, request, parts)
        if not events:
            fields["outcome"] = "echo" if not parts else "refused_parts"
            return _json(
                WebhookAccepted(accepted=0, message_ids=[], refused=len(parts)), 202
            )

        messages = [inbound_message(inbound) for inbound in events]
        # Nothing reads such an event (q2c.events' alternate exchange would
        # keep it, bounded): refuse it unpublished, and the vendor keeps it.
        unread = {m.routing_key for m in messages if not self._takes(m.routing_key)}
        if unread:
            raise _unroutable(system, unread, fields)
        try:
            outcomes = await self._transport.publish(
                messages, timeout_s=self._cfg.publish_timeout_s
            )
        except TransportUnavailable as exc:
            outcomes = [PublishOutcome.INDETERMINATE] * len(messages)
            _log.warning("webhook_publish_unavailable", system=system, error=str(exc))
        if PublishOutcome.RETURNED in outcomes:
            returned = {
                m.routing_key
                for m, o in zip(messages, outcomes, strict=True)
                if o is PublishOutcome.RETURNED
            }
            raise _unroutable(system, returned, fields)
        if PublishOutcome.NACK in outcomes:
            fields["outcome"] = "refused"
            _log.warning("webhook_publish_refused", system=system, events=len(events))
            raise ApiError(
                503,
                "queue_full",
                "the broker refused the events (a queue is full); retry later",
                retry_after_s=retry_after_s,
            )
        if PublishOutcome.INDETERMINATE in outcomes:
            fields["outcome"] = "unconfirmed"
            raise ApiError(
                503,
                "publish_unconfirmed",
                "the broker did not confirm the events in time; retry later",
                retry_after_s=retry_after_s,
            )
        fields["outcome"] = "accepted"
        ids = [m.message_id for m in messages]
        return _json(
            WebhookAccepted(accepted=len(ids), message_ids=ids, refused=len(parts)),
            202,
        )

    async def _dead_letter(
        self,
        system: str,
        request: web.Request,
        refused_parts: Sequence[tuple[bytes, PermanentError]],
    ) -> None:
        headers = _safe_headers(request.headers)
        refused = [
            Refused(f"webhook:{system}", body, exc, headers=headers)
            for body, exc in refused_parts
        ]
        try:
            records = await keep_refused(
                self._store, self._feed, f"/webhooks/{system}", refused
            )
        except TransientError as err:
            # Not stored: the sender must keep the payload and try again.
            _log.warning("webhook_dead_letter_failed", system=system, error=str(err))
            raise ApiError(
                503,
                "store_unavailable",
                "the payload is invalid but could not be recorded; retry later",
                retry_after_s=self._cfg.retry_after_s,
            ) from err
        for record, (_, exc) in zip(records, refused_parts, strict=True):
            _log.warning(
                "webhook_dead_lettered",
                system=system,
                message_id=record.message_id,
                reason=exc.reason,
                detail=record.detail[:200],
            )

    # --- process API ----------------------------------------------------------

    def _api(
        self, route: ApiRoute
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def answer(request: web.Request) -> web.StreamResponse:
            self._authorize(request)
            if self._api_inflight >= self._cfg.api_max_inflight:
                raise self._too_many(self._api_inflight, "API")
            self._api_inflight += 1
            try:
                return await call_route(request)
            finally:
                self._api_inflight -= 1

        async def call_route(request: web.Request) -> web.StreamResponse:
            params = dict(request.match_info)
            if any("\x00" in value for value in params.values()):
                # No id holds one; the database could not even look it up.
                raise ApiError(404, "not_found", "no such resource")
            body = await self._read_body(request) if request.body_exists else b""
            call = ApiRequest(
                method=request.method,
                path=request.path,
                params=params,
                query=request.query,
                headers=request.headers,
                body=body,
            )
            try:
                result = await route.handler(call)
            except ApiError:
                raise
            except PermanentError as exc:
                raise ApiError(400, exc.reason, str(exc)) from exc
            except (TransientError, ActorStopped) as exc:
                delay = getattr(exc, "retry_after_s", None) or self._cfg.retry_after_s
                raise ApiError(
                    503, "unavailable", str(exc), retry_after_s=delay
                ) from exc
            if not isinstance(result, ApiResponse):
                return _json(result)
            if result.body is None:
                return web.Response(status=result.status, headers=result.headers)
            return _json(result.body, result.status, result.headers)

        return answer

    def _too_many(self, inflight: int, kind: str) -> ApiError:
        """429 with Retry-After: *inflight* requests of *kind* already in hand."""
        return ApiError(
            429,
            "too_many_requests",
            f"{inflight} {kind} requests are in flight; retry later",
            retry_after_s=self._cfg.retry_after_s,
        )

    def _authorize(self, request: web.Request) -> None:
        """Refuse a call without one of ``api-tokens`` (when any is set) with 401."""
        tokens = self._cfg.api_tokens
        if not tokens:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        presented = given.strip().encode("utf-8", "surrogateescape")
        # Every token is compared, so the time taken does not tell which came close.
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(presented, token.encode())
        if scheme.lower() != "bearer" or not matched:
            raise ApiError(
                401,
                "unauthorized",
                "the process API needs Authorization: Bearer <token>",
                headers={"WWW-Authenticate": 'Bearer realm="q2c"'},
            )

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        return _json(
            openapi_document(
                self._routes,
                list(self._sources),
                title=self._title,
                version=_package_version(),
                bearer=bool(self._cfg.api_tokens),
            )
        )

    # --- probes ---------------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return _json({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.StreamResponse:
        checks = {"transport": self._transport_check(), "store": "ok"}
        try:
            with anyio.fail_after(_READY_TIMEOUT_S):
                await self._store.ping()
        except Exception as exc:  # noqa: BLE001 - whatever fails the probe means "not ready"; logged
            _log.warning("readiness_store_failed", error=f"{type(exc).__name__}: {exc}")
            checks["store"] = f"unavailable ({type(exc).__name__})"
        failing = {name: state for name, state in checks.items() if state != "ok"}
        if failing:
            detail = "; ".join(f"{name}: {state}" for name, state in failing.items())
            return _json(
                {"error": "not_ready", "detail": detail, "checks": checks}, 503
            )
        return _json({"status": "ready", "checks": checks})

    def _transport_check(self) -> str:
        status = self._transport.status()
        connections = status.get("connections") or {}
        if not connections:
            return "no connection"
        down = [
            f"{role} {link.get('state')}"
            for role, link in connections.items()
            if link.get("state") != "connected"
        ]
        if status.get("refused"):
            # Connected, but nothing we publish gets through (permissions).
            down.append(f"publish refused: {status['refused']}")
        for queue, reason in (status.get("consume_refused") or {}).items():
            down.append(f"consume {queue} refused: {reason}")
        return ", ".join(down) if down else "ok"

    async def _metrics_text(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=generate_latest(self._metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
