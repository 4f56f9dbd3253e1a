"""The composition root: config → resources → supervision tree → run → drain.

Start-up, in order: configure logging; load the application tree by its
dotted path (``[daemon] tree``) so the engine never imports ``actors/``;
derive the broker topology from the workflows the tree registered; open the
store (migrating it) and the transport (declaring the topology); then run
the root supervisor::

    root (rest_for_one, 2 restarts / 60 s)
    ├── relay        outbox relay: publishes committed rows
    ├── maintenance  inbox partitions ahead, retention behind
    ├── app          the application tree (workflows, system actors)
    ├── http         webhooks, process API, probes, metrics (``[http]``)
    └── control      the admin socket, last so it stops first

Shutdown (SIGTERM, SIGINT, ``brokerctl drain``): the shutdown event is set;
children stop in reverse order, so the control socket closes, the HTTP
server stops taking webhooks (intake first) and answers those in hand, the
shards stop taking deliveries and finish the batch in hand, the relay publishes
what it holds; then the transport and the store close and one
``shutdown_complete`` line sums up the run. The root giving up exits
non-zero, for systemd or Kubernetes to restart the process.
"""

from __future__ import annotations

import importlib
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, final

import anyio
import structlog

from broker.actor import Actor, Context
from broker.config import Config
from broker.control.server import ControlServer
from broker.errors import (
    BrokerError,
    ConfigError,
    StoreUnavailable,
    TransportUnavailable,
)
from broker.gcwatch import GcPauses, freeze_startup_heap
from broker.handler import DaemonControl
from broker.http import HttpServer
from broker.logging import configure_logging
from broker.outbox import OutboxRelay
from broker.retention import prune_finished
from broker.retry import Backoff
from broker.runtime import Runtime
from broker.store import Store
from broker.supervision import ChildSpec, Restart, Strategy, SupervisorSpec
from broker.system import ActorSystem
from broker.transport import Transport
from broker.transport.topology import Topology, build_topology

__all__ = [
    "Daemon",
    "load_callable",
    "load_tree",
    "open_store",
    "open_transport",
    "run",
]

_log = structlog.get_logger(__name__)

T = TypeVar("T")

TreeFactory = Callable[[Runtime], SupervisorSpec]


def load_callable(dotted: str, key: str) -> Callable[..., Any]:
    """Import ``package.module:function`` named by config *key*.

    Raises:
        ConfigError: the module or the function is missing.
    """
    module_name, _, attr = dotted.partition(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key} = {dotted!r}: {exc}") from exc
    if not callable(factory):
        raise ConfigError(f"{key} = {dotted!r} is not callable")
    return factory  # type: ignore[no-any-return]


def load_tree(dotted: str) -> TreeFactory:
    """Import the application tree factory (``[daemon] tree``)."""
    return load_callable(dotted, "[daemon] tree")


async def open_store(cfg: Config, *, attempts: int = 30) -> Store:
    """Open (and migrate) the configured store, retrying while it is unavailable."""
    backoff = Backoff(0.5, 5.0)
    for attempt in range(1, attempts + 1):
        try:
            if cfg.daemon.store == "postgres":
                from broker.store.postgres import PostgresStore

                return await PostgresStore.open(
                    cfg.postgres,
                    lease_s=cfg.core.outbox_lease_s,
                    schema="migrate" if cfg.postgres.migrate else "verify",
                    retention_days=cfg.core.inbox_retention_days,
                )
            from broker.store.sqlite import SqliteStore

            return await SqliteStore.open(cfg.sqlite, lease_s=cfg.core.outbox_lease_s)
        except StoreUnavailable as exc:
            if attempt == attempts:
                raise
            delay = backoff.next_delay()
            _log.warning(
                "store_open_failed", attempt=attempt, error=str(exc), retry_in_s=delay
            )
            await anyio.sleep(delay)
    raise AssertionError("unreachable")


async def open_transport(
    cfg: Config, topology: Topology, *, tls: ssl.SSLContext | None = None
) -> Transport:
    """Start the configured transport; on RabbitMQ, then declare the topology.

    *tls* is the context for ``amqps://`` (`broker.transport.tls.load_tls`),
    built from ``cfg.amqp`` when not given.

    The daemon's own connections come up first: when they cannot, their
    ``amqp_connect_failed`` lines say exactly why (a TLS alert, a refused
    login), and they are retried with back-off. The declaration follows on
    a connection of its own, before anything consumes.

    Raises:
        ConfigError: the TLS files are unusable, or the broker refused the
            topology (arguments, plugins, permissions).
    """
    if cfg.daemon.transport == "memory":
        from broker.transport.memory import MemoryTransport

        if cfg.memory.journal:
            return await MemoryTransport.open(
                topology,
                journal=cfg.memory.journal,
                synchronous=cfg.memory.synchronous,
            )
        _log.warning(
            "transport_in_memory",
            hint="[memory] journal is empty: what is queued when the daemon "
            "stops is lost",
        )
        return MemoryTransport(topology)

    from broker.transport.amqp import AmqpTransport
    from broker.transport.declare import declare_topology
    from broker.transport.tls import load_tls

    if tls is None:
        tls = await load_tls(cfg.amqp)
    transport = AmqpTransport(
        cfg.amqp,
        name=cfg.daemon.name,
        tls=tls,
        max_body_bytes=cfg.core.max_dead_letter_bytes,
    )
    try:
        await transport.start()
        if cfg.topology.declare:
            backoff = Backoff(cfg.amqp.reconnect_interval_s, cfg.amqp.reconnect_max_s)
            while True:
                try:
                    await declare_topology(
                        cfg.amqp.url,
                        topology,
                        management_url=cfg.amqp.management_url,
                        apply_policies=cfg.topology.apply_policies,
                        tls=tls,
                        mechanism=cfg.amqp.auth_mechanism,
                    )
                    break
                except TransportUnavailable as exc:
                    delay = backoff.next_delay()
                    _log.warning(
                        "topology_declare_failed", error=str(exc), retry_in_s=delay
                    )
                    await anyio.sleep(delay)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await transport.aclose()
        raise
    return transport


