"""Deliveries assembled from raw frames: bodies over the limit, unreadable headers.

A connection whose broker is the test (no socket): frames are fed to it as
RabbitMQ would send them, including ones no well-behaved producer writes.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from pamqp import body as pbody
from pamqp import commands
from pamqp import frame as pframe
from pamqp import header as pheader

from broker.codec import decode_envelope
from broker.errors import MessageTooLarge
from broker.transport.channel import WireChannel
from broker.transport.wire import WireConnection

pytestmark = pytest.mark.anyio

#: The most body bytes one frame carries at the client's frame_max.
FRAME_BODY = 131_072 - 8


class _Sink:
    """Stands in for the socket: drops what the client writes."""

    def write(self, data: bytes) -> None:
        pass

    def writelines(self, parts: list[bytes]) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def consuming(max_body_bytes: int | None) -> tuple[WireConnection, WireChannel]:
    """A channel consuming with *max_body_bytes* on a connection fed by the test."""
    conn = WireConnection(name="fake", heartbeat_s=0)
    conn.connection_made(_Sink())  # type: ignore[arg-type]
    holder: list[WireChannel] = []

    async def open_channel() -> None:
        ch = await conn.channel()
        await ch.consume("q", max_body_bytes=max_body_bytes)
        holder.append(ch)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(open_channel)
            await anyio.wait_all_tasks_blocked()
            conn.data_received(pframe.marshal(commands.Channel.OpenOk(), 1))
            await anyio.wait_all_tasks_blocked()
            conn.data_received(pframe.marshal(commands.Basic.ConsumeOk("ctag"), 1))
    return conn, holder[0]


def deliver(tag: int, size: int, **props: Any) -> bytes:
    """Basic.Deliver and a content header declaring a body of *size* bytes."""
    return pframe.marshal(
        commands.Basic.Deliver("ctag", tag, False, "ex", "rk"), 1
    ) + pframe.marshal(
        pheader.ContentHeader(0, size, commands.Basic.Properties(**props)), 1
    )


def body_frame(chunk: bytes) -> bytes:
    return pframe.marshal(pbody.ContentBody(chunk), 1)


def message(tag: int, body: bytes, **props: Any) -> bytes:
    """A whole delivery of *body*, in frames of at most `FRAME_BODY` bytes."""
    frames = [
        body_frame(body[i : i + FRAME_BODY]) for i in range(0, len(body), FRAME_BODY)
    ]
    return deliver(tag, len(body), **props) + b"".join(frames)


async def test_a_body_declared_over_the_limit_is_counted_off_not_buffered() -> None:
    """16 MiB declared, 4 KiB allowed: the first 4 KiB + 1 kept, flagged, bounded.

    RabbitMQ lets a message be 128 MiB, and prefetch lets a thousand be in
    flight: assembled whole before the size was checked, a few took
    gigabytes. The memory used while the body streams by stays near one
    frame, and the framing stays in step for the message after it.
    """
    conn, ch = await consuming(max_body_bytes=4096)
    frames = 128
    chunk = bytes(range(256)) * (FRAME_BODY // 256) + b"\x00" * (FRAME_BODY % 256)
    frame = body_frame(chunk)

    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        before, _ = tracemalloc.get_traced_memory()
        conn.data_received(deliver(1, frames * FRAME_BODY, message_id="big"))
        for _ in range(frames):
            conn.data_received(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not tracing:
            tracemalloc.stop()
    conn.data_received(message(2, b'{"small": true}', message_id="small"))

    big, small = await ch.get_batch(5)
    assert peak - before < 4 * FRAME_BODY  # while 16 MiB went by
    assert (big.message_id, big.body) == ("big", chunk[:4097])
    assert big.oversize is not None
    assert f"body of {frames * FRAME_BODY} bytes declared" in big.oversize
    assert "over the 4096-byte limit: cut to its first 4097 bytes" in big.oversize
    assert "cut" in repr(big)
    assert (small.message_id, small.body, small.oversize) == (
        "small",
        b'{"small": true}',
        None,
    )
    assert not conn.is_closed


async def test_a_body_over_the_limit_in_one_frame_is_cut_too() -> None:
    """A body that fits one frame but not the limit keeps its first limit + 1 bytes."""
    conn, ch = await consuming(max_body_bytes=100)
    body = bytes(range(256)) * 4
    conn.data_received(message(1, body))
    (d,) = await ch.get_batch(5)
    assert d.body == body[:101]
    assert d.oversize is not None
    assert "body of 1024 bytes declared, over the 100-byte limit" in d.oversize


@pytest.mark.parametrize("limit", [1000, None])
async def test_a_body_up_to_the_limit_arrives_whole(limit: int | None) -> None:
    """At the limit exactly, or with no limit, a body spanning frames is whole."""
    conn, ch = await consuming(max_body_bytes=limit)
    small = b"s" * 1000
    big = bytes(range(256)) * 1100  # three frames
    conn.data_received(message(1, small) + (message(2, big) if limit is None else b""))
    got = await ch.get_batch(5)
    assert [(d.body, d.oversize) for d in got] == [(small, None)] + (
        [(big, None)] if limit is None else []
    )


async def test_a_limit_below_one_byte_is_refused() -> None:
    """max_body_bytes=0 is a mistake, not "cut everything"."""
    conn = WireConnection(name="fake", heartbeat_s=0)
    with pytest.raises(ValueError, match="at least 1"):
        await WireChannel(conn, 1).consume("q", max_body_bytes=0)


def raw_header(size: int, table: bytes, message_id: str) -> bytes:
    """A content header frame written by hand: headers *table*, a message id."""
    flags = 0x2000 | 0x0080
    payload = (
        struct.pack(">HHQH", 60, 0, size, flags)
        + struct.pack(">I", len(table))
        + table
        + bytes([len(message_id)])
        + message_id.encode()
    )
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def nested(depth: int) -> bytes:
    """A field table with tables nested *depth* deep inside it."""
    table = b""
    for _ in range(depth):
        table = b"\x01kF" + struct.pack(">I", len(table)) + table
    return table


@pytest.mark.parametrize(
    ("table", "reason"),
    [
        (nested(600), "nested over"),
        (nested(16), "nested over 16 deep"),
        (b"\x00V" * 60_000, "over 1024 values"),
        (b"\x01aA" + struct.pack(">I", 2000) + b"V" * 2000, "over 1024 values"),
        (b"\x01aF" + struct.pack(">I", 99) + b"\x01bt\x01", "runs past its table"),
    ],
    ids=["deep", "just-too-deep", "many-entries", "many-values", "past-its-table"],
)
async def test_a_hostile_header_table_costs_the_message_not_the_link(
    table: bytes, reason: str
) -> None:
    """Deep, huge or overlong tables flag their message; the connection lives.

    Nesting 600 deep raised RecursionError out of the protocol callback (the
    connection died, at every redelivery); a frame of one-byte entries held
    the event loop for a third of a second, copying the rest of the table
    for every entry.
    """
    conn, ch = await consuming(max_body_bytes=None)
    conn.data_received(
        pframe.marshal(commands.Basic.Deliver("ctag", 1, False, "", "q"), 1)
        + raw_header(2, table, "bad-1")
        + body_frame(b"{}")
        + message(2, b"{}", message_id="good", headers={"k": "v"})
    )
    bad, good = await ch.get_batch(5)
    assert (bad.message_id, bad.body, bad.headers) == ("bad-1", b"{}", None)
    assert bad.unreadable is not None
    assert reason in bad.unreadable
    assert (good.message_id, good.headers, good.unreadable) == (
        "good",
        {"k": "v"},
        None,
    )
    assert not conn.is_closed


async def test_tables_nested_16_deep_are_read() -> None:
    """Nesting is refused only past 16 levels, the top one included.

    RabbitMQ's own ``x-death`` is two deep (an array of tables).
    """
    conn, ch = await consuming(max_body_bytes=None)
    conn.data_received(
        pframe.marshal(commands.Basic.Deliver("ctag", 1, False, "", "q"), 1)
        + raw_header(0, nested(15), "deep-enough")
    )
    (d,) = await ch.get_batch(5)
    headers: Mapping[str, Any] | None = d.headers
    for _ in range(15):
        assert headers is not None
        headers = headers["k"]
    assert headers == {}
    assert d.unreadable is None


async def test_what_is_kept_of_a_cut_body_is_refused_as_oversize() -> None:
    """Kept to one byte past the limit, a cut body is oversize to the codec too.

    A consumer that decodes it without looking at `Delivery.oversize` (or a
    replay of its dead letter) gets ``oversize``, never a prefix that parses.
    """
    conn, ch = await consuming(max_body_bytes=64)
    envelope = b'{"id": "e-1"}' + b" " * 200  # JSON, padded past the limit
    conn.data_received(message(1, envelope))
    (d,) = await ch.get_batch(5)
    with pytest.raises(MessageTooLarge, match="65 bytes is over the 64-byte limit"):
        decode_envelope(d.body, max_bytes=64)
    assert MessageTooLarge.reason == "oversize"
