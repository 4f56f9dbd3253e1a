"""The ERP catalogue reader's announcements (`actors.cursors`) across reads.

The reader runs against a stand-in for the SAP client whose catalogue the
test sets, a transport that confirms and keeps every message, and a real
(in-memory) SQLite store that keeps what was announced.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from actors.cursors import CURSOR_KIND, Announcements
from actors.systems import _Clients
from adapters.erp_cloud.views import A_Product
from broker.codec import decode_envelope
from broker.errors import ConcurrencyConflict, StoreUnavailable
from broker.store import BatchWrite, OutboxRow, SagaWrite
from broker.store.sqlite import SqliteStore
from tests.fakes import ConfirmingTransport

pytestmark = pytest.mark.anyio

SYSTEM = "erp_cloud"


class Sap:
    """The product list of a stand-in SAP client, set by the test."""

    def __init__(self) -> None:
        self.products = {
            sku: A_Product(
                Product=sku, ProductGroup="services", ListPrice=Decimal("100.00")
            )
            for sku in ("SVC-A", "SVC-B")
        }

    def price(self, sku: str, price: str) -> None:
        """Set *sku*'s list price, as a pricing clerk would."""
        product = self.products[sku]
        self.products[sku] = msgspec.structs.replace(product, ListPrice=Decimal(price))

    async def list_products(self) -> tuple[A_Product, ...]:
        """The whole catalogue."""
        return tuple(self.products.values())


class Rt:
    """The parts of the runtime the catalogue reader uses."""

    def __init__(self, store: Any) -> None:
        self.transport = ConfirmingTransport()
        self.store = store

    def takes_event(self, event_type: str) -> bool:
        """Every event type has a reader."""
        return True


class Systems:
    """The parts of `actors.systems.Systems` the catalogue reader uses."""

    def __init__(self, rt: Rt) -> None:
        self.rt = rt
        self.catalogue = None


class FailingCommits:
    """A store whose next *failures* writes raise *error*."""

    def __init__(self, store: SqliteStore, error: Exception, failures: int) -> None:
        self._store = store
        self._error = error
        self.failures = failures

    async def commit_batch(self, write: BatchWrite) -> list[OutboxRow]:
        """Fails *failures* times, then writes."""
        if self.failures > 0:
            self.failures -= 1
            raise self._error
        return await self._store.commit_batch(write)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class Reader:
    """One daemon's catalogue reader: its announcements and what it published."""

    def __init__(self, store: Any) -> None:
        self.rt = Rt(store)
        self._clients = _Clients(Systems(self.rt))  # type: ignore[arg-type]
        self.announced = Announcements(store, SYSTEM)

    async def read(self, sap: Sap) -> None:
        """One refresh of the catalogue."""
        await self._clients._announce_catalogue(
            SYSTEM,
            sap,  # type: ignore[arg-type]
            self.announced,
        )

    def published_keys(self) -> list[str]:
        """The idempotency keys published so far, in order."""
        return [
            decode_envelope(m.body, max_bytes=1 << 20).idempotency_key
            for m in self.rt.transport.published
        ]


async def test_a_price_changing_back_and_forth_is_a_new_change_each_time(
    store: SqliteStore,
) -> None:
    """100 → 90 → 100 → 90: four announcements under four keys; re-reads add none."""
    sap, reader = Sap(), Reader(store)

    await reader.read(sap)
    for price in ("90.00", "100.00", "90.00"):
        sap.price("SVC-A", price)
        await reader.read(sap)
        await reader.read(sap)

    mine = [key for key in reader.published_keys() if ":SVC-A:" in key]
    assert len(mine) == len(set(mine)) == 4
    assert [key.split(":")[2] for key in mine] == ["1", "2", "3", "4"]
    assert len(reader.published_keys()) == 5


async def test_a_restart_announces_only_what_changed_meanwhile(
    store: SqliteStore,
) -> None:
    """A new reader on the same store: nothing again, then only the new price."""
    sap = Sap()
    await Reader(store).read(sap)

    again = Reader(store)
    with capture_logs() as logs:
        await again.read(sap)
        sap.price("SVC-B", "120.00")
        await again.read(sap)

    loaded = [line for line in logs if line["event"] == "catalogue_loaded"]
    assert [line["changed"] for line in loaded] == [0, 1]
    assert [key.split(":")[1:3] for key in again.published_keys()] == [["SVC-B", "2"]]


async def test_an_announcement_not_recorded_is_published_again_under_its_key(
    store: SqliteStore,
) -> None:
    """The store fails after the publish: the next read repeats the same keys."""
    sap = Sap()
    reader = Reader(FailingCommits(store, StoreUnavailable("database is locked"), 1))

    with pytest.raises(StoreUnavailable):
        await reader.read(sap)
    await reader.read(sap)
    await reader.read(sap)

    first, second = reader.published_keys()[:2], reader.published_keys()[2:]
    assert first == second
    assert len(first) == 2


async def test_two_readers_on_one_store_name_a_change_alike(
    store: SqliteStore,
) -> None:
    """The reader that records second conflicts, reads again, announces nothing new."""
    sap = Sap()
    one, two = Reader(store), Reader(store)
    await one.read(sap)
    await two.read(sap)
    sap.price("SVC-A", "80.00")
    await two.read(sap)

    with pytest.raises(ConcurrencyConflict):
        await one.read(sap)
    await one.read(sap)

    assert len(two.published_keys()) == 1
    assert ":SVC-A:2:" in two.published_keys()[0]
    assert one.published_keys()[2:] == two.published_keys()


async def test_unreadable_announcements_are_logged_and_everything_is_announced(
    store: SqliteStore,
) -> None:
    """Announcements that do not decode: logged; the catalogue is announced anew."""
    await store.commit_batch(
        BatchWrite(
            consumer=CURSOR_KIND,
            workflow=CURSOR_KIND,
            sagas=[
                SagaWrite(
                    correlation_id=f"catalogue:{SYSTEM}",
                    expected_version=0,
                    state=b"not json",
                )
            ],
        )
    )
    sap, reader = Sap(), Reader(store)

    with capture_logs() as logs:
        await reader.read(sap)
        await reader.read(sap)

    events = [line["event"] for line in logs]
    assert events.count("catalogue_announcements_unreadable") == 1
    assert len(reader.published_keys()) == 2
