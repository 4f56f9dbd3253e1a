"""The application tree: every workflow and system actor, readable in one place."""

from __future__ import annotations

from actors.ledger import LedgerWorkflow
from broker import ChildSpec, Runtime, Strategy, SupervisorSpec

__all__ = ["build_tree"]


def build_tree(rt: Runtime) -> SupervisorSpec:
    """The ``app`` subtree: ``workflows`` (one sharded subtree per workflow)."""
    workflows = SupervisorSpec(
        id="workflows",
        strategy=Strategy.ONE_FOR_ONE,
        intensity=5,
        period_s=60,
        children=[rt.workflow(LedgerWorkflow())],
    )
    return SupervisorSpec(
        id="app",
        strategy=Strategy.ONE_FOR_ONE,
        intensity=3,
        period_s=60,
        children=[_subtree(workflows)],
    )


def _subtree(spec: SupervisorSpec) -> ChildSpec:
    return ChildSpec(id=spec.id, start=lambda: spec, shutdown_s=None)
