"""The memory transport's queues on disk, so that a restart delivers them again.

`QueueJournal` keeps every message a `MemoryTransport` holds in one SQLite
file, one row per message per queue, and hands them back when the transport
opens again. With it the embedded mode keeps what RabbitMQ keeps: a message
confirmed to its publisher survives the daemon stopping or dying.

When a change reaches the disk (`sync`, one transaction for everything
recorded since the last one):

* a publish is confirmed only after its rows are written, as RabbitMQ
  confirms only what it stored;
* a consumer writes before it takes deliveries and before it waits: the
  deliveries it is about to take are marked delivered, and the
  acknowledgements, redeliveries and dead-letter moves since the last write
  go with them. A process that dies before a write delivers those messages
  once more after the restart, as RabbitMQ redelivers an unacknowledged
  message; the inbox makes the second delivery cause nothing.

A message that was delivered and not acknowledged when the process died
comes back redelivered, its ``x-delivery-count`` one higher, so a message
that kills the daemon reaches the queue's delivery limit and is dead-lettered
instead of looping.

Changes are kept per message, not as a log: a message published and
acknowledged between two writes is never written, and the file holds only
what is queued. TTL due times are stored as wall-clock times, so a retry
waits out the rest of its tier across a restart.

The file is opened in exclusive locking mode: a second process on the same
journal fails at start instead of delivering the same messages twice. Writes
use WAL with ``synchronous = FULL`` by default, as the SQLite store does: a
write is on disk when it returns, so a confirmed publish survives the machine
losing power. ``normal`` (``[memory] synchronous``) survives the process
dying only.

Internal: not for use outside broker/transport.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final, NamedTuple

import anyio
import anyio.to_thread
import msgspec

from broker.config import Synchronous
from broker.errors import ConfigError, StoreUnavailable
from broker.store.sqlite_connection import set_synchronous, sqlite_errors
from broker.transport.vhost import Entry, Message

__all__ = ["JournalRow", "QueueJournal"]

#: What a message's pending change is: first written, its state changed, gone.
_NEW: Final = 0
_META: Final = 1
_GONE: Final = 2

#: How long opening waits for a lock another process holds.
_OPEN_BUSY_TIMEOUT_S: Final = 1.0
_SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS queued (
    id INTEGER PRIMARY KEY,       -- the order messages were queued in
    queue TEXT NOT NULL,
    parked INTEGER NOT NULL,      -- a dead letter its target did not take yet
    delivered INTEGER NOT NULL,   -- handed to a consumer, not settled
    delivery_count INTEGER NOT NULL,
    redelivered INTEGER NOT NULL,
    due REAL,                     -- wall-clock seconds; NULL: no TTL
    message BLOB NOT NULL         -- msgpack of broker.transport.vhost.Message
)
"""
_INSERT: Final = "INSERT OR REPLACE INTO queued VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_UPDATE: Final = (
    "UPDATE queued SET queue = ?, parked = ?, delivered = ?, delivery_count = ?,"
    " redelivered = ?, due = ? WHERE id = ?"
)
_DELETE: Final = "DELETE FROM queued WHERE id = ?"
_LOAD: Final = (
    "SELECT id, queue, parked, delivered, delivery_count, redelivered, due, message"
    " FROM queued ORDER BY id"
)

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Message).decode

# kind, entry, queue name, parked, the message encoded (for _NEW)
_Pending = tuple[int, Entry, str, bool, bytes]
_Rows = tuple[list[tuple[object, ...]], list[tuple[object, ...]], list[tuple[int]]]


class JournalRow(NamedTuple):
    """One queued message as the journal holds it."""

    id: int
    queue: str
    parked: bool
    delivered: bool
    delivery_count: int
    redelivered: bool
    #: wall-clock seconds, or ``None``: no TTL
    due: float | None
    message: Message


