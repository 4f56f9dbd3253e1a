"""Wire format of the admin control socket: one JSON object per line, each way.

A request is a tagged union on ``cmd``; a reply is ``{"ok": true, "result":
...}`` or ``{"ok": false, "error": "...", "code": "..."}``. Requests forbid
unknown fields, because a mistyped filter on ``dlq_purge`` must fail loudly
rather than purge more than was meant; replies tolerate them, so an older
``brokerctl`` can still read a newer daemon.

The framing is newline-delimited JSON rather than the length prefix of
msgspec's asyncio example, so that ``socat`` is a usable client::

    $ echo '{"cmd": "status"}' | socat - UNIX-CONNECT:var/brokerd.sock
    {"ok":true,"result":{...}}

msgspec never emits a raw newline inside encoded JSON (it escapes them in
strings), so one encoded object is always exactly one line.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NotRequired, TypedDict, get_args

import msgspec
from msgspec import Meta

from broker.errors import ControlError
from broker.store import DeadLetterFilter, DeadLetterRow, ParkedOutboxRow

__all__ = [
    # Requests
    "StatusRequest",
    "ActorsRequest",
    "DlqListRequest",
    "DlqShowRequest",
    "DlqReplayRequest",
    "DlqPurgeRequest",
    "OutboxListRequest",
    "OutboxShowRequest",
    "OutboxRetryRequest",
    "OutboxPurgeRequest",
    "HoldListRequest",
    "HoldReleaseRequest",
    "DrainRequest",
    "RestartRequest",
    "TraceRequest",
    "XrefGetRequest",
    "XrefFindRequest",
    "QueuesRequest",
    "PauseRequest",
    "ResumeRequest",
    "Request",
    "COMMANDS",
    "BULK_TIMEOUT_S",
    "is_bulk",
    # Replies
    "ErrorCode",
    "Reply",
    "RequestRefused",
    "ActorNode",
    "dead_letter_view",
    "parked_outbox_view",
    # Framing
    "command_name",
    "encode_request",
    "decode_request",
    "encode_reply",
    "decode_reply",
]

ErrorCode = Literal[
    "bad_request", "unknown_command", "not_found", "too_large", "forbidden", "failed"
]
#: A dead letter's status, or ``open``: parked and held alike.
LetterStatus = Literal["parked", "held", "released", "replayed", "purged", "open"]
Text = Annotated[str, Meta(min_length=1, max_length=512)]
RowId = Annotated[int, Meta(ge=1)]
#: A system's name, as in ``[topology] systems``: ``crm``, ``erp_cloud`` …
SystemName = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]*\Z", max_length=64)]
#: An xref kind: ``order``, ``account``, ``product``, ``invoice`` …
XrefKind = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_.-]*\Z", max_length=64)]


class RequestRefused(ControlError):
    """A request was refused, by the protocol layer or by the daemon's reply.

    ``code`` is one of `ErrorCode`; the message is meant for an operator.
    """

    def __init__(self, message: str, *, code: ErrorCode) -> None:
        super().__init__(message)
        self.code: ErrorCode = code


class _Command(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    forbid_unknown_fields=True,  # a typo in an admin command is an error
    tag_field="cmd",
):
    """Base of every request; ``cmd`` carries the tag on the wire."""


class StatusRequest(_Command, frozen=True, tag="status"):
    """Daemon health: uptime, connections, supervisor reprs, store counts."""


class ActorsRequest(_Command, frozen=True, tag="actors"):
    """The supervision tree with mailbox fill and restart counts."""


class _Selection(_Command, frozen=True):
    """Which dead letters a DLQ command applies to (every set field must match).

    ``status`` defaults to ``parked``; send ``null`` to match any status, or
    ``open`` for parked and held ones (messages waiting behind a parked one
    of their workflow instance).
    """

    ids: Annotated[tuple[RowId, ...], Meta(max_length=10_000)] = ()
    reason: Text | None = None
    queue: Text | None = None
    type: Text | None = None
    correlation_id: Text | None = None
    status: LetterStatus | None = "parked"
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 100

    def narrows(self) -> bool:
        """Whether ids or a filter other than ``status``/``limit`` is set."""
        return bool(self.ids) or any(
            value is not None
            for value in (self.reason, self.queue, self.type, self.correlation_id)
        )

    def to_filter(self) -> DeadLetterFilter:
        """The store-level filter this selection means."""
        return DeadLetterFilter(
            ids=self.ids,
            reason=self.reason,
            queue=self.queue,
            type=self.type,
            correlation_id=self.correlation_id,
            status=self.status,
            limit=self.limit,
        )


class DlqListRequest(_Selection, frozen=True, tag="dlq_list"):
    """List dead letters matching the selection, newest first."""


class DlqShowRequest(_Command, frozen=True, tag="dlq_show"):
    """One dead letter in full, body included."""

    id: RowId


class DlqReplayRequest(_Selection, frozen=True, tag="dlq_replay"):
    """Send matching parked dead letters back to their queues via the outbox.

    Refused unless it names ids or a filter, or says ``all=true``: replaying
    the whole DLQ must be a deliberate act. ``max_replays`` is the loop
    guard: rows already replayed that often are skipped.

    Raises:
        ValueError: on construction (or ``ValidationError`` on decode) when
            neither ids, a filter nor ``all`` is given.
    """

    dry_run: bool = False
    max_replays: Annotated[int, Meta(ge=1, le=1_000)] = 3
    all: bool = False

    def __post_init__(self) -> None:
        if not self.all and not self.narrows():
            raise ValueError(_UNFILTERED.format(verb="replay"))


class DlqPurgeRequest(_Selection, frozen=True, tag="dlq_purge"):
    """Mark matching dead letters purged (their bodies are dropped).

    Guarded like `DlqReplayRequest`: ids, a filter, or ``all=true``.

    Raises:
        ValueError: on construction (or ``ValidationError`` on decode) when
            neither ids, a filter nor ``all`` is given.
    """

    dry_run: bool = False
    all: bool = False

    def __post_init__(self) -> None:
        if not self.all and not self.narrows():
            raise ValueError(_UNFILTERED.format(verb="purge"))


class OutboxListRequest(_Command, frozen=True, tag="outbox_list"):
    """List parked outbox rows (unroutable or unpublishable), newest first."""

    limit: Annotated[int, Meta(ge=1, le=10_000)] = 100


class OutboxShowRequest(_Command, frozen=True, tag="outbox_show"):
    """One parked outbox row in full, body included."""

    id: RowId


class _ParkedSelection(_Command, frozen=True):
    """Which parked outbox rows a retry or purge acts on: ``ids``, or ``all``.

    Exactly one of the two: acting on every parked row must be a deliberate
    act, and ids with ``all`` would be ambiguous.

    Raises:
        ValueError: on construction (or ``ValidationError`` on decode) when
            neither or both are given.
    """

    ids: Annotated[tuple[RowId, ...], Meta(max_length=10_000)] = ()
    all: bool = False
    dry_run: bool = False

    def __post_init__(self) -> None:
        if bool(self.ids) == self.all:
            verb = str(self.__struct_config__.tag).removeprefix("outbox_")
            raise ValueError(
                f"name the parked outbox rows to {verb} by id, or say all=true "
                "(not both)"
            )

    def selected(self) -> tuple[int, ...] | None:
        """The ids named, or None for every parked row."""
        return None if self.all else self.ids


class OutboxRetryRequest(_ParkedSelection, frozen=True, tag="outbox_retry"):
    """Unpark parked outbox rows: the relay publishes them again.

    For rows parked unroutable once the missing queue or binding exists.
    Rows no longer parked are skipped, not touched.
    """


class OutboxPurgeRequest(_ParkedSelection, frozen=True, tag="outbox_purge"):
    """Delete parked outbox rows for good; rows no longer parked are skipped."""


class HoldListRequest(_Command, frozen=True, tag="hold_list"):
    """List held workflow instances (of one ``workflow``, or all), longest held first.

    Each with its blocker, how many messages wait behind it, and the
    blocker's dead-letter status (null when it waits in a retry tier).
    """

    workflow: Text | None = None
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 1000


class HoldReleaseRequest(_Command, frozen=True, tag="hold_release"):
    """Hand one instance's hold on, as purging its blocker would.

    For a blocker that will not come back (its copy in a retry tier was
    lost): the first held message becomes the blocker and goes back to its
    queue. Refused when the instance is not held, or when its blocker is a
    parked dead letter (replay or purge that instead).
    """

    workflow: Text
    correlation_id: Text


class DrainRequest(_Command, frozen=True, tag="drain"):
    """Stop intake, finish in-flight work, then exit 0: a shutdown, as SIGTERM."""


class RestartRequest(_Command, frozen=True, tag="restart"):
    """Restart one actor or subtree through its supervisor."""

    actor_id: Text


class TraceRequest(_Command, frozen=True, tag="trace"):
    """The timeline of one correlation id across systems."""

    correlation_id: Text


class XrefGetRequest(_Command, frozen=True, tag="xref_get"):
    """Every system's native id for one canonical object, e.g. order ``order-X``."""

    kind: XrefKind
    canonical_id: Text


