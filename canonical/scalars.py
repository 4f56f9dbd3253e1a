"""Constrained scalars shared by every canonical type: codes, SKUs, money.

Money is a `Decimal` with its currency, never a float; a currency or country
code is checked against ISO 4217 / ISO 3166-1 alpha-2, not just its shape.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

from msgspec import Meta

from canonical.base import Canonical

__all__ = [
    "CountryCode",
    "CurrencyCode",
    "Sku",
    "Money",
    "ISO_4217",
    "ISO_3166",
    "MINOR_UNITS",
    "check_amount",
]

# Patterns end in ``\Z``, not ``$``: msgspec searches with `re`, whose ``$``
# also matches before a trailing newline ("SKU-1\n" would pass).
CurrencyCode = Annotated[str, Meta(pattern=r"^[A-Z]{3}\Z")]
CountryCode = Annotated[str, Meta(pattern=r"^[A-Z]{2}\Z")]
#: Our stock-keeping unit: upper-case letters, digits, ``.``, ``_``, ``-``.
Sku = Annotated[str, Meta(pattern=r"^[A-Z0-9][A-Z0-9._-]{1,39}\Z")]

# ISO 4217 active codes (2024), and their minor units where not 2.
ISO_4217 = frozenset(
    """
    AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BOV
    BRL BSD BTN BWP BYN BZD CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK
    DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD HNL
    HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT
    LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR
    MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF
    SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP
    TRY TTD TWD TZS UAH UGX USD USN UYI UYU UYW UZS VED VES VND VUV WST XAF XCD XOF
    XPF YER ZAR ZMW ZWL
    """.split()  # noqa: SIM905 - a table of codes reads better than a list
)
MINOR_UNITS: dict[str, int] = {
    **dict.fromkeys(
        "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF".split(),  # noqa: SIM905
        0,
    ),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    "CLF": 4,
    "UYW": 4,
}

ISO_3166 = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM
    BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX
    CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG
    GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR
    IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV
    LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE
    NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO
    RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF
    TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF
    WS YE YT ZA ZM ZW
    """.split()  # noqa: SIM905 - a table of codes reads better than a list
)

_AMOUNT_LIMIT = Decimal("1e15")


def check_amount(amount: Decimal, *, places: int = 6) -> None:
    """Refuse amounts that are not finite, finer than *places* decimals, or ≥ 1e15.

    Raises:
        ValueError: msgspec reports it as a validation error at the field.
    """
    if not amount.is_finite():
        raise ValueError(f"amount {amount} is not finite")
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -places:
        raise ValueError(f"amount {amount} has more than {places} decimal places")
    # copy_abs, not abs(): abs() rounds to the context, and "1E+1000000"
    # would raise decimal.Overflow instead of failing validation.
    if amount.copy_abs() >= _AMOUNT_LIMIT:
        raise ValueError("amount is 1e15 or more")


def check_currency(code: str) -> None:
    """Refuse a well-shaped code that is not an ISO 4217 currency.

    Raises:
        ValueError: not in ISO 4217.
    """
    if code not in ISO_4217:
        raise ValueError(f"{code!r} is not an ISO 4217 currency code")


def check_country(code: str) -> None:
    """Refuse a well-shaped code that is not an ISO 3166-1 alpha-2 country.

    Raises:
        ValueError: not in ISO 3166-1.
    """
    if code not in ISO_3166:
        raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 country code")


class Money(Canonical, frozen=True, kw_only=True):
    """An amount in a currency: ``{"amount": "1250.00", "currency": "EUR"}``."""

    amount: Decimal
    currency: CurrencyCode

    def __post_init__(self) -> None:
        check_amount(self.amount)
        check_currency(self.currency)

    def __add__(self, other: Money) -> Money:
        if other.currency != self.currency:
            raise ValueError(f"cannot add {other.currency} to {self.currency}")
        return Money(amount=self.amount + other.amount, currency=self.currency)

    def quantized(self) -> Money:
        """Rounded to the currency's minor unit (half-even, like most ERPs)."""
        places = MINOR_UNITS.get(self.currency, 2)
        return Money(
            amount=self.amount.quantize(Decimal(1).scaleb(-places)),
            currency=self.currency,
        )

    def __str__(self) -> str:
        return f"{self.amount} {self.currency}"
