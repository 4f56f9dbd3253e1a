"""The engine as a bench variant: ``python -m broker run`` on AMQP and Postgres.

`bench.ledger` runs it beside `bench.naive` and `bench.passthrough`. The
daemon gets a configuration written for the run (its vhost, database,
socket and four shards), and afterwards Postgres must hold exactly the
expected balances and inbox keys, with no dead letters.
"""

from __future__ import annotations

import json
import sys
from decimal import Decimal
from pathlib import Path

import asyncpg
import msgspec

from bench.harness import (
    MANAGEMENT_URL,
    Env,
    compare_balances,
    run_command,
)
from bench.workload import (
    OUTPUT_QUEUE,
    Expected,
)

__all__ = ["EngineVariant"]

_SHARDS = 4
_ENGINE_CONFIG = """\
[daemon]
name = "q2c-bench"
transport = "amqp"
store = "postgres"
[amqp]
url = {amqp_url}
management-url = {management_url}
[postgres]
dsn = {dsn}
[sqlite]
path = {sqlite}
[topology]
shards = {shards}
[topology.event-queues]
{output_queue} = ["ledger.entry.applied"]
[control]
socket-path = {socket}
[http]
port = 0
[logging]
level = "warning"
format = "json"
"""


class EngineVariant:
    """The daemon, ``python -m broker run``, on AMQP and Postgres."""

    name = "engine"
    input_queues: tuple[str, ...] = tuple(f"q2c.wf.ledger.{n}" for n in range(_SHARDS))
    passes_duplicates = False
    needs_database = True

    def config(self, env: Env) -> Path:
        """Write the daemon's config file for *env*; return its path."""
        path = env.workdir / "broker.toml"
        q = json.dumps  # a JSON string is a valid TOML basic string
        path.write_text(
            _ENGINE_CONFIG.format(
                amqp_url=q(env.amqp_url),
                management_url=q(MANAGEMENT_URL),
                dsn=q(env.dsn),
                sqlite=q(str(env.workdir / "q2c.sqlite3")),
                shards=_SHARDS,
                output_queue=q(OUTPUT_QUEUE),
                socket=q(str(env.workdir / "brokerd.sock")),
            ),
            encoding="utf-8",
        )
        return path

    def _broker(self, env: Env, command: str) -> list[str]:
        config = str(self.config(env))
        return [sys.executable, "-m", "broker", "--config", config, command]

    async def prepare(self, env: Env) -> None:
        """``brokerd migrate`` and ``brokerd topology``."""
        log = env.workdir / "setup.log"
        await run_command("brokerd migrate", self._broker(env, "migrate"), log, 120)
        await run_command("brokerd topology", self._broker(env, "topology"), log, 120)

    def command(self, env: Env) -> list[str]:
        """``python -m broker --config FILE run``."""
        return self._broker(env, "run")

    async def verify(self, env: Env, expected: Expected) -> list[str]:
        """Saga balances, inbox keys and dead letters."""
        conn = await asyncpg.connect(env.dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT correlation_id, state FROM saga WHERE workflow = 'ledger'"
            )
            inbox = await conn.fetchval("SELECT count(*) FROM inbox")
            dead = await conn.fetchval("SELECT count(*) FROM dead_letter")
        finally:
            await conn.close()
        got: Expected = {}
        for row in rows:
            state = msgspec.json.decode(row["state"])
            got[row["correlation_id"]] = (
                Decimal(state["balance"]),
                int(state["entries"]),
            )
        problems = compare_balances(expected, got)
        distinct = sum(n for _, n in expected.values())
        if inbox != distinct:
            problems.append(f"inbox holds {inbox} keys, expected {distinct}")
        if dead:
            problems.append(f"{dead} dead letters")
        return problems
