"""The CRM change feed in ``pull`` mode (`actors.systems`) through faults.

The follower reads the sandbox org's feed over real HTTP and keeps its
cursor and dead letters in a real (in-memory) SQLite store; the transport
is a stand-in that confirms and keeps every message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from actors.cursors import CURSOR_KIND
from actors.systems import (
    LazyConnector,
    SystemTable,
    _ChangeFeed,
    _System,
)
from adapters.crm.client import SalesforceClient
from adapters.crm.sandbox import SalesforceSandbox
from broker.codec import decode_envelope
from broker.errors import StoreUnavailable
from broker.store import BatchWrite, DeadLetterFilter, SagaRecord, SagaWrite
from broker.store.sqlite import SqliteStore
from canonical.q2c import RecordReadRequired
from tests.adapters.crm.harness import Org, running_org
from tests.fakes import ConfirmingTransport as Transport
from tests.polling import eventually

pytestmark = pytest.mark.anyio

CHANNEL = "/data/ChangeEvents"
KEY = f"cdc:crm:{CHANNEL}"
_ENCODER = msgspec.json.Encoder(decimal_format="number")


class Rt:
    """The parts of the runtime the change feed uses."""

    def __init__(self, store: Any) -> None:
        self.transport = Transport()
        self.store = store
        self.feed = None

    def takes_event(self, event_type: str) -> bool:
        """Every event type has a reader."""
        return True


class Systems:
    """The parts of `actors.systems.Systems` the change feed uses."""

    def __init__(self, rt: Rt, client: SalesforceClient) -> None:
        self.rt = rt
        self.salesforce = {"crm": client}


class FlakyStore:
    """A store whose first *failures* cursor reads find it unavailable."""

    def __init__(self, store: SqliteStore, failures: int) -> None:
        self._store = store
        self.failures = failures

    async def load_saga(self, workflow: str, correlation_id: str) -> SagaRecord | None:
        """Unavailable *failures* times, then the real read."""
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("database is locked")
        return await self._store.load_saga(workflow, correlation_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


@pytest.fixture
async def org() -> AsyncIterator[Org]:
    """A fresh sandbox org, and a client logged in to it."""
    async with running_org(seed=11) as running:
        yield running


def change_feed(rt: Rt, client: SalesforceClient) -> _ChangeFeed:
    """The follower of system ``crm``'s feed, long-polling briefly."""
    table = SystemTable(
        kind="salesforce-crm", change_feed="pull", change_feed_wait_s=0.1
    )
    system = _System("crm", table, None, LazyConnector("crm", "salesforce-crm"))
    return _ChangeFeed(Systems(rt, client), system)  # type: ignore[arg-type]


async def place_cursor(store: SqliteStore, replay_id: int) -> None:
    """Store the cursor as a follower that read up to *replay_id* would have."""
    await store.commit_batch(
        BatchWrite(
            consumer=CURSOR_KIND,
            workflow=CURSOR_KIND,
            sagas=[
                SagaWrite(
                    correlation_id=KEY,
                    expected_version=0,
                    state=str(replay_id).encode(),
                )
            ],
        )
    )


async def cursor(store: SqliteStore) -> int | None:
    record = await store.load_saga(CURSOR_KIND, KEY)
    return None if record is None else int(record.state)


def rename(sandbox: SalesforceSandbox, account_id: str, name: str) -> None:
    """Rename an account as a user would: one UPDATE event, empty origin."""
    with sandbox.org.transaction() as txn:
        sandbox.org.update(txn, "Account", account_id, {"Name": name})


async def test_an_unreadable_event_is_dead_lettered_and_the_feed_moves_past_it(
    org: Org, store: SqliteStore
) -> None:
    """Two UPDATEs and an unknown changeType: two read-backs, one dead letter.

    The bad event's bytes are kept as received with the reason; the cursor
    moves past all three, instead of reading the batch again until the org's
    retention drops it (and everything after it).
    """
    sandbox = org.sandbox
    acme = sandbox.seed_account("Acme")
    initech = sandbox.seed_account("Initech")
    await place_cursor(store, sandbox.org.last_replay_id)
    rename(sandbox, acme, "Acme AG")
    rename(sandbox, initech, "Initech AG")
    sandbox.emit_unknown_change("Account", (acme,), "MERGE")
    bad = sandbox.org.log[-1]
    rt = Rt(store)

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(change_feed(rt, org.client)._follow)

            async def moved_past_all_three() -> bool:
                return await cursor(store) == bad.replay_id

            await eventually(moved_past_all_three)
            tg.cancel_scope.cancel()

    envelopes = [
        decode_envelope(m.body, max_bytes=1 << 20) for m in rt.transport.published
    ]
    read_backs = {
        msgspec.json.decode(e.data, type=RecordReadRequired).native_ids
        for e in envelopes
    }
    assert [e.type for e in envelopes] == ["crm.record.read_required"] * 2
    assert read_backs == {(acme,), (initech,)}

    (letter,) = await store.list_dead_letters(DeadLetterFilter())
    assert letter.queue == "/inbound/crm"
    assert letter.reason == "schema_invalid"
    assert letter.body == _ENCODER.encode(bad.cometd(CHANNEL))
    assert "MERGE" in letter.detail
    assert letter.headers["x-q2c-replay-id"] == str(bad.replay_id)
    assert letter.headers["x-q2c-channel"] == CHANNEL
    kept = [line for line in logs if line["event"] == "change_event_dead_lettered"]
    assert [line["replay_id"] for line in kept] == [str(bad.replay_id)]
    assert "change_feed_refused" not in [line["event"] for line in logs]


async def test_a_store_that_cannot_be_read_at_start_is_waited_out(
    org: Org, store: SqliteStore
) -> None:
    """load_saga unavailable twice: two warnings, then the feed follows."""
    org.sandbox.seed_account("Acme")
    flaky = FlakyStore(store, failures=2)
    rt = Rt(flaky)

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(change_feed(rt, org.client)._follow)

            async def followed() -> bool:
                return await cursor(store) == org.sandbox.org.last_replay_id

            await eventually(followed)
            tg.cancel_scope.cancel()

    waits = [line for line in logs if line["event"] == "change_feed_store_unavailable"]
    assert len(waits) == 2
    assert all(line["log_level"] == "warning" for line in waits)
    assert "database is locked" in waits[0]["error"]
    assert flaky.failures == 0
    assert [m.type for m in rt.transport.published] == ["crm.account.changed"]
