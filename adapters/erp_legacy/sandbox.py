"""A simulated legacy ERP on two folders: it reads ORDERS05, answers in IDocs.

It behaves like the ERP at its file port: it polls the folder the broker
writes to (only complete ``*.xml`` files, through the same `InboundPoller`),
"posts" each ORDERS IDoc as a sales order, and drops its answers into the
folder the broker reads, each written as ``<name>.tmp`` then renamed:

1. ORDRSP: accepted with a new 10-digit order number, or rejected (a business
   refusal; see the conventions in `views`).
2. DESADV (DELVRY03), when the order has physical items (``PSTYV`` not ``TAD``).
3. INVOIC02 for every item.

The SD customer-reference check is simulated: the same sold-to party and
customer PO (``E1EDK02 QUALF 001``) again creates no second order; it answers
with an ORDRSP for the existing order and a warning text, and nothing else.

This is a test double for tests, the demo and benchmarks: its order table is
in memory and grows with every order, on purpose without a bound. ORDRSP,
DESADV and INVOIC02 are shaped from the documented segment grammar, as no
public sample of them exists.
"""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import final

import anyio
import anyio.to_thread
import msgspec
import structlog
from anyio.abc import TaskGroup, TaskStatus

from adapters.erp_legacy import views as v
from adapters.erp_legacy.files import InboundPoller, write_atomic
from adapters.erp_legacy.idocxml import (
    IdocInvalid,
    fmt_amount,
    fmt_date,
    fmt_docnum,
    fmt_time,
    parse_decimal,
    parse_idocs,
    write_idoc,
)
from adapters.numbering import first_number
from broker.errors import UpstreamUnavailable

__all__ = ["LegacyErpSandbox", "Knobs", "SandboxState"]

_log = structlog.get_logger(__name__)

#: Rejection reasons (``ABGRU`` / ``AUGRU``) the sandbox gives.
REFUSED = "Z1"
INCOMPLETE = "Z2"


@dataclass(kw_only=True)
class Knobs:
    """Behaviour switches, settable while the sandbox runs.

    Attributes:
        latency_s: time the ERP takes per order.
        error_rate: fraction of new orders refused with a rejecting ORDRSP
            (seeded, so a run is repeatable).
        outage: stop reading the outbound folder; files wait there.
        invoice_delta: added to each invoice's amount (an invoice mismatch).
        refuse_refs: customer PO references whose orders are refused.
        invoice_deltas: per customer PO reference, added to that order's invoice.
    """

    latency_s: float = 0.0
    error_rate: float = 0.0
    outage: bool = False
    invoice_delta: Decimal = Decimal(0)
    refuse_refs: frozenset[str] = frozenset()
    invoice_deltas: dict[str, Decimal] = field(default_factory=dict)


class SandboxState(msgspec.Struct, frozen=True, kw_only=True):
    """Counts since start, for tests and demo reports."""

    idocs_read: int
    orders_created: int
    duplicates: int
    rejected: int
    failed_files: int
    ordrsp_sent: int
    desadv_sent: int
    invoic_sent: int


@dataclass
class _Counts:
    idocs_read: int = 0
    orders_created: int = 0
    duplicates: int = 0
    rejected: int = 0
    failed_files: int = 0
    ordrsp_sent: int = 0
    desadv_sent: int = 0
    invoic_sent: int = 0


@dataclass(frozen=True, kw_only=True)
class _SalesOrder:
    number: str
    order: v.Orders05


@dataclass
class _Numbers:
    docnum: int = 0
    order: int = 0
    delivery: int = 80_000_000
    invoice: int = 90_000_000

    @classmethod
    def starting(cls, first: int) -> _Numbers:
        """Numbers that begin *first* above the usual ones."""
        return cls(
            docnum=first, order=first, delivery=first + 80_000_000,
            invoice=first + 90_000_000,
        )  # fmt: skip

    def next(self, kind: str) -> int:
        value: int = getattr(self, kind) + 1
        setattr(self, kind, value)
        return value


