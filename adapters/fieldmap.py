"""Auditable field maps: which canonical field is which native one, per adapter."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

__all__ = ["FieldMapping", "render"]


class FieldMapping(msgspec.Struct, frozen=True):
    """One line of a mapping: canonical path ⇄ native path, and how.

    Attributes:
        canonical: dotted path in the canonical Struct (``order.lines[].sku``).
        native: the vendor's field path (``to_Item.results[].Material``).
        rule: the conversion, when it is not a plain copy (``cents → Decimal``).
    """

    canonical: str
    native: str
    rule: str = ""


def render(title: str, mappings: Iterable[FieldMapping]) -> str:
    """A plain-text table of *mappings*, for ``brokerd fieldmap`` and reviews."""
    rows = [(m.canonical, m.native, m.rule) for m in mappings]
    widths = [
        max([len(h), *(len(r[i]) for r in rows)])
        for i, h in enumerate(("canonical", "native", "rule"))
    ]
    lines = [title, ""]
    header = ("canonical", "native", "rule")
    lines.append(
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
    )
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    )
    return "\n".join(lines)


def main() -> int:
    """``python -m adapters.fieldmap``: every adapter's field map, for review."""
    import importlib

    titles = {
        "adapters.crm.mapping": "CRM (Salesforce sObjects) ⇄ canonical",
        "adapters.cpq.mapping": "CPQ (Salesforce CPQ, SBQQ) ⇄ canonical",
        "adapters.erp_cloud.mapping": "Cloud ERP (SAP S/4HANA OData) ⇄ canonical",
        "adapters.erp_legacy.mapping": "Legacy ERP (IDoc ORDERS05 …) ⇄ canonical",
        "adapters.billing.mapping": "Billing (Stripe) ⇄ canonical",
    }
    for module, title in titles.items():
        maps = importlib.import_module(module).FIELD_MAP
        print(render(title, maps), end="\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
