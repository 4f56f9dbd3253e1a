"""Workflows: durable process managers the engine applies messages to.

A workflow is pure decision logic: given the stored state of one instance
(keyed by correlation id) and one event, it returns the new state and the
messages that follow. The engine (`broker.shard`) does everything durable
around it: deduplication, loading and saving state with a version check,
writing the outbox, retries and dead letters, all in one transaction per
batch. Keeping ``apply`` free of I/O is what lets a batch of hundreds of
messages commit in one round trip, and what makes redelivery safe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from canonical.envelope import Envelope

__all__ = ["Emit", "Workflow", "Applied"]

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
    """

    event: Any
    exchange: str = "q2c.events"
    routing_key: str | None = None
    subject: str | None = None
    key_suffix: str = ""


class Applied(msgspec.Struct, Generic[S], frozen=True):
    """What ``apply`` returns: the new state and what to send."""

    state: S
    emits: Sequence[Emit] = ()


class Workflow(Protocol[S]):
    """A process manager keyed by correlation id.

    ``apply`` raises `PermanentError` for a message that can never be
    applied (it is dead-lettered at once); any other exception sends the
    message through the retry tiers and, after the last attempt, to the
    dead letters. It must not do I/O: it may run again for the same message
    if the batch's transaction is retried.
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
