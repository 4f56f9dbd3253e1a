"""Actors, the references that reach them, and one running incarnation.

An `Actor` is plain state plus three hooks: ``on_start``, ``handle`` and
``on_stop``. It never runs itself: a supervisor (`broker.supervision`) turns
it into an `ActorProcess` (one incarnation: a mailbox, a task, a `Context`)
and starts a fresh instance, with a fresh mailbox, after every crash.

An `ActorRef` names a child *slot*, not an incarnation, so a reference stays
valid across restarts. While no incarnation accepts messages (between a crash
and the restart, while draining, after the stop) ``tell`` and ``ask`` raise
`ActorStopped` at once rather than parking the message somewhere unbounded.
Messages still queued in a crashed incarnation's mailbox die with it, as in
OTP; pending asks among them fail with `ActorStopped`. Durable delivery is
the transport's job: unacknowledged deliveries come back.

Failure is OTP's "let it crash": an exception from ``on_start``, ``handle``,
``on_stop`` or a background task started with `Context.start_soon` ends the
incarnation and the supervisor applies the child's restart policy. For
``ask``, the exception raised by ``handle`` is re-raised to the asker *and*
crashes the actor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVarTuple, Unpack, final

import anyio
import anyio.abc
import structlog
from structlog.typing import FilteringBoundLogger
from typing_extensions import TypeVar

from broker.errors import ActorStopped, AskTimeout
from broker.mailbox import Mailbox

if TYPE_CHECKING:
    from broker.system import ActorSystem

__all__ = [
    # for actor authors
    "Actor",
    "Context",
    "ActorRef",
    # internal: used by broker.supervision
    "ActorProcess",
    "Letter",
    "capture_crash",
]

# The message type. Its default lets actor authors write a bare ``Context``
# (snippet C's style) under mypy --strict; ``Context[OrderEvent]`` works too.
M = TypeVar("M", default=Any)
PosArgsT = TypeVarTuple("PosArgsT")

_logger = structlog.get_logger(__name__)


async def capture_crash(
    fn: Callable[[Unpack[PosArgsT]], Awaitable[object]], *args: *PosArgsT
) -> Exception | None:
    """Await ``fn(*args)`` and return the exception it crashed with, if any.

    Internal: not for use outside broker/. Every task the runtime owns (a
    child's main task, an actor's body, each background task) runs through
    here, so a crash is reported as one plain exception to whoever decides
    what happens next, never as an ``ExceptionGroup`` from a task group.
    Cancellation and other ``BaseException`` s pass through untouched.
    """
    try:
        await fn(*args)
    except Exception as exc:  # noqa: BLE001 - let it crash: a crash is data for the supervisor, which logs it and applies the restart policy
        return exc
    return None


class Actor(Generic[M]):
    """Base class for actors: subclass it and override the hooks you need.

    The runtime calls the hooks from one task, one at a time: ``on_start``
    once, then ``handle`` for each message in arrival order, then ``on_stop``
    after a normal stop. An exception from any hook crashes the actor (see the
    module docs); ``on_stop`` is not called after a crash, so cleanup that
    must always happen belongs in ``async with`` / ``finally``.

    Attributes:
        mailbox_size: how many messages may wait; a full mailbox makes
            ``tell`` wait, which is the runtime's back-pressure.
    """

    mailbox_size: ClassVar[int] = 64

    async def on_start(self, ctx: Context[M]) -> None:
        """Prepare the actor; siblings started after it wait until this returns.

        A one-shot job (a migration, say) can do its work here and call
        ``ctx.stop()``: that is a normal exit.
        """

    async def handle(self, msg: M, ctx: Context[M]) -> object:
        """Handle one message; the return value is the reply to an ``ask``."""
        return None

    async def on_stop(self, ctx: Context[M]) -> None:
        """Release what ``on_start`` acquired, after the mailbox was drained."""


@final
class Context(Generic[M]):
    """What an actor's hooks get besides the message.

    Attributes:
        id: the actor's dotted id, e.g. ``erp.order_sync``.
        log: a structlog logger bound with ``actor=<id>``.
    """

    __slots__ = ("_process", "id", "log")

    def __init__(self, process: ActorProcess[M]) -> None:
        self._process = process
        self.id = process.ref.id
        self.log: FilteringBoundLogger = _logger.bind(actor=self.id)

    @property
    def self_ref(self) -> ActorRef[M]:
        """A reference to this actor."""
        return self._process.ref

    @property
    def system(self) -> ActorSystem:
        """The running `ActorSystem`, e.g. to ``lookup`` a sibling's reference."""
        return self._process.system

    def start_soon(
        self,
        fn: Callable[[Unpack[PosArgsT]], Awaitable[object]],
        *args: *PosArgsT,
        name: str | None = None,
    ) -> None:
        """Run ``fn(*args)`` as a background task owned by this incarnation.

        The task is cancelled when the actor starts stopping (before the
        mailbox drains: background tasks are usually intake) or crashes. An
        exception in it crashes the actor, exactly like one in ``handle``.

        Raises:
            ActorStopped: the incarnation has already ended.
        """
        self._process.start_background(fn, args, name)

    def stop(self) -> None:
        """Ask the actor to stop normally after the current message.

        Intake closes at once (new ``tell`` s raise `ActorStopped`), the
        messages already queued are still handled, then ``on_stop`` runs.
        The supervisor treats this as a normal exit: a permanent child is
        restarted, transient and temporary ones are not.
        """
        self._process.request_stop()


