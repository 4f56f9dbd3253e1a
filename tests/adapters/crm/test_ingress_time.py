"""Change events: every canonical event's time is the change's ``commitTimestamp``.

Read-back requests included: a change delivered again (by the relay or the
feed) after midnight claims the inbox day of its commit, not of its arrival.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import msgspec
import pytest

from adapters.crm.ingress import SalesforceWebhook
from canonical.q2c import RecordReadRequired
from tests.adapters.arrival import inbox_key_on_arrival

SAMPLE = (
    Path(__file__).resolve().parents[3]
    / ".."
    / "shared"
    / "payloads"
    / "salesforce_cdc_account_update_pubsub.json"
)
COMMITTED = datetime(2023, 10, 4, 18, 35, 13, tzinfo=UTC)  # 1696444513000


def hook() -> SalesforceWebhook:
    return SalesforceWebhook(secrets=["s"], client_id="q2c-broker")


@pytest.fixture
def body() -> bytes:
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} is absent (the shared payload corpus is not here)")
    return SAMPLE.read_bytes()


def test_a_read_back_after_midnight_claims_the_commits_day(
    body: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The published UPDATE, relayed at 23:59:59 and again at 00:00:05: one key."""
    (inbound,) = hook().parse({}, body)
    assert isinstance(inbound.event, RecordReadRequired)
    assert inbound.time == COMMITTED
    moments = (
        datetime(2023, 10, 4, 23, 59, 59, tzinfo=UTC),
        datetime(2023, 10, 5, 0, 0, 5, tzinfo=UTC),
    )
    keys = {
        inbox_key_on_arrival(monkeypatch, at, lambda: hook().parse({}, body)[0])
        for at in moments
    }
    assert len(keys) == 1
    ((_, day),) = keys
    assert day == date(2023, 10, 4)


def test_a_whole_object_read_back_carries_the_commit_time(body: bytes) -> None:
    """A wildcard id (``001*``) reads back with the same time as the real ids."""
    raw = msgspec.json.decode(body)
    raw["payload"]["ChangeEventHeader"]["recordIds"] = ["001*", "0014H00002LbR7QQAV"]
    inbound = hook().parse({}, msgspec.json.encode(raw))
    assert [i.event.native_ids for i in inbound] == [(), ("0014H00002LbR7QQAV",)]
    assert {i.time for i in inbound} == {COMMITTED}
