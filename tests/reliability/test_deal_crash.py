"""A deal retried across crashes books one ERP order, one subscription, one invoice.

The daemon runs on RabbitMQ and Postgres against the five sandboxes (in this
process) and kills itself with SIGKILL at a crash point while deals are in
flight; the test restarts it, as its supervisor would. Commands the killed
daemon had carried out but not acknowledged come back and are carried out
again, with the same idempotency keys: the sandboxes must hold exactly one
document per deal, and every deal must complete.
"""

from __future__ import annotations

import random
import socket
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import asyncpg
import msgspec
import pytest

from actors.q2c_demo import Plan, drive_deals, start_sandboxes
from actors.workflows.deal import DealState
from tests.reliability.harness import Daemon
from tests.reliability.scenario import KILLED

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DEALS = 24


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _deal_states(dsn: str) -> list[DealState]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT state FROM saga WHERE workflow = 'deal'")
    finally:
        await conn.close()
    return [msgspec.json.decode(r["state"], type=DealState) for r in rows]


@pytest.mark.timeout(300)  # up to 120 s for the deals after the restart
@pytest.mark.parametrize(
    ("point", "after"), [("after_commit_before_ack", 150), ("mid_txn", 220)]
)
async def test_deals_retried_across_a_crash_book_one_of_each_document(
    daemon: Daemon, pg_dsn: str, tmp_path: Path, point: str, after: int
) -> None:
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, tmp_path / "systems")
        # The systems keep retrying their webhooks while the daemon is down.
        boxes.crm.knobs.push_max_attempts = 20
        boxes.sap.knobs.push_max_attempts = 20
        boxes.stripe.webhook.max_attempts = 20
        port = _free_port()
        http = f"http://127.0.0.1:{port}"
        boxes.push_to(http)
        systems = boxes.systems(
            fast={"rate-per-s": 1000.0, "burst": 100, "concurrency": 8, "prefetch": 16}
        )
        base = {"systems": systems, "http": {"port": port}}
        await daemon.start(
            {**base, "testing": {"crash-at": point, "crash-after": after}}
        )
        await daemon.wait_ready()

        await drive_deals(boxes, DEALS, random.Random(3), Plan(), http, faults=False)
        with anyio.fail_after(60):
            assert await daemon.wait_exit(60) == KILLED, await daemon.log_tail()
        # Killed itself at the point, not failed in some other way.
        assert "crash_injected" in [e["event"] for e in await daemon.log_events()]
        # The crash came mid-stream: the startup's catalogue sync alone stays
        # below the count, and some deals were still open.
        crashed = await _deal_states(pg_dsn)
        assert crashed, "the crash came before any deal started"
        assert not all(s.stage == "completed" for s in crashed)
        await daemon.start(base)
        await daemon.wait_ready()

        states: list[DealState] = []
        with anyio.fail_after(120):
            while True:
                states = await _deal_states(pg_dsn)
                if len(states) == DEALS and all(s.stage == "completed" for s in states):
                    break
                await anyio.sleep(0.25)

        sap_orders = Counter(
            r.entity.PurchaseOrderByCustomer for r in boxes.sap.orders.orders.values()
        )
        legacy_orders = Counter(po for (_, po) in boxes.legacy.orders)
        subscriptions = Counter(
            sub.metadata.get("q2c_deal_id")
            for sub in boxes.stripe.account.subscriptions.values()
        )
        for s in states:
            assert s.order is not None
            assert s.invoice is not None
            ref = s.order.customer_ref
            booked = sap_orders[ref] if s.order.erp == "cloud" else legacy_orders[ref]
            assert booked == 1, f"{s.deal_id}: {booked} ERP orders"
            assert subscriptions[s.deal_id] == (1 if s.needs_subscription else 0)
            assert s.invoice.amount == s.order.net_total
        assert sum(sap_orders.values()) + sum(legacy_orders.values()) == DEALS
        # One invoice per subscription in billing, and one customer per account.
        invoices = Counter(
            inv.subscription_id for inv in boxes.stripe.account.invoices.values()
        )
        assert all(n == 1 for n in invoices.values()), invoices
        assert daemon.runs == 2
