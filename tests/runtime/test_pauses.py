"""An operator's pause of one system: its actor stops taking commands, then resumes.

The system actor runs on the in-process transport and SQLite in memory, as in
tests/runtime/test_gateway.py, whose harness and fake ERP it uses. A pause
arrives through the store (as another daemon's ``brokerctl pause`` would) or
through the gateway at once (as the daemon that stored it applies it); the
control handler's part runs on a whole daemon, as in test_lookups.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from structlog.testing import capture_logs

from broker.errors import StoreUnavailable
from broker.gateway import GatewaySettings
from broker.handler import DaemonControl
from broker.store import Store, SystemPause
from broker.store.sqlite import SqliteStore
from tests.polling import eventually
from tests.runtime import test_engine
from tests.runtime.test_gateway import FakeErp, Harness, command, running

pytestmark = pytest.mark.anyio

#: Poll the store often, so that a pause stored "by another daemon" arrives fast.
FAST_POLL = GatewaySettings(rate_per_s=1000, burst=100, pause_poll_s=0.02)
#: Never poll within a test: only a pause applied at once can arrive.
NO_POLL = GatewaySettings(rate_per_s=1000, burst=100, pause_poll_s=3600)


async def consuming(h: Harness, expected: bool) -> None:
    """Wait until the actor has (or has not) a consumer on its queue."""

    async def reached() -> bool:
        return (len(h.consumers()) == 1) == expected

    await eventually(reached)


async def test_a_paused_system_takes_no_commands_until_resumed() -> None:
    """Paused through the store: the consumer goes, commands wait; resumed, they run."""
    erp = FakeErp()
    async with running(erp, FAST_POLL) as h:
        await h.send(command("o-1"))
        await h.until("completed")
        await h.store.pause_system("erp", reason="ERP upgrade", paused_by="uid 0")
        await consuming(h, False)

        await h.send(command("o-2"), command("o-3"))
        await anyio.wait_all_tasks_blocked()
        waiting, calls_while_paused = h.depth(), len(erp.calls)
        status = h.gateway.status()

        await h.store.resume_system("erp")
        await h.until("completed", 3)
        await consuming(h, True)
        resumed_status = h.gateway.status()

    assert calls_while_paused == 1
    assert waiting == 2  # both wait in q2c.sys.erp, none taken
    assert status["consuming"] is False
    assert status["paused"]["reason"] == "ERP upgrade"
    assert status["paused"]["paused_by"] == "uid 0"
    assert isinstance(status["paused"]["since"], str)
    assert erp.keys == [f"deal:o-{n}/erp.create" for n in (1, 2, 3)]
    assert resumed_status["paused"] is None


async def test_the_daemon_that_stores_a_pause_applies_it_at_once() -> None:
    """Without a poll, the runtime's hook pauses and resumes the actor directly."""
    erp = FakeErp()
    async with running(erp, NO_POLL) as h:
        await consuming(h, True)
        pause = await h.store.pause_system("erp", reason="", paused_by="uid 0")
        with capture_logs() as logs:
            h.rt.system_pause["erp"](pause)
            await consuming(h, False)
            await h.send(command("o-1"))
            await anyio.wait_all_tasks_blocked()
            calls_while_paused = len(erp.calls)
            h.rt.system_pause["erp"](None)
            await h.until("completed")

    assert calls_while_paused == 0
    events = [e["event"] for e in logs]
    assert "system_paused" in events
    assert "system_resumed" in events
    cancelled = [e for e in logs if e["event"] == "system_consumer_cancelled"]
    assert [e["reason"] for e in cancelled] == ["paused"]


async def test_a_call_in_flight_finishes_and_commits_when_paused() -> None:
    """A pause stops intake, not the call under way: it completes and is acked."""
    erp = FakeErp()
    erp.gate = anyio.Event()
    async with running(erp, NO_POLL) as h:
        await h.send(command("o-1"))

        async def calling() -> bool:
            return erp.in_flight == 1

        await eventually(calling)
        pause = await h.store.pause_system("erp", reason="", paused_by="uid 0")
        h.rt.system_pause["erp"](pause)
        erp.gate.set()
        await h.until("completed")
        await consuming(h, False)
        depth = h.depth()

    assert erp.keys == ["deal:o-1/erp.create"]
    assert depth == 0


async def test_an_actor_starting_during_a_pause_never_subscribes() -> None:
    """A pause already stored is read before the first subscription."""
    erp = FakeErp()
    store = await SqliteStore.open(":memory:")
    try:
        await store.pause_system("erp", reason="cutover", paused_by="uid 0")
        async with running(erp, NO_POLL, store=store) as h:

            async def read() -> bool:
                return h.gateway.pause is not None

            await eventually(read)
            await h.send(command("o-1"))
            await anyio.wait_all_tasks_blocked()
            consumers, depth = h.consumers(), h.depth()
            paused = h.gateway.status()["paused"]
    finally:
        await store.aclose()

    assert consumers == []
    assert depth == 1
    assert erp.calls == []
    assert paused is not None
    assert paused["reason"] == "cutover"


