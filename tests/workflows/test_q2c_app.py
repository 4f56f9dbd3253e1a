"""The quote-to-cash application on the embedded default, against the sandboxes.

Deals go from CRM opportunity to completion through the five sandboxes; the
process API shows them across the systems and validates quotes on request.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, MutableMapping
from contextlib import AsyncExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import msgspec
import pytest
from structlog.testing import capture_logs

from actors.q2c import DealView, ValidateResponse
from actors.q2c_demo import Plan, Sandboxes, drive_deals, start_sandboxes
from actors.workflows.deal import DealState
from actors.workflows.sync import CatalogState
from broker import Daemon, load_config
from broker.codec import encode_envelope, utcnow
from broker.handler import DaemonControl
from broker.store import DeadLetterFilter
from broker.transport import OutgoingMessage, PublishOutcome
from canonical import Envelope
from canonical.commerce import Account, Quote, QuoteLine
from canonical.scalars import Money
from tests.polling import eventually

pytestmark = pytest.mark.anyio


def _vendor_requests(metrics: str) -> dict[str, float]:
    """``q2c_vendor_requests_total`` summed by system, from ``/metrics`` text."""
    made: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("q2c_vendor_requests_total{"):
            labels, _, value = line.partition("} ")
            system = labels.split('system="', 1)[1].split('"', 1)[0]
            made[system] = made.get(system, 0.0) + float(value)
    return made


def _config(tmp_path: Path, systems: dict[str, Any]) -> Any:
    cfg = load_config(
        environ={
            "BROKER__SQLITE__PATH": str(tmp_path / "q2c.sqlite3"),
            "BROKER__MEMORY__JOURNAL": str(tmp_path / "queues.sqlite3"),
            "BROKER__CONTROL__SOCKET_PATH": str(tmp_path / "ctl" / "brokerd.sock"),
            "BROKER__HTTP__PORT": "0",
            "BROKER__TOPOLOGY__SHARDS": "2",
            "BROKER__TOPOLOGY__RETRY_TIERS_S": "[0.2, 0.5]",
            "BROKER__LOGGING__LEVEL": "warning",
        }
    )
    topology = msgspec.structs.replace(cfg.topology, systems=tuple(sorted(systems)))
    return msgspec.structs.replace(cfg, systems=systems, topology=topology)


def _crm_by_pull(boxes: Sandboxes) -> dict[str, Any]:
    """The sandboxes' systems with the CRM's change feed followed by pull.

    The org pushes nothing, and the CRM has no webhook.
    """
    systems = boxes.systems()
    systems["crm"] = {**systems["crm"], "change-feed": "pull"}
    del systems["crm"]["webhook-secrets"]
    boxes.crm.knobs.push_url = None
    return systems


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
            # What holds a deal, and the duplicates to cancel, are shown too.
            async with http.get(f"{api}/api/v1/deals/{deal}") as resp:
                raw = await resp.json()
            assert (raw["open_exceptions"], raw["duplicate_orders"]) == ([], [])

            # Every request made of a vendor is counted, as the vendor counts it
            # (once no call is in flight: a vendor counts a request first).
            async def counted_alike() -> dict[str, float]:
                async with http.get(f"{api}/metrics") as resp:
                    made = _vendor_requests(await resp.text())
                org = boxes.crm.state()
                alike = (
                    made.get("crm", 0) + made.get("cpq", 0)
                    == org["api_requests"] + org["tokens_issued"]
                    and made.get("erp_cloud") == boxes.sap.state()["requests"]
                    and made.get("billing") == boxes.stripe.counts["requests"]
                )
                return made if alike else {}

            made = await eventually(counted_alike)
            assert made["billing"] > 0
            assert made["erp_cloud"] > 0

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

            # The check the deal makes before ordering: a quote made out to
            # another account than its opportunity's is refused, the
            # opportunity's account taken from the body, or from the deal
            # once it knows the opportunity (whatever the body says).
            at_list = msgspec.structs.replace(
                line, unit_price=Decimal("4200.00"), net_total=Decimal("4200.00")
            )
            for_other = msgspec.structs.replace(
                quote,
                lines=(at_list,),
                net_total=Money(amount=Decimal("4200.00"), currency="EUR"),
                account_id="acct-2",
            )
            opportunity = "opp-" + deal.removeprefix("deal-")
            other = Account(id="acct-2", name="Other AG", country="DE", currency="EUR")
            for checked, named in (
                (for_other, account),
                (
                    msgspec.structs.replace(for_other, opportunity_id=opportunity),
                    other,
                ),
            ):
                body = msgspec.json.encode({"quote": checked, "account": named})
                async with http.post(
                    f"{api}/api/v1/quotes/quote-Q1/validate", data=body
                ) as resp:
                    assert resp.status == 200
                    verdict = msgspec.json.decode(
                        await resp.read(), type=ValidateResponse
                    )
                assert [v.code for v in verdict.violations] == ["account_mismatch"]
            record = await daemon.runtime.store.load_saga("deal", deal)
            assert record is not None
            held = msgspec.json.decode(record.state, type=DealState).opportunity
            assert held is not None
            message = verdict.violations[0].message
            assert f"opportunity is for account {held.account.id} " in message

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
                document = await resp.json()
            paths = document["paths"]
            assert "/api/v1/deals/{correlation_id}" in paths
            assert "/api/v1/quotes/{quote_id}/validate" in paths
            shown_fields = document["components"]["schemas"]["DealView"]["properties"]
            for added in ("open_exceptions", "duplicate_orders"):
                assert shown_fields[added]["type"] == "array"
            # JSON Schema patterns are ECMA-262: "$" ends them; "\\Z" is no anchor.
            patterns = list(_patterns(document))
            assert any(p.endswith("$") for p in patterns)
            assert not any(p.endswith("\\Z") for p in patterns)
            daemon.request_shutdown("test finished")


def _patterns(node: object) -> Iterator[str]:
    """Every ``pattern`` in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from _patterns(value)
    elif isinstance(node, list):
        for value in node:
            yield from _patterns(value)


