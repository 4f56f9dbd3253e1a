"""The reference data the deal workflow validates against, refreshed from the ERP."""

from __future__ import annotations

from decimal import Decimal

import msgspec
from structlog.testing import capture_logs

from actors.q2c import ReferenceHolder
from actors.workflows.catalogue import REFERENCE_TOML, demo_catalogue
from actors.workflows.rules import load_reference_policy


def test_a_price_with_its_floor_above_its_list_is_left_out_not_fatal() -> None:
    """One bad entry in the ERP: logged and dropped; every other price is used."""
    products, prices = demo_catalogue()
    bad = msgspec.structs.replace(
        prices[0], floor_price=prices[0].list_price + Decimal(1)
    )
    holder = ReferenceHolder(load_reference_policy(REFERENCE_TOML))
    with capture_logs() as logs:
        holder.update(products, [bad, *prices[1:]])
    assert holder.ready
    ref = holder()
    assert (bad.sku, bad.currency) not in ref.prices
    assert len(ref.prices) == len(prices) - 1
    (line,) = [entry for entry in logs if entry["event"] == "catalogue_price_refused"]
    assert (line["sku"], line["currency"]) == (bad.sku, bad.currency)
    # Corrected in the ERP and read again: it is back.
    holder.update([], [prices[0]])
    assert holder().prices[(bad.sku, bad.currency)] == prices[0]