class FlakyStore:
    """SQLite, except that reading the pauses fails while ``down`` is set."""

    def __init__(self, inner: SqliteStore) -> None:
        self.inner = inner
        self.down = False

    async def system_pauses(self) -> dict[str, SystemPause]:
        """The stored pauses, or a store outage."""
        if self.down:
            raise StoreUnavailable("database is locked")
        return await self.inner.system_pauses()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_store_outage_while_polling_keeps_the_pause() -> None:
    """A failed poll logs a warning; the actor neither crashes nor resumes."""
    erp = FakeErp()
    sqlite = await SqliteStore.open(":memory:")
    store = FlakyStore(sqlite)
    try:
        # The protocol's other methods are reached through __getattr__.
        store_view: Any = store
        async with running(erp, FAST_POLL, store=store_view) as h:
            await sqlite.pause_system("erp", reason="upgrade", paused_by="uid 0")
            await consuming(h, False)
            with capture_logs() as logs:
                store.down = True
                await sqlite.resume_system("erp")  # unseen while the store is down

                async def warned() -> bool:
                    return any(e["event"] == "pause_poll_failed" for e in logs)

                await eventually(warned)
                await h.send(command("o-1"))
                await anyio.wait_all_tasks_blocked()
                paused, consumers = h.gateway.pause, h.consumers()
                restarts = h.system.tree()["children"][1]["restarts"]
                store.down = False
                await h.until("completed")
    finally:
        await sqlite.aclose()

    assert paused is not None
    assert paused.reason == "upgrade"
    assert consumers == []
    assert restarts == 0
    warning = next(e for e in logs if e["event"] == "pause_poll_failed")
    assert (warning["log_level"], warning["system"], warning["paused"]) == (
        "warning",
        "erp",
        True,
    )


class SlowStore(FlakyStore):
    """SQLite, except that a read of the pauses waits for ``gate`` once it is set."""

    def __init__(self, inner: SqliteStore) -> None:
        super().__init__(inner)
        self.gate: anyio.Event | None = None
        self.reading = anyio.Event()
        self.polls: list[list[str]] = []

    async def system_pauses(self) -> dict[str, SystemPause]:
        """Read, then wait for the gate: the answer is stale when it opens."""
        found = await self.inner.system_pauses()
        self.polls.append(sorted(found))
        if self.gate is not None:
            self.reading.set()
            await self.gate.wait()
        return found


async def test_a_poll_older_than_a_pause_applied_here_does_not_undo_it() -> None:
    """A poll that read "not paused" before the daemon applied a pause is dropped."""
    erp = FakeErp()
    sqlite = await SqliteStore.open(":memory:")
    store = SlowStore(sqlite)
    try:
        store_view: Any = store
        async with running(erp, FAST_POLL, store=store_view) as h:
            await consuming(h, True)
            store.gate = anyio.Event()
            with anyio.fail_after(10):
                await store.reading.wait()
            pause = await sqlite.pause_system("erp", reason="", paused_by="uid 0")
            with capture_logs() as logs:
                h.rt.system_pause["erp"](pause)
                store.gate.set()
                store.gate = None
                await consuming(h, False)

                async def polled_again() -> bool:
                    return len(store.polls) >= 3

                await eventually(polled_again)
            paused = h.gateway.pause
    finally:
        await sqlite.aclose()

    assert paused == pause
    assert [e["event"] for e in logs if e["event"].startswith("system_")] == [
        "system_paused",
        "system_consumer_cancelled",
    ]


async def test_the_handler_pauses_known_systems_and_says_who(tmp_path: Path) -> None:
    """Pause stores reason and peer; again replaces the reason; unknown: KeyError."""
    cfg = test_engine.config(tmp_path, BROKER__TOPOLOGY__SYSTEMS='["erp"]')
    with capture_logs() as logs:
        async with test_engine.running(cfg) as daemon:
            control = DaemonControl(daemon)
            first = await control.pause("erp", "upgrade", by="uid 1000")
            second = await control.pause("erp", "cutover wave 2", by="uid 0")
            store: Store = daemon.runtime.store
            stored = await store.system_pauses()
            with pytest.raises(KeyError, match=r"unknown system 'crm'"):
                await control.pause("crm", "", by="uid 0")
            ended = await control.resume("erp", by="uid 0")
            again = await control.resume("erp", by="uid 0")

    assert (first["paused"], first["system"], first["reason"]) == (
        True,
        "erp",
        "upgrade",
    )
    assert (second["reason"], second["paused_by"]) == ("cutover wave 2", "uid 0")
    assert second["since"] == first["since"]
    assert stored["erp"].reason == "cutover wave 2"
    assert (ended["resumed"], ended["reason"], ended["resumed_by"]) == (
        True,
        "cutover wave 2",
        "uid 0",
    )
    assert again == {"system": "erp", "resumed": False}
    requested = [e for e in logs if e["event"] == "system_pause_requested"]
    assert [(e["system"], e["reason"], e["by"]) for e in requested] == [
        ("erp", "upgrade", "uid 1000"),
        ("erp", "cutover wave 2", "uid 0"),
    ]
