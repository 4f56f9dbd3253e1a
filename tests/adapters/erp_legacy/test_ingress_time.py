"""Inbound IDocs: an event's time is the control record's CREDAT / CRETIM.

The same IDoc read again keeps its control record, so whenever the poller
reads it, its inbox key falls on the day the ERP created it, not on today.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import msgspec
import pytest

from adapters.erp_legacy import views as v
from adapters.erp_legacy.connector import LegacyErpConnector
from adapters.erp_legacy.files import InboundPoller
from adapters.erp_legacy.idocxml import parse_idoc, parse_idocs
from adapters.erp_legacy.ingress import inbound_for
from adapters.erp_legacy.sandbox import LegacyErpSandbox
from broker.errors import ConfigError, SchemaInvalid
from canonical.q2c import OrderBookingRequested
from tests.adapters.arrival import inbox_key_on_arrival
from tests.adapters.erp_legacy import samples

pytestmark = pytest.mark.anyio

SAMPLE = (
    Path(__file__).resolve().parents[3]
    / ".."
    / "shared"
    / "payloads"
    / "idoc_orders05_purchase_order.xml"
)


async def ordrsp(tmp_path: Path) -> v.Idoc:
    """The ORDRSP the simulated ERP answers the sample order with, at samples.NOW."""
    connector = LegacyErpConnector(samples.settings(tmp_path))
    erp = LegacyErpSandbox(tmp_path / "out", tmp_path / "in", now=lambda: samples.NOW)
    command = OrderBookingRequested(order=samples.order())
    await connector.handle(command, samples.booking(command, key="book-0"))
    (answer,) = [
        i for i in await answers(erp, tmp_path) if i.edi_dc40.mestyp == "ORDRSP"
    ]
    return answer


async def answers(erp: LegacyErpSandbox, tmp_path: Path) -> list[v.Idoc]:
    """Let the simulated ERP answer what is in its outbound folder; read it all."""
    await erp.process_once()
    await erp.process_once()
    read: list[v.Idoc] = []

    async def handle(name: str, idocs: tuple[v.Idoc, ...]) -> None:
        read.extend(idocs)

    poller = InboundPoller(
        tmp_path / "in", parse=parse_idocs, handle=handle, settle_s=0
    )
    await poller.poll_once()
    await poller.poll_once()
    return read


def created(idoc: v.Idoc, credat: str | None, cretim: str | None) -> v.Idoc:
    control = msgspec.structs.replace(idoc.edi_dc40, credat=credat, cretim=cretim)
    return msgspec.structs.replace(idoc, edi_dc40=control)


async def test_the_same_idoc_read_again_after_midnight_claims_the_originals_day(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read at 23:59:59 and again at 00:00:05: one inbox key, on the ERP's day."""
    idoc = await ordrsp(tmp_path)
    moments = (
        datetime(2025, 3, 4, 23, 59, 59, tzinfo=UTC),
        datetime(2025, 3, 5, 0, 0, 5, tzinfo=UTC),
    )
    keys = {
        inbox_key_on_arrival(monkeypatch, at, lambda: inbound_for(idoc, samples.KEY))
        for at in moments
    }
    assert len(keys) == 1
    ((_, day),) = keys
    assert day == samples.NOW.date()
    assert inbound_for(idoc, samples.KEY).time == samples.NOW


async def test_without_credat_the_time_is_left_to_the_publisher(
    tmp_path: Path,
) -> None:
    """No CREDAT: None (the arrival stands in), whatever CRETIM says."""
    idoc = created(await ordrsp(tmp_path), None, "102030")
    assert inbound_for(idoc, samples.KEY).time is None


async def test_credat_without_cretim_is_that_days_midnight(tmp_path: Path) -> None:
    """The day is what the inbox key needs; the time of day defaults to 00:00."""
    idoc = created(await ordrsp(tmp_path), "20250304", None)
    assert inbound_for(idoc, samples.KEY).time == datetime(2025, 3, 4, tzinfo=UTC)


