"""The legacy ERP's inbound folder missing at start (`actors.systems`).

An unmounted share, or a path through a file, must cost the daemon only
that folder's reading: the poller logs and waits, its siblings under the
``systems`` supervisor keep running, and once the folder can be made it
reads. Real directories; the transport and the store are stand-ins that
record what they are given.
"""

from __future__ import annotations

import functools
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from actors.systems import _IdocInbound
from adapters.erp_legacy import views as v
from adapters.erp_legacy.idocxml import write_idoc
from adapters.erp_legacy.settings import LegacyErpSettings
from broker import Actor, ChildSpec, Context, Strategy, SupervisorSpec
from broker.config import convert_table
from broker.system import ActorSystem
from tests.fakes import ConfirmingTransport as Transport
from tests.fakes import KeepingStore as Store
from tests.polling import eventually

pytestmark = pytest.mark.anyio

OURS = "Q2C-5C0FFEE0DDBA11AB1E00"


class Rt:
    """The parts of the runtime the inbound poller uses."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.store = Store()
        self.feed = None

    def takes_event(self, event_type: str) -> bool:
        """Every event type has a reader."""
        return True


class Sibling(Actor[str]):
    """Another system's actor under the same supervisor; counts its starts."""

    starts = 0

    async def on_start(self, ctx: Context[str]) -> None:
        """Counted."""
        Sibling.starts += 1

    async def handle(self, msg: str, ctx: Context[str]) -> str:
        """Answers at once."""
        return f"{msg}: pong"


def invoic() -> bytes:
    """An INVOIC02 of one of our orders, as the ERP drops it."""
    return write_idoc(
        v.Invoic02(
            edi_dc40=v.EdiDc40(
                docnum="0000000000000001", idoctyp="INVOIC02", mestyp="INVOIC"
            ),
            e1edk01=v.E1EDK01(curcy="EUR"),
            e1edk02=(
                v.E1EDK02(qualf=v.REF_INVOICE, belnr="0090000001"),
                v.E1EDK02(qualf=v.REF_CUSTOMER_PO, belnr=OURS),
            ),
            e1edk03=(v.E1EDK03(iddat=v.DATE_DOCUMENT, datum="20250306"),),
            e1eds01=(v.E1EDS01(sumid=v.SUM_ITEMS, summe="500.00"),),
        )
    )


async def test_an_inbound_folder_that_cannot_be_made_is_waited_for(
    tmp_path: Path,
) -> None:
    """Logged and retried with back-off; the sibling runs on; then it reads."""
    blocker = tmp_path / "mnt"
    blocker.write_text("not a directory")  # the share is not mounted here
    inbound = blocker / "erp" / "in"
    (tmp_path / "out").mkdir()
    settings = convert_table(
        LegacyErpSettings,
        {
            "outbound-dir": str(tmp_path / "out"),
            "inbound-dir": str(inbound),
            "poll-interval-s": 0.02,
            "settle-s": 0,
        },
        where="[systems.erp_legacy]",
    )
    rt = Rt()
    spec = SupervisorSpec(
        id="systems",
        strategy=Strategy.REST_FOR_ONE,
        intensity=10,
        period_s=60,
        children=[
            ChildSpec(id="billing", start=Sibling, shutdown_s=1),
            ChildSpec(
                id="erp_legacy.inbound",
                start=functools.partial(_IdocInbound, rt, "erp_legacy", settings),  # type: ignore[arg-type]
                shutdown_s=1,
            ),
        ],
    )
    system, started, shutdown = ActorSystem(), anyio.Event(), anyio.Event()
    Sibling.starts = 0

    with capture_logs() as logs:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(system.run, spec, started=started, shutdown=shutdown)
            )
            with anyio.fail_after(10):
                await started.wait()

            async def waited_three_times() -> bool:
                events = [line["event"] for line in logs]
                return events.count("inbound_folders_unavailable") >= 3

            await eventually(waited_three_times)
            assert await system.lookup("billing").ask("ping") == "ping: pong"

            blocker.unlink()  # mounted: the folder can be made now

            async def folders_made() -> bool:
                return (inbound / "processed").is_dir()

            await eventually(folders_made)
            (inbound / "0000000000000001_INVOIC.xml").write_bytes(invoic())

            async def read() -> bool:
                return (inbound / "processed" / "0000000000000001_INVOIC.xml").exists()

            await eventually(read)
            shutdown.set()

    waits = [line for line in logs if line["event"] == "inbound_folders_unavailable"]
    assert all(line["log_level"] == "warning" for line in waits)
    assert "NotADirectoryError" in waits[0]["error"]
    assert [line["retry_in_s"] for line in waits[:3]] == sorted(
        line["retry_in_s"] for line in waits[:3]
    )
    events = [line["event"] for line in logs]
    assert "actor_crashed" not in events
    assert "actor_restarted" not in events
    assert Sibling.starts == 1
    assert [m.type for m in rt.transport.published] == ["erp.invoice.issued"]