class XrefFindRequest(_Command, frozen=True, tag="xref_find"):
    """The canonical object one system's native id belongs to.

    E.g. kind ``order``, system ``erp_cloud``, native id ``4711``.
    """

    kind: XrefKind
    system: Text
    native_id: Text


class QueuesRequest(_Command, frozen=True, tag="queues"):
    """The daemon's ``q2c.*`` queues: ready, unacknowledged, consumers, type."""


class PauseRequest(_Command, frozen=True, tag="pause"):
    """Stop calls to one system, on every daemon sharing the store, until resumed.

    Its commands wait in its queue. Refused for a system not in
    ``[topology] systems``; pausing a paused system replaces the reason.
    """

    system: SystemName
    reason: Annotated[str, Meta(max_length=512)] = ""


class ResumeRequest(_Command, frozen=True, tag="resume"):
    """Let a paused system's actors take commands again.

    A system that is not paused is no error: the result says
    ``resumed: false``.
    """

    system: SystemName


Request = (
    StatusRequest
    | ActorsRequest
    | DlqListRequest
    | DlqShowRequest
    | DlqReplayRequest
    | DlqPurgeRequest
    | OutboxListRequest
    | OutboxShowRequest
    | OutboxRetryRequest
    | OutboxPurgeRequest
    | HoldListRequest
    | HoldReleaseRequest
    | DrainRequest
    | RestartRequest
    | TraceRequest
    | XrefGetRequest
    | XrefFindRequest
    | QueuesRequest
    | PauseRequest
    | ResumeRequest
)

