"""How PostgreSQL failures reach the rest of the store: four translations.

`store_errors()` turns every "try again later" failure of the driver
(connection lost or refused, serialization failure or deadlock, timeouts,
a demoted primary) into `StoreUnavailable`, with the driver's exception
chained as the cause; SQL errors and misuse pass through as the bugs they
are. `connection_errors()` adds the one case that depends on the connection:
an `InterfaceError` on a connection whose backend died. `commit_errors()`
turns the commit function's own SQLSTATEs into `ConcurrencyConflict` and
`XrefConflict`. `grants_needed()` turns a refused privilege, an operator's
fix, into a `ConfigError` that says which grant is missing.

This module, `broker.store.postgres` and `broker.store.migrate` are the only
places that know asyncpg's exception classes. Internal: not for use outside
broker/store.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, TypeAlias

import asyncpg
import msgspec

from broker.errors import ConcurrencyConflict, ConfigError, StoreUnavailable
from broker.store import XrefConflict

__all__ = [
    "RETRYABLE",
    "commit_errors",
    "connection_errors",
    "grants_needed",
    "store_errors",
]

# asyncpg's classes are generic only in the stubs: keep the alias a string.
_Conn: TypeAlias = "asyncpg.pool.PoolConnectionProxy[asyncpg.Record]"

RETRYABLE: Final = (
    asyncpg.exceptions.PostgresConnectionError,  # connection lost or refused
    asyncpg.exceptions.TransactionRollbackError,  # serialization failure, deadlock
    asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    asyncpg.exceptions.OperatorInterventionError,  # admin shutdown, statement timeout
    asyncpg.exceptions.LockNotAvailableError,  # lock_timeout (partition maintenance)
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a demoted primary
    # What asyncpg raises on a pooled connection whose backend was killed while
    # idle ("cannot switch to state ..."; MagicStack/asyncpg#784). Verified.
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,  # command_timeout or pool acquire timeout
)


@contextmanager
def store_errors() -> Iterator[None]:
    """Re-raise driver failures as `StoreUnavailable`, keeping the cause chained.

    SQL errors and misuse of the driver are bugs and pass through unchanged.
    """
    try:
        yield
    except RETRYABLE as exc:
        raise StoreUnavailable(
            f"postgres unavailable: {type(exc).__name__}: {exc}"
        ) from exc


@contextmanager
def grants_needed(what: str, fix: str) -> Iterator[None]:
    """Re-raise a refused privilege while doing *what* as a `ConfigError` with *fix*."""
    try:
        yield
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        raise ConfigError(f"postgres refused {what}: {exc}. {fix}") from exc


@contextmanager
def connection_errors(conn: _Conn) -> Iterator[None]:
    """`store_errors()`, and an `InterfaceError` on a dead connection is an outage too.

    When a pooled connection's backend dies, asyncpg detaches it and later
    calls fail with "connection is closed" or "released back to the pool";
    on a live connection the same class means a bug, and passes through.
    """
    try:
        with store_errors():
            yield
    except asyncpg.exceptions.InterfaceError as exc:
        if not _lost(conn):
            raise
        raise StoreUnavailable(f"postgres unavailable: connection lost: {exc}") from exc


def _lost(conn: _Conn) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.exceptions.InterfaceError:
        return True  # detached: the pool took it back when the connection died


#: SQLSTATEs q2c_commit_batch raises when another writer got there first.
_CONFLICTS: Final = frozenset({"QC001", "QC002"})

#: SQLSTATE q2c_xref_put raises for a native id bound to another canonical id.
_XREF_CONFLICT: Final = "QC003"


class _XrefDetail(msgspec.Struct, frozen=True):
    kind: str
    system: str
    native_id: str
    bound_to: str
    wanted: str


@contextmanager
def commit_errors() -> Iterator[None]:
    """Turn the commit function's own SQLSTATEs into the errors they mean.

    A unique violation of ``xref_native`` is a concurrent writer binding the
    same native id: a conflict, so the write is read and tried again, and
    then reports `XrefConflict` with its details.
    """
    try:
        yield
    except asyncpg.PostgresError as exc:
        if exc.sqlstate in _CONFLICTS:
            raise ConcurrencyConflict(str(exc)) from exc
        if exc.sqlstate == _XREF_CONFLICT:
            d = msgspec.json.decode(exc.detail or "{}", type=_XrefDetail)
            raise XrefConflict(
                kind=d.kind,
                system=d.system,
                native_id=d.native_id,
                bound_to=d.bound_to,
                wanted=d.wanted,
            ) from exc
        if isinstance(exc, asyncpg.UniqueViolationError) and (
            exc.constraint_name == "xref_native"
        ):
            raise ConcurrencyConflict(f"xref written concurrently: {exc}") from exc
        raise
