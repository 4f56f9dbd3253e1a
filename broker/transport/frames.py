"""The AMQP 0-9-1 wire format, where the wire client writes it by hand.

pamqp marshals the handshake and the rare methods; hand-written `struct`
code handles the frames that come once per message: Basic.Deliver with its
content header and body, Basic.Publish with its content, and Basic.Ack /
Basic.Nack in both directions. This module owns what that code shares: the
frame layouts and method ids, short strings, field tables (encoded without
pamqp for the common value types, decoded without it for all), the broker's
Close as an exception (`ClosedByBroker`) and the ``amqp://`` URL
(`parse_url`).
"""

from __future__ import annotations

import datetime
import struct
import urllib.parse
from collections.abc import Mapping
from decimal import Decimal
from typing import Any, Final, final

from pamqp import encode as pencode
from pamqp import frame as pframe
from pamqp.base import Frame

from broker.config import split_url
from broker.errors import TransportUnavailable
from broker.transport import SHORTSTR_MAX_BYTES

__all__ = [
    # connecting and closing
    "AmqpParams",
    "parse_url",
    "ClosedByBroker",
    # byte layouts
    "PROTOCOL_HEADER",
    "HEARTBEAT_FRAME",
    "FRAME_END",
    "BASIC_DELIVER",
    "BASIC_ACK",
    "BASIC_NACK",
    "FRAME_HEADER",
    "U16",
    "U32",
    "U64",
    "TAG_BITS",
    "BODY_SIZE_FLAGS",
    "ACK_FRAME",
    "HEADER_FRAME",
    # marshalling
    "shortstr",
    "encode_table",
    "decode_table",
    "method_frame",
]

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
HEARTBEAT_FRAME: Final = b"\x08\x00\x00\x00\x00\x00\x00\xce"
FRAME_END: Final = b"\xce"

# Method ids as one big-endian 32-bit number: class << 16 | method.
BASIC_DELIVER: Final = 0x003C003C
BASIC_ACK: Final = 0x003C0050
BASIC_NACK: Final = 0x003C0078

FRAME_HEADER = struct.Struct(">BHI")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
U64 = struct.Struct(">Q")
TAG_BITS = struct.Struct(">QB")
BODY_SIZE_FLAGS = struct.Struct(">QH")  # body size, first property-flags word
# type, channel, size, method, delivery tag, bits, frame end
ACK_FRAME = struct.Struct(">BHIIQBB")
# type, channel, size, class, weight, body size, property flags
HEADER_FRAME = struct.Struct(">BHIHHQH")


class ClosedByBroker(TransportUnavailable):
    """The broker closed a connection or channel with a reply code.

    ``code`` is the AMQP reply code (e.g. 404 NOT_FOUND, 406
    PRECONDITION_FAILED, 320 CONNECTION_FORCED), ``text`` the broker's words.
    """

    def __init__(self, what: str, code: int, text: str) -> None:
        super().__init__(f"{what} closed by broker: {code} {text}")
        self.code = code
        self.text = text


@final
class AmqpParams:
    """Where and as whom to connect, parsed from an ``amqp://`` URL.

    The password is kept out of ``repr`` so the object may be logged.
    """

    __slots__ = ("host", "password", "port", "tls", "user", "vhost")

    def __init__(
        self, *, host: str, port: int, user: str, password: str, vhost: str, tls: bool
    ) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.vhost = vhost
        self.tls = tls

    def __repr__(self) -> str:
        scheme = "amqps" if self.tls else "amqp"
        where = f"{self.user}@{self.host}:{self.port}"
        return f"<AmqpParams {scheme}://{where} vhost={self.vhost!r}>"


def parse_url(url: str) -> AmqpParams:
    """Parse ``amqp[s]://user:password@host:port/vhost`` (vhost url-encoded).

    An empty path means the vhost ``/``; missing credentials mean guest.

    Raises:
        ValueError: not an amqp or amqps URL. The message never quotes the
            URL: a password with an unencoded ``/ ? # @`` moves the URL's
            boundaries, and any part may then hold a piece of it.
    """
    unclear = ValueError(
        "the AMQP URL does not parse as amqp[s]://user:password@host:port/vhost; "
        "percent-encode / ? # @ : in the user name and password (and @ in the "
        "vhost)"
    )
    split = split_url(url)
    if split is None:
        raise unclear
    parts, port = split
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an AMQP URL (scheme {parts.scheme!r})")
    tls = parts.scheme == "amqps"
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return AmqpParams(
        host=parts.hostname or "localhost",
        port=port or (5671 if tls else 5672),
        user=urllib.parse.unquote(parts.username or "guest"),
        password=urllib.parse.unquote(parts.password or "guest"),
        vhost=urllib.parse.unquote(path) if path else "/",
        tls=tls,
    )


