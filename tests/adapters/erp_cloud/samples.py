"""Canonical orders, accounts and envelopes for the SAP S/4HANA Cloud tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import msgspec

from adapters.erp_cloud.views import A_CustomerSalesArea, A_Product
from canonical import Envelope
from canonical.commerce import Account, Address, Order, OrderLine
from canonical.q2c import OrderBookingRequested
from canonical.scalars import Money

USER = "Q2C_COMM_USER"
PASSWORD = "sandbox-password"
NOW = datetime(2025, 3, 4, 10, 20, 30, tzinfo=UTC)
DEAL = "deal-006Hn00000A1b2cIAB"
ORDER_ID = "order-006Hn00000A1b2cIAB"
CUSTOMER_REF = "Q2C-006Hn00000A1b2cIAB"

ACCOUNT = Account(
    id="acct-001Hn00000XyZ12IAF",
    name="Nordwind Logistik GmbH",
    country="DE",
    currency="EUR",
)
#: The same account with what the ERP needs for invoicing: address and VAT number.
BILLED = msgspec.structs.replace(
    ACCOUNT,
    billing_address=Address(
        street="Hafenstraße 12",
        city="Hamburg",
        postal_code="20457",
        region="HH",
        country="DE",
    ),
    tax_id="DE123456789",
)


def products() -> list[A_Product]:
    """The catalogue the sandbox is seeded with: two goods, one service."""
    return [
        A_Product(
            Product="HW-GATEWAY-200",
            ProductType="FERT",
            ProductGroup="HARDWARE",
            ProductDescription="Edge gateway 200",
            BaseUnit="PC",
            ListPrice=Decimal("1200.00"),
            PriceFloor=Decimal("950.00"),
            Currency="EUR",
        ),
        A_Product(
            Product="HW-MOUNT-KIT",
            ProductType="FERT",
            ProductGroup="HARDWARE",
            ProductDescription="Mounting kit",
            BaseUnit="PC",
            ListPrice=Decimal("45.00"),
            PriceFloor=Decimal("30.00"),
            Currency="EUR",
        ),
        A_Product(
            Product="SAAS-FLEET-PRO",
            ProductType="SERV",
            ProductGroup="SAAS",
            ProductDescription="Fleet analytics Pro",
            ListPrice=Decimal("40.00"),
            PriceFloor=Decimal("30.00"),
            Currency="EUR",
        ),
    ]


def area(
    org: str = "1010", channel: str = "10", division: str = "00"
) -> A_CustomerSalesArea:
    """A sales area in EUR with payment terms ``0001``."""
    return A_CustomerSalesArea(
        SalesOrganization=org,
        DistributionChannel=channel,
        Division=division,
        Currency="EUR",
        CustomerPaymentTerms="0001",
    )


def order(
    *,
    lines: tuple[OrderLine, ...] | None = None,
    customer_ref: str = CUSTOMER_REF,
    payment_terms: str = "NT30",
    legal_entity: str = "DE01",
) -> Order:
    """A bundle (gateway with a mounting kit) and a subscription line, in EUR."""
    lines = lines or (
        OrderLine(
            number=1,
            sku="HW-GATEWAY-200",
            quantity=Decimal(4),
            unit_price=Decimal("1100.00"),
            net_amount=Decimal("4400.00"),
            plant="DE10",
        ),
        OrderLine(
            number=2,
            sku="HW-MOUNT-KIT",
            quantity=Decimal(4),
            unit_price=Decimal("45.00"),
            net_amount=Decimal("171.00"),
            plant="DE10",
            parent=1,
        ),
        OrderLine(
            number=3,
            sku="SAAS-FLEET-PRO",
            quantity=Decimal(25),
            unit_price=Decimal("36.00"),
            net_amount=Decimal("900.00"),
            recurring=True,
            physical=False,
            term_months=12,
        ),
    )
    total = sum((line.net_amount for line in lines), Decimal(0))
    return Order(
        id=ORDER_ID,
        deal_id=DEAL,
        quote_id="quote-a0QHn000001AbCdMAK",
        account=ACCOUNT,
        currency="EUR",
        lines=lines,
        net_total=Money(amount=total, currency="EUR"),
        payment_terms=payment_terms,
        legal_entity=legal_entity,
        sales_org="1010",
        region="EMEA",
        erp="cloud",
        customer_ref=customer_ref,
        tax_country="DE",
    )


def booking(
    cmd_order: Order, *, key: str = "erp.order.booking_requested:deal-1"
) -> tuple[OrderBookingRequested, Envelope]:
    """The command and the envelope it arrives in."""
    command = OrderBookingRequested(order=cmd_order)
    envelope = Envelope(
        id="msg-1",
        source="/q2c/deal",
        type="erp.order.booking_requested",
        time=NOW,
        correlation_id=cmd_order.deal_id,
        idempotency_key=key,
        data=msgspec.Raw(msgspec.json.encode(command)),
    )
    return command, envelope
