"""The SQLite store's operator transactions on dead letters and holds.

Replaying parked dead letters (back to their queue through the outbox),
purging dead letters, and handing a hold on to its instance's next held
message when its blocker is gone (`sweep`, and `purge` for the holds it
frees) or an operator releases it (`release`). Each function is the body of
one transaction: `SqliteStore` runs it on a worker thread inside
``BEGIN IMMEDIATE`` ... ``COMMIT``.

Internal: not for use outside broker/store.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from broker.store import REPLAY_DROPS, REPLAY_HEADER, DeadLetterFilter
from broker.store import sqlite_sql as sql
from broker.store.rows import decode_headers, encode_json, releasable, release_detail

__all__ = ["filter_params", "replay", "purge", "sweep", "release"]


def filter_params(flt: DeadLetterFilter) -> dict[str, Any]:
    """The named parameters the dead-letter queries take for *flt*."""
    return {
        "n_ids": len(flt.ids),
        "ids": encode_json(flt.ids),
        "reason": flt.reason,
        "queue": flt.queue,
        "type": flt.type,
        "correlation_id": flt.correlation_id,
        "status": flt.status,
        "limit": flt.limit,
    }


def replay(
    conn: sqlite3.Connection,
    flt: DeadLetterFilter,
    *,
    max_replays: int,
    now: float,
    dry_run: bool,
) -> list[int]:
    """Queue matching parked dead letters to the outbox; return their ids (blocking).

    Each copy carries its replay count in ``x-q2c-replay``; a dry run only
    selects.
    """
    params = {**filter_params(flt), "max_replays": max_replays}
    ids = [r[0] for r in conn.execute(sql.REPLAYABLE, params)]
    if dry_run or not ids:
        return ids
    replayed = conn.execute(sql.REPLAY, {"ids": encode_json(ids)}).fetchall()
    conn.executemany(
        sql.ADD_OUTBOX,
        [
            (
                message_id,
                "",
                queue,
                body,
                correlation_id,
                type_,
                encode_json(_replayed_headers(headers, replays)),
                now,
                0,
                now,
                None,
            )
            for (
                _,
                message_id,
                queue,
                body,
                headers,
                replays,
                correlation_id,
                type_,
            ) in sorted(replayed)
        ],
    )
    return ids


def purge(
    conn: sqlite3.Connection, flt: DeadLetterFilter, *, now: float, dry_run: bool
) -> list[int]:
    """Mark matching dead letters purged; return their ids (blocking).

    Holds whose blocker is purged are handed on; a dry run only selects.
    """
    ids = [r[0] for r in conn.execute(sql.PURGEABLE, filter_params(flt))]
    if ids and not dry_run:
        purged = conn.execute(sql.PURGE, {"ids": encode_json(ids)}).fetchall()
        blockers = {"ids": encode_json([r[0] for r in purged])}
        for workflow, cid in conn.execute(sql.HOLDS_OF, blockers).fetchall():
            _promote(conn, workflow, cid, now)
    return ids


def sweep(conn: sqlite3.Connection, limit: int, now: float) -> int:
    """Hand on up to *limit* stuck holds of each kind; return how many (blocking).

    Stuck: a hold whose blocker was purged, or held messages of an instance
    that has no hold.
    """
    stuck = conn.execute(sql.PURGED_BLOCKERS, (limit,)).fetchall()
    stuck += conn.execute(sql.ORPHANED_HELD, (limit,)).fetchall()
    for workflow, cid in stuck:
        _promote(conn, workflow, cid, now)
    return len(stuck)


def release(
    conn: sqlite3.Connection, workflow: str, correlation_id: str, now: float
) -> str | None:
    """Hand one instance's hold on for an operator; return the new blocker (blocking).

    None: nothing was held, and the instance is free.

    Raises:
        HoldRefused: the instance is not held, or its blocker is parked.
    """
    found = conn.execute(sql.HOLD_BLOCKER, (workflow, correlation_id)).fetchone()
    blocker = releasable(workflow, correlation_id, found)
    promoted = _promote(conn, workflow, correlation_id, now)
    conn.execute(
        sql.RELEASE_JOURNAL,
        {
            "now": now,
            "message_id": promoted or blocker,
            "correlation_id": correlation_id,
            "detail": release_detail(workflow, blocker, promoted),
        },
    )
    return promoted


def _promote(
    conn: sqlite3.Connection, workflow: str, cid: str, now: float
) -> str | None:
    """Hand one instance's hold to its first held message, or clear it (blocking).

    Returns the new blocker, or None when nothing was held.
    """
    first = conn.execute(sql.FIRST_HELD, (workflow, cid)).fetchone()
    if first is None:
        conn.execute(sql.CLEAR_HOLD, (workflow, cid))
        return None
    row_id, message_id, queue, body, headers, correlation_id, type_ = first
    conn.execute(sql.MARK_RELEASED, (now, row_id))
    conn.execute(sql.PUT_HOLD, (workflow, cid, message_id, now, now))
    conn.execute(
        sql.ADD_OUTBOX,
        (
            message_id,
            "",
            queue,
            body,
            correlation_id,
            type_,
            encode_json({**decode_headers(headers), "x-q2c-released": 1}),
            now,
            0,
            now,
            None,
        ),
    )
    return str(message_id)


def _replayed_headers(stored: str, replays: int) -> dict[str, object]:
    """A dead letter's headers as its replayed copy carries them."""
    headers = {k: v for k, v in decode_headers(stored).items() if k not in REPLAY_DROPS}
    headers[REPLAY_HEADER] = replays
    return headers
