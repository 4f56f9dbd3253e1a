"""A demo catalogue: what the ERP's product master would sync, for demos and tests.

Twenty products in four families: ``hardware`` (physical, shipped),
``software`` (perpetual licences), ``saas`` (recurring subscriptions) and
``services`` (professional services, by the day or fixed price). One server
model is inactive, so a demo can show ``inactive_sku``. Each product has
EUR, USD, GBP and CHF prices; the floor is the list price less the family's
largest discount.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from actors.workflows.rules import (
    ReferenceData,
    build_reference,
    load_reference_policy,
)
from canonical.commerce import PriceBookEntry, Product

__all__ = ["REFERENCE_TOML", "demo_catalogue", "demo_reference"]

#: The operator's reference tables shipped with the project.
REFERENCE_TOML = Path(__file__).resolve().parents[2] / "config" / "reference.toml"

# (sku, name, family, list price in EUR, active)
_PRODUCTS: tuple[tuple[str, str, str, str, bool], ...] = (
    ("HW-SRV-1U", "Rack server 1U", "hardware", "4200.00", True),
    ("HW-SRV-2U", "Rack server 2U", "hardware", "6900.00", True),
    (
        "HW-SRV-LEGACY",
        "Rack server 2U (previous generation)",
        "hardware",
        "5200.00",
        False,
    ),
    ("HW-STO-24", "Storage array, 24 bays", "hardware", "18500.00", True),
    ("HW-NET-SW48", "Network switch, 48 ports", "hardware", "2900.00", True),
    ("HW-GW-EDGE", "Edge gateway", "hardware", "780.00", True),
    ("SW-PLAT-PERP", "Platform licence, perpetual", "software", "25000.00", True),
    ("SW-ANL-PERP", "Analytics module, perpetual", "software", "9000.00", True),
    ("SW-SEC-PERP", "Security add-on, perpetual", "software", "6500.00", True),
    ("SW-DEV-SEAT", "Developer seat", "software", "1200.00", True),
    (
        "SAAS-PLAT-STD",
        "Platform Cloud Standard, per user and month",
        "saas",
        "45.00",
        True,
    ),
    (
        "SAAS-PLAT-ENT",
        "Platform Cloud Enterprise, per user and month",
        "saas",
        "85.00",
        True,
    ),
    ("SAAS-ANL", "Analytics Cloud, per user and month", "saas", "30.00", True),
    ("SAAS-BACKUP-TB", "Cloud backup, per TB and month", "saas", "22.50", True),
    ("SAAS-SUP-PREM", "Premium support, per month", "saas", "1500.00", True),
    ("SVC-INSTALL", "Installation, per day", "services", "1400.00", True),
    ("SVC-CONSULT", "Consulting, per day", "services", "1600.00", True),
    ("SVC-TRAIN", "Training, per day", "services", "1300.00", True),
    ("SVC-MIGRATE", "Migration package, fixed price", "services", "12000.00", True),
    ("SVC-HEALTH", "Health check, fixed price", "services", "3500.00", True),
)

# The largest discount sales may give without the floor stopping the quote.
_MAX_DISCOUNT = {
    "hardware": Decimal("0.15"),
    "software": Decimal("0.30"),
    "saas": Decimal("0.25"),
    "services": Decimal("0.10"),
}

# Demo price lists per currency, relative to EUR.
_RATES = {
    "EUR": Decimal("1"),
    "USD": Decimal("1.10"),
    "GBP": Decimal("0.86"),
    "CHF": Decimal("0.95"),
}

_CENT = Decimal("0.01")


def demo_catalogue() -> tuple[list[Product], list[PriceBookEntry]]:
    """The demo products and their price book entries (four currencies each)."""
    products: list[Product] = []
    prices: list[PriceBookEntry] = []
    for sku, name, family, eur, active in _PRODUCTS:
        products.append(
            Product(
                sku=sku,
                name=name,
                family=family,
                recurring=family == "saas",
                physical=family == "hardware",
                active=active,
            )
        )
        for currency, rate in _RATES.items():
            list_price = (Decimal(eur) * rate).quantize(_CENT)
            floor = (list_price * (1 - _MAX_DISCOUNT[family])).quantize(_CENT)
            prices.append(
                PriceBookEntry(
                    sku=sku, currency=currency, list_price=list_price, floor_price=floor
                )
            )
    return products, prices


def demo_reference(path: Path = REFERENCE_TOML) -> ReferenceData:
    """The demo catalogue with the reference tables of *path* (blocking: reads it).

    Raises:
        ConfigError: the reference file is missing or invalid.
    """
    products, prices = demo_catalogue()
    return build_reference(products, prices, load_reference_policy(path))
