"""A command parked unroutable, its queue declared, retried with ``brokerctl``.

The daemon runs in-process on the memory transport and an SQLite file, as
in tests/runtime/test_engine.py; ``brokerctl`` runs as a subprocess against
its control socket.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, final

import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from actors.demo import entry_message
from broker import ChildSpec, Daemon, Emit, Runtime, SupervisorSpec
from broker.config import Config
from broker.store import ParkedOutboxRow
from canonical import Envelope
from tests.polling import eventually
from tests.runtime.test_engine import collect, config, publish, running
from tests.runtime.trees import ReshapedLedger

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]

#: The queue the workflow's commands go to: declared only once ``erp`` is a system.
COMMANDS = "q2c.sys.erp"
TREE = "tests.runtime.test_outbox_parked:build_commanding_tree"


@final
class CommandingLedger(ReshapedLedger):
    """The ledger, whose output goes to ``q2c.sys.erp`` as a command instead."""

    def reshape(self, event: Any, emits: Sequence[Emit]) -> list[Emit]:
        """Each emit sent to the default exchange, to the ERP's queue."""
        return [
            msgspec.structs.replace(e, exchange="", routing_key=COMMANDS) for e in emits
        ]


def build_commanding_tree(rt: Runtime) -> SupervisorSpec:
    """One workflow subtree running `CommandingLedger`."""
    workflows = SupervisorSpec(
        id="workflows", children=[rt.workflow(CommandingLedger())]
    )
    return SupervisorSpec(
        id="app",
        children=[ChildSpec(id="workflows", start=lambda: workflows, shutdown_s=None)],
    )


def daemon_config(tmp_path: Path, socket_path: str, **overrides: str) -> Config:
    return config(
        tmp_path,
        BROKER__DAEMON__TREE=TREE,
        BROKER__CONTROL__SOCKET_PATH=socket_path,
        **overrides,
    )


async def brokerctl(socket_path: str, *args: str) -> Any:
    """Run ``brokerctl --json`` on *args*; return its parsed output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER__")}
    argv = [
        sys.executable,
        "-m",
        "broker.control.ctl",
        "--socket",
        socket_path,
        "--json",
    ]
    done = await anyio.run_process([*argv, *args], check=False, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


async def parked(daemon: Daemon) -> list[ParkedOutboxRow]:
    return await daemon.runtime.store.list_parked_outbox(limit=10)


async def test_a_parked_command_arrives_once_its_queue_exists_and_it_is_retried(
    tmp_path: Path, socket_path: str
) -> None:
    """Unroutable: parked, listed and shown; declared and retried: delivered once.

    The fix is an operator's: ``erp`` joins ``[topology] systems``, so the
    daemon declares ``q2c.sys.erp`` when it starts again.
    """
    entry = entry_message("acct-c", "e-c", Decimal(4))
    async with running(daemon_config(tmp_path, socket_path)) as daemon:
        await publish(daemon, [entry])
        [row] = await eventually(lambda: parked(daemon), timeout_s=20)
        listed = await brokerctl(socket_path, "outbox", "list")
        shown = await brokerctl(socket_path, "outbox", "show", str(row.id))

    assert (row.exchange, row.routing_key) == ("", COMMANDS)
    assert row.reason == "unroutable (returned by the broker)"
    assert [r["id"] for r in listed] == [row.id]
    assert "body" not in listed[0]
    body = msgspec.json.decode(shown["body"], type=Envelope)
    assert (body.type, body.correlation_id) == ("ledger.entry.applied", "acct-c")

    fixed = daemon_config(tmp_path, socket_path, BROKER__TOPOLOGY__SYSTEMS='["erp"]')
    async with running(fixed) as daemon:
        assert [r.id for r in await parked(daemon)] == [row.id]  # still parked
        with capture_logs() as logs:
            dry = await brokerctl(socket_path, "outbox", "retry", "--all", "--dry-run")
            retried = await brokerctl(
                socket_path, "outbox", "retry", str(row.id), "999"
            )
        [delivery] = await collect(daemon, COMMANDS, 1)
        again = await brokerctl(socket_path, "outbox", "retry", "--all")

        async def published() -> bool:
            counts = await daemon.runtime.store.counts()
            return (counts["outbox_pending"], counts["outbox_parked"]) == (0, 0)

        await eventually(published, timeout_s=20)

    assert dry == {"retried": [row.id], "skipped": []}
    assert retried == {
        "retried": [row.id],
        "skipped": [{"id": 999, "reason": "not_parked"}],
    }
    assert again == {"retried": [], "skipped": []}
    assert delivery.message_id == row.message_id
    assert msgspec.json.decode(delivery.body, type=Envelope).id == body.id
    [started] = [x for x in logs if x["event"] == "outbox_retry_started"]
    assert (started["ids"], started["by"]) == (2, f"uid {os.geteuid()}")
    [line] = [x for x in logs if x["event"] == "outbox_rows_retried"]
    assert line["count"] == 1
    assert line["skipped"] == 1
    assert line["by"] == f"uid {os.geteuid()}"
    assert line["log_level"] == "info"
