"""Supervision semantics, OTP's, each pinned against a real ActorSystem."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest
from structlog.testing import capture_logs

from broker.actor import Actor, ActorRef, Context
from broker.errors import ActorStopped, SupervisorGaveUp
from broker.supervision import ChildSpec, Restart, Strategy, SupervisorSpec
from broker.system import ActorSystem
from tests.polling import eventually
from tests.runtime.journal import Journal

pytestmark = pytest.mark.anyio


class Boom(Exception):
    """The bug a child crashes with in these tests."""


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        """The current fake time."""
        return self.now


class Member(Actor[str]):
    """Records ``<name> start`` / ``<name> stop``; "crash" and "stop" do so."""

    def __init__(self, name: str, journal: Journal, *, crash_on_start: bool = False):
        self.name = name
        self.journal = journal
        self.crash_on_start = crash_on_start

    async def on_start(self, ctx: Context) -> None:
        """Record the start; crash if told to."""
        self.journal.add(f"{self.name} start")
        await anyio.lowlevel.checkpoint()  # let a sibling run, if it could
        if self.crash_on_start:
            raise Boom(f"{self.name} cannot start")
        self.journal.add(f"{self.name} started")

    async def handle(self, msg: str, ctx: Context) -> object:
        """Crash or stop on request."""
        if msg == "crash":
            raise Boom(f"{self.name} crashed")
        if msg == "stop":
            ctx.stop()
        return None

    async def on_stop(self, ctx: Context) -> None:
        """Record the stop."""
        self.journal.add(f"{self.name} stop")


def members(
    journal: Journal,
    names: Sequence[str],
    *,
    restart: dict[str, Restart] | None = None,
) -> list[ChildSpec]:
    restart = restart or {}
    return [
        ChildSpec(
            id=name,
            start=partial(Member, name, journal),
            restart=restart.get(name, Restart.PERMANENT),
        )
        for name in names
    ]


@asynccontextmanager
async def running(
    spec: SupervisorSpec, *, clock: Callable[[], float] | None = None
) -> AsyncIterator[ActorSystem]:
    """Run ``spec`` until the block ends, then shut it down gracefully."""
    system = ActorSystem(clock=clock) if clock is not None else ActorSystem()
    started, shutdown = anyio.Event(), anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(system.run, spec, started=started, shutdown=shutdown))
            await started.wait()
            yield system
            shutdown.set()


async def crash(system: ActorSystem, id: str) -> None:
    ref: ActorRef[str] = system.lookup(id)
    await ref.tell("crash")


async def settle() -> None:
    """Wait until every task is blocked: the tree did whatever it was going to."""
    with anyio.fail_after(5):
        await anyio.wait_all_tasks_blocked()


# --- start and stop order -----------------------------------------------------------


async def test_children_start_in_order_one_at_a_time_and_stop_in_reverse() -> None:
    """Each on_start finishes before the next sibling's begins; stops run backwards."""
    journal = Journal()
    spec = SupervisorSpec(id="root", children=members(journal, ["a", "b", "c"]))
    async with running(spec):
        assert journal.take() == [
            "a start",
            "a started",
            "b start",
            "b started",
            "c start",
            "c started",
        ]
    assert journal.entries == ["c stop", "b stop", "a stop"]


async def test_a_subtree_stops_its_children_before_earlier_siblings_stop() -> None:
    """Reverse order holds across levels: the subtree empties before `a` stops."""
    journal = Journal()
    sub = SupervisorSpec(id="sub", children=members(journal, ["x", "y"]))
    spec = SupervisorSpec(
        id="root",
        children=[
            *members(journal, ["a"]),
            ChildSpec(id="sub", start=lambda: sub, shutdown_s=None),
            *members(journal, ["z"]),
        ],
    )
    async with running(spec):
        journal.take()
    assert journal.entries == ["z stop", "y stop", "x stop", "a stop"]


# --- strategies ----------------------------------------------------------------


async def test_one_for_one_restarts_only_the_crashed_child() -> None:
    """one_for_one: b's crash restarts b; a and c keep running."""
    journal = Journal()
    spec = SupervisorSpec(id="root", children=members(journal, ["a", "b", "c"]))
    async with running(spec) as system:
        journal.take()
        await crash(system, "b")
        await journal.wait_for("b started")
        await settle()
        assert journal.take() == ["b start", "b started"]