def shortstr(value: str) -> bytes:
    """Encode an AMQP short string (length byte, then UTF-8).

    Raises:
        ValueError: *value* is longer than `SHORTSTR_MAX_BYTES` encoded.
    """
    raw = value.encode()
    if len(raw) > SHORTSTR_MAX_BYTES:
        raise ValueError(
            f"AMQP short string longer than {SHORTSTR_MAX_BYTES} bytes: "
            f"{value[:40]!r}..."
        )
    return bytes((len(raw),)) + raw


def encode_table(headers: Mapping[str, Any]) -> bytes:
    """Encode a field table; str and int values skip pamqp's generic path."""
    parts: list[bytes] = []
    for key, value in headers.items():
        parts.append(shortstr(key))
        kind = type(value)
        if kind is str:
            raw = value.encode()
            parts.append(b"S" + U32.pack(len(raw)) + raw)
        elif kind is int and -(1 << 63) <= value < (1 << 63):
            parts.append(b"l" + _I64.pack(value))
        else:
            parts.append(pencode.encode_table_value(value))
    data = b"".join(parts)
    return U32.pack(len(data)) + data


def decode_table(buf: bytearray, p: int, end: int) -> dict[str, Any]:
    """Decode the field table in ``buf[p:end]``, in time linear in its size.

    Values read as pamqp reads them; the common types are read inline.

    Raises:
        ValueError: more than `MAX_TABLE_VALUES` values, nesting deeper than
            `MAX_TABLE_DEPTH`, an unknown field type, a nested field name
            that is not UTF-8, a value past its table or array, a timestamp
            out of range.
        IndexError, struct.error: the table runs past the buffer.
    """
    if end - p > _UNCOUNTED_BYTES:
        return _Nested(buf).table(p, end, 1)
    out: dict[str, Any] = {}
    nested: _Nested | None = None
    while p < end:
        n = buf[p]
        key = buf[p + 1 : p + 1 + n].decode(errors="replace")
        p += 1 + n
        kind = buf[p]
        if kind == 0x53:  # S: long string (bytes when not UTF-8, as pamqp does)
            n = U32.unpack_from(buf, p + 1)[0]
            raw = bytes(buf[p + 5 : p + 5 + n])
            try:
                out[key] = raw.decode()
            except UnicodeDecodeError:
                out[key] = raw
            p += 5 + n
        elif kind == 0x6C:  # l: signed 64
            out[key] = _I64.unpack_from(buf, p + 1)[0]
            p += 9
        elif kind == 0x49:  # I: signed 32
            out[key] = _I32.unpack_from(buf, p + 1)[0]
            p += 5
        elif kind == 0x73:  # s: signed 16
            out[key] = _I16.unpack_from(buf, p + 1)[0]
            p += 3
        elif kind == 0x62:  # b: signed 8
            out[key] = _I8.unpack_from(buf, p + 1)[0]
            p += 2
        elif kind == 0x74:  # t: boolean
            out[key] = bool(buf[p + 1])
            p += 2
        else:  # nested tables, arrays, timestamps, floats ...: rare
            if nested is None:
                nested = _Nested(buf)
            out[key], p = nested.value(p, end, 1)
    return out


# The values decode_table does not read inline are read here, as pamqp reads
# them but in place and bounded. pamqp copies the rest of the table for every value it
# reads (quadratic: a third of a second for a 128 KiB table of voids),
# recurses without a bound (a RecursionError escapes the protocol callback and
# costs the connection), and lets a value run past the table holding it.

#: Most values read from one header table; a table with more is unreadable.
#: Even read in place, a frame's worth of one-byte values (128 KiB) would hold
#: the event loop for tens of milliseconds.
MAX_TABLE_VALUES: Final = 1024
#: Up to this size (the usual table is a few hundred bytes), the common values
#: at a table's top are read uncounted: at three bytes each, few fit.
_UNCOUNTED_BYTES: Final = 2 * MAX_TABLE_VALUES
#: Deepest nesting of tables and arrays read; RabbitMQ's own x-death is two.
MAX_TABLE_DEPTH: Final = 16

