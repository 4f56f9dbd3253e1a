"""Actors, references and mailboxes, run under a real ActorSystem."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import anyio
import pytest
from structlog.testing import capture_logs

from broker.actor import Actor, ActorRef, Context
from broker.errors import ActorStopped, AskTimeout, MailboxFull
from broker.mailbox import Mailbox
from broker.supervision import ChildSpec, Restart, SupervisorSpec
from broker.system import ActorSystem
from tests.runtime.journal import Journal

pytestmark = pytest.mark.anyio


class Boom(Exception):
    """The bug an actor crashes with in these tests."""


class Worker(Actor[str]):
    """Records its hooks; a message names what to do."""

    mailbox_size = 4

    def __init__(self, journal: Journal, *, gate: anyio.Event | None = None) -> None:
        self.journal = journal
        self.gate = gate  # when given, "wait" blocks until it is set

    async def on_start(self, ctx: Context) -> None:
        """Record the start."""
        self.journal.add("start")

    async def handle(self, msg: str, ctx: Context) -> object:
        """Record the message, then do what it says."""
        self.journal.add(f"got {msg}")
        match msg:
            case "crash":
                raise Boom("asked to crash")
            case "stop":
                ctx.stop()
            case "wait" if self.gate is not None:
                await self.gate.wait()
            case "hang":
                await anyio.sleep_forever()
        return msg.upper()

    async def on_stop(self, ctx: Context) -> None:
        """Record the stop."""
        self.journal.add("stop")


def one_child(
    start: Callable[[], Actor[str]],
    *,
    restart: Restart = Restart.PERMANENT,
    shutdown_s: float | None = 5.0,
    intensity: int = 3,
) -> SupervisorSpec:
    return SupervisorSpec(
        id="root",
        intensity=intensity,
        children=[
            ChildSpec(id="w", start=start, restart=restart, shutdown_s=shutdown_s)
        ],
    )


@asynccontextmanager
async def running(spec: SupervisorSpec) -> AsyncIterator[ActorSystem]:
    """Run ``spec`` until the block ends, then shut it down gracefully."""
    system = ActorSystem()
    started, shutdown = anyio.Event(), anyio.Event()
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(system.run, spec, started=started, shutdown=shutdown))
            await started.wait()
            yield system
            shutdown.set()


def worker_ref(system: ActorSystem) -> ActorRef[str]:
    ref: ActorRef[str] = system.lookup("w")
    return ref


# --- Mailbox -------------------------------------------------------------------


async def test_mailbox_repr_shows_fill_and_size() -> None:
    """repr(mailbox) is the status line `<Mailbox id fill/size>`."""
    mailbox = Mailbox[int]("erp.order_sync", 64)
    for i in range(12):
        mailbox.put_nowait(i)

    assert repr(mailbox) == "<Mailbox erp.order_sync 12/64>"
    assert (mailbox.fill, mailbox.size, mailbox.high_water) == (12, 64, 12)
    mailbox.discard()


async def test_put_nowait_on_a_full_mailbox_raises_mailbox_full() -> None:
    """A non-blocking send never grows the buffer past its size."""
    mailbox = Mailbox[int]("a", 1)
    mailbox.put_nowait(1)

    with pytest.raises(MailboxFull):
        mailbox.put_nowait(2)
    mailbox.discard()


async def test_put_waits_for_room_and_high_water_remembers_the_peak() -> None:
    """put() blocks while full and proceeds once an item is taken."""
    mailbox = Mailbox[int]("a", 1)
    await mailbox.put(1)
    done = anyio.Event()

    async def second_put() -> None:
        await mailbox.put(2)
        done.set()

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(second_put)
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set()
            assert await mailbox.get() == 1
            await done.wait()
    assert (await mailbox.get(), mailbox.fill, mailbox.high_water) == (2, 0, 1)
    mailbox.discard()


async def test_close_keeps_queued_items_and_ends_iteration_cleanly() -> None:
    """After close(), queued items are still read, then iteration just ends."""
    mailbox = Mailbox[int]("a", 4)
    mailbox.put_nowait(1)
    mailbox.put_nowait(2)
    mailbox.close()

    with pytest.raises(ActorStopped):
        mailbox.put_nowait(3)
    with anyio.fail_after(5):
        assert [item async for item in mailbox] == [1, 2]
    with pytest.raises(anyio.EndOfStream):
        await mailbox.get()
    mailbox.discard()


async def test_close_refuses_producers_blocked_on_a_full_mailbox() -> None:
    """A producer waiting for room gets ActorStopped: its item was never queued."""
    mailbox = Mailbox[int]("a", 1)
    mailbox.put_nowait(1)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def blocked_put() -> None:
                with pytest.raises(ActorStopped):
                    await mailbox.put(2)

            tg.start_soon(blocked_put)
            await anyio.wait_all_tasks_blocked()
            mailbox.close()
    assert mailbox.discard() == [1]
    assert mailbox.discard() == []


# --- tell and ask ------------------------------------------------------------------


async def test_ask_returns_what_handle_returned() -> None:
    """The reply to ask() is handle's return value."""
    journal = Journal()
    async with running(one_child(lambda: Worker(journal))) as system:
        with anyio.fail_after(5):
            assert await worker_ref(system).ask("ping") == "PING"


