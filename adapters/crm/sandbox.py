"""A Salesforce org (CRM plus the CPQ package) that fits in a test.

`SalesforceSandbox` serves on the wire what the broker uses of an org:

- ``POST /services/oauth2/token``: the client-credentials grant; wrong
  credentials get 400 ``{"error": "invalid_client", ...}``.
- ``/services/data/vNN.N/``: ``sobjects/{Type}`` create (201), read,
  ``PATCH`` (204), ``DELETE`` (204, to the recycle bin); upsert by external
  id, ``PATCH sobjects/{Type}/{Field}/{value}`` (201 created, 204 updated),
  the idempotency facility, keyed on the unique ``Broker_Key__c``; read by
  external id; ``query`` and ``queryAll`` for the SOQL subset of
  `adapters.crm.soql`, paged through ``nextRecordsUrl``. A Bearer token from
  the token endpoint is checked on every call (401 ``INVALID_SESSION_ID``).
  Errors are the REST error array ``[{message, errorCode, fields?}]``.
- ``GET /services/apexrest/SBQQ/ServiceRouter?reader=SBQQ.QuoteAPI.QuoteReader&uid=``:
  the CPQ API's QuoteModel, double-encoded as the Apex REST API returns a
  ``String`` (a JSON string holding the JSON).
- ``GET /cometd/replay?channel=&replayId=&limit=&wait_s=``: a long-poll
  stand-in for the Streaming API. It answers the CometD messages after
  ``replayId`` (``-2``: all retained, ``-1``: only new ones, waiting up to
  ``wait_s`` for one) on ``/data/ChangeEvents`` or an object's channel.

Every committed write appends change events to the org's bounded log; a
write made with ``Sforce-Call-Options: client=<id>`` carries
``changeOrigin = com/salesforce/api/rest/NN.N;client=<id>``, so a reader can
drop echoes of its own writes. Writes made through the Python helpers
(`seed_account`, `approve_quote`, …) look like UI changes: empty origin.

Salesforce signs nothing it delivers. With the ``push_url`` knob set, the
sandbox also plays the broker's signing relay: each change event (a CPQ
approval is one, on ``SBQQ__Quote__c``) is POSTed there in CometD form, in
commit order, signed with ``X-Q2C-Signature`` (`adapters.signing`),
retried with back-off and dropped (counted) after the last attempt.

Knobs (`Knobs`) add latency, outages, 429s beyond a rate (with
``Retry-After``; an org would answer ``REQUEST_LIMIT_EXCEEDED``) and random
500/503s on writes. ``GET /_sandbox/state`` reports counts. All records are
kept in memory for the life of the object: it is a test double.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import random
import re
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Annotated, Any

import anyio
import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from msgspec import Meta

from adapters.cpq.views import QUOTE_READER
from adapters.crm import soql
from adapters.crm.feed import ChangeFeed, PushTarget
from adapters.crm.org import Org
from adapters.crm.schema import SPECS, OrgError
from adapters.crm.seeding import UserActions
from adapters.serving import serve
from broker.limits import TokenBucket

__all__ = ["Knobs", "SalesforceSandbox", "call_options_client"]

_WRITES = frozenset({"POST", "PATCH", "PUT", "DELETE"})
_API_PREFIXES = ("/services/data/", "/services/apexrest/", "/cometd/")
_VERSION = re.compile(r"v\d{2}\.\d")
_ENCODER = msgspec.json.Encoder(decimal_format="number")
_DECODER = msgspec.json.Decoder(float_hook=Decimal)
_MAX_CURSORS = 100
_MAX_TOKENS = 1000

#: What ``GET /_sandbox/state`` counts (the org's writes and the wire's answers).
_COUNTERS = (
    "api_requests",
    "creates",
    "updates",
    "deletes",
    "upserts_created",
    "upserts_updated",
    "duplicates_refused",
    "refused",
    "change_events",
    "queries",
    "tokens_issued",
    "auth_refused",
    "rate_limited",
    "outage_refused",
    "injected_errors",
    "replay_waits",
    "push_sent",
    "push_failed_attempts",
    "push_dropped",
)

NonNegative = Annotated[float, Meta(ge=0)]


class Knobs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Behaviour switches, settable from Python or ``POST /_sandbox/knobs``.

    Attributes:
        latency_s: added before every call is answered.
        error_rate: fraction of write calls answered 500 or 503 (seeded).
        outage: every call is answered 503.
        feed_refused: the change feed is answered 403
            ``INSUFFICIENT_ACCESS`` (a user without "View Change Data
            Capture" rights).
        locked_writes: the next this many writes are answered 400
            ``UNABLE_TO_LOCK_ROW``, as an org answers while a user, a flow
            or a CPQ calculation holds the record.
        rate_limit_per_s: beyond it, API calls are answered 429 + Retry-After.
        push_url: where the relay POSTs change events; None pushes nothing.
        push_secrets: signing secrets; two while one is being rotated.
        push_max_attempts: deliveries per event before it is dropped.
        push_backoff_s: first retry delay; doubles per attempt (≤ 30 s).
    """

    latency_s: NonNegative = 0.0
    error_rate: Annotated[float, Meta(ge=0, le=1)] = 0.0
    outage: bool = False
    locked_writes: Annotated[int, Meta(ge=0)] = 0
    feed_refused: bool = False
    rate_limit_per_s: Annotated[float, Meta(gt=0)] | None = None
    push_url: str | None = None
    push_secrets: list[str] = msgspec.field(
        default_factory=lambda: ["sandbox-push-secret"]
    )
    push_max_attempts: Annotated[int, Meta(ge=1, le=20)] = 5
    push_backoff_s: NonNegative = 0.2


