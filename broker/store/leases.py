"""Named locks held by lease, shared by every daemon on one store (migration 0009).

A row of ``lease_lock`` is a held lock: its key, the token of the one
holder, and the time its lease runs out. Taking a lock inserts the row, or
takes over one whose lease ran out (its holder died or hung); taking it
again with the holder's own token renews the lease; giving it back deletes
the row if the token is still the holder's. Rows whose lease ran
out an hour ago go when another lock is taken, so holders that died leave
nothing behind for long. `broker.keyed_lock.SharedKeyedLock` uses them.

Internal: not for use outside broker/store.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "LAPSED_KEPT_S",
    "PG_END",
    "PG_TAKE",
    "SQLITE_END",
    "SQLITE_FORGET",
    "SQLITE_HOLDER",
    "SQLITE_TAKE",
]

#: How long a lapsed lease's row stays before a later take deletes it.
LAPSED_KEPT_S: Final = 3600.0

PG_TAKE: Final = f"""
WITH forgotten AS (
    DELETE FROM lease_lock
     WHERE until < clock_timestamp() - interval '{int(LAPSED_KEPT_S)} seconds'
       AND key <> $1
)
INSERT INTO lease_lock AS l (key, owner, until)
VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))
ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, until = EXCLUDED.until
 WHERE l.until < clock_timestamp() OR l.owner = EXCLUDED.owner
RETURNING true
"""
PG_END: Final = "DELETE FROM lease_lock WHERE key = $1 AND owner = $2"

SQLITE_FORGET: Final = "DELETE FROM lease_lock WHERE until < :lapsed AND key <> :key"
SQLITE_TAKE: Final = """
INSERT INTO lease_lock (key, owner, until) VALUES (:key, :owner, :until)
ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, until = excluded.until
 WHERE lease_lock.until < :now OR lease_lock.owner = excluded.owner
"""
SQLITE_HOLDER: Final = "SELECT owner FROM lease_lock WHERE key = :key"
SQLITE_END: Final = "DELETE FROM lease_lock WHERE key = :key AND owner = :owner"
