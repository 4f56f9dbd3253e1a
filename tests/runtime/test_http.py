"""The HTTP server on the in-process transport and an in-memory SQLite store.

A fake webhook source stands in for a vendor adapter: an HMAC-SHA256 hex
signature over the raw body in ``X-Signature``, a JSON list of events as the
payload, ``"echo": true`` for events that are our own writes coming back.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from broker import (
    ApiError,
    ApiRequest,
    ApiResponse,
    ChildSpec,
    Daemon,
    Inbound,
    Runtime,
    SchemaInvalid,
    SignatureInvalid,
    SupervisorSpec,
    load_config,
)
from broker.codec import decode_envelope
from broker.config import Config
from broker.connector import RefusedPart
from broker.errors import (
    ConfigError,
    PublishFailed,
    StoreUnavailable,
    SupervisorGaveUp,
)
from broker.http import HttpServer, publish_inbound, webhook_message_id
from broker.store import BatchWrite, DeadLetterFilter, OutboxRow
from broker.store.sqlite import SqliteStore
from broker.system import ActorSystem
from broker.transport import Delivery, OutgoingMessage, PublishOutcome, Subscription
from broker.transport.memory import MemoryTransport
from broker.transport.topology import build_topology
from canonical import Event

pytestmark = pytest.mark.anyio

SECRET = b"whsec-test-only"
SYSTEM = "vendor"
SOURCE = "/vendor/acme"
EVENT_TYPE = "test.thing.happened"
QUEUE = "q2c.events.test-things"
MAX_BODY = 2048
RETRY_AFTER = "7"


class ThingHappened(Event, frozen=True, tag="test.thing.happened"):
    """The canonical event the fake vendor's payload maps to."""

    thing_id: str


class OrphanHappened(Event, frozen=True, tag="test.orphan.happened"):
    """An event no queue is bound to."""

    thing_id: str


class VendorEvent(msgspec.Struct, frozen=True):
    """One event of the fake vendor's payload."""

    id: str
    thing: str
    echo: bool = False
    orphan: bool = False