class QueueJournal:
    """The queued messages of one `MemoryTransport`, in the SQLite file *path*.

    Open it with `QueueJournal.open`; the transport records each change of a
    message (`added`, `changed`, `removed`) and calls `sync` to write them.

    Args:
        conn: the open, locked connection.
        path: the file, for messages.
        next_id: the id the next message gets.
        clock: the transport's monotonic clock, to turn due times into
            wall-clock times.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: str,
        *,
        next_id: int,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._conn = conn
        self._clock = clock
        self._next_id = next_id
        self._pending: dict[int, _Pending] = {}
        self._recorded = 0  # changes recorded, ever
        self._written = 0  # of those, how many are on disk
        self._lock = anyio.Lock()
        self._closed = False
        #: Transactions written, for ``brokerctl status`` and the tests.
        self.writes = 0

    def __repr__(self) -> str:
        return f"<QueueJournal {self.path!r} {len(self._pending)} pending>"

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        synchronous: Synchronous = "full",
    ) -> tuple[QueueJournal, list[JournalRow]]:
        """Open (or create) the journal at *path*; return it and what it holds.

        Raises:
            ConfigError: another process has the journal open, or the file is
                not a journal this version can read.
            StoreUnavailable: the file cannot be opened or read.
        """

        def opened() -> tuple[sqlite3.Connection, list[JournalRow]]:
            with _open_errors(path):
                conn = _connect(path, synchronous)
                try:
                    return conn, _load(conn, path)
                except BaseException:
                    conn.close()
                    raise

        conn, rows = await anyio.to_thread.run_sync(opened)
        next_id = rows[-1].id + 1 if rows else 1
        return cls(conn, path, next_id=next_id, clock=clock), rows

    @property
    def pending(self) -> bool:
        """Whether changes wait for the next `sync`."""
        return self._recorded != self._written

    def new_id(self) -> int:
        """The id of a message about to be queued."""
        entry_id = self._next_id
        self._next_id += 1
        return entry_id

    @staticmethod
    def encode(message: Message) -> bytes:
        """*message* as the journal stores it.

        Raises:
            ValueError: it cannot be stored (e.g. a header integer beyond
                64 bits).
        """
        try:
            return _encode(message)
        except (msgspec.EncodeError, OverflowError, TypeError) as exc:
            raise ValueError(f"the queue journal cannot store it: {exc}") from None

    def added(
        self,
        entry: Entry,
        queue: str,
        *,
        parked: bool = False,
        encoded: bytes | None = None,
    ) -> None:
        """Record that *entry* (with an id from `new_id`) is now in *queue*.

        *encoded* is `encode` of its message, when the caller has it already.

        Raises:
            ValueError: the message cannot be stored; nothing was recorded.
        """
        blob = self.encode(entry.message) if encoded is None else encoded
        self._record(entry.id, (_NEW, entry, queue, parked, blob))

    def changed(self, entry: Entry, queue: str, *, parked: bool = False) -> None:
        """Record that *entry*'s delivery state or due time changed."""
        self._record(entry.id, (_META, entry, queue, parked, b""))

    def removed(self, entry: Entry) -> None:
        """Record that *entry* left its queue (acknowledged, dropped or moved)."""
        self._record(entry.id, (_GONE, entry, "", False, b""))

    async def sync(self) -> None:
        """Write every change recorded before this call, in one transaction.

        Calls that meet share one write. If the write fails, its changes wait
        for the next one.

        Raises:
            StoreUnavailable: the write failed (disk full, I/O error, closed).
        """
        wanted = self._recorded
        async with self._lock:
            if self._written >= wanted:
                return
            if self._closed:
                raise StoreUnavailable(f"the queue journal {self.path} is closed")
            batch, self._pending = self._pending, {}
            recorded = self._recorded
            done = False

            def write() -> None:
                nonlocal done
                with _journal_errors(self.path):
                    _write(self._conn, rows)
                done = True

            try:
                rows = self._rows(batch)
                await anyio.to_thread.run_sync(write)
            finally:
                if done:
                    self._written = recorded
                    self.writes += 1
                else:
                    self._restore(batch)

    async def aclose(self) -> None:
        """Write what is pending, then close the file; later syncs fail.

        Shielded: a cancelled close still writes, closes and lets go of the
        file's lock.
        """
        with anyio.CancelScope(shield=True):
            try:
                await self.sync()
            finally:
                async with self._lock:
                    if not self._closed:
                        self._closed = True
                        await anyio.to_thread.run_sync(self._conn.close)

    def _record(self, entry_id: int, change: _Pending) -> None:
        self._recorded += 1
        earlier = self._pending.get(entry_id)
        if earlier is None:
            self._pending[entry_id] = change
        else:
            merged = _merge(earlier, change)
            if merged is None:
                del self._pending[entry_id]
            else:
                self._pending[entry_id] = merged

    def _restore(self, failed: dict[int, _Pending]) -> None:
        """Put the changes of a failed write back, under those recorded since."""
        for entry_id, earlier in failed.items():
            later = self._pending.get(entry_id)
            merged = earlier if later is None else _merge(earlier, later)
            if merged is None:
                self._pending.pop(entry_id, None)
            else:
                self._pending[entry_id] = merged

    def _rows(self, batch: dict[int, _Pending]) -> _Rows:
        """The statements' parameters, read now, on the event loop's thread."""
        now, wall = self._clock(), time.time()
        inserts: list[tuple[object, ...]] = []
        updates: list[tuple[object, ...]] = []
        deletes: list[tuple[int]] = []
        for entry_id, (kind, entry, queue, parked, blob) in batch.items():
            if kind == _GONE:
                deletes.append((entry_id,))
                continue
            due = None if math.isinf(entry.due) else wall + (entry.due - now)
            state = (
                queue,
                parked,
                entry.delivered,
                entry.delivery_count,
                entry.redelivered,
                due,
            )
            if kind == _NEW:
                inserts.append((entry_id, *state, blob))
            else:
                updates.append((*state, entry_id))
        return inserts, updates, deletes


