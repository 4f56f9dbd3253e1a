"""Faults on the shared services, and exact queue state (RELIABILITY.md §5.2).

Broker- and database-wide faults (``rabbitmqctl stop_app``, a runtime
``max_message_size``, ``pg_ctlcluster restart``) always restore the service
in a ``finally``; tests that use them are marked ``chaos``.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

import aio_pika
import anyio
import asyncpg

__all__ = [
    "QueueStat",
    "queue_stats",
    "rabbitmqctl",
    "rabbitmq_outage",
    "max_message_size",
    "rabbit_env",
    "memory_alarm",
    "disk_alarm",
    "restart_postgres",
    "terminate_backends",
]

PG_CLUSTER = ("15", "main")


async def rabbitmqctl(*args: str, timeout_s: float = 60.0) -> str:
    """Run ``rabbitmqctl ARGS``; its standard output.

    Raises:
        subprocess.CalledProcessError: a non-zero exit.
    """
    with anyio.fail_after(timeout_s):
        done = await anyio.run_process(["rabbitmqctl", *args], check=True)
    return done.stdout.decode()


@dataclass(frozen=True, kw_only=True)
class QueueStat:
    """One queue as its leader sees it now (a passive declare, not statistics)."""

    ready: int
    consumers: int


async def queue_stats(url: str, queues: Iterable[str]) -> dict[str, QueueStat]:
    """Ready messages and consumers of *queues*, exact at this moment.

    A passive ``queue.declare`` asks the quorum queue's leader; ``rabbitmqctl
    list_queues`` and the management API report quorum-queue metrics that
    are refreshed only every few seconds.
    """
    out: dict[str, QueueStat] = {}
    connection = await aio_pika.connect(url, timeout=5)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            result = declared.declaration_result
            out[name] = QueueStat(
                ready=result.message_count or 0, consumers=result.consumer_count or 0
            )
    return out


async def rabbitmq_outage(hold_s: float) -> None:
    """``rabbitmqctl stop_app`` for *hold_s*, then ``start_app``, always.

    Returns once the broker has started again (``await_startup``).
    """
    try:
        await rabbitmqctl("stop_app")
        await anyio.sleep(hold_s)  # the outage itself, not a wait for a condition
    finally:
        with anyio.CancelScope(shield=True):
            await rabbitmqctl("start_app")
            await rabbitmqctl("await_startup")


def memory_alarm() -> AbstractAsyncContextManager[None]:
    """A broker-wide memory alarm for the block: every publisher is blocked.

    ``set_vm_memory_high_watermark 0`` raises it; the broker's own
    watermark, read first, is always restored.
    """
    return _alarm(
        "vm_memory_monitor:get_vm_memory_high_watermark().",
        "set_vm_memory_high_watermark",
        "0",
    )


def disk_alarm() -> AbstractAsyncContextManager[None]:
    """A broker-wide disk alarm for the block: every publisher is blocked.

    A free-disk limit of 10,000 GB raises it; the broker's own limit, read
    first, is always restored.
    """
    return _alarm(
        "rabbit_disk_monitor:get_disk_free_limit().", "set_disk_free_limit", "10000GB"
    )


@asynccontextmanager
async def _alarm(read: str, command: str, value: str) -> AsyncIterator[None]:
    """``rabbitmqctl COMMAND VALUE`` for the block; then back to what *read* gave."""
    original = setting_args((await rabbitmqctl("eval", read)).strip())
    try:
        await rabbitmqctl(command, value)
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await rabbitmqctl(command, *original)


def setting_args(printed: str) -> list[str]:
    """The arguments to give rabbitmqctl for a limit as ``eval`` prints it.

    ``0.4`` and ``50000000`` are given as they are; ``{absolute,1073741824}``
    (a watermark set in bytes) is ``absolute 1073741824``.
    """
    if printed.startswith("{absolute,") and printed.endswith("}"):
        return ["absolute", printed.removeprefix("{absolute,").removesuffix("}")]
    return [printed]


@asynccontextmanager
async def rabbit_env(settings: Mapping[str, str]) -> AsyncIterator[None]:
    """Set the running node's ``rabbit`` *settings* (Erlang terms); put them back after.

    Each key is restored to the value it had, or unset if it had none.
    """
    restore: list[str] = []
    try:
        for key, value in settings.items():
            before = (
                await rabbitmqctl("eval", f"application:get_env(rabbit, {key}).")
            ).strip()
            restore.append(
                f"application:set_env(rabbit, {key}, "
                f"{before.removeprefix('{ok,').removesuffix('}')})."
                if before.startswith("{ok,")
                else f"application:unset_env(rabbit, {key})."
            )
            await rabbitmqctl("eval", f"application:set_env(rabbit, {key}, {value}).")
        yield
    finally:
        with anyio.CancelScope(shield=True):
            for command in reversed(restore):
                await rabbitmqctl("eval", command)


def max_message_size(limit: int) -> AbstractAsyncContextManager[None]:
    """Set the broker's ``max_message_size`` (new channels see it); restore it after."""
    return rabbit_env({"max_message_size": str(limit)})


async def _postgres_accepts(dsn: str, timeout_s: float) -> None:
    with anyio.fail_after(timeout_s):
        while True:
            try:
                conn = await asyncpg.connect(dsn, timeout=2)
            except (OSError, asyncpg.PostgresError, TimeoutError):
                await anyio.sleep(0.2)  # bounded poll while the server starts
                continue
            await conn.close()
            return


async def _pg_ctlcluster(action: str, *, check: bool) -> int:
    # No pipes: the restarted postmaster inherits them and would hold them
    # open forever, and run_process would wait for their EOF.
    done = await anyio.run_process(
        ["pg_ctlcluster", "--skip-systemctl-redirect", *PG_CLUSTER, action],
        check=check,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return done.returncode


async def restart_postgres(dsn: str) -> None:
    """``pg_ctlcluster 15 main restart`` (fast mode); return once it accepts again.

    If the restart fails, the cluster is started, so the service is always
    left running.
    """
    try:
        with anyio.fail_after(60):
            await _pg_ctlcluster("restart", check=True)
    finally:
        with anyio.CancelScope(shield=True):
            if await _pg_ctlcluster("status", check=False) != 0:
                await _pg_ctlcluster("start", check=False)
            await _postgres_accepts(dsn, 60)


async def terminate_backends(dsn: str, application_name: str) -> int:
    """``pg_terminate_backend`` on every backend of *dsn*'s database with that name.

    Only the daemon's own connections are cut: other users of the cluster,
    this test's among them, are left alone. Returns how many were ended.
    """
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        ended: int = await conn.fetchval(
            """
            SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
            FROM pg_stat_activity
            WHERE datname = current_database() AND application_name = $1
              AND pid <> pg_backend_pid()
            """,
            application_name,
        )
    finally:
        await conn.close()
    return ended
