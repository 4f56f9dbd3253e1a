"""The actor system: runs one supervision tree and answers questions about it.

`ActorSystem.run` is the only place a tree runs. It starts the root
supervisor, reports through an event when every child has started, and
returns when a shutdown event is set, after the whole tree stopped in reverse
start order, each child within its own ``shutdown_s``. If the root gives up,
`run` raises `SupervisorGaveUp`: the process should exit non-zero and let
systemd or Kubernetes, the next supervisor up, decide.

While the tree runs, `ActorSystem.lookup` turns ids into references,
`ActorSystem.tree` describes every node for the control socket, and
`ActorSystem.restart` restarts one child on an operator's request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal, NotRequired, TypedDict, cast, final

import anyio

from broker.actor import ActorRef
from broker.errors import SupervisorGaveUp
from broker.supervision import Supervisor, SupervisorSpec

__all__ = [
    "ActorSystem",
    # status, as served by the control socket
    "NodeState",
    "MailboxStatus",
    "NodeStatus",
    # internal: used by broker.supervision
    "Registry",
]

NodeState = Literal["running", "restarting", "stopped"]


class MailboxStatus(TypedDict):
    """An actor's mailbox statistics in `NodeStatus`."""

    fill: int
    size: int
    high_water: int


class NodeStatus(TypedDict):
    """One node of `ActorSystem.tree`; plain data for the control socket.

    ``state`` is ``running`` while an incarnation is alive (starting and
    draining included), ``restarting`` while the child waits to be started
    again, and ``stopped`` once it will not be. ``restarts`` counts how often
    the child was started again by its current supervisor incarnation, for any
    reason (its own crash, a sibling's under one_for_all / rest_for_one, an
    operator request). ``repr`` is ``repr(mailbox)`` for an actor and
    ``repr(supervisor)`` for a supervisor.
    """

    id: str
    kind: Literal["supervisor", "actor"]
    state: NodeState
    restarts: int
    repr: str
    mailbox: NotRequired[MailboxStatus]  # actors
    children: NotRequired[list[NodeStatus]]  # supervisors


@final
class Registry:
    """Actor references and child ownership by id, for one `ActorSystem`.

    Internal: not for use outside broker/. References outlive incarnations
    and whole subtree restarts, which is what keeps an `ActorRef` valid.
    """

    def __init__(self) -> None:
        self._refs: dict[str, ActorRef[Any]] = {}
        self._owners: dict[str, Supervisor] = {}

    def ref(self, id: str) -> ActorRef[Any]:
        """The reference for ``id``, created on first use."""
        if (ref := self._refs.get(id)) is None:
            ref = self._refs[id] = ActorRef(id)
        return ref

    def lookup(self, id: str) -> ActorRef[Any]:
        """The reference of an actor that has started at least once."""
        try:
            return self._refs[id]
        except KeyError:
            raise KeyError(f"no actor {id!r} has been started") from None

    def owner(self, id: str) -> Supervisor:
        """The supervisor whose child ``id`` is."""
        try:
            return self._owners[id]
        except KeyError:
            raise KeyError(f"no child {id!r} in the tree") from None

    def adopt(self, supervisor: Supervisor) -> None:
        """Record ``supervisor`` as the owner of its children's ids.

        Raises:
            ValueError: another running supervisor already owns one of the ids.
        """
        for child in supervisor.spec.children:
            other = self._owners.get(child.id)
            if other is not None and other is not supervisor and other.running:
                raise ValueError(
                    f"child id {child.id!r} of {supervisor.id!r} is already "
                    f"supervised by {other.id!r}"
                )
        for child in supervisor.spec.children:
            self._owners[child.id] = supervisor


@final
class ActorSystem:
    """Runs a supervision tree; one `run` at a time.

    Args:
        clock: the monotonic clock every supervisor's `RestartWindow` reads;
            tests inject a fake one.

    Attributes:
        clock: as above.
        registry: ids to references and owners. Internal: not for use outside
            broker/.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.registry = Registry()
        self._root: Supervisor | None = None

    async def run(
        self,
        spec: SupervisorSpec,
        *,
        started: anyio.Event | None = None,
        shutdown: anyio.Event | None = None,
    ) -> None:
        """Run the tree described by ``spec`` until shut down or given up.

        Args:
            spec: the root supervisor.
            started: set once every child of the tree has started.
            shutdown: when set, the tree stops (reverse start order, each child
                within its ``shutdown_s``) and `run` returns. Without it, `run`
                ends only by cancellation or by the root giving up.

        Raises:
            SupervisorGaveUp: the root exceeded its restart intensity; the
                tree has been stopped.
            RuntimeError: the system is already running a tree.
        """
        if self._root is not None and self._root.running:
            raise RuntimeError("this ActorSystem is already running a tree")
        root = Supervisor(spec, system=self)
        self._root = root
        gave_up: SupervisorGaveUp | None = None
        async with anyio.create_task_group() as tg:
            if shutdown is not None:
                tg.start_soon(_stop_when_set, shutdown, root)
            try:
                await root.run(started.set if started is not None else _nothing)
            except SupervisorGaveUp as exc:
                gave_up = exc  # raised below, outside the task group, ungrouped
            tg.cancel_scope.cancel()  # the shutdown watcher has nothing left to do
        if gave_up is not None:
            raise gave_up

    def lookup(self, id: str) -> ActorRef[Any]:
        """The reference of the actor ``id``; valid across its restarts.

        The message type is unknown here: annotate the variable you assign
        it to (``ref: ActorRef[OrderEvent] = system.lookup(...)``).

        Raises:
            KeyError: no actor with that id has started yet.
        """
        return self.registry.lookup(id)

    def tree(self) -> dict[str, Any]:
        """The whole tree as plain, JSON-ready data, root first.

        Each node is shaped as `NodeStatus` (``id``, ``kind``, ``state``,
        ``restarts``, ``repr``, plus ``mailbox`` for actors and ``children``
        for supervisors); ``cast`` to it for precise types.

        Raises:
            RuntimeError: `run` was never called.
        """
        if self._root is None:
            raise RuntimeError("this ActorSystem has not run a tree")
        # A NodeStatus is a plain dict at runtime; callers (the control socket)
        # handle it as JSON, so the loose type is the useful one here.
        return cast("dict[str, Any]", self._root.status())

    async def restart(self, id: str) -> None:
        """Restart one child on an operator's request; returns once restarted.

        The child is stopped within its ``shutdown_s`` and started again; a
        subtree restarts with all its children. Siblings are left alone and
        the restart does not count against any intensity.

        Raises:
            KeyError: no such child.
            ValueError: ``id`` is the root, which only `run` controls.
            ActorStopped: the child's supervisor is not running.
        """
        if self._root is not None and id == self._root.id:
            raise ValueError("the root supervisor cannot be restarted")
        await self.registry.owner(id).restart_child(id)


async def _stop_when_set(shutdown: anyio.Event, root: Supervisor) -> None:
    await shutdown.wait()
    root.request_stop()


def _nothing() -> None:
    pass