def _merge(earlier: _Pending, later: _Pending) -> _Pending | None:
    """One pending change for two in a row; ``None``: nothing to write."""
    if later[0] == _GONE:
        # Never written: nothing to delete either.
        return None if earlier[0] == _NEW else later
    if earlier[0] == _NEW:
        return (_NEW, *later[1:4], earlier[4])
    return later


@contextmanager
def _journal_errors(path: str) -> Iterator[None]:
    """Every failure to write is `StoreUnavailable`: not written, try again.

    Whatever SQLite says (busy, I/O, read-only, corrupt), the changes stay
    pending and the transport confirms nothing that was not written.
    """
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        raise StoreUnavailable(f"queue journal {path}: {exc}") from exc


@contextmanager
def _open_errors(path: str) -> Iterator[None]:
    """Busy and I/O failures: `StoreUnavailable`; a file that is no journal: config."""
    try:
        with sqlite_errors():
            yield
    except sqlite3.DatabaseError as exc:
        raise ConfigError(
            f"[memory] journal: {path} is not a queue journal SQLite can read: {exc}"
        ) from None


def _connect(path: str, synchronous: Synchronous) -> sqlite3.Connection:
    """Open, lock and create the journal (blocking)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        path,
        timeout=_OPEN_BUSY_TIMEOUT_S,
        isolation_level=None,
        check_same_thread=False,  # worker threads take turns, under the lock
    )
    try:
        _prepare(conn, path, synchronous)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: str, synchronous: Synchronous) -> None:
    # Exclusive before WAL: the lock is taken by the first write and held
    # until the connection closes, and the WAL index stays in memory.
    conn.execute("PRAGMA locking_mode = EXCLUSIVE")
    _begin_alone(conn, path)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, _SCHEMA_VERSION):
        conn.execute("ROLLBACK")
        raise ConfigError(
            f"[memory] journal: {path} has format {version};"
            f" this version reads format {_SCHEMA_VERSION}"
        )
    conn.execute(_SCHEMA)
    conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
    conn.execute("COMMIT")
    set_synchronous(conn, synchronous)


def _begin_alone(conn: sqlite3.Connection, path: str) -> None:
    """Switch to WAL and begin the first write: the file is ours from here."""
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == sqlite3.SQLITE_BUSY:
            raise ConfigError(
                f"[memory] journal: {path} is in use by another process"
                " (two daemons cannot share the embedded queues)"
            ) from None
        raise


def _load(conn: sqlite3.Connection, path: str) -> list[JournalRow]:
    """Every queued message, in the order it was queued (blocking)."""
    rows = []
    for (
        entry_id,
        queue,
        parked,
        delivered,
        count,
        redelivered,
        due,
        blob,
    ) in conn.execute(_LOAD):
        try:
            message = _decode(blob)
        except msgspec.DecodeError as exc:
            raise ConfigError(
                f"[memory] journal: {path}: message {entry_id} is unreadable: {exc}"
            ) from None
        rows.append(
            JournalRow(
                entry_id,
                queue,
                bool(parked),
                bool(delivered),
                count,
                bool(redelivered),
                due,
                message,
            )
        )
    return rows


def _write(conn: sqlite3.Connection, rows: _Rows) -> None:
    """Apply one sync's changes in one transaction (blocking)."""
    inserts, updates, deletes = rows
    conn.execute("BEGIN IMMEDIATE")
    try:
        if deletes:
            conn.executemany(_DELETE, deletes)
        if inserts:
            conn.executemany(_INSERT, inserts)
        if updates:
            conn.executemany(_UPDATE, updates)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
