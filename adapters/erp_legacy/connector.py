"""The legacy ERP's connector: book an order by dropping an ORDERS05 IDoc file."""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, final

import anyio.to_thread
import structlog

from adapters.erp_legacy.files import handed_over, write_once
from adapters.erp_legacy.idocxml import write_idoc
from adapters.erp_legacy.mapping import (
    docnum_for,
    outbound_name,
    partner_number,
    to_orders05,
)
from adapters.erp_legacy.settings import LegacyErpSettings
from broker.errors import UnknownMessageType, UpstreamUnavailable
from canonical import Envelope
from canonical.commerce import Account
from canonical.q2c import OrderBookingRequested, OrderSubmitted

__all__ = ["LegacyErpConnector"]

_log = structlog.get_logger(__name__)


@final
class LegacyErpConnector:
    """Implements `broker.connector.Connector` for ``erp.order.booking_requested``.

    The ERP answers later, in files (ORDRSP, DESADV, INVOIC02, read by the
    ingress), so `handle` only writes the IDoc and reports
    ``erp.order.submitted``.

    Redelivery hands nothing over twice. The file name and the bytes derive
    from the envelope's idempotency key and time, and each hand-over is
    recorded (`LegacyErpSettings.sent_dir`) once the file is in place. A
    redelivery (``first_attempt`` false: after a crash, or after a call that
    timed out while its worker thread went on writing) first looks: the file
    still waiting in the outbound folder, or its record, means it was handed
    over, and the answer is the first attempt's, with nothing written. The
    record is needed because the ERP's side cannot say: an SAP file port
    deletes a file once read, and its ORDRSP comes only after the order is
    posted (later still with scheduled output), while the ERP's
    customer-reference check is only a warning by default. The assumption:
    the ERP reads only the ``*.xml`` files of the outbound folder itself,
    never the records. A redelivery after ``sent_retention_days`` is handed
    over again.

    Args:
        settings: folders, ports and partners.
        system: the configured system name.
        sold_to: the ERP's partner number for an account (an xref lookup);
            `partner_number` of the account id by default.
    """

    def __init__(
        self,
        settings: LegacyErpSettings,
        *,
        system: str = "erp-legacy",
        sold_to: Callable[[Account], str] | None = None,
    ) -> None:
        self._settings = settings
        self._system = system
        self._sold_to = sold_to or (lambda account: partner_number(account.id))
        self._pruned_at: float | None = None

    def __repr__(self) -> str:
        return f"<LegacyErpConnector {self._system} → {self._settings.outbound_dir}>"

    @property
    def system(self) -> str:
        """The configured system name."""
        return self._system

    @property
    def commands(self) -> Mapping[str, type[Any]]:
        """The one command it takes: book an order."""
        return {"erp.order.booking_requested": OrderBookingRequested}

    async def handle(
        self, command: Any, envelope: Envelope, *, first_attempt: bool = False
    ) -> Sequence[Any]:
        """Write the order's ORDERS05 IDoc to the outbound folder.

        On a redelivery (*first_attempt* false), an IDoc already handed over
        (see the class docstring) is not written again; the answer is the
        same.

        Returns:
            ``[OrderSubmitted]``, its ``document`` the IDoc number.

        Raises:
            UpstreamUnavailable: the folder cannot be written, or holds
                ``max_pending_files`` unread IDocs (the ERP is not reading).
            UnknownMessageType: *command* is not a booking request.
        """
        if not isinstance(command, OrderBookingRequested):
            raise UnknownMessageType(
                f"{self._system} takes erp.order.booking_requested, "
                f"not {type(command).__name__}"
            )
        order = command.order
        docnum = docnum_for(envelope.idempotency_key)
        name = outbound_name(docnum)
        idoc = to_orders05(
            order,
            docnum=docnum,
            created_at=envelope.time,
            settings=self._settings,
            sold_to=self._sold_to(order.account),
        )
        data = write_idoc(idoc)
        outbound = self._settings.outbound
        record = self._record(envelope.time, name)
        submitted = [
            OrderSubmitted(
                order_id=order.id, deal_id=order.deal_id, erp="legacy", document=docnum
            )
        ]
        try:
            if not first_attempt and await anyio.to_thread.run_sync(
                functools.partial(handed_over, outbound, name, record=record)
            ):
                _log.info("idoc_already_handed_over", system=self._system, idoc=docnum)
                return submitted
            pending = await anyio.to_thread.run_sync(
                _pending, outbound, self._settings.max_pending_files, f"{name}.xml"
            )
            if pending >= self._settings.max_pending_files:
                raise UpstreamUnavailable(
                    self._system,
                    f"{pending} IDocs wait unread in {outbound}",
                    retry_after_s=self._settings.poll_interval_s * 10,
                )
            wrote = await write_once(
                outbound, name, data, record=record, again=not first_attempt
            )
            if not wrote:  # an earlier attempt finished writing meanwhile
                _log.info("idoc_already_handed_over", system=self._system, idoc=docnum)
            await self._prune()
        except OSError as exc:
            raise UpstreamUnavailable(
                self._system, f"cannot write {name}.xml to {outbound}: {exc}"
            ) from exc
        return submitted

    def _record(self, at: datetime, name: str) -> Path:
        """Where the hand-over of IDoc file *name*, of a command of *at*, is noted."""
        day = at.astimezone(UTC).strftime("%Y%m%d")
        return self._settings.sent / day / f"{name}.sent"

    async def _prune(self) -> None:
        """Drop the days of records older than the retention, at most once an hour."""
        now = time.monotonic()
        if self._pruned_at is not None and now - self._pruned_at < _PRUNE_EVERY_S:
            return
        self._pruned_at = now
        keep_s = self._settings.sent_retention_days * 86400.0
        try:
            await anyio.to_thread.run_sync(
                _prune_days, self._settings.sent, time.time() - keep_s
            )
        except OSError as exc:
            _log.warning(
                "idoc_records_unpruned",
                system=self._system,
                folder=str(self._settings.sent),
                error=f"{type(exc).__name__}: {exc}",
            )


#: How often the connector looks for hand-over records past their retention.
_PRUNE_EVERY_S = 3600.0


def _prune_days(folder: Path, before: float) -> None:
    """Remove the ``<yyyymmdd>`` record folders of *folder* unchanged since *before*.

    A folder's mtime moves with each record added to it, so a record is kept
    at least the retention after it was written, whatever its command's date.
    """
    if not folder.is_dir():
        return
    for day in folder.iterdir():
        if not (len(day.name) == 8 and day.name.isdigit()):
            continue
        if day.stat().st_mtime < before:
            shutil.rmtree(day, ignore_errors=True)


def _pending(folder: os.PathLike[str], limit: int, own: str) -> int:
    """Unread ``*.xml`` files in *folder* other than *own*, counted up to *limit*."""
    count = 0
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.endswith(".xml") and entry.name != own and entry.is_file():
                count += 1
                if count >= limit:
                    break
    return count
