"""One sample of every published canonical type, for the golden files."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from canonical import Money
from canonical.commerce import (
    Account,
    Address,
    Invoice,
    Opportunity,
    Order,
    OrderLine,
    PriceBookEntry,
    Product,
    Quote,
    QuoteLine,
    Shipment,
    ShipmentLine,
    Subscription,
    SubscriptionItem,
)
from canonical.q2c import (
    AccountChanged,
    BusinessException,
    CustomerChanged,
    CustomerSynced,
    CustomerSyncRequested,
    DealCompleted,
    InvoiceIssued,
    InvoicePaid,
    OpportunityCreated,
    OpportunityUpdated,
    OpportunityUpdateRequested,
    OrderBooked,
    OrderBookingRequested,
    OrderRejected,
    OrderSubmitted,
    ProductChanged,
    ProductSynced,
    ProductSyncRequested,
    QuoteApproved,
    QuoteDenied,
    QuoteUpdated,
    QuoteUpdateRequested,
    RecordReadRequired,
    ShipmentDispatched,
    SlaBreached,
    SubscriptionCreated,
    SubscriptionRequested,
    TimerElapsed,
)

AT = datetime(2026, 3, 31, 16, 45, 12, 250000, tzinfo=UTC)
SF_OPP = "006Hn00000A1b2cIAB"
SF_ACCT = "001Hn00000XyZ12IAF"
DEAL = f"deal-{SF_OPP}"
ORDER = f"order-{SF_OPP}"
QUOTE = "quote-a0QHn000001AbCdMAK"

ACCOUNT = Account(
    id=f"acct-{SF_ACCT}",
    name="Nordwind Logistik GmbH",
    country="DE",
    currency="EUR",
    billing_address=Address(
        street="Hafenstraße 12", city="Hamburg", postal_code="20457", country="DE"
    ),
    tax_id="DE123456789",
)
EUR = "EUR"


def eur(amount: str) -> Money:
    return Money(amount=Decimal(amount), currency=EUR)


QUOTE_LINES = (
    QuoteLine(
        number=1,
        sku="HW-GATEWAY-200",
        product_name="Edge gateway 200",
        family="hardware",
        quantity=Decimal(4),
        list_price=Decimal("1200.00"),
        unit_price=Decimal("1100.00"),
        net_total=Decimal("4400.00"),
    ),
    QuoteLine(
        number=2,
        sku="SAAS-FLEET-PRO",
        product_name="Fleet analytics Pro",
        family="saas",
        quantity=Decimal(25),
        list_price=Decimal("40.00"),
        unit_price=Decimal("36.00"),
        net_total=Decimal("900.00"),
        recurring=True,
        physical=False,
        term_months=12,
        parent=1,
    ),
)
QUOTE_DOC = Quote(
    id=QUOTE,
    opportunity_id=f"opp-{SF_OPP}",
    account_id=ACCOUNT.id,
    currency=EUR,
    lines=QUOTE_LINES,
    net_total=eur("5300.00"),
    status="approved",
    tax_country="DE",
    start_date=date(2026, 4, 1),
)
ORDER_DOC = Order(
    id=ORDER,
    deal_id=DEAL,
    quote_id=QUOTE,
    account=ACCOUNT,
    currency=EUR,
    lines=(
        OrderLine(
            number=1,
            sku="HW-GATEWAY-200",
            quantity=Decimal(4),
            unit_price=Decimal("1100.00"),
            net_amount=Decimal("4400.00"),
            plant="DE10",
            tax_code="A1",
            revenue_class="product",
        ),
        OrderLine(
            number=2,
            sku="SAAS-FLEET-PRO",
            quantity=Decimal(25),
            unit_price=Decimal("36.00"),
            net_amount=Decimal("900.00"),
            recurring=True,
            physical=False,
            term_months=12,
            parent=1,
            plant="DE90",
            tax_code="A1",
            revenue_class="subscription",
        ),
    ),
    net_total=eur("5300.00"),
    payment_terms="NT30",
    legal_entity="DE01",
    sales_org="1010",
    region="EMEA",
    erp="cloud",
    customer_ref=f"Q2C-{SF_OPP}",
    tax_country="DE",
)
PRODUCT = Product(
    sku="SAAS-FLEET-PRO",
    name="Fleet analytics Pro",
    family="saas",
    recurring=True,
    physical=False,
)
PRICE = PriceBookEntry(
    sku="SAAS-FLEET-PRO",
    currency=EUR,
    list_price=Decimal("40.00"),
    floor_price=Decimal("30.00"),
)
SUBSCRIPTION = Subscription(
    id=f"sub-{SF_OPP}",
    account=ACCOUNT,
    order_id=ORDER,
    currency=EUR,
    items=(
        SubscriptionItem(
            sku="SAAS-FLEET-PRO",
            quantity=Decimal(25),
            unit_amount=Decimal("36.00"),
            interval_months=12,
        ),
    ),
    amount_per_period=eur("900.00"),
)
INVOICE = Invoice(
    id=f"inv-{SF_OPP}",
    order_id=ORDER,
    number="90000123",
    amount=eur("5300.00"),
    issued_at=AT,
)


def samples() -> dict[str, Any]:
    """Type tag → one instance, covering every published type."""
    events: list[Any] = [
        AccountChanged(
            account=ACCOUNT,
            change="updated",
            native_id=SF_ACCT,
            changed_fields=("Name", "BillingAddress.City"),
        ),
        CustomerSyncRequested(account=ACCOUNT, content_hash="9f2c41d07be3a5c1e0d4f6a2"),
        CustomerSynced(
            account_id=ACCOUNT.id,
            system="erp_cloud",
            native_id="1000042",
            content_hash="9f2c41d07be3a5c1e0d4f6a2",
        ),
        CustomerChanged(
            account=ACCOUNT,
            system="erp_cloud",
            native_id="1000042",
            content_hash="9f2c41d07be3a5c1e0d4f6a2",
        ),
        ProductChanged(product=PRODUCT, prices=(PRICE,)),
        ProductSyncRequested(product=PRODUCT, prices=(PRICE,)),
        ProductSynced(sku="SAAS-FLEET-PRO", native_id="01tHn000003QwErIAK"),
        RecordReadRequired(
            entity="Account", native_ids=(SF_ACCT,), change_type="GAP_UPDATE"
        ),
        OpportunityCreated(
            opportunity=Opportunity(
                id=f"opp-{SF_OPP}",
                account=ACCOUNT,
                name="Nordwind fleet rollout",
                stage="Prospecting",
                close_date=date(2026, 6, 30),
                amount=eur("5300.00"),
            )
        ),
        QuoteApproved(quote=QUOTE_DOC),
        QuoteDenied(quote=QUOTE_DOC, reason="discount above 10 % needs VP approval"),
        OrderBookingRequested(order=ORDER_DOC),
        OrderSubmitted(
            order_id=ORDER,
            deal_id=DEAL,
            erp="legacy",
            document="ORDERS05_Q2C-006Hn00000A1b2cIAB.xml",
        ),
        OrderBooked(
            order_id=ORDER,
            deal_id=DEAL,
            erp="cloud",
            erp_order_id="4711",
            status="A",
            net_total=eur("5300.00"),
            customer_ref=f"Q2C-{SF_OPP}",
        ),
        OrderRejected(
            order_id=ORDER,
            deal_id=DEAL,
            erp="cloud",
            code="V1/320",
            message="Sold-to party not maintained for sales area",
            net_total=eur("5300.00"),
        ),
        OpportunityUpdateRequested(
            opportunity_id=f"opp-{SF_OPP}", stage="Closed Won", order_number="4711"
        ),
        OpportunityUpdated(
            opportunity_id=f"opp-{SF_OPP}", stage="Closed Won", native_id=SF_OPP
        ),
        QuoteUpdateRequested(quote_id=QUOTE, status="ordered", order_number="4711"),
        QuoteUpdated(quote_id=QUOTE, status="ordered", native_id="a0QHn000001AbCdMAK"),
        SubscriptionRequested(subscription=SUBSCRIPTION, deal_id=DEAL),
        SubscriptionCreated(
            subscription_id=SUBSCRIPTION.id,
            deal_id=DEAL,
            order_id=ORDER,
            native_id="sub_1PqRsT2eZvKYlo2C",
            amount_per_period=eur("900.00"),
            status="active",
        ),
        InvoiceIssued(invoice=INVOICE, deal_id=DEAL, erp="cloud"),
        InvoicePaid(invoice=INVOICE, deal_id=DEAL, native_id="in_1PqRsU2eZvKYlo2C"),
        ShipmentDispatched(
            shipment=Shipment(
                id=f"ship-{SF_OPP}",
                order_id=ORDER,
                number="80000456",
                lines=(ShipmentLine(sku="HW-GATEWAY-200", quantity=Decimal(4)),),
                dispatched_at=AT,
            ),
            deal_id=DEAL,
            erp="cloud",
        ),
        TimerElapsed(deal_id=DEAL, timer="booking_sla", due_at=AT),
        SlaBreached(
            deal_id=DEAL,
            stage="booking",
            document="order",
            document_id=ORDER,
            amount=eur("5300.00"),
            due_at=AT,
        ),
        BusinessException(
            deal_id=DEAL,
            kind="quote_rejected",
            document="quote",
            document_id=QUOTE,
            amount=eur("5300.00"),
            violations=(
                "line 2 SAAS-FLEET-PRO: unit price 20.00 EUR below floor 30.00 EUR",
            ),
        ),
        DealCompleted(
            deal_id=DEAL,
            quote_id=QUOTE,
            order_id=ORDER,
            erp="cloud",
            erp_order_id="4711",
            net_total=eur("5300.00"),
            invoice_number="90000123",
            subscription_id="sub_1PqRsT2eZvKYlo2C",
            completed_at=AT,
        ),
    ]
    return {type(e).__struct_config__.tag: e for e in events}
