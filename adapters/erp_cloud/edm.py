"""OData V2 (JSON verbose) scalar codecs: Edm.DateTime, Edm.DateTimeOffset, Edm.Decimal.

SAP Gateway writes ``Edm.DateTime`` as ``"/Date(<epoch ms>)/"`` and
``Edm.DateTimeOffset`` as ``"/Date(<epoch ms>+0000)/"`` (the suffix is the
offset in minutes; the milliseconds are always UTC). JSON allows the slashes
escaped with backslashes; the JSON decoder undoes that before we see the
text. ``Edm.Decimal`` travels as a string (``"12.500"``) so no float ever
touches a quantity or an amount.

The two date types are `datetime` subclasses so views hold real, UTC-aware
datetimes; msgspec hands them to the hooks here because it does not know
them. Decode and encode views with `decode` / `encode` (or pass `dec_hook` /
`enc_hook`), never with msgspec's bare functions.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, Final, Self, TypeVar
from urllib.parse import quote, unquote

import msgspec

__all__ = [
    "EdmDateTime",
    "EdmDateTimeOffset",
    "edm_decimal",
    "decimal_places",
    "dec_hook",
    "enc_hook",
    "decode",
    "convert",
    "encode",
    "to_builtins",
    "etag_for",
    "parse_etag",
    "odata_literal",
]

T = TypeVar("T")

_DATE = re.compile(r"^/Date\((-?\d+)(?:[+-]\d{4})?\)/$")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
DECIMAL_PLACES: Final = 3


def _millis(value: datetime) -> int:
    if value.tzinfo is None:
        raise ValueError("OData dates must be timezone-aware")
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


class _EdmInstant(datetime):
    """A UTC instant with millisecond precision, as OData V2 carries it."""

    @classmethod
    def of(cls, value: datetime) -> Self:
        """The same instant, truncated to whole milliseconds, in UTC."""
        return cls._from_millis(_millis(value))

    @classmethod
    def parse(cls, text: str) -> Self:
        """Read ``/Date(<ms>)/`` or ``/Date(<ms>[+-]hhmm)/``.

        SAP's own spec shows both forms for both types, so both are accepted.

        Raises:
            ValueError: *text* is not in the ``/Date(...)/`` form, or its
                milliseconds fall outside years 1 to 9999 (msgspec reports
                either as a validation error at the field).
        """
        return cls._from_millis(_parse_millis(text))

    @classmethod
    def _from_millis(cls, ms: int) -> Self:
        try:
            at = _EPOCH + timedelta(milliseconds=ms)
        except OverflowError as exc:
            raise ValueError(
                f"/Date({ms})/ is outside the years 1 to 9999 a date can hold"
            ) from exc
        return cls(
            at.year,
            at.month,
            at.day,
            at.hour,
            at.minute,
            at.second,
            at.microsecond,
            tzinfo=UTC,
        )

    def wire(self) -> str:
        """The wire form."""
        raise NotImplementedError


class EdmDateTime(_EdmInstant):
    """An ``Edm.DateTime``: a UTC instant written ``/Date(<ms>)/``."""

    def wire(self) -> str:
        """The wire form, ``/Date(<ms>)/``."""
        return f"/Date({_millis(self)})/"


class EdmDateTimeOffset(_EdmInstant):
    """An ``Edm.DateTimeOffset``: written ``/Date(<ms>+0000)/``; kept in UTC."""

    def wire(self) -> str:
        """The wire form, ``/Date(<ms>+0000)/``."""
        return f"/Date({_millis(self)}+0000)/"


def _parse_millis(text: str) -> int:
    # The milliseconds are UTC whatever the offset says; the offset only
    # records the writer's local time, which a UTC view does not keep.
    match = _DATE.match(text)
    if match is None:
        raise ValueError(f"expected '/Date(<ms>)/', got {text!r}")
    return int(match.group(1))


def decimal_places(value: Decimal) -> int:
    """How many digits *value* has after the point (0 for integers and exponents)."""
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def edm_decimal(value: Decimal | int | str, places: int = DECIMAL_PLACES) -> Decimal:
    """*value* as an ``Edm.Decimal`` SAP accepts: fixed point, ≤ *places* decimals.

    Rounds half up (SAP's commercial rounding) and drops trailing zeros past
    the point, so ``Decimal("1E+2")`` becomes ``100`` and ``"12.5000"`` ``12.5``;
    the JSON encoder then writes the plain digits as a string.

    Raises:
        ValueError: *value* is not a finite number.
    """
    try:
        number = Decimal(value)
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal: {value!r}") from exc
    if not number.is_finite():
        raise ValueError(f"not a finite decimal: {value!r}")
    quantum = Decimal(1).scaleb(-places)
    rounded = number.quantize(quantum, rounding=ROUND_HALF_UP)
    if rounded == rounded.to_integral_value():
        return rounded.quantize(Decimal(1))
    return rounded.normalize()


def dec_hook(type_: type, obj: Any) -> Any:
    """Decode hook (msgspec) for the Edm date types."""
    if issubclass(type_, _EdmInstant):
        if isinstance(obj, str):
            return type_.parse(obj)
        raise TypeError("expected a '/Date(<ms>)/' string")
    raise NotImplementedError(f"cannot decode {type_!r}")


def enc_hook(obj: Any) -> Any:
    """Encode hook (msgspec) for the Edm date types."""
    if isinstance(obj, _EdmInstant):
        return obj.wire()
    raise NotImplementedError(f"cannot encode {type(obj)!r}")


_ENCODER: Final = msgspec.json.Encoder(enc_hook=enc_hook, decimal_format="string")


def encode(obj: Any) -> bytes:
    """JSON bytes of a view (or any value holding views)."""
    return _ENCODER.encode(obj)


def decode(data: bytes | str, type_: type[T]) -> T:
    """Decode JSON *data* into *type_*, reading ``/Date(...)/`` values.

    Raises:
        msgspec.ValidationError: the data does not fit *type_* (with the JSON path).
        msgspec.DecodeError: *data* is not JSON.
    """
    return msgspec.json.decode(data, type=type_, dec_hook=dec_hook)


def convert(obj: Any, type_: type[T]) -> T:
    """Convert already-decoded JSON (dicts and lists) into *type_*.

    Raises:
        msgspec.ValidationError: *obj* does not fit *type_*.
    """
    return msgspec.convert(obj, type_, dec_hook=dec_hook)


def to_builtins(obj: Any) -> Any:
    """A view as plain JSON-ready dicts and lists (dates in wire form)."""
    return msgspec.to_builtins(obj, enc_hook=enc_hook)


def etag_for(changed_at: datetime) -> str:
    """The weak ETag SAP derives from ``LastChangeDateTime``.

    Shaped like ``W/"datetimeoffset'2016-09-02T06%3A15%3A47.1257050Z'"``:
    seven fractional digits (100 ns ticks), colons percent-encoded.
    """
    utc = changed_at.astimezone(UTC)
    text = utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond:06d}0Z"
    return f"W/\"datetimeoffset'{quote(text, safe='')}'\""


def parse_etag(etag: str) -> datetime:
    """The instant inside an ETag made by `etag_for`.

    Raises:
        ValueError: *etag* is not of that shape.
    """
    match = re.fullmatch(r"W/\"datetimeoffset'([^']+)'\"", etag)
    if match is None:
        raise ValueError(f"not a datetimeoffset ETag: {etag!r}")
    text = unquote(match.group(1))
    return datetime.strptime(text[:26] + "Z", "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=UTC
    )


def odata_literal(value: str) -> str:
    """*value* as an OData V2 string literal: single-quoted, quotes doubled."""
    return "'" + value.replace("'", "''") + "'"
