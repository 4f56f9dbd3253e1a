"""The PostgreSQL store's connections: asyncpg's pool with a fast path in front.

asyncpg's pool costs a task and a shield per acquire and release (with a
timeout, `asyncio.wait_for`; on release, `asyncio.shield`): about a third of
a small batch's client time on the hot path. `Connections` therefore keeps a
connection whose call ended cleanly, outside a transaction, checked out in a
short LIFO list for the next call. Only one that failed, was cancelled or
closed, or that a caller waiting in the pool wants, goes back through the
pool. The list never hides a connection from such a caller, and holds at
most the pool's size, since it holds only connections already checked out.
A connection left unused in it for `IDLE_RETURN_S` goes back to the pool too,
whose own inactivity limit then closes it, so a burst's extra sessions do not
stay open for good.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final, TypeAlias, final

import anyio
import asyncpg
import structlog

from broker.config import PostgresConfig
from broker.errors import StoreUnavailable
from broker.store.postgres_errors import RETRYABLE, connection_errors, store_errors

__all__ = ["IDLE_RETURN_S", "Connections", "Conn", "Pool", "PoolConnection"]

#: Seconds a connection may stay checked out unused before it goes back to
#: the pool (whose inactivity limit, 300 s by default, then closes it).
IDLE_RETURN_S: Final = 60.0

_log = structlog.get_logger(__name__)

# asyncpg's classes are generic only in the stubs: keep the aliases as strings.
Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"


class PoolConnection(asyncpg.Connection):
    """A pooled connection returned to the pool without a reset query.

    asyncpg's default release runs ``RESET ALL; CLOSE ALL; UNLISTEN *;
    SELECT pg_advisory_unlock_all()``: one more round trip after every
    statement, twice per batch on the hot path. The store leaves no session
    state behind (no LISTEN, no cursors, only transaction-scoped locks and
    ``SET LOCAL``), and asyncpg still rolls back an open transaction on
    release, so there is nothing to reset.
    """

    def get_reset_query(self) -> str:
        """Nothing to reset (see the class docstring)."""
        return ""


def _reusable(conn: Conn) -> bool:
    """Whether *conn* may serve another call as it is: open, no transaction.

    A pooled connection that closes while checked out is detached from its
    proxy by asyncpg (its holder goes back to the pool), and the proxy then
    raises `InterfaceError` on every call.
    """
    try:
        return not conn.is_closed() and not conn.is_in_transaction()
    except asyncpg.exceptions.InterfaceError:
        return False


@final
class Connections:
    """One call's connection at a time: `connection`, then `aclose` once."""

    def __init__(
        self,
        pool: Pool,
        cfg: PostgresConfig,
        *,
        idle_return_s: float = IDLE_RETURN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._cfg = cfg
        self._idle_return_s = idle_return_s
        self._clock = clock
        # Checked out of the pool and idle, with the time each was last used,
        # the most recently used last.
        self._idle: list[tuple[Conn, float]] = []
        # Callers waiting in the pool's own acquire: while any wait, a
        # connection freed goes back to the pool, where they can get it.
        self._waiting = 0
        self._closing = False

    @property
    def in_use(self) -> int:
        """Connections serving a call now."""
        return self._pool.get_size() - self._pool.get_idle_size() - len(self._idle)

    @property
    def kept(self) -> int:
        """Connections checked out and idle, waiting for the next call."""
        return len(self._idle)

    @property
    def max_size(self) -> int:
        """The pool's size limit."""
        return self._pool.get_max_size()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        """A connection for one call: the last one idle, else from the pool.

        Raises:
            StoreUnavailable: none came within the acquire timeout, the
                database failed the call in a way worth retrying, or the
                store is closed (the daemon is stopping).
        """
        self._check_open()
        conn = await self._take_idle()
        if conn is None:
            self._waiting += 1
            try:
                with store_errors():
                    conn = await self._pool.acquire(timeout=self._cfg.acquire_timeout_s)
            finally:
                self._waiting -= 1
        try:
            with connection_errors(conn):
                yield conn
        except StoreUnavailable as exc:
            if isinstance(
                exc.__cause__, asyncpg.exceptions.ReadOnlySQLTransactionError
            ):
                # The server we are connected to was demoted (a failover that
                # kept the old sessions, a fence): these connections will
                # never write again; new ones find the primary.
                await self._replace_all(conn)
            else:
                await self._release(conn)
            raise
        except BaseException:
            await self._release(conn)
            raise
        if self._waiting or self._closing or not _reusable(conn):
            await self._release(conn)
            return
        now = self._clock()
        self._idle.append((conn, now))
        # The least recently used is first: return it if a burst left it over.
        if self._idle[0][1] < now - self._idle_return_s:
            await self._release(self._idle.pop(0)[0])

    async def _replace_all(self, conn: Conn) -> None:
        """Drop *conn* and every other connection: the next calls connect anew."""
        _log.warning(
            "postgres_read_only",
            hint="the server no longer takes writes (demoted primary?); "
            "reconnecting every connection",
        )
        with anyio.move_on_after(self._cfg.command_timeout_s, shield=True):
            await self._pool.expire_connections()
            conn.terminate()
            await self._release(conn)
            while self._idle:
                await self._release(self._idle.pop()[0])

    def _check_open(self) -> None:
        if self._closing:
            raise StoreUnavailable("postgres store is closed")

    async def aclose(self) -> None:
        """Close the pool: wait for connections in use, up to the command timeout."""
        self._closing = True  # calls still running return theirs to the pool
        with anyio.move_on_after(self._cfg.command_timeout_s, shield=True) as scope:
            while self._idle:
                await self._release(self._idle.pop()[0])
            await self._pool.close()
        if scope.cancelled_caught:
            self._pool.terminate()
            _log.warning("pool_terminated", reason="close timed out")

    async def _take_idle(self) -> Conn | None:
        while self._idle:
            conn = self._idle.pop()[0]
            if _reusable(conn):
                return conn
            # Closed while idle (the server went away): asyncpg has already
            # handed its holder back to the pool, which reconnects on the
            # next acquire; releasing the proxy again is a no-op.
            await self._release(conn)
        return None

    async def _release(self, conn: Conn) -> None:
        # Shielded so a cancelled caller still returns its connection; asyncpg
        # rolls back an open transaction on release, or terminates the connection.
        with anyio.move_on_after(self._cfg.command_timeout_s, shield=True):
            try:
                await self._pool.release(conn)
            except (
                asyncpg.exceptions.PostgresError,
                asyncpg.exceptions.InterfaceError,
                *RETRYABLE,
            ) as exc:
                _log.warning("connection_release_failed", error=repr(exc))
