"""Sample canonical orders and envelopes for the legacy ERP tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import msgspec

from adapters.erp_legacy import LegacyErpSettings
from broker.config import convert_table
from canonical import Envelope
from canonical.commerce import Account, Address, Order, OrderLine
from canonical.ids import DealRef
from canonical.q2c import OrderBookingRequested
from canonical.scalars import Money

#: The clock of every answer the sandbox gives in these tests.
NOW = datetime(2025, 3, 4, 10, 20, 30, tzinfo=UTC)
CUSTOMER_REF = "Q2C-5C0FFEE0DDBA11AB1E00"
KEY = DealRef(deal_id="deal-1001", order_id="order-1001")


def settings(root: Path, **overrides: object) -> LegacyErpSettings:
    """Settings whose folders live under *root* (created)."""
    (root / "out").mkdir(parents=True, exist_ok=True)
    (root / "in").mkdir(exist_ok=True)
    table: dict[str, object] = {
        "outbound-dir": str(root / "out"),
        "inbound-dir": str(root / "in"),
    }
    table.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return convert_table(LegacyErpSettings, table, where="[systems.erp_legacy]")


def order(*, customer_ref: str = CUSTOMER_REF, service_only: bool = False) -> Order:
    """A two-line order: a physical widget (with a bundled option) and a service."""
    physical = (
        OrderLine(
            number=1,
            sku="WIDGET-10",
            quantity=Decimal("3"),
            unit_price=Decimal("100.00"),
            net_amount=Decimal("300.00"),
            plant="1000",
        ),
        OrderLine(
            number=2,
            sku="WIDGET-MOUNT",
            quantity=Decimal("3"),
            unit_price=Decimal("12.50"),
            net_amount=Decimal("37.50"),
            plant="1000",
            parent=1,
        ),
    )
    service = OrderLine(
        number=3,
        sku="SUPPORT-1Y",
        quantity=Decimal("1"),
        unit_price=Decimal("240.00"),
        net_amount=Decimal("240.00"),
        physical=False,
        recurring=True,
        term_months=12,
        plant="1100",
    )
    lines = (service,) if service_only else (*physical, service)
    total = sum((line.net_amount for line in lines), Decimal(0))
    return Order(
        id=KEY.order_id,
        deal_id=KEY.deal_id,
        quote_id="quote-1001",
        account=Account(
            id="acct-ACME-001",
            name="Acme Maschinenbau GmbH",
            country="DE",
            currency="EUR",
            billing_address=Address(
                street="Hauptstrasse 1",
                city="Berlin",
                postal_code="10115",
                country="DE",
            ),
        ),
        currency="EUR",
        lines=lines,
        net_total=Money(amount=total, currency="EUR"),
        payment_terms="NT30",
        legal_entity="1000",
        sales_org="1010",
        distribution_channel="10",
        division="00",
        region="EMEA",
        erp="legacy",
        customer_ref=customer_ref,
        tax_country="DE",
    )


def booking(
    command: OrderBookingRequested, *, key: str = "book:order-1001"
) -> Envelope:
    """The envelope a system actor hands the connector for *command*."""
    return Envelope(
        id="msg-1",
        source="/q2c/deal",
        type="erp.order.booking_requested",
        time=datetime(2025, 3, 4, 9, 0, 0, tzinfo=UTC),
        correlation_id=command.order.deal_id,
        idempotency_key=key,
        data=msgspec.Raw(msgspec.json.encode(command)),
    )
