"""The account sync workflow, applied event by event (pure: no engine, no I/O)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import msgspec

from actors.workflows.sync import (
    AccountSyncState,
    AccountSyncWorkflow,
    erp_fields_hash,
)
from broker.codec import encode_event
from canonical import Envelope
from canonical.commerce import Account
from canonical.q2c import AccountChanged, CustomerSynced, CustomerSyncRequested

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
ACCOUNT = Account(
    id="acct-001Hn00000XyZ12IAF", name="Acme GmbH", country="DE", currency="EUR"
)
_ids = itertools.count()


def envelope(event: Any) -> Envelope:
    n = next(_ids)
    return Envelope(
        id=f"m-{n}",
        source="/test",
        type=type(event).__struct_config__.tag,
        time=NOW,
        correlation_id=ACCOUNT.id,
        idempotency_key=f"k-{n}",
        data=encode_event(event),
    )


class Sync:
    """One account's sync instance, fed by hand."""

    def __init__(self) -> None:
        self.wf = AccountSyncWorkflow()
        self.state: AccountSyncState = self.wf.initial(ACCOUNT.id)

    def feed(self, event: Any) -> list[Any]:
        """Apply *event*; return the events it emitted."""
        applied = self.wf.apply(self.state, event, envelope(event))
        self.state = applied.state
        return [e.event for e in applied.emits]


def changed(account: Account) -> AccountChanged:
    return AccountChanged(
        account=account, change="updated", native_id="001Hn00000XyZ12IAF"
    )


def synced(account: Account) -> CustomerSynced:
    return CustomerSynced(
        account_id=account.id,
        system="erp_cloud",
        native_id="1000042",
        content_hash=erp_fields_hash(account),
    )


def test_a_rename_undone_while_it_is_on_its_way_is_sent_again() -> None:
    """Written A, B asked for, back to A: A must follow B, or the ERP keeps B."""
    a, b = ACCOUNT, msgspec.structs.replace(ACCOUNT, name="Acme")
    sync = Sync()
    assert [c.account for c in sync.feed(changed(a))] == [a]
    sync.feed(synced(a))
    assert [c.account for c in sync.feed(changed(b))] == [b]
    (again,) = sync.feed(changed(a))  # before B's result came back
    assert isinstance(again, CustomerSyncRequested)
    assert again.account == a


def test_a_change_the_erp_does_not_see_asks_for_nothing() -> None:
    """A field outside the ERP's hash changed: the same digest, no sync."""
    sync = Sync()
    sync.feed(changed(ACCOUNT))
    sync.feed(synced(ACCOUNT))
    assert sync.feed(changed(ACCOUNT)) == []
    assert sync.state.syncs_requested == 1


def test_an_older_write_landing_last_is_followed_by_the_latest_again() -> None:
    """A's write waited in a retry tier and landed after B's: B is sent again."""
    a, b = ACCOUNT, msgspec.structs.replace(ACCOUNT, name="Acme")
    sync = Sync()
    sync.feed(changed(a))
    sync.feed(changed(b))
    assert sync.feed(synced(b)) == []
    (again,) = sync.feed(synced(a))

    assert isinstance(again, CustomerSyncRequested)
    assert (again.account, again.content_hash) == (b, erp_fields_hash(b))
    assert sync.state.rewrites == 1
    assert sync.feed(synced(b)) == []