async def test_ask_reraises_the_handler_error_and_the_actor_crashes() -> None:
    """The handler's error reaches the asker and also crashes (restarts) the actor."""
    journal = Journal()
    async with running(one_child(lambda: Worker(journal))) as system:
        ref = worker_ref(system)
        with capture_logs() as logs, anyio.fail_after(5):
            with pytest.raises(Boom):
                await ref.ask("crash")
            await journal.wait_for("start", count=2)
            assert await ref.ask("ping") == "PING"  # the same ref, a new incarnation

    crashes = [e for e in logs if e["event"] == "actor_crashed"]
    assert [(e["actor"], type(e["exc_info"])) for e in crashes] == [("w", Boom)]


async def test_ask_times_out_with_ask_timeout() -> None:
    """No reply within timeout_s raises AskTimeout; the actor keeps running."""
    journal, gate = Journal(), anyio.Event()
    async with running(one_child(lambda: Worker(journal, gate=gate))) as system:
        ref = worker_ref(system)
        with anyio.fail_after(5):
            with pytest.raises(AskTimeout):
                await ref.ask("wait", timeout_s=0.05)
            gate.set()
            assert await ref.ask("ping") == "PING"


async def test_tell_and_ask_raise_actor_stopped_once_the_actor_is_gone() -> None:
    """A temporary actor that stopped itself refuses further messages."""
    journal = Journal()
    spec = one_child(lambda: Worker(journal), restart=Restart.TEMPORARY)
    async with running(spec) as system:
        ref = worker_ref(system)
        with anyio.fail_after(5):
            await ref.tell("stop")
            await journal.wait_for("stop")
            await anyio.wait_all_tasks_blocked()  # on_stop returned; the task ended
        with pytest.raises(ActorStopped):
            await ref.tell("late")
        with pytest.raises(ActorStopped):
            ref.try_tell("late")
        with pytest.raises(ActorStopped):
            await ref.ask("late")
        assert system.tree()["children"][0]["state"] == "stopped"


async def test_tell_waits_while_the_mailbox_is_full_and_try_tell_raises() -> None:
    """Back-pressure: a full mailbox makes tell() wait and try_tell() fail."""
    journal, gate = Journal(), anyio.Event()
    async with running(one_child(lambda: Worker(journal, gate=gate))) as system:
        ref = worker_ref(system)
        with anyio.fail_after(5):
            await ref.tell("wait")  # the actor blocks in handle on this one
            await journal.wait_for("got wait")
            for i in range(Worker.mailbox_size):
                ref.try_tell(f"m{i}")
            with pytest.raises(MailboxFull):
                ref.try_tell("overflow")

            told = anyio.Event()

            async def tell_one_more() -> None:
                await ref.tell("last")
                told.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(tell_one_more)
                await anyio.wait_all_tasks_blocked()
                assert not told.is_set()
                gate.set()  # the actor drains; room appears
            await journal.wait_for("got last")
        assert ref.mailbox is not None
        assert ref.mailbox.high_water == Worker.mailbox_size


async def test_asks_queued_behind_a_crash_fail_with_actor_stopped() -> None:
    """Messages queued in a crashed incarnation die with it; their askers learn so."""
    journal, gate = Journal(), anyio.Event()
    async with running(one_child(lambda: Worker(journal, gate=gate))) as system:
        ref = worker_ref(system)
        outcomes: list[str] = []

        async def ask_later() -> None:
            try:
                await ref.ask("queued")
            except ActorStopped:
                outcomes.append("stopped")

        with anyio.fail_after(5):
            await ref.tell("wait")
            await journal.wait_for("got wait")
            await ref.tell("crash")
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask_later)
                await anyio.wait_all_tasks_blocked()
                gate.set()
        assert outcomes == ["stopped"]
        assert journal.count("got queued") == 0


# --- stopping -------------------------------------------------------------------


async def test_stop_drains_queued_messages_before_on_stop() -> None:
    """Shutdown handles what is already queued, then calls on_stop."""
    journal, gate = Journal(), anyio.Event()
    async with running(one_child(lambda: Worker(journal, gate=gate))) as system:
        ref = worker_ref(system)
        with anyio.fail_after(5):
            await ref.tell("wait")
            await journal.wait_for("got wait")
            await ref.tell("a")
            await ref.tell("b")
            system_tree_before = system.tree()
        gate.set()
    assert system_tree_before["children"][0]["mailbox"]["fill"] == 2
    assert journal.entries == ["start", "got wait", "got a", "got b", "stop"]


async def test_ctx_stop_refuses_new_messages_but_handles_queued_ones() -> None:
    """ctx.stop() closes intake at once; queued messages are still handled."""
    journal, gate = Journal(), anyio.Event()
    spec = one_child(lambda: Worker(journal, gate=gate), restart=Restart.TRANSIENT)
    async with running(spec) as system:
        ref = worker_ref(system)
        with anyio.fail_after(5):
            await ref.tell("wait")
            await journal.wait_for("got wait")
            await ref.tell("stop")
            await ref.tell("after")
            gate.set()
            await journal.wait_for("got stop")
            with pytest.raises(ActorStopped):
                await ref.tell("refused")
            await journal.wait_for("stop")
    assert journal.entries == ["start", "got wait", "got stop", "got after", "stop"]


