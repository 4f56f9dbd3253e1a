"""The legacy ERP (SAP ECC style): IDoc-XML files through a file port.

Orders go out as ORDERS05 files written atomically into the outbound folder;
the ERP's answers (ORDRSP, DESADV, INVOIC02) come back as files in the inbound
folder, read by an `InboundPoller` and mapped by `to_inbound`.
"""

from __future__ import annotations

from adapters.erp_legacy.connector import LegacyErpConnector
from adapters.erp_legacy.files import (
    FileTooLarge,
    FileUnparsable,
    InboundPoller,
    PollReport,
    write_atomic,
)
from adapters.erp_legacy.idocxml import IdocInvalid, parse_idoc, parse_idocs, write_idoc
from adapters.erp_legacy.ingress import SOURCE, Resolve, inbound_for, to_inbound
from adapters.erp_legacy.mapping import (
    FIELD_MAP,
    booking_from_ordrsp,
    customer_po,
    docnum_for,
    invoice_from_invoic,
    outbound_name,
    partner_number,
    shipment_from_desadv,
    to_orders05,
)
from adapters.erp_legacy.sandbox import Knobs, LegacyErpSandbox, SandboxState
from adapters.erp_legacy.settings import LegacyErpSettings
from adapters.erp_legacy.views import Delvry03, Idoc, Invoic02, Orders05

__all__ = [
    # settings and the connector
    "LegacyErpSettings",
    "LegacyErpConnector",
    # IDoc-XML
    "Idoc",
    "Orders05",
    "Invoic02",
    "Delvry03",
    "IdocInvalid",
    "parse_idoc",
    "parse_idocs",
    "write_idoc",
    # files
    "write_atomic",
    "InboundPoller",
    "PollReport",
    "FileTooLarge",
    "FileUnparsable",
    # mapping
    "FIELD_MAP",
    "partner_number",
    "docnum_for",
    "outbound_name",
    "to_orders05",
    "customer_po",
    "booking_from_ordrsp",
    "shipment_from_desadv",
    "invoice_from_invoic",
    # ingress
    "SOURCE",
    "Resolve",
    "to_inbound",
    "inbound_for",
    # the simulated ERP
    "LegacyErpSandbox",
    "Knobs",
    "SandboxState",
]