@pytest.mark.parametrize(
    ("credat", "cretim", "field"),
    [
        ("20251399", "102030", "CREDAT"),
        ("2025-03-04", "102030", "CREDAT"),
        ("00000000", "102030", "CREDAT"),
        ("20250304", "246000", "CRETIM"),
    ],
)
async def test_a_creation_stamp_that_is_no_datetime_is_schema_invalid(
    tmp_path: Path, credat: str, cretim: str, field: str
) -> None:
    """Refused naming the field (a dead letter of its own), not a crash."""
    idoc = created(await ordrsp(tmp_path), credat, cretim)
    with pytest.raises(SchemaInvalid, match=field):
        inbound_for(idoc, samples.KEY)


async def test_the_published_control_records_stamp_is_the_time(tmp_path: Path) -> None:
    """The public ORDERS05 sample's CREDAT 20141217 / CRETIM 143321, on an ORDRSP."""
    if not SAMPLE.is_file():
        pytest.skip(f"{SAMPLE} is absent (the shared payload corpus is not here)")
    control = parse_idoc(SAMPLE.read_bytes()).edi_dc40
    idoc = created(await ordrsp(tmp_path), control.credat, control.cretim)
    at = inbound_for(idoc, samples.KEY).time
    assert at == datetime(2014, 12, 17, 14, 33, 21, tzinfo=UTC)
    assert at.date() == date(2014, 12, 17)


BERLIN = ZoneInfo("Europe/Berlin")


async def test_stamps_are_the_erps_local_time_read_in_its_zone(tmp_path: Path) -> None:
    """An ERP in Berlin stamps 00:30 on 5 March for 23:30 UTC on the 4th.

    Read as UTC, the IDoc's inbox key would fall a day late, and a resend
    read the evening before would not dedup against it.
    """
    at = datetime(2025, 3, 4, 23, 30, tzinfo=UTC)
    idoc = created(await ordrsp(tmp_path), "20250305", "003000")
    assert inbound_for(idoc, samples.KEY, zone=BERLIN).time == at
    assert inbound_for(idoc, samples.KEY).time == datetime(
        2025, 3, 5, 0, 30, tzinfo=UTC
    )


async def test_the_repeated_hour_of_a_clock_change_takes_the_earlier_reading(
    tmp_path: Path,
) -> None:
    """02:30 on 26 October 2025 happens twice in Berlin; the first is 00:30 UTC."""
    idoc = created(await ordrsp(tmp_path), "20251026", "023000")
    assert inbound_for(idoc, samples.KEY, zone=BERLIN).time == datetime(
        2025, 10, 26, 0, 30, tzinfo=UTC
    )


async def test_an_erp_in_another_zone_round_trips_through_the_sandbox(
    tmp_path: Path,
) -> None:
    """The ORDERS IDoc is stamped in the ERP's zone, and so are its answers.

    The simulated ERP in Berlin answers at samples.NOW; the connector,
    configured for Berlin, writes the order's stamps in Berlin time, and
    the answers' events carry the same instant in UTC, for booking,
    shipment and invoice alike.
    """
    settings = samples.settings(tmp_path, timezone="Europe/Berlin")
    connector = LegacyErpConnector(settings)
    erp = LegacyErpSandbox(
        tmp_path / "out", tmp_path / "in", now=lambda: samples.NOW, zone=BERLIN
    )
    command = OrderBookingRequested(order=samples.order())
    envelope = samples.booking(command, key="book-0")
    await connector.handle(command, envelope)
    (written,) = (tmp_path / "out").glob("ORDERS_*.xml")
    control = parse_idoc(written.read_bytes()).edi_dc40
    local = envelope.time.astimezone(BERLIN)
    assert (control.credat, control.cretim) == (
        local.strftime("%Y%m%d"),
        local.strftime("%H%M%S"),
    )
    read = await answers(erp, tmp_path)
    assert {i.edi_dc40.mestyp for i in read} >= {"ORDRSP", "INVOIC"}
    for idoc in read:
        assert idoc.edi_dc40.cretim == samples.NOW.astimezone(BERLIN).strftime("%H%M%S")
        assert inbound_for(idoc, samples.KEY, zone=settings.zone).time == samples.NOW


def test_a_timezone_that_is_no_iana_name_is_refused(tmp_path: Path) -> None:
    """A typo in the config is an error naming the key, not UTC in silence."""
    with pytest.raises(ConfigError, match=r"\[systems.erp_legacy\]: timezone"):
        samples.settings(tmp_path, timezone="Europe/Berln")
