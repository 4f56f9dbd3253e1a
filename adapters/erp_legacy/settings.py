"""Settings of the legacy ERP connection, from the config's ``[systems.erp-legacy]``."""

from __future__ import annotations

from datetime import tzinfo
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from msgspec import Meta

from adapters.erp_legacy.idocxml import DEFAULT_MAX_BYTES
from broker.config import Section

__all__ = ["LegacyErpSettings"]

# SAP port and partner names are at most ten characters (EDIPOA, EDIPRN).
_SapName = Annotated[str, Meta(pattern=r"^[A-Z0-9_/]{1,10}\Z")]


class LegacyErpSettings(Section, frozen=True):
    """Where the IDoc files go and come from, and who we are in the control record.

    Attributes:
        outbound_dir: the broker writes ORDERS05 here (the ERP's file port reads it).
        inbound_dir: the ERP drops ORDRSP, DESADV and INVOIC02 here.
        client: ``MANDT`` of the ERP.
        sender_port / sender_partner_type / sender_partner: ``SNDPOR`` /
            ``SNDPRT`` / ``SNDPRN``: the broker as the ERP's partner profile
            (WE20) knows it.
        receiver_port / receiver_partner_type / receiver_partner: ``RCVPOR``
            / ``RCVPRT`` / ``RCVPRN``: the ERP's port and logical system.
        max_pending_files: the connector refuses to write (retry later) while
            this many IDocs wait unread in ``outbound_dir``: the file port is
            a queue too, and it must stay bounded.
        sent_dir: where the connector records each ORDERS IDoc it handed
            over (an empty ``<yyyymmdd>/ORDERS_<docnum>.sent`` per IDoc, by
            the command's date), so that a redelivered command does not
            hand it over again after the ERP took (and deleted) the file;
            empty: ``sent/`` in ``inbound_dir``, beside the broker's other
            folders there (``processed/``, ``failed/``). The outbound folder
            stays the ERP's port, holding nothing but IDoc files.
        sent_retention_days: how long those records are kept; a command
            redelivered (or replayed from the dead letters) later than
            this is handed over again, and only the ERP's customer-reference
            check stands between it and a second order.
        timezone: the ERP's own time zone (an IANA name such as
            ``Europe/Berlin``). An IDoc carries dates and times without an
            offset (``CREDAT`` / ``CRETIM``, the document dates): SAP writes
            them in its system time, so the broker reads them in this zone
            and writes the ORDERS IDoc's in it too.
        max_file_bytes: inbound files above this size are failed unread.
        poll_interval_s / settle_s / batch: the inbound poller's pace.
    """

    outbound_dir: str
    inbound_dir: str
    client: Annotated[str, Meta(pattern=r"^[0-9]{3}\Z")] = "100"
    sender_port: _SapName = "Q2CBROKER"
    sender_partner_type: _SapName = "LS"
    sender_partner: _SapName = "Q2CBROKER"
    receiver_port: _SapName = "SAPLEG"
    receiver_partner_type: _SapName = "LS"
    receiver_partner: _SapName = "LEGACYERP"
    max_pending_files: Annotated[int, Meta(ge=1)] = 1000
    sent_dir: str = ""
    sent_retention_days: Annotated[int, Meta(ge=1)] = 30
    timezone: str = "UTC"
    max_file_bytes: Annotated[int, Meta(ge=1024)] = DEFAULT_MAX_BYTES
    poll_interval_s: Annotated[float, Meta(gt=0)] = 1.0
    settle_s: Annotated[float, Meta(ge=0)] = 0.5
    batch: Annotated[int, Meta(ge=1, le=1000)] = 32

    def __post_init__(self) -> None:
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"timezone: {self.timezone!r} is not an IANA time zone name"
            ) from exc

    @property
    def zone(self) -> tzinfo:
        """`timezone` as a `tzinfo` (`ZoneInfo` keeps one per name)."""
        return ZoneInfo(self.timezone)

    @property
    def outbound(self) -> Path:
        """`outbound_dir` as a path."""
        return Path(self.outbound_dir)

    @property
    def sent(self) -> Path:
        """`sent_dir` as a path (``sent/`` in the inbound folder by default)."""
        return Path(self.sent_dir) if self.sent_dir else self.inbound / "sent"

    @property
    def inbound(self) -> Path:
        """`inbound_dir` as a path."""
        return Path(self.inbound_dir)