class FakeSource:
    """A `WebhookSource` with an HMAC check, mapping `VendorEvent` lists."""

    system = SYSTEM

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float) -> None:
        """Check ``X-Signature`` (hex HMAC-SHA256 over the raw body)."""
        given = headers.get("x-signature")
        if given is None:
            raise SignatureInvalid(f"{SYSTEM}: no X-Signature header")
        if not hmac.compare_digest(given, sign(body)):
            raise SignatureInvalid(f"{SYSTEM}: signature does not match the body")

    def parse(self, headers: Mapping[str, str], body: bytes) -> Sequence[Inbound]:
        """Map the payload; echoes map to nothing."""
        try:
            events = msgspec.json.decode(body, type=list[VendorEvent])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SchemaInvalid(f"{SYSTEM}: {exc}") from exc
        return [
            Inbound(
                event=(OrphanHappened if e.orphan else ThingHappened)(thing_id=e.thing),
                id=e.id,
                source=SOURCE,
                correlation_id=f"thing-{e.thing}",
                idempotency_key=f"{SYSTEM}:{e.id}",
                subject=e.thing,
                traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            for e in events
            if not e.echo
        ]


class PartsFakeSource(FakeSource):
    """`FakeSource` read part by part: an item that is no `VendorEvent` is refused."""

    system = "parts"

    def parse_parts(
        self, headers: Mapping[str, str], body: bytes
    ) -> tuple[Sequence[Inbound], Sequence[RefusedPart]]:
        """The readable items' events; each other item refused with its bytes."""
        try:
            items = msgspec.json.decode(body, type=list[msgspec.Raw])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise SchemaInvalid(f"parts: {exc}") from exc
        good: list[bytes] = []
        refused: list[RefusedPart] = []
        for item in items:
            try:
                msgspec.json.decode(bytes(item), type=VendorEvent)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                refused.append(RefusedPart(bytes(item), SchemaInvalid(f"parts: {exc}")))
            else:
                good.append(bytes(item))
        return self.parse(headers, b"[" + b",".join(good) + b"]"), refused


class Thing(msgspec.Struct, frozen=True, kw_only=True):
    """The process API's test resource."""

    thing_id: str
    label: str


class NewThing(msgspec.Struct, frozen=True, kw_only=True):
    """The body of ``POST /api/v1/things``."""

    label: str


async def get_thing(request: ApiRequest) -> Thing:
    """``GET /things/{thing_id}``: 404 for "missing", a crash for "bug"."""
    thing_id = request.params["thing_id"]
    if thing_id == "missing":
        raise ApiError(404, "thing_not_found", f"no thing {thing_id!r}")
    if thing_id == "bug":
        raise RuntimeError("secret internals in a traceback")
    return Thing(thing_id=thing_id, label=request.query.get("label", ""))


async def create_thing(request: ApiRequest) -> ApiResponse:
    """``POST /things``: 201 with the new thing."""
    new = request.json(NewThing)
    return ApiResponse(Thing(thing_id="t-new", label=new.label), status=201)


def register(rt: Runtime) -> None:
    """The fake source and the test routes, as an application registers them."""
    rt.webhook(FakeSource())
    rt.http_route(
        "GET",
        "/things/{thing_id}",
        get_thing,
        summary="Read one thing",
        operation={"tags": ["things"]},
        response_type=Thing,
    )
    rt.http_route(
        "POST",
        "/things",
        create_thing,
        summary="Create a thing",
        request_type=NewThing,
        response_type=Thing,
        operation={"responses": {"201": {"description": "Created"}}},
    )


def build_tree(rt: Runtime) -> SupervisorSpec:
    """An application with no actors that serves the fake source and routes."""
    register(rt)
    return SupervisorSpec(id="app", children=[])


def sign(body: bytes) -> str:
    return hmac.new(SECRET, body, hashlib.sha256).hexdigest()


def payload(*events: dict[str, Any]) -> bytes:
    return json.dumps(list(events)).encode()


def settings(**env: str) -> Config:
    return load_config(
        environ={
            "BROKER__HTTP__PORT": "0",
            "BROKER__HTTP__MAX_BODY_BYTES": str(MAX_BODY),
            "BROKER__HTTP__MAX_INFLIGHT": "1",
            "BROKER__HTTP__RETRY_AFTER_S": RETRY_AFTER,
            "BROKER__HTTP__PUBLISH_TIMEOUT_S": "5",
            "BROKER__TOPOLOGY__EVENT_QUEUES": f'{{"{QUEUE}" = ["{EVENT_TYPE}"]}}',
            **env,
        }
    )


class HeldTransport:
    """The memory transport, whose publishes can be held open by a test."""

    def __init__(self, inner: MemoryTransport) -> None:
        self.inner = inner
        self.release: anyio.Event | None = None
        self.entered = anyio.Event()

    async def subscribe(self, queue: str, *, prefetch: int) -> Subscription:
        """Subscribe on the memory transport."""
        return await self.inner.subscribe(queue, prefetch=prefetch)

    async def publish(
        self, messages: Sequence[OutgoingMessage], *, timeout_s: float
    ) -> list[PublishOutcome]:
        """Publish, first waiting for `release` when a test set one."""
        if self.release is not None:
            self.entered.set()
            await self.release.wait()
        return await self.inner.publish(messages, timeout_s=timeout_s)

    @property
    def refusal(self) -> str | None:
        """The memory transport's (never any)."""
        return self.inner.refusal

    @property
    def channel_closes(self) -> tuple[int, str | None]:
        """The memory transport's (never any)."""
        return self.inner.channel_closes

    def status(self) -> dict[str, Any]:
        """The memory transport's status."""
        return self.inner.status()

    async def aclose(self) -> None:
        """Close the memory transport."""
        await self.inner.aclose()


@dataclass
class Served:
    """A running `HttpServer` and what it works with."""

    rt: Runtime
    store: SqliteStore
    transport: HeldTransport
    client: aiohttp.ClientSession

    @property
    def base(self) -> str:
        """The server's base URL."""
        return self.rt.http_url

    async def webhook(
        self,
        body: bytes,
        *,
        signature: str | None = None,
        headers: Mapping[str, str] = {},
    ) -> aiohttp.ClientResponse:
        """POST *body* to the fake system, signed unless a signature is given."""
        sent = {"Content-Type": "application/json", **headers}
        sent["X-Signature"] = sign(body) if signature is None else signature
        async with self.client.post(
            f"{self.base}/webhooks/{SYSTEM}", data=body, headers=sent
        ) as response:
            await response.read()
            return response

    async def on_queue(self, n: int) -> list[Delivery]:
        """The first *n* deliveries of the test queue."""
        sub = await self.transport.subscribe(QUEUE, prefetch=100)
        got: list[Delivery] = []
        with anyio.fail_after(5):
            while len(got) < n:
                got.extend(await sub.batch(100))
        await sub.close()
        return got

    def depth(self) -> int:
        """Messages in the test queue."""
        return self.transport.inner.queue_depth(QUEUE)

    def counted(self, outcome: str, system: str = SYSTEM) -> float:
        """The webhook request counter for *outcome*."""
        value = self.rt.metrics.registry.get_sample_value(
            "q2c_webhook_requests_total", {"system": system, "outcome": outcome}
        )
        return value or 0.0


@asynccontextmanager
async def serving(
    *, also: Callable[[Runtime], None] | None = None, **env: str
) -> AsyncIterator[Served]:
    """Run an `HttpServer` as the daemon does, as the only child of a root.

    *also* registers more webhooks or routes beside the test's own.
    """
    cfg = settings(**env)
    rt = Runtime(cfg)
    register(rt)
    if also is not None:
        also(rt)
    store = await SqliteStore.open(":memory:")
    topology = build_topology(cfg.topology, [])
    transport = HeldTransport(MemoryTransport(topology))
    rt.attach(store=store, transport=transport, topology=topology)
    spec = SupervisorSpec(
        id="root",
        children=[
            ChildSpec(
                id="http",
                start=lambda: HttpServer(
                    cfg=cfg.http,
                    sources=rt.webhooks,
                    routes=rt.api_routes,
                    store=rt.store,
                    transport=transport,
                    metrics=rt.metrics,
                    on_listening=rt.http_listening,
                    feed=rt.feed,
                    takes=rt.takes_event,
                ),
            )
        ],
    )
    started, shutdown = anyio.Event(), anyio.Event()
    try:
        async with aiohttp.ClientSession() as client, anyio.create_task_group() as tg:
            run = partial(ActorSystem().run, started=started, shutdown=shutdown)
            tg.start_soon(run, spec)
            with anyio.fail_after(10):
                await started.wait()
            try:
                yield Served(rt, store, transport, client)
            finally:
                shutdown.set()
    finally:
        rt.feed.close()
        await store.aclose()


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    body: dict[str, Any] = await response.json()
    assert set(body) == {"error", "detail"}
    return body


# --- webhooks -------------------------------------------------------------


async def test_a_signed_event_is_answered_202_with_its_envelope_on_the_queue() -> None:
    """202 names the message id; the envelope is on the queue bound to its type."""
    async with serving() as s:
        response = await s.webhook(payload({"id": "evt-1", "thing": "t1"}))
        assert response.status == 202
        message_id = webhook_message_id(SOURCE, "evt-1")
        assert await response.json() == {"accepted": 1, "message_ids": [message_id]}
        assert s.depth() == 1  # confirmed before the answer: already queued

        (delivery,) = await s.on_queue(1)
        assert delivery.routing_key == EVENT_TYPE
        assert delivery.message_id == message_id
        envelope = decode_envelope(delivery.body, max_bytes=MAX_BODY * 2)
        assert envelope.id == message_id
        assert envelope.type == EVENT_TYPE
        assert envelope.source == SOURCE
        assert envelope.correlation_id == "thing-t1"
        assert envelope.idempotency_key == "vendor:evt-1"
        assert envelope.subject == "t1"
        assert envelope.traceparent is not None
        event = msgspec.json.decode(envelope.data, type=ThingHappened)
        assert event == ThingHappened(thing_id="t1")
        assert s.counted("accepted") == 1


async def test_the_answer_waits_for_the_confirm_and_extra_requests_get_429() -> None:
    """max-inflight=1: while one publish is unconfirmed, the next request is refused."""
    async with serving() as s:
        s.transport.release = release = anyio.Event()
        first: list[int] = []

        async def post_first() -> None:
            response = await s.webhook(payload({"id": "evt-1", "thing": "t1"}))
            first.append(response.status)

        async with anyio.create_task_group() as tg:
            tg.start_soon(post_first)
            with anyio.fail_after(5):
                await s.transport.entered.wait()
            second = await s.webhook(payload({"id": "evt-2", "thing": "t2"}))
            assert second.status == 429
            assert second.headers["Retry-After"] == RETRY_AFTER
            assert (await error_of(second))["error"] == "too_many_requests"
            assert first == []  # not answered while its publish is unconfirmed
            release.set()
        assert first == [202]
        assert s.counted("throttled") == 1
        assert s.depth() == 1


async def test_a_bad_signature_is_401_logged_without_secrets_and_not_stored() -> None:
    """401 signature_invalid; nothing queued or dead-lettered; no signature logged."""
    body = payload({"id": "evt-1", "thing": "t1"})
    forged = "ab" * 32
    async with serving() as s:
        with capture_logs() as logs:
            response = await s.webhook(body, signature=forged)
        assert response.status == 401
        error = await error_of(response)
        assert error["error"] == "signature_invalid"
        assert "does not match" in error["detail"]
        missing = await s.client.post(f"{s.base}/webhooks/{SYSTEM}", data=body)
        assert missing.status == 401
        missing.release()
        assert s.depth() == 0
        assert await s.store.list_dead_letters(DeadLetterFilter()) == []
        assert s.counted("signature_invalid") == 2
    events = [line["event"] for line in logs]
    assert "webhook_signature_invalid" in events
    assert forged not in repr(logs)
    assert SECRET.decode() not in repr(logs)


async def test_a_declared_oversize_body_is_413_before_it_is_sent() -> None:
    """Content-Length over the limit: 413 although not one body byte was sent."""
    async with serving() as s:
        port = int(s.base.rsplit(":", 1)[1])
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(
                f"POST /webhooks/{SYSTEM} HTTP/1.1\r\nHost: test\r\n"
                f"Content-Type: application/json\r\n"
                f"Content-Length: {MAX_BODY * 100}\r\n\r\n".encode()
            )
            head = b""
            with anyio.fail_after(5):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
        assert head.startswith(b"HTTP/1.1 413 ")
        assert s.counted("too_large") == 1


async def test_a_body_that_stalls_is_408_and_frees_its_webhook_slot() -> None:
    """A sender that stops mid-body cannot hold the only slot: 408, then 202 again."""
    body = payload({"id": "evt-1", "thing": "t1"})
    async with serving(BROKER__HTTP__BODY_TIMEOUT_S="0.3") as s:
        port = int(s.base.rsplit(":", 1)[1])
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(
                f"POST /webhooks/{SYSTEM} HTTP/1.1\r\nHost: test\r\n"
                f"Content-Type: application/json\r\n"
                f"X-Signature: {sign(body)}\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body[:5]
            )
            head = b""
            with anyio.fail_after(5):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
            assert head.startswith(b"HTTP/1.1 408 ")
            # The stalled connection is still open; max-inflight is 1.
            response = await s.webhook(body)
            assert response.status == 202
        assert s.counted("body_timeout") == 1


async def test_a_chunked_body_growing_past_the_limit_is_413() -> None:
    """No Content-Length: the body is cut off once it passes max-body-bytes."""

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b" " * (MAX_BODY // 2)

    async with serving() as s:
        async with s.client.post(
            f"{s.base}/webhooks/{SYSTEM}",
            data=chunks(),
            headers={"X-Signature": "irrelevant"},
        ) as response:
            assert response.status == 413
            assert (await error_of(response))["error"] == "body_too_large"
        assert s.depth() == 0


async def test_a_header_that_is_not_utf8_does_not_cost_the_dead_letter() -> None:
    """A byte aiohttp cannot decode in an ordinary header: still 400 and kept."""
    body = b'{"not": "a list of events"}'
    async with serving() as s:
        port = int(s.base.rsplit(":", 1)[1])
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(
                f"POST /webhooks/{SYSTEM} HTTP/1.1\r\nHost: test\r\n"
                f"Content-Type: application/json\r\n"
                f"X-Signature: {sign(body)}\r\n".encode()
                + b"X-Note: caf\xe9\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = b""
            with anyio.fail_after(5):
                while b"\r\n\r\n" not in head:
                    head += await stream.receive()
        assert head.startswith(b"HTTP/1.1 400 ")
        (row,) = await s.store.list_dead_letters(DeadLetterFilter())
        assert row.body == body
        assert {k.lower(): v for k, v in row.headers.items()}["x-note"] == "caf\ufffd"


async def test_an_unparseable_payload_is_400_and_dead_lettered_with_its_bytes() -> None:
    """400 schema_invalid; the dead letter keeps the bytes and headers, no secrets."""
    body = b'{"not": "a list of events"}'
    async with serving() as s:
        response = await s.webhook(
            body,
            headers={"Authorization": "Bearer secret-token", "X-Trace-Id": "tr-9"},
        )
        assert response.status == 400
        assert (await error_of(response))["error"] == "schema_invalid"
        (row,) = await s.store.list_dead_letters(DeadLetterFilter())
        assert row.body == body
        assert row.reason == "schema_invalid"
        assert row.queue == f"/webhooks/{SYSTEM}"
        assert "vendor:" in row.detail
        names = {name.lower() for name in row.headers}
        assert "x-trace-id" in names
        assert "content-type" in names
        assert "authorization" not in names
        assert "x-signature" not in names
        assert s.depth() == 0
        assert s.counted("schema_invalid") == 1
        # Its copy for q2c.dead was written with it and handed to the relay.
        (copy,) = s.rt.feed.take_nowait()
        assert (copy.exchange, copy.message_id) == ("q2c.dead", row.message_id)
        assert copy.body == body
        assert copy.headers is not None
        assert copy.headers["x-q2c-reason"] == "schema_invalid"
        assert "authorization" not in {name.lower() for name in copy.headers}


async def test_an_invalid_payload_that_cannot_be_recorded_is_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The dead letter cannot be written: 503 + Retry-After, so the vendor resends."""

    async def unavailable(write: BatchWrite) -> list[OutboxRow]:
        raise StoreUnavailable("database is down")

    async with serving() as s:
        monkeypatch.setattr(s.store, "commit_batch", unavailable)
        response = await s.webhook(b"not json")
        assert response.status == 503
        assert response.headers["Retry-After"] == RETRY_AFTER
        assert (await error_of(response))["error"] == "store_unavailable"


async def test_a_full_queue_refuses_with_503_and_retry_after() -> None:
    """max-length 1 with reject-publish: the second event is NACKed, answered 503."""
    async with serving(BROKER__TOPOLOGY__QUEUE_MAX_LENGTH="1") as s:
        assert (await s.webhook(payload({"id": "evt-1", "thing": "t1"}))).status == 202
        response = await s.webhook(payload({"id": "evt-2", "thing": "t2"}))
        assert response.status == 503
        assert response.headers["Retry-After"] == RETRY_AFTER
        assert (await error_of(response))["error"] == "queue_full"
        assert s.depth() == 1
        assert s.counted("refused") == 1


async def test_an_unconfirmed_publish_is_503_and_an_unroutable_one_500() -> None:
    """No answer from the broker: 503 + Retry-After; no queue for the type: 500."""
    async with serving() as s:
        with capture_logs() as logs:
            orphan = await s.webhook(
                payload({"id": "o1", "thing": "t", "orphan": True})
            )
        assert orphan.status == 500
        assert (await error_of(orphan))["error"] == "unroutable"
        assert any(
            line["event"] == "webhook_unroutable" and line["log_level"] == "error"
            for line in logs
        )
        await s.transport.inner.aclose()  # publishes are now indeterminate
        response = await s.webhook(payload({"id": "evt-1", "thing": "t1"}))
        assert response.status == 503
        assert response.headers["Retry-After"] == RETRY_AFTER
        assert (await error_of(response))["error"] == "publish_unconfirmed"


async def test_an_echo_is_202_and_publishes_nothing() -> None:
    """A payload of our own writes coming back: 202, accepted 0, counted as echo."""
    async with serving() as s:
        response = await s.webhook(payload({"id": "e1", "thing": "t1", "echo": True}))
        assert response.status == 202
        assert await response.json() == {"accepted": 0, "message_ids": []}
        assert s.depth() == 0
        assert s.counted("echo") == 1


async def test_a_replayed_vendor_event_keeps_its_message_id_and_key() -> None:
    """The same vendor event twice: 202 both times, one message id, one key."""
    body = payload({"id": "evt-1", "thing": "t1"})
    async with serving() as s:
        first = await s.webhook(body)
        again = await s.webhook(body)
        assert first.status == again.status == 202
        assert await first.json() == await again.json()
        deliveries = await s.on_queue(2)
        envelopes = [
            decode_envelope(d.body, max_bytes=MAX_BODY * 2) for d in deliveries
        ]
        assert {e.id for e in envelopes} == {webhook_message_id(SOURCE, "evt-1")}
        assert {e.idempotency_key for e in envelopes} == {"vendor:evt-1"}


async def test_an_unknown_system_is_404() -> None:
    """No source registered for the path's system: 404 unknown_system."""
    async with (
        serving() as s,
        s.client.post(f"{s.base}/webhooks/nobody", data=b"{}") as response,
    ):
        assert response.status == 404
        assert (await error_of(response))["error"] == "unknown_system"


# --- process API, OpenAPI, probes -------------------------------------------


async def test_registered_routes_are_served_under_api_v1() -> None:
    """Path variables, query, JSON bodies, status codes and errors, all JSON."""
    async with serving() as s:
        api = f"{s.base}/api/v1"
        async with s.client.get(f"{api}/things/t7?label=seven") as response:
            assert response.status == 200
            assert await response.json() == {"thing_id": "t7", "label": "seven"}
        async with s.client.post(f"{api}/things", json={"label": "new"}) as response:
            assert response.status == 201
            assert await response.json() == {"thing_id": "t-new", "label": "new"}
        async with s.client.post(f"{api}/things", json={"label": 3}) as response:
            assert response.status == 400
            assert "$.label" in (await error_of(response))["detail"]
        async with s.client.get(f"{api}/things/missing") as response:
            assert response.status == 404
            assert (await error_of(response))["error"] == "thing_not_found"
        async with s.client.delete(f"{api}/things/t7") as response:
            assert response.status == 405
            assert (await error_of(response))["error"] == "method_not_allowed"
        async with s.client.get(f"{s.base}/nowhere") as response:
            assert response.status == 404
            assert (await error_of(response))["error"] == "not_found"


TOKEN = "t0ken-for-the-process-api"


async def test_with_api_tokens_a_call_needs_one_of_them() -> None:
    """401 with WWW-Authenticate without a token or with another; 200 with one."""
    tokens = f'["{TOKEN}", "second-token-in-rotation"]'
    async with serving(BROKER__HTTP__API_TOKENS=tokens) as s:
        url = f"{s.base}/api/v1/things/t7"
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-of-some-length"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
        ):
            async with s.client.get(url, headers=headers) as response:
                assert response.status == 401, headers
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert (await error_of(response))["error"] == "unauthorized"
        for token in (TOKEN, "second-token-in-rotation"):
            headers = {"Authorization": f"Bearer {token}"}
            async with s.client.get(url, headers=headers) as response:
                assert response.status == 200
        async with s.client.get(f"{s.base}/api/v1/openapi.json") as response:
            document = await response.json()
        read = document["paths"]["/api/v1/things/{thing_id}"]["get"]
        assert read["security"] == [{"bearer": []}]
        assert "401" in read["responses"]
        assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        # Webhooks, probes and metrics have their own checks, or none.
        async with s.client.get(f"{s.base}/healthz") as response:
            assert response.status == 200
        assert (await s.webhook(payload({"id": "evt-1", "thing": "t1"}))).status == 202


async def test_a_short_api_token_is_refused_by_the_config() -> None:
    with pytest.raises(ConfigError, match="api-tokens"):
        settings(BROKER__HTTP__API_TOKENS='["short"]')


async def test_api_calls_past_api_max_inflight_are_429() -> None:
    """The process API has its own cap: a flood of calls cannot pile up."""
    gate = anyio.Event()
    entered = anyio.Event()

    async def slow(request: ApiRequest) -> Thing:
        entered.set()
        await gate.wait()
        return Thing(thing_id="slow", label="")

    def route(rt: Runtime) -> None:
        rt.http_route("GET", "/slow", slow, summary="Wait for the test")

    async with serving(BROKER__HTTP__API_MAX_INFLIGHT="1", also=route) as s:
        async with anyio.create_task_group() as tg:

            async def first() -> None:
                async with s.client.get(f"{s.base}/api/v1/slow") as response:
                    assert response.status == 200

            tg.start_soon(first)
            with anyio.fail_after(5):
                await entered.wait()
            async with s.client.get(f"{s.base}/api/v1/things/t7") as response:
                assert response.status == 429
                assert response.headers["Retry-After"] == RETRY_AFTER
            gate.set()
        async with s.client.get(f"{s.base}/api/v1/things/t7") as response:
            assert response.status == 200


async def test_a_crashing_handler_answers_500_without_its_traceback() -> None:
    """A bug: 500 internal_error to the client, the traceback only in the log."""
    async with serving() as s:
        with capture_logs() as logs:
            async with s.client.get(f"{s.base}/api/v1/things/bug") as response:
                assert response.status == 500
                text = await response.text()
        assert json.loads(text)["error"] == "internal_error"
        assert "secret internals" not in text
        assert "Traceback" not in text
        assert any(line["event"] == "http_handler_failed" for line in logs)


def refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in refs(value)]
    return []


async def test_openapi_describes_the_registered_routes_and_the_webhook() -> None:
    """OpenAPI 3.1: every path, its operations and schemas; every $ref resolves."""
    async with (
        serving() as s,
        s.client.get(f"{s.base}/api/v1/openapi.json") as response,
    ):
        assert response.status == 200
        doc = await response.json()
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"]
    paths = doc["paths"]
    assert {"/api/v1/things/{thing_id}", "/api/v1/things", "/webhooks/{system}"} <= set(
        paths
    )
    read = paths["/api/v1/things/{thing_id}"]["get"]
    assert read["summary"] == "Read one thing"
    assert read["tags"] == ["things"]
    assert (
        read["parameters"][0] | {"name": "thing_id", "in": "path"}
        == read["parameters"][0]
    )
    create = paths["/api/v1/things"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/NewThing"
    }
    assert create["responses"] == {"201": {"description": "Created"}}
    webhook = paths["/webhooks/{system}"]["post"]
    assert webhook["parameters"][0]["schema"]["enum"] == [SYSTEM]
    assert {"202", "400", "401", "413", "429", "503"} <= set(webhook["responses"])
    schemas = doc["components"]["schemas"]
    assert schemas["Thing"]["required"] == ["thing_id", "label"]
    for ref in refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


async def test_probes_and_metrics() -> None:
    """Probes: alive; ready until the transport or the store is gone; metrics."""
    async with serving() as s:
        await s.webhook(payload({"id": "evt-1", "thing": "t1"}))
        async with s.client.get(f"{s.base}/healthz") as response:
            assert response.status == 200
        async with s.client.get(f"{s.base}/readyz") as response:
            assert response.status == 200
            assert (await response.json())["checks"] == {
                "transport": "ok",
                "store": "ok",
            }
        async with s.client.get(f"{s.base}/metrics") as response:
            assert response.status == 200
            assert response.content_type == "text/plain"
            text = await response.text()
        assert (
            'q2c_webhook_requests_total{outcome="accepted",system="vendor"} 1.0' in text
        )
        await s.transport.inner.aclose()
        async with s.client.get(f"{s.base}/readyz") as response:
            assert response.status == 503
            body = await response.json()
        assert body["error"] == "not_ready"
        assert "transport: memory closed" in body["detail"]
        assert body["checks"]["store"] == "ok"
        await s.store.aclose()
        async with s.client.get(f"{s.base}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["checks"]["store"].startswith("unavailable")


async def test_every_request_is_one_log_line_without_bodies() -> None:
    """http_request: method, path, status, duration_ms, and the webhook outcome."""
    body = payload({"id": "evt-1", "thing": "confidential-thing"})
    async with serving() as s:
        with capture_logs() as logs:
            await s.webhook(body)
            async with s.client.get(f"{s.base}/healthz"):
                pass
    lines = [line for line in logs if line["event"] == "http_request"]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("POST", f"/webhooks/{SYSTEM}", 202),
        ("GET", "/healthz", 200),
    ]
    assert lines[0]["outcome"] == "accepted"
    assert lines[0]["system"] == SYSTEM
    assert all(isinstance(x["duration_ms"], float) for x in lines)
    assert "confidential-thing" not in repr(logs)


# --- in the daemon ----------------------------------------------------------


def daemon_config(tmp_path: Path, **env: str) -> Config:
    return settings(
        BROKER__SQLITE__PATH=str(tmp_path / "q2c.sqlite3"),
        BROKER__MEMORY__JOURNAL=str(tmp_path / "queues.sqlite3"),
        BROKER__CONTROL__SOCKET_PATH=str(tmp_path / "ctl" / "brokerd.sock"),
        BROKER__DAEMON__TREE="tests.runtime.test_http:build_tree",
        BROKER__LOGGING__LEVEL="warning",
        **env,
    )


async def test_the_daemon_serves_http_between_app_and_control(tmp_path: Path) -> None:
    """The http child sits after app and before control, and closes on drain."""
    daemon = Daemon(daemon_config(tmp_path))
    async with aiohttp.ClientSession() as client, anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        with anyio.fail_after(20):
            await daemon.started.wait()
        children = [c["id"] for c in daemon.system.tree()["children"]]
        assert children[-3:] == ["app", "http", "control"]
        base = daemon.runtime.http_url
        body = payload({"id": "evt-1", "thing": "t1"})
        async with client.post(
            f"{base}/webhooks/{SYSTEM}", data=body, headers={"X-Signature": sign(body)}
        ) as response:
            assert response.status == 202
        async with client.get(f"{base}/readyz") as response:
            assert response.status == 200
        daemon.request_shutdown("test finished")
    with pytest.raises(RuntimeError, match="not listening"):
        _ = daemon.runtime.http_url
    port = int(base.rsplit(":", 1)[1])
    with pytest.raises(OSError, match="connection attempts failed"):
        await anyio.connect_tcp("127.0.0.1", port)


async def test_a_port_in_use_stops_the_daemon_naming_the_address(
    tmp_path: Path,
) -> None:
    """Binding fails: the root gives up, and the error names host and port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(daemon_config(tmp_path, BROKER__HTTP__PORT=str(port)))
        with anyio.fail_after(20), pytest.raises(SupervisorGaveUp) as failure:
            await daemon.run()
    assert failure.value.child == "http"
    assert f"cannot listen on 127.0.0.1:{port}" in str(failure.value)


def test_registration_refuses_bad_and_duplicate_routes() -> None:
    """A path outside the template grammar, a bad method or a repeat is refused."""
    rt = Runtime(settings())
    register(rt)
    with pytest.raises(ValueError, match="registered twice"):
        rt.webhook(FakeSource())
    with pytest.raises(ValueError, match="registered twice"):
        rt.http_route("get", "/things/{thing_id}", get_thing, summary="again")
    with pytest.raises(ValueError, match="relative to /api/v1"):
        rt.http_route("GET", "/api/v1/things", get_thing, summary="prefixed")
    with pytest.raises(ValueError, match="server's own"):
        rt.http_route("GET", "/openapi.json", get_thing, summary="shadow")
    with pytest.raises(ValueError, match="method"):
        rt.http_route("BREW", "/coffee", get_thing, summary="teapot")
    with pytest.raises(RuntimeError, match="not listening"):
        _ = rt.http_url
    rt.feed.close()


def test_an_api_body_nested_too_deep_is_a_400_not_a_crash() -> None:
    """Past msgspec's nesting limit (RecursionError): a bad request, not a 500."""
    request = ApiRequest(
        method="POST",
        path="/api/v1/x",
        params={},
        query={},
        headers={},
        body=b"[" * 2000 + b"]" * 2000,
    )
    with pytest.raises(ApiError) as caught:
        request.json(list[Any])
    assert (caught.value.status, caught.value.code) == (400, "bad_request")


async def test_a_polled_event_nothing_reads_is_not_published() -> None:
    """publish_inbound refuses it unpublished: the poller's cursor stays put."""
    topology = build_topology(settings().topology, [])
    transport = MemoryTransport(topology)
    event = Inbound(
        event=OrphanHappened(thing_id="t1"),
        id="evt-1",
        source=SOURCE,
        correlation_id="thing-t1",
        idempotency_key=f"{SYSTEM}:evt-1",
    )
    with pytest.raises(PublishFailed, match="no queue takes event type"):
        await publish_inbound(transport, [event], timeout_s=1, takes=topology.takes)
    assert transport.status()["published"] == 0


async def test_a_batch_with_unreadable_parts_takes_the_rest_and_keeps_each_part() -> (
    None
):
    """202: the readable events published, each unreadable part its own dead letter.

    Refusing the whole batch for one bad part left the good events in a
    dead letter no queue takes, so they could never be replayed.
    """
    bad = b'{"id": "e-2", "thing": 7}'
    body = (
        b'[{"id": "e-1", "thing": "t-1"}, ' + bad + b', {"id": "e-3", "thing": "t-3"}]'
    )
    async with serving(also=lambda rt: rt.webhook(PartsFakeSource())) as s:
        async with s.client.post(
            f"{s.base}/webhooks/parts",
            data=body,
            headers={"Content-Type": "application/json", "X-Signature": sign(body)},
        ) as response:
            answer = msgspec.json.decode(await response.read())
        assert response.status == 202
        assert (answer["accepted"], answer["refused"]) == (2, 1)
        delivered = await s.on_queue(2)
        (row,) = await s.store.list_dead_letters(DeadLetterFilter())
    assert sorted(d.message_id or "" for d in delivered) == sorted(
        webhook_message_id(SOURCE, i) for i in ("e-1", "e-3")
    )
    assert (row.body, row.reason, row.queue) == (
        bad,
        "schema_invalid",
        "/webhooks/parts",
    )


async def test_an_id_with_a_nul_is_404_not_a_500() -> None:
    """No id holds a NUL, and PostgreSQL could not even look one up (a 500 before)."""
    async with serving() as s:
        url = f"{s.base}/api/v1/things/t%007"
        async with s.client.get(url) as response:
            status, answer = response.status, await error_of(response)
    assert (status, answer["error"]) == (404, "not_found")