async def test_one_for_all_stops_the_others_in_reverse_and_restarts_all_in_order() -> (
    None
):
    """one_for_all: b's crash stops c then a, then starts a, b, c."""
    journal = Journal()
    spec = SupervisorSpec(
        id="root",
        strategy=Strategy.ONE_FOR_ALL,
        children=members(journal, ["a", "b", "c"]),
    )
    async with running(spec) as system:
        journal.take()
        await crash(system, "b")
        await journal.wait_for("c started")
        assert journal.take() == [
            "c stop",
            "a stop",
            "a start",
            "a started",
            "b start",
            "b started",
            "c start",
            "c started",
        ]


async def test_rest_for_one_restarts_the_crashed_child_and_those_after_it() -> None:
    """rest_for_one: b's crash stops c, then starts b and c; a is untouched."""
    journal = Journal()
    spec = SupervisorSpec(
        id="root",
        strategy=Strategy.REST_FOR_ONE,
        children=members(journal, ["a", "b", "c"]),
    )
    async with running(spec) as system:
        journal.take()
        await crash(system, "b")
        await journal.wait_for("c started")
        assert journal.take() == [
            "c stop",
            "b start",
            "b started",
            "c start",
            "c started",
        ]


async def test_a_temporary_sibling_is_not_restarted_by_one_for_all() -> None:
    """Temporary children stopped because a sibling crashed stay stopped (OTP)."""
    journal = Journal()
    spec = SupervisorSpec(
        id="root",
        strategy=Strategy.ONE_FOR_ALL,
        children=members(journal, ["a", "t"], restart={"t": Restart.TEMPORARY}),
    )
    async with running(spec) as system:
        journal.take()
        await crash(system, "a")
        await journal.wait_for("a started")
        await settle()
        assert journal.take() == ["t stop", "a start", "a started"]
        assert [c["state"] for c in system.tree()["children"]] == [
            "running",
            "stopped",
        ]


# --- restart types --------------------------------------------------------------


@pytest.mark.parametrize(
    ("restart", "message", "comes_back"),
    [
        (Restart.PERMANENT, "stop", True),
        (Restart.PERMANENT, "crash", True),
        (Restart.TRANSIENT, "stop", False),
        (Restart.TRANSIENT, "crash", True),
        (Restart.TEMPORARY, "stop", False),
        (Restart.TEMPORARY, "crash", False),
    ],
)
async def test_restart_type_decides_whether_a_child_comes_back(
    restart: Restart, message: str, comes_back: bool
) -> None:
    """Permanent always restarts, transient only after a crash, temporary never."""
    journal = Journal()
    spec = SupervisorSpec(
        id="root", children=members(journal, ["a"], restart={"a": restart})
    )
    async with running(spec) as system:
        ref: ActorRef[str] = system.lookup("a")
        await ref.tell(message)
        await settle()
        assert journal.entries.count("a started") == (2 if comes_back else 1)
        state = system.tree()["children"][0]["state"]
        assert state == ("running" if comes_back else "stopped")


async def test_a_one_shot_job_in_on_start_exits_normally() -> None:
    """A transient child that stops itself in on_start is done, not restarted."""
    journal = Journal()

    class Migrator(Actor[None]):
        async def on_start(self, ctx: Context) -> None:
            journal.add("migrated")
            ctx.stop()

    spec = SupervisorSpec(
        id="root",
        children=[
            ChildSpec(id="migrate", start=Migrator, restart=Restart.TRANSIENT),
            *members(journal, ["b"]),
        ],
    )
    async with running(spec) as system:
        await settle()
        assert journal.take() == ["migrated", "b start", "b started"]
        assert system.tree()["children"][0]["state"] == "stopped"


async def test_a_crash_in_on_start_is_a_crash() -> None:
    """on_start raising is a crash: the child is restarted and the root gives up."""
    journal = Journal()
    spec = SupervisorSpec(
        id="root",
        intensity=2,
        children=[
            ChildSpec(id="a", start=partial(Member, "a", journal, crash_on_start=True))
        ],
    )
    started = anyio.Event()
    with anyio.fail_after(5), pytest.raises(SupervisorGaveUp) as info:
        await ActorSystem().run(spec, started=started)
    assert journal.entries == ["a start"] * 3  # the first start and two restarts
    assert not started.is_set()
    assert (info.value.supervisor, info.value.child) == ("root", "a")
    assert isinstance(info.value.cause, Boom)


# --- intensity and escalation --------------------------------------------------------


