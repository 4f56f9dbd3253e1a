"""What the application tree is built from: resources and the engine's parts.

`actors.tree:build_tree` (or whatever ``[daemon] tree`` names) receives a
`Runtime` and returns the application's `SupervisorSpec`. Through it the
application registers its workflows (the engine derives the broker topology
from them and supervises one `WorkflowShard` per shard queue) and reaches
the store and the transport for its own actors. Resources are opened after
the tree is built, so specs capture the runtime and read its attributes
only when a child starts.
"""

from __future__ import annotations

import functools
from typing import Any, final

from broker.commit import GroupCommit
from broker.config import Config
from broker.faults import CrashHook
from broker.metrics import Metrics
from broker.outbox import OutboxFeed
from broker.retry import RetryPolicy
from broker.shard import WorkflowShard
from broker.store import Store
from broker.supervision import ChildSpec, Strategy, SupervisorSpec
from broker.transport import Transport
from broker.transport.topology import WorkflowRoute, shard_queue
from broker.workflow import Workflow

__all__ = ["Runtime"]


@final
class Runtime:
    """The daemon's shared parts, handed to the application tree."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.crash = CrashHook(cfg.testing)
        self.feed = OutboxFeed()
        self.retry = RetryPolicy(
            cfg.topology.retry_tiers_s, max_attempts=cfg.core.max_attempts
        )
        self.workflows: dict[str, Workflow[Any]] = {}
        # One group commit per workflow, shared by its shards; created when
        # the first shard starts, so it captures the open store.
        self._commits: dict[str, GroupCommit] = {}
        self._store: Store | None = None
        self._transport: Transport | None = None

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

    def attach(self, *, store: Store, transport: Transport) -> None:
        """Called by the composition root once resources are open."""
        self._store = store
        self._transport = transport

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
