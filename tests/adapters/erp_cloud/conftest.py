"""A started SAP sandbox, and a client logged on to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from adapters.erp_cloud import SapClient, SapSandbox, SapSettings
from tests.adapters.erp_cloud.samples import PASSWORD, USER, products


@pytest.fixture
async def sandbox() -> AsyncIterator[SapSandbox]:
    """A sandbox on a free port with the sample catalogue and no customers."""
    sap = SapSandbox(username=USER, password=PASSWORD, seed=7)
    sap.seed_products(products())
    await sap.start()
    try:
        yield sap
    finally:
        await sap.aclose()


def settings_for(
    sandbox: SapSandbox, *, password: str = PASSWORD, timeout_s: float = 5.0
) -> SapSettings:
    """Client settings for *sandbox*."""
    assert sandbox.url is not None
    return SapSettings(
        base_url=sandbox.url, username=USER, password=password, timeout_s=timeout_s
    )


@pytest.fixture
async def client(sandbox: SapSandbox) -> AsyncIterator[SapClient]:
    """A client with the sandbox's credentials."""
    async with SapClient(settings_for(sandbox)) as sap:
        yield sap
