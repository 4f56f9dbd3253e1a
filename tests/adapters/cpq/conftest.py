from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.adapters.crm.harness import Org, running_org


@pytest.fixture
async def org() -> AsyncIterator[Org]:
    """A fresh sandbox org, and a client logged in to it."""
    async with running_org(seed=7) as running:
        yield running