def call_options_client(header: str | None) -> str | None:
    """The ``client=`` value of a ``Sforce-Call-Options`` header, if any."""
    for option in (header or "").split(","):
        key, _, value = option.strip().partition("=")
        if key == "client" and value:
            return value
    return None


def _json(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_ENCODER.encode(data),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _error(status: int, code: str, message: str, **headers: str) -> web.Response:
    return _json([{"message": message, "errorCode": code}], status, headers)


class SalesforceSandbox(UserActions):
    """A Salesforce org with the CPQ package, faked over HTTP.

    Start it with `start` (or mount `app` in aiohttp's ``TestServer``) and
    close it with `aclose`. `org` holds the records and the change log.

    Args:
        client_id: the connected app's consumer key.
        client_secret: its consumer secret.
        seed: seeds ids, replay ids and injected errors.
        knobs: initial knobs.
        retain_events: size of the change log.
        query_batch_size: records per query page (an org uses 2000).
        clock: seconds since the epoch, for record and event timestamps.
    """

    def __init__(
        self,
        *,
        client_id: str = "q2c-broker",
        client_secret: str = "sandbox-client-secret",
        seed: int = 0,
        knobs: Knobs | None = None,
        retain_events: int = 10_000,
        query_batch_size: int = 2000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.knobs = knobs or Knobs()
        self.counts: Counter[str] = Counter()
        self._client_id = client_id
        self._client_secret = client_secret
        self._random = random.Random(seed)
        self._clock = clock
        self._batch = query_batch_size
        self._tokens: OrderedDict[str, None] = OrderedDict()
        self._cursors: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._bucket: TokenBucket | None = None
        self._push_task: asyncio.Task[None] | None = None
        self.org = Org(
            rng=random.Random(seed + 1), clock=clock, retain_events=retain_events
        )
        self.feed = ChangeFeed(
            self.org, counts=self.counts, clock=clock, target=self._push_target
        )
        self.org.on_change = self.feed.changed
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[self._middleware])
        r = self.app.router
        r.add_get("/_sandbox/state", self._state)
        r.add_get("/_sandbox/knobs", self._get_knobs)
        r.add_post("/_sandbox/knobs", self._set_knobs)
        r.add_post("/services/oauth2/token", self._token)
        data = "/services/data/{v}"
        r.add_get(data + "/sobjects/{sobject}/{rid}", self._read)
        r.add_get(data + "/sobjects/{sobject}/{field}/{value}", self._read_by_key)
        r.add_post(data + "/sobjects/{sobject}", self._create)
        r.add_patch(data + "/sobjects/{sobject}/{rid}", self._update)
        r.add_patch(data + "/sobjects/{sobject}/{field}/{value}", self._upsert)
        r.add_delete(data + "/sobjects/{sobject}/{rid}", self._delete)
        r.add_get(data + "/query", self._query)
        r.add_get(data + "/queryAll", self._query)
        r.add_get(data + "/query/{cursor}", self._query_more)
        r.add_get("/services/apexrest/SBQQ/ServiceRouter", self._service_router)
        r.add_get("/cometd/replay", self._replay)
        self.app.on_startup.append(self._on_startup)
        self.app.on_cleanup.append(self._on_cleanup)

    def __repr__(self) -> str:
        return (
            f"<SalesforceSandbox {sum(self.state()['records'].values())} records, "
            f"replay id {self.org.last_replay_id}>"
        )

    # --- lifecycle -----------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on *host*:*port* (0 picks a free port); return the base URL."""
        self._runner, url = await serve(self.app, host, port)
        return url

    async def aclose(self) -> None:
        """Stop serving and the relay (events not yet pushed are dropped)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _on_startup(self, app: web.Application) -> None:
        self._push_task = asyncio.get_running_loop().create_task(self.feed.relay())

    async def _on_cleanup(self, app: web.Application) -> None:
        task, self._push_task = self._push_task, None
        if task is not None:
            task.cancel()
            # Waits for the relay to finish cancelling; a crash in it is a bug
            # and is raised here rather than lost.
            await asyncio.wait([task])
            error = None if task.cancelled() else task.exception()
            if error is not None:
                raise error

    def _push_target(self) -> PushTarget | None:
        knobs = self.knobs
        if knobs.push_url is None:
            return None
        return PushTarget(
            url=knobs.push_url,
            secrets=tuple(knobs.push_secrets),
            max_attempts=knobs.push_max_attempts,
            backoff_s=knobs.push_backoff_s,
        )

    def expire_tokens(self) -> None:
        """Invalidate every access token, as a session timeout would."""
        self._tokens.clear()

    def rotate_client_secret(self, secret: str) -> None:
        """Give the connected app a new consumer secret, as an admin would.

        Tokens already issued stay valid until they expire; new ones need
        *secret*.
        """
        self._client_secret = secret

    def state(self) -> dict[str, Any]:
        """Counts for reports and tests (also ``GET /_sandbox/state``)."""
        live = {
            name: len(self.org.query(soql.Query(fields=("Id",), sobject=name)))
            for name in SPECS
        }
        return {
            "records": live,
            **dict.fromkeys(_COUNTERS, 0),
            **self.org.counts,
            **self.counts,
            "last_replay_id": self.org.last_replay_id,
            "retained_events": len(self.org.log),
        }

    # --- the wire: checks before every handler -------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        if request.path.startswith("/_sandbox/"):
            return await handler(request)
        knobs = self.knobs
        if knobs.latency_s > 0:
            await anyio.sleep(knobs.latency_s)
        if knobs.outage:
            self.counts["outage_refused"] += 1
            return _error(
                503,
                "SERVER_UNAVAILABLE",
                "The server is temporarily unavailable.",
                **{"Retry-After": "1"},
            )
        api = request.path.startswith(_API_PREFIXES)
        if api:
            # What an org counts against its daily API request limit.
            self.counts["api_requests"] += 1
            wait_s = self._take_token()
            if wait_s is not None:
                self.counts["rate_limited"] += 1
                return _error(
                    429,
                    "REQUEST_LIMIT_EXCEEDED",
                    "TotalRequests Limit exceeded.",
                    **{"Retry-After": str(max(1, math.ceil(wait_s)))},
                )
            if not self._authorized(request):
                self.counts["auth_refused"] += 1
                return _error(401, "INVALID_SESSION_ID", "Session expired or invalid")
            if request.method in _WRITES and knobs.locked_writes > 0:
                knobs.locked_writes -= 1
                self.counts["locked"] += 1
                return _error(
                    400,
                    "UNABLE_TO_LOCK_ROW",
                    "unable to obtain exclusive access to this record",
                )
            if request.method in _WRITES and self._inject_error():
                status = self._random.choice((500, 503))
                self.counts["injected_errors"] += 1
                if status == 500:
                    return _error(
                        500, "UNKNOWN_EXCEPTION", "An unexpected error occurred."
                    )
                return _error(
                    503, "SERVER_UNAVAILABLE", "The server is temporarily unavailable."
                )
        try:
            return await handler(request)
        except OrgError as exc:
            self.counts["refused"] += 1
            return _json(exc.body(), exc.status)

    def _inject_error(self) -> bool:
        rate = self.knobs.error_rate
        return rate > 0 and self._random.random() < rate

    def _take_token(self) -> float | None:
        """None when the call may go, else the seconds to wait.

        The bucket holds one second's worth of calls (at least one) and
        starts full whenever a limit is applied.
        """
        rate = self.knobs.rate_limit_per_s
        if rate is None:
            self._bucket = None
            return None
        if self._bucket is None or self._bucket.rate_per_s != rate:
            self._bucket = TokenBucket(rate, max(1.0, rate))
        return self._bucket.try_take() or None

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token in self._tokens

    # --- OAuth ---------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        if form.get("grant_type") != "client_credentials":
            return _json(
                {
                    "error": "unsupported_grant_type",
                    "error_description": "grant type not supported",
                },
                400,
            )
        given_id = str(form.get("client_id", ""))
        given_secret = str(form.get("client_secret", ""))
        ok_id = hmac.compare_digest(given_id.encode(), self._client_id.encode())
        ok_secret = hmac.compare_digest(
            given_secret.encode(), self._client_secret.encode()
        )
        if not (ok_id and ok_secret):
            self.counts["auth_refused"] += 1
            return _json(
                {
                    "error": "invalid_client",
                    "error_description": "invalid client credentials",
                },
                400,
            )
        token = f"{self.org.org_id[:15]}!{secrets.token_urlsafe(48)}"
        self._tokens[token] = None
        while len(self._tokens) > _MAX_TOKENS:
            self._tokens.popitem(last=False)
        self.counts["tokens_issued"] += 1
        instance = str(request.url.origin())
        issued = str(int(self._clock() * 1000))
        sig = hmac.new(
            self._client_secret.encode(), (instance + issued).encode(), hashlib.sha256
        )
        return _json(
            {
                "access_token": token,
                "instance_url": instance,
                "id": f"{instance}/id/{self.org.org_id}/{self.org.user_id}",
                "token_type": "Bearer",
                "issued_at": issued,
                "signature": base64.b64encode(sig.digest()).decode(),
            }
        )

    # --- sObjects ------------------------------------------------------------

    def _version(self, request: web.Request) -> str:
        version = request.match_info["v"]
        if not _VERSION.fullmatch(version):
            raise OrgError(404, "NOT_FOUND", "The requested resource does not exist")
        return version[1:]

    def _origin(self, request: web.Request) -> str:
        origin = f"com/salesforce/api/rest/{self._version(request)}"
        client = call_options_client(request.headers.get("Sforce-Call-Options"))
        return f"{origin};client={client}" if client else origin

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = _DECODER.decode(await request.read())
        except msgspec.DecodeError as exc:
            raise OrgError(400, "JSON_PARSER_ERROR", str(exc)) from None
        if not isinstance(body, dict):
            raise OrgError(400, "JSON_PARSER_ERROR", "Expected a JSON object")
        return body

    def _render(
        self, sobject: str, record: dict[str, Any], request: web.Request
    ) -> web.Response:
        fields = request.query.get("fields")
        if fields:
            wanted = [f.strip() for f in fields.split(",")]
            record = {"Id": record["Id"], **{f: record.get(f) for f in wanted}}
        return _json(self.org.with_attributes(sobject, record))

    async def _read(self, request: web.Request) -> web.Response:
        self._version(request)
        sobject = request.match_info["sobject"]
        record = self.org.get(sobject, request.match_info["rid"])
        return self._render(sobject, record, request)

    async def _read_by_key(self, request: web.Request) -> web.Response:
        self._version(request)
        sobject, field = request.match_info["sobject"], request.match_info["field"]
        self._external_id(sobject, field)
        record_id = self.org.find(sobject, field, request.match_info["value"])
        if record_id is None:
            raise OrgError(404, "NOT_FOUND", "The requested resource does not exist")
        return self._render(sobject, self.org.get(sobject, record_id), request)

    async def _create(self, request: web.Request) -> web.Response:
        origin = self._origin(request)
        body = await self._body(request)
        with self.org.transaction(origin) as txn:
            record_id = self.org.create(txn, request.match_info["sobject"], body)
        return _json({"id": record_id, "success": True, "errors": []}, 201)

    async def _update(self, request: web.Request) -> web.Response:
        origin = self._origin(request)
        body = await self._body(request)
        with self.org.transaction(origin) as txn:
            self.org.update(
                txn, request.match_info["sobject"], request.match_info["rid"], body
            )
        return web.Response(status=204)

    def _external_id(self, sobject: str, field: str) -> None:
        if field != "Id" and field not in self.org.spec(sobject).external_ids:
            raise OrgError(
                404,
                "NOT_FOUND",
                "Provided external ID field does not exist or is not accessible: "
                f"{field}",
            )

    async def _upsert(self, request: web.Request) -> web.Response:
        origin = self._origin(request)
        sobject, field = request.match_info["sobject"], request.match_info["field"]
        value = request.match_info["value"]
        self._external_id(sobject, field)
        body = await self._body(request)
        existing = self.org.find(sobject, field, value)
        with self.org.transaction(origin) as txn:
            if existing is not None:
                self.org.update(txn, sobject, existing, body)
                self.counts["upserts_updated"] += 1
                return web.Response(status=204)
            if field == "Id":
                raise OrgError(
                    404, "NOT_FOUND", "The requested resource does not exist"
                )
            record_id = self.org.create(txn, sobject, {**body, field: value})
        self.counts["upserts_created"] += 1
        return _json(
            {"id": record_id, "success": True, "errors": [], "created": True}, 201
        )

    async def _delete(self, request: web.Request) -> web.Response:
        origin = self._origin(request)
        with self.org.transaction(origin) as txn:
            self.org.delete(
                txn, request.match_info["sobject"], request.match_info["rid"]
            )
        return web.Response(status=204)

    # --- queries -------------------------------------------------------------

    async def _query(self, request: web.Request) -> web.Response:
        version = self._version(request)
        try:
            query = soql.parse(request.query.get("q", ""))
        except soql.SoqlError as exc:
            raise OrgError(400, "MALFORMED_QUERY", str(exc)) from None
        rows = self.org.query(query, deleted=request.path.endswith("/queryAll"))
        records = [self.org.project(query, row) for row in rows]
        self.counts["queries"] += 1
        return self._page(version, records, 0)

    def _page(
        self, version: str, records: list[dict[str, Any]], start: int
    ) -> web.Response:
        end = start + self._batch
        body: dict[str, Any] = {
            "totalSize": len(records),
            "done": end >= len(records),
            "records": records[start:end],
        }
        if end < len(records):
            cursor = f"01g{secrets.token_hex(8)}"
            self._cursors[cursor] = records
            while len(self._cursors) > _MAX_CURSORS:
                self._cursors.popitem(last=False)
            body["nextRecordsUrl"] = f"/services/data/v{version}/query/{cursor}-{end}"
        return _json(body)

    async def _query_more(self, request: web.Request) -> web.Response:
        version = self._version(request)
        cursor, _, offset = request.match_info["cursor"].rpartition("-")
        records = self._cursors.get(cursor)
        if records is None or not offset.isdigit():
            raise OrgError(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
        return self._page(version, records, int(offset))

    # --- CPQ API -------------------------------------------------------------

    async def _service_router(self, request: web.Request) -> web.Response:
        reader = request.query.get("reader")
        if reader != QUOTE_READER:
            raise OrgError(400, "APEX_ERROR", f"Unsupported reader: {reader}")
        model = self.org.quote_model(request.query.get("uid", ""))
        return _json(_ENCODER.encode(model).decode())

    # --- change feed ---------------------------------------------------------

    async def _replay(self, request: web.Request) -> web.Response:
        if self.knobs.feed_refused:
            self.counts["feed_refused"] += 1
            return _error(
                403,
                "INSUFFICIENT_ACCESS",
                "insufficient access rights to the change data capture channel",
            )
        return _json(await self.feed.replay(request.query))

    # --- sandbox control -----------------------------------------------------

    async def _state(self, request: web.Request) -> web.Response:
        return _json(self.state())

    async def _get_knobs(self, request: web.Request) -> web.Response:
        return _json(self.knobs)

    async def _set_knobs(self, request: web.Request) -> web.Response:
        try:
            changes = msgspec.json.decode(await request.read(), type=dict[str, Any])
            merged = msgspec.convert(
                {**msgspec.to_builtins(self.knobs), **changes}, Knobs
            )
        except msgspec.DecodeError as exc:
            return _json({"error": str(exc)}, 400)
        # In place: code holding `sandbox.knobs` sees the change.
        for name in msgspec.structs.fields(Knobs):
            setattr(self.knobs, name.name, getattr(merged, name.name))
        return _json(self.knobs)
