"""Supervision: child specs, the restart policy, and the supervisor loop.

The semantics are OTP's, so its design guide describes what happens here:

* Children start one at a time, in order. A child counts as started when its
  ``on_start`` returned (a subtree: when all of its children started), and
  the next sibling starts only then. An exception in ``on_start`` is a crash.
* When a child ends, its `Restart` type decides whether it comes back:
  permanent always, transient only after a crash, temporary never. A normal
  exit is the actor calling ``ctx.stop()``.
* The `Strategy` decides which children restart with it. Under
  ``one_for_all`` and ``rest_for_one`` the affected siblings stop in reverse
  start order and everything restarts in start order. As in OTP, temporary
  siblings stopped this way stay stopped, while a permanent or transient
  sibling that had already exited is started again.
* More than ``intensity`` restarts within ``period_s`` (`RestartWindow`) and
  the supervisor stops all its children, in reverse order, and crashes with
  `SupervisorGaveUp`: its parent then applies its own policy to the subtree.
* Stopping a child gives it ``shutdown_s`` to drain its mailbox and run
  ``on_stop``, then cancels it. ``None`` waits as long as it takes (use it for
  subtrees, whose children have their own deadlines); ``0`` cancels at once.

Each child runs in its own task in the supervisor's task group. That task
captures the child's crash (`broker.actor.capture_crash`) and wakes the
supervisor loop, so a crash never escapes as an ``ExceptionGroup``; the loop
is the only code that changes the children's state.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    Protocol,
    assert_never,
    final,
)

import anyio
import anyio.abc
import structlog

from broker.actor import Actor, ActorProcess, ActorRef, capture_crash
from broker.errors import ActorStopped, SupervisorGaveUp

if TYPE_CHECKING:
    from broker.system import ActorSystem, NodeState, NodeStatus

__all__ = [
    # specs
    "Restart",
    "Strategy",
    "ChildSpec",
    "SupervisorSpec",
    "RestartWindow",
    # internal: used by broker.system
    "Supervisor",
]

_logger = structlog.get_logger(__name__)


class Restart(enum.Enum):
    """When a child that stopped is started again."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only if it crashed
    TEMPORARY = "temporary"  # never


class Strategy(enum.Enum):
    """Which children restart when one crashes."""

    ONE_FOR_ONE = "one_for_one"  # the crashed child only
    ONE_FOR_ALL = "one_for_all"  # every child
    REST_FOR_ONE = "rest_for_one"  # the crashed child and those started after it


@dataclass(frozen=True, kw_only=True, slots=True)
class ChildSpec:
    """How to start, restart and stop one child.

    ``start`` is called for every incarnation and returns a fresh `Actor`, or
    the `SupervisorSpec` of a subtree whose ``id`` equals this ``id``. Ids are
    dotted and unique in the whole tree: ``erp.order_sync``.
    """

    id: str
    start: Callable[[], Actor[Any] | SupervisorSpec]
    restart: Restart = Restart.PERMANENT
    shutdown_s: float | None = 5.0  # grace before cancel; None waits (subtrees)

    def __post_init__(self) -> None:
        if self.shutdown_s is not None and self.shutdown_s < 0:
            raise ValueError(f"child {self.id!r}: shutdown_s must be >= 0 or None")


@dataclass(frozen=True, kw_only=True, slots=True)
class SupervisorSpec:
    """A supervisor: children start in order and stop in reverse order."""

    id: str
    children: Sequence[ChildSpec]
    strategy: Strategy = Strategy.ONE_FOR_ONE
    intensity: int = 3
    period_s: float = 30.0

    def __post_init__(self) -> None:
        ids = [child.id for child in self.children]
        if len(set(ids)) != len(ids):
            raise ValueError(f"supervisor {self.id!r}: duplicate child ids in {ids}")
        if self.intensity < 0 or self.period_s <= 0:
            raise ValueError(
                f"supervisor {self.id!r}: needs intensity >= 0 and period_s > 0"
            )


