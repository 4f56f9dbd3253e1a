"""The machinery of a benchmark run: fresh services, child processes, CPU.

Every variant runs on its own RabbitMQ vhost and Postgres database, created
here through the management API and an admin connection, and removed again
by the run's exit stack however the run ends. Each variant's pipeline is a
child process in its own session: its output goes to a log file whose tail
explains a failure, its death fails the phase it happened in, and it is
stopped with SIGTERM (then SIGKILL after a grace period). `CpuMeter` reads
the CPU seconds of the roles that share the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import anyio
import anyio.abc
import asyncpg
import psutil

from bench.workload import BenchError, Expected

__all__ = [
    "ROOT",
    "MANAGEMENT_URL",
    "AMQP_HOST_URL",
    "PG_ADMIN_DSN",
    "say",
    "deadline",
    "Env",
    "Services",
    "admin_sql",
    "Child",
    "run_command",
    "CpuSample",
    "CpuMeter",
    "Variant",
    "compare_balances",
]

ROOT = Path(__file__).resolve().parents[1]
MANAGEMENT_URL = os.environ.get("Q2C_BENCH_MANAGEMENT_URL", "http://127.0.0.1:15672")
AMQP_HOST_URL = os.environ.get(
    "Q2C_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672"
)
PG_ADMIN_DSN = os.environ.get(
    "Q2C_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def say(text: str) -> None:
    """Progress for the human, on stderr (stdout carries the results)."""
    print(text, file=sys.stderr, flush=True)


@asynccontextmanager
async def deadline(what: str, seconds: float) -> AsyncIterator[None]:
    """Fail the phase with a message naming it when it takes over *seconds*."""
    try:
        with anyio.fail_after(seconds):
            yield
    except TimeoutError as exc:
        raise BenchError(f"{what} took more than {seconds:.0f} s") from exc


# --- fresh services --------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Env:
    """One variant's fresh vhost, database and scratch directory."""

    name: str
    amqp_url: str
    dsn: str
    workdir: Path


