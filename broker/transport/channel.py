"""`WireChannel`: one channel of the wire client.

A channel runs its synchronous methods (``Channel.Open``, ``Basic.Qos``,
``Basic.Consume``, declarations, ``Channel.Close``) one at a time under a
lock, as AMQP requires. It assembles Basic.Deliver and its content frames
into slotted `Delivery` objects on a deque that `WireChannel.get_batch`
drains (a body declared over the consumer's limit is counted off, not
buffered), and writes Basic.Ack / Basic.Nack by hand. Publishing with confirms
comes from `ConfirmPublisher`; the connection parses the frames and hands
each channel its own.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, final

from pamqp import commands
from pamqp.base import Frame

from broker.errors import TransportUnavailable
from broker.transport import Delivery
from broker.transport.confirm import ConfirmPublisher, wake
from broker.transport.frames import (
    ACK_FRAME,
    BASIC_ACK,
    BASIC_NACK,
    BODY_SIZE_FLAGS,
    TAG_BITS,
    U16,
    U32,
    ClosedByBroker,
    decode_table,
    method_frame,
)

if TYPE_CHECKING:
    from broker.transport.wire import WireConnection

__all__ = ["WireChannel", "CLOSE_TIMEOUT_S"]

#: How long a polite close waits for the broker's CloseOk before giving up.
CLOSE_TIMEOUT_S: Final = 5.0
#: Over any body size (a 64-bit field): no limit.
_NO_LIMIT: Final = 1 << 64


@final
class WireChannel(ConfirmPublisher):
    """One AMQP channel: consume with manual acks, publish with confirms.

    Create with `WireConnection.channel`. Synchronous methods (``qos``,
    ``consume``, declarations) are serialised by a lock, as AMQP requires;
    ``ack`` / ``nack`` only write a frame.
    """

    def __init__(self, conn: WireConnection, channel_id: int) -> None:
        self._conn = conn
        self.id = channel_id
        self._loop = conn._loop
        self._rpc_lock = asyncio.Lock()
        self._rpc_waiter: asyncio.Future[None] | None = None
        self._rpc_reply: Frame | None = None
        self._closing = False
        self._dead = False
        self.closed_reason: str | None = None
        self.close_code: int | None = None
        self._dead_waiter: asyncio.Future[None] = self._loop.create_future()
        self._on_close: Callable[[WireChannel], None] | None = None
        # consuming
        self._deliveries: collections.deque[Delivery] = collections.deque()
        self._delivery_waiter: asyncio.Future[None] | None = None
        self._consumer_tag: str | None = None
        self._consumer_cancelled = False
        self._content: Delivery | None = None  # delivery or return being assembled
        self._content_is_return = False
        self._content_size = 0
        self._content_parts: list[bytes] = []
        self._content_got = 0
        self._max_body = _NO_LIMIT
        self._init_publishing()

    def __repr__(self) -> str:
        state = "dead" if self._dead else "closing" if self._closing else "open"
        return (
            f"<WireChannel {self.id} {state} inflight={self._inflight} "
            f"buffered={len(self._deliveries)}>"
        )

    @property
    def is_closed(self) -> bool:
        """Whether the channel can no longer be used."""
        return self._dead or self._closing

    @property
    def connection(self) -> WireConnection:
        """The connection this channel lives on."""
        return self._conn

    @property
    def buffered(self) -> int:
        """Deliveries received and not yet taken by `get_batch`."""
        return len(self._deliveries)

    @property
    def inflight(self) -> int:
        """Published messages not yet confirmed by the broker."""
        return self._inflight

    def _error(self) -> TransportUnavailable:
        if self._conn._dead and self.close_code is None:
            return self._conn._error()
        if self.close_code is not None and self.close_code != 200:
            text = (self.closed_reason or "").removeprefix(f"{self.close_code} ")
            return ClosedByBroker(f"channel {self.id}", self.close_code, text)
        return TransportUnavailable(
            f"channel {self.id} closed: {self.closed_reason or 'closing'}"
        )

    def _check(self) -> None:
        if self._dead or self._closing:
            raise self._error()

    # -- synchronous methods ----------------------------------------------

    async def rpc(self, method: Frame) -> Frame:
        """Send a synchronous method (e.g. ``Queue.Declare``); return its reply.

        Raises:
            TransportUnavailable: the channel or connection closed first
                (`ClosedByBroker` with the reply code when the broker refused).
        """
        async with self._rpc_lock:
            self._check()
            waiter = self._rpc_waiter = self._loop.create_future()
            self._conn._write(method_frame(self.id, method))
            try:
                await waiter
            except BaseException:
                # Cancelled: the reply will still come and would be taken as
                # the next call's. The channel is out of step; give it up.
                self.close_nowait()
                raise
            finally:
                self._rpc_waiter = None
            reply, self._rpc_reply = self._rpc_reply, None
            if reply is None:
                raise self._error()
            valid = getattr(method, "valid_responses", ())
            if valid and reply.name not in valid:
                raise TransportUnavailable(
                    f"channel {self.id}: {method.name} got {reply.name}"
                )
            return reply

    async def _open(self) -> None:
        try:
            await self.rpc(commands.Channel.Open())
        except TransportUnavailable:
            self.close_nowait()  # keeps the id reserved until the broker agrees
            raise

    async def confirm_select(self, *, window: int = 2048) -> None:
        """Put the channel in publisher-confirm mode with *window* unconfirmed max."""
        self._window = window
        self._slice_min = max(1, window // 4)
        await self.rpc(commands.Confirm.Select())
        self._confirming = True

    async def qos(self, prefetch: int) -> None:
        """Limit unacknowledged deliveries per consumer on this channel."""
        await self.rpc(commands.Basic.Qos(prefetch_count=prefetch))

    def on_close(self, callback: Callable[[WireChannel], None]) -> None:
        """Call *callback* with this channel once it is closed, for any reason."""
        self._on_close = callback

    async def consume(
        self,
        queue: str,
        consumer_tag: str | None = None,
        *,
        exclusive: bool = False,
        max_body_bytes: int | None = None,
    ) -> str:
        """Start consuming *queue* with manual acks; return the consumer tag.

        A message whose content header declares a body over *max_body_bytes*
        is not buffered whole (RabbitMQ allows 128 MiB, times the prefetch):
        its first *max_body_bytes* + 1 bytes are kept, the rest is counted
        off as it arrives, and it is handed over with `Delivery.oversize`
        saying so, for the consumer to dead-letter. None keeps every body.

        Raises:
            ValueError: *max_body_bytes* is below 1.
        """
        if max_body_bytes is not None and max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, not {max_body_bytes}")
        self._max_body = _NO_LIMIT if max_body_bytes is None else max_body_bytes
        reply = await self.rpc(
            commands.Basic.Consume(
                queue=queue, consumer_tag=consumer_tag or "", exclusive=exclusive
            )
        )
        assert isinstance(reply, commands.Basic.ConsumeOk)
        self._consumer_tag = reply.consumer_tag
        self._consumer_cancelled = False
        return str(reply.consumer_tag)

    async def cancel(self, consumer_tag: str) -> None:
        """Stop a consumer; deliveries already sent stay unacknowledged."""
        await self.rpc(commands.Basic.Cancel(consumer_tag=consumer_tag))
        if consumer_tag == self._consumer_tag:
            self._consumer_tag = None

    async def queue_declare(
        self,
        queue: str,
        *,
        durable: bool = True,
        passive: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> tuple[str, int, int]:
        """Declare *queue*; return (name, message count, consumer count)."""
        reply = await self.rpc(
            commands.Queue.Declare(
                queue=queue,
                durable=durable,
                passive=passive,
                arguments=dict(arguments) if arguments else None,
            )
        )
        assert isinstance(reply, commands.Queue.DeclareOk)
        return (
            str(reply.queue),
            int(reply.message_count or 0),
            int(reply.consumer_count or 0),
        )

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the channel; unacknowledged deliveries return to their queues."""
        if self._dead:
            return
        self.close_nowait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._dead_waiter)
        if not self._dead:
            self._die("close not confirmed in time", None)

    def close_nowait(self) -> None:
        """Send Channel.Close without waiting; the channel is unusable at once."""
        if self._closing or self._dead:
            return
        self._closing = True
        if self._conn._dead:
            self._die("connection closed", None)
            return
        self._conn._write(
            method_frame(self.id, commands.Channel.Close(200, "bye", 0, 0))
        )
        # Anything still waiting must see the channel gone now, not at CloseOk.
        self._wake_all()

    # -- consuming -----------------------------------------------------------

    async def get_batch(self, max_n: int) -> list[Delivery]:
        """Wait for at least one delivery; return up to *max_n* in order.

        Raises:
            TransportUnavailable: the channel or connection died (buffered
                deliveries are dropped: their tags are void and the broker
                redelivers them), or the broker cancelled the consumer and
                the buffer is empty.
        """
        dq = self._deliveries
        while not dq:
            if self._dead or self._closing:
                raise self._error()
            if self._consumer_cancelled:
                raise TransportUnavailable(
                    f"channel {self.id}: consumer cancelled by broker (queue deleted?)"
                )
            waiter = self._delivery_waiter = self._loop.create_future()
            await waiter
        if len(dq) <= max_n:
            out = list(dq)
            dq.clear()
            return out
        return [dq.popleft() for _ in range(max_n)]

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        """Acknowledge a delivery (with *multiple*, all up to it). Write only.

        Raises:
            TransportUnavailable: the channel is closed; the tag is void.
        """
        self._check()
        self._conn._write(
            ACK_FRAME.pack(
                1, self.id, 13, BASIC_ACK, delivery_tag, 1 if multiple else 0, 0xCE
            )
        )

    def nack(
        self, delivery_tag: int, multiple: bool = False, requeue: bool = True
    ) -> None:
        """Refuse a delivery (with *multiple*, all up to it). Write only.

        Raises:
            TransportUnavailable: the channel is closed; the tag is void.
        """
        self._check()
        bits = (1 if multiple else 0) | (2 if requeue else 0)
        self._conn._write(
            ACK_FRAME.pack(1, self.id, 13, BASIC_NACK, delivery_tag, bits, 0xCE)
        )

    # -- frames from the connection ----------------------------------------

    def _on_deliver(self, buf: bytearray, p: int) -> None:
        p += 1 + buf[p]  # consumer tag
        tag, redelivered = TAG_BITS.unpack_from(buf, p)
        p += 9
        n = buf[p]
        exchange = buf[p + 1 : p + 1 + n].decode(errors="replace")
        p += 1 + n
        n = buf[p]
        self._content = Delivery(
            tag=tag,
            body=b"",
            exchange=exchange,
            routing_key=buf[p + 1 : p + 1 + n].decode(errors="replace"),
            redelivered=bool(redelivered & 1),
        )
        self._content_is_return = False

    def _on_header(self, buf: bytearray, p: int) -> None:
        d = self._content
        if d is None:
            raise ValueError(f"channel {self.id}: content header without a method")
        size, flags = BODY_SIZE_FLAGS.unpack_from(buf, p + 4)
        p += 14
        word = flags
        while word & 1:  # continuation flag words: none defined for Basic
            word = U16.unpack_from(buf, p)[0]
            p += 2
        if flags & 0x8000:
            n = buf[p]
            d.content_type = buf[p + 1 : p + 1 + n].decode(errors="replace")
            p += 1 + n
        if flags & 0x4000:  # content-encoding
            p += 1 + buf[p]
        if flags & 0x2000:
            n = U32.unpack_from(buf, p)[0]
            try:
                d.headers = decode_table(buf, p + 4, p + 4 + n)
            except (ValueError, IndexError, struct.error) as exc:
                # RabbitMQ passes header tables through unchecked: one a
                # producer got wrong (a nested key not UTF-8, an unknown
                # field type) is this message's fault, not the connection's.
                d.headers = None
                d.unreadable = f"AMQP headers unreadable: {exc}"[:300]
            p += 4 + n
        if flags & 0x1000:  # delivery-mode
            p += 1
        if flags & 0x0800:  # priority
            p += 1
        if flags & 0x0400:
            n = buf[p]
            d.correlation_id = buf[p + 1 : p + 1 + n].decode(errors="replace")
            p += 1 + n
        if flags & 0x0200:  # reply-to
            p += 1 + buf[p]
        if flags & 0x0100:  # expiration
            p += 1 + buf[p]
        if flags & 0x0080:
            n = buf[p]
            d.message_id = buf[p + 1 : p + 1 + n].decode(errors="replace")
            p += 1 + n
        if flags & 0x0040:  # timestamp
            p += 8
        if flags & 0x0020:
            n = buf[p]
            d.type = buf[p + 1 : p + 1 + n].decode(errors="replace")
        self._content_size = size
        self._content_got = 0
        if size > self._max_body:
            limit = self._max_body
            d.oversize = (
                f"body of {size} bytes declared, over the {limit}-byte limit: "
                f"cut to its first {limit + 1} bytes"
            )
        elif size == 0:
            self._content_done(d)

    def _on_body(self, buf: bytearray, start: int, end: int) -> None:
        d = self._content
        if d is None:
            raise ValueError(f"channel {self.id}: content body without a header")
        if d.oversize is not None:
            self._count_off(d, buf, start, end)
            return
        chunk = bytes(buf[start:end])
        got = self._content_got + len(chunk)
        if got == self._content_size and not self._content_parts:
            d.body = chunk
        else:
            self._content_parts.append(chunk)
            if got < self._content_size:
                self._content_got = got
                return
            d.body = b"".join(self._content_parts)
            self._content_parts = []
        self._content_done(d)

    def _count_off(self, d: Delivery, buf: bytearray, start: int, end: int) -> None:
        # Keep one byte past the limit: what is kept is over the limit itself,
        # so a decoder (or a dead letter's replay) never takes it for a whole
        # message that happens to parse.
        got = self._content_got
        room = self._max_body + 1 - got
        if room > 0:
            self._content_parts.append(bytes(buf[start : min(end, start + room)]))
        got += end - start
        if got < self._content_size:
            self._content_got = got
            return
        d.body = b"".join(self._content_parts)
        self._content_parts = []
        self._content_done(d)

    def _content_done(self, d: Delivery) -> None:
        self._content = None
        if self._content_is_return:
            self._on_return(d.message_id)
        elif not (self._dead or self._closing):
            self._deliveries.append(d)
            waiter = self._delivery_waiter
            if waiter is not None:
                self._delivery_waiter = None
                wake(waiter)

    def _on_method(self, method: Frame) -> None:
        if isinstance(method, commands.Basic.Return):
            self._content = Delivery(tag=0, body=b"")
            self._content_is_return = True
        elif isinstance(method, commands.Channel.Close):
            self._conn._write(method_frame(self.id, commands.Channel.CloseOk()))
            code = int(method.reply_code or 0)
            self._die(f"{code} {method.reply_text}", code)
        elif isinstance(method, commands.Channel.CloseOk):
            self._die("closed by client", 200)
        elif isinstance(method, commands.Basic.Cancel):  # consumer cancel notify
            self._consumer_cancelled = True
            if not method.nowait:
                self._conn._write(
                    method_frame(self.id, commands.Basic.CancelOk(method.consumer_tag))
                )
            wake(self._delivery_waiter)
        elif isinstance(method, commands.Channel.Flow):
            self._conn._write(
                method_frame(self.id, commands.Channel.FlowOk(method.active))
            )
        elif self._rpc_waiter is not None and not self._rpc_waiter.done():
            self._rpc_reply = method
            wake(self._rpc_waiter)

    def _wake_all(self) -> None:
        wake(self._rpc_waiter)
        wake(self._delivery_waiter)
        self._wake_writers()
        for batch in self._batches:
            wake(batch.waiter)

    def _die(self, reason: str, code: int | None) -> None:
        if self._dead:
            return
        self._dead = True
        self.closed_reason = reason
        self.close_code = code
        if self._conn._channels.get(self.id) is self:
            del self._conn._channels[self.id]
        self._deliveries.clear()
        self._runs.clear()
        self._inflight = 0
        self._wake_all()
        wake(self._dead_waiter)
        if self._on_close is not None:
            self._on_close(self)