async def test_the_shutdown_deadline_cancels_a_stuck_actor() -> None:
    """An actor still busy after shutdown_s is cancelled; on_stop does not run."""
    journal = Journal()
    spec = one_child(lambda: Worker(journal), shutdown_s=0.05)
    with capture_logs() as logs:
        async with running(spec) as system:
            await worker_ref(system).tell("hang")
            await journal.wait_for("got hang")
    assert "stop" not in journal.entries
    assert any(e["event"] == "actor_killed" for e in logs)


async def test_an_ask_in_flight_when_the_actor_is_killed_fails_with_actor_stopped() -> (
    None
):
    """An operator restart past shutdown_s kills the handler; its asker is told."""
    journal = Journal()
    spec = one_child(lambda: Worker(journal), shutdown_s=0.05)
    async with running(spec) as system:
        ref = worker_ref(system)
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:

                async def ask_hang() -> None:
                    with pytest.raises(ActorStopped):
                        await ref.ask("hang")

                tg.start_soon(ask_hang)
                await journal.wait_for("got hang")
                await system.restart("w")
            assert await ref.ask("ping") == "PING"
    assert journal.entries.count("start") == 2


async def test_shutdown_s_zero_cancels_at_once_without_draining() -> None:
    """shutdown_s=0 is brutal_kill: no drain, no on_stop."""
    journal, gate = Journal(), anyio.Event()
    spec = one_child(lambda: Worker(journal, gate=gate), shutdown_s=0)
    async with running(spec) as system:
        ref = worker_ref(system)
        await ref.tell("wait")
        await ref.tell("queued")
        await journal.wait_for("got wait")
    assert journal.entries == ["start", "got wait"]


# --- background tasks, context ----------------------------------------------------


class Ticker(Actor[str]):
    """Runs a background task; it crashes when told to."""

    def __init__(self, journal: Journal, fail: anyio.Event) -> None:
        self.journal = journal
        self.fail = fail

    async def on_start(self, ctx: Context) -> None:
        """Start the ticker."""
        self.journal.add("start")
        ctx.start_soon(self._tick, ctx, name="ticker")

    async def _tick(self, ctx: Context) -> None:
        try:
            await self.fail.wait()
            raise Boom("background task failed")
        except anyio.get_cancelled_exc_class():
            self.journal.add("tick cancelled")
            raise

    async def on_stop(self, ctx: Context) -> None:
        """Record the stop."""
        self.journal.add("stop")


async def test_a_crashing_background_task_crashes_the_actor() -> None:
    """An exception in a ctx.start_soon task crashes the actor like one in handle."""
    journal = Journal()
    triggers = [anyio.Event(), anyio.Event()]  # one per incarnation
    incarnations = iter(triggers)
    spec = one_child(lambda: Ticker(journal, next(incarnations)))
    with capture_logs() as logs:
        async with running(spec):
            triggers[0].set()
            await journal.wait_for("start", count=2)
    crashes = [e for e in logs if e["event"] == "actor_crashed"]
    assert [type(e["exc_info"]) for e in crashes] == [Boom]
    assert "stop" in journal.entries  # the second incarnation stopped normally


async def test_background_tasks_are_cancelled_before_the_drain() -> None:
    """Stopping cancels background tasks first, then calls on_stop."""
    journal, fail = Journal(), anyio.Event()
    async with running(one_child(lambda: Ticker(journal, fail))):
        pass
    assert journal.entries == ["start", "tick cancelled", "stop"]


class Introspector(Actor[str]):
    """Answers questions about its own Context."""

    async def on_start(self, ctx: Context) -> None:
        """Log through ctx.log."""
        ctx.log.info("introspector_started")

    async def handle(self, msg: str, ctx: Context) -> object:
        """Answer "lookup" with whether lookup finds self_ref, else the id."""
        if msg == "lookup":
            return ctx.system.lookup(ctx.id) is ctx.self_ref
        return ctx.id


async def test_context_knows_the_id_the_system_and_logs_with_the_actor_key() -> None:
    """ctx.id, ctx.self_ref, ctx.system.lookup and ctx.log bound with actor=<id>."""
    spec = SupervisorSpec(
        id="root", children=[ChildSpec(id="erp.order_sync", start=Introspector)]
    )
    with capture_logs() as logs:
        async with running(spec) as system:
            ref: ActorRef[str] = system.lookup("erp.order_sync")
            with anyio.fail_after(5):
                assert await ref.ask("id") == "erp.order_sync"
                assert await ref.ask("lookup") is True
            with pytest.raises(KeyError):
                system.lookup("erp.nobody")
    assert {"event": "introspector_started", "actor": "erp.order_sync"}.items() <= (
        next(e for e in logs if e["event"] == "introspector_started").items()
    )