class Services:
    """Creates vhosts and databases and removes them again, whatever happens."""

    def __init__(self, http: aiohttp.ClientSession) -> None:
        self._http = http

    async def _management(self, method: str, path: str, body: Any = None) -> None:
        try:
            async with self._http.request(
                method,
                MANAGEMENT_URL + path,
                json=body,
                timeout=aiohttp.ClientTimeout(10),
            ) as resp:
                if resp.status >= 400 and not (
                    method == "DELETE" and resp.status == 404
                ):
                    raise BenchError(
                        f"{method} {path}: HTTP {resp.status} {await resp.text()}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise BenchError(
                f"RabbitMQ management API at {MANAGEMENT_URL}: {exc}"
            ) from exc

    async def open(self, variant: str, *, database: bool, stack: AsyncExitStack) -> Env:
        """A fresh vhost (and database, if asked) for *variant*, removed by *stack*."""
        name = f"q2c_bench_{variant}_{uuid.uuid4().hex[:8]}"
        quoted = urllib.parse.quote(name, safe="")
        await self._management("PUT", f"/api/vhosts/{quoted}", {})
        stack.push_async_callback(
            self._shielded, self._management, "DELETE", f"/api/vhosts/{quoted}"
        )
        await self._management(
            "PUT",
            f"/api/permissions/{quoted}/guest",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        dsn = ""
        if database:
            await admin_sql(f'CREATE DATABASE "{name}"')
            stack.push_async_callback(
                self._shielded,
                admin_sql,
                f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
            )
            dsn = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
        workdir = Path(tempfile.mkdtemp(prefix=f"{variant}-", dir=_scratch()))
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        return Env(
            name=name, amqp_url=f"{AMQP_HOST_URL}/{quoted}", dsn=dsn, workdir=workdir
        )

    @staticmethod
    async def _shielded(fn: Callable[..., Awaitable[None]], *args: Any) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            try:
                await fn(*args)
            except BenchError as exc:
                say(f"cleanup: {exc}")


def _scratch() -> Path:
    path = Path(tempfile.gettempdir()) / "q2c-bench"
    path.mkdir(exist_ok=True)
    return path


async def admin_sql(sql: str) -> None:
    """Run *sql* on the admin database (``CREATE``/``DROP DATABASE``)."""
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
    except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
        raise BenchError(f"Postgres at {PG_ADMIN_DSN}: {exc}") from exc


# --- child processes -------------------------------------------------------------


class Child:
    """A variant's process: its log file, its death as a failure, its clean stop."""

    def __init__(self, name: str, process: anyio.abc.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @classmethod
    async def start(cls, name: str, command: Sequence[str], log: Path) -> Child:
        """Start *command* in its own session, output to *log*."""
        with log.open("ab") as sink:
            process = await anyio.open_process(
                list(command),
                stdin=None,
                stdout=sink,
                stderr=sink,
                cwd=ROOT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
                start_new_session=True,  # Ctrl-C reaches the bench, which stops us
            )
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process.pid

    def tail(self, lines: int = 15) -> str:
        """The last lines of the log, for error messages."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def wait_for(
        self, event: Awaitable[object], what: str, timeout_s: float
    ) -> None:
        """Await *event*; fail if the process exits first or time runs out."""
        async with (
            deadline(f"{self.name}: {what}", timeout_s),
            anyio.create_task_group() as tg,
        ):
            outcome: list[int] = []

            async def watch() -> None:
                outcome.append(await self.process.wait())
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await event
            tg.cancel_scope.cancel()
        if outcome:
            status = outcome[0]
            raise BenchError(
                f"{self.name} exited with status {status} while {what}:\n{self.tail()}"
            )

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM, wait *timeout_s*, then SIGKILL; the exit status, None if killed."""
        if self.process.returncode is not None:
            return self.process.returncode
        with anyio.CancelScope(shield=True):
            self.process.send_signal(signal.SIGTERM)
            with anyio.move_on_after(timeout_s):
                return await self.process.wait()
            self.process.kill()
            await self.process.wait()
        return None


async def run_command(
    name: str, command: Sequence[str], log: Path, timeout_s: float
) -> None:
    """Run *command* to completion; fail naming it unless it exits 0 in time."""
    child = await Child.start(name, command, log)
    try:
        async with deadline(name, timeout_s):
            status = await child.process.wait()
    finally:
        await child.stop(5)
    if status != 0:
        raise BenchError(f"{name} exited with status {status}:\n{child.tail()}")


# --- CPU ------------------------------------------------------------------------------


CpuSample = dict[str, dict[int, float]]


def cpu_of(pids: Sequence[int]) -> dict[int, float]:
    """User plus system CPU seconds so far of each of *pids* still running."""
    out: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[pid] = float(times.user) + float(times.system)
    return out


def rabbitmq_pids() -> list[int]:
    """The local RabbitMQ node's Erlang VM (``beam.smp``) processes."""
    return [
        p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"
    ]


class CpuMeter:
    """CPU seconds of the roles that do the work, between two samples."""

    def __init__(self, admin: asyncpg.Connection) -> None:
        self._admin = admin
        self._rabbit = rabbitmq_pids()

    async def sample(self, child_pid: int, database: str) -> CpuSample:
        """CPU seconds so far of each process, by role."""
        rows = await self._admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 OR backend_type IN "
            "('walwriter', 'checkpointer', 'background writer')",
            database,
        )
        roles = {
            "daemon": [child_pid],
            "rabbitmq": self._rabbit,
            "postgres": [int(r["pid"]) for r in rows],
            "bench": [os.getpid()],
        }
        return await anyio.to_thread.run_sync(
            lambda: {role: cpu_of(pids) for role, pids in roles.items()}
        )

    @staticmethod
    def delta(before: CpuSample, after: CpuSample) -> dict[str, float]:
        """Seconds per role; a process born in between counts from zero."""
        return {
            role: round(
                sum(t - before.get(role, {}).get(pid, 0.0) for pid, t in pids.items()),
                3,
            )
            for role, pids in after.items()
        }


# --- variants -------------------------------------------------------------------


class Variant(Protocol):
    """What the runner needs to know about one pipeline."""

    name: str
    input_queues: tuple[str, ...]
    #: No deduplication: every message comes out, duplicates included.
    passes_duplicates: bool
    needs_database: bool

    async def prepare(self, env: Env) -> None:
        """Declare the topology (and migrate), before anything is published."""
        ...

    def command(self, env: Env) -> list[str]:
        """The command line of the child process."""
        ...

    async def verify(self, env: Env, expected: Expected) -> list[str]:
        """Problems found in the store after the run; empty when correct."""
        ...


def compare_balances(expected: Expected, got: Expected) -> list[str]:
    """What differs between the expected and the stored (balance, entries)."""
    wrong = [
        f"{account}: {got.get(account)} != expected {want}"
        for account, want in sorted(expected.items())
        if got.get(account) != want
    ]
    extra = sorted(set(got) - set(expected))
    problems = (
        [f"{len(wrong)} wrong balances, e.g. {'; '.join(wrong[:3])}"] if wrong else []
    )
    if extra:
        problems.append(f"{len(extra)} unexpected accounts, e.g. {extra[:3]}")
    return problems
