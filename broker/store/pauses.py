"""Paused systems: what an operator's ``brokerctl pause`` leaves in the store.

A row of ``system_pause`` (migration 0005) says that no daemon's system
actor may take new commands for that system; deleting it resumes them.
Every daemon sharing the store polls the table (`broker.gateway`), so a
pause reaches them all. Both stores run the SQL texts here, each in its own
placeholder style, and decode rows with `broker.store.rows.pause_row`.

Internal, apart from `SystemPause`, which `broker.store` exports.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec

__all__ = [
    "SystemPause",
    "PG_PAUSE",
    "PG_RESUME",
    "PG_PAUSES",
    "SQLITE_PAUSE",
    "SQLITE_RESUME",
    "SQLITE_PAUSES",
]


class SystemPause(msgspec.Struct, frozen=True, kw_only=True):
    """One paused system: why, by whom, since when.

    ``since`` is when the pause began; pausing a paused system again keeps
    it and changes ``reason``, ``paused_by`` and ``updated_at``.
    """

    system: str
    reason: str
    paused_by: str
    since: datetime
    updated_at: datetime


#: The columns `broker.store.rows.pause_row` decodes, in its order.
_COLUMNS = "system, reason, paused_by, since, updated_at"

PG_PAUSE: Final = f"""
INSERT INTO system_pause (system, reason, paused_by) VALUES ($1, $2, $3)
ON CONFLICT (system) DO UPDATE
    SET reason = excluded.reason, paused_by = excluded.paused_by, updated_at = now()
RETURNING {_COLUMNS}
"""

PG_RESUME: Final = f"DELETE FROM system_pause WHERE system = $1 RETURNING {_COLUMNS}"

PG_PAUSES: Final = f"SELECT {_COLUMNS} FROM system_pause ORDER BY system"

SQLITE_PAUSE: Final = f"""
INSERT INTO system_pause (system, reason, paused_by, since, updated_at)
VALUES (:system, :reason, :paused_by, :now, :now)
ON CONFLICT (system) DO UPDATE
    SET reason = excluded.reason, paused_by = excluded.paused_by,
        updated_at = excluded.updated_at
RETURNING {_COLUMNS}
"""

SQLITE_RESUME: Final = (
    f"DELETE FROM system_pause WHERE system = :system RETURNING {_COLUMNS}"
)

SQLITE_PAUSES: Final = PG_PAUSES
