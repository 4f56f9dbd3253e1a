"""Application trees for the engine's runtime tests."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

from actors.ledger import LedgerState, LedgerWorkflow
from broker import Actor, Applied, ChildSpec, Context, Runtime, SupervisorSpec
from broker.errors import UpstreamRejected
from canonical import Envelope, LedgerEntryPosted

__all__ = ["PoisonLedger", "build_crashing_tree", "build_poison_tree"]


@final
class PoisonLedger:
    """The ledger, except that memo "POISON" always fails and "REJECT" is permanent."""

    name = "ledger"
    state_type = LedgerState

    def __init__(self) -> None:
        self._inner = LedgerWorkflow()

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """The ledger's events."""
        return self._inner.events

    def initial(self, correlation_id: str) -> LedgerState:
        """An empty account."""
        return self._inner.initial(correlation_id)

    def apply(
        self, state: LedgerState, event: Any, envelope: Envelope
    ) -> Applied[LedgerState]:
        """Fail on the markers, else behave as the ledger."""
        if isinstance(event, LedgerEntryPosted):
            if event.memo == "POISON":
                raise RuntimeError("poisoned entry")
            if event.memo == "REJECT":
                raise UpstreamRejected("ledger", "entry refused by rule")
        return self._inner.apply(state, event, envelope)


def build_poison_tree(rt: Runtime) -> SupervisorSpec:
    """One workflow subtree running `PoisonLedger`."""
    workflows = SupervisorSpec(id="workflows", children=[rt.workflow(PoisonLedger())])
    return SupervisorSpec(
        id="app",
        children=[ChildSpec(id="workflows", start=lambda: workflows, shutdown_s=None)],
    )


@final
class _AlwaysCrashes(Actor[None]):
    """Crashes as soon as it starts: drives its supervisors past their intensity."""

    async def on_start(self, ctx: Context[None]) -> None:
        raise RuntimeError("this actor always crashes")


def build_crashing_tree(rt: Runtime) -> SupervisorSpec:
    """An application whose only actor always crashes, so the root gives up."""
    return SupervisorSpec(
        id="app",
        intensity=1,
        period_s=60,
        children=[ChildSpec(id="app.crasher", start=_AlwaysCrashes)],
    )
