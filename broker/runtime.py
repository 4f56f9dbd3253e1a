"""What the application tree is built from: resources and the engine's parts.

`actors.tree:build_tree` (or whatever ``[daemon] tree`` names) receives a
`Runtime` and returns the application's `SupervisorSpec`. Through it the
application registers its workflows (the engine derives the broker topology
from them and supervises one `WorkflowShard` per shard queue) and reaches
the store and the transport for its own actors. Resources are opened after
the tree is built, so specs capture the runtime and read its attributes
only when a child starts.

The HTTP surface is registered here too, while the tree is built: webhook
sources (`Runtime.webhook`) and the process API's routes
(`Runtime.http_route`); the daemon's HTTP server serves them once started,
and `Runtime.http_url` tells where.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, final

import msgspec

from broker.commit import GroupCommit
from broker.config import Config, TopologyConfig
from broker.connector import WebhookSource
from broker.faults import CrashHook
from broker.http import ApiRoute, RouteHandler
from broker.metrics import Metrics
from broker.outbox import OutboxFeed
from broker.retry import RetryPolicy
from broker.shard import WorkflowShard
from broker.store import Store, SystemPause
from broker.supervision import ChildSpec, Strategy, SupervisorSpec
from broker.transport import Transport
from broker.transport.topology import Topology, WorkflowRoute, shard_queue
from broker.workflow import Workflow

__all__ = ["Runtime"]

_SYSTEM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@final
class Runtime:
    """The daemon's shared parts, handed to the application tree."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.crash = CrashHook(cfg.testing)
        #: Rows bounded to 16 relay rounds: what a stalled relay may hold.
        self.feed = OutboxFeed(max_rows=16 * cfg.core.relay_batch)
        self.retry = RetryPolicy(
            cfg.topology.retry_tiers_s,
            max_attempts=cfg.core.max_attempts,
            wait_max_s=cfg.core.unavailable_max_s,
        )
        self.workflows: dict[str, Workflow[Any]] = {}
        #: Webhook sources by system name, served at ``POST /webhooks/<system>``.
        self.webhooks: dict[str, WebhookSource] = {}
        #: The process API, served under ``/api/v1``.
        self.api_routes: list[ApiRoute] = []
        self._http_url: str | None = None
        # One group commit per workflow, shared by its shards; created when
        # the first shard starts, so it captures the open store.
        self._commits: dict[str, GroupCommit] = {}
        self._bindings: dict[str, tuple[str, ...]] = {}
        #: System name → its gateway's ``status()``, for ``brokerctl status``.
        self.system_status: dict[str, Callable[[], dict[str, Any]]] = {}
        #: System name → its gateway's ``set_pause``, so that the daemon that
        #: stores a pause (``brokerctl pause``) applies it at once.
        self.system_pause: dict[str, Callable[[SystemPause | None], None]] = {}
        self._store: Store | None = None
        self._transport: Transport | None = None
        self._topology: Topology | None = None

    @property
    def store(self) -> Store:
        """The open store.

        Raises:
            RuntimeError: read before the daemon opened it.
        """
        if self._store is None:
            raise RuntimeError("the store is not open yet")
        return self._store

    @property
    def transport(self) -> Transport:
        """The started transport.

        Raises:
            RuntimeError: read before the daemon started it.
        """
        if self._transport is None:
            raise RuntimeError("the transport is not started yet")
        return self._transport

    def attach(
        self, *, store: Store, transport: Transport, topology: Topology | None = None
    ) -> None:
        """Called by the composition root once resources are open."""
        self._store = store
        self._transport = transport
        self._topology = topology

    def takes_event(self, event_type: str) -> bool:
        """Whether the topology routes *event_type* to a reader (`Topology.takes`).

        True when no topology is attached (a test's runtime).
        """
        return self._topology is None or self._topology.takes(event_type)

    @property
    def http_url(self) -> str:
        """The HTTP server's base URL, e.g. ``http://127.0.0.1:8080``.

        With ``[http] port = 0`` this is where the free port is found. Read it
        once the daemon started (``Daemon.started``).

        Raises:
            RuntimeError: the server is not listening (not started, disabled,
                or stopped).
        """
        if self._http_url is None:
            raise RuntimeError("the HTTP server is not listening")
        return self._http_url

    def http_listening(self, url: str | None) -> None:
        """Called by the HTTP server with its base URL, and None once it closed."""
        self._http_url = url

    def webhook(self, source: WebhookSource) -> None:
        """Serve *source* at ``POST /webhooks/<source.system>``.

        Raises:
            ValueError: the system is registered twice, or its name is not a
                plain path segment.
        """
        system = source.system
        if system in self.webhooks:
            raise ValueError(f"webhook source {system!r} is registered twice")
        if not _SYSTEM.match(system):
            raise ValueError(f"webhook system {system!r} is not a plain path segment")
        self.webhooks[system] = source

    def http_route(
        self,
        method: str,
        path: str,
        handler: RouteHandler,
        *,
        summary: str,
        operation: Mapping[str, Any] | None = None,
        request_type: Any = None,
        response_type: Any = None,
    ) -> None:
        """Serve *handler* at ``/api/v1`` + *path* and describe it in the OpenAPI.

        Args:
            method: ``GET``, ``POST``, ``PUT``, ``PATCH`` or ``DELETE``.
            path: relative to ``/api/v1``, with ``{name}`` variables, e.g.
                ``/deals/{deal_id}``; the handler finds them in
                ``request.params``.
            handler: ``async (ApiRequest) -> ApiResponse | value``.
            summary: the operation's one-line OpenAPI summary.
            operation: more of the OpenAPI Operation Object (``parameters``,
                ``responses``, ``tags`` ...); it wins over what is generated.
            request_type: the JSON body's type (a msgspec Struct): its schema
                becomes the ``requestBody``; decode with ``request.json(T)``.
            response_type: the 200 answer's type: its schema is documented.

        Raises:
            ValueError: a bad method or path, or the route is registered twice.
        """
        route = ApiRoute(
            method=method.upper(),
            path=path,
            handler=handler,
            summary=summary,
            operation=dict(operation or {}),
            request_type=request_type,
            response_type=response_type,
        )
        for other in self.api_routes:
            if (other.method, other.path) == (route.method, route.path):
                raise ValueError(f"route {route.method} {path} is registered twice")
        self.api_routes.append(route)

    def bind_events(self, queue: str, event_types: Sequence[str]) -> None:
        """Bind *event_types* on ``q2c.events`` to *queue* as well.

        For a system that takes events besides its commands (the CRM re-reads
        records a change feed announced): its queue ``q2c.sys.<system>`` gets
        the binding, declared with the rest of the topology.
        """
        bound = self._bindings.setdefault(queue, ())
        self._bindings[queue] = (*bound, *(t for t in event_types if t not in bound))

    def topology_config(self) -> TopologyConfig:
        """``[topology]`` with the bindings the tree asked for added."""
        cfg = self.cfg.topology
        if not self._bindings:
            return cfg
        queues = dict(cfg.event_queues)
        for queue, types in self._bindings.items():
            queues[queue] = (*queues.get(queue, ()), *types)
        return msgspec.structs.replace(cfg, event_queues=queues)

    def routes(self) -> list[WorkflowRoute]:
        """The registered workflows, as the topology needs them."""
        return [
            WorkflowRoute(name=wf.name, event_types=tuple(wf.events))
            for wf in self.workflows.values()
        ]

    def _shard(self, workflow: Workflow[Any], queue: str) -> WorkflowShard:
        commit = self._commits.get(workflow.name)
        if commit is None:
            commit = self._commits[workflow.name] = GroupCommit(
                workflow=workflow,
                store=self.store,
                core=self.cfg.core,
                retry=self.retry,
                metrics=self.metrics,
                crash=self.crash,
            )
        return WorkflowShard(
            workflow=workflow,
            queue=queue,
            transport=self.transport,
            commit=commit,
            feed=self.feed,
            core=self.cfg.core,
            prefetch=self.cfg.amqp.prefetch,
            metrics=self.metrics,
            crash=self.crash,
        )

    def workflow(
        self, workflow: Workflow[Any], *, intensity: int = 10, period_s: float = 60.0
    ) -> ChildSpec:
        """Register *workflow* and return the subtree that runs its shards.

        The subtree is ``one_for_one``: a shard that crashes is restarted alone
        and the broker redelivers what it had not acknowledged.
        """
        if workflow.name in self.workflows:
            raise ValueError(f"workflow {workflow.name!r} is registered twice")
        self.workflows[workflow.name] = workflow
        shards = [
            ChildSpec(
                id=f"{workflow.name}.{n}",
                start=functools.partial(
                    self._shard, workflow, shard_queue(workflow.name, n)
                ),
                shutdown_s=self.cfg.daemon.shutdown_s,
            )
            for n in range(self.cfg.topology.shards)
        ]
        return ChildSpec(
            id=workflow.name,
            start=lambda: SupervisorSpec(
                id=workflow.name,
                children=shards,
                strategy=Strategy.ONE_FOR_ONE,
                intensity=intensity,
                period_s=period_s,
            ),
            shutdown_s=None,
        )
