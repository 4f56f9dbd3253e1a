"""Application trees for the reliability scenarios, loaded through ``[daemon] tree``.

* ``build_poison_tree``: the ledger, except that an entry whose memo is
  ``POISON`` makes ``apply`` raise (a bug, not a `PermanentError`), so the
  message goes through the retry tiers and then to the dead letters (§7: 16).
* ``build_voiding_tree``: the ledger plus a handler for
  ``ledger.entry.voided``, a type the stock tree does not know: the "deploy"
  after which an ``unknown_type`` dead letter is replayed (§7: 19).

Both keep the workflow name ``ledger``, so queues, sagas and the checker
are the same as the stock tree's.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any, final

from actors.ledger import LedgerState, LedgerWorkflow
from broker import Applied, ChildSpec, Runtime, Strategy, SupervisorSpec, Workflow
from canonical import Envelope, Event, LedgerEntryPosted

__all__ = [
    "POISON",
    "VOIDED",
    "LedgerEntryVoided",
    "PoisonedLedgerWorkflow",
    "VoidingLedgerWorkflow",
    "build_poison_tree",
    "build_voiding_tree",
]

POISON = "POISON"
VOIDED = "ledger.entry.voided"


class LedgerEntryVoided(Event, frozen=True, tag=VOIDED):
    """An entry was voided: its amount is taken back from the account."""

    account: str
    entry_id: str
    amount: Decimal


@final
class PoisonedLedgerWorkflow:
    """The ledger, with a bug: it cannot apply an entry whose memo is ``POISON``."""

    name = "ledger"
    state_type = LedgerState

    def __init__(self) -> None:
        self._ledger = LedgerWorkflow()

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """The stock ledger's events."""
        return self._ledger.events

    def initial(self, correlation_id: str) -> LedgerState:
        """An account with no entries."""
        return self._ledger.initial(correlation_id)

    def apply(
        self, state: LedgerState, event: Any, envelope: Envelope
    ) -> Applied[LedgerState]:
        """Raise on a poison entry; apply anything else as the ledger does."""
        if isinstance(event, LedgerEntryPosted) and event.memo == POISON:
            raise RuntimeError(f"cannot apply entry {event.entry_id}: poison memo")
        return self._ledger.apply(state, event, envelope)


@final
class VoidingLedgerWorkflow:
    """The ledger, deployed with a handler for ``ledger.entry.voided``."""

    name = "ledger"
    state_type = LedgerState

    def __init__(self) -> None:
        self._ledger = LedgerWorkflow()

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """Posted entries, and now voided ones."""
        return {**self._ledger.events, VOIDED: LedgerEntryVoided}

    def initial(self, correlation_id: str) -> LedgerState:
        """An account with no entries."""
        return self._ledger.initial(correlation_id)

    def apply(
        self, state: LedgerState, event: Any, envelope: Envelope
    ) -> Applied[LedgerState]:
        """A void takes the amount back and counts as one more entry."""
        if isinstance(event, LedgerEntryVoided):
            return Applied(
                LedgerState(
                    balance=state.balance - event.amount, entries=state.entries + 1
                )
            )
        return self._ledger.apply(state, event, envelope)


def _tree(rt: Runtime, workflow: Workflow[Any]) -> SupervisorSpec:
    workflows = SupervisorSpec(
        id="workflows",
        strategy=Strategy.ONE_FOR_ONE,
        intensity=5,
        period_s=60,
        children=[rt.workflow(workflow)],
    )
    return SupervisorSpec(
        id="app",
        children=[ChildSpec(id="workflows", start=lambda: workflows, shutdown_s=None)],
    )


def build_poison_tree(rt: Runtime) -> SupervisorSpec:
    """The app tree with `PoisonedLedgerWorkflow` (``[daemon] tree``)."""
    return _tree(rt, PoisonedLedgerWorkflow())


def build_voiding_tree(rt: Runtime) -> SupervisorSpec:
    """The app tree with `VoidingLedgerWorkflow` (``[daemon] tree``)."""
    return _tree(rt, VoidingLedgerWorkflow())
