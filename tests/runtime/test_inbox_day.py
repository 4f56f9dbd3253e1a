"""The inbox key's day is the UTC day of the envelope's time, whatever its offset."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import msgspec
import pytest

from actors.ledger import LedgerWorkflow
from broker.codec import decode_envelope, encode_envelope, encode_event
from broker.commit import GroupCommit, Item
from broker.config import CoreConfig, TestingConfig
from broker.faults import CrashHook
from broker.metrics import Metrics
from broker.retry import RetryPolicy
from broker.store import Store
from broker.system_commit import inbox_key
from broker.transport import Delivery
from canonical import Envelope, LedgerEntryPosted

pytestmark = pytest.mark.anyio

INSTANT = datetime(2024, 1, 2, 1, 30, tzinfo=UTC)
#: The same instant as the sender's clock in three zones would write it.
SPELLINGS = [
    INSTANT,
    INSTANT.astimezone(timezone(timedelta(hours=-2))),  # 2024-01-01T23:30-02:00
    INSTANT.astimezone(timezone(timedelta(hours=9))),
]


def sent(message_id: str, time: datetime) -> Item:
    """One re-send of the same ledger entry, as a shard hands it over."""
    event = LedgerEntryPosted(account="acct-a", entry_id="e-1", amount=Decimal(5))
    body = encode_envelope(
        Envelope(
            id=message_id,
            source="/test",
            type="ledger.entry.posted",
            time=time,
            correlation_id="acct-a",
            idempotency_key="ledger:e-1",
            data=encode_event(event),
        )
    )
    env = decode_envelope(body, max_bytes=1 << 20)
    d = Delivery(tag=1, body=body, message_id=message_id, type=env.type)
    return Item(d, env, msgspec.json.decode(env.data, type=LedgerEntryPosted))


def test_a_commands_inbox_day_is_its_utc_day() -> None:
    """System actors key commands the same way: one day for one instant."""
    days = {inbox_key(sent(f"m-{n}", t).envelope).day for n, t in enumerate(SPELLINGS)}
    assert days == {INSTANT.date()}


async def test_one_fact_sent_in_two_offsets_is_applied_once(real_store: Store) -> None:
    """A producer's re-send in another zone is a duplicate, not a second entry."""
    commit = GroupCommit(
        workflow=LedgerWorkflow(),
        store=real_store,
        core=CoreConfig(),
        retry=RetryPolicy((1.0,), max_attempts=3),
        metrics=Metrics(),
        crash=CrashHook(TestingConfig()),
    )
    queue = "q2c.wf.ledger.0"

    first = await commit.write(queue, [sent("m-utc", SPELLINGS[0])], [])
    again = await commit.write(queue, [sent("m-minus-2", SPELLINGS[1])], [])
    later = await commit.write(queue, [sent("m-plus-9", SPELLINGS[2])], [])

    assert (first.applied, first.duplicates) == (1, 0)
    assert (again.applied, again.duplicates) == (0, 1)
    assert (later.applied, later.duplicates) == (0, 1)
