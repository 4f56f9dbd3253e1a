"""Application trees for the engine's runtime tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, final

import msgspec

from actors.ledger import LedgerState, LedgerWorkflow
from broker import Actor, Applied, ChildSpec, Context, Emit, Runtime, SupervisorSpec
from broker.errors import RetryLater, UpstreamRejected
from canonical import Envelope, LedgerEntryApplied, LedgerEntryPosted

__all__ = [
    "OrderedLedger",
    "OrderedState",
    "PoisonLedger",
    "ClosingLedger",
    "TimerLedger",
    "build_closing_tree",
    "build_crashing_tree",
    "build_ordered_tree",
    "build_poison_tree",
    "build_timer_tree",
]


class ReshapedLedger:
    """The ledger, with what it emits reshaped by `reshape` (for subclasses)."""

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
        """Apply as the ledger; emit what `reshape` makes of its emits."""
        applied = self._inner.apply(state, event, envelope)
        return Applied(applied.state, self.reshape(event, applied.emits))

    def reshape(self, event: Any, emits: Sequence[Emit]) -> list[Emit]:
        """*emits* as they are."""
        return list(emits)


@final
class PoisonLedger(ReshapedLedger):
    """The ledger, except for three memos.

    "POISON" always fails, "REJECT" is refused for good, and "WAIT" always
    waits for something outside the message (`RetryLater`).
    """

    def apply(
        self, state: LedgerState, event: Any, envelope: Envelope
    ) -> Applied[LedgerState]:
        """Fail on the markers, else behave as the ledger."""
        if isinstance(event, LedgerEntryPosted):
            if event.memo == "POISON":
                raise RuntimeError("poisoned entry")
            if event.memo == "REJECT":
                raise UpstreamRejected("ledger", "entry refused by rule")
            if event.memo == "WAIT":
                raise RetryLater("the account's reference data is not loaded yet")
        return super().apply(state, event, envelope)


def _app(rt: Runtime, workflow: Any) -> SupervisorSpec:
    workflows = SupervisorSpec(id="workflows", children=[rt.workflow(workflow)])
    return SupervisorSpec(
        id="app",
        children=[ChildSpec(id="workflows", start=lambda: workflows, shutdown_s=None)],
    )


def build_poison_tree(rt: Runtime) -> SupervisorSpec:
    """One workflow subtree running `PoisonLedger`."""
    return _app(rt, PoisonLedger())


@final
class ClosingLedger(ReshapedLedger):
    """The ledger, whose accounts are over once they hold two entries."""

    def finished(self, state: LedgerState) -> bool:
        """Two entries close an account."""
        return state.entries >= 2


def build_closing_tree(rt: Runtime) -> SupervisorSpec:
    """One workflow subtree running `ClosingLedger`."""
    return _app(rt, ClosingLedger())


class OrderedState(msgspec.Struct, frozen=True, kw_only=True):
    """The entry ids an account applied, in the order it applied them."""

    order: tuple[str, ...] = ()


@final
class OrderedLedger:
    """An ordered workflow that records the order in which entries apply.

    Memo ``FLAKY`` fails the entry's first attempt only (a transient fault:
    its retry goes through); memo ``REJECT`` is refused permanently until
    the test sets `fixed` (the deploy of a fix). ``ledger.entry.applied``
    stands for a timer: it is `unheld`, applied at once even while the
    account is held, and recorded as ``check:<entry id>``.
    """

    name = "ordered"
    ordered = True
    #: A check that only reads the state: applied even behind a parked entry.
    unheld = frozenset({"ledger.entry.applied"})
    state_type = OrderedState

    def __init__(self) -> None:
        self.fixed = False
        self._failed: set[str] = set()

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """Posted ledger entries, and checks (unheld)."""
        return {
            "ledger.entry.posted": LedgerEntryPosted,
            "ledger.entry.applied": LedgerEntryApplied,
        }

    def initial(self, correlation_id: str) -> OrderedState:
        """Nothing applied yet."""
        return OrderedState()

    def apply(
        self, state: OrderedState, event: Any, envelope: Envelope
    ) -> Applied[OrderedState]:
        """Append the entry id, unless its memo says to fail."""
        if isinstance(event, LedgerEntryApplied):
            checked = f"check:{event.entry_id}"
            return Applied(OrderedState(order=(*state.order, checked)))
        assert isinstance(event, LedgerEntryPosted)
        if event.memo == "FLAKY" and event.entry_id not in self._failed:
            self._failed.add(event.entry_id)
            raise RuntimeError(f"entry {event.entry_id} fails once")
        if event.memo == "REJECT" and not self.fixed:
            raise UpstreamRejected("ordered", f"entry {event.entry_id} refused")
        return Applied(OrderedState(order=(*state.order, event.entry_id)))


def build_ordered_tree(rt: Runtime) -> SupervisorSpec:
    """One workflow subtree running `OrderedLedger`."""
    return _app(rt, OrderedLedger())


@final
class TimerLedger(ReshapedLedger):
    """The ledger, except that memo ``DELAY=<s>`` announces the entry *s* later."""

    def reshape(self, event: Any, emits: Sequence[Emit]) -> list[Emit]:
        """Delayed when the memo asks."""
        if isinstance(event, LedgerEntryPosted) and event.memo.startswith("DELAY="):
            delay_s = float(event.memo.removeprefix("DELAY="))
            return [msgspec.structs.replace(e, delay_s=delay_s) for e in emits]
        return list(emits)


def build_timer_tree(rt: Runtime) -> SupervisorSpec:
    """One workflow subtree running `TimerLedger`."""
    return _app(rt, TimerLedger())


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
