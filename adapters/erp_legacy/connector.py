"""The legacy ERP's connector: book an order by dropping an ORDERS05 IDoc file."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, final

import anyio.to_thread

from adapters.erp_legacy.files import write_atomic
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


@final
class LegacyErpConnector:
    """Implements `broker.connector.Connector` for ``erp.order.booking_requested``.

    The ERP answers later, in files (ORDRSP, DESADV, INVOIC02, read by the
    ingress), so `handle` only writes the IDoc and reports
    ``erp.order.submitted``.

    Redelivery is safe: the file name and the bytes derive from the
    envelope's idempotency key and time, so a second delivery rewrites the
    same file; and if the ERP has already read it, the ERP's own
    customer-reference check (same sold-to and PO) books no second order.

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
        try:
            pending = await anyio.to_thread.run_sync(
                _pending, outbound, self._settings.max_pending_files, f"{name}.xml"
            )
            if pending >= self._settings.max_pending_files:
                raise UpstreamUnavailable(
                    self._system,
                    f"{pending} IDocs wait unread in {outbound}",
                    retry_after_s=self._settings.poll_interval_s * 10,
                )
            await write_atomic(outbound, name, data)
        except OSError as exc:
            raise UpstreamUnavailable(
                self._system, f"cannot write {name}.xml to {outbound}: {exc}"
            ) from exc
        return [
            OrderSubmitted(
                order_id=order.id, deal_id=order.deal_id, erp="legacy", document=docnum
            )
        ]


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
