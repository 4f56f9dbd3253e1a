"""What the daemon's readers of other systems remember between reads.

A reader that follows another system (the CRM's change feed, the ERP's
catalogue) keeps its position as the state of one instance of the
``cursor`` kind in the store, written with a version check, so that a
restart goes on where it stopped and two daemons on one store agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, final

import msgspec
import structlog

from broker.errors import ConcurrencyConflict, StoreUnavailable
from broker.store import BatchWrite, SagaWrite, Store
from canonical.hashing import content_hash
from canonical.q2c import ProductChanged

__all__ = ["CURSOR_KIND", "Announced", "Announcements"]

_log = structlog.get_logger(__name__)

#: The kind of durable state a reader's cursor is stored as.
CURSOR_KIND: Final = "cursor"


class Announced(msgspec.Struct, frozen=True, array_like=True):
    """A product's latest announced change: its number, and the content's hash."""

    change: int
    digest: str


_ANNOUNCED = msgspec.json.Decoder(dict[str, Announced])


@final
class Announcements:
    """The product changes a catalogue reader announced, kept in the store.

    Each change of a product is numbered (1: the first announcement of its
    SKU); its number and content hash name it. A price back at a value it
    had earlier is therefore a new change, not a repeat of the first, and a
    change published again because its record was not written (a crash, an
    outage of the store) keeps its name and is a duplicate in the inbox. A
    catalogue read again without changes announces nothing, at a restart
    too; the catalog workflow still drops a change of what the CPQ was last
    asked for (after a lost record of a change already applied).

    Kept as the state of instance ``catalogue:<system>`` of the ``cursor``
    kind, with the version read: two daemons reading the same catalogue
    number its changes alike, and the second to record them reads again.
    A SKU no longer listed keeps its entry, so that one listed again goes
    on counting.
    """

    def __init__(self, store: Store, system: str) -> None:
        self._store = store
        self._system = system
        self._key = f"catalogue:{system}"
        #: None: not read from the store (yet, or again after a failure).
        self._seen: dict[str, Announced] | None = None
        self._version = 0

    async def news(
        self, changes: Iterable[ProductChanged]
    ) -> list[tuple[ProductChanged, Announced]]:
        """The *changes* not announced yet, each with its number and hash.

        Raises:
            StoreUnavailable: the announcements cannot be read.
        """
        seen = await self._load()
        news = []
        for change in changes:
            digest = content_hash(change)
            last = seen.get(change.product.sku)
            if last is None or last.digest != digest:
                number = last.change + 1 if last is not None else 1
                news.append((change, Announced(change=number, digest=digest)))
        return news

    async def record(self, news: Sequence[tuple[ProductChanged, Announced]]) -> None:
        """Record *news* (from `news`) as announced.

        Raises:
            ConcurrencyConflict: another daemon recorded first; the next
                `news` reads the store again.
            StoreUnavailable: not recorded (or not known to be); the same.
        """
        if not news:
            return
        seen = {**(await self._load())}
        seen.update((change.product.sku, n) for change, n in news)
        write = BatchWrite(
            consumer=CURSOR_KIND,
            workflow=CURSOR_KIND,
            sagas=[
                SagaWrite(
                    correlation_id=self._key,
                    expected_version=self._version,
                    state=msgspec.json.encode(seen),
                )
            ],
        )
        try:
            await self._store.commit_batch(write)
        except (ConcurrencyConflict, StoreUnavailable):
            self._seen = None
            raise
        self._seen, self._version = seen, self._version + 1

    async def _load(self) -> dict[str, Announced]:
        if self._seen is not None:
            return self._seen
        record = await self._store.load_saga(CURSOR_KIND, self._key)
        seen: dict[str, Announced] = {}
        if record is not None:
            try:
                seen = _ANNOUNCED.decode(record.state)
            except msgspec.DecodeError as exc:
                # Announcing everything again costs the catalog workflow a
                # comparison per product; crashing would cost every system
                # its client.
                _log.error(
                    "catalogue_announcements_unreadable",
                    system=self._system,
                    error=str(exc),
                )
        self._seen, self._version = seen, record.version if record else 0
        return seen