@final
class LegacyErpSandbox:
    """The simulated ERP; run it with ``async with`` or `start` / `aclose`.

    Args:
        outbound_dir: the folder the broker writes ORDERS05 to.
        inbound_dir: the folder the ERP answers into.
        knobs: behaviour switches (see `Knobs`).
        seed: seeds the refusals drawn by ``knobs.error_rate``.
        number_block: moves every number it hands out (orders, deliveries,
            invoices, IDocs) up by that many millions, as a fresh number
            range: a broker whose store remembers an earlier run's documents
            must not be sent their numbers again.
        interval_s: how often the outbound folder is looked at.
        logical_system: the ERP's ``SNDPRN`` in its answers.
        now: the clock for dates and times in the answers.
        zone: the ERP's time zone: its IDocs carry local dates and times.
    """

    def __init__(
        self,
        outbound_dir: Path,
        inbound_dir: Path,
        *,
        knobs: Knobs | None = None,
        seed: int = 0,
        number_block: int = 0,
        interval_s: float = 0.02,
        client: str = "100",
        logical_system: str = "LEGACYERP",
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        zone: tzinfo = UTC,
    ) -> None:
        self.outbound_dir = outbound_dir
        self.inbound_dir = inbound_dir
        self.knobs = knobs or Knobs()
        self._random = random.Random(seed)
        self._interval_s = interval_s
        self._client = client
        self._system = logical_system
        self._clock = now
        self._zone = zone
        self._orders: dict[tuple[str, str], _SalesOrder] = {}
        self._counts = _Counts()
        self._numbers = _Numbers.starting(first_number(number_block))
        self._poller = InboundPoller(
            outbound_dir,
            parse=parse_idocs,
            handle=self._receive,
            settle_s=0.0,
            interval_s=interval_s,
        )
        self._tg: TaskGroup | None = None

    def __repr__(self) -> str:
        return f"<LegacyErpSandbox {self.outbound_dir} → {self.inbound_dir}>"

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the polling loop as a task; call `aclose` from the same task."""
        if self._tg is not None:
            raise RuntimeError("the sandbox is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        await tg.start(self.run)

    async def aclose(self) -> None:
        """Stop the polling loop (files in either folder stay where they are)."""
        tg, self._tg = self._tg, None
        if tg is not None:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)

    async def __aenter__(self) -> LegacyErpSandbox:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def run(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Poll the outbound folder until cancelled; paused while ``knobs.outage``."""
        await anyio.to_thread.run_sync(self._make_folders)
        task_status.started()
        while True:
            await self.process_once()
            await anyio.sleep(self._interval_s)

    async def process_once(self) -> int:
        """Look at the outbound folder once; the files taken (0 in an outage)."""
        if self.knobs.outage:
            return 0
        report = await self._poller.poll_once()
        self._counts.failed_files += report.failed
        return report.processed + report.failed

    def _make_folders(self) -> None:
        self.outbound_dir.mkdir(parents=True, exist_ok=True)
        self.inbound_dir.mkdir(parents=True, exist_ok=True)

    # --- what tests look at --------------------------------------------------------

    def state(self) -> SandboxState:
        """Counts since start."""
        return msgspec.convert(vars(self._counts), SandboxState)

    @property
    def orders(self) -> Mapping[tuple[str, str], str]:
        """(sold-to, customer PO) → ERP order number, for every order created."""
        return {key: order.number for key, order in self._orders.items()}

    @property
    def order_totals(self) -> Mapping[tuple[str, str], str | None]:
        """(sold-to, customer PO) → the order's total item value (SUMID 002)."""
        return {
            key: order.order.total(v.SUM_ITEMS) for key, order in self._orders.items()
        }

    # --- the ERP ---------------------------------------------------------------------

    async def _receive(self, name: str, idocs: tuple[v.Idoc, ...]) -> None:
        for idoc in idocs:
            if self.knobs.outage:
                # Mid-batch outage: the poller leaves this file for later.
                raise UpstreamUnavailable("erp-legacy", "sandbox outage")
            if not isinstance(idoc, v.Orders05) or idoc.edi_dc40.mestyp != "ORDERS":
                raise IdocInvalid(
                    f"{name}: the ERP's port takes ORDERS IDocs, "
                    f"not {idoc.edi_dc40.idoctyp}/{idoc.edi_dc40.mestyp}"
                )
            self._counts.idocs_read += 1
            if self.knobs.latency_s > 0:
                await anyio.sleep(self.knobs.latency_s)
            for answer in self._post(idoc):
                await self._send(answer)

    async def _send(self, idoc: v.Idoc) -> None:
        control = idoc.edi_dc40
        await write_atomic(
            self.inbound_dir, f"{control.docnum}_{control.mestyp}", write_idoc(idoc)
        )
        match control.mestyp:
            case "ORDRSP":
                self._counts.ordrsp_sent += 1
            case "DESADV":
                self._counts.desadv_sent += 1
            case _:
                self._counts.invoic_sent += 1

    def _post(self, order: v.Orders05) -> list[v.Idoc]:
        """The ERP's answers to one ORDERS IDoc, in the order they are sent."""
        po = order.reference(v.REF_CUSTOMER_PO)
        sold_to = order.partner(v.PARTNER_SOLD_TO)
        missing = [
            what
            for what, ok in (
                ("customer PO (E1EDK02 QUALF 001)", po),
                ("sold-to party (E1EDKA1 AG)", sold_to and sold_to.partn),
                ("items (E1EDP01)", order.e1edp01),
                ("a material on every item (E1EDP19 QUALF 002)", _all_materials(order)),
            )
            if not ok
        ]
        if missing or po is None or sold_to is None or sold_to.partn is None:
            self._counts.rejected += 1
            return [
                self._ordrsp(
                    order, None, INCOMPLETE, ["Missing: " + "; ".join(missing)]
                )
            ]
        key = (sold_to.partn, po)
        existing = self._orders.get(key)
        if existing is not None:
            self._counts.duplicates += 1
            note = f"Order {existing.number} already exists for customer reference {po}"
            return [self._ordrsp(order, existing.number, None, [note])]
        if (
            po in self.knobs.refuse_refs
            or self._random.random() < self.knobs.error_rate
        ):
            self._counts.rejected += 1
            return [self._ordrsp(order, None, REFUSED, ["Order refused by the ERP"])]
        number = f"{self._numbers.next('order'):010d}"
        self._orders[key] = _SalesOrder(number=number, order=order)
        self._counts.orders_created += 1
        _log.info("sandbox_order_created", order=number, po=po)
        answers: list[v.Idoc] = [self._ordrsp(order, number, None, [])]
        delivery: str | None = None
        if any(item.pstyv != v.SERVICE_ITEM for item in order.e1edp01):
            desadv = self._desadv(order, number, po)
            delivery = desadv.e1edl20.vbeln if desadv.e1edl20 else None
            answers.append(desadv)
        answers.append(self._invoic(order, number, po, delivery))
        return answers

    # --- building the answers ------------------------------------------------------

    def _control(self, mestyp: str, idoctyp: str, order: v.Orders05) -> v.EdiDc40:
        now = self._now()
        asked = order.edi_dc40
        return v.EdiDc40(
            mandt=self._client,
            docnum=fmt_docnum(self._numbers.next("docnum")),
            status="30",
            direct="1",
            idoctyp=idoctyp,
            mestyp=mestyp,
            sndpor=asked.rcvpor,
            sndprt=asked.rcvprt,
            sndprn=self._system,
            rcvpor=asked.sndpor,
            rcvprt=asked.sndprt,
            rcvprn=asked.sndprn,
            credat=fmt_date(now),
            cretim=fmt_time(now),
            serial=fmt_date(now) + fmt_time(now),
        )

    def _ordrsp(
        self,
        order: v.Orders05,
        number: str | None,
        refusal: str | None,
        notes: list[str],
    ) -> v.Orders05:
        header = order.e1edk01 or v.E1EDK01()
        po = order.reference(v.REF_CUSTOMER_PO)
        refs = [r for r in order.e1edk02 if r.qualf == v.REF_CUSTOMER_PO]
        if number is not None:
            refs.append(
                v.E1EDK02(qualf=v.REF_ERP_ORDER, belnr=number, datum=self._today())
            )
        # One text per note, in lines of at most 70 characters (TDLINE).
        texts = tuple(
            v.E1EDKT1(
                tdid=v.TEXT_STATUS,
                tsspras_iso="EN",
                e1edkt2=tuple(
                    v.E1EDKT2(tdline=line) for line in textwrap.wrap(note, 70)
                ),
            )
            for note in notes
        )
        return v.Orders05(
            edi_dc40=self._control("ORDRSP", "ORDERS05", order),
            e1edk01=v.E1EDK01(
                action=v.ACTION_REJECTED if refusal else v.ACTION_ACCEPTED,
                curcy=header.curcy,
                zterm=header.zterm,
                belnr=number or po,
                augru=refusal,
            ),
            e1edk14=order.e1edk14,
            e1edk03=(v.E1EDK03(iddat=v.DATE_DOCUMENT, datum=self._today()),),
            e1edka1=order.e1edka1,
            e1edk02=tuple(refs),
            e1edkt1=texts,
            e1edp01=tuple(
                msgspec.structs.replace(item, abgru=refusal, action=None)
                for item in order.e1edp01
            ),
            e1eds01=(
                v.E1EDS01(
                    sumid=v.SUM_ITEMS,
                    summe=fmt_amount(_net(order.e1edp01)),
                    sunit=header.curcy,
                ),
            ),
        )

    def _desadv(self, order: v.Orders05, number: str, po: str) -> v.Delvry03:
        now = self._now()
        ship_to = order.partner(v.PARTNER_SHIP_TO) or order.partner(v.PARTNER_SOLD_TO)
        vbeln = f"{self._numbers.next('delivery'):010d}"
        items = tuple(
            v.E1EDL24(
                posnr=f"{10 * position:06d}",
                matnr=item.material(v.MATERIAL_OURS),
                arktx=next((m.ktext for m in item.e1edp19 if m.ktext), None),
                werks=item.werks,
                lfimg=item.menge,
                vrkme=item.menee,
                e1edl43=(
                    v.E1EDL43(
                        qualf=v.DELIVERY_REF_ORDER, belnr=number, posnr=item.posex
                    ),
                ),
                e1edl41=(
                    v.E1EDL41(quali=v.DELIVERY_REF_PO, bstnr=po, posex=item.posex),
                ),
            )
            for position, item in enumerate(order.e1edp01, start=1)
            if item.pstyv != v.SERVICE_ITEM
        )
        return v.Delvry03(
            edi_dc40=self._control("DESADV", "DELVRY03", order),
            e1edl20=v.E1EDL20(
                vbeln=vbeln,
                vkorg=order.org(v.ORG_SALES_ORG),
                traid=f"TRK{vbeln}",
                e1adrm1=(
                    v.E1ADRM1(
                        partner_q=v.PARTNER_SHIP_TO,
                        partner_id=ship_to.partn if ship_to else None,
                        name1=ship_to.name1 if ship_to else None,
                        country1=ship_to.land1 if ship_to else None,
                    ),
                ),
                e1edt13=(
                    v.E1EDT13(
                        qualf=v.DATE_GOODS_ISSUE, isdd=fmt_date(now), isdz=fmt_time(now)
                    ),
                ),
                e1edl24=items,
            ),
        )

    def _invoic(
        self, order: v.Orders05, number: str, po: str, delivery: str | None
    ) -> v.Invoic02:
        header = order.e1edk01 or v.E1EDK01()
        invoice = f"{self._numbers.next('invoice'):010d}"
        today = self._today()
        delta = self.knobs.invoice_delta + self.knobs.invoice_deltas.get(po, Decimal(0))
        items = []
        for position, item in enumerate(order.e1edp01):
            net = _item_net(item) + (delta if position == 0 else 0)
            items.append(
                v.E1EDP01(
                    posex=item.posex,
                    menge=item.menge,
                    menee=item.menee,
                    vprei=item.vprei,
                    peinh=item.peinh,
                    netwr=fmt_amount(net),
                    werks=item.werks,
                    e1edp02=(
                        v.E1EDP02(qualf=v.REF_CUSTOMER_PO, belnr=po, zeile=item.posex),
                        v.E1EDP02(qualf=v.REF_ERP_ORDER, belnr=number),
                    ),
                    e1edp19=tuple(
                        m for m in item.e1edp19 if m.qualf == v.MATERIAL_OURS
                    ),
                )
            )
        total = fmt_amount(_net(order.e1edp01) + delta)
        refs = [
            v.E1EDK02(qualf=v.REF_INVOICE, belnr=invoice, datum=today),
            v.E1EDK02(qualf=v.REF_CUSTOMER_PO, belnr=po),
            v.E1EDK02(qualf=v.REF_ERP_ORDER, belnr=number),
        ]
        if delivery is not None:
            refs.append(v.E1EDK02(qualf=v.REF_DELIVERY, belnr=delivery))
        sold_to = order.partner(v.PARTNER_SOLD_TO)
        return v.Invoic02(
            edi_dc40=self._control("INVOIC", "INVOIC02", order),
            e1edk01=v.E1EDK01(
                curcy=header.curcy, zterm=header.zterm, bsart="INVO", belnr=invoice
            ),
            e1edka1=tuple(
                msgspec.structs.replace(p, parvw=role)
                for role, p in (
                    (v.PARTNER_BILL_TO, sold_to),
                    (v.PARTNER_SOLD_TO, sold_to),
                )
                if p is not None
            ),
            e1edk02=tuple(refs),
            e1edk03=(v.E1EDK03(iddat=v.DATE_DOCUMENT, datum=today),),
            e1edk14=order.e1edk14,
            e1edp01=tuple(items),
            e1eds01=(
                v.E1EDS01(sumid=v.SUM_ITEMS, summe=total, sunit=header.curcy),
                v.E1EDS01(sumid=v.SUM_INVOICE, summe=total, sunit=header.curcy),
            ),
        )

    def _today(self) -> str:
        return fmt_date(self._now())

    def _now(self) -> datetime:
        """The ERP's wall clock: now, in its time zone."""
        return self._clock().astimezone(self._zone)


def _all_materials(order: v.Orders05) -> bool:
    return all(item.material(v.MATERIAL_OURS) for item in order.e1edp01)


def _item_net(item: v.E1EDP01) -> Decimal:
    """The ERP prices the item itself: quantity times price per price unit."""
    quantity = parse_decimal(item.menge or "0", field="E1EDP01.MENGE")
    price = parse_decimal(item.vprei or "0", field="E1EDP01.VPREI")
    unit = parse_decimal(item.peinh or "1", field="E1EDP01.PEINH") or Decimal(1)
    return (quantity * price / unit).quantize(Decimal("0.01"))


def _net(items: tuple[v.E1EDP01, ...]) -> Decimal:
    return sum((_item_net(item) for item in items), Decimal(0))
