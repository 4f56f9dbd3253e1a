"""Content hashes: how a writer recognises its own write when it comes back.

Equal content hashes equal: a `Decimal` counts by its value, not its
spelling (``100.0``, ``100.00`` and ``1E+2`` are one amount, ``-0`` is ``0``),
and text counts in Unicode NFC (a precomposed ``é`` and ``e`` + combining
accent are one name).
"""

from __future__ import annotations

import decimal
import hashlib
import unicodedata
from decimal import Decimal
from typing import Any

import msgspec

__all__ = ["content_hash"]

_encoder = msgspec.json.Encoder(order="sorted")
# Enough precision and range that normalize() only strips zeros, never rounds.
_EXACT = decimal.Context(
    prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN
)
_ZERO = Decimal(0)
_ONE = Decimal(1)
#: Integers up to this many digits hash in plain notation (``100``, not ``1E+2``).
_PLAIN_DIGITS = 64


def _decimal(value: Decimal) -> Decimal:
    """*value* spelled one way: no trailing zeros, no exponent for an integer."""
    if not value.is_finite():
        return value
    if not value:
        return _ZERO  # also -0 and 0E+5
    exact = value.normalize(_EXACT)
    exponent = exact.as_tuple().exponent
    if isinstance(exponent, int) and exponent > 0 and exact.adjusted() < _PLAIN_DIGITS:
        exact = exact.quantize(_ONE, context=_EXACT)
    return exact


def _canonical(value: Any) -> Any:
    if isinstance(value, str):
        return (
            value
            if unicodedata.is_normalized("NFC", value)
            else unicodedata.normalize("NFC", value)
        )
    if isinstance(value, Decimal):
        return _decimal(value)
    if isinstance(value, dict):
        return {_canonical(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def content_hash(value: Any) -> str:
    """A short, stable hash of *value*'s canonical JSON (keys sorted).

    Values without Decimals or non-NFC text hash as they did before Decimals
    and text were normalised.
    """
    plain = msgspec.to_builtins(value, builtin_types=(Decimal,), order="sorted")
    return hashlib.blake2b(
        _encoder.encode(_canonical(plain)), digest_size=12
    ).hexdigest()
