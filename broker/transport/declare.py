"""Declare a `Topology` on RabbitMQ: policies, exchanges, queues and bindings.

Declaring is idempotent, so the daemon runs it at every start and after every
reconnect. Exchanges, queues and bindings go over AMQP on a short-lived
connection named ``q2c-broker topology``; policies go to the management HTTP
API (``PUT /api/policies/{vhost}/{name}``) with the AMQP URL's credentials.
The policies go first, once the broker answered, so that a new queue is born
with its limits and dead-letter settings.

An unreachable management API is not fatal: the queues work without their
policies, but the delivery-limit backstop, the dead-letter exchange of the
work queues and the length limits are then missing, and a warning says so.

Failures are translated here, where aio-pika is called:

* the broker is unreachable, refuses the login or drops the connection:
  `TransportUnavailable`;
* an exchange or queue already exists with other arguments
  (``PRECONDITION_FAILED``), an exchange type is unknown because its plugin
  is off, or the user may not configure: `ConfigError`, naming the object,
  the argument and the fix.
"""

from __future__ import annotations

import re
import ssl
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aio_pika
import aiohttp
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange
from aiormq.exceptions import (
    AMQPError,
    ChannelAccessRefused,
    ChannelPreconditionFailed,
    ConnectionCommandInvalid,
)

from broker.config import AuthMechanism
from broker.errors import ConfigError, TransportUnavailable
from broker.transport.management import ManagementApi, vhost_of
from broker.transport.topology import Topology

__all__ = [
    "CONNECTION_NAME",
    "PLUGIN_FOR_EXCHANGE_TYPE",
    "check_plugins",
    "declare_topology",
]

log = structlog.get_logger(__name__)

CONNECTION_NAME = "q2c-broker topology"

#: Exchange types that exist only when a plugin is enabled.
PLUGIN_FOR_EXCHANGE_TYPE = {
    "x-consistent-hash": "rabbitmq_consistent_hash_exchange",
}

_CONNECTION_ERRORS = (AMQPError, OSError, TimeoutError)
# "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue 'q' in vhost
# 'v': received 'classic' but current is 'quorum'"
_MISMATCH = re.compile(
    r"(?:inequivalent|invalid) arg '(?P<arg>[^']+)' for "
    r"(?P<kind>queue|exchange) '(?P<name>[^']+)' in vhost '[^']*': ?(?P<detail>.*)"
)
_UNKNOWN_TYPE = re.compile(r"(?:unknown|invalid) exchange type '(?P<type>[^']+)'")


async def declare_topology(
    url: str,
    topology: Topology,
    *,
    management_url: str | None,
    apply_policies: bool = True,
    timeout_s: float = 10.0,
    tls: ssl.SSLContext | None = None,
    mechanism: AuthMechanism = "plain",
) -> None:
    """Apply the policies of *topology*, then declare its exchanges, queues, bindings.

    Args:
        url: the AMQP URL; its vhost and credentials are used for both APIs.
        topology: what to declare, usually from `build_topology`.
        management_url: base URL of the management API, e.g.
            ``http://127.0.0.1:15672``; ``None`` skips the policies (warned).
        apply_policies: ``False`` when operators manage the policies.
        timeout_s: bound on the connect and on each declare or HTTP call.
        tls: the context for ``amqps://`` and ``https://`` URLs
            (`broker.transport.tls`); ``None`` uses the system's defaults.
        mechanism: the AMQP login, as `WireConnection.open`'s; with
            ``"external"`` the URL's credentials serve the management API only.

    Raises:
        TransportUnavailable: the broker cannot be reached or dropped us.
        ConfigError: the broker refused the topology (conflicting arguments,
            an exchange type whose plugin is off, missing permissions), or
            the management API refused a policy definition as invalid.
    """
    with _amqp_errors():
        connection = await aio_pika.connect(
            _with_login(url, mechanism),
            timeout=timeout_s,
            ssl_context=tls,
            client_properties={"connection_name": CONNECTION_NAME},
        )
        try:
            if apply_policies:
                await _apply_policies(url, topology, management_url, timeout_s, tls)
            channel = await connection.channel(publisher_confirms=False)
            await _declare(channel, topology, timeout_s)
        finally:
            await connection.close()
    log.info(
        "topology_declared",
        vhost=vhost_of(url),
        exchanges=len(topology.exchanges),
        queues=len(topology.queues),
        bindings=len(topology.bindings),
    )


def _with_login(url: str, mechanism: AuthMechanism) -> str:
    """*url* with aiormq's ``auth`` query parameter for the EXTERNAL login."""
    if mechanism == "plain":
        return url
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query)
    query = [(k, v) for k, v in query if k != "auth"] + [("auth", "external")]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


