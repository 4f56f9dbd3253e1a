"""Shared fixtures: the production event loop, and isolated real services."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests import services

IN_CI = bool(os.environ.get("CI"))

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
