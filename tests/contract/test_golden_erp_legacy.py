"""The legacy ERP's IDocs, pinned byte for byte by golden files.

``erp.order.booking_requested.json`` (an envelope carrying the command) maps
to ``orders05.xml``; the simulated ERP answers that file with the other
``*.xml`` files (shapes defined from the segment grammar, as no public sample
of ORDRSP, DESADV or INVOIC02 exists); each answer maps to the events in its
``*.inbound.json``. Every ``*.xml`` also survives writer → parser → writer.
Regenerate after a deliberate change with
``Q2C_WRITE_GOLDEN=1 pytest tests/contract/test_golden_erp_legacy.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from adapters.erp_legacy import views as v
from adapters.erp_legacy.connector import LegacyErpConnector
from adapters.erp_legacy.files import write_atomic
from adapters.erp_legacy.idocxml import parse_idoc, write_idoc
from adapters.erp_legacy.ingress import inbound_for
from adapters.erp_legacy.mapping import docnum_for, to_orders05
from adapters.erp_legacy.sandbox import LegacyErpSandbox
from adapters.erp_legacy.settings import LegacyErpSettings
from canonical import Envelope
from canonical.q2c import OrderBookingRequested
from tests.adapters.erp_legacy import samples

pytestmark = pytest.mark.anyio

GOLDEN = Path(__file__).parent / "golden" / "erp_legacy"
WRITE = bool(os.environ.get("Q2C_WRITE_GOLDEN"))
ENVELOPE = GOLDEN / "erp.order.booking_requested.json"
ANSWERS = [
    "ordrsp_booked.xml",
    "desadv.xml",
    "invoic02.xml",
    "ordrsp_duplicate.xml",
    "ordrsp_rejected.xml",
]
_encoder = msgspec.json.Encoder()


def pinned(name: str, data: bytes) -> bytes:
    """Compare *data* with the golden file *name* (or rewrite it when asked)."""
    path = GOLDEN / name
    if WRITE:
        path.write_bytes(data)
    assert data == path.read_bytes(), f"{name} changed: see {path}"
    return data


def pretty(value: object) -> bytes:
    return msgspec.json.format(_encoder.encode(value), indent=2) + b"\n"


def golden_command() -> tuple[OrderBookingRequested, Envelope]:
    if WRITE:
        command = OrderBookingRequested(order=samples.order())
        ENVELOPE.write_bytes(pretty(samples.booking(command)))
    envelope = msgspec.json.decode(ENVELOPE.read_bytes(), type=Envelope)
    return msgspec.json.decode(envelope.data, type=OrderBookingRequested), envelope


def settings(root: Path) -> LegacyErpSettings:
    return samples.settings(root)


async def test_the_booking_command_maps_to_the_golden_orders05(tmp_path: Path) -> None:
    """Canonical command → connector → ORDERS05 bytes; the bytes parse back equal."""
    command, envelope = golden_command()
    await LegacyErpConnector(settings(tmp_path)).handle(command, envelope)
    (written,) = (tmp_path / "out").iterdir()
    data = pinned("orders05.xml", written.read_bytes())
    expected = to_orders05(
        command.order,
        docnum=written.stem.removeprefix("ORDERS_"),
        created_at=envelope.time,
        settings=settings(tmp_path),
    )
    assert parse_idoc(data) == expected


async def answer(
    tmp_path: Path, orders: list[v.Orders05], error_rate: float
) -> list[bytes]:
    erp = LegacyErpSandbox(tmp_path / "out", tmp_path / "in", now=lambda: samples.NOW)
    erp.knobs.error_rate = error_rate
    for idoc in orders:
        name = f"ORDERS_{idoc.edi_dc40.docnum}"
        await write_atomic(tmp_path / "out", name, write_idoc(idoc))
        await erp.process_once()
        await erp.process_once()
    return [p.read_bytes() for p in sorted((tmp_path / "in").glob("*.xml"))]


async def test_the_simulated_erp_answers_with_the_golden_idocs(tmp_path: Path) -> None:
    """Booked (+ DESADV, INVOIC02), then the same PO again, and a refusal."""
    command, envelope = golden_command()
    order = to_orders05(
        command.order,
        docnum=docnum_for(envelope.idempotency_key),
        created_at=envelope.time,
        settings=settings(tmp_path),
    )
    resent = msgspec.structs.replace(
        order,
        edi_dc40=msgspec.structs.replace(order.edi_dc40, docnum="0000000000000777"),
    )
    samples.settings(tmp_path / "a")
    samples.settings(tmp_path / "b")
    booked = await answer(tmp_path / "a", [order, resent], 0.0)
    rejected = await answer(tmp_path / "b", [order], 1.0)
    assert len(booked) == 4
    assert len(rejected) == 1
    for name, data in zip(ANSWERS, [*booked, *rejected], strict=True):
        pinned(name, data)


@pytest.mark.parametrize("name", ["orders05.xml", *ANSWERS])
def test_golden_idocs_round_trip_through_the_writer(name: str) -> None:
    """Parsing then writing gives the very same bytes."""
    data = (GOLDEN / name).read_bytes()
    assert write_idoc(parse_idoc(data)) == data


@pytest.mark.parametrize("name", ANSWERS)
def test_golden_answers_map_to_the_golden_events(name: str) -> None:
    """Each answer's Inbound (event, DOCNUM id, deal, fact key) is pinned."""
    idoc = parse_idoc((GOLDEN / name).read_bytes())
    inbound = inbound_for(idoc, samples.KEY)
    pinned(name.replace(".xml", ".inbound.json"), pretty(inbound))