async def test_the_root_giving_up_makes_run_raise_after_stopping_in_reverse() -> None:
    """More than intensity restarts: children stop in reverse and run() raises."""
    journal = Journal()
    spec = SupervisorSpec(
        id="root", intensity=1, children=members(journal, ["a", "b", "c"])
    )
    system = ActorSystem()
    started = anyio.Event()

    async def crash_b_twice() -> None:
        await started.wait()
        journal.take()
        await crash(system, "b")
        await journal.wait_for("b started")
        await crash(system, "b")

    with capture_logs() as logs, anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(crash_b_twice)
            # A plain exception, not an ExceptionGroup.
            with pytest.raises(
                SupervisorGaveUp, match="'root' gave up after child 'b'"
            ):
                await system.run(spec, started=started)
    # b restarted once; its second crash gave up; the live ones stop in reverse.
    assert journal.entries == ["b start", "b started", "c stop", "a stop"]
    assert [e["event"] for e in logs if e["event"] == "restart_limit_reached"] == [
        "restart_limit_reached"
    ]
    assert system.tree()["state"] == "stopped"


async def test_a_subtree_giving_up_is_a_crash_its_parent_handles() -> None:
    """A child supervisor that gives up crashes; its parent restarts the subtree."""
    journal = Journal()
    sub = SupervisorSpec(id="sub", intensity=0, children=members(journal, ["x", "y"]))
    spec = SupervisorSpec(
        id="root",
        children=[
            ChildSpec(id="sub", start=lambda: sub, shutdown_s=None),
            *members(journal, ["a"]),
        ],
    )
    with capture_logs() as logs:
        async with running(spec) as system:
            journal.take()
            await crash(system, "x")
            await journal.wait_for("y started")
            assert journal.take() == [
                "y stop",  # sub gave up: its children stop in reverse
                "x start",  # root restarted sub: its children start in order
                "x started",
                "y start",
                "y started",
            ]
            assert system.tree()["children"][0]["restarts"] == 1
    crashed = [e for e in logs if e["event"] == "actor_crashed"]
    assert [(e["actor"], type(e["exc_info"])) for e in crashed] == [
        ("x", Boom),
        ("sub", SupervisorGaveUp),
    ]


async def test_restarts_spaced_wider_than_the_period_never_give_up() -> None:
    """With an injected clock: one restart per period_s is sustainable forever."""
    journal = Journal()
    clock = FakeClock()
    spec = SupervisorSpec(
        id="root", intensity=1, period_s=10, children=members(journal, ["a"])
    )
    system = ActorSystem(clock=clock)
    started = anyio.Event()

    async def crash_a_regularly() -> None:
        await started.wait()
        for n in range(2, 6):
            clock.now += 10.5
            await crash(system, "a")
            await journal.wait_for("a started", count=n)
        await crash(system, "a")  # a second restart within the same 10 s

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(crash_a_regularly)
            with pytest.raises(SupervisorGaveUp):
                await system.run(spec, started=started)
    assert journal.entries.count("a started") == 5


# --- status, logs, operator restart ---------------------------------------------------


async def test_tree_describes_every_node_for_the_control_socket() -> None:
    """tree() nests supervisors and actors with state, restarts, repr and mailbox."""
    journal = Journal()
    sub = SupervisorSpec(
        id="erp", intensity=5, period_s=60, children=members(journal, ["erp.orders"])
    )
    spec = SupervisorSpec(
        id="root", children=[ChildSpec(id="erp", start=lambda: sub, shutdown_s=None)]
    )
    with capture_logs() as logs:
        async with running(spec) as system:
            await crash(system, "erp.orders")
            await journal.wait_for("erp.orders started", count=2)
            await settle()
            tree = system.tree()
    assert tree == {
        "id": "root",
        "kind": "supervisor",
        "state": "running",
        "restarts": 0,
        "repr": "<Supervisor root one_for_one 0/3 restarts in 30s>",
        "children": [
            {
                "id": "erp",
                "kind": "supervisor",
                "state": "running",
                "restarts": 0,
                "repr": "<Supervisor erp one_for_one 1/5 restarts in 60s>",
                "children": [
                    {
                        "id": "erp.orders",
                        "kind": "actor",
                        "state": "running",
                        "restarts": 1,
                        "repr": "<Mailbox erp.orders 0/64>",
                        "mailbox": {"fill": 0, "size": 64, "high_water": 0},
                    }
                ],
            }
        ],
    }
    events = [(e["event"], e.get("actor")) for e in logs]
    assert ("actor_crashed", "erp.orders") in events
    assert ("actor_restarted", "erp.orders") in events