async def test_a_poison_message_holds_its_deal_only_until_it_is_purged(
    tmp_path: Path,
) -> None:
    """A deal's bad message parks it; its later facts wait, other deals go on."""
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, tmp_path / "systems")
        daemon = Daemon(_config(tmp_path, boxes.systems()))
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(20):
                await daemon.started.wait()
            rt = daemon.runtime
            boxes.push_to(rt.http_url)
            crm = boxes.crm
            account = crm.seed_account("Held AG", country_code="DE", currency="EUR")
            opportunity = crm.create_opportunity(account, "Held deal")
            deal = f"deal-{opportunity}"

            # A message for the deal whose data no schema reads: dead-lettered,
            # and the deal is held behind it.
            poison = Envelope(
                id="poison-1",
                source="/test",
                type="cpq.quote.approved",
                time=utcnow(),
                correlation_id=deal,
                idempotency_key="poison-1",
                data=msgspec.Raw(b'{"type": "cpq.quote.approved", "quote": 42}'),
            )
            outcome = await rt.transport.publish(
                [
                    OutgoingMessage(
                        exchange="q2c.events",
                        routing_key=poison.type,
                        body=encode_envelope(poison),
                        message_id=poison.id,
                        correlation_id=deal,
                        type=poison.type,
                    )
                ],
                timeout_s=5,
            )
            assert outcome == [PublishOutcome.ACK]
            store = rt.store

            async def poisoned() -> bool:
                return any(
                    r.message_id == "poison-1"
                    for r in await store.list_dead_letters(DeadLetterFilter())
                )

            await eventually(poisoned, timeout_s=20)

            # The deal's quote is approved now; another deal runs alongside.
            quote = crm.create_quote(opportunity)
            crm.add_quote_line(
                quote,
                product_code="SAAS-ANL",
                quantity=Decimal(10),
                list_price=Decimal("30.00"),
                net_price=Decimal("28.00"),
            )
            crm.approve_quote(quote)
            plan = Plan()
            await drive_deals(
                boxes, 2, random.Random(9), plan, rt.http_url, faults=False
            )

            async def state(d: str) -> DealState | None:
                record = await store.load_saga("deal", d)
                return (
                    None
                    if record is None
                    else msgspec.json.decode(record.state, type=DealState)
                )

            async def others_done_and_ours_held() -> bool:
                others = [await state(d) for d in plan.opportunities]
                held = await store.list_dead_letters(
                    DeadLetterFilter(status="held", correlation_id=deal)
                )
                return bool(held) and all(
                    s is not None and s.stage == "completed" for s in others
                )

            await eventually(others_done_and_ours_held, timeout_s=60)
            ours = await state(deal)
            assert ours is None or ours.order is None  # nothing applied past it

            await store.purge_dead_letters(
                DeadLetterFilter(correlation_id=deal, reason="schema_invalid"),
                dry_run=False,
            )

            async def ours_completed() -> bool:
                s = await state(deal)
                return s is not None and s.stage == "completed"

            await eventually(ours_completed, timeout_s=60)
            daemon.request_shutdown("test finished")