@final
class _Reply:
    """The answer slot of one ``ask``."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = anyio.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def succeed(self, value: object) -> None:
        if not self._done.is_set():
            self._value = value
            self._done.set()

    def fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()

    async def wait(self) -> object:
        await self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


@final
class Letter(Generic[M]):
    """A message in a mailbox, with the reply slot of an ``ask``.

    Internal: not for use outside broker/.
    """

    __slots__ = ("message", "reply")

    def __init__(self, message: M, reply: _Reply | None = None) -> None:
        self.message = message
        self.reply = reply


@final
class ActorRef(Generic[M]):
    """The address of one supervised actor; valid across its restarts.

    Get one from `ActorSystem.lookup` or ``ctx.self_ref``; never build one.
    """

    __slots__ = ("_id", "_last", "_open")

    def __init__(self, id: str) -> None:
        self._id = id
        self._open: Mailbox[Letter[M]] | None = None
        self._last: Mailbox[Letter[M]] | None = None

    @property
    def id(self) -> str:
        """The actor's dotted id."""
        return self._id

    @property
    def mailbox(self) -> Mailbox[Letter[M]] | None:
        """The current (or latest) incarnation's mailbox, for statistics.

        None before the actor first started.
        """
        return self._last

    @property
    def accepting(self) -> bool:
        """Whether an incarnation takes messages right now."""
        return self._open is not None and not self._open.closed

    async def tell(self, msg: M) -> None:
        """Queue ``msg``, waiting while the mailbox is full (back-pressure).

        Raises:
            ActorStopped: no incarnation accepts messages.
        """
        await self._mailbox().put(Letter(msg))

    def try_tell(self, msg: M) -> None:
        """Queue ``msg`` without waiting.

        Raises:
            MailboxFull: the mailbox is full.
            ActorStopped: no incarnation accepts messages.
        """
        self._mailbox().put_nowait(Letter(msg))

    async def ask(self, msg: M, *, timeout_s: float = 5.0) -> object:
        """Send ``msg`` and wait for ``handle`` 's return value.

        The deadline covers waiting for mailbox room as well as the reply.

        Raises:
            AskTimeout: no reply within ``timeout_s``.
            ActorStopped: no incarnation accepts messages, or the actor stopped
                or crashed before handling ``msg``.
            Exception: whatever ``handle`` raised; the actor crashed with it.
        """
        reply = _Reply()
        with anyio.move_on_after(timeout_s):
            await self._mailbox().put(Letter(msg, reply))
            return await reply.wait()
        raise AskTimeout(f"actor {self._id!r} did not answer within {timeout_s}s")

    def _mailbox(self) -> Mailbox[Letter[M]]:
        if self._open is None:
            raise ActorStopped(f"actor {self._id!r} is not running")
        return self._open

    def _attach(self, mailbox: Mailbox[Letter[M]]) -> None:
        self._open = self._last = mailbox

    def _detach(self, mailbox: Mailbox[Letter[M]]) -> None:
        if self._open is mailbox:
            self._open = None

    def __repr__(self) -> str:
        state = "running" if self.accepting else "not running"
        return f"<ActorRef {self._id} {state}>"


