"""Fixtures for the crash and bad-input suite: one daemon subprocess per test."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests import services
from tests.reliability.harness import Daemon, DaemonSpec, base_config
from tests.reliability.scenario import Scenario


@pytest.fixture
def vhost(amqp_url: str) -> str:
    """The test's own vhost name."""
    return services.vhost_of(amqp_url)


@pytest.fixture
def spec(amqp_url: str, pg_dsn: str, socket_path: str, tmp_path: Path) -> DaemonSpec:
    """The scenario's daemon: its vhost, database, socket and log in tmp_path."""
    name = services.unique_name("rel")
    return DaemonSpec(
        config=base_config(
            name=name, amqp_url=amqp_url, pg_dsn=pg_dsn, socket_path=socket_path
        ),
        workdir=tmp_path,
        socket_path=socket_path,
    )


@pytest.fixture
async def daemon(spec: DaemonSpec) -> AsyncIterator[Daemon]:
    """The daemon handle; killed (by its pid) at teardown if still running."""
    d = Daemon(spec)
    try:
        yield d
    finally:
        await d.aclose()


@pytest.fixture
def scenario(daemon: Daemon, amqp_url: str, vhost: str, pg_dsn: str) -> Scenario:
    """The daemon and its services, with the common ending of every scenario."""
    return Scenario(daemon=daemon, amqp_url=amqp_url, vhost=vhost, pg_dsn=pg_dsn)


@pytest.fixture
async def second(spec: DaemonSpec, amqp_url: str, pg_dsn: str) -> AsyncIterator[Daemon]:
    """Another daemon on the same vhost and database, with its own name and socket."""
    directory = tempfile.mkdtemp(prefix="q2cr", dir="/tmp")
    socket_path = f"{directory}/brokerd.sock"
    workdir = spec.workdir / "second"
    workdir.mkdir()
    d = Daemon(
        replace(
            spec,
            config=base_config(
                name=services.unique_name("rel2"),
                amqp_url=amqp_url,
                pg_dsn=pg_dsn,
                socket_path=socket_path,
            ),
            workdir=workdir,
            socket_path=socket_path,
        )
    )
    try:
        yield d
    finally:
        await d.aclose()
        shutil.rmtree(directory, ignore_errors=True)
