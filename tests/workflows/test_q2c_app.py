"""The quote-to-cash application on the embedded default, against the sandboxes.

Deals go from CRM opportunity to completion through the five sandboxes; the
process API shows them across the systems and validates quotes on request.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest

from actors.q2c import DealView, ValidateResponse
from actors.q2c_demo import Plan, drive_deals, start_sandboxes
from broker import Daemon, load_config
from broker.handler import DaemonControl
from canonical.commerce import Account, Quote, QuoteLine
from canonical.scalars import Money
from tests.polling import eventually

pytestmark = pytest.mark.anyio


def _config(tmp_path: Path, systems: dict[str, Any]) -> Any:
    cfg = load_config(
        environ={
            "BROKER__SQLITE__PATH": str(tmp_path / "q2c.sqlite3"),
            "BROKER__CONTROL__SOCKET_PATH": str(tmp_path / "ctl" / "brokerd.sock"),
            "BROKER__HTTP__PORT": "0",
            "BROKER__TOPOLOGY__SHARDS": "2",
            "BROKER__TOPOLOGY__RETRY_TIERS_S": "[0.2, 0.5]",
            "BROKER__LOGGING__LEVEL": "warning",
        }
    )
    topology = msgspec.structs.replace(cfg.topology, systems=tuple(sorted(systems)))
    return msgspec.structs.replace(cfg, systems=systems, topology=topology)


async def test_deals_complete_and_the_process_api_shows_them(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, tmp_path / "systems")
        daemon = Daemon(_config(tmp_path, boxes.systems()))
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(20):
                await daemon.started.wait()
            api = daemon.runtime.http_url
            boxes.push_to(api)
            plan = Plan()
            await drive_deals(boxes, 6, random.Random(2), plan, api, faults=False)
            http = await stack.enter_async_context(aiohttp.ClientSession())

            async def view(deal: str) -> DealView | None:
                async with http.get(f"{api}/api/v1/deals/{deal}") as resp:
                    if resp.status == 404:
                        return None
                    return msgspec.json.decode(await resp.read(), type=DealView)

            async def all_completed() -> bool:
                views = [await view(d) for d in plan.opportunities]
                return all(v is not None and v.stage == "completed" for v in views)

            await eventually(all_completed, timeout_s=60)
            deal = next(iter(plan.opportunities))
            shown = await view(deal)
            assert shown is not None
            kinds = {d.kind: d for d in shown.documents}
            assert {"opportunity", "quote", "order", "invoice"} <= set(kinds)
            order = kinds["order"]
            assert order.native_ids["customer_ref"] == "Q2C-" + deal.removeprefix(
                "deal-"
            )
            assert any(k.startswith("erp_") for k in order.native_ids)
            assert kinds["invoice"].amount == order.amount
            stages = [s.stage for s in shown.stages]
            expected = {"opened", "quoted", "ordering", "booked", "completed"}
            assert expected <= set(stages)
            assert stages[-1] == "completed"
            assert shown.erp in ("cloud", "legacy")
            assert shown.route_rule

            # The registry joins the deal's documents across the systems.
            erp = f"erp_{shown.erp}"
            order_xref = await daemon.runtime.store.xref_get("order", order.id)
            assert order_xref[erp].native_id == order.native_ids[erp]

            # brokerctl status shows each system actor's breaker and calls.
            status = await DaemonControl(daemon).status()
            systems = status["systems"]
            assert set(systems) == {"crm", "cpq", "erp_cloud", "erp_legacy", "billing"}
            assert all(s["breaker"]["state"] == "closed" for s in systems.values())
            assert systems["billing"]["calls"]["ok"] >= 1

            async with http.get(f"{api}/api/v1/deals/deal-nothing") as resp:
                assert resp.status == 404

            # The synchronous validation, with a line below its price floor.
            account = Account(id="acct-1", name="Acme", country="DE", currency="EUR")
            line = QuoteLine(
                number=1,
                sku="HW-SRV-1U",
                quantity=Decimal(1),
                list_price=Decimal("4200.00"),
                unit_price=Decimal("100.00"),
                net_total=Decimal("100.00"),
            )
            quote = Quote(
                id="quote-Q1",
                opportunity_id="opp-1",
                account_id="acct-1",
                currency="EUR",
                lines=(line,),
                net_total=Money(amount=Decimal("100.00"), currency="EUR"),
                status="approved",
                tax_country="DE",
            )
            body = msgspec.json.encode({"quote": quote, "account": account})
            async with http.post(
                f"{api}/api/v1/quotes/quote-Q1/validate", data=body
            ) as resp:
                assert resp.status == 200
                verdict = msgspec.json.decode(await resp.read(), type=ValidateResponse)
            assert not verdict.ok
            assert [v.code for v in verdict.violations] == ["price_below_floor"]
            assert "HW-SRV-1U" in verdict.violations[0].message
            async with http.post(
                f"{api}/api/v1/quotes/quote-OTHER/validate", data=body
            ) as resp:
                assert resp.status == 400

            # With no body the quote and its account are read from CPQ and CRM.
            approved = kinds["quote"].id
            async with http.post(f"{api}/api/v1/quotes/{approved}/validate") as resp:
                assert resp.status == 200
                read = msgspec.json.decode(await resp.read(), type=ValidateResponse)
            assert read.ok, read.violations
            missing = "quote-a0Q000000000000AAA"
            async with http.post(f"{api}/api/v1/quotes/{missing}/validate") as resp:
                assert resp.status == 404
            async with http.post(f"{api}/api/v1/quotes/Q1/validate") as resp:
                assert resp.status == 400

            async with http.get(f"{api}/api/v1/openapi.json") as resp:
                paths = (await resp.json())["paths"]
            assert "/api/v1/deals/{correlation_id}" in paths
            assert "/api/v1/quotes/{quote_id}/validate" in paths
            daemon.request_shutdown("test finished")
