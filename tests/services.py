"""Per-test isolation on the real services: a fresh vhost and a fresh database.

Uses the RabbitMQ management HTTP API and a plain ``psql``-free asyncpg
connection from a worker thread, so fixtures stay synchronous and cheap.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from typing import Any

import asyncpg

__all__ = [
    "MANAGEMENT_URL",
    "PG_ADMIN_DSN",
    "AMQP_HOST_URL",
    "management",
    "create_vhost",
    "delete_vhost",
    "create_database",
    "drop_database",
    "rabbitmq_available",
    "postgres_available",
    "unique_name",
    "vhost_of",
    "close_connections",
]

MANAGEMENT_URL = os.environ.get("Q2C_TEST_MANAGEMENT_URL", "http://127.0.0.1:15672")
PG_ADMIN_DSN = os.environ.get(
    "Q2C_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
AMQP_HOST_URL = os.environ.get("Q2C_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
_AUTH = "Basic " + base64.b64encode(b"guest:guest").decode()


def unique_name(prefix: str) -> str:
    """A name no other test run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def management(
    method: str, path: str, body: Any = None, timeout_s: float = 10.0
) -> Any:
    """Call the RabbitMQ management API; return the decoded JSON answer (or None)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        MANAGEMENT_URL + path,
        data=data,
        method=method,
        headers={"Authorization": _AUTH, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        raw = resp.read()
    return json.loads(raw) if raw else None


def create_vhost(name: str) -> str:
    """Create vhost *name* with full permissions for guest; return its AMQP URL."""
    quoted = urllib.parse.quote(name, safe="")
    management("PUT", f"/api/vhosts/{quoted}", {})
    management(
        "PUT",
        f"/api/permissions/{quoted}/guest",
        {"configure": ".*", "write": ".*", "read": ".*"},
    )
    return f"{AMQP_HOST_URL}/{quoted}"


def delete_vhost(name: str) -> None:
    """Delete vhost *name* and everything in it."""
    quoted = urllib.parse.quote(name, safe="")
    try:
        management("DELETE", f"/api/vhosts/{quoted}")
    except urllib.error.HTTPError as exc:
        if exc.code != 404:
            raise


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_database(name: str) -> str:
    """Create database *name*; return its DSN."""
    _run(_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    return f"{base}/{name}"


def drop_database(name: str) -> None:
    """Drop database *name*, disconnecting whoever is still on it."""
    _run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def rabbitmq_available() -> bool:
    """Whether the management API (and so the broker) answers."""
    try:
        management("GET", "/api/overview", timeout_s=3)
    except (OSError, urllib.error.URLError):
        return False
    return True


def postgres_available() -> bool:
    """Whether Postgres accepts a connection."""

    async def probe() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
        await conn.close()

    try:
        _run(probe())
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    return True


def vhost_of(amqp_url: str) -> str:
    """The (decoded) vhost name of an ``amqp://`` URL made by `create_vhost`."""
    return urllib.parse.unquote(amqp_url.rsplit("/", 1)[1])


def close_connections(vhost: str, name: str, timeout_s: float = 10.0) -> int:
    """Force-close (320 CONNECTION_FORCED) the named client connections on *vhost*.

    Polls, bounded by *timeout_s*, until the management API lists at least
    one; returns how many were closed. Blocking: call it from a thread.
    """
    quoted = urllib.parse.quote(vhost, safe="")
    deadline = time.monotonic() + timeout_s
    while True:
        rows = management("GET", f"/api/vhosts/{quoted}/connections") or []
        names = [
            row["name"]
            for row in rows
            if (row.get("client_properties") or {}).get("connection_name") == name
        ]
        if names:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"no connection named {name!r} on {vhost}")
        time.sleep(0.05)
    for conn in names:
        path = f"/api/connections/{urllib.parse.quote(conn, safe='')}"
        try:
            management("DELETE", path)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
    return len(names)
