"""The application tree: every workflow and system actor, readable in one place."""

from __future__ import annotations

from actors.ledger import LedgerWorkflow
from actors.q2c import QuoteToCash
from broker import ChildSpec, Runtime, Strategy, SupervisorSpec

__all__ = ["build_tree"]


def build_tree(rt: Runtime) -> SupervisorSpec:
    """The ``app`` subtree.

    - ``workflows``: one sharded subtree per workflow (ledger, deal, account,
      catalog), one_for_one: a crashed shard restarts alone.
    - ``systems``: the external systems' clients, one system actor per
      configured system and the legacy ERP's inbound poller (rest_for_one:
      new clients, new system actors).
    - ``routing-watcher``: reloads ``routing.toml`` when it changes.
    """
    q2c = QuoteToCash(rt)
    workflows = SupervisorSpec(
        id="workflows",
        strategy=Strategy.ONE_FOR_ONE,
        intensity=5,
        period_s=60,
        children=[rt.workflow(LedgerWorkflow()), *q2c.workflows],
    )
    return SupervisorSpec(
        id="app",
        strategy=Strategy.ONE_FOR_ONE,
        intensity=3,
        period_s=60,
        children=[_subtree(workflows), q2c.systems.spec(), q2c.watcher()],
    )


def _subtree(spec: SupervisorSpec) -> ChildSpec:
    return ChildSpec(id=spec.id, start=lambda: spec, shutdown_s=None)
