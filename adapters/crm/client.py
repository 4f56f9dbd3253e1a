"""A typed async client for a Salesforce org's REST API.

`SalesforceClient` fetches an access token with the OAuth 2.0
client-credentials grant and uses the ``instance_url`` it returns as the
API base. A 401 ``INVALID_SESSION_ID`` (an expired session) fetches a new
token once and repeats the call. Every call sends ``Sforce-Call-Options:
client=<client_id>``, so change events caused by the broker's own writes
carry that id in ``changeOrigin`` and can be dropped as echoes.

Errors are translated here and nowhere else: 429, 5xx, 403
``REQUEST_LIMIT_EXCEEDED``, timeouts and connection failures raise
`UpstreamUnavailable` (with ``Retry-After`` when given); other refusals
raise `UpstreamRejected` with Salesforce's ``errorCode`` (or the OAuth
``error``) as ``code``.

Refused credentials are `UpstreamUnavailable` too, not a refusal of the
request: the token endpoint's ``invalid_client``, ``invalid_grant`` or
``unauthorized_client`` (or its 401), and a 401 that a new token does not
cure. No command can succeed until an operator fixes the secret (during a
rotation, say), so every command must wait (the system actor's breaker
opens) rather than be dead-lettered at full rate. The message names the
system and the OAuth error, never the secret.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, TypeVar, cast
from urllib.parse import quote

import aiohttp
import anyio
import msgspec
from msgspec import Meta

from adapters.crm import soql
from adapters.crm.views import (
    ApiError,
    ChangeEvent,
    OAuthError,
    QueryResult,
    SaveResult,
    SObject,
    TokenResponse,
    UndecodableChange,
    decode_cometd_each,
)
from adapters.session import SessionClient, read_bounded, retry_after_s
from broker.config import Section
from broker.errors import UpstreamRejected, UpstreamUnavailable

__all__ = [
    "SalesforceSettings",
    "SalesforceClient",
    "UpsertResult",
]

S = TypeVar("S", bound=SObject)
T = TypeVar("T")

_ENCODER = msgspec.json.Encoder(decimal_format="number")
_ERRORS = msgspec.json.Decoder(tuple[ApiError, ...])
_OAUTH_ERROR = msgspec.json.Decoder(OAuthError)
#: Error codes an org answers with 4xx that pass with time: its API limit, and
#: a record locked by a user, a flow or a CPQ calculation while we write it.
_TRANSIENT_CODES = frozenset({"REQUEST_LIMIT_EXCEEDED", "UNABLE_TO_LOCK_ROW"})
#: The token endpoint's answers (RFC 6749 §5.2) that mean our credentials,
#: not the request, were refused: a wrong or rotated secret, a disabled or
#: misconfigured connected app, a user without API access.
_CREDENTIALS_REFUSED = frozenset(
    {"invalid_client", "invalid_grant", "unauthorized_client"}
)
_TOKEN_PATH = "/services/oauth2/token"


class SalesforceSettings(Section, frozen=True):
    """``[systems.<name>]`` for a Salesforce org.

    Attributes:
        login_url: where the token endpoint is (``https://login.salesforce.com``
            or the org's My Domain URL).
        client_id: the connected app's consumer key; also the
            ``Sforce-Call-Options`` client id that marks our own writes.
        client_secret: its consumer secret (from the environment, never a file
            in the repository).
        api_version: REST API version, ``NN.N``.
        timeout_s: per request.
        default_currency: the currency of a single-currency org (records
            there have no ``CurrencyIsoCode``).
        webhook_secrets: the signing relay's active secrets, for
            `adapters.crm.ingress.SalesforceWebhook` (two during a rotation).
        webhook_tolerance_s: how old (or new) a push's ``t`` may be.
    """

    login_url: str
    client_id: Annotated[str, Meta(min_length=1)]
    client_secret: str = ""
    api_version: Annotated[str, Meta(pattern=r"^\d{2}\.\d\Z")] = "60.0"
    timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    default_currency: Annotated[str, Meta(pattern=r"^[A-Z]{3}\Z")] = "USD"
    webhook_secrets: tuple[str, ...] = ()
    webhook_tolerance_s: Annotated[float, Meta(gt=0)] = 300.0

    def __repr__(self) -> str:
        return (
            f"SalesforceSettings(login_url={self.login_url!r}, "
            f"client_id={self.client_id!r}, client_secret=<hidden>, "
            f"webhook_secrets=<{len(self.webhook_secrets)} hidden>)"
        )


class UpsertResult(msgspec.Struct, frozen=True, kw_only=True):
    """What an upsert did. ``id`` is None when it updated (204 has no body)."""

    id: str | None
    created: bool


#: The field our writes stamp with the command's key.
_STAMP = "Broker_Command_Key__c"


class SalesforceClient(SessionClient):
    """The REST API of one org, on one `aiohttp.ClientSession`.

    Use it as an async context manager, or call `aclose`. A session passed
    in is borrowed and not closed.

    Args:
        settings: where and who.
        session: an existing session to borrow.
        system: the configured system name, used in errors.
    """

    def __init__(
        self,
        settings: SalesforceSettings,
        *,
        session: aiohttp.ClientSession | None = None,
        system: str = "crm",
    ) -> None:
        self.settings = settings
        self.system = system
        super().__init__(session)
        self._timeout = aiohttp.ClientTimeout(total=settings.timeout_s)
        self._auth: tuple[str, str] | None = None
        self._auth_lock = anyio.Lock()
        self._base = f"/services/data/v{settings.api_version}"

    # --- records -------------------------------------------------------------

    async def carries_key(self, view: type[SObject], record_id: str, key: str) -> bool:
        """Whether the record already carries the command *key* (a repeat: skip it).

        Our writes stamp ``Broker_Command_Key__c`` with the command's key, so a
        redelivered command finds its own stamp and writes nothing.

        Raises:
            UpstreamRejected: ``NOT_FOUND`` and others.
            UpstreamUnavailable: see the module docstring.
        """
        current = await self.get(view, record_id, fields=(_STAMP,))
        return getattr(current, _STAMP, None) == key

    async def get(
        self, view: type[S], record_id: str, *, fields: Sequence[str] = ()
    ) -> S:
        """Read one record.

        Raises:
            UpstreamRejected: ``NOT_FOUND`` (or ``ENTITY_IS_DELETED``) and others.
            UpstreamUnavailable: see the module docstring.
        """
        params = {"fields": ",".join(fields)} if fields else None
        path = f"{self._base}/sobjects/{view.sobject_type}/{record_id}"
        _, body = await self._call("GET", path, params=params)
        return self._decode(body, view, path)

    async def find(
        self, view: type[S], value: str, *, field: str = "Broker_Key__c"
    ) -> S | None:
        """Read the record whose external id *field* is *value*; None if none.

        Raises:
            UpstreamRejected: other refusals (an unknown external-id field).
            UpstreamUnavailable: see the module docstring.
        """
        path = (
            f"{self._base}/sobjects/{view.sobject_type}/{field}/{quote(value, safe='')}"
        )
        try:
            _, body = await self._call("GET", path)
        except UpstreamRejected as exc:
            # NOT_FOUND also answers an unknown external-id field: that one is a bug.
            if exc.code == "NOT_FOUND" and "external ID field" not in exc.detail:
                return None
            raise
        return self._decode(body, view, path)

    async def create(self, record: SObject) -> str:
        """Insert *record*; return its id. Not idempotent: prefer `upsert`.

        Raises:
            UpstreamRejected: e.g. ``REQUIRED_FIELD_MISSING``, ``DUPLICATE_VALUE``.
            UpstreamUnavailable: see the module docstring.
        """
        path = f"{self._base}/sobjects/{record.sobject_type}"
        _, body = await self._call("POST", path, payload=record)
        return self._decode(body, SaveResult, path).id

    async def update(self, record_id: str, record: SObject) -> None:
        """PATCH the fields set on *record* (None fields are left alone).

        Raises:
            UpstreamRejected: e.g. ``NOT_FOUND``, ``FIELD_CUSTOM_VALIDATION_EXCEPTION``.
            UpstreamUnavailable: see the module docstring.
        """
        path = f"{self._base}/sobjects/{record.sobject_type}/{record_id}"
        await self._call("PATCH", path, payload=record)

    async def upsert(
        self, record: SObject, *, key: str, field: str = "Broker_Key__c"
    ) -> UpsertResult:
        """Create or update the record whose external id *field* is *key*.

        The same call twice has one effect: this is how writes stay
        idempotent across redeliveries.

        Raises:
            UpstreamRejected: ``MULTIPLE_CHOICES`` when *key* matches several
                records, and other refusals.
            UpstreamUnavailable: see the module docstring.
        """
        path = (
            f"{self._base}/sobjects/{record.sobject_type}/{field}/{quote(key, safe='')}"
        )
        status, body = await self._call("PATCH", path, payload=record)
        if status == 201:
            return UpsertResult(
                id=self._decode(body, SaveResult, path).id, created=True
            )
        if body:
            saved = self._decode(body, SaveResult, path)
            return UpsertResult(id=saved.id, created=bool(saved.created))
        return UpsertResult(id=None, created=False)

    async def delete(self, view: type[SObject], record_id: str) -> None:
        """Delete a record (to the recycle bin).

        Raises:
            UpstreamRejected: e.g. ``NOT_FOUND``.
            UpstreamUnavailable: see the module docstring.
        """
        await self._call(
            "DELETE", f"{self._base}/sobjects/{view.sobject_type}/{record_id}"
        )

    async def query(
        self,
        text: str,
        view: type[S],
        *,
        max_records: int = 2000,
        include_deleted: bool = False,
    ) -> tuple[S, ...]:
        """Every record of a SOQL query, following ``nextRecordsUrl``.

        Args:
            text: the query; build it with `adapters.crm.soql.select`.
            view: the record view to decode into.
            max_records: a bound on what is held in memory.
            include_deleted: ``queryAll``: include the recycle bin.

        Raises:
            UpstreamRejected: ``MALFORMED_QUERY``, ``INVALID_FIELD``, or
                ``QUERY_TOO_LARGE`` beyond *max_records*.
            UpstreamUnavailable: see the module docstring.
        """
        path = f"{self._base}/{'queryAll' if include_deleted else 'query'}"
        params: dict[str, str] | None = {"q": text}
        records: list[S] = []
        while True:
            _, body = await self._call("GET", path, params=params)
            # QueryResult[view] is parametrised at run time; mypy sees the base.
            page = cast(QueryResult[S], self._decode(body, QueryResult[view], path))  # type: ignore[valid-type]
            records.extend(page.records)
            if len(records) > max_records:
                raise UpstreamRejected(
                    self.system,
                    f"query returned more than {max_records} records",
                    code="QUERY_TOO_LARGE",
                )
            if page.done or not page.next_records_url:
                return tuple(records)
            path, params = page.next_records_url, None

    async def select(
        self,
        view: type[S],
        fields: Sequence[str],
        where: Mapping[str, str | bool | Sequence[str]],
    ) -> tuple[S, ...]:
        """`query` of ``SELECT fields FROM view WHERE k = 'v' AND ...``, quoted."""
        return await self.query(soql.select(view.sobject_type, fields, where), view)

    # --- other endpoints ----------------------------------------------------

    async def apex_get(self, path: str, params: Mapping[str, str]) -> bytes:
        """GET an Apex REST resource under ``/services/apexrest/``; the raw body.

        Raises:
            UpstreamRejected: refusals (``APEX_ERROR``, ``NOT_FOUND``).
            UpstreamUnavailable: see the module docstring.
        """
        _, body = await self._call("GET", f"/services/apexrest/{path}", params=params)
        return body

    async def replay(
        self, channel: str, after_replay_id: int, *, limit: int = 100, wait_s: float = 0
    ) -> tuple[ChangeEvent, ...]:
        """Change events on *channel* after *after_replay_id* (``-2`` all, ``-1`` new).

        Raises:
            UpstreamRejected: ``INVALID_REPLAY_ID`` when the id is older than
                the org retains (re-read, then resume from ``-1``).
            UpstreamUnavailable: see the module docstring.
        """
        events = []
        for event in await self.replay_each(
            channel, after_replay_id, limit=limit, wait_s=wait_s
        ):
            if isinstance(event, UndecodableChange):
                raise UpstreamRejected(
                    self.system,
                    f"change feed: {event.error}",
                    code="MALFORMED_RESPONSE",
                )
            events.append(event)
        return tuple(events)

    async def replay_each(
        self, channel: str, after_replay_id: int, *, limit: int = 100, wait_s: float = 0
    ) -> tuple[ChangeEvent | UndecodableChange, ...]:
        """`replay`, decoded message by message (`decode_cometd_each`).

        A message that is not a change event we can read comes back in its
        place as an `UndecodableChange`, so that a reader can keep it and
        move past it.

        Raises:
            UpstreamRejected: ``INVALID_REPLAY_ID`` as for `replay`;
                ``MALFORMED_RESPONSE`` when the answer is not JSON at all.
            UpstreamUnavailable: see the module docstring.
        """
        params = {
            "channel": channel,
            "replayId": str(after_replay_id),
            "limit": str(limit),
            "wait_s": str(wait_s),
        }
        _, body = await self._call("GET", "/cometd/replay", params=params)
        try:
            return decode_cometd_each(body)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamRejected(
                self.system, f"change feed: {exc}", code="MALFORMED_RESPONSE"
            ) from exc

    # --- the wire ------------------------------------------------------------

    async def _call(
        self,
        method: str,
        path: str,
        *,
        payload: SObject | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        data = _ENCODER.encode(payload) if payload is not None else None
        for attempt in (1, 2):
            token, instance = await self._token()
            headers = {
                "Authorization": f"Bearer {token}",
                "Sforce-Call-Options": f"client={self.settings.client_id}",
                "Accept": "application/json",
            }
            if data is not None:
                headers["Content-Type"] = "application/json"
            status, response_headers, body = await self._send(
                method, instance + path, headers=headers, data=data, params=params
            )
            if status == 401:
                # The session expired: one new token, one more try. A new
                # token refused too: our credentials are not accepted.
                self._forget(token)
                if attempt == 1:
                    continue
                raise self._credentials_refused(method, path, status, body)
            self._check(method, path, status, response_headers, body)
            return status, body
        raise AssertionError("unreachable")  # pragma: no cover

    async def _token(self) -> tuple[str, str]:
        auth = self._auth
        if auth is not None:
            return auth
        async with self._auth_lock:
            if self._auth is not None:
                return self._auth
            url = self.settings.login_url.rstrip("/") + _TOKEN_PATH
            form = {
                "grant_type": "client_credentials",
                "client_id": self.settings.client_id,
                "client_secret": self.settings.client_secret,
            }
            status, headers, body = await self._send(
                "POST", url, headers={"Accept": "application/json"}, form=form
            )
            if status == 401 or (
                status == 400 and _error_of(body)[0] in _CREDENTIALS_REFUSED
            ):
                raise self._credentials_refused("POST", _TOKEN_PATH, status, body)
            self._check("POST", _TOKEN_PATH, status, headers, body)
            token = self._decode(body, TokenResponse, _TOKEN_PATH)
            self._auth = (token.access_token, token.instance_url.rstrip("/"))
            return self._auth

    def _credentials_refused(
        self, method: str, path: str, status: int, body: bytes
    ) -> UpstreamUnavailable:
        """The org does not accept our credentials: transient, so commands wait.

        The breaker counts it and opens; commands wait for the operator to
        fix the secret instead of being dead-lettered one by one.
        """
        code, message = _error_of(body)
        said = f"{code}: {message}".strip(": ")[:200]
        secret = self.settings.client_secret
        if secret:
            said = said.replace(secret, "<hidden>")
        return UpstreamUnavailable(
            self.system,
            f"its credentials were refused ({method} {path}: HTTP {status}"
            f"{' ' + said if said else ''}); check the connected app's "
            f"client id and secret",
        )

    def _forget(self, token: str) -> None:
        if self._auth is not None and self._auth[0] == token:
            self._auth = None

    async def _send(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        data: bytes | None = None,
        form: Mapping[str, str] | None = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        what = f"{method} {url.split('?', 1)[0]}"
        try:
            async with self._session.request(
                method,
                url,
                headers=headers,
                data=form if form is not None else data,
                params=params,
                timeout=self._timeout,
            ) as response:
                body = await read_bounded(response)
                return response.status, response.headers, body
        except TimeoutError as exc:
            raise UpstreamUnavailable(
                self.system, f"{what}: no answer within {self.settings.timeout_s} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(
                self.system, f"{what}: {type(exc).__name__}: {exc}"
            ) from exc

    def _check(
        self,
        method: str,
        path: str,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        if 200 <= status < 300:
            return
        code, message = _error_of(body)
        detail = f"{method} {path}: HTTP {status} {code}: {message}".rstrip(": ")
        if status == 429 or status >= 500 or code in _TRANSIENT_CODES:
            raise UpstreamUnavailable(
                self.system,
                detail,
                retry_after_s=retry_after_s(headers.get("Retry-After")),
            )
        if status == 300:
            code = "MULTIPLE_CHOICES"
        raise UpstreamRejected(self.system, detail, code=code or f"HTTP_{status}")

    def _decode(self, body: bytes, view: type[T], path: str) -> T:
        try:
            return msgspec.json.decode(body, type=view)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise UpstreamRejected(
                self.system,
                f"{path}: unexpected response: {exc}",
                code="MALFORMED_RESPONSE",
            ) from exc


def _error_of(body: bytes) -> tuple[str, str]:
    """``(errorCode, message)`` from a REST error array or an OAuth error."""
    try:
        errors = _ERRORS.decode(body)
    except (msgspec.DecodeError, RecursionError):
        pass
    else:
        if errors:
            return errors[0].error_code, "; ".join(e.message for e in errors)
        return "", ""
    try:
        oauth = _OAUTH_ERROR.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return "", body[:200].decode("utf-8", "replace")
    return oauth.error, oauth.error_description
