"""The sandbox org's Change Data Capture log: transactions, change events, retention.

Internal to `adapters.crm.org`. Each write of `Org` adds to a `Transaction`
the change event an org publishes for the record it touched (which fields
it carries, which it names as changed or nulled). Committing stamps the
events the way an org does (one ``transactionKey`` per transaction, a
``sequenceNumber`` per event, a rising ``commitNumber`` and replay id) and
appends them to a bounded log; `adapters.crm.feed` serves replays and pushes
from that log. It is separate from the records because it only ever sees
what a write changed, never the stored records themselves.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from adapters.crm.schema import (
    Fields,
    change_field_name,
    compound_fields,
    entity_channel,
)
from adapters.crm.views import ChangeEventHeader, ChangeType

__all__ = ["ChangeLog", "ChangeRecord", "Transaction"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ChangeRecord:
    """One committed change event, kept in the log until evicted."""

    replay_id: int
    entity: str
    header: ChangeEventHeader
    fields: Fields
    #: Sent as ``changeType`` instead of the header's: a kind of change a
    #: newer org could send that this client does not know.
    wire_change_type: str | None = None

    def cometd(self, channel: str | None = None) -> dict[str, Any]:
        """The CometD message delivering this event on *channel*."""
        schema = base64.urlsafe_b64encode(hashlib.sha256(self.entity.encode()).digest())
        header = msgspec.to_builtins(self.header)
        if self.wire_change_type is not None:
            header["changeType"] = self.wire_change_type
        return {
            "data": {
                "schema": schema[:22].decode(),
                "payload": {"ChangeEventHeader": header, **self.fields},
                "event": {"replayId": self.replay_id},
            },
            "channel": channel or entity_channel(self.entity),
        }


@dataclass(kw_only=True)
class _Change:
    entity: str
    record_id: str
    change_type: ChangeType
    fields: Fields
    changed: tuple[str, ...] = ()
    nulled: tuple[str, ...] = ()
    wire_change_type: str | None = None


class Transaction:
    """The changes of one write, committed to the log together (`Org.transaction`).

    Each method adds the change event an org publishes for one record.
    """

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.changes: list[_Change] = []

    def created(self, entity: str, record: Fields) -> None:
        """*record* was inserted: the event carries all its fields but three."""
        payload = {
            k: v
            for k, v in record.items()
            if k not in ("Id", "IsDeleted", "SystemModstamp")
        }
        self.changes.append(
            _Change(
                entity=entity,
                record_id=record["Id"],
                change_type=ChangeType.CREATE,
                fields=compound_fields(payload),
            )
        )

    def updated(
        self,
        entity: str,
        record_id: str,
        values: Fields,
        changed: list[str],
        modified: str,
    ) -> None:
        """The fields *changed* of *values* were set (``None``: cleared) at *modified*.

        The event carries the changed fields and ``LastModifiedDate``, and
        names them in ``changedFields`` (and the cleared ones in
        ``nulledFields``).
        """
        payload = {k: values[k] for k in changed}
        payload["LastModifiedDate"] = modified
        self.changes.append(
            _Change(
                entity=entity,
                record_id=record_id,
                change_type=ChangeType.UPDATE,
                fields=compound_fields(payload),
                changed=tuple(
                    change_field_name(k) for k in ("LastModifiedDate", *changed)
                ),
                nulled=tuple(
                    change_field_name(k) for k in changed if values[k] is None
                ),
            )
        )

    def deleted(self, entity: str, record_id: str) -> None:
        """The record went to the recycle bin: a header-only event."""
        self.changes.append(
            _Change(
                entity=entity,
                record_id=record_id,
                change_type=ChangeType.DELETE,
                fields={},
            )
        )

    def header_only(
        self,
        entity: str,
        record_ids: tuple[str, ...],
        change_type: ChangeType,
        *,
        wire_change_type: str | None = None,
    ) -> None:
        """A header-only event (a gap or overflow) for *record_ids*, or for none.

        *wire_change_type*, when given, is the ``changeType`` sent instead.
        """
        for rid in record_ids or ("",):
            self.changes.append(
                _Change(
                    entity=entity,
                    record_id=rid,
                    change_type=change_type,
                    fields={},
                    wire_change_type=wire_change_type,
                )
            )


class ChangeLog:
    """The bounded log of committed change events.

    Args:
        rng: source of transaction keys and replay-id and commit-number steps.
        clock: seconds since the epoch, for ``commitTimestamp``.
        retain_events: how many change events the log keeps.
        user_id: the ``commitUser`` of every event.
        counts: where ``change_events`` is counted.
        on_change: called with each committed change event.
    """

    def __init__(
        self,
        *,
        rng: random.Random,
        clock: Callable[[], float],
        retain_events: int,
        user_id: str,
        counts: Counter[str],
        on_change: Callable[[ChangeRecord], None] | None = None,
    ) -> None:
        self._rng = rng
        self._clock = clock
        self._user_id = user_id
        self._counts = counts
        self.on_change = on_change
        self.log: deque[ChangeRecord] = deque(maxlen=retain_events)
        #: The replay id of the newest event evicted from the log (0: none yet).
        self.evicted_through = 0
        self.last_replay_id = rng.randrange(10_000, 20_000)
        self._commit_number = rng.randrange(10**12, 10**13)

    def commit(self, txn: Transaction) -> None:
        """Append one event per change of *txn*, sharing its transaction key."""
        if not txn.changes:
            return
        key = str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        self._commit_number += self._rng.randrange(1, 50)
        stamp = int(self._clock() * 1000)
        for seq, change in enumerate(txn.changes, start=1):
            self.last_replay_id += self._rng.randrange(1, 5)
            header = ChangeEventHeader(
                entity_name=change.entity,
                record_ids=(change.record_id,) if change.record_id else (),
                change_type=change.change_type,
                change_origin=txn.origin,
                transaction_key=key,
                sequence_number=seq,
                commit_timestamp=stamp,
                commit_number=self._commit_number,
                commit_user=self._user_id,
                changed_fields=change.changed,
                nulled_fields=change.nulled,
            )
            if len(self.log) == self.log.maxlen:
                self.evicted_through = self.log[0].replay_id
            record = ChangeRecord(
                replay_id=self.last_replay_id,
                entity=change.entity,
                header=header,
                fields=change.fields,
                wire_change_type=change.wire_change_type,
            )
            self.log.append(record)
            self._counts["change_events"] += 1
            if self.on_change is not None:
                self.on_change(record)