async def test_a_crm_read_by_pull_follows_its_change_feed_by_replay_id(
    tmp_path: Path,
) -> None:
    """Without a signing relay the daemon reads the CDC feed itself, durably."""
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, tmp_path / "systems")
        daemon = Daemon(_config(tmp_path, _crm_by_pull(boxes)))
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(20):
                await daemon.started.wait()
            rt = daemon.runtime
            boxes.push_to(rt.http_url)
            boxes.crm.knobs.push_url = None  # the org pushes nothing
            plan = Plan()
            await drive_deals(
                boxes, 3, random.Random(4), plan, rt.http_url, faults=False
            )

            async def all_completed() -> bool:
                for deal in plan.opportunities:
                    record = await rt.store.load_saga("deal", deal)
                    if record is None:
                        return False
                    state = msgspec.json.decode(record.state, type=DealState)
                    if state.stage != "completed":
                        return False
                return True

            await eventually(all_completed, timeout_s=60)
            cursor = await rt.store.load_saga("cursor", "cdc:crm:/data/ChangeEvents")
            assert cursor is not None
            assert int(cursor.state) > 0
            assert boxes.crm.counts["push_sent"] == 0
            daemon.request_shutdown("test finished")


async def test_a_refused_catalogue_read_leaves_every_system_running(
    tmp_path: Path,
) -> None:
    """SAP refuses the product API (403): logged once, nothing crashes or restarts.

    The catalogue is read in the background at start; a refusal is the
    operator's to fix, and must not take the CRM, CPQ and billing down with
    the ERP's client.
    """
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, tmp_path / "systems")
        boxes.sap.knobs.forbidden_services = frozenset({"API_PRODUCT_SRV"})
        daemon = Daemon(_config(tmp_path, boxes.systems()))
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon.run)
                with anyio.fail_after(20):
                    await daemon.started.wait()

                async def refused() -> bool:
                    return any(line["event"] == "catalogue_refused" for line in logs)

                await eventually(refused)
                systems = (await DaemonControl(daemon).status())["systems"]
                daemon.request_shutdown("test finished")
    events = [line["event"] for line in logs]
    assert events.count("catalogue_refused") == 1
    assert "actor_crashed" not in events
    assert "actor_restarted" not in events
    assert set(systems) == {"crm", "cpq", "erp_cloud", "erp_legacy", "billing"}
    assert boxes.sap.state()["forbidden"] >= 1


async def test_a_refused_change_feed_waits_and_resumes_where_it_was(
    tmp_path: Path,
) -> None:
    """403 on the CDC channel: logged and retried with back-off, then it reads."""
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, tmp_path / "systems")
        boxes.crm.knobs.feed_refused = True
        daemon = Daemon(_config(tmp_path, _crm_by_pull(boxes)))
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon.run)
                with anyio.fail_after(20):
                    await daemon.started.wait()
                rt = daemon.runtime

                async def refused_twice() -> bool:
                    events = [line["event"] for line in logs]
                    return events.count("change_feed_refused") >= 2

                await eventually(refused_twice, timeout_s=20)
                boxes.crm.seed_account("Acme After The Fix")
                boxes.crm.knobs.feed_refused = False

                async def cursor_moved() -> bool:
                    cursor = await rt.store.load_saga(
                        "cursor", "cdc:crm:/data/ChangeEvents"
                    )
                    return cursor is not None and int(cursor.state) > 0

                await eventually(cursor_moved, timeout_s=30)
                daemon.request_shutdown("test finished")
    events = [line["event"] for line in logs]
    assert "actor_crashed" not in events
    assert boxes.crm.counts["feed_refused"] >= 2


