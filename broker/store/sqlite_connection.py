"""The SQLite store's one connection: opening it, its failures, its transactions.

`connect` opens and tunes the connection (WAL on disk, ``synchronous`` as
configured, a busy timeout);
`sqlite_errors()` is the only place that decides which sqlite3 failures mean
"try again later"; `in_transaction` runs blocking work inside ``BEGIN
IMMEDIATE`` ... ``COMMIT``. All of it blocks: `broker.store.sqlite` calls it
on a worker thread, one call at a time.

Internal: not for use outside broker/store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TypeVar

from broker.config import Synchronous
from broker.errors import StoreUnavailable

__all__ = ["sqlite_errors", "connect", "in_transaction", "set_synchronous"]

_T = TypeVar("_T")

#: ``PRAGMA synchronous`` levels by their configured names.
_SYNCHRONOUS: Final = {"full": 2, "normal": 1}

#: Primary result codes that mean "try again later": busy, locked, I/O, full.
_RETRYABLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
    }
)


@contextmanager
def sqlite_errors() -> Iterator[None]:
    """Re-raise "busy", "locked" and I/O failures as `StoreUnavailable`, chained.

    Other sqlite3 errors (no such table, constraint failures) are bugs and
    pass through unchanged.
    """
    try:
        yield
    except sqlite3.OperationalError as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in _RETRYABLE_CODES:
            raise StoreUnavailable(f"sqlite unavailable: {exc}") from exc
        raise
    except OSError as exc:
        raise StoreUnavailable(f"sqlite unavailable: {exc}") from exc


def connect(
    path: str, busy_timeout_s: float, synchronous: Synchronous = "full"
) -> sqlite3.Connection:
    """Open and tune the connection (blocking: runs on a worker thread)."""
    on_disk = path != ":memory:" and not path.startswith("file:")
    if on_disk:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        timeout=busy_timeout_s,
        isolation_level=None,  # we issue BEGIN/COMMIT ourselves
        check_same_thread=False,  # worker threads take turns, under the store's lock
        uri=path.startswith("file:"),
    )
    try:
        if on_disk:
            conn.execute("PRAGMA journal_mode = WAL")
        set_synchronous(conn, synchronous)
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn


def set_synchronous(conn: sqlite3.Connection, synchronous: Synchronous) -> None:
    """``PRAGMA synchronous``: ``full`` survives a power loss, ``normal`` a crash."""
    conn.execute(f"PRAGMA synchronous = {_SYNCHRONOUS[synchronous]}")


def in_transaction(conn: sqlite3.Connection, fn: Callable[[], _T]) -> _T:
    """Run *fn* inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (blocking).

    Any exception, cancellation included, rolls the transaction back and
    propagates.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result
