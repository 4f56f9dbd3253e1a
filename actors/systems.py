"""The external systems, as configured: clients, connectors, webhooks, pollers.

Each ``[systems.<name>]`` table names its ``kind`` (which adapter speaks to
it), the adapter's own keys, the webhook's signing secrets and a
``[systems.<name>.gateway]`` table for its system actor (rate, concurrency,
breaker). For example::

    [systems.erp_cloud]
    kind = "sap-s4"
    base-url = "https://my000000-api.s4hana.cloud.sap"
    username = "Q2C_COMM_USER"          # password: BROKER__SYSTEMS__ERP_CLOUD__PASSWORD
    webhook-secrets = ["…"]
    [systems.erp_cloud.gateway]
    rate-per-s = 20
    concurrency = 8

HTTP clients need a running event loop, and the tree is built before there
is one; so each system actor runs a `LazyConnector` whose real connector the
``clients`` actor opens when it starts (and closes when it stops). The
``systems`` supervisor is ``rest_for_one`` with ``clients`` first: new
clients, new system actors.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, final

import aiohttp
import anyio
import msgspec
import structlog
from msgspec import Meta

from actors.cursors import CURSOR_KIND, Announced, Announcements
from adapters.billing import (
    BillingConnector,
    StripeClient,
    StripeSettings,
    StripeWebhook,
)
from adapters.cpq import CpqClient, CpqConnector
from adapters.crm import CrmConnector, SalesforceClient, SalesforceSettings
from adapters.crm.ingress import SalesforceWebhook, poll_changes
from adapters.crm.views import UndecodableChange
from adapters.erp_cloud import SapClient, SapConnector, SapEventWebhook, SapSettings
from adapters.erp_cloud.mapping import MappingOptions, catalogue_entry
from adapters.erp_legacy import LegacyErpConnector, LegacyErpSettings
from adapters.erp_legacy.files import InboundPoller
from adapters.erp_legacy.idocxml import parse_idocs, write_idoc
from adapters.erp_legacy.ingress import to_inbound
from adapters.erp_legacy.mapping import customer_po
from adapters.erp_legacy.views import Idoc
from adapters.session import request_counter
from broker import (
    Actor,
    ChildSpec,
    ConfigError,
    Context,
    Runtime,
    Strategy,
    SupervisorSpec,
    TransientError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from broker.config import Section, convert_table
from broker.connector import Connector, Inbound, WebhookSource
from broker.errors import (
    ConcurrencyConflict,
    PermanentError,
    PublishFailed,
    SchemaInvalid,
    StoreUnavailable,
    TransportUnavailable,
)
from broker.gateway import GatewaySettings, system_actor_spec
from broker.http import Refused, keep_refused, publish_inbound
from broker.keyed_lock import SharedKeyedLock
from broker.retry import Backoff
from broker.store import BatchWrite, SagaWrite
from canonical import Envelope
from canonical.commerce import PriceBookEntry, Product
from canonical.ids import DealRef, deal_ref
from canonical.q2c import ALL_EVENTS, ProductChanged

__all__ = ["Kind", "SystemTable", "Systems", "LazyConnector"]

_log = structlog.get_logger(__name__)

Kind = Literal["salesforce-crm", "salesforce-cpq", "sap-s4", "idoc", "stripe"]

#: The commands each kind's connector takes (checked against the real one).
COMMANDS: dict[Kind, tuple[str, ...]] = {
    "salesforce-crm": ("crm.opportunity.update_requested", "crm.record.read_required"),
    "salesforce-cpq": ("cpq.quote.update_requested", "cpq.product.sync_requested"),
    "sap-s4": ("erp.order.booking_requested", "erp.customer.sync_requested"),
    "idoc": ("erp.order.booking_requested",),
    "stripe": ("billing.subscription.requested",),
}


class SystemTable(Section, frozen=True):
    """The keys of ``[systems.<name>]`` that belong to the broker, not the adapter.

    Attributes:
        kind: which adapter speaks to the system.
        gateway: the system actor's limits.
        webhook_secrets: signing secrets of ``POST /webhooks/<name>`` (two
            during a rotation); none: the system has no webhook.
        webhook_tolerance_s: accepted age of a webhook signature.
        change_feed: how a CRM's change events arrive: ``push`` (a signing
            relay posts them to the webhook) or ``pull`` (the daemon follows
            the org's change feed by replay id, as a CDC subscriber does).
        change_feed_channel: the CDC channel followed in ``pull`` mode.
        change_feed_wait_s: how long one poll of the feed waits for news.
        change_feed_batch: events read per poll at most.
        catalogue_refresh_s: for an ``sap-s4`` system, how often its product
            catalogue (the reference data quotes are validated against) is
            read again; products and prices changed in the ERP are in use
            within this.
    """

    kind: Kind
    gateway: GatewaySettings = GatewaySettings()
    webhook_secrets: tuple[Annotated[str, Meta(min_length=1)], ...] = ()
    webhook_tolerance_s: float = 300.0
    change_feed: Literal["push", "pull"] = "push"
    change_feed_channel: str = "/data/ChangeEvents"
    change_feed_wait_s: Annotated[float, Meta(ge=0, le=60)] = 2.0
    change_feed_batch: Annotated[int, Meta(ge=1, le=1000)] = 500
    catalogue_refresh_s: Annotated[float, Meta(ge=1)] = 900.0


_OURS = frozenset(
    {
        "kind",
        "gateway",
        "webhook-secrets",
        "webhook-tolerance-s",
        "change-feed",
        "change-feed-channel",
        "change-feed-wait-s",
        "change-feed-batch",
        "catalogue-refresh-s",
    }
)


def _split(name: str, table: Mapping[str, Any]) -> tuple[SystemTable, dict[str, Any]]:
    ours = {k: v for k, v in table.items() if k in _OURS}
    theirs = {k: v for k, v in table.items() if k not in _OURS}
    try:
        return msgspec.convert(ours, SystemTable, strict=False), theirs
    except msgspec.ValidationError as exc:
        raise ConfigError(f"[systems.{name}]: {exc}") from exc


def _adapter_settings(name: str, cls: type[Any], table: Mapping[str, Any]) -> Any:
    return convert_table(cls, table, where=f"[systems.{name}]")


@final
class LazyConnector:
    """A system's connector, known by name and commands before its client opens."""

    def __init__(self, system: str, kind: Kind) -> None:
        self._system = system
        self.kind = kind
        self._commands = {tag: ALL_EVENTS[tag] for tag in COMMANDS[kind]}
        self.impl: Connector | None = None

    def __repr__(self) -> str:
        return f"<LazyConnector {self._system} {'open' if self.impl else 'closed'}>"

    @property
    def system(self) -> str:
        """The configured name."""
        return self._system

    @property
    def commands(self) -> Mapping[str, type[Any]]:
        """What this kind of system accepts."""
        return self._commands

    async def handle(
        self, command: Any, envelope: Envelope, *, first_attempt: bool = False
    ) -> Sequence[Any]:
        """Call the open connector.

        Raises:
            UpstreamUnavailable: the client is not open (the clients actor is
                restarting); the command is retried.
        """
        if self.impl is None:
            raise UpstreamUnavailable(self._system, "client not open")
        return await self.impl.handle(command, envelope, first_attempt=first_attempt)


class _System(msgspec.Struct, frozen=True):
    name: str
    table: SystemTable
    settings: Any
    connector: LazyConnector


@final
class Systems:
    """Every configured external system, and the actors that serve them."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.systems: list[_System] = []
        #: The open Salesforce clients by system, for the change-feed readers.
        self.salesforce: dict[str, SalesforceClient] = {}
        self.catalogue: Callable[[list[Product], list[PriceBookEntry]], None] | None = (
            None
        )
        for name, raw in sorted(rt.cfg.systems.items()):
            table, rest = _split(name, raw)
            settings = self._settings(name, table, rest)
            system = _System(name, table, settings, LazyConnector(name, table.kind))
            self.systems.append(system)
            hook = self._webhook(system)
            if hook is not None:
                rt.webhook(hook)

    def _settings(self, name: str, table: SystemTable, rest: dict[str, Any]) -> Any:
        match table.kind:
            case "salesforce-crm" | "salesforce-cpq":
                return _adapter_settings(name, SalesforceSettings, rest)
            case "sap-s4":
                options = rest.pop("mapping", {})
                return (
                    _adapter_settings(name, SapSettings, {**rest, "system": name}),
                    _adapter_settings(name, MappingOptions, options),
                )
            case "idoc":
                return _adapter_settings(name, LegacyErpSettings, rest)
            case "stripe":
                return _adapter_settings(
                    name,
                    StripeSettings,
                    {
                        **rest,
                        "webhook-secrets": list(table.webhook_secrets),
                        "webhook-tolerance-s": table.webhook_tolerance_s,
                    },
                )

    def _webhook(self, s: _System) -> WebhookSource | None:
        secrets, tolerance = s.table.webhook_secrets, s.table.webhook_tolerance_s
        if not secrets:
            return None
        match s.table.kind:
            case "salesforce-crm":
                return SalesforceWebhook(
                    secrets=secrets,
                    client_id=s.settings.client_id,
                    default_currency=s.settings.default_currency,
                    system=s.name,
                    tolerance_s=tolerance,
                )
            case "sap-s4":
                return SapEventWebhook(secrets, system=s.name, tolerance_s=tolerance)
            case "stripe":
                return StripeWebhook(secrets, system=s.name, tolerance_s=tolerance)
            case _:
                raise ConfigError(
                    f"[systems.{s.name}]: a {s.table.kind} system has no webhook"
                )

    def crm(self) -> CrmConnector | None:
        """The open CRM connector (it reads quotes back), if a CRM is configured."""
        for s in self.systems:
            if s.table.kind == "salesforce-crm" and isinstance(
                s.connector.impl, CrmConnector
            ):
                return s.connector.impl
        return None

    def spec(self) -> ChildSpec:
        """``systems``: the clients, each system actor, the legacy inbound poller."""
        children = [
            ChildSpec(id="clients", start=lambda: _Clients(self), shutdown_s=10.0)
        ]
        children.extend(
            system_actor_spec(self.rt, s.connector, s.table.gateway)
            for s in self.systems
        )
        children.extend(
            ChildSpec(
                id=f"{s.name}.changes",
                start=functools.partial(_ChangeFeed, self, s),
                shutdown_s=10.0,
            )
            for s in self.systems
            if s.table.kind == "salesforce-crm" and s.table.change_feed == "pull"
        )
        children.extend(
            ChildSpec(
                id=f"{s.name}.inbound",
                start=functools.partial(_IdocInbound, self.rt, s.name, s.settings),
                shutdown_s=10.0,
            )
            for s in self.systems
            if s.table.kind == "idoc"
        )
        spec = SupervisorSpec(
            id="systems",
            strategy=Strategy.REST_FOR_ONE,
            intensity=10,
            period_s=60,
            children=children,
        )
        return ChildSpec(id="systems", start=lambda: spec, shutdown_s=None)


@final
class _Clients(Actor[None]):
    """Opens every system's HTTP client on start and closes them on stop."""

    def __init__(self, systems: Systems) -> None:
        self._systems = systems
        self._closers: list[Callable[[], Any]] = []

    def _counted(self, system: str) -> aiohttp.TraceConfig:
        """Counts the requests made of *system* in ``q2c_vendor_requests``."""
        requests = self._systems.rt.metrics.vendor_requests

        def count(status: str) -> None:
            requests.labels(system, status).inc()

        return request_counter(count)

    def _session(self, system: str) -> aiohttp.ClientSession:
        """A session for *system*'s client, closed on stop, its requests counted."""
        session = aiohttp.ClientSession(trace_configs=[self._counted(system)])
        self._closers.append(session.close)
        return session

    def _locks(self) -> SharedKeyedLock:
        """Locks every daemon on the store honours (DESIGN §9)."""
        rt = self._systems.rt
        return SharedKeyedLock(rt.store, owner=f"{rt.cfg.daemon.name}:{os.getpid()}")

    async def on_start(self, ctx: Context[None]) -> None:
        crm: dict[str, SalesforceClient] = {}
        for s in self._systems.systems:
            impl: Connector
            match s.table.kind:
                case "salesforce-crm" | "salesforce-cpq":
                    client = SalesforceClient(
                        s.settings, system=s.name, session=self._session(s.name)
                    )
                    self._systems.salesforce[s.name] = client
                    cpq = CpqClient(client)
                    crm[s.name] = client
                    impl = (
                        CrmConnector(client, cpq=cpq, system=s.name)
                        if s.table.kind == "salesforce-crm"
                        else CpqConnector(cpq, system=s.name)
                    )
                case "sap-s4":
                    settings, options = s.settings
                    sap = SapClient(settings, trace_configs=[self._counted(s.name)])
                    self._closers.append(sap.aclose)
                    impl = SapConnector(
                        sap, system=s.name, options=options, locks=self._locks()
                    )
                    ctx.start_soon(
                        self._load_catalogue,
                        s.name,
                        sap,
                        s.table.catalogue_refresh_s,
                    )
                case "idoc":
                    impl = LegacyErpConnector(s.settings, system=s.name)
                case "stripe":
                    stripe = StripeClient(
                        s.settings, system=s.name, session=self._session(s.name)
                    )
                    impl = BillingConnector(stripe, system=s.name)
            if set(impl.commands) != set(s.connector.commands):
                raise ConfigError(
                    f"[systems.{s.name}]: connector takes {sorted(impl.commands)}, "
                    f"expected {sorted(s.connector.commands)}"
                )
            s.connector.impl = impl
        # Closed by a task of the actor's, so that a crash (after which
        # on_stop does not run) closes them too.
        ctx.start_soon(self._close_on_exit, name=f"{ctx.id}.sessions")

    async def _close_on_exit(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            self._systems.salesforce.clear()
            for s in self._systems.systems:
                s.connector.impl = None
            closers, self._closers = self._closers, []
            for close in reversed(closers):
                with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
                    await close()

    async def _load_catalogue(
        self, system: str, sap: SapClient, refresh_s: float
    ) -> None:
        """Read the ERP's products at start and every *refresh_s*; announce changes.

        The catalog workflow forwards changes to the CPQ; the reference data
        that quotes are validated against is refreshed here, so a product or
        price changed in the ERP is in use within *refresh_s*. Each read
        announces only the products whose content changed since the last
        announcement, which is kept in the store (`Announcements`): a
        restart announces only what changed meanwhile. An outage of SAP, of
        the broker or of the store is waited out; a refusal (the
        communication user may not read the product API) is logged and
        tried again at the next refresh: it is the operator's to fix, and the
        other systems keep running.
        """
        announced = Announcements(self._systems.rt.store, system)
        backoff = Backoff(1.0, 60.0)
        while True:
            try:
                await self._announce_catalogue(system, sap, announced)
            except (
                UpstreamUnavailable,
                PublishFailed,
                TransportUnavailable,
                StoreUnavailable,
                ConcurrencyConflict,
            ) as exc:
                delay = min(backoff.next_delay(), refresh_s)
                _log.warning(
                    "catalogue_unavailable",
                    system=system,
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=round(delay, 1),
                )
                await anyio.sleep(delay)
                continue
            except UpstreamRejected as exc:
                _log.error(
                    "catalogue_refused",
                    system=system,
                    error=str(exc),
                    hint="check the user's access to API_PRODUCT_SRV",
                    retry_in_s=refresh_s,
                )
            backoff.reset()
            await anyio.sleep(refresh_s)

    async def _announce_catalogue(
        self, system: str, sap: SapClient, announced: Announcements
    ) -> None:
        """Read the catalogue whole; update the reference data; announce changes.

        The changes are published first and recorded in *announced* after:
        a failure in between publishes them again under the same keys, which
        the inbox drops.
        """
        rt = self._systems.rt
        products = await sap.list_products()
        entries = [catalogue_entry(p, default_currency="EUR") for p in products]
        if self._systems.catalogue is not None:
            self._systems.catalogue(
                [product for product, _ in entries],
                [price for _, price in entries if price is not None],
            )
        news = await announced.news(
            ProductChanged(product=product, prices=(price,) if price else ())
            for product, price in entries
        )
        events = [_product_changed(system, change, n) for change, n in news]
        for chunk in range(0, len(events), 100):
            await publish_inbound(
                rt.transport,
                events[chunk : chunk + 100],
                timeout_s=30.0,
                takes=rt.takes_event,
            )
        await announced.record(news)
        _log.info(
            "catalogue_loaded",
            system=system,
            products=len(products),
            changed=len(events),
        )

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """Takes no messages."""


def _product_changed(system: str, change: ProductChanged, n: Announced) -> Inbound:
    """The ERP's catalogue entry as an event named by its change *n*.

    The same change published again (after a crash) is a duplicate; a later
    change to content the product had before is not.
    """
    sku = change.product.sku
    return Inbound(
        event=change,
        id=f"{sku}@{n.change}:{n.digest}",
        source=f"/erp/{system}",
        correlation_id=sku,
        idempotency_key=f"erp.product.changed:{sku}:{n.change}:{n.digest}",
        subject=sku,
    )


@final
class _ChangeFeed(Actor[None]):
    """Follows a CRM org's change feed (CDC) by replay id: the ``pull`` mode.

    The replay id to resume at is kept in the store (as the state of instance
    ``cdc:<system>:<channel>`` of the ``cursor`` kind) and moved on only after
    the events read were confirmed by RabbitMQ; a crash in between reads them
    again, and their ids (transaction key, sequence, record) make the repeat a
    duplicate. A first start reads every retained event (replay id ``-2``).
    A replay id the org no longer retains is logged and the feed resumes from
    the newest events (``-1``); the records changed meanwhile need a re-read.

    A message of a batch that is not a change event we can read (a
    ``changeType`` this version does not know, a field of the wrong shape) is
    kept as a dead letter of queue ``/inbound/<system>``, its bytes as
    received with the reason and headers naming the channel and replay id,
    and the cursor moves past it with the rest of the batch: one bad event
    must not hold the feed until retention drops what follows it. A store
    that cannot be read (at start, or after a conflict) is waited out with
    back-off; nothing here crashes the ``systems`` subtree for an outage.
    """

    def __init__(self, systems: Systems, system: _System) -> None:
        self._systems = systems
        self._system = system
        table = system.table
        self._channel = table.change_feed_channel
        self._key = f"cdc:{system.name}:{self._channel}"
        self._wait_s = table.change_feed_wait_s
        self._batch = table.change_feed_batch

    async def on_start(self, ctx: Context[None]) -> None:
        ctx.start_soon(self._follow)

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """Takes no messages."""

    async def _follow(self) -> None:
        name = self._system.name
        after, version = await self._cursor()
        backoff = Backoff(*_FEED_BACKOFF_S)
        while True:
            try:
                after, version = await self._read_once(after, version)
                backoff.reset()
            except ConcurrencyConflict:
                # Another daemon follows the same feed and moved the cursor.
                after, version = await self._cursor()
            except UpstreamRejected as exc:
                if exc.code != "INVALID_REPLAY_ID":
                    # Refused (access rights, an answer we cannot read): the
                    # operator's to fix. The cursor stays, so nothing is lost
                    # meanwhile; the other systems go on.
                    delay = backoff.next_delay()
                    _log.error(
                        "change_feed_refused",
                        system=name,
                        channel=self._channel,
                        error=str(exc),
                        retry_in_s=round(delay, 2),
                    )
                    await anyio.sleep(delay)
                    continue
                _log.error(
                    "change_feed_gap",
                    system=name,
                    channel=self._channel,
                    replay_id=after,
                    hint="events were lost to retention; re-read changed records",
                )
                after = -1
            except TransientError as exc:
                delay = backoff.next_delay()
                _log.warning(
                    "change_feed_unavailable",
                    system=name,
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                )
                await anyio.sleep(delay)

    async def _read_once(self, after: int, version: int) -> tuple[int, int]:
        """Read one batch after replay id *after*; publish, keep, move the cursor.

        Returns:
            The replay id to resume after, and the cursor's version.

        Raises:
            UpstreamRejected: refused, or a batch whose unreadable messages
                say nowhere where they sit (it would come back at once).
            TransientError: the org, RabbitMQ or the store is unavailable;
                the cursor stays where it was.
        """
        rt = self._systems.rt
        name = self._system.name
        client = self._systems.salesforce.get(name)
        if client is None:
            raise UpstreamUnavailable(name, "client not open")
        polled = await poll_changes(
            client, self._channel, after, self._batch, wait_s=self._wait_s
        )
        await publish_inbound(
            rt.transport, polled.inbound, timeout_s=30.0, takes=rt.takes_event
        )
        if polled.undecodable:
            await self._dead_letter(polled.undecodable)
        if polled.resume_at == after:
            if polled.undecodable:
                raise UpstreamRejected(
                    name,
                    f"change feed: {len(polled.undecodable)} message(s) "
                    "without a readable replay id",
                    code="MALFORMED_RESPONSE",
                )
            return after, version
        await rt.store.commit_batch(
            BatchWrite(
                consumer=CURSOR_KIND,
                workflow=CURSOR_KIND,
                sagas=[
                    SagaWrite(
                        correlation_id=self._key,
                        expected_version=version,
                        state=str(polled.resume_at).encode(),
                    )
                ],
            )
        )
        return polled.resume_at, version + 1

    async def _cursor(self) -> tuple[int, int]:
        """The replay id to resume after and the cursor's version, once readable.

        A store that cannot be read is logged and tried again with back-off.
        """
        backoff = Backoff(*_FEED_BACKOFF_S)
        while True:
            try:
                record = await self._systems.rt.store.load_saga(CURSOR_KIND, self._key)
            except StoreUnavailable as exc:
                delay = backoff.next_delay()
                _log.warning(
                    "change_feed_store_unavailable",
                    system=self._system.name,
                    channel=self._channel,
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                )
                await anyio.sleep(delay)
                continue
            if record is None:
                return -2, 0
            return int(record.state), record.version

    async def _dead_letter(self, undecodable: Sequence[UndecodableChange]) -> None:
        """Keep each unreadable message as a dead letter, in one write.

        Raises:
            TransientError: the store is unavailable; the cursor stays, and
                the batch is read (and kept) again.
        """
        name = self._system.name
        kept = [
            Refused(
                f"cdc:{name}",
                change.body,
                SchemaInvalid(
                    f"{name}: change event {change.replay_id} on {self._channel} "
                    f"is not one we can read: {change.error}"
                ),
                headers={
                    "x-q2c-channel": self._channel,
                    **(
                        {"x-q2c-replay-id": str(change.replay_id)}
                        if change.replay_id is not None
                        else {}
                    ),
                },
            )
            for change in undecodable
        ]
        rt = self._systems.rt
        records = await keep_refused(rt.store, rt.feed, f"/inbound/{name}", kept)
        for record in records:
            _log.warning(
                "change_event_dead_lettered",
                system=name,
                channel=self._channel,
                replay_id=record.headers.get("x-q2c-replay-id"),
                message_id=record.message_id,
                reason=record.reason,
                detail=record.detail[:200],
            )


#: The change feed's back-off after a failure: first delay and cap, seconds.
_FEED_BACKOFF_S = (0.5, 30.0)


@final
class _IdocInbound(Actor[None]):
    """Reads ORDRSP, DESADV and INVOIC IDocs from the legacy ERP's inbound folder.

    A file (a packet) may hold several IDocs, for different deals; each is
    handled on its own, so one bad IDoc costs no other its deal:

    * an IDoc whose customer PO is not a ``Q2C-…`` reference (or that has
      none) belongs to no deal: it is skipped with an ``idoc_not_ours`` log
      line, as the cloud ERP's webhook drops such documents;
    * an IDoc the mapping refuses (a `PermanentError`) is dead-lettered on its
      own in queue ``/inbound/<system>``, like a webhook's unparseable
      payload: its bytes (the IDoc written back as a one-IDoc file, which can
      be dropped in the folder again once fixed), the reason, and headers
      naming the file and the IDoc, with a copy on ``q2c.dead`` and a journal
      entry;
    * the others are published.

    A file moves to ``processed/`` only after its events were confirmed by
    RabbitMQ and its refused IDocs recorded; a crash in between reads it
    again, and the IDoc number keeps the repeat a duplicate (a dead letter
    written again only counts one more attempt).
    """

    def __init__(self, rt: Runtime, system: str, settings: LegacyErpSettings) -> None:
        self._rt = rt
        self._system = system
        self._zone = settings.zone
        self._poller = InboundPoller(
            settings.inbound,
            parse=functools.partial(parse_idocs, max_bytes=settings.max_file_bytes),
            handle=self._handle,
            batch=settings.batch,
            interval_s=settings.poll_interval_s,
            settle_s=settings.settle_s,
            max_bytes=settings.max_file_bytes,
        )

    async def on_start(self, ctx: Context[None]) -> None:
        ctx.start_soon(self._poller.run)

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """Takes no messages."""

    async def _handle(self, name: str, idocs: tuple[Idoc, ...]) -> None:
        events: list[Inbound] = []
        refused: list[tuple[Idoc, PermanentError]] = []
        for idoc in idocs:
            control = idoc.edi_dc40
            po = customer_po(idoc)
            if control.mestyp in _ERP_ANSWERS and (
                not po or await _resolve(po) is None
            ):
                _log.info(
                    "idoc_not_ours",
                    system=self._system,
                    file=name,
                    idoc=control.docnum,
                    mestyp=control.mestyp,
                    customer_po=po,
                )
                continue
            try:
                events.extend(await to_inbound(idoc, resolve=_resolve, zone=self._zone))
            except PermanentError as exc:
                refused.append((idoc, exc))
        await publish_inbound(
            self._rt.transport, events, timeout_s=30.0, takes=self._rt.takes_event
        )
        if refused:
            await self._dead_letter(name, refused)

    async def _dead_letter(
        self, name: str, refused: Sequence[tuple[Idoc, PermanentError]]
    ) -> None:
        """Keep each refused IDoc as a dead letter, in one write.

        Raises:
            TransientError: the store is unavailable; the file stays in place
                and is handled again on a later poll.
        """
        kept = []
        for idoc, exc in refused:
            control = idoc.edi_dc40
            po = customer_po(idoc)
            ref = deal_ref(po)
            headers = {
                "x-q2c-file": name,
                "x-q2c-idoc": control.docnum,
                "x-q2c-idoc-type": f"{control.idoctyp}/{control.mestyp}",
                **({"x-q2c-customer-po": po} if po else {}),
            }
            kept.append(
                Refused(
                    f"idoc:{self._system}:{control.docnum}",
                    write_idoc(idoc),
                    exc,
                    headers=headers,
                    correlation_id=ref.deal_id if ref is not None else None,
                )
            )
        records = await keep_refused(
            self._rt.store, self._rt.feed, f"/inbound/{self._system}", kept
        )
        for record in records:
            _log.warning(
                "idoc_dead_lettered",
                system=self._system,
                file=name,
                idoc=record.headers.get("x-q2c-idoc"),
                message_id=record.message_id,
                reason=record.reason,
                detail=record.detail[:200],
            )


#: The message types the ERP sends us; each names the PO of an order of ours.
_ERP_ANSWERS = frozenset({"ORDRSP", "DESADV", "INVOIC"})


async def _resolve(po: str) -> DealRef | None:
    """A customer PO reference is ``Q2C-<crm id>``: the deal needs no lookup."""
    return deal_ref(po)