#: Fixed-size values by type byte.
_FIXED: Final[dict[int, struct.Struct]] = {
    0x62: _I8,  # b
    0x42: struct.Struct(">B"),  # B
    0x73: _I16,  # s
    0x75: U16,  # u
    0x49: _I32,  # I
    0x69: U32,  # i
    0x6C: _I64,  # l
    0x4C: _I64,  # L: signed, as pamqp reads it
    0x66: struct.Struct(">f"),  # f
    0x64: struct.Struct(">d"),  # d
}
#: Size of every value with no length in front.
_SIZES: Final[dict[int, int]] = {
    **{kind: layout.size for kind, layout in _FIXED.items()},
    0x56: 0,  # V: void
    0x00: 0,  # void too: undocumented, "seen in the wild" (pamqp reads it)
    0x74: 1,  # t: boolean
    0x54: 8,  # T: timestamp
    0x44: 5,  # D: decimal
}
#: Values with a 32-bit length in front: long string, table, array, byte array.
_SIZED: Final = frozenset(b"SFAx")


@final
class _Nested:
    """Reads one header table's values one by one, counting them to the limit.

    Used for the rarer types, and for every value of a table too big for
    decode_table's inline reading.
    """

    __slots__ = ("buf", "left")

    def __init__(self, buf: bytearray) -> None:
        self.buf = buf
        self.left = MAX_TABLE_VALUES

    def value(self, p: int, end: int, depth: int) -> tuple[Any, int]:
        """The value whose type byte is at *p*, and where the next one starts.

        The value must end by *end*, the end of the table or array holding
        it; *depth* counts the tables and arrays around it.
        """
        self.left -= 1
        if self.left < 0:
            raise ValueError(f"field table of over {MAX_TABLE_VALUES} values")
        buf = self.buf
        kind = buf[p]
        p += 1
        if kind in _SIZED:
            q = p + 4 + U32.unpack_from(buf, p)[0]
        else:
            size = _SIZES.get(kind)
            if size is None:
                raise ValueError(f"unknown field type {bytes((kind,))!r}")
            q = p + size
        if q > end:
            raise ValueError(f"field value {bytes((kind,))!r} runs past its table")
        layout = _FIXED.get(kind)
        if layout is not None:
            return layout.unpack_from(buf, p)[0], q
        if kind == 0x56 or kind == 0x00:  # V, or 0x00 as pamqp reads it: void
            return None, q
        if kind == 0x74:  # t: boolean
            return bool(buf[p]), q
        if kind == 0x54:  # T: timestamp
            return _timestamp(U64.unpack_from(buf, p)[0]), q
        if kind == 0x44:  # D: decimal (scale, signed 32-bit value)
            raw = _I32.unpack_from(buf, p + 1)[0]
            return Decimal(raw) * Decimal(10) ** -buf[p], q
        return self._sized(kind, p + 4, q, depth), q

    def _sized(self, kind: int, p: int, end: int, depth: int) -> Any:
        buf = self.buf
        if kind == 0x53:  # S: long string (bytes when not UTF-8, as pamqp does)
            raw = bytes(buf[p:end])
            try:
                return raw.decode()
            except UnicodeDecodeError:
                return raw
        if kind == 0x78:  # x: byte array
            return bytearray(buf[p:end])
        if depth >= MAX_TABLE_DEPTH:
            raise ValueError(f"field tables nested over {MAX_TABLE_DEPTH} deep")
        if kind == 0x46:  # F: table
            return self.table(p, end, depth + 1)
        array: list[Any] = []  # A: array
        while p < end:
            value, p = self.value(p, end, depth + 1)
            array.append(value)
        return array

    def table(self, p: int, end: int, depth: int) -> dict[str, Any]:
        """The table in ``buf[p:end]``, itself *depth* deep (the headers: 1)."""
        buf = self.buf
        # Strict below the top, as pamqp: a nested name not UTF-8 is unreadable.
        errors = "replace" if depth == 1 else "strict"
        out: dict[str, Any] = {}
        while p < end:
            start = p + 1
            p = start + buf[p]
            if p >= end:
                raise ValueError("field table entry runs past its table")
            key = buf[start:p].decode(errors=errors)
            out[key], p = self.value(p, end, depth)
        return out


def _timestamp(seconds: int) -> datetime.datetime:
    # Past 2106, it is likely milliseconds (pamqp's reading).
    try:
        return datetime.datetime.fromtimestamp(
            seconds / 1000.0 if seconds > 0xFFFFFFFF else seconds, tz=datetime.UTC
        )
    except (OverflowError, OSError) as exc:
        raise ValueError(f"timestamp {seconds} is out of range") from exc


def method_frame(channel: int, method: Frame) -> bytes:
    """Marshal *method* as a method frame on *channel* (through pamqp)."""
    return pframe.marshal(method, channel)
