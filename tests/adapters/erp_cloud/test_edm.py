"""The OData V2 scalar codecs: dates, decimals, ETags, literals."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import msgspec
import pytest

from adapters.erp_cloud import edm
from adapters.erp_cloud.edm import EdmDateTime, EdmDateTimeOffset


def test_datetime_reads_and_writes_epoch_milliseconds() -> None:
    """``/Date(1492041600000)/`` is 2017-04-13 00:00 UTC, and back again."""
    value = EdmDateTime.parse("/Date(1492041600000)/")
    assert value == datetime(2017, 4, 13, tzinfo=UTC)
    assert value.wire() == "/Date(1492041600000)/"


def test_datetimeoffset_writes_the_offset_and_reads_either_form() -> None:
    """SAP's spec shows DateTimeOffset with and without ``+0000``; both read."""
    with_offset = EdmDateTimeOffset.parse("/Date(1492098664000+0000)/")
    without = EdmDateTimeOffset.parse("/Date(1492098664000)/")
    assert with_offset == without == datetime(2017, 4, 13, 15, 51, 4, tzinfo=UTC)
    assert with_offset.wire() == "/Date(1492098664000+0000)/"


def test_an_offset_does_not_move_the_instant() -> None:
    """The milliseconds are UTC whatever the suffix says."""
    assert EdmDateTimeOffset.parse("/Date(0+0120)/") == datetime(1970, 1, 1, tzinfo=UTC)


def test_dates_before_the_epoch_read() -> None:
    """Negative milliseconds are dates before 1970."""
    assert EdmDateTime.parse("/Date(-86400000)/") == datetime(1969, 12, 31, tzinfo=UTC)


@pytest.mark.parametrize("text", ["2017-04-13", "/Date()/", "/Date(12)", "Date(12)/"])
def test_other_date_forms_are_refused(text: str) -> None:
    """Only the ``/Date(...)/`` form is an Edm date."""
    with pytest.raises(ValueError, match="/Date"):
        EdmDateTime.parse(text)


def test_of_truncates_to_milliseconds_and_needs_a_timezone() -> None:
    """The wire has milliseconds; a naive datetime has no instant."""
    value = EdmDateTimeOffset.of(datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    assert value.microsecond == 678000
    with pytest.raises(ValueError, match="timezone"):
        EdmDateTime.of(datetime(2025, 1, 2))


class _Dated(msgspec.Struct, frozen=True, kw_only=True):
    at: EdmDateTime | None = None
    changed: EdmDateTimeOffset | None = None
    amount: Decimal | None = None


def test_decode_and_encode_carry_the_wire_forms() -> None:
    """Views decode ``/Date`` strings and encode them back; decimals stay strings."""
    raw = (
        b'{"at":"\\/Date(1492041600000)\\/",'
        b'"changed":"/Date(1+0000)/","amount":"12.500"}'
    )
    value = edm.decode(raw, _Dated)
    assert isinstance(value.at, EdmDateTime)
    assert value.amount == Decimal("12.500")
    assert edm.encode(value) == (
        b'{"at":"/Date(1492041600000)/","changed":"/Date(1+0000)/","amount":"12.500"}'
    )


def test_a_bad_date_is_a_validation_error_at_its_path() -> None:
    """A malformed date names the field, as any other validation error does."""
    with pytest.raises(msgspec.ValidationError, match=r"\$\.at"):
        edm.decode(b'{"at":"yesterday"}', _Dated)


@pytest.mark.parametrize(
    "ms", ["253402300800000", "99999999999999999", "-99999999999999", "9" * 400]
)
def test_a_date_no_datetime_holds_is_a_validation_error_at_its_path(ms: str) -> None:
    """Past year 9999 (an OverflowError inside) is refused like any bad date.

    The client catches validation errors; an OverflowError escaped it.
    """
    raw = b'{"changed":"/Date(' + ms.encode() + b'+0000)/"}'
    with pytest.raises(msgspec.ValidationError, match=r"1 to 9999 .* at `\$\.changed`"):
        edm.decode(raw, _Dated)
    with pytest.raises(ValueError, match="outside the years 1 to 9999"):
        EdmDateTime.parse(f"/Date({ms})/")
    assert EdmDateTime.parse("/Date(253402300799999)/").year == 9999


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("1E+2", "100"),
        ("12.5000", "12.5"),
        ("0.0005", "0.001"),
        ("-1.2345", "-1.235"),
        ("3.14159", "3.142"),
        (7, "7"),
    ],
)
def test_edm_decimal_is_fixed_point_with_at_most_three_places(
    given: str | int, expected: str
) -> None:
    """Rounded half up to 3 places, no exponent, no trailing zeros."""
    assert str(edm.edm_decimal(given)) == expected


@pytest.mark.parametrize("given", ["NaN", "Infinity", "twelve"])
def test_edm_decimal_refuses_non_numbers(given: str) -> None:
    """Only finite numbers are amounts."""
    with pytest.raises(ValueError, match="decimal"):
        edm.edm_decimal(given)


def test_etag_has_sap_shape_and_reads_back() -> None:
    """``W/"datetimeoffset'…'"`` with 7 fractional digits and encoded colons."""
    at = datetime(2016, 9, 2, 6, 15, 47, 125705, tzinfo=UTC)
    etag = edm.etag_for(at)
    assert etag == "W/\"datetimeoffset'2016-09-02T06%3A15%3A47.1257050Z'\""
    assert edm.parse_etag(etag) == at
    with pytest.raises(ValueError, match="ETag"):
        edm.parse_etag('"abc"')


def test_literals_double_their_quotes() -> None:
    """OData string literals escape ``'`` as ``''``."""
    assert edm.odata_literal("O'Brien") == "'O''Brien'"