#: Every ``cmd`` the daemon understands.
COMMANDS: frozenset[str] = frozenset(
    str(cls.__struct_config__.tag) for cls in get_args(Request)
)

#: The daemon's deadline for a bulk command (`is_bulk`), instead of the
#: short one of every other request; ``brokerctl`` waits this long for one.
BULK_TIMEOUT_S = 600.0


def is_bulk(req: Request) -> bool:
    """Whether *req* acts on many rows: a DLQ replay or purge, an outbox retry or purge.

    An outbox retry or purge of ``all`` works through every parked row, a
    thousand per statement; cut off by the short per-request deadline it
    would stop half-way, so these run under `BULK_TIMEOUT_S`.
    """
    return isinstance(
        req,
        DlqReplayRequest | DlqPurgeRequest | OutboxRetryRequest | OutboxPurgeRequest,
    )


_UNFILTERED = (
    "refusing to {verb} every dead letter: name ids or a filter "
    "(reason, queue, type, correlation_id), or say all=true"
)


class Reply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One answer: ``ok`` with a ``result``, or not ``ok`` with ``error`` and ``code``.

    Unknown fields are ignored, so the daemon may add some later.
    """

    ok: bool
    result: Any = None
    error: str | None = None
    code: ErrorCode | None = None

    @classmethod
    def failure(cls, error: str, code: ErrorCode) -> Reply:
        """An error reply."""
        return cls(ok=False, error=error, code=code)


class ActorNode(TypedDict):
    """One node of the ``actors`` result: the root supervisor, recursively.

    It mirrors `broker.system.NodeStatus`: actors have ``mailbox`` (``fill``
    of ``size``, shown as ``12/64``, and ``high_water``), supervisors have
    ``children``; ``repr`` is the status string of either.
    """

    id: str
    kind: Literal["supervisor", "actor"]
    state: NotRequired[str]
    restarts: NotRequired[int]
    strategy: NotRequired[str]
    repr: NotRequired[str]
    mailbox: NotRequired[dict[str, int]]
    children: NotRequired[list[ActorNode]]


def dead_letter_view(row: DeadLetterRow, *, body: bool = False) -> dict[str, Any]:
    """A dead letter as a JSON-ready dict, for ``dlq_list`` and ``dlq_show`` results.

    Without *body*, the body and headers are left out (listings stay small
    and keep message contents off operators' terminals). With it, the body
    is given as text when it is UTF-8 and as ``body_b64`` otherwise.
    """
    view: dict[str, Any] = msgspec.to_builtins(row)
    del view["body"]
    if not body:
        del view["headers"]
        return view
    try:
        view["body"] = row.body.decode("utf-8")
    except UnicodeDecodeError:
        view["body_b64"] = msgspec.to_builtins(row.body)
    return view


def parked_outbox_view(row: ParkedOutboxRow) -> dict[str, Any]:
    """A parked outbox row as a JSON-ready dict, for ``outbox_list`` and ``_show``.

    A listed row (no body) leaves out its headers too, as `dead_letter_view`
    does; a shown one has its body as text when it is UTF-8 and as
    ``body_b64`` otherwise.
    """
    view: dict[str, Any] = msgspec.to_builtins(row)
    del view["body"]
    if row.body is None:
        del view["headers"]
        return view
    try:
        view["body"] = row.body.decode("utf-8")
    except UnicodeDecodeError:
        view["body_b64"] = msgspec.to_builtins(row.body)
    return view


class _Head(msgspec.Struct, frozen=True):
    """Just the ``cmd`` of a request, to tell unknown commands from bad ones."""

    cmd: str


_request_decoder: msgspec.json.Decoder[Request] = msgspec.json.Decoder(Request)
_head_decoder = msgspec.json.Decoder(_Head)
_reply_decoder = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


def command_name(req: Request) -> str:
    """The ``cmd`` tag of a request, e.g. ``"dlq_list"``."""
    return str(req.__struct_config__.tag)


def encode_request(req: Request) -> bytes:
    """One request as a JSON line (newline included)."""
    return _encoder.encode(req) + b"\n"


def decode_request(line: bytes) -> Request:
    """Parse one request line (with or without its newline).

    Raises:
        RequestRefused: ``unknown_command`` for a ``cmd`` not in `COMMANDS`,
            ``bad_request`` for anything else that is not a valid request.
    """
    try:
        return _request_decoder.decode(line)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        error = exc
    try:
        cmd = _head_decoder.decode(line).cmd
    except (msgspec.ValidationError, msgspec.DecodeError):
        cmd = None
    if cmd is not None and cmd not in COMMANDS:
        known = ", ".join(sorted(COMMANDS))
        raise RequestRefused(
            f"unknown command {cmd!r} (known: {known})", code="unknown_command"
        ) from error
    raise RequestRefused(f"bad request: {error}", code="bad_request") from error


def encode_reply(reply: Reply) -> bytes:
    """One reply as a JSON line (newline included).

    Raises:
        TypeError: the result holds a value JSON cannot carry.
    """
    try:
        return _encoder.encode(reply) + b"\n"
    except msgspec.EncodeError as exc:  # e.g. a non-finite float in strict mode
        raise TypeError(str(exc)) from exc


def decode_reply(line: bytes) -> Reply:
    """Parse one reply line.

    Raises:
        ControlError: the line is not a reply.
    """
    try:
        return _reply_decoder.decode(line)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ControlError(f"unreadable reply from the daemon: {exc}") from exc
