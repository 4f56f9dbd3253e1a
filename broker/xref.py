"""The cross-reference registry: one business object's id in every system.

A CRM account ``001…`` is ERP customer ``1000123`` and billing customer
``cus_…``: each is one `XrefEntry` of kind ``account`` under the same
canonical id. Entries are written with `broker.store.Store.xref_put`, or
inside a batch's own transaction through ``BatchWrite.xref`` (so a system
actor records the mapping atomically with the events that announce it), and
read with ``xref_get`` (every system of one canonical id), ``xref_find``
(the canonical id behind one native id) and ``xref_many`` (for reports).

Two rules hold in both stores: one native id per (kind, canonical id,
system), written again it is replaced; and one canonical id per (kind,
system, native id): binding a native id that already belongs to another
canonical id raises `XrefConflict` and writes nothing. Moving a native id
to another canonical id is therefore never silent; it is an operator's
decision, not a side effect of a sync.

An entry's ``content_hash`` records what was last written to that system
(`canonical.hashing.content_hash` of it), so a writer can tell an echo or an
unchanged object from a change.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from broker.errors import PermanentError

__all__ = ["XrefEntry", "XrefConflict", "unique_entries"]


class XrefEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One system's native id for one canonical object.

    Attributes:
        kind: the kind of object, e.g. ``account``, ``product``, ``order``.
        canonical_id: the object's id in the canonical model.
        system: the configured system name, e.g. ``erp-cloud``.
        native_id: the object's id in that system.
        content_hash: a digest of what was last written to that system
            (`canonical.hashing.content_hash`), or empty.
        updated_at: when the entry last changed; set by the store on reads.
    """

    kind: str
    canonical_id: str
    system: str
    native_id: str
    content_hash: str = ""
    updated_at: datetime | None = None


class XrefConflict(PermanentError):
    """A native id is already bound to another canonical id; nothing was written."""

    reason = "xref_conflict"

    def __init__(
        self, *, kind: str, system: str, native_id: str, bound_to: str, wanted: str
    ) -> None:
        super().__init__(
            f"xref {kind}: {system} id {native_id!r} is bound to canonical id "
            f"{bound_to!r}, not {wanted!r}"
        )
        self.kind = kind
        self.system = system
        self.native_id = native_id
        self.bound_to = bound_to
        self.wanted = wanted


def unique_entries(entries: Sequence[XrefEntry]) -> list[XrefEntry]:
    """*entries* with one per (kind, canonical id, system), the last winning.

    Raises:
        XrefConflict: two entries bind one native id to two canonical ids.
    """
    by_key: dict[tuple[str, str, str], XrefEntry] = {}
    for e in entries:
        by_key[(e.kind, e.canonical_id, e.system)] = e
    owners: dict[tuple[str, str, str], str] = {}
    for e in by_key.values():
        owner = owners.setdefault((e.kind, e.system, e.native_id), e.canonical_id)
        if owner != e.canonical_id:
            raise XrefConflict(
                kind=e.kind,
                system=e.system,
                native_id=e.native_id,
                bound_to=owner,
                wanted=e.canonical_id,
            )
    return list(by_key.values())
