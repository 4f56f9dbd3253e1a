"""The SQLite store's batch write: one `BatchWrite` in one transaction.

`write_batch` applies what `SqliteStore.commit_batch` hands it, statement by
statement, inside the caller's ``BEGIN IMMEDIATE`` transaction: the write
lock is held from the first check to the last insert, so versions, holds and
claims read here cannot change underneath. Any check that fails raises
`ConcurrencyConflict` and the caller rolls back. `put_xref` also serves
`SqliteStore.xref_put`, in a transaction of its own.

Everything here blocks and runs on a worker thread.

Internal: not for use outside broker/store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from broker.errors import ConcurrencyConflict
from broker.store import (
    BatchWrite,
    DeadLetterRecord,
    HoldWrite,
    OutboxRecord,
    OutboxRow,
    XrefConflict,
    XrefEntry,
)
from broker.store import sqlite_sql as sql
from broker.store.rows import encode_json, written_outbox

__all__ = ["write_batch", "put_xref"]


def write_batch(
    conn: sqlite3.Connection, write: BatchWrite, *, now: float, lease_s: float
) -> list[OutboxRow]:
    """Apply a `normalized` *write* inside the caller's transaction (blocking).

    A key already claimed, an instance at another version, a hold at
    another blocker or a released message no longer held raises
    `ConcurrencyConflict`; the caller rolls back, so nothing is written.
    """
    _claim(conn, write, now)
    _save_sagas(conn, write, now)
    _write_holds(conn, write.workflow, write.holds, now)
    _release(conn, write, now)
    conn.executemany(
        sql.ADD_DEAD_LETTER,
        [
            (
                r.message_id,
                r.queue,
                r.routing_key,
                r.reason,
                r.detail,
                r.body,
                encode_json(r.headers),
                r.attempts,
                r.correlation_id,
                r.type,
                now,
                now,
            )
            for r in write.dead_letters
        ],
    )
    _add_held(conn, write.workflow, write.held, now)
    conn.executemany(
        sql.ADD_JOURNAL,
        [
            (now, r.message_id, r.correlation_id, r.stage, r.type, r.detail)
            for r in write.journal
        ],
    )
    put_xref(conn, write.xref, now)
    return _add_outbox(conn, write.outbox, now, now + lease_s)


def _claim(conn: sqlite3.Connection, write: BatchWrite, now: float) -> None:
    if not write.keys:
        return
    keys = [(k.key, k.day.isoformat(), k.message_id) for k in write.keys]
    params = {"consumer": write.consumer, "keys": encode_json(keys), "now": now}
    claimed = conn.execute(sql.CLAIM, params).rowcount
    if claimed != len(keys):
        raise ConcurrencyConflict(
            f"{len(keys) - claimed} of {len(keys)} idempotency keys of "
            f"{write.consumer} were claimed concurrently"
        )


def _save_sagas(conn: sqlite3.Connection, write: BatchWrite, now: float) -> None:
    if not write.sagas:
        return
    workflow = write.workflow
    ids = encode_json([w.correlation_id for w in write.sagas])
    # This transaction holds the write lock: versions read here cannot change
    # before the writes below.
    current = {
        r[0]: r[1]
        for r in conn.execute(sql.LOAD_SAGAS, {"workflow": workflow, "ids": ids})
    }
    conflicts = sorted(
        w.correlation_id
        for w in write.sagas
        if current.get(w.correlation_id, 0) != w.expected_version
    )
    if conflicts:
        raise ConcurrencyConflict(
            f"{len(conflicts)} of {len(write.sagas)} {workflow} instances changed "
            f"since they were read, e.g. {conflicts[:5]}"
        )
    conn.executemany(
        sql.CREATE_SAGA,
        [
            (workflow, w.correlation_id, w.state, now)
            for w in write.sagas
            if w.expected_version == 0
        ],
    )
    conn.executemany(
        sql.UPDATE_SAGA,
        [
            (w.state, now, workflow, w.correlation_id)
            for w in write.sagas
            if w.expected_version != 0
        ],
    )


def _write_holds(
    conn: sqlite3.Connection, workflow: str, holds: Sequence[HoldWrite], now: float
) -> None:
    if not holds:
        return
    changed = 0
    for h in holds:
        if h.expected is None and h.message_id is not None:
            cursor = conn.execute(
                sql.CREATE_HOLD, (workflow, h.correlation_id, h.message_id, now, now)
            )
        elif h.expected is not None and h.message_id is not None:
            cursor = conn.execute(
                sql.MOVE_HOLD,
                (h.message_id, now, workflow, h.correlation_id, h.expected),
            )
        elif h.expected is not None:
            cursor = conn.execute(
                sql.DELETE_HOLD, (workflow, h.correlation_id, h.expected)
            )
        else:
            continue
        changed += cursor.rowcount
    if changed != len(holds):
        raise ConcurrencyConflict(
            f"{len(holds) - changed} of {len(holds)} {workflow} holds changed "
            "since they were read"
        )


def _release(conn: sqlite3.Connection, write: BatchWrite, now: float) -> None:
    if not write.released:
        return
    params = {"ids": encode_json(list(write.released)), "now": now}
    released = conn.execute(sql.RELEASE, params).rowcount
    if released != len(write.released):
        raise ConcurrencyConflict(
            f"{len(write.released) - released} of {len(write.released)} held "
            f"messages of {write.workflow} were released concurrently"
        )


def _add_held(
    conn: sqlite3.Connection,
    workflow: str,
    held: Sequence[DeadLetterRecord],
    now: float,
) -> None:
    if not held:
        return
    row = conn.execute(sql.HELD_SEQ).fetchone()
    first = (row[0] if row else 0) + 1
    conn.executemany(
        sql.ADD_HELD,
        [
            (
                r.message_id,
                r.queue,
                r.routing_key,
                r.detail,
                r.body,
                encode_json(r.headers),
                r.attempts,
                r.correlation_id,
                r.type,
                workflow,
                first + n,
                now,
                now,
            )
            for n, r in enumerate(held)
        ],
    )


def put_xref(
    conn: sqlite3.Connection, entries: Sequence[XrefEntry], now: float
) -> None:
    """Upsert *entries* (unique per key) after checking no native id changes hands."""
    for e in entries:
        bound = conn.execute(sql.XREF_BOUND, (e.kind, e.system, e.native_id)).fetchone()
        if bound is not None and bound[0] != e.canonical_id:
            raise XrefConflict(
                kind=e.kind,
                system=e.system,
                native_id=e.native_id,
                bound_to=bound[0],
                wanted=e.canonical_id,
            )
    conn.executemany(
        sql.XREF_PUT,
        [
            (e.kind, e.canonical_id, e.system, e.native_id, e.content_hash, now)
            for e in entries
        ],
    )


def _add_outbox(
    conn: sqlite3.Connection,
    records: Sequence[OutboxRecord],
    now: float,
    lease_until: float,
) -> list[OutboxRow]:
    if not records:
        return []
    # AUTOINCREMENT under the write lock: the new ids are seq+1 ... seq+n.
    before = conn.execute(sql.OUTBOX_SEQ).fetchone()
    first = (before[0] if before else 0) + 1
    conn.executemany(
        sql.ADD_OUTBOX,
        [
            (
                r.message_id,
                r.exchange,
                r.routing_key,
                r.body,
                r.correlation_id,
                r.type,
                encode_json(r.headers),
                now,
                *(
                    (0, now + r.delay_s, None)
                    if r.delay_s > 0
                    else (1, now, lease_until)
                ),
            )
            for r in records
        ],
    )
    after = conn.execute(sql.OUTBOX_SEQ).fetchone()
    if after is None or after[0] != first + len(records) - 1:
        raise RuntimeError("outbox ids were not allocated consecutively")
    return written_outbox(range(first, first + len(records)), records)