@final
class _Maintenance(Actor[None]):
    """Keeps inbox partitions ahead and drops the ones past retention, hourly.

    Then deletes the finished workflow instances past their own retention
    (`broker.retention`).

    A failed prune is logged and tried again at the next interval: it never
    takes the actor down, since under the root's ``rest_for_one`` that would
    restart the application after it.
    """

    def __init__(self, rt: Runtime, interval_s: float = 3600.0) -> None:
        self._rt = rt
        self._interval_s = interval_s

    async def on_start(self, ctx: Context[None]) -> None:
        ctx.start_soon(self._loop, ctx, name=f"{ctx.id}.loop")

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """Takes no messages."""

    async def _loop(self, ctx: Context[None]) -> None:
        while True:
            await self._guarded(ctx, self._prune)
            await self._guarded(ctx, self._prune_finished)
            await anyio.sleep(self._interval_s)

    async def _prune(self, ctx: Context[None]) -> None:
        dropped = await self._rt.store.prune(
            retention_days=self._rt.cfg.core.inbox_retention_days
        )
        ctx.log.info("store_pruned", **dropped)

    async def _prune_finished(self, ctx: Context[None]) -> None:
        deleted = await prune_finished(
            self._rt.store,
            self._rt.workflows,
            retention_days=self._rt.cfg.core.finished_retention_days,
        )
        if deleted:
            ctx.log.info("finished_instances_pruned", **deleted)

    async def _guarded(
        self, ctx: Context[None], step: Callable[[Context[None]], Awaitable[None]]
    ) -> None:
        """Run one upkeep *step*; a failure is logged, and tried again next time."""
        try:
            await step(ctx)
        except StoreUnavailable as exc:
            ctx.log.warning("store_prune_failed", step=step.__name__, error=str(exc))
        except ConfigError as exc:
            # A grant is missing: the operator's fix, so no traceback;
            # inserts still land in the DEFAULT partitions meanwhile.
            # Tried again next time.
            ctx.log.error("store_prune_failed", step=step.__name__, error=str(exc))  # noqa: TRY400
        except Exception:
            # A failure nobody foresaw (a view a DBA put on a partition,
            # a bug): crashing would restart every later child, and the
            # prune at start would crash it again until the root gave up.
            ctx.log.exception("store_prune_failed", step=step.__name__)


@final
class _Control(Actor[None]):
    """Runs the admin socket server as a supervised child."""

    def __init__(self, server: ControlServer) -> None:
        self._server = server

    async def on_start(self, ctx: Context[None]) -> None:
        ctx.start_soon(self._server.serve, name=f"{ctx.id}.serve")

    async def handle(self, msg: None, ctx: Context[None]) -> None:
        """Takes no messages."""


