"""Held messages: an ordered workflow's instance waits behind its parked message.

On the in-process transport and an on-disk SQLite store, with
`tests.runtime.trees.OrderedLedger`, whose state records the order in which
an account's entries were applied.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from actors.demo import entry_message
from broker import Daemon
from broker.codec import encode_envelope, encode_event, utcnow
from broker.control.ctl import render
from broker.control.protocol import DlqListRequest, HoldListRequest
from broker.handler import DaemonControl
from broker.store import DeadLetterFilter, DeadLetterRow, HoldRefused
from broker.transport import OutgoingMessage
from canonical import Envelope, LedgerEntryApplied
from tests.polling import eventually
from tests.runtime.test_engine import config, publish, running
from tests.runtime.trees import OrderedLedger, OrderedState

pytestmark = pytest.mark.anyio

TREE = "tests.runtime.trees:build_ordered_tree"


def entry(account: str, entry_id: str, memo: str = "") -> OutgoingMessage:
    return entry_message(account, entry_id, Decimal(1), memo=memo)


async def order(daemon: Daemon, account: str) -> tuple[str, ...]:
    rec = await daemon.runtime.store.load_saga("ordered", account)
    return (
        () if rec is None else msgspec.json.decode(rec.state, type=OrderedState).order
    )


async def order_is(daemon: Daemon, account: str, *expected: str) -> tuple[str, ...]:
    """Wait until *account* applied exactly *expected* (bounded)."""

    async def probe() -> tuple[str, ...]:
        got = await order(daemon, account)
        return got if got == expected else ()

    return await eventually(probe)


async def letters(daemon: Daemon, **flt: object) -> list[DeadLetterRow]:
    found = await daemon.runtime.store.list_dead_letters(
        DeadLetterFilter(**{"status": "open", **flt})  # type: ignore[arg-type]
    )
    return sorted(found, key=lambda r: r.id)


async def held_letters(daemon: Daemon, n: int) -> list[DeadLetterRow]:
    """Wait until *n* letters are held; return them in arrival order."""

    async def probe() -> list[DeadLetterRow]:
        rows = [r for r in await letters(daemon) if r.status == "held"]
        return rows if len(rows) == n else []

    return await eventually(probe)


def workflow(daemon: Daemon) -> OrderedLedger:
    wf = daemon.runtime.workflows["ordered"]
    assert isinstance(wf, OrderedLedger)
    return wf


async def test_a_message_behind_a_retrying_one_waits_and_then_applies_after_it(
    tmp_path: Path,
) -> None:
    """a2 arrives while a1 waits in a retry tier: a2 is held, then applied after a1.

    The other account is not held up, and nothing stays held at the end.
    """
    cfg = config(tmp_path, BROKER__DAEMON__TREE=TREE)
    async with running(cfg) as daemon:
        await publish(daemon, [entry("acct-a", "a1", "FLAKY"), entry("acct-a", "a2")])
        await publish(daemon, [entry("acct-b", "b1")])
        applied = await order_is(daemon, "acct-a", "a1", "a2")
        other = await order_is(daemon, "acct-b", "b1")
        store = daemon.runtime.store
        journal = await store.journal("acct-a")
        counts = await store.counts()
        [a2] = await letters(daemon, status="released")

    assert (applied, other) == (("a1", "a2"), ("b1",))
    stages = [(j.message_id, j.stage) for j in journal]
    assert stages.index(("demo-a1", "retry_scheduled")) < stages.index(
        ("demo-a2", "held")
    )
    assert stages.index(("demo-a1", "applied")) < stages.index(("demo-a2", "applied"))
    assert [s for m, s in stages if m == "demo-a2"] == ["held", "released", "applied"]
    assert (a2.message_id, a2.reason, a2.workflow) == ("demo-a2", "held", "ordered")
    assert (counts["held"], counts["holds"], counts["dead_letters"]) == (0, 0, 0)


async def test_a_dead_lettered_blocker_holds_its_instance_until_it_is_replayed(
    tmp_path: Path,
) -> None:
    """a1 is rejected: a2-a4 wait, other accounts flow; replayed, all apply in order."""
    cfg = config(tmp_path, BROKER__DAEMON__TREE=TREE)
    async with running(cfg) as daemon:
        await publish(
            daemon,
            [
                entry("acct-a", "a1", "REJECT"),
                entry("acct-a", "a2"),
                entry("acct-b", "b1"),
                entry("acct-a", "a3"),
            ],
        )
        held = await held_letters(daemon, 2)
        await publish(daemon, [entry("acct-a", "a4"), entry("acct-b", "b2")])
        flowing = await order_is(daemon, "acct-b", "b1", "b2")
        held = await held_letters(daemon, 3)
        store = daemon.runtime.store
        [blocker] = [r for r in await letters(daemon) if r.status == "parked"]
        counts = await store.counts()
        waiting = await order(daemon, "acct-a")
        control = DaemonControl(daemon)
        status = await control.status()
        trace = await control.trace("acct-a")
        listing = render(
            DlqListRequest(status="open"),
            await control.dlq_list(DeadLetterFilter(status="open")),
        )

        workflow(daemon).fixed = True
        replayed = await store.replay_dead_letters(
            DeadLetterFilter(ids=(blocker.id,)), max_replays=1, dry_run=False
        )
        applied = await order_is(daemon, "acct-a", "a1", "a2", "a3", "a4")
        after = await store.counts()
        released = await letters(daemon, status="released")

    assert flowing == ("b1", "b2")
    assert waiting == ()
    assert [r.message_id for r in held] == ["demo-a2", "demo-a3", "demo-a4"]
    assert {(r.reason, r.correlation_id) for r in held} == {("held", "acct-a")}
    assert all(r.detail == "held behind demo-a1" for r in held)
    assert (blocker.message_id, blocker.reason) == ("demo-a1", "rejected")
    assert (counts["dead_letters"], counts["held"], counts["holds"]) == (1, 3, 1)
    assert (status["store"]["held"], status["store"]["holds"]) == (3, 1)
    assert trace["sagas"]["ordered"] == {"held_by": "demo-a1"}
    lines = listing.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATUS", "REASON"]
    assert [line.split()[1:3] for line in lines[1:-1]] == [
        ["held", "held"],
        ["held", "held"],
        ["held", "held"],
        ["parked", "rejected"],
    ]
    assert lines[-1] == "4 dead letters, 3 held"
    assert replayed == [blocker.id]
    assert applied == ("a1", "a2", "a3", "a4")
    assert (after["held"], after["holds"]) == (0, 0)
    assert sorted(r.message_id for r in released) == ["demo-a2", "demo-a3", "demo-a4"]


async def test_purging_the_blocker_releases_the_held_messages_in_order(
    tmp_path: Path,
) -> None:
    """The operator drops a1 for good: a2 and a3 are released and apply, in order."""
    cfg = config(tmp_path, BROKER__DAEMON__TREE=TREE)
    async with running(cfg) as daemon:
        await publish(
            daemon,
            [
                entry("acct-a", "a1", "REJECT"),
                entry("acct-a", "a2"),
                entry("acct-a", "a3"),
            ],
        )
        await held_letters(daemon, 2)
        store = daemon.runtime.store
        purged = await store.purge_dead_letters(
            DeadLetterFilter(reason="rejected"), dry_run=False
        )
        applied = await order_is(daemon, "acct-a", "a2", "a3")
        counts = await store.counts()
        journal = [(j.message_id, j.stage) for j in await store.journal("acct-a")]

    assert len(purged) == 1
    assert applied == ("a2", "a3")
    assert (counts["held"], counts["holds"], counts["dead_letters"]) == (0, 0, 0)
    assert journal[-3:] == [
        ("demo-a2", "applied"),
        ("demo-a3", "released"),
        ("demo-a3", "applied"),
    ]


async def test_an_operator_releases_a_hold_whose_blocker_is_lost(
    tmp_path: Path,
) -> None:
    """a1 waits in a long retry tier: released, a2 goes back to its queue and applies.

    The hold of acct-b, whose blocker b1 is a parked dead letter, is listed
    but not released; an instance that is not held is not found.
    """
    cfg = config(
        tmp_path, BROKER__DAEMON__TREE=TREE, BROKER__TOPOLOGY__RETRY_TIERS_S="[60]"
    )
    async with running(cfg) as daemon:
        await publish(
            daemon,
            [
                entry("acct-a", "a1", "FLAKY"),
                entry("acct-a", "a2"),
                entry("acct-b", "b1", "REJECT"),
                entry("acct-b", "b2"),
            ],
        )
        await held_letters(daemon, 2)
        control = DaemonControl(daemon)
        listed = await control.hold_list(None, limit=100)
        only_b = await control.hold_list("ordered", limit=1)
        with pytest.raises(HoldRefused, match="which is parked") as parked:
            await control.hold_release("ordered", "acct-b")
        with pytest.raises(
            KeyError, match="'acct-c' of workflow 'ordered' is not held"
        ):
            await control.hold_release("ordered", "acct-c")

        released = await control.hold_release("ordered", "acct-a")
        applied = await order_is(daemon, "acct-a", "a2")
        store = daemon.runtime.store

        async def one_hold_left() -> list[dict[str, object]]:
            holds = await control.hold_list(None, limit=100)
            return holds if len(holds) == 1 else []

        left = await eventually(one_hold_left)
        journal = [
            (j.message_id, j.stage, j.detail) for j in await store.journal("acct-a")
        ]
        counts = await store.counts()

    assert [
        (h["correlation_id"], h["blocker"], h["held"], h["blocker_status"])
        for h in sorted(listed, key=lambda h: str(h["correlation_id"]))
    ] == [("acct-a", "demo-a1", 1, None), ("acct-b", "demo-b1", 1, "parked")]
    assert len(only_b) == 1
    assert parked.value.reason == "blocker_parked"
    assert released == {
        "workflow": "ordered",
        "correlation_id": "acct-a",
        "blocker": "demo-a2",
    }
    assert applied == ("a2",)
    assert [h["correlation_id"] for h in left] == ["acct-b"]
    assert [(m, s) for m, s, _ in journal if m == "demo-a2"] == [
        ("demo-a2", "held"),
        ("demo-a2", "released"),
        ("demo-a2", "applied"),
    ]
    assert (
        "demo-a2",
        "released",
        "an operator released the ordered hold of demo-a1: "
        "sent back to its queue, it holds the rest now",
    ) in journal
    assert (counts["held"], counts["holds"]) == (1, 1)
    assert render(HoldListRequest(), []) == "no instances are held"


async def test_an_unordered_workflow_does_not_hold(tmp_path: Path) -> None:
    """The stock ledger (not ordered): a rejected entry holds nothing behind it."""
    cfg = config(tmp_path, BROKER__DAEMON__TREE="tests.runtime.trees:build_poison_tree")
    async with running(cfg) as daemon:
        await publish(
            daemon,
            [entry("acct-u", "u1", "REJECT"), entry("acct-u", "u2")],
        )

        async def applied() -> bool:
            rec = await daemon.runtime.store.load_saga("ledger", "acct-u")
            return rec is not None

        await eventually(applied)
        counts = await daemon.runtime.store.counts()

    assert (counts["held"], counts["holds"], counts["dead_letters"]) == (0, 0, 1)


def check(account: str, entry_id: str) -> OutgoingMessage:
    """A ``ledger.entry.applied`` for *account*: an `unheld` type of OrderedLedger."""
    env = Envelope(
        id=f"check-{entry_id}",
        source="/test/timer",
        type="ledger.entry.applied",
        time=utcnow(),
        correlation_id=account,
        idempotency_key=f"check:{entry_id}",
        data=encode_event(
            LedgerEntryApplied(
                account=account,
                entry_id=entry_id,
                amount=Decimal(0),
                balance=Decimal(0),
                entries=0,
            )
        ),
    )
    return OutgoingMessage(
        exchange="q2c.events",
        routing_key=env.type,
        body=encode_envelope(env),
        message_id=env.id,
        correlation_id=account,
        type=env.type,
    )


async def test_an_unheld_type_applies_at_once_behind_a_parked_blocker(
    tmp_path: Path,
) -> None:
    """A timer (an `unheld` type) is not held: it applies while a2 waits.

    The hold keeps its blocker: replayed, a1 and a2 then apply in order.
    """
    cfg = config(tmp_path, BROKER__DAEMON__TREE=TREE)
    async with running(cfg) as daemon:
        await publish(daemon, [entry("acct-a", "a1", "REJECT"), entry("acct-a", "a2")])
        await held_letters(daemon, 1)
        await publish(daemon, [check("acct-a", "sla")])
        checked = await order_is(daemon, "acct-a", "check:sla")
        store = daemon.runtime.store
        counts = await store.counts()
        [blocker] = [r for r in await letters(daemon) if r.status == "parked"]
        workflow(daemon).fixed = True
        await store.replay_dead_letters(
            DeadLetterFilter(ids=(blocker.id,)), max_replays=1, dry_run=False
        )
        applied = await order_is(daemon, "acct-a", "check:sla", "a1", "a2")

    assert checked == ("check:sla",)
    assert (counts["held"], counts["holds"]) == (1, 1)
    assert blocker.message_id == "demo-a1"
    assert applied == ("check:sla", "a1", "a2")