async def check_plugins(
    url: str, topology: Topology, *, timeout_s: float = 10.0
) -> None:
    """Fail fast if an exchange type *topology* needs is not enabled on the broker.

    Declares, then deletes, one throw-away exchange per plugin-provided type
    (``q2c.probe.<type>``, not durable), so it needs configure permission on
    ``q2c.*`` like `declare_topology` does. `declare_topology` raises the same
    error on its own; this check is for a preflight (``brokerd check``).

    Raises:
        ConfigError: a plugin is off; the message holds the command that
            enables it.
        TransportUnavailable: the broker cannot be reached.
    """
    needed = sorted(
        {ex.type for ex in topology.exchanges if ex.type in PLUGIN_FOR_EXCHANGE_TYPE}
    )
    if not needed:
        return
    with _amqp_errors():
        connection = await aio_pika.connect(
            url,
            timeout=timeout_s,
            client_properties={"connection_name": CONNECTION_NAME},
        )
        try:
            channel = await connection.channel(publisher_confirms=False)
            for exchange_type in needed:
                probe = await channel.declare_exchange(
                    f"q2c.probe.{exchange_type}",
                    exchange_type,
                    durable=False,
                    timeout=timeout_s,
                )
                await probe.delete(timeout=timeout_s)
        finally:
            await connection.close()


async def _declare(
    channel: AbstractChannel, topology: Topology, timeout_s: float
) -> None:
    """Declare in dependency order: exchanges, queues, then bindings."""
    exchanges: dict[str, AbstractExchange] = {}
    for ex in topology.exchanges:
        exchanges[ex.name] = await channel.declare_exchange(
            ex.name,
            ex.type,
            durable=True,
            arguments=ex.arguments or None,
            timeout=timeout_s,
        )
    queues = {
        q.name: await channel.declare_queue(
            q.name, durable=True, arguments=q.arguments or None, timeout=timeout_s
        )
        for q in topology.queues
    }
    for binding in topology.bindings:
        if binding.destination_type == "queue":
            await queues[binding.destination].bind(
                binding.source, binding.routing_key, timeout=timeout_s
            )
        else:
            await exchanges[binding.destination].bind(
                binding.source, binding.routing_key, timeout=timeout_s
            )


@contextmanager
def _amqp_errors() -> Iterator[None]:
    """Translate aio-pika/aiormq failures into the broker's error tree."""
    try:
        yield
    except _CONNECTION_ERRORS as exc:
        text = str(exc.args[0]) if exc.args else str(exc)
        if isinstance(exc, ConnectionCommandInvalid) and (
            m := _UNKNOWN_TYPE.search(text)
        ):
            raise _unknown_type_error(m["type"]) from exc
        if isinstance(exc, ChannelPreconditionFailed):
            raise _mismatch_error(text) from exc
        if isinstance(exc, ChannelAccessRefused):
            raise ConfigError(
                f"RabbitMQ refused to declare the topology ({text}): give the "
                "user configure permission on '^q2c\\.', or set "
                "topology.declare = false and declare it from a definitions file"
            ) from exc
        raise TransportUnavailable(
            f"declaring the topology failed: {type(exc).__name__}: {text}"
        ) from exc


def _unknown_type_error(exchange_type: str) -> ConfigError:
    plugin = PLUGIN_FOR_EXCHANGE_TYPE.get(exchange_type)
    if plugin is None:
        return ConfigError(f"RabbitMQ does not know exchange type {exchange_type!r}")
    return ConfigError(
        f"RabbitMQ does not know exchange type {exchange_type!r}: the plugin "
        f"{plugin} is off; enable it: rabbitmq-plugins enable {plugin}"
    )


def _mismatch_error(text: str) -> ConfigError:
    m = _MISMATCH.search(text)
    if m is None:
        return ConfigError(f"RabbitMQ refused a declaration: {text}")
    return ConfigError(
        f"{m['kind']} {m['name']!r} already exists with a different "
        f"{m['arg']!r} ({m['detail'].strip()}); arguments cannot change in "
        f"place: drain and delete the {m['kind']}, or change the config back"
    )


async def _apply_policies(
    url: str,
    topology: Topology,
    management_url: str | None,
    timeout_s: float,
    tls: ssl.SSLContext | None,
) -> None:
    """PUT every policy; warn (never raise) when the API cannot be reached."""
    if management_url is None:
        _policies_not_applied("no management URL is configured")
        return
    api = ManagementApi(url, management_url, timeout_s=timeout_s, tls=tls)
    try:
        async with api.session() as session:
            for policy in topology.policies:
                body: dict[str, Any] = {
                    "pattern": policy.pattern,
                    "definition": policy.definition,
                    "apply-to": policy.apply_to,
                    "priority": policy.priority,
                }
                target = api.url("policies", policy.name)
                async with session.put(target, json=body) as resp:
                    if resp.status == 400:
                        raise ConfigError(
                            f"RabbitMQ refused policy {policy.name!r}: "
                            f"{await resp.text()}"
                        )
                    if resp.status >= 300:
                        _policies_not_applied(
                            f"PUT policy {policy.name!r} answered HTTP {resp.status} "
                            "(does the user have the policymaker tag?)"
                        )
                        return
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        _policies_not_applied(
            f"management API at {api.location} unreachable: {type(exc).__name__}: {exc}"
        )
        return
    log.info(
        "policies_applied",
        vhost=api.vhost,
        policies=[p.name for p in topology.policies],
    )


def _policies_not_applied(reason: str) -> None:
    log.warning(
        "policies_not_applied",
        reason=reason,
        consequence=(
            "queues work, but the delivery-limit backstop, dead-lettering of "
            "work queues and the max-length limits are missing until the "
            "policies are applied"
        ),
    )
