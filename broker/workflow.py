"""Workflows: durable process managers the engine applies messages to.

A workflow is pure decision logic: given the stored state of one instance
(keyed by correlation id) and one event, it returns the new state and the
messages that follow. The engine (`broker.shard`) does everything durable
around it: deduplication, loading and saving state with a version check,
writing the outbox, retries and dead letters, all in one transaction per
batch. Keeping ``apply`` free of I/O is what lets a batch of hundreds of
messages commit in one round trip, and what makes redelivery safe.

Two things a workflow may ask of the engine besides: an `Emit` with
``delay_s`` is a durable timer (the message is written with the batch and
published once due, across restarts); and a workflow whose class sets
``ordered = True`` keeps each instance's messages in order across failures:
while one of its messages is parked (dead-lettered or waiting in a retry
tier), the instance's later messages are held, and applied after it once
it goes through (see `broker.commit`). Without it, a parked message does
not stop the messages behind it, which suits workflows whose events
commute (a ledger), not a deal. An ordered workflow may name event types
in ``unheld``: those are applied even while their instance is held (a
timer that only reads the state, such as an SLA check: a deal stuck behind
a parked message is exactly the deal whose SLA must still fall due).

A workflow may also say when an instance is over: a method
``finished(state) -> bool``. A finished instance that nothing changed for
``[core] finished-retention-days`` is deleted by the hourly maintenance
(unless held, or a timer of it is still to fall due); a message for it
after that starts a new instance. Without the method, instances are kept.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from broker.xref import XrefEntry
from canonical.envelope import Envelope

__all__ = [
    "Emit",
    "Workflow",
    "Applied",
    "finished_test",
    "is_ordered",
    "unheld_types",
]

S = TypeVar("S")


class Emit(msgspec.Struct, frozen=True, kw_only=True):
    """A message that follows from an applied event.

    Attributes:
        event: the canonical event Struct (its tag becomes the envelope type).
        exchange: where to publish it; ``q2c.events`` routes by type.
        routing_key: defaults to the event type.
        subject: the business document it is about.
        key_suffix: distinguishes several emits of one event type caused by
            one message; the idempotency key is derived from the cause's key,
            so a replayed cause yields the same keys downstream.
        delay_s: publish no earlier than this many seconds after the batch
            commits: a timer that survives restarts (it is an outbox row).
            It fires within about ``[core] relay-poll-s`` of falling due.
    """

    event: Any
    exchange: str = "q2c.events"
    routing_key: str | None = None
    subject: str | None = None
    key_suffix: str = ""
    delay_s: float = 0.0


class Applied(msgspec.Struct, Generic[S], frozen=True):
    """What ``apply`` returns: the new state, what to send, and what it learnt.

    ``xref`` binds canonical ids to the native ids a result announced (the
    ERP's order number for our order); they are written in the batch's
    transaction, so the registry never lags the state that produced it.
    """

    state: S
    emits: Sequence[Emit] = ()
    xref: Sequence[XrefEntry] = ()


class Workflow(Protocol[S]):
    """A process manager keyed by correlation id.

    ``apply`` raises `PermanentError` for a message that can never be
    applied (it is dead-lettered at once); any other exception sends the
    message through the retry tiers and, after the last attempt, to the
    dead letters. It must not do I/O: it may run again for the same message
    if the batch's transaction is retried.

    A class attribute ``ordered = True`` (optional, see the module
    docstring) holds an instance's later messages while one is parked;
    ``unheld`` (optional, a frozenset of event types) names those applied
    even then. A method ``finished(state) -> bool`` (optional) lets
    finished instances go after the retention.
    """

    @property
    def name(self) -> str:
        """Dotted-lowercase name; the shard queues are ``q2c.wf.<name>.<n>``."""
        ...

    @property
    def events(self) -> Mapping[str, type[Any]]:
        """Event type tag → Struct type, for every type this workflow handles."""
        ...

    @property
    def state_type(self) -> type[S]:
        """The msgspec Struct type of an instance's state."""
        ...

    def initial(self, correlation_id: str) -> S:
        """The state of an instance that has seen nothing yet."""
        ...

    def apply(self, state: S, event: Any, envelope: Envelope) -> Applied[S]:
        """Apply one event to one instance's state."""
        ...


def is_ordered(workflow: object) -> bool:
    """Whether *workflow* holds an instance's later messages behind a parked one."""
    return getattr(workflow, "ordered", False) is True


def unheld_types(workflow: object) -> frozenset[str]:
    """The event types *workflow* applies even while their instance is held."""
    unheld: object = getattr(workflow, "unheld", ())
    if isinstance(unheld, (frozenset, set, tuple)):
        return frozenset(str(t) for t in unheld)
    return frozenset()


def finished_test(workflow: object) -> Callable[[Any], bool] | None:
    """*workflow*'s ``finished(state)``, or None when it keeps every instance."""
    finished: object = getattr(workflow, "finished", None)
    return finished if callable(finished) else None
