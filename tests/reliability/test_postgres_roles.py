"""The daemon on a PostgreSQL role with DML rights only (RELIABILITY.md §6.2).

The schema's owner (here ``postgres``) runs ``brokerd migrate``; the daemon
logs in as a role of its own with ``SELECT, INSERT, UPDATE, DELETE`` on the
tables, ``USAGE`` on the sequences and ``EXECUTE`` on the two partition
functions, which run with their owner's rights (migration 0007). It may not
create or alter anything, and it does not need to:

* before the owner has migrated, it refuses to start (exit 78), naming the
  pending migrations;
* asked to migrate itself, it refuses to start (exit 78) with the grant it
  lacks and what to do instead;
* with ``[postgres] migrate = false`` it runs: it creates a missing daily
  partition through the owner's function, and the checker finds every entry
  applied once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest

from tests.reliability.checker import connect
from tests.reliability.harness import Config
from tests.reliability.scenario import Scenario
from tests.reliability.workload import Workload

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

GRANTS = """
GRANT USAGE ON SCHEMA public TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};
GRANT EXECUTE ON FUNCTION q2c_ensure_partitions(text, date, date),
    q2c_drop_partitions(text, date) TO {role};
"""


@pytest.fixture
async def role(pg_dsn: str) -> AsyncIterator[str]:
    """A login role of the test's own, with no rights yet; dropped at the end."""
    name = "q2c_daemon_" + pg_dsn.rsplit("_", 1)[-1]
    async with connect(pg_dsn) as conn:
        await conn.execute(f"CREATE ROLE {name} LOGIN")
    try:
        yield name
    finally:
        with anyio.CancelScope(shield=True):
            async with connect(pg_dsn) as conn:
                await conn.execute(f"DROP OWNED BY {name}")
                await conn.execute(f"DROP ROLE {name}")


def as_role(dsn: str, role: str) -> str:
    """*dsn* with *role* as the user."""
    parts = urlsplit(dsn)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{role}@{host}"))


async def test_a_dml_only_role_runs_on_a_schema_its_owner_migrated(
    role: str, scenario: Scenario
) -> None:
    daemon = scenario.daemon
    mine: Config = {"postgres": {"dsn": as_role(scenario.pg_dsn, role)}}
    no_ddl: Config = {"postgres": {**mine["postgres"], "migrate": False}}

    await daemon.start(no_ddl)
    assert await daemon.wait_exit(30) == 78
    assert "0001_init.sql" in await daemon.log_tail()
    assert "pending" in await daemon.log_tail()

    # The owner, with the same file: `migrate = false` is about the start.
    done = await daemon.command("migrate", overrides={"postgres": {"migrate": False}})
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    # The owner drops a partition ahead, for the daemon to make again.
    ahead = (dt.datetime.now(dt.UTC).date() + dt.timedelta(days=3)).strftime("%Y%m%d")
    async with connect(scenario.pg_dsn) as conn:
        await conn.execute(GRANTS.format(role=role))
        await conn.execute(f"DROP TABLE inbox_p{ahead}")

    await daemon.start(mine)
    assert await daemon.wait_exit(30) == 78
    tail = await daemon.log_tail()
    assert "refused a migration" in tail
    assert "brokerd migrate" in tail

    workload = Workload.build(1000)
    await daemon.declare()
    await daemon.start(no_ddl)
    await daemon.wait_ready()
    assert (await scenario.publish(workload.stream)).confirmed == len(workload.stream)
    async with connect(scenario.pg_dsn) as conn:
        assert await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f"inbox_p{ahead}"
        )
    await scenario.finish(workload)
    events = await daemon.log_events()
    assert any(e["event"] == "store_pruned" for e in events)
    assert not any(e["event"] == "store_prune_failed" for e in events)
