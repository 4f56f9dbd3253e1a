"""The daemon under test as a subprocess, and its config.

RELIABILITY.md §5.2: the test is the supervisor. It writes a real TOML
config (RabbitMQ transport, Postgres store, the test's own vhost and
database), runs ``python -m broker --config FILE run`` with JSON logs going
to a file, waits until the shards consume, injects a fault, restarts the
daemon if it died, and finally stops it with SIGTERM and expects exit 0.
Signals go only to the pid the test started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp
import anyio
from anyio.abc import Process

from broker.control.client import ControlClient, DaemonUnreachable
from broker.control.protocol import StatusRequest
from broker.errors import ControlError
from broker.transport.topology import shard_queue

__all__ = [
    "ROOT",
    "SHARDS",
    "OUTPUT_QUEUE",
    "SHARD_QUEUES",
    "SLOW",
    "Daemon",
    "DaemonSpec",
    "base_config",
    "merge",
    "to_toml",
    "brokerctl",
]

ROOT = Path(__file__).resolve().parents[2]
SHARDS = 2
WORKFLOW = "ledger"
SHARD_QUEUES = tuple(shard_queue(WORKFLOW, n) for n in range(SHARDS))
OUTPUT_QUEUE = "q2c.events.ledger-applied"

Config = dict[str, dict[str, Any]]

#: A deliberately slow daemon: small batches with a pause after each, and a
#: prefetch that keeps deliveries waiting unacknowledged, so that the drain
#: lasts for seconds and a fault at any moment of it hits messages in flight.
SLOW: Config = {
    "core": {"batch-max": 20, "batch-linger-s": 0.1},
    "amqp": {"prefetch": 50},
}


def base_config(*, name: str, amqp_url: str, pg_dsn: str, socket_path: str) -> Config:
    """The daemon config every scenario starts from (RELIABILITY.md §5.2).

    Small batches and a short outbox lease make crashes land mid-stream and
    let orphaned rows be found again within a second or two; fast retry
    tiers keep the poison scenario short.
    """
    return {
        "daemon": {
            "name": name,
            "transport": "amqp",
            "store": "postgres",
            "shutdown-s": 10.0,
        },
        "http": {"port": 0},
        "amqp": {
            "url": amqp_url,
            "prefetch": 200,
            "publish-timeout-s": 5.0,
            "connect-timeout-s": 5.0,
            "reconnect-interval-s": 0.2,
            "reconnect-max-s": 2.0,
        },
        "postgres": {
            "dsn": pg_dsn,
            "command-timeout-s": 5.0,
            "acquire-timeout-s": 5.0,
            "application-name": name,
        },
        "topology": {
            "shards": SHARDS,
            "retry-tiers-s": [0.5, 1.0],
            "event-queues": {OUTPUT_QUEUE: ["ledger.entry.applied"]},
        },
        "core": {
            "batch-max": 100,
            "outbox-lease-s": 2.0,
            "relay-poll-s": 0.2,
        },
        "control": {"socket-path": socket_path},
        "logging": {"format": "json", "level": "info"},
    }


def merge(config: Config, overrides: Mapping[str, Mapping[str, Any]]) -> Config:
    """A copy of *config* with *overrides* applied section by section."""
    out = {section: dict(table) for section, table in config.items()}
    for section, table in overrides.items():
        out.setdefault(section, {}).update(table)
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def to_toml(config: Config) -> str:
    """Render a two-level config as TOML (nested tables inline)."""
    lines: list[str] = []
    for section, table in config.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)


def _env() -> dict[str, str]:
    """This environment without BROKER__* overrides: the file is the whole config."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BROKER__")}


@dataclass(frozen=True, kw_only=True)
class DaemonSpec:
    """Where one scenario's daemon lives: config base, log file, control socket."""

    config: Config
    workdir: Path
    socket_path: str

    @property
    def log_path(self) -> Path:
        """The JSON log of every run of the daemon, appended to."""
        return self.workdir / "daemon.log"