@final
class ActorProcess(Generic[M]):
    """One incarnation of an actor: its mailbox, its task, its background tasks.

    Internal: not for use outside broker/; supervisors create these.

    `run` raises the exception the incarnation crashed with and returns after
    a normal stop. A stop (`request_stop`, or ``ctx.stop()``) closes intake
    and cancels the background tasks, handles what is already queued, waits
    for the background tasks to finish, then calls ``on_stop``. Cancelling the
    surrounding scope kills it outright: no drain, no ``on_stop``.
    """

    def __init__(self, actor: Actor[M], ref: ActorRef[M], system: ActorSystem) -> None:
        self.actor = actor
        self.ref = ref
        self.system = system
        self.mailbox: Mailbox[Letter[M]] = Mailbox(ref.id, actor.mailbox_size)
        self.ctx: Context[M] = Context(self)
        self._scope = anyio.CancelScope()
        self._tg: anyio.abc.TaskGroup | None = None
        self._background: set[anyio.CancelScope] = set()
        self._background_gone: anyio.Event | None = None
        self._stopping = False
        self._ended = False
        self._crash: Exception | None = None

    async def run(self, started: Callable[[], None]) -> None:
        """Run the incarnation to its end; call ``started`` after ``on_start``.

        Raises:
            Exception: whatever crashed the incarnation.
        """
        self.ref._attach(self.mailbox)
        try:
            with self._scope:
                async with anyio.create_task_group() as tg:
                    self._tg = tg
                    crash = await capture_crash(self._lifecycle, started)
                    if crash is not None:
                        self._crashed(crash)
                    tg.cancel_scope.cancel()  # background tasks end with the actor
        finally:
            self._ended = True
            self.ref._detach(self.mailbox)
            for letter in self.mailbox.discard():
                if letter.reply is not None:
                    letter.reply.fail(ActorStopped(f"actor {self.ref.id!r} stopped"))
        if self._crash is not None:
            raise self._crash

    def request_stop(self) -> None:
        """Stop intake and background tasks; the body drains and calls on_stop."""
        self._stopping = True
        self.mailbox.close()
        for scope in self._background:
            scope.cancel()

    def start_background(
        self,
        fn: Callable[[Unpack[PosArgsT]], Awaitable[object]],
        args: tuple[*PosArgsT],
        name: str | None,
    ) -> None:
        """Back `Context.start_soon`."""
        if self._ended or self._tg is None:
            raise ActorStopped(f"actor {self.ref.id!r} is not running")
        self._tg.start_soon(self._run_background, fn, args, name=name)

    async def _lifecycle(self, started: Callable[[], None]) -> None:
        await self.actor.on_start(self.ctx)
        started()
        async for letter in self.mailbox:
            await self._deliver(letter)
        # Intake is closed and the queue is empty: a stop was requested, which
        # also cancelled the background tasks. on_stop runs once they are gone.
        while self._background:
            self._background_gone = anyio.Event()
            await self._background_gone.wait()
        await self.actor.on_stop(self.ctx)

    async def _deliver(self, letter: Letter[M]) -> None:
        reply = letter.reply
        if reply is None:
            await self.actor.handle(letter.message, self.ctx)
            return
        try:
            result = await self.actor.handle(letter.message, self.ctx)
        except BaseException as exc:
            # The asker learns what happened; the exception still propagates,
            # so a failing ask crashes the actor like a failing tell.
            if isinstance(exc, Exception):
                reply.fail(exc)
            else:
                reply.fail(ActorStopped(f"actor {self.ref.id!r} stopped"))
            raise
        reply.succeed(result)

    async def _run_background(
        self,
        fn: Callable[[Unpack[PosArgsT]], Awaitable[object]],
        args: tuple[*PosArgsT],
    ) -> None:
        crash: Exception | None = None
        with anyio.CancelScope() as scope:
            if self._stopping:
                scope.cancel()
            self._background.add(scope)
            try:
                crash = await capture_crash(fn, *args)
            finally:
                self._background.discard(scope)
                if not self._background and self._background_gone is not None:
                    self._background_gone.set()
        if crash is not None:
            self._crashed(crash)

    def _crashed(self, exc: Exception) -> None:
        if self._crash is None:
            self._crash = exc
        self.mailbox.close()
        self._scope.cancel()
