"""The embedded mode loses nothing when the daemon is killed (DESIGN §6).

A daemon on the in-process transport and SQLite is fed ledger entries and
killed by pid with SIGKILL while it works through them; ``brokerd run`` on
the same files then finishes the work. Every entry is applied exactly once,
and every entry's ``ledger.entry.applied`` is in its output queue.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import anyio
import msgspec
import pytest

from actors.ledger import LedgerState
from broker import load_config
from broker.transport.memory import MemoryTransport
from broker.transport.topology import build_topology
from canonical import Envelope, LedgerEntryApplied

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
OUT = "q2c.events.ledger-applied"
ENTRIES = 3000


def environment(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "BROKER__SQLITE__PATH": str(tmp_path / "q2c.sqlite3"),
        "BROKER__MEMORY__JOURNAL": str(tmp_path / "queues.sqlite3"),
        "BROKER__CONTROL__SOCKET_PATH": str(tmp_path / "run" / "brokerd.sock"),
        "BROKER__TOPOLOGY__EVENT_QUEUES": f'{{"{OUT}" = ["ledger.entry.applied"]}}',
        "BROKER__LOGGING__FORMAT": "json",
        "BROKER__LOGGING__LEVEL": "warning",
        "BROKER__HTTP__ENABLED": "false",
        # Outputs committed by the killed daemon wait out their writer's
        # lease before the restarted one publishes them.
        "BROKER__CORE__OUTBOX_LEASE_S": "1",
    }


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Every process the test started: killed by pid if it is still running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=30)
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def start(
    children: list[subprocess.Popen[str]], env: dict[str, str], *args: str
) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    children.append(child)
    return child


def wait_for_line(child: subprocess.Popen[str], wanted: str, timeout_s: float) -> None:
    assert child.stdout is not None
    deadline = threading.Timer(timeout_s, child.kill)  # a stuck child ends the read
    deadline.start()
    try:
        for line in child.stdout:
            if line.strip() == wanted:
                return
    finally:
        deadline.cancel()
    raise AssertionError(f"{wanted!r} never came; exit {child.poll()}")


def applied(store: Path) -> dict[str, LedgerState]:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute(
            "SELECT correlation_id, state FROM saga WHERE workflow = 'ledger'"
        ).fetchall()
    finally:
        conn.close()
    return {acct: msgspec.json.decode(state, type=LedgerState) for acct, state in rows}


def scalar(store: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


UNSENT = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"


def entries_applied(store: Path) -> int:
    return sum(s.entries for s in applied(store).values())


async def test_killed_mid_work_the_restarted_daemon_applies_each_entry_once(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    env = environment(tmp_path)
    store = tmp_path / "q2c.sqlite3"
    fed = start(children, env, "-m", "tests.runtime.embedded_child", str(ENTRIES))
    await anyio.to_thread.run_sync(wait_for_line, fed, "fed", 120.0)
    os.kill(fed.pid, signal.SIGKILL)
    assert fed.wait(timeout=30) == -signal.SIGKILL
    at_kill = entries_applied(store)
    assert at_kill < ENTRIES, "the daemon finished before it was killed"

    daemon = start(children, env, "-m", "broker", "run")
    with anyio.fail_after(120):
        while entries_applied(store) < ENTRIES or scalar(store, UNSENT):
            assert daemon.poll() is None, f"the daemon exited {daemon.returncode}"
            await anyio.sleep(0.1)
    daemon.send_signal(signal.SIGTERM)
    assert await anyio.to_thread.run_sync(lambda: daemon.wait(timeout=60)) == 0

    expected: dict[str, tuple[Decimal, int]] = {}
    for n in range(ENTRIES):
        balance, count = expected.get(f"acct-{n % 50:02d}", (Decimal(0), 0))
        expected[f"acct-{n % 50:02d}"] = (balance + Decimal(n) / 100, count + 1)
    states = applied(store)
    assert {a: (s.balance, s.entries) for a, s in states.items()} == expected
    assert scalar(store, "SELECT count(*) FROM inbox") == ENTRIES

    # The output queue alone: the workflow's shard queues are empty now.
    cfg = load_config(environ=env)
    outputs = await MemoryTransport.open(
        build_topology(cfg.topology, []), journal=cfg.memory.journal
    )
    try:
        sub = await outputs.subscribe(OUT, prefetch=10_000)
        seen: set[str] = set()
        with anyio.fail_after(10):
            while len(seen) < ENTRIES:
                for d in await sub.batch(10_000):
                    data = msgspec.json.decode(d.body, type=Envelope).data
                    event = msgspec.json.decode(data, type=LedgerEntryApplied)
                    seen.add(event.entry_id)
    finally:
        await outputs.aclose()
    assert seen == {f"e{n:05d}" for n in range(ENTRIES)}
