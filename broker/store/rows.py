"""Rows in and out of the stores: what PostgreSQL and SQLite share.

Both stores select their rows with the same columns in the same order, so
one decoder per row type serves both; only time stamps differ (``datetime``
from asyncpg, seconds since the epoch in SQLite), and a store that needs it
passes its own converter as *when*. `normalized` applies, before either
store writes a `BatchWrite`, the rules both must follow.

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
    InboxKey,
    JournalRow,
    OutboxRecord,
    OutboxRow,
    SagaRecord,
)

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
    "journal_row",
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
    """*write* with one inbox key per key and one dead letter per message id.

    A key repeated in a batch is claimed once (its first occurrence); dead
    letters for the same message id merge into the last one, their attempts
    added up (an upsert may not touch a row twice).

    Raises:
        ValueError: one instance appears twice in ``write.sagas``, a caller bug.
    """
    ids = [w.correlation_id for w in write.sagas]
    if len(set(ids)) != len(ids):
        raise ValueError(f"saga {write.workflow}: one write per instance per batch")
    keys: dict[str, InboxKey] = {}
    for k in write.keys:
        keys.setdefault(k.key, k)
    return msgspec.structs.replace(
        write,
        keys=list(keys.values()),
        dead_letters=_unique_dead_letters(write.dead_letters),
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
    """The rows just inserted for *records*, given their ids in the same order."""
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
    first_seen, last_seen``.
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
