"""Base classes for every canonical type.

Canonical types are frozen, keyword-only msgspec Structs. They do not forbid
unknown fields, so an old reader skips fields a newer writer added; new
fields always get a default, types never change and tags are never reused.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["Canonical", "Event", "UtcDatetime"]

#: An aware datetime. The offset is kept as sent: compare instants, never
#: take ``.date()`` of it. The envelope's ``time`` alone is turned into UTC
#: (by the codec), because inbox keys are its day.
UtcDatetime = Annotated[datetime, Meta(tz=True)]


class Canonical(msgspec.Struct, frozen=True, kw_only=True):
    """Immutable, keyword-only; unknown fields are ignored so old readers cope."""


class Event(Canonical, frozen=True, tag_field="type"):
    """A fact that happened; ``type`` carries the tag on the wire.

    Tags read ``<domain>.<entity>.<past-tense verb>`` (``ledger.entry.posted``).
    """

    def correlation(self) -> str | None:
        """The workflow instance this fact belongs to, when the fact itself says.

        A system actor publishes a result under this id, falling back to the
        command's: a CRM read-back of a quote answers a command filed under
        the quote, but the approval belongs to the deal of its opportunity.
        """
        return None
