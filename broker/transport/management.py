"""The RabbitMQ management HTTP API, as far as the daemon uses it.

`broker.transport.declare` PUTs the topology's policies through it, and
``brokerctl queues`` reads the queue counts of the daemon's vhost. Both log
in with the credentials of the ``[amqp] url`` and address its vhost.

The credentials go into the ``Authorization`` header and nowhere else: any
user information in the management URL itself is dropped, and every URL in
an error message or a log line is the redacted one.

Failures are translated here, where aiohttp is called: an API that cannot
be reached or answers with an error is `TransportUnavailable`; a login it
refuses is a `ConfigError`, naming the fix.
"""

from __future__ import annotations

import base64
import ssl
import urllib.parse
from typing import final

import aiohttp
import msgspec
import yarl

from broker.errors import ConfigError, TransportUnavailable

__all__ = ["ManagementApi", "QueueCounts", "list_queues", "redacted", "vhost_of"]

_QUEUE_COLUMNS = "name,type,messages_ready,messages_unacknowledged,consumers"


class QueueCounts(msgspec.Struct, frozen=True, kw_only=True):
    """One queue's message and consumer counts, as ``brokerctl queues`` shows them.

    A count is ``None`` when the broker has not reported it yet (RabbitMQ
    publishes queue statistics every few seconds, so a queue declared a
    moment ago has none).
    """

    name: str
    type: str
    ready: int | None = None
    unacked: int | None = None
    consumers: int | None = None


class _ManagedQueue(msgspec.Struct):
    """The fields of one ``GET /api/queues/{vhost}`` item that are used."""

    name: str
    type: str = "classic"
    messages_ready: int | None = None
    messages_unacknowledged: int | None = None
    consumers: int | None = None


_queues_decoder = msgspec.json.Decoder(list[_ManagedQueue])


@final
class ManagementApi:
    """Where the management API is and how to log in to it, for one vhost.

    Args:
        amqp_url: the daemon's AMQP URL; its user and password (default
            ``guest``) log in, and its vhost is the one addressed.
        management_url: the API's base URL, e.g. ``http://127.0.0.1:15672``.
        timeout_s: bound on each HTTP call.
        tls: the context for an ``https://`` API (`broker.transport.tls`);
            ``None`` uses the system's defaults.
    """

    def __init__(
        self,
        amqp_url: str,
        management_url: str,
        *,
        timeout_s: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        amqp = yarl.URL(amqp_url)
        credentials = f"{amqp.user or 'guest'}:{amqp.password or 'guest'}".encode()
        self._headers = {
            "Authorization": "Basic " + base64.b64encode(credentials).decode()
        }
        self._base = redacted(management_url).rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._tls = tls
        self.vhost = vhost_of(amqp_url)

    def __repr__(self) -> str:
        return f"<ManagementApi {self._base} vhost {self.vhost!r}>"

    @property
    def location(self) -> str:
        """The API's base URL, without credentials: safe to log and to show."""
        return self._base

    def session(self) -> aiohttp.ClientSession:
        """A client session that logs in; use it as an async context manager."""
        return aiohttp.ClientSession(
            headers=self._headers,
            timeout=self._timeout,
            connector=aiohttp.TCPConnector(ssl=self._tls or True),
        )

    def url(self, collection: str, *names: str) -> yarl.URL:
        """``<base>/api/<collection>/<vhost>/<names…>``, each part percent-encoded."""
        parts = "/".join(urllib.parse.quote(p, safe="") for p in (self.vhost, *names))
        return yarl.URL(f"{self._base}/api/{collection}/{parts}", encoded=True)


async def list_queues(api: ManagementApi, *, prefix: str = "q2c.") -> list[QueueCounts]:
    """The queues of *api*'s vhost whose names start with *prefix*, by name.

    Raises:
        ConfigError: the API refused the login (wrong password, or a user
            without the ``monitoring`` or ``management`` tag).
        TransportUnavailable: the API cannot be reached, does not know the
            vhost, or answered with an error or something unreadable.
    """
    target = api.url("queues").with_query(columns=_QUEUE_COLUMNS)
    where = f"the RabbitMQ management API at {api.location}"
    try:
        async with api.session() as session, session.get(target) as resp:
            if resp.status == 401:
                raise ConfigError(
                    f"{where} refused the login of the [amqp] url's user (HTTP 401): "
                    "check its password, and that it has the management tag"
                )
            if resp.status == 404:
                raise TransportUnavailable(f"{where} does not know vhost {api.vhost!r}")
            if resp.status >= 300:
                raise TransportUnavailable(
                    f"{where} answered HTTP {resp.status} to GET /api/queues"
                )
            body = await resp.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise TransportUnavailable(
            f"{where} is unreachable: {type(exc).__name__}: {exc}"
        ) from exc
    try:
        listed = _queues_decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise TransportUnavailable(
            f"{where} answered GET /api/queues with something unreadable: {exc}"
        ) from exc
    return [
        QueueCounts(
            name=q.name,
            type=q.type,
            ready=q.messages_ready,
            unacked=q.messages_unacknowledged,
            consumers=q.consumers,
        )
        for q in sorted(listed, key=lambda q: q.name)
        if q.name.startswith(prefix)
    ]


def vhost_of(url: str) -> str:
    """The vhost of an AMQP URL, decoded the way aiormq decodes it."""
    path = yarl.URL(url).path
    if path in ("", "/"):
        return "/"
    return path[1:].replace("%2F", "/")


def redacted(url: str) -> str:
    """*url* without user information, safe to log."""
    return str(yarl.URL(url).with_user(None))