@final
class Daemon:
    """One daemon: build it from a config, then `run` it until shutdown."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.runtime = Runtime(cfg)
        self.system = ActorSystem()
        self.shutdown = anyio.Event()
        self.started = anyio.Event()
        self.started_at = time.monotonic()
        self.topology: Topology | None = None
        #: The TLS context of every connection to RabbitMQ, built once at start.
        self.tls: ssl.SSLContext | None = None

    def request_shutdown(self, reason: str) -> None:
        """Begin the graceful shutdown (idempotent)."""
        if not self.shutdown.is_set():
            _log.info("shutdown_requested", reason=reason)
            self.shutdown.set()

    def root_spec(self, app: SupervisorSpec, control: ControlServer) -> SupervisorSpec:
        """Infrastructure first, the application subtree after it, control last."""
        rt = self.runtime
        return SupervisorSpec(
            id="root",
            strategy=Strategy.REST_FOR_ONE,  # later children depend on earlier ones
            intensity=2,  # intensities multiply down the tree: keep the top strict
            period_s=60,
            children=[
                ChildSpec(
                    id="relay",
                    start=lambda: OutboxRelay(
                        store=rt.store,
                        transport=rt.transport,
                        feed=rt.feed,
                        core=self.cfg.core,
                        publish_timeout_s=self.cfg.amqp.publish_timeout_s,
                        metrics=rt.metrics,
                        crash=rt.crash,
                    ),
                    shutdown_s=self.cfg.daemon.shutdown_s,
                ),
                ChildSpec(
                    id="maintenance", start=lambda: _Maintenance(rt), shutdown_s=1
                ),
                ChildSpec(id="app", start=lambda: app, shutdown_s=None),
                *self._http_child(),
                ChildSpec(
                    id="control",
                    start=lambda: _Control(control),
                    restart=Restart.PERMANENT,
                    shutdown_s=2,
                ),
            ],
        )

    def _http_child(self) -> list[ChildSpec]:
        """The HTTP server's spec, if ``[http] enabled``."""
        cfg = self.cfg.http
        if not cfg.enabled:
            return []
        rt = self.runtime
        return [
            ChildSpec(
                id="http",
                start=lambda: HttpServer(
                    cfg=cfg,
                    sources=rt.webhooks,
                    routes=rt.api_routes,
                    store=rt.store,
                    transport=rt.transport,
                    metrics=rt.metrics,
                    on_listening=rt.http_listening,
                    title=self.cfg.daemon.name,
                    feed=rt.feed,
                    takes=rt.takes_event,
                ),
                # Requests in hand get publish-timeout-s to be confirmed.
                shutdown_s=cfg.publish_timeout_s + 2,
            )
        ]

    async def _unless_shutdown(self, opening: Callable[[], Awaitable[T]]) -> T | None:
        """Await *opening*; give up on it, returning ``None``, at a shutdown request.

        Opening waits as long as RabbitMQ or PostgreSQL do not answer (each
        retried with back-off, and logged), so a signal must end the wait.
        """
        result: T | None = None
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:

            async def give_up_at_shutdown() -> None:
                await self.shutdown.wait()
                _log.info("startup_abandoned", reason="shutdown requested")
                tg.cancel_scope.cancel()

            tg.start_soon(give_up_at_shutdown)
            try:
                result = await opening()
            except Exception as exc:  # noqa: BLE001 - raised again below, unwrapped
                failure = exc
            tg.cancel_scope.cancel()
        if failure is not None:
            # Outside the task group, so that it is not wrapped in an
            # ExceptionGroup and `run` maps a ConfigError to its exit status.
            raise failure
        return result

    async def run(self) -> None:
        """Open resources, run the tree until shutdown, close resources.

        Raises:
            SupervisorGaveUp: the root exceeded its restart intensity.
            ConfigError: the configuration or the tree is invalid.
        """
        cfg = self.cfg
        rt = self.runtime
        app = load_tree(cfg.daemon.tree)(rt)
        topology = self.topology = build_topology(rt.topology_config(), rt.routes())
        if cfg.daemon.transport == "amqp":
            from broker.transport.tls import load_tls

            self.tls = await load_tls(cfg.amqp)
        tls = self.tls
        store = await self._unless_shutdown(lambda: open_store(cfg))
        if store is None:
            return
        try:
            transport = await self._unless_shutdown(
                lambda: open_transport(cfg, topology, tls=tls)
            )
            if transport is None:
                return
            try:
                rt.attach(store=store, transport=transport, topology=topology)
                control = ControlServer(cfg.control, DaemonControl(self))
                _log.info(
                    "daemon_started",
                    pid=os.getpid(),
                    transport=cfg.daemon.transport,
                    store=cfg.daemon.store,
                    workflows=sorted(rt.workflows),
                    shards=cfg.topology.shards,
                )
                await self.system.run(
                    self.root_spec(app, control),
                    started=self.started,
                    shutdown=self.shutdown,
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await transport.aclose()
        finally:
            rt.feed.close()
            with anyio.CancelScope(shield=True):
                await store.aclose()
            _log.info(
                "shutdown_complete",
                uptime_s=round(time.monotonic() - self.started_at, 3),
                **rt.metrics.snapshot(),
            )


async def _serve(cfg: Config) -> int:
    daemon = Daemon(cfg)

    async def watch_signals() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                daemon.request_shutdown(signal.Signals(signum).name)

    async def freeze_when_started() -> None:
        await daemon.started.wait()
        _log.info("startup_heap_frozen", objects=freeze_startup_heap())

    failure: BrokerError | None = None
    pauses = GcPauses(daemon.runtime.metrics.gc_pause_seconds)
    with pauses.installed():
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_signals)
            tg.start_soon(freeze_when_started)
            try:
                await daemon.run()
            except BrokerError as exc:
                # Raised again outside the task group, so that it is not wrapped
                # in an ExceptionGroup and `run` can map it to an exit status.
                failure = exc
            finally:
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return 0


def run(cfg: Config) -> int:
    """Run the daemon on uvloop until a signal; return the process exit status."""
    configure_logging(cfg.logging.level, cfg.logging.format)
    try:
        return anyio.run(
            _serve, cfg, backend="asyncio", backend_options={"use_uvloop": True}
        )
    except ConfigError as exc:
        _log.error("config_invalid", error=str(exc))
        return 78  # EX_CONFIG
    except BrokerError as exc:
        _log.error("daemon_failed", error=f"{type(exc).__name__}: {exc}")
        return 1
