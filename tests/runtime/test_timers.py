"""Delayed emits (durable timers) on the in-process transport and on-disk SQLite."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.to_thread
import msgspec
import pytest

from actors.demo import entry_message
from broker.config import Config
from broker.store import OutboxRow
from canonical import Envelope, LedgerEntryApplied
from tests.polling import eventually
from tests.runtime.test_engine import OUT, balance, collect, config, publish, running

pytestmark = pytest.mark.anyio

TREE = "tests.runtime.trees:build_timer_tree"


def timer_config(tmp_path: Path) -> Config:
    return config(
        tmp_path, BROKER__DAEMON__TREE=TREE, BROKER__CORE__RELAY_POLL_S="0.05"
    )


def applied_entry(body: bytes) -> str:
    env = msgspec.json.decode(body, type=Envelope)
    return msgspec.json.decode(env.data, type=LedgerEntryApplied).entry_id


async def test_a_delayed_emit_waits_in_the_outbox_until_it_is_due(
    tmp_path: Path,
) -> None:
    """Written with its batch, a delayed emit stays pending and unclaimable until due.

    The entry is applied at once; what it emits an hour later is an outbox
    row that no relay can lease yet, due an hour after it was written, while
    the undelayed emit of the same batch comes out and its row is deleted.
    """
    later = entry_message("acct-t", "e-later", Decimal(2), memo="DELAY=3600")
    now = entry_message("acct-t", "e-now", Decimal(3))
    async with running(config(tmp_path, BROKER__DAEMON__TREE=TREE)) as daemon:
        await publish(daemon, [later, now])
        [out] = await collect(daemon, OUT, 1)
        store = daemon.runtime.store
        state = await balance(daemon, "acct-t")
        leased: list[OutboxRow] = await store.claim_outbox(limit=10, lease_s=30)
    rows = await anyio.to_thread.run_sync(outbox_rows, tmp_path / "q2c.sqlite3")

    assert applied_entry(out.body) == "e-now"
    assert (state.entries, state.balance) == (2, Decimal(5))
    assert leased == []
    by_subject = {subject_of(body): row for body, *row in rows}
    sent_at, wait_s, lease_until, attempts = by_subject["e-later"]
    assert (sent_at, lease_until, attempts) == (None, None, 0)
    assert wait_s == pytest.approx(3600)
    assert "e-now" not in by_subject


def outbox_rows(
    path: Path,
) -> list[tuple[bytes, float | None, float, float | None, int]]:
    """Body, sent_at, due minus created, lease_until and attempts of every row."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(
            "SELECT body, sent_at, next_attempt_at - created_at, lease_until, attempts"
            " FROM outbox"
        ).fetchall()
    finally:
        conn.close()


def subject_of(body: bytes) -> str | None:
    return msgspec.json.decode(body, type=Envelope).subject


async def test_a_delayed_emit_is_published_once_due(tmp_path: Path) -> None:
    """The relay's poller publishes a delayed emit after its delay, once."""
    msg = entry_message("acct-t", "e-soon", Decimal(1), memo="DELAY=0.3")
    async with running(timer_config(tmp_path)) as daemon:
        await publish(daemon, [msg])
        [out] = await collect(daemon, OUT, 1)
        store = daemon.runtime.store

        async def drained() -> bool:
            return (await store.counts())["outbox_pending"] == 0

        await eventually(drained)

    assert applied_entry(out.body) == "e-soon"
    assert out.message_id == msgspec.json.decode(out.body, type=Envelope).id


async def test_a_delayed_emit_survives_a_restart(tmp_path: Path) -> None:
    """A timer set before a shutdown fires after the next start: it is a row."""
    msg = entry_message("acct-r", "e-restart", Decimal(4), memo="DELAY=1.5")
    cfg = timer_config(tmp_path)
    async with running(cfg) as daemon:
        await publish(daemon, [msg])
        await eventually(lambda: daemon.runtime.store.load_saga("ledger", "acct-r"))
        pending = (await daemon.runtime.store.counts())["outbox_pending"]
    async with running(cfg) as again:
        [out] = await collect(again, OUT, 1)

    assert pending == 1
    assert applied_entry(out.body) == "e-restart"
