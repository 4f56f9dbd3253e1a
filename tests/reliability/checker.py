"""The checker: after the fault and the drain, count lost and duplicated effects.

RELIABILITY.md §5.2, Jepsen ``total-queue`` style, read straight from the
daemon's Postgres database:

* effects per entry: journal rows with stage ``applied`` (written in the
  transaction that changes the saga, so they count effects exactly);
* per account, the ``ledger`` saga state must equal the sum of the account's
  distinct entries, and its entry count the number of distinct entries;
* the outbox has no unsent rows (``sent_at IS NULL AND parked_reason IS NULL``).

Pass: lost = 0, duplicated effects = 0, unexpected = 0, wrong accounts = 0.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import asyncpg

from tests.reliability.workload import Entry, Workload

__all__ = [
    "Report",
    "check",
    "connect",
    "applied_count",
    "wait_applied",
    "drain_state",
    "dead_letters",
    "wait_dead_letters",
    "journal_stages",
]

_PENDING = "SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NULL"


@asynccontextmanager
async def connect(dsn: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A short-lived connection to the scenario's database."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        yield conn
    finally:
        await conn.close()


@dataclass(kw_only=True)
class Report:
    """What the checker found; `problems` is empty when the promise held."""

    expected: int
    effects: Counter[str]
    lost: list[str]
    duplicated: dict[str, int]
    unexpected: list[str]
    wrong_accounts: dict[str, str]
    outbox_pending: int
    duplicates_skipped: int
    dead_letters: int

    def problems(self) -> list[str]:
        """Human-readable violations, at most a few examples each."""
        out: list[str] = []
        if self.lost:
            out.append(f"lost {len(self.lost)}: {self.lost[:5]}")
        if self.duplicated:
            items = list(self.duplicated.items())[:5]
            out.append(f"duplicated effects {len(self.duplicated)}: {items}")
        if self.unexpected:
            out.append(f"unexpected {len(self.unexpected)}: {self.unexpected[:5]}")
        if self.wrong_accounts:
            wrong = list(self.wrong_accounts.items())[:5]
            out.append(f"wrong accounts {len(self.wrong_accounts)}: {wrong}")
        if self.outbox_pending:
            out.append(f"outbox rows unsent: {self.outbox_pending}")
        return out

    def assert_ok(self) -> None:
        """Fail the test with every problem found."""
        problems = self.problems()
        assert not problems, "checker: " + "; ".join(problems)


async def applied_count(dsn: str) -> int:
    """Distinct messages applied so far (progress of the workload)."""
    async with connect(dsn) as conn:
        n: int = await conn.fetchval(
            "SELECT count(DISTINCT message_id) FROM journal WHERE stage = 'applied'"
        )
    return n


async def drain_state(dsn: str) -> tuple[int, int]:
    """(distinct messages applied, unsent outbox rows)."""
    async with connect(dsn) as conn:
        applied: int = await conn.fetchval(
            "SELECT count(DISTINCT message_id) FROM journal WHERE stage = 'applied'"
        )
        pending: int = await conn.fetchval(_PENDING)
    return applied, pending


async def wait_applied(dsn: str, at_least: int, *, timeout_s: float = 30.0) -> None:
    """Wait until *at_least* distinct messages are applied (a fault's trigger)."""
    with anyio.fail_after(timeout_s):
        while True:
            if await applied_count(dsn) >= at_least:
                return
            await anyio.sleep(0.05)  # bounded poll: progress lives in Postgres


async def check(dsn: str, workload: Workload, *, extra: Iterable[Entry] = ()) -> Report:
    """Compare the database with the workload (plus *extra* entries applied too)."""
    entries = [*workload.entries, *extra]
    ids = {e.message_id for e in entries}
    expected: dict[str, tuple[Decimal, int]] = {}
    for e in entries:
        total, count = expected.get(e.account, (Decimal(0), 0))
        expected[e.account] = (total + e.amount, count + 1)

    async with connect(dsn) as conn:
        rows = await conn.fetch(
            "SELECT message_id, count(*) FROM journal WHERE stage = 'applied' "
            "GROUP BY message_id"
        )
        sagas = await conn.fetch(
            "SELECT correlation_id, state FROM saga WHERE workflow = 'ledger'"
        )
        pending: int = await conn.fetchval(_PENDING)
        skipped: int = await conn.fetchval(
            "SELECT count(*) FROM journal WHERE stage = 'duplicate'"
        )
        dead: int = await conn.fetchval("SELECT count(*) FROM dead_letter")

    effects: Counter[str] = Counter({r[0]: int(r[1]) for r in rows})
    wrong: dict[str, str] = {}
    seen_accounts: set[str] = set()
    for r in sagas:
        account = r[0]
        seen_accounts.add(account)
        state: dict[str, Any] = json.loads(bytes(r[1]))
        want_total, want_count = expected.get(account, (Decimal(0), 0))
        got_total, got_count = Decimal(state["balance"]), int(state["entries"])
        if (got_total, got_count) != (want_total, want_count):
            wrong[account] = (
                f"balance {got_total} (want {want_total}), "
                f"entries {got_count} (want {want_count})"
            )
    for account, (total, count) in expected.items():
        if account not in seen_accounts:
            wrong[account] = f"no saga (want balance {total}, entries {count})"

    return Report(
        expected=len(ids),
        effects=effects,
        lost=sorted(i for i in ids if effects[i] == 0),
        duplicated={i: n for i, n in effects.items() if n > 1},
        unexpected=sorted(i for i in effects if i not in ids),
        wrong_accounts=wrong,
        outbox_pending=pending,
        duplicates_skipped=skipped,
        dead_letters=dead,
    )


async def dead_letters(dsn: str) -> list[dict[str, Any]]:
    """Every dead-letter row, oldest first, body as bytes."""
    async with connect(dsn) as conn:
        rows = await conn.fetch(
            "SELECT id, message_id, queue, routing_key, reason, detail, body, "
            "attempts, status, replays FROM dead_letter ORDER BY id"
        )
    return [{**dict(r), "body": bytes(r["body"])} for r in rows]


async def wait_dead_letters(
    dsn: str, n: int, *, timeout_s: float = 20.0
) -> list[dict[str, Any]]:
    """Wait until at least *n* dead letters exist; return them all."""
    with anyio.fail_after(timeout_s):
        while True:
            rows = await dead_letters(dsn)
            if len(rows) >= n:
                return rows
            await anyio.sleep(0.1)  # bounded poll: dead letters live in Postgres


async def journal_stages(dsn: str, message_id: str) -> list[str]:
    """The journal stages of one message id, in order."""
    async with connect(dsn) as conn:
        rows = await conn.fetch(
            "SELECT stage FROM journal WHERE message_id = $1 ORDER BY at, id",
            message_id,
        )
    return [r[0] for r in rows]
