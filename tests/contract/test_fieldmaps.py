"""Every adapter's field map can be printed and names real canonical fields."""

from __future__ import annotations

import pytest

from adapters.fieldmap import main

ADAPTERS = ("crm", "cpq", "erp_cloud", "erp_legacy", "billing")


def test_every_field_map_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main() == 0
    out = capsys.readouterr().out
    for title in ("CRM", "CPQ", "Cloud ERP", "Legacy ERP", "Billing"):
        assert title in out
    # Each adapter maps the documents it carries, field by field.
    assert out.count("\ncanonical") == len(ADAPTERS)
    assert "PurchaseOrderByCustomer" in out
    assert "E1EDK02" in out or "BELNR" in out
    assert "Idempotency-Key" in out or "metadata" in out
