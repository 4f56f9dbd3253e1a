"""Shared fixtures: the production event loop, and isolated real services."""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import anyio
import pytest
from hypothesis import HealthCheck, settings

from broker.config import PostgresConfig
from broker.store import Store
from broker.store.postgres import PostgresStore
from broker.store.sqlite import SqliteStore
from tests import services

#: Services must be up: fail rather than skip (CI, and the README's test command).
IN_CI = bool(os.environ.get("CI") or os.environ.get("Q2C_REQUIRE_SERVICES"))

# Properties are checked, not timed: on a shared two-core machine a draw can
# stall for a second while the services catch up, which says nothing about
# the code. Speed is measured by the benchmarks in bench/.
settings.register_profile(
    "q2c", suppress_health_check=[HealthCheck.too_slow], deadline=None
)
settings.load_profile("q2c")


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """Run async tests on asyncio with uvloop, as the daemon does."""
    return ("asyncio", {"use_uvloop": True})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every async test a deadline of its ``timeout`` (ini or mark).

    pytest-timeout's signal cannot interrupt a test on uvloop (the loop
    takes the signal and carries on), so a hang in an async test would hang
    the run. The deadline cancels the test instead, and its shielded
    cleanups (services restored) still run.
    """
    default = float(items[0].config.getini("timeout")) if items else 0.0
    for item in items:
        fn = getattr(item, "obj", None)
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(fn):
            continue
        mark = item.get_closest_marker("timeout")
        limit = float(mark.args[0]) if mark is not None and mark.args else default
        if limit > 0:
            item.obj = _with_deadline(fn, limit)


def _with_deadline(
    fn: Callable[..., Awaitable[Any]], limit: float
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        with anyio.fail_after(limit):
            return await fn(*args, **kwargs)

    return run


def _require(available: bool, what: str) -> None:
    if not available:
        if IN_CI:
            pytest.fail(f"{what} is required in CI but is not reachable")
        pytest.skip(f"{what} is not reachable")


@pytest.fixture(scope="session")
def rabbitmq() -> None:
    """Skip (locally) or fail (in CI) when RabbitMQ's management API is down."""
    _require(services.rabbitmq_available(), "RabbitMQ (with rabbitmq_management)")


@pytest.fixture(scope="session")
def postgres() -> None:
    """Skip (locally) or fail (in CI) when Postgres is down."""
    _require(services.postgres_available(), "PostgreSQL")


@pytest.fixture
def amqp_url(rabbitmq: None) -> Iterator[str]:
    """A fresh vhost for this test; deleted afterwards."""
    name = services.unique_name("q2c_t")
    url = services.create_vhost(name)
    try:
        yield url
    finally:
        services.delete_vhost(name)


@pytest.fixture
def pg_dsn(postgres: None) -> Iterator[str]:
    """A fresh database for this test; dropped afterwards."""
    name = services.unique_name("q2c_t")
    dsn = services.create_database(name)
    try:
        yield dsn
    finally:
        services.drop_database(name)


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)]
)
def backend(request: pytest.FixtureRequest) -> str:
    """``":memory:"`` for SQLite, or the DSN of a fresh PostgreSQL database."""
    if request.param == "postgres":
        return cast(str, request.getfixturevalue("pg_dsn"))
    return ":memory:"


@pytest.fixture
async def real_store(backend: str) -> AsyncIterator[Store]:
    """A migrated, empty store on the backend under test (writers' leases 30 s)."""
    store: Store
    if backend == ":memory:":
        store = await SqliteStore.open(":memory:", lease_s=30.0)
    else:
        cfg = PostgresConfig(dsn=backend, pool_min_size=1, pool_max_size=4)
        store = await PostgresStore.open(cfg, lease_s=30.0)
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
def socket_path() -> Iterator[str]:
    """A control socket path short enough for AF_UNIX (tmp_path may not be).

    In a directory of its own under /tmp, removed afterwards.
    """
    directory = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        yield f"{directory}/brokerd.sock"
    finally:
        shutil.rmtree(directory, ignore_errors=True)
