"""Errors the daemon raises on purpose.

A failed delivery needs one decision: redeliver later, or dead-letter now.
So the tree has two trunks and every concrete error picks one; code that
handles failures catches a trunk, never a leaf. Anything outside the tree
is a bug: it crashes the actor and its supervisor decides what happens next.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "TransientError",
    "PermanentError",
    "RetryLater",
    "ConfigError",
    "UndecodableMessage",
    "MessageTooLarge",
    "UnknownMessageType",
    "SchemaInvalid",
    "StateUndecodable",
    "UpstreamUnavailable",
    "UpstreamRejected",
    "SignatureInvalid",
    "StoreUnavailable",
    "ConcurrencyConflict",
    "TransportUnavailable",
    "PublishFailed",
    "MailboxFull",
    "ActorStopped",
    "AskTimeout",
    "SupervisorGaveUp",
    "ControlError",
]


class BrokerError(Exception):
    """Root of the tree; never raised directly."""


class TransientError(BrokerError):
    """The same message may succeed later: back off and redeliver."""

    retry_after_s: float | None = None

    #: Whether a failure of this kind uses up one of the message's
    #: ``max-attempts``. A failure that says nothing of the message (its
    #: system is down, something it waits for is not there yet) does not:
    #: the message is retried at its tier until it has failed that way for
    #: ``[core] unavailable-max-s``, then dead-lettered as
    #: ``unavailable_too_long``.
    spends_attempts: bool = True


class PermanentError(BrokerError):
    """The same message will fail again: dead-letter it now."""

    #: Short machine-readable reason stored with the dead letter.
    reason: str = "permanent"


class RetryLater(TransientError):
    """Raised by an actor that wants a redelivery; logged at info, not error.

    It waits for something outside the message (a key another daemon holds,
    reference data not loaded yet), so it spends time, not attempts.
    """

    spends_attempts = False

    def __init__(self, reason: str, *, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = delay_s


class ConfigError(PermanentError):
    """The configuration is invalid. Raised at startup, before any actor runs."""

    reason = "config"


class UndecodableMessage(PermanentError):
    """A delivery is not valid JSON or not a canonical envelope at all."""

    reason = "malformed"


class MessageTooLarge(PermanentError):
    """A delivery is larger than the configured limit; it was not decoded."""

    reason = "oversize"


class UnknownMessageType(PermanentError):
    """A well-formed envelope whose ``type`` no handler here understands."""

    reason = "unknown_type"


class SchemaInvalid(PermanentError):
    """A well-formed envelope whose data does not match its type's schema."""

    reason = "schema_invalid"


class StateUndecodable(PermanentError):
    """An instance's stored state does not decode as its workflow's state type.

    Written by another version of the workflow, or changed by hand. Its
    messages are dead-lettered (an ordered workflow's instance is held) until
    a version that reads it is deployed and they are replayed.
    """

    reason = "state_undecodable"


class UpstreamUnavailable(TransientError):
    """An external system timed out, refused the connection, or said 'busy'.

    That says nothing of the command: it spends time, not attempts.
    """

    spends_attempts = False

    def __init__(
        self, system: str, detail: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{system} unavailable: {detail}")
        self.system = system
        self.retry_after_s = retry_after_s


class UpstreamRejected(PermanentError):
    """An external system understood the request and refused it.

    ``code`` is the vendor's own error code (``DUPLICATE_VALUE``,
    ``SD/311``, ``resource_missing``) so a connector can tell a business
    refusal (order fallout) from an integration fault.
    """

    reason = "rejected"

    def __init__(self, system: str, detail: str, *, code: str = "") -> None:
        super().__init__(f"{system} rejected the request: {detail}")
        self.system = system
        self.code = code
        self.detail = detail


class SignatureInvalid(PermanentError):
    """A webhook's signature is missing, malformed, wrong or outside its tolerance."""

    reason = "signature_invalid"


class StoreUnavailable(TransientError):
    """Postgres is unreachable, or asked us to retry (serialization, deadlock)."""


class ConcurrencyConflict(TransientError):
    """Another writer claimed a key or changed an instance first: reload and retry."""


class TransportUnavailable(TransientError):
    """The message broker connection is down or was closed under us."""


class PublishFailed(TransientError):
    """The broker did not confirm a publish (nack, return or no answer in time)."""


class MailboxFull(TransientError):
    """A non-blocking send found the actor's mailbox full."""


class ActorStopped(BrokerError):
    """The actor behind a reference is not running."""


class AskTimeout(TransientError):
    """An ``ask`` got no reply within its deadline."""


class SupervisorGaveUp(BrokerError):
    """A supervisor exceeded its restart intensity and stopped its children."""

    def __init__(self, supervisor: str, child: str, cause: BaseException) -> None:
        super().__init__(
            f"supervisor {supervisor!r} gave up after child {child!r} failed: "
            f"{type(cause).__name__}: {cause}"
        )
        self.supervisor = supervisor
        self.child = child
        self.cause = cause


class ControlError(BrokerError):
    """The control socket could not be reached, or refused the request."""