async def test_operator_restart_restarts_one_child_without_using_intensity() -> None:
    """system.restart(id) stops and starts one child; siblings and the window stay."""
    journal = Journal()
    spec = SupervisorSpec(
        id="root",
        intensity=0,  # any policy restart would give up
        strategy=Strategy.ONE_FOR_ALL,
        children=members(journal, ["a", "b"]),
    )
    async with running(spec) as system:
        journal.take()
        with anyio.fail_after(5):
            await system.restart("a")
        assert journal.take() == ["a stop", "a start", "a started"]
        assert system.tree()["children"][0]["restarts"] == 1
        with pytest.raises(KeyError):
            await system.restart("nobody")
        with pytest.raises(ValueError, match="root"):
            await system.restart("root")


async def test_an_operator_restart_is_carried_out_when_its_caller_gives_up() -> None:
    """The caller's deadline passes while the child stops: it still comes back.

    The control socket cancels a request past its deadline; the restart it
    asked for is the supervisor's to finish, not left with the child stopped.
    """
    journal = Journal()
    stopping, finish = anyio.Event(), anyio.Event()

    class SlowStop(Actor[None]):
        async def on_start(self, ctx: Context) -> None:
            journal.add("slow start")

        async def handle(self, msg: None, ctx: Context) -> None:
            """Takes no messages."""

        async def on_stop(self, ctx: Context) -> None:
            stopping.set()
            await finish.wait()
            journal.add("slow stop")

    spec = SupervisorSpec(
        id="root",
        children=[
            ChildSpec(id="slow", start=SlowStop, shutdown_s=10),
            *members(journal, ["b"]),
        ],
    )
    async with running(spec) as system:
        journal.take()
        with anyio.move_on_after(5) as waited:
            async with anyio.create_task_group() as tg:
                tg.start_soon(system.restart, "slow")
                await stopping.wait()
                tg.cancel_scope.cancel()  # the caller gives up mid-stop
        assert not waited.cancel_called
        finish.set()

        async def back() -> bool:
            child = system.tree()["children"][0]
            return bool(child["state"] == "running" and child["restarts"] == 1)

        await eventually(back, timeout_s=5)
        with anyio.fail_after(5):
            await system.restart("b")  # the supervisor takes requests still
    assert journal.take()[:2] == ["slow stop", "slow start"]


async def test_a_stop_during_a_slow_on_start_is_bounded_by_shutdown_s() -> None:
    """Shutdown while a child hangs in on_start cancels it after its shutdown_s."""
    entered = anyio.Event()

    class Stuck(Actor[None]):
        async def on_start(self, ctx: Context) -> None:
            entered.set()
            await anyio.sleep_forever()

    spec = SupervisorSpec(
        id="root", children=[ChildSpec(id="stuck", start=Stuck, shutdown_s=0.05)]
    )
    shutdown = anyio.Event()
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(ActorSystem().run, spec, shutdown=shutdown))
            await entered.wait()
            shutdown.set()


# --- spec validation ----------------------------------------------------------------


def test_duplicate_child_ids_are_refused_when_the_spec_is_built() -> None:
    """Ids must be unique among siblings; the spec says so up front."""
    journal = Journal()
    with pytest.raises(ValueError, match="duplicate child ids"):
        SupervisorSpec(id="root", children=members(journal, ["a", "a"]))


async def test_an_id_used_in_two_subtrees_crashes_the_second_subtree() -> None:
    """Ids are unique across the tree: lookup() and restart() depend on it."""
    journal = Journal()
    left = SupervisorSpec(id="left", children=members(journal, ["a"]))
    right = SupervisorSpec(id="right", children=members(journal, ["a"]))
    spec = SupervisorSpec(
        id="root",
        intensity=0,
        children=[
            ChildSpec(id="left", start=lambda: left),
            ChildSpec(id="right", start=lambda: right),
        ],
    )
    with anyio.fail_after(5), pytest.raises(SupervisorGaveUp) as info:
        await ActorSystem().run(spec)
    assert info.value.child == "right"
    assert isinstance(info.value.cause, ValueError)


async def test_a_stopped_supervisor_refuses_operator_restarts() -> None:
    """Once the tree stopped, restart() says the supervisor is not running."""
    journal = Journal()
    spec = SupervisorSpec(id="root", children=members(journal, ["a"]))
    async with running(spec) as system:
        pass
    with pytest.raises(ActorStopped):
        await system.restart("a")
