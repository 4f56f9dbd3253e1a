"""AMQP field tables as the wire client reads them: pamqp's values, in place."""

from __future__ import annotations

import datetime
import struct
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pamqp import decode as pdecode

from broker.transport.frames import decode_table, encode_table


def entry(key: bytes, kind: bytes, payload: bytes) -> bytes:
    return bytes([len(key)]) + key + kind + payload


def sized(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def read(table: bytes) -> dict[str, Any]:
    return decode_table(bytearray(table), 0, len(table))


def pamqp_reads(table: bytes) -> dict[str, Any]:
    return pdecode.field_table(struct.pack(">I", len(table)) + table)[1]


#: One value of every type pamqp reads, nested in a table and an array too.
EVERY_TYPE = b"".join(
    [
        entry(b"t", b"t", b"\x01"),
        entry(b"b", b"b", b"\xff"),
        entry(b"B", b"B", b"\xff"),
        entry(b"s", b"s", b"\xff\xfe"),
        entry(b"u", b"u", b"\xff\xfe"),
        entry(b"I", b"I", b"\xff\xff\xff\xfe"),
        entry(b"i", b"i", b"\xff\xff\xff\xfe"),
        entry(b"l", b"l", struct.pack(">q", -(2**40))),
        entry(b"L", b"L", struct.pack(">q", -(2**40))),
        entry(b"f", b"f", struct.pack(">f", 1.5)),
        entry(b"d", b"d", struct.pack(">d", -2.25)),
        entry(b"D", b"D", b"\x02" + struct.pack(">i", -12345)),
        entry(b"T", b"T", struct.pack(">Q", 1_700_000_000)),
        entry(b"Tms", b"T", struct.pack(">Q", 1_700_000_000_123)),
        entry(b"V", b"V", b""),
        entry(b"S", b"", sized(b"S", "é".encode())),
        entry(b"S-bytes", b"", sized(b"S", b"\xff\xfe")),
        entry(b"x", b"", sized(b"x", b"\x00\x01")),
        entry(b"A", b"", sized(b"A", b"V" + b"b\x07" + sized(b"S", b"in") + b"t\x00")),
        entry(
            b"F",
            b"",
            sized(
                b"F", entry(b"n", b"I", b"\x00\x00\x00\x01") + entry(b"v", b"V", b"")
            ),
        ),
        entry(
            b"x-death",
            b"",
            sized(
                b"A",
                sized(b"F", entry(b"count", b"l", struct.pack(">q", 3)))
                + sized(b"F", entry(b"reason", b"", sized(b"S", b"expired"))),
            ),
        ),
    ]
)


#: Pads a table past 2 KiB, where every value read is counted.
PADDING = entry(b"pad", b"", sized(b"S", b"p" * 2100))


@pytest.mark.parametrize("table", [EVERY_TYPE, EVERY_TYPE + PADDING])
def test_every_field_type_reads_as_pamqp_reads_it(table: bytes) -> None:
    """Values, their Python types and nesting match pamqp's decoder exactly."""
    ours, theirs = read(table), pamqp_reads(table)
    assert ours == theirs
    assert [type(v) for v in ours.values()] == [type(v) for v in theirs.values()]
    assert ours["D"] == Decimal("-123.45")
    assert ours["Tms"] == datetime.datetime(
        2023, 11, 14, 22, 13, 20, 123000, tzinfo=datetime.UTC
    )
    assert ours["x-death"] == [{"count": 3}, {"reason": "expired"}]


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(width=32, allow_nan=False)
    | st.text(max_size=20)
    | st.decimals(places=2, min_value=-(10**6), max_value=10**6),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@given(st.dictionaries(st.text(max_size=8), _values, max_size=8))
def test_tables_read_as_pamqp_reads_them(headers: dict[str, Any]) -> None:
    """Whatever the wire client encodes, it and pamqp decode to the same values."""
    table = encode_table(headers)[4:]
    assert read(table) == pamqp_reads(table)


@pytest.mark.parametrize("padding", [b"", PADDING], ids=["inline", "counted"])
def test_type_byte_0x00_reads_as_void_as_pamqp_reads_it(padding: bytes) -> None:
    """0x00, undocumented but seen in the wild, is void (None), as in pamqp."""
    table = (
        entry(b"zero", b"\x00", b"")
        + entry(b"a", b"", sized(b"A", b"\x00" + b"b\x07" + b"\x00"))
        + entry(b"F", b"", sized(b"F", entry(b"z", b"\x00", b"")))
        + entry(b"after", b"b", b"\x05")
        + padding
    )
    theirs = pamqp_reads(table)
    assert read(table) == theirs
    assert theirs["zero"] is None
    assert theirs["a"] == [None, 7, None]
    assert (theirs["F"], theirs["after"]) == ({"z": None}, 5)


def test_a_table_holds_at_most_1024_values() -> None:
    """Entries and the values nested in them count alike; the 1025th is refused."""
    voids = b"".join(entry(b"%d" % i, b"V", b"") for i in range(1024))
    assert len(read(voids)) == 1024
    array = entry(b"a", b"", sized(b"A", b"V" * 1023))  # the array is one too
    assert read(array) == {"a": [None] * 1023}
    for table in (
        voids + entry(b"x", b"V", b""),
        entry(b"a", b"", sized(b"A", b"V" * 1024)),
    ):
        with pytest.raises(ValueError, match="field table of over 1024 values"):
            read(table)


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        (entry(b"k", b"Z", b""), r"unknown field type b'Z'"),
        (entry(b"k", b"", sized(b"F", entry(b"\xff", b"V", b""))), "utf-8"),
        (entry(b"k", b"T", struct.pack(">Q", 2**64 - 1)), "out of range"),
        (entry(b"k", b"", sized(b"A", b"l\x00")), "runs past its table"),
    ],
    ids=["unknown-type", "nested-name-not-utf8", "timestamp", "value-past-array"],
)
def test_unreadable_tables_raise_value_error(table: bytes, reason: str) -> None:
    """Every way a table cannot be read is a ValueError the channel flags."""
    with pytest.raises(ValueError, match=reason):
        read(table)