async def test_the_erp_catalogue_is_read_again_and_its_changes_reach_the_cpq(
    tmp_path: Path,
) -> None:
    """A refused read is tried again; products added or repriced later arrive.

    The catalogue comes a page at a time (``__next``); each refresh
    announces only what changed, and the CPQ gets the new product and the
    new price.
    """
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, tmp_path / "systems")
        boxes.sap.knobs.max_page_size = 7
        boxes.sap.knobs.forbidden_services = frozenset({"API_PRODUCT_SRV"})
        systems = boxes.systems()
        systems["erp_cloud"] = {**systems["erp_cloud"], "catalogue-refresh-s": 1.0}
        daemon = Daemon(_config(tmp_path, systems))
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon.run)
                with anyio.fail_after(20):
                    await daemon.started.wait()
                store = daemon.runtime.store

                def loaded() -> list[MutableMapping[str, Any]]:
                    return [
                        line for line in logs if line["event"] == "catalogue_loaded"
                    ]

                async def refused() -> bool:
                    return any(line["event"] == "catalogue_refused" for line in logs)

                async def read_once() -> bool:
                    return bool(loaded())

                async def read_twice_more() -> bool:
                    return len(loaded()) >= 3

                await eventually(refused)
                boxes.sap.knobs.forbidden_services = frozenset()
                await eventually(read_once, timeout_s=10)
                first = loaded()[0]
                assert first["products"] == first["changed"] == 20

                old = boxes.sap.partners.products["SVC-HEALTH"]
                boxes.sap.seed_products(
                    [
                        msgspec.structs.replace(
                            old, Product="SVC-AUDIT", ProductDescription="Audit"
                        ),
                        msgspec.structs.replace(old, ListPrice=Decimal("3900.00")),
                    ]
                )

                async def synced() -> bool:
                    new = await store.load_saga("catalog", "SVC-AUDIT")
                    repriced = await store.load_saga("catalog", "SVC-HEALTH")
                    if new is None or repriced is None:
                        return False
                    new_state = msgspec.json.decode(new.state, type=CatalogState)
                    old_state = msgspec.json.decode(repriced.state, type=CatalogState)
                    return (
                        new_state.cpq_product is not None
                        and old_state.syncs_requested == 2
                        and old_state.prices[0].list_price == Decimal("3900.00")
                    )

                await eventually(synced, timeout_s=20)
                await eventually(read_twice_more, timeout_s=10)
                daemon.request_shutdown("test finished")
    later = [line["changed"] for line in loaded()[1:]]
    assert 2 in later
    assert sum(later) == 2  # the rest of the reads found nothing new
    assert boxes.sap.state()["forbidden"] >= 1


def _health_price(boxes: Sandboxes) -> Decimal | None:
    """The CPQ's EUR list price of ``SVC-HEALTH`` (None: not synced yet)."""
    org = boxes.crm.org
    entry = org.find("PricebookEntry", "Broker_Key__c", "SVC-HEALTH:EUR")
    if entry is None:
        return None
    price = org.get("PricebookEntry", entry)["UnitPrice"]
    return Decimal(str(price))


async def test_a_price_back_at_an_earlier_value_reaches_the_cpq_and_a_restart_is_quiet(
    tmp_path: Path,
) -> None:
    """3500 → 3900 → 3500 on one day: the CPQ ends at 3500; a restart announces nothing.

    Each change of a product is its own fact, so a price returning to a
    value it had earlier that day is not mistaken for a repeat of the first
    announcement. A restart reads the whole catalogue again: what was
    announced before it is not announced again.
    """
    async with AsyncExitStack() as stack:
        boxes = await start_sandboxes(stack, tmp_path / "systems")
        systems = boxes.systems()
        systems["erp_cloud"] = {**systems["erp_cloud"], "catalogue-refresh-s": 1.0}
        cfg = _config(tmp_path, systems)
        original = boxes.sap.partners.products["SVC-HEALTH"]

        async def catalog() -> CatalogState | None:
            record = await daemon.runtime.store.load_saga("catalog", "SVC-HEALTH")
            if record is None:
                return None
            return msgspec.json.decode(record.state, type=CatalogState)

        def reprice(price: str) -> None:
            boxes.sap.seed_products(
                [msgspec.structs.replace(original, ListPrice=Decimal(price))]
            )

        def at(price: str, syncs: int) -> Any:
            async def probe() -> bool:
                state = await catalog()
                return (
                    state is not None
                    and state.syncs_requested == syncs
                    and state.prices[0].list_price == Decimal(price)
                    and _health_price(boxes) == Decimal(price)
                )

            return probe

        daemon = Daemon(cfg)
        async with anyio.create_task_group() as tg:
            tg.start_soon(daemon.run)
            with anyio.fail_after(20):
                await daemon.started.wait()
            await eventually(at("3500.00", 1), timeout_s=20)
            reprice("3900.00")
            await eventually(at("3900.00", 2), timeout_s=20)
            reprice("3500.00")
            await eventually(at("3500.00", 3), timeout_s=20)
            daemon.request_shutdown("test finished")

        daemon = Daemon(cfg)
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                tg.start_soon(daemon.run)
                with anyio.fail_after(20):
                    await daemon.started.wait()

                async def loaded() -> list[MutableMapping[str, Any]]:
                    return [
                        line for line in logs if line["event"] == "catalogue_loaded"
                    ]

                first = (await eventually(loaded, timeout_s=20))[0]
                daemon.request_shutdown("test finished")
    assert first["products"] == 20
    assert first["changed"] == 0