class Daemon:
    """One ``python -m broker run`` subprocess; start it again after it died."""

    def __init__(self, spec: DaemonSpec) -> None:
        self.spec = spec
        self.runs = 0
        self._proc: Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The running process's pid.

        Raises:
            RuntimeError: not started.
        """
        if self._proc is None:
            raise RuntimeError("the daemon was not started")
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit status of the last run; None while it runs."""
        return None if self._proc is None else self._proc.returncode

    async def start(self, overrides: Mapping[str, Mapping[str, Any]] = {}) -> None:
        """Write this run's config and start the daemon on it."""
        if self._proc is not None:
            if self._proc.returncode is None:
                raise RuntimeError(f"the daemon still runs (pid {self._proc.pid})")
            await self._proc.aclose()  # the previous run, already ended
        self.runs += 1
        path = await self._write_config(f"broker-{self.runs}.toml", overrides)
        if self._log is None:
            self._log = await anyio.to_thread.run_sync(self.spec.log_path.open, "ab")
        self._proc = await anyio.open_process(
            [sys.executable, "-m", "broker", "--config", str(path), "run"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            cwd=ROOT,
            env=_env(),
        )

    async def _write_config(
        self, name: str, overrides: Mapping[str, Mapping[str, Any]]
    ) -> anyio.Path:
        path = anyio.Path(self.spec.workdir / name)
        await path.write_text(to_toml(merge(self.spec.config, overrides)))
        return path

    async def command(
        self, *args: str, overrides: Mapping[str, Mapping[str, Any]] = {}
    ) -> subprocess.CompletedProcess[bytes]:
        """``brokerd --config FILE ARGS`` on this daemon's config; not checked."""
        path = await self._write_config(f"{args[0]}.toml", overrides)
        return await anyio.run_process(
            [sys.executable, "-m", "broker", "--config", str(path), *args],
            check=False,
            cwd=ROOT,
            env=_env(),
        )

    async def declare(self, overrides: Mapping[str, Mapping[str, Any]] = {}) -> None:
        """``brokerd topology``: declare queues, so a backlog can wait for the daemon.

        Raises:
            AssertionError: the command failed (its output is included).
        """
        done = await self.command("topology", overrides=overrides)
        assert done.returncode == 0, done.stderr.decode(errors="replace")

    async def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """``brokerctl status``, in process.

        Raises:
            ControlError: no answer.
        """
        client = ControlClient(self.spec.socket_path, timeout_s=timeout_s)
        result: dict[str, Any] = await client.request(StatusRequest())
        return result

    async def readyz(self) -> tuple[int, str]:
        """``GET /readyz`` on the daemon's HTTP port (from its log): status, body."""
        listening = await self.wait_log(lambda e: e["event"] == "http_listening")
        url = f"http://{listening['host']}:{listening['port']}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as ready:
            return ready.status, await ready.text()

    async def wait_ready(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait until status answers: both connections up, every shard consumed.

        Raises:
            AssertionError: the daemon exited first (its log tail is included).
            TimeoutError: not ready within *timeout_s*.
        """
        with anyio.fail_after(timeout_s):
            while True:
                if self.returncode is not None:
                    raise AssertionError(
                        f"daemon exited {self.returncode} before it was ready\n"
                        + await self.log_tail()
                    )
                try:
                    status = await self.status(timeout_s=2.0)
                except (DaemonUnreachable, ControlError):
                    status = None
                if status is not None and _ready(status):
                    return status
                await anyio.sleep(0.1)  # bounded poll: no readiness event to wait on

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to end on its own; return its exit status."""
        if self._proc is None:
            raise RuntimeError("the daemon was not started")
        with anyio.fail_after(timeout_s):
            return await self._proc.wait()

    async def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (graceful drain); return the exit status."""
        if self._proc is None:
            raise RuntimeError("the daemon was not started")
        if self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout_s)

    async def kill(self) -> int:
        """SIGKILL this daemon's pid (never anything else); return the status."""
        if self._proc is None:
            raise RuntimeError("the daemon was not started")
        if self._proc.returncode is None:
            self._proc.kill()
        return await self.wait_exit(10)

    async def aclose(self) -> None:
        """Kill the daemon if it still runs; close the log file."""
        if self._proc is not None:
            with anyio.CancelScope(shield=True):
                if self._proc.returncode is None:
                    await self.kill()
                await self._proc.aclose()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log, for failure messages."""
        text = await anyio.Path(self.spec.log_path).read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def wait_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0
    ) -> dict[str, Any]:
        """Wait for a log line matching *predicate*; return the first one."""
        with anyio.fail_after(timeout_s):
            while True:
                for event in await self.log_events():
                    if predicate(event):
                        return event
                await anyio.sleep(0.1)  # bounded poll: the log is a file

    async def log_events(self) -> list[dict[str, Any]]:
        """Every JSON log line the daemon wrote, in order (other lines skipped)."""
        text = await anyio.Path(self.spec.log_path).read_text(errors="replace")
        events: list[dict[str, Any]] = []
        for line in text.splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut short by SIGKILL
        return events


def _ready(status: dict[str, Any]) -> bool:
    """Both connections up and a live consumer on every shard queue."""
    transport = status["transport"]
    connected = all(
        c["state"] == "connected" for c in transport["connections"].values()
    )
    live = {s["queue"] for s in transport["subscriptions"] if s["alive"]}
    return connected and live >= set(SHARD_QUEUES)


async def brokerctl(socket_path: str, *args: str) -> Any:
    """Run ``python -m broker.control.ctl --socket PATH --json ARGS``; its JSON.

    Raises:
        AssertionError: a non-zero exit (with its stderr).
    """
    done = await anyio.run_process(
        [
            sys.executable,
            "-m",
            "broker.control.ctl",
            "--socket",
            socket_path,
            "--json",
            *args,
        ],
        check=False,
        cwd=ROOT,
        env=_env(),
    )
    assert done.returncode == 0, (
        f"brokerctl {' '.join(args)} exited {done.returncode}: "
        f"{done.stderr.decode(errors='replace')}"
    )
    return json.loads(done.stdout)
