"""Rows in and out of the stores: what PostgreSQL and SQLite share.

Both stores select their rows with the same columns in the same order, so
one decoder per row type serves both; only time stamps differ (``datetime``
from asyncpg, seconds since the epoch in SQLite), and a store that needs it
passes its own converter as *when*. `normalized` applies, before either
store writes a `BatchWrite`, the rules both must follow; `releasable` and
`release_detail` are the rule and the journal entry of an operator's
release of a hold (`broker.store.Store.release_hold`).

Internal: not for use outside broker/store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, Protocol, cast

import msgspec

from broker.store import (
    BatchWrite,
    DeadLetterRecord,
    DeadLetterRow,
    DeadLetterStatus,
    HoldRefused,
    HoldRow,
    InboxKey,
    JournalRow,
    OutboxRecord,
    OutboxRow,
    SagaRecord,
    SystemPause,
)
from broker.xref import XrefEntry, unique_entries

__all__ = [
    "Row",
    "Timestamp",
    "encode_json",
    "decode_headers",
    "normalized",
    "written_outbox",
    "saga_record",
    "outbox_row",
    "dead_letter_row",
    "hold_row",
    "pause_row",
    "releasable",
    "release_detail",
    "journal_row",
    "xref_entry",
]


class Row(Protocol):
    """A fetched row: an ``asyncpg.Record`` or an ``sqlite3`` tuple."""

    def __getitem__(self, index: int, /) -> Any:
        """The value of column *index*."""
        ...


#: Turns a stored time stamp into an aware ``datetime``.
Timestamp = Callable[[Any], datetime]

_encoder = msgspec.json.Encoder()
_headers = msgspec.json.Decoder(dict[str, Any])


def _as_is(value: Any) -> datetime:
    return cast(datetime, value)


def encode_json(value: object) -> str:
    """*value* as JSON text (headers, and arrays SQLite expands with json_each)."""
    return _encoder.encode(value).decode()


def decode_headers(text: str | bytes) -> dict[str, Any]:
    """Headers stored as a JSON object."""
    return _headers.decode(text)


def normalized(write: BatchWrite) -> BatchWrite:
    """*write* with each key, dead letter, held message and xref entry once.

    A key repeated in a batch is claimed once (its first occurrence); dead
    letters for the same message id merge into the last one, their attempts
    added up (an upsert may not touch a row twice); a held message keeps its
    first place; a hold write from nothing to nothing is dropped; released
    ids count once; xref entries follow `broker.xref.unique_entries`.

    Raises:
        ValueError: one instance appears twice in ``write.sagas`` or in
            ``write.holds``, a caller bug.
        XrefConflict: two xref entries bind one native id to two canonical ids.
    """
    ids = [w.correlation_id for w in write.sagas]
    if len(set(ids)) != len(ids):
        raise ValueError(f"saga {write.workflow}: one write per instance per batch")
    held = [h.correlation_id for h in write.holds]
    if len(set(held)) != len(held):
        raise ValueError(f"hold {write.workflow}: one write per instance per batch")
    keys: dict[str, InboxKey] = {}
    for k in write.keys:
        keys.setdefault(k.key, k)
    letters: dict[str, DeadLetterRecord] = {}
    for h in write.held:
        letters.setdefault(h.message_id, h)
    return msgspec.structs.replace(
        write,
        keys=list(keys.values()),
        dead_letters=_unique_dead_letters(write.dead_letters),
        held=list(letters.values()),
        holds=[h for h in write.holds if h.message_id or h.expected],
        released=list(dict.fromkeys(write.released)),
        xref=unique_entries(write.xref) if write.xref else (),
    )


def _unique_dead_letters(records: Sequence[DeadLetterRecord]) -> list[DeadLetterRecord]:
    merged: dict[str, DeadLetterRecord] = {}
    for record in records:
        seen = merged.get(record.message_id)
        if seen is not None:
            record = msgspec.structs.replace(
                record, attempts=seen.attempts + record.attempts
            )
        merged[record.message_id] = record
    return list(merged.values())


def written_outbox(
    ids: Iterable[int], records: Sequence[OutboxRecord]
) -> list[OutboxRow]:
    """The rows just inserted for *records*, given their ids in the same order.

    Delayed records are left out: their rows are not leased to the writer,
    and only the relay's poller may publish them, once due.
    """
    return [
        OutboxRow(
            id=row_id,
            message_id=r.message_id,
            exchange=r.exchange,
            routing_key=r.routing_key,
            body=r.body,
            correlation_id=r.correlation_id,
            type=r.type,
            headers=r.headers,
            attempts=1,
        )
        for row_id, r in zip(ids, records, strict=True)
        if r.delay_s <= 0
    ]


def saga_record(workflow: str, r: Row, *, when: Timestamp = _as_is) -> SagaRecord:
    """Decode ``correlation_id, version, state, updated_at``."""
    return SagaRecord(
        workflow=workflow,
        correlation_id=r[0],
        version=r[1],
        state=r[2],
        updated_at=when(r[3]),
    )


def outbox_row(r: Row) -> OutboxRow:
    """Decode an outbox row.

    Columns: ``id, message_id, exchange, routing_key, body, correlation_id,
    type, headers`` (JSON text), ``attempts``.
    """
    return OutboxRow(
        id=r[0],
        message_id=r[1],
        exchange=r[2],
        routing_key=r[3],
        body=r[4],
        correlation_id=r[5],
        type=r[6],
        headers=decode_headers(r[7]),
        attempts=r[8],
    )


def dead_letter_row(r: Row, *, when: Timestamp = _as_is) -> DeadLetterRow:
    """Decode a dead-letter row.

    Columns: ``id, message_id, queue, routing_key, reason, detail, body,
    headers`` (JSON text), ``attempts, correlation_id, type, status, replays,
    first_seen, last_seen, workflow``.
    """
    return DeadLetterRow(
        id=r[0],
        message_id=r[1],
        queue=r[2],
        routing_key=r[3],
        reason=r[4],
        detail=r[5],
        body=r[6],
        headers=decode_headers(r[7]),
        attempts=r[8],
        correlation_id=r[9],
        type=r[10],
        status=cast(DeadLetterStatus, r[11]),  # the CHECK constraint allows no other
        replays=r[12],
        first_seen=when(r[13]),
        last_seen=when(r[14]),
        workflow=r[15],
    )


def hold_row(r: Row, *, when: Timestamp = _as_is) -> HoldRow:
    """Decode a hold with its held count and its blocker's dead-letter status.

    Columns: ``workflow, correlation_id, message_id`` (the blocker), ``since,
    updated_at``, the number of held messages, the blocker's status (or NULL).
    """
    return HoldRow(
        workflow=r[0],
        correlation_id=r[1],
        blocker=r[2],
        since=when(r[3]),
        updated_at=when(r[4]),
        held=r[5],
        blocker_status=cast(DeadLetterStatus | None, r[6]),
    )


def releasable(workflow: str, correlation_id: str, found: Row | None) -> str:
    """The blocker of the hold that `Store.release_hold` is to hand on.

    *found* is the hold's ``message_id``, then its blocker's dead-letter
    ``status`` and ``id`` (NULL when the blocker is not a dead letter); None
    when the instance has no hold.

    Raises:
        HoldRefused: the instance is not held, or its blocker is a parked
            dead letter: releasing the hold would apply the held messages
            before it, so the operator replays or purges it instead.
    """
    instance = f"instance {correlation_id!r} of workflow {workflow!r}"
    if found is None:
        raise HoldRefused(f"{instance} is not held", reason="not_held")
    blocker: str = found[0]
    if found[1] == "parked":
        raise HoldRefused(
            f"{instance} waits on dead letter {found[2]} ({blocker}), which is "
            "parked: replay or purge that dead letter instead",
            reason="blocker_parked",
        )
    return blocker


def release_detail(workflow: str, blocker: str, promoted: str | None) -> str:
    """The journal detail of an operator's release of the hold of *blocker*."""
    released = f"an operator released the {workflow} hold of {blocker}"
    if promoted is None:
        return f"{released}: nothing was held"
    return f"{released}: sent back to its queue, it holds the rest now"


def pause_row(r: Row, *, when: Timestamp = _as_is) -> SystemPause:
    """Decode ``system, reason, paused_by, since, updated_at``."""
    return SystemPause(
        system=r[0],
        reason=r[1],
        paused_by=r[2],
        since=when(r[3]),
        updated_at=when(r[4]),
    )


def journal_row(r: Row, *, when: Timestamp = _as_is) -> JournalRow:
    """Decode ``id, at, message_id, correlation_id, stage, type, detail``."""
    return JournalRow(
        id=r[0],
        at=when(r[1]),
        message_id=r[2],
        correlation_id=r[3],
        stage=r[4],
        type=r[5],
        detail=r[6],
    )


def xref_entry(r: Row, *, when: Timestamp = _as_is) -> XrefEntry:
    """Decode ``kind, canonical_id, system, native_id, content_hash, updated_at``."""
    return XrefEntry(
        kind=r[0],
        canonical_id=r[1],
        system=r[2],
        native_id=r[3],
        content_hash=r[4],
        updated_at=when(r[5]),
    )
