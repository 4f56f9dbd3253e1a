"""The daemon's read-only lookups for operators: ``xref`` and ``queues``.

On the in-process transport and an on-disk SQLite store, through the
control handler the socket calls, and rendered as ``brokerctl`` prints them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.control.ctl import render
from broker.control.protocol import QueuesRequest, XrefFindRequest, XrefGetRequest
from broker.errors import ControlError
from broker.handler import DaemonControl
from broker.transport import OutgoingMessage
from broker.transport.topology import DEAD_QUEUE, EVENTS_EXCHANGE
from broker.xref import XrefEntry
from tests.runtime.test_engine import OUT, config, publish, running

pytestmark = pytest.mark.anyio

ORDER = "order-006A"


def order_entry(system: str, native_id: str, digest: str = "") -> XrefEntry:
    return XrefEntry(
        kind="order",
        canonical_id=ORDER,
        system=system,
        native_id=native_id,
        content_hash=digest,
    )


async def test_xref_get_lists_every_systems_id_by_system(tmp_path: Path) -> None:
    """Entries come back sorted by system, with hash and time; unknown ids give []."""
    async with running(config(tmp_path)) as daemon:
        await daemon.runtime.store.xref_put(
            [
                order_entry("erp_legacy", "0000081234"),
                order_entry("erp_cloud", "4711", "9f2c0e1d7a6b5c4d3e2f1a0b"),
            ]
        )
        control = DaemonControl(daemon)
        found = await control.xref_get("order", ORDER)
        missing = await control.xref_get("order", "order-none")
        other_kind = await control.xref_get("account", ORDER)

    assert [(e["system"], e["native_id"], e["content_hash"]) for e in found] == [
        ("erp_cloud", "4711", "9f2c0e1d7a6b5c4d3e2f1a0b"),
        ("erp_legacy", "0000081234", ""),
    ]
    assert all(e["kind"] == "order" and e["canonical_id"] == ORDER for e in found)
    assert all(isinstance(e["updated_at"], str) for e in found)
    assert missing == other_kind == []
    table = render(XrefGetRequest(kind="order", canonical_id=ORDER), found)
    header = "SYSTEM      NATIVE ID   CONTENT HASH              UPDATED"
    assert table.splitlines()[0] == header
    assert table.splitlines()[1].startswith("erp_cloud   4711        9f2c0e1d")


async def test_xref_find_names_the_canonical_id_or_raises_key_error(
    tmp_path: Path,
) -> None:
    """A bound native id leads to its canonical id; an unbound one is KeyError."""
    async with running(config(tmp_path)) as daemon:
        await daemon.runtime.store.xref_put([order_entry("erp_cloud", "4711")])
        control = DaemonControl(daemon)
        entry = await control.xref_find("order", "erp_cloud", "4711")
        with pytest.raises(KeyError, match="no order is known by erp_cloud id '1'"):
            await control.xref_find("order", "erp_cloud", "1")
        with pytest.raises(KeyError):
            await control.xref_find("order", "erp_legacy", "4711")

    assert (entry["canonical_id"], entry["system"], entry["native_id"]) == (
        ORDER,
        "erp_cloud",
        "4711",
    )
    text = render(
        XrefFindRequest(kind="order", system="erp_cloud", native_id="4711"), entry
    )
    assert text.startswith(f"erp_cloud order 4711 is order {ORDER} (updated ")
    assert text.endswith(f"every system's id: brokerctl xref get order {ORDER}")


async def test_queues_on_the_in_process_transport_counts_its_queues(
    tmp_path: Path,
) -> None:
    """Every q2c.* queue with ready, unacked and consumer counts; no vhost, no URL."""
    async with running(config(tmp_path)) as daemon:
        await publish(
            daemon,
            [
                OutgoingMessage(
                    exchange=EVENTS_EXCHANGE,
                    routing_key="ledger.entry.applied",
                    body=b"{}",
                    message_id=f"m-{n}",
                )
                for n in range(3)
            ],
        )
        result = await DaemonControl(daemon).queues()

    assert (result["transport"], result["vhost"]) == ("memory", None)
    by_name = {q["name"]: q for q in result["queues"]}
    assert list(by_name) == sorted(by_name)
    assert all(name.startswith("q2c.") for name in by_name)
    assert by_name[OUT] == {
        "name": OUT,
        "type": "in-process",
        "ready": 3,
        "unacked": 0,
        "consumers": 0,
    }
    assert DEAD_QUEUE in by_name
    assert any(q["consumers"] for q in result["queues"])
    assert "guest" not in repr(result)
    text = render(QueuesRequest(), result)
    assert text.splitlines()[0].split() == [
        "QUEUE",
        "TYPE",
        "READY",
        "UNACKED",
        "CONSUMERS",
    ]
    assert text.splitlines()[-1].startswith(
        f"{len(by_name)} queues on the in-process transport: 3 ready, "
    )


async def test_queues_without_counts_from_the_transport_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transport whose status has no queue counts gets a ControlError, not a crash."""
    async with running(config(tmp_path)) as daemon:
        monkeypatch.setattr(daemon.runtime.transport, "status", dict)
        with pytest.raises(ControlError, match="not available on the in-process"):
            await DaemonControl(daemon).queues()