class RestartWindow:
    """OTP's rule: more than *intensity* restarts within *period_s* means give up."""

    def __init__(
        self,
        intensity: int,
        period_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._intensity = intensity
        self._period_s = period_s
        self._clock = clock
        self._restarts: deque[float] = deque()

    def allow_restart(self) -> bool:
        """Record a restart and say whether it is still within the limit."""
        now = self._clock()
        while self._restarts and now - self._restarts[0] > self._period_s:
            self._restarts.popleft()
        if len(self._restarts) >= self._intensity:
            return False
        self._restarts.append(now)
        return True

    @property
    def recent(self) -> int:
        """Restarts recorded within the last ``period_s`` (for status)."""
        now = self._clock()
        return sum(1 for t in self._restarts if now - t <= self._period_s)

    @property
    def intensity(self) -> int:
        """Restarts allowed per period."""
        return self._intensity

    @property
    def period_s(self) -> float:
        """Length of the sliding window, in seconds."""
        return self._period_s


class _Process(Protocol):
    """What a supervisor needs from a running child (actor or subtree)."""

    async def run(self, started: Callable[[], None]) -> None: ...

    def request_stop(self) -> None: ...


def _comes_back(spec: ChildSpec, crash: Exception | None) -> bool:
    """Whether the child's restart type restarts it after this exit."""
    return spec.restart is Restart.PERMANENT or (
        spec.restart is Restart.TRANSIENT and crash is not None
    )


@final
class _Run:
    """One incarnation of a child, as its supervisor tracks it."""

    __slots__ = ("crash", "done", "process", "scope", "started", "stopping")

    def __init__(self) -> None:
        self.process: _Process | None = None
        self.scope = anyio.CancelScope()  # cancelled to kill the incarnation
        self.done = anyio.Event()
        self.started = False
        self.crash: Exception | None = None
        self.stopping = False  # the supervisor is stopping it: not an exit to act on


@final
class _Slot:
    """A supervisor's place for one child, across the child's incarnations."""

    __slots__ = ("kind", "ref", "run", "spec", "starts", "supervisor", "wanted")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.run: _Run | None = None
        self.wanted = True  # should be running; False once stopped for good
        self.starts = 0
        self.kind: Literal["supervisor", "actor"] | None = None  # known after start()
        self.ref: ActorRef[Any] | None = None
        self.supervisor: Supervisor | None = None  # the latest subtree incarnation

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def restarts(self) -> int:
        return max(0, self.starts - 1)


@final
class Supervisor:
    """The running loop of one `SupervisorSpec`.

    Internal: not for use outside broker/; `ActorSystem` builds the root one
    and each supervisor builds its subtrees. ``repr`` is a status line:
    ``<Supervisor erp one_for_one 1/5 restarts in 60s>``.
    """

    def __init__(
        self,
        spec: SupervisorSpec,
        *,
        system: ActorSystem,
    ) -> None:
        self.spec = spec
        self.running = False
        self.restarts = 0  # restarts this supervisor decided on (not operator ones)
        self._system = system
        self._window = RestartWindow(spec.intensity, spec.period_s, clock=system.clock)
        self._slots = [_Slot(child) for child in spec.children]
        self._log = _logger.bind(supervisor=spec.id)
        self._lock = anyio.Lock()  # one change to the children at a time
        self._wakeup = anyio.Event()
        self._stop_requested = False
        self._starting: tuple[_Slot, anyio.CancelScope] | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        #: Operators' restarts, by child id, each with the event set once done;
        #: carried out by this supervisor's own loop (`_restart_requested`).
        self._restart_requests: dict[str, anyio.Event] = {}

    @property
    def id(self) -> str:
        """The supervisor's id."""
        return self.spec.id

    async def run(self, started: Callable[[], None]) -> None:
        """Start the children, supervise them, and stop them when asked.

        ``started`` is called once every child has started.

        Raises:
            SupervisorGaveUp: the restart limit was exceeded; every child has
                been stopped already.
        """
        self._system.registry.adopt(self)
        self.running = True
        gave_up: SupervisorGaveUp | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                gave_up = await self._supervise(started)
        finally:
            self.running = False
            for done in self._restart_requests.values():
                done.set()  # each requester learns the supervisor stopped
        if gave_up is not None:
            raise gave_up

    def request_stop(self) -> None:
        """Stop every child in reverse start order, then return from `run`.

        A child still in ``on_start`` gets its own ``shutdown_s`` to finish
        starting before it is cancelled.
        """
        self._stop_requested = True
        self._wakeup.set()
        if self._starting is not None:
            slot, scope = self._starting
            if slot.run is not None:
                slot.run.stopping = True
            if slot.spec.shutdown_s is not None:
                deadline = anyio.current_time() + slot.spec.shutdown_s
                scope.deadline = min(scope.deadline, deadline)

    async def restart_child(self, child_id: str) -> None:
        """Stop one child (within its ``shutdown_s``) and start it again.

        The operator's restart: it ignores the restart type, restarts no
        siblings, and does not count against the intensity. This supervisor's
        own loop carries it out, as OTP's supervisor handles
        ``restart_child`` in its process: a caller that gives up waiting (a
        control request past its deadline) does not leave the child stopped
        half-way. A second request for the same child while one is under way
        waits for that one.

        Raises:
            KeyError: no such child.
            ActorStopped: this supervisor is not running, or stopped before
                the child was started again.
        """
        slot = next((s for s in self._slots if s.id == child_id), None)
        if slot is None:
            raise KeyError(f"supervisor {self.id!r} has no child {child_id!r}")
        if not self._accepting():
            raise ActorStopped(f"supervisor {self.id!r} is not running")
        done = self._restart_requests.get(child_id)
        if done is None:
            done = self._restart_requests[child_id] = anyio.Event()
            self._log.info("actor_restart_requested", actor=child_id)
            self._wakeup.set()
        await done.wait()
        if not self._accepting():
            raise ActorStopped(
                f"supervisor {self.id!r} stopped before {child_id!r} restarted"
            )

    def _accepting(self) -> bool:
        """Running, and not asked to stop: an operator's restart may be made."""
        return self.running and not self._stop_requested

    async def _restart_requested(self) -> None:
        """Carry out the operators' restarts, in the order they were asked for."""
        while self._restart_requests and not self._stop_requested:
            child_id, done = next(iter(self._restart_requests.items()))
            slot = next(s for s in self._slots if s.id == child_id)
            try:
                await self._stop(slot)
                slot.wanted = True
                await self._start(slot)
            finally:
                del self._restart_requests[child_id]
                done.set()

    def status(self, *, restarts: int = 0) -> NodeStatus:
        """This subtree as plain data; ``restarts`` is the parent's count."""
        return {
            "id": self.id,
            "kind": "supervisor",
            "state": "running" if self.running else "stopped",
            "restarts": restarts,
            "repr": repr(self),
            "children": [self._slot_status(slot) for slot in self._slots],
        }

    async def _supervise(self, started: Callable[[], None]) -> SupervisorGaveUp | None:
        announced = False
        while True:
            async with self._lock:
                await self._restart_requested()
                gave_up = await self._converge()
                if gave_up is not None or self._stop_requested:
                    await self._stop_all()
                    return gave_up
            if not announced:
                announced = True
                started()
            await self._wakeup.wait()
            self._wakeup = anyio.Event()

    async def _converge(self) -> SupervisorGaveUp | None:
        """Act on exits, then start what should run, until nothing is left."""
        while not self._stop_requested:
            if (slot := self._first_exited()) is not None:
                if (gave_up := await self._on_exit(slot)) is not None:
                    return gave_up
            elif (slot := self._first_pending()) is not None:
                await self._start(slot)
            else:
                return None
        return None

    def _first_exited(self) -> _Slot | None:
        for slot in self._slots:
            run = slot.run
            if run is not None and run.done.is_set() and not run.stopping:
                return slot
        return None

    def _first_pending(self) -> _Slot | None:
        return next((s for s in self._slots if s.wanted and s.run is None), None)

    async def _on_exit(self, slot: _Slot) -> SupervisorGaveUp | None:
        run, slot.run = slot.run, None
        crash = run.crash if run is not None else None
        if not _comes_back(slot.spec, crash):
            slot.wanted = False
            self._log.info("actor_exited", actor=slot.id, crashed=crash is not None)
            return None
        if not self._window.allow_restart():
            self._log.error(
                "restart_limit_reached",
                actor=slot.id,
                intensity=self.spec.intensity,
                period_s=self.spec.period_s,
            )
            cause: BaseException = (
                crash
                if crash is not None
                else ActorStopped(f"child {slot.id!r} exited normally")
            )
            return SupervisorGaveUp(self.id, slot.id, cause)
        self.restarts += 1
        group = self._restart_group(slot)
        # Dependents stop first: later siblings may use earlier ones.
        for other in reversed(group):
            await self._stop(other)
        for other in group:
            other.wanted = other is slot or other.spec.restart is not Restart.TEMPORARY
        return None

    def _restart_group(self, slot: _Slot) -> list[_Slot]:
        match self.spec.strategy:
            case Strategy.ONE_FOR_ONE:
                return [slot]
            case Strategy.ONE_FOR_ALL:
                return list(self._slots)
            case Strategy.REST_FOR_ONE:
                return self._slots[self._slots.index(slot) :]
            case _:
                assert_never(self.spec.strategy)

    async def _start(self, slot: _Slot) -> None:
        if self._tg is None:
            raise RuntimeError(f"supervisor {self.id!r} is not running")
        run = slot.run = _Run()
        slot.starts += 1
        # The scope lets a stop request put a deadline on a slow on_start.
        with anyio.CancelScope() as scope:
            self._starting = (slot, scope)
            try:
                await self._tg.start(self._child_main, slot, run, name=slot.id)
            finally:
                self._starting = None
        if slot.starts > 1 and run.started and not run.done.is_set():
            self._log.info("actor_restarted", actor=slot.id, restarts=slot.restarts)

    async def _child_main(
        self,
        slot: _Slot,
        run: _Run,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """The child's own task: run it, capture its crash, wake the loop."""
        reported = False

        def started() -> None:
            nonlocal reported
            run.started = reported = True
            task_status.started()

        try:
            with run.scope:
                run.crash = await capture_crash(self._incarnate, slot, run, started)
        finally:
            run.done.set()
            self._wakeup.set()
        if run.crash is not None:
            self._log.error(
                "actor_crashed",
                actor=slot.id,
                stopping=run.stopping,
                exc_info=run.crash,
            )
        if not reported:  # it ended before it started: let _start return
            task_status.started()

    async def _incarnate(
        self, slot: _Slot, run: _Run, started: Callable[[], None]
    ) -> None:
        target = slot.spec.start()
        process: _Process
        if isinstance(target, SupervisorSpec):
            if target.id != slot.id:
                raise ValueError(
                    f"child {slot.id!r} starts a SupervisorSpec with id {target.id!r}; "
                    "the ids must match"
                )
            subtree = Supervisor(target, system=self._system)
            slot.kind, slot.supervisor, process = "supervisor", subtree, subtree
        else:
            ref = self._system.registry.ref(slot.id)
            slot.kind, slot.ref = "actor", ref
            process = ActorProcess(target, ref, self._system)
        run.process = process
        await process.run(started)

    async def _stop(self, slot: _Slot) -> None:
        """Stop the child's incarnation within its shutdown_s, then cancel it."""
        run = slot.run
        if run is None:
            return
        run.stopping = True
        grace = slot.spec.shutdown_s
        if not run.done.is_set():
            if grace == 0 or run.process is None:
                run.scope.cancel()
            else:
                run.process.request_stop()
                with anyio.move_on_after(grace):
                    await run.done.wait()
                if not run.done.is_set():
                    self._log.warning("actor_killed", actor=slot.id, shutdown_s=grace)
                    run.scope.cancel()
            await run.done.wait()
        slot.run = None

    async def _stop_all(self) -> None:
        for slot in reversed(self._slots):
            await self._stop(slot)
            slot.wanted = False

    def _slot_status(self, slot: _Slot) -> NodeStatus:
        state: NodeState = "stopped"
        run = slot.run
        if run is not None and not run.done.is_set():
            state = "running"
        elif (
            self.running
            and slot.wanted
            and (run is None or run.stopping or _comes_back(slot.spec, run.crash))
        ):
            state = "restarting"
        if slot.kind == "supervisor" and slot.supervisor is not None:
            node = slot.supervisor.status(restarts=slot.restarts)
            node["state"] = state
            return node
        mailbox = slot.ref.mailbox if slot.ref is not None else None
        if mailbox is None:  # never started (or start() itself failed)
            return {
                "id": slot.id,
                "kind": "actor",
                "state": state,
                "restarts": slot.restarts,
                "repr": f"<Mailbox {slot.id} 0/0>",
                "mailbox": {"fill": 0, "size": 0, "high_water": 0},
            }
        return {
            "id": slot.id,
            "kind": "actor",
            "state": state,
            "restarts": slot.restarts,
            "repr": repr(mailbox),
            "mailbox": {
                "fill": mailbox.fill,
                "size": mailbox.size,
                "high_water": mailbox.high_water,
            },
        }

    def __repr__(self) -> str:
        window = self._window
        return (
            f"<Supervisor {self.id} {self.spec.strategy.value} "
            f"{window.recent}/{window.intensity} restarts in {window.period_s:g}s>"
        )
