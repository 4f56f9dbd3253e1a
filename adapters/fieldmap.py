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
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    )
    return "\n".join(lines)
