"""A minimal AMQP 0-9-1 client on `asyncio.Protocol`, built for the hot path.

Why not aio-pika: on a 2-core host its per-message futures, callbacks and
wrapper objects cost hundreds of µs a message, of which pamqp's frame work
is a small part. Here a delivery is one slotted `Delivery` appended to a
deque, and a published batch shares *one* future however many messages it
holds. ``bench/wire_micro.py`` measures the difference: about 10 µs of
client CPU per consumed-and-republished message against about 210.

pamqp marshals the handshake and the rare methods; hand-written `struct`
code handles the frames that come once per message: Basic.Deliver with its
content header and body, Basic.Publish with its content, and Basic.Ack /
Basic.Nack in both directions.

Invariants worth knowing before changing anything:

* Futures here are wake-ups only: they always get ``None`` as their result
  and the woken code re-reads the state.  No future ever carries an
  exception, so none can be "never retrieved".
* A channel id is freed once the broker confirmed its close (or the close
  timed out, or the connection died); ids are handed out round-robin so
  late frames for an old channel are unlikely to meet a new one.
* Publisher-confirm sequence numbers are tracked as *runs*: one run per
  contiguous slice of a batch written in a single `writelines` call.
  Confirms settle runs from the front; a run outlives a timed-out batch so
  a late ``multiple`` confirm still lands somewhere harmless.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import platform
import ssl
import struct
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any, Final, cast, final

import structlog
from pamqp import commands
from pamqp import decode as pdecode
from pamqp import encode as pencode
from pamqp import frame as pframe
from pamqp.base import Frame
from pamqp.exceptions import UnmarshalingException

from broker.errors import TransportUnavailable
from broker.transport import Delivery, OutgoingMessage, PublishOutcome

__all__ = ["ClosedByBroker", "AmqpParams", "parse_url", "WireConnection", "WireChannel"]

_log = structlog.get_logger(__name__)

_PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
_HEARTBEAT: Final = b"\x08\x00\x00\x00\x00\x00\x00\xce"
_END: Final = b"\xce"
_CLIENT_FRAME_MAX: Final = 131_072
_CLOSE_TIMEOUT_S: Final = 5.0
#: A slice of a published batch stops growing past this many bytes, so the
#: socket's write buffer stays bounded however large the messages are.
_SLICE_BYTES: Final = 1 << 20

# Method ids as one big-endian 32-bit number: class << 16 | method.
_M_DELIVER: Final = 0x003C003C
_M_ACK: Final = 0x003C0050
_M_NACK: Final = 0x003C0078

_FRAME_HDR = struct.Struct(">BHI")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_U64 = struct.Struct(">Q")
_TAG_BITS = struct.Struct(">QB")
_CONTENT = struct.Struct(">QH")  # body size, first property-flags word
# type, channel, size, method, delivery tag, bits, frame end
_ACK_FRAME = struct.Struct(">BHIIQBB")
# type, channel, size, class, weight, body size, property flags
_HEADER_FRAME = struct.Struct(">BHIHHQH")

_ACK: Final = PublishOutcome.ACK
_NACK: Final = PublishOutcome.NACK
_RETURNED: Final = PublishOutcome.RETURNED
_INDETERMINATE: Final = PublishOutcome.INDETERMINATE


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
        ValueError: not an amqp or amqps URL (the message omits the password).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an AMQP URL (scheme {parts.scheme!r})")
    tls = parts.scheme == "amqps"
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return AmqpParams(
        host=parts.hostname or "localhost",
        port=parts.port or (5671 if tls else 5672),
        user=urllib.parse.unquote(parts.username or "guest"),
        password=urllib.parse.unquote(parts.password or "guest"),
        vhost=urllib.parse.unquote(path) if path else "/",
        tls=tls,
    )


def _shortstr(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {value[:40]!r}...")
    return bytes((len(raw),)) + raw


def _table(headers: Mapping[str, Any]) -> bytes:
    """Encode a field table; str and int values skip pamqp's generic path."""
    parts: list[bytes] = []
    for key, value in headers.items():
        parts.append(_shortstr(key))
        kind = type(value)
        if kind is str:
            raw = value.encode()
            parts.append(b"S" + _U32.pack(len(raw)) + raw)
        elif kind is int and -(1 << 63) <= value < (1 << 63):
            parts.append(b"l" + _I64.pack(value))
        else:
            parts.append(pencode.encode_table_value(value))
    data = b"".join(parts)
    return _U32.pack(len(data)) + data


def _read_table(buf: bytearray, p: int, end: int) -> dict[str, Any]:
    """Decode a field table; common value types skip pamqp's generic path."""
    out: dict[str, Any] = {}
    while p < end:
        n = buf[p]
        key = buf[p + 1 : p + 1 + n].decode()
        p += 1 + n
        kind = buf[p]
        if kind == 0x53:  # S: long string (bytes when not UTF-8, as pamqp does)
            n = _U32.unpack_from(buf, p + 1)[0]
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
            used, out[key] = pdecode.embedded_value(bytes(buf[p:end]))
            p += used
    return out


def _method_frame(channel: int, method: Frame) -> bytes:
    return pframe.marshal(method, channel)


class _Run:
    """Sequence numbers ``first .. first+count-1`` are ``batch.messages[start:]``."""

    __slots__ = ("batch", "count", "first", "start")

    def __init__(self, first: int, batch: _Batch, start: int, count: int) -> None:
        self.first = first
        self.batch = batch
        self.start = start
        self.count = count


class _Batch:
    """One `publish_batch` call: outcomes by index and one wake-up future."""

    __slots__ = ("messages", "outcomes", "returned", "unsettled", "waiter", "written")

    def __init__(self, messages: Sequence[OutgoingMessage]) -> None:
        self.messages = messages
        self.outcomes: list[PublishOutcome | None] = [None] * len(messages)
        self.returned: set[int] = set()
        self.unsettled = 0  # written and not yet confirmed
        self.written = 0
        self.waiter: asyncio.Future[None] | None = None


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


@final
class WireChannel:
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
        # publishing
        self._confirming = False
        self._next_seq = 1
        self._window = 2048
        self._slice_min = 512
        self._inflight = 0
        self._runs: collections.deque[_Run] = collections.deque()
        self._batches: set[_Batch] = set()
        # One future per waiting publisher: a shared one would be cancelled
        # for all of them when one caller's deadline cancels its await.
        self._writable_waiters: list[asyncio.Future[None]] = []
        self._writable_need = 0
        self._method_cache: dict[tuple[str, str], bytes] = {}
        self._shortstr_cache: dict[str, bytes] = {}

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
            self._conn._write(_method_frame(self.id, method))
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

    async def consume(
        self, queue: str, consumer_tag: str | None = None, *, exclusive: bool = False
    ) -> str:
        """Start consuming *queue* with manual acks; return the consumer tag."""
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

    async def close(self, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
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
            _method_frame(self.id, commands.Channel.Close(200, "bye", 0, 0))
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
            _ACK_FRAME.pack(
                1, self.id, 13, _M_ACK, delivery_tag, 1 if multiple else 0, 0xCE
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
            _ACK_FRAME.pack(1, self.id, 13, _M_NACK, delivery_tag, bits, 0xCE)
        )

    # -- publishing ----------------------------------------------------------

    async def publish_batch(
        self, messages: Sequence[OutgoingMessage], timeout_s: float
    ) -> list[PublishOutcome]:
        """Publish *messages* persistent and mandatory; one outcome each, in order.

        Never raises for a message's fate: a nack is NACK, a return RETURNED,
        and whatever is unconfirmed at *timeout_s* or when the channel dies
        is INDETERMINATE.

        Raises:
            RuntimeError: `confirm_select` was not called.
            ValueError: a name or id is longer than AMQP allows (a bug).
        """
        if not messages:
            return []
        if not self._confirming:
            raise RuntimeError("publish_batch needs confirm_select() first")
        batch = _Batch(messages)
        total = len(messages)
        self._batches.add(batch)
        try:
            with contextlib.suppress(TimeoutError):  # our own deadline only
                async with asyncio.timeout(timeout_s):
                    await self._publish(batch, total)
        finally:
            self._batches.discard(batch)
        return [_INDETERMINATE if o is None else o for o in batch.outcomes]

    async def _publish(self, batch: _Batch, total: int) -> None:
        conn = self._conn
        while batch.written < total:
            if self._dead or self._closing:
                return
            need = min(total - batch.written, self._slice_min)
            if conn._blocked or conn._paused or self._window - self._inflight < need:
                waiter = self._loop.create_future()
                self._writable_waiters.append(waiter)
                if not self._writable_need or need < self._writable_need:
                    self._writable_need = need
                try:
                    await waiter
                finally:
                    if waiter.cancelled():  # our deadline: don't pile up
                        self._writable_waiters.remove(waiter)
                continue
            self._write_slice(batch, total)
        if batch.unsettled and not (self._dead or self._closing):
            waiter = batch.waiter = self._loop.create_future()
            await waiter

    def _write_slice(self, batch: _Batch, total: int) -> None:
        start = batch.written
        stop = min(total, start + self._window - self._inflight)
        cid = self.id
        max_body = self._conn.frame_max - 8
        ts = _U64.pack(int(time.time()))
        cache = self._method_cache
        sscache = self._shortstr_cache
        parts: list[bytes] = []
        append = parts.append
        size = 0
        i = start
        messages = batch.messages
        while i < stop and size < _SLICE_BYTES:
            m = messages[i]
            i += 1
            key = (m.exchange, m.routing_key)
            method = cache.get(key)
            if method is None:
                if len(cache) > 1024:
                    cache.clear()
                payload = (
                    b"\x00\x3c\x00\x28\x00\x00"
                    + _shortstr(m.exchange)
                    + _shortstr(m.routing_key)
                    + b"\x01"  # mandatory
                )
                method = cache[key] = (
                    _FRAME_HDR.pack(1, cid, len(payload)) + payload + _END
                )
            append(method)
            # Properties, in the order the spec lists them.
            flags = 0x1000 | 0x0080 | 0x0040  # delivery-mode, message-id, timestamp
            props: list[bytes] = []
            ct = m.content_type
            if ct:
                flags |= 0x8000
                enc = sscache.get(ct)
                if enc is None:
                    if len(sscache) > 256:
                        sscache.clear()
                    enc = sscache[ct] = _shortstr(ct)
                props.append(enc)
            if m.headers:
                flags |= 0x2000
                props.append(_table(m.headers))
            props.append(b"\x02")  # persistent
            if m.correlation_id is not None:
                flags |= 0x0400
                props.append(_shortstr(m.correlation_id))
            props.append(_shortstr(m.message_id))
            props.append(ts)
            if m.type is not None:
                flags |= 0x0020
                props.append(_shortstr(m.type))
            prop_bytes = b"".join(props)
            body = m.body
            blen = len(body)
            append(
                _HEADER_FRAME.pack(2, cid, 14 + len(prop_bytes), 60, 0, blen, flags)
                + prop_bytes
                + _END
            )
            if blen <= max_body:
                if blen:
                    append(_FRAME_HDR.pack(3, cid, blen))
                    append(body)
                    append(_END)
            else:
                view = memoryview(body)
                for off in range(0, blen, max_body):
                    chunk = view[off : off + max_body]
                    append(_FRAME_HDR.pack(3, cid, len(chunk)))
                    append(bytes(chunk))
                    append(_END)
            size += blen + 64
        count = i - start
        self._runs.append(_Run(self._next_seq, batch, start, count))
        self._next_seq += count
        self._inflight += count
        batch.written = i
        batch.unsettled += count
        self._conn._writelines(parts)

    def _settle(
        self, batch: _Batch, start: int, count: int, outcome: PublishOutcome
    ) -> None:
        outcomes = batch.outcomes
        returned = batch.returned
        settled = 0
        for i in range(start, start + count):
            if outcomes[i] is None:
                outcomes[i] = _RETURNED if returned and i in returned else outcome
                settled += 1
        if settled:
            batch.unsettled -= settled
            self._inflight -= settled
            if batch.unsettled == 0 and batch.written == len(outcomes):
                _wake(batch.waiter)

    def _on_confirm(self, tag: int, multiple: bool, outcome: PublishOutcome) -> None:
        runs = self._runs
        if multiple:
            while runs:
                run = runs[0]
                if run.first > tag:
                    break
                n = min(run.count, tag - run.first + 1)
                self._settle(run.batch, run.start, n, outcome)
                if n == run.count:
                    runs.popleft()
                else:
                    run.first += n
                    run.start += n
                    run.count -= n
        else:
            for index, run in enumerate(runs):
                if tag < run.first:
                    break
                if tag < run.first + run.count:
                    self._settle(run.batch, run.start + tag - run.first, 1, outcome)
                    if index == 0:
                        self._trim_front()
                    # Settled ones further in stay until they reach the front;
                    # _settle skips them if a multiple confirm covers them.
                    break
        if (
            self._writable_waiters
            and self._window - self._inflight >= self._writable_need
        ):
            self._wake_writers()

    def _trim_front(self) -> None:
        runs = self._runs
        while runs:
            run = runs[0]
            outcomes = run.batch.outcomes
            while run.count and outcomes[run.start] is not None:
                run.first += 1
                run.start += 1
                run.count -= 1
            if run.count:
                return
            runs.popleft()

    def _wake_writers(self) -> None:
        waiters, self._writable_waiters = self._writable_waiters, []
        self._writable_need = 0
        for waiter in waiters:
            _wake(waiter)

    def _on_return(self, message_id: str | None) -> None:
        # Returns are rare (a routing bug): a linear scan is fine.
        for run in self._runs:
            batch = run.batch
            outcomes = batch.outcomes
            for i in range(run.start, run.start + run.count):
                if (
                    outcomes[i] is None
                    and i not in batch.returned
                    and batch.messages[i].message_id == message_id
                ):
                    batch.returned.add(i)
                    return

    # -- frames from the connection ----------------------------------------

    def _on_deliver(self, buf: bytearray, p: int) -> None:
        p += 1 + buf[p]  # consumer tag
        tag, redelivered = _TAG_BITS.unpack_from(buf, p)
        p += 9
        n = buf[p]
        exchange = buf[p + 1 : p + 1 + n].decode()
        p += 1 + n
        n = buf[p]
        self._content = Delivery(
            tag=tag,
            body=b"",
            exchange=exchange,
            routing_key=buf[p + 1 : p + 1 + n].decode(),
            redelivered=bool(redelivered & 1),
        )
        self._content_is_return = False

    def _on_header(self, buf: bytearray, p: int) -> None:
        d = self._content
        if d is None:
            raise ValueError(f"channel {self.id}: content header without a method")
        size, flags = _CONTENT.unpack_from(buf, p + 4)
        p += 14
        word = flags
        while word & 1:  # continuation flag words: none defined for Basic
            word = _U16.unpack_from(buf, p)[0]
            p += 2
        if flags & 0x8000:
            n = buf[p]
            d.content_type = buf[p + 1 : p + 1 + n].decode()
            p += 1 + n
        if flags & 0x4000:  # content-encoding
            p += 1 + buf[p]
        if flags & 0x2000:
            n = _U32.unpack_from(buf, p)[0]
            d.headers = _read_table(buf, p + 4, p + 4 + n)
            p += 4 + n
        if flags & 0x1000:  # delivery-mode
            p += 1
        if flags & 0x0800:  # priority
            p += 1
        if flags & 0x0400:
            n = buf[p]
            d.correlation_id = buf[p + 1 : p + 1 + n].decode()
            p += 1 + n
        if flags & 0x0200:  # reply-to
            p += 1 + buf[p]
        if flags & 0x0100:  # expiration
            p += 1 + buf[p]
        if flags & 0x0080:
            n = buf[p]
            d.message_id = buf[p + 1 : p + 1 + n].decode()
            p += 1 + n
        if flags & 0x0040:  # timestamp
            p += 8
        if flags & 0x0020:
            n = buf[p]
            d.type = buf[p + 1 : p + 1 + n].decode()
        self._content_size = size
        self._content_got = 0
        if size == 0:
            self._content_done(d)

    def _on_body(self, buf: bytearray, start: int, end: int) -> None:
        d = self._content
        if d is None:
            raise ValueError(f"channel {self.id}: content body without a header")
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

    def _content_done(self, d: Delivery) -> None:
        self._content = None
        if self._content_is_return:
            self._on_return(d.message_id)
        elif not (self._dead or self._closing):
            self._deliveries.append(d)
            waiter = self._delivery_waiter
            if waiter is not None:
                self._delivery_waiter = None
                _wake(waiter)

    def _on_method(self, method: Frame) -> None:
        if isinstance(method, commands.Basic.Return):
            self._content = Delivery(tag=0, body=b"")
            self._content_is_return = True
        elif isinstance(method, commands.Channel.Close):
            self._conn._write(_method_frame(self.id, commands.Channel.CloseOk()))
            code = int(method.reply_code or 0)
            self._die(f"{code} {method.reply_text}", code)
        elif isinstance(method, commands.Channel.CloseOk):
            self._die("closed by client", 200)
        elif isinstance(method, commands.Basic.Cancel):  # consumer cancel notify
            self._consumer_cancelled = True
            if not method.nowait:
                self._conn._write(
                    _method_frame(self.id, commands.Basic.CancelOk(method.consumer_tag))
                )
            _wake(self._delivery_waiter)
        elif isinstance(method, commands.Channel.Flow):
            self._conn._write(
                _method_frame(self.id, commands.Channel.FlowOk(method.active))
            )
        elif self._rpc_waiter is not None and not self._rpc_waiter.done():
            self._rpc_reply = method
            _wake(self._rpc_waiter)

    def _wake_all(self) -> None:
        _wake(self._rpc_waiter)
        _wake(self._delivery_waiter)
        self._wake_writers()
        for batch in self._batches:
            _wake(batch.waiter)

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
        _wake(self._dead_waiter)


class WireConnection(asyncio.Protocol):
    """One AMQP connection. Open with `WireConnection.open`.

    Tracks Connection.Blocked (publishing waits while blocked), sends
    heartbeats when idle and declares the broker dead after twice the
    heartbeat without a frame.
    """

    def __init__(self, *, name: str, heartbeat_s: int) -> None:
        self.name = name
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._channels: dict[int, WireChannel] = {}
        self._next_channel = 1
        self.channel_max = 2047
        self.frame_max = _CLIENT_FRAME_MAX
        self.heartbeat_s = heartbeat_s
        self.server_properties: dict[str, Any] = {}
        self._ch0_waiter: asyncio.Future[None] | None = None
        self._ch0_reply: Frame | None = None
        self._open = False
        self._closing = False
        self._dead = False
        self.closed_reason: str | None = None
        self.close_code: int | None = None
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._blocked = False
        self.blocked_reason: str | None = None
        self._paused = False
        self._heard = True
        self._wrote = False
        self._missed = 0
        self._heartbeat_handle: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return (
            f"<WireConnection {self.name!r} {self.state} "
            f"channels={len(self._channels)} frame_max={self.frame_max} "
            f"heartbeat={self.heartbeat_s}s>"
        )

    @property
    def state(self) -> str:
        """One of opening, open, blocked, closing, closed."""
        if self._dead:
            return "closed"
        if self._closing:
            return "closing"
        if self._blocked:
            return "blocked"
        return "open" if self._open else "opening"

    @classmethod
    async def open(
        cls, url: str, *, name: str, heartbeat_s: int, connect_timeout_s: float
    ) -> WireConnection:
        """Connect, authenticate (PLAIN) and open the URL's vhost.

        Raises:
            TransportUnavailable: refused, timed out, or the broker closed the
                connection during the handshake (e.g. 403 ACCESS_REFUSED);
                the cause is chained.
            ValueError: *url* is not an AMQP URL.
        """
        params = parse_url(url)
        loop = asyncio.get_running_loop()
        where = f"{params.host}:{params.port} vhost {params.vhost!r} as {params.user!r}"
        try:
            async with asyncio.timeout(connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: cls(name=name, heartbeat_s=heartbeat_s),
                    params.host,
                    params.port,
                    ssl=ssl.create_default_context() if params.tls else None,
                )
                try:
                    await conn._handshake(params)
                except BaseException:
                    conn._die("handshake failed", None, abort=True)
                    raise
        except TimeoutError as exc:
            raise TransportUnavailable(
                f"AMQP connect to {where} timed out after {connect_timeout_s}s"
            ) from exc
        except OSError as exc:
            raise TransportUnavailable(
                f"AMQP connect to {where} failed: {exc}"
            ) from exc
        return conn

    async def _expect(self, kind: type[Frame]) -> Frame:
        waiter = self._ch0_waiter = self._loop.create_future()
        await waiter
        reply, self._ch0_reply = self._ch0_reply, None
        if reply is None:
            raise self._error()
        if not isinstance(reply, kind):
            raise TransportUnavailable(
                f"AMQP handshake: expected {kind.name}, got {reply.name}"
            )
        return reply

    async def _handshake(self, params: AmqpParams) -> None:
        self._write(_PROTOCOL_HEADER)
        start = await self._expect(commands.Connection.Start)
        assert isinstance(start, commands.Connection.Start)
        self.server_properties = dict(start.server_properties or {})
        if "PLAIN" not in str(start.mechanisms).split():
            raise TransportUnavailable(
                f"broker offers no PLAIN auth: {start.mechanisms}"
            )
        self._send0(
            commands.Connection.StartOk(
                client_properties={
                    "product": "q2c-broker",
                    "connection_name": self.name,
                    "platform": f"Python {platform.python_version()}",
                    "capabilities": {
                        "publisher_confirms": True,
                        "consumer_cancel_notify": True,
                        "connection.blocked": True,
                        "basic.nack": True,
                        "authentication_failure_close": True,
                        "per_consumer_qos": True,
                    },
                },
                mechanism="PLAIN",
                response=f"\0{params.user}\0{params.password}",
            )
        )
        tune = await self._expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        server_hb = int(tune.heartbeat or 0)
        if self.heartbeat_s and server_hb:
            self.heartbeat_s = min(self.heartbeat_s, server_hb)
        server_fm = int(tune.frame_max or 0)
        self.frame_max = (
            min(server_fm, _CLIENT_FRAME_MAX) if server_fm else _CLIENT_FRAME_MAX
        )
        self.channel_max = int(tune.channel_max or 0) or 2047
        self._send0(
            commands.Connection.TuneOk(
                channel_max=self.channel_max,
                frame_max=self.frame_max,
                heartbeat=self.heartbeat_s,
            )
        )
        self._send0(commands.Connection.Open(virtual_host=params.vhost))
        await self._expect(commands.Connection.OpenOk)
        self._open = True
        if self.heartbeat_s:
            self._heartbeat_handle = self._loop.call_later(
                self.heartbeat_s / 2, self._tick
            )

    # -- public --------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        """Whether the connection is dead (or closing)."""
        return self._dead or self._closing

    @property
    def is_blocked(self) -> bool:
        """Whether the broker blocked publishing (memory or disk alarm)."""
        return self._blocked

    async def channel(self) -> WireChannel:
        """Open a new channel.

        Raises:
            TransportUnavailable: the connection is closed, or out of ids.
        """
        if self._dead or self._closing:
            raise self._error()
        for _ in range(self.channel_max):
            cid = self._next_channel
            self._next_channel = cid % self.channel_max + 1
            if cid not in self._channels:
                break
        else:
            raise TransportUnavailable(
                f"{self.name}: all {self.channel_max} channels in use"
            )
        ch = self._channels[cid] = WireChannel(self, cid)
        await ch._open()
        return ch

    async def close(self, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
        """Close politely (Close, then wait for CloseOk); abort after *timeout_s*."""
        if self._dead:
            return
        if not self._closing:
            self._closing = True
            self._send0(commands.Connection.Close(200, "client closed", 0, 0))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._closed)
        if not self._dead:
            self._die("closed by client (no CloseOk)", 200, abort=True)

    async def wait_closed(self) -> None:
        """Return once the connection is dead; see `closed_reason`."""
        await asyncio.shield(self._closed)

    def _error(self) -> TransportUnavailable:
        if self.close_code is not None and self.close_code != 200:
            text = (self.closed_reason or "").removeprefix(f"{self.close_code} ")
            return ClosedByBroker(f"connection {self.name!r}", self.close_code, text)
        return TransportUnavailable(
            f"connection {self.name!r} closed: {self.closed_reason or 'closing'}"
        )

    # -- writing --------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is None or self._dead:
            raise self._error()
        self._wrote = True
        self._transport.write(data)

    def _writelines(self, parts: list[bytes]) -> None:
        if self._transport is None or self._dead:
            raise self._error()
        self._wrote = True
        self._transport.writelines(parts)

    def _send0(self, method: Frame) -> None:
        self._write(_method_frame(0, method))

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport (asyncio callback)."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Mark the connection dead and fail everything on it (asyncio callback)."""
        if exc is not None:
            self._die(f"connection lost: {exc}", None)
        else:
            self._die("connection closed by peer", None)

    def pause_writing(self) -> None:
        """Stop publishing until the socket drains (asyncio callback)."""
        self._paused = True

    def resume_writing(self) -> None:
        """Let publishers continue (asyncio callback)."""
        self._paused = False
        self._wake_writers()

    def data_received(self, data: bytes) -> None:
        """Parse every complete frame received so far (asyncio callback)."""
        self._heard = True
        buf = self._buf
        buf += data
        try:
            used = self._parse(buf)
        except (
            ValueError,
            IndexError,
            KeyError,
            struct.error,
            UnmarshalingException,
        ) as exc:
            _log.error("amqp_protocol_error", connection=self.name, error=repr(exc))
            self._die(f"protocol error: {exc!r}", None, abort=True)
            return
        if used:
            del buf[:used]

    def _parse(self, buf: bytearray) -> int:
        """Dispatch the complete frames in *buf*; return the bytes used."""
        have = len(buf)
        pos = 0
        channels = self._channels
        limit = self.frame_max
        while have - pos >= 8 and not self._dead:
            ftype, cid, size = _FRAME_HDR.unpack_from(buf, pos)
            if size > limit:
                raise ValueError(f"frame of {size} bytes exceeds frame_max {limit}")
            end = pos + 7 + size
            if end >= have:
                break
            if buf[end] != 0xCE:
                raise ValueError(f"bad frame end byte {buf[end]:#x}")
            ch = channels.get(cid)
            if ch is None and cid:
                pass  # a late frame for a channel already forgotten
            elif ftype == 3:
                if ch is None:
                    raise ValueError("content body on channel 0")
                ch._on_body(buf, pos + 7, end)
            elif ftype == 1:
                method = _U32.unpack_from(buf, pos + 7)[0]
                if method == _M_DELIVER and ch is not None:
                    ch._on_deliver(buf, pos + 11)
                elif method in (_M_ACK, _M_NACK) and ch is not None:
                    tag, bits = _TAG_BITS.unpack_from(buf, pos + 11)
                    ch._on_confirm(
                        tag, bool(bits & 1), _ACK if method == _M_ACK else _NACK
                    )
                else:
                    value = pframe.unmarshal(bytes(buf[pos : end + 1]))[2]
                    if not isinstance(value, Frame):
                        raise ValueError(f"unexpected frame {value!r}")
                    if ch is None:
                        self._on_method0(value)
                    else:
                        ch._on_method(value)
            elif ftype == 2:
                if ch is None:
                    raise ValueError("content header on channel 0")
                ch._on_header(buf, pos + 7)
            elif ftype != 8:  # 8 is a heartbeat: having heard it is enough
                raise ValueError(f"unknown frame type {ftype} on channel {cid}")
            pos = end + 1
        return pos

    # -- channel 0 ------------------------------------------------------------

    def _on_method0(self, method: Frame) -> None:
        if isinstance(method, commands.Connection.Close):
            code = int(method.reply_code or 0)
            with contextlib.suppress(TransportUnavailable):
                self._send0(commands.Connection.CloseOk())
            self._die(f"{code} {method.reply_text}", code)
        elif isinstance(method, commands.Connection.CloseOk):
            self._die("closed by client", 200)
        elif isinstance(method, commands.Connection.Blocked):
            self._blocked = True
            self.blocked_reason = str(method.reason)
            _log.warning(
                "amqp_connection_blocked", connection=self.name, reason=method.reason
            )
        elif isinstance(method, commands.Connection.Unblocked):
            self._blocked = False
            self.blocked_reason = None
            _log.info("amqp_connection_unblocked", connection=self.name)
            self._wake_writers()
        elif self._ch0_waiter is not None and not self._ch0_waiter.done():
            self._ch0_reply = method
            _wake(self._ch0_waiter)

    def _wake_writers(self) -> None:
        for ch in list(self._channels.values()):
            ch._wake_writers()

    def _tick(self) -> None:
        if self._dead:
            return
        if not self._wrote and self._transport is not None:
            self._transport.write(_HEARTBEAT)
        self._wrote = False
        # Brokers stop heartbeats to a blocked connection: don't count those.
        self._missed = 0 if self._heard or self._blocked else self._missed + 1
        self._heard = False
        if self._missed >= 4:  # four half-periods: 2x the heartbeat
            _log.warning(
                "amqp_heartbeat_missed",
                connection=self.name,
                heartbeat_s=self.heartbeat_s,
            )
            self._die(
                f"no frame from the broker in {2 * self.heartbeat_s}s", None, abort=True
            )
            return
        self._heartbeat_handle = self._loop.call_later(self.heartbeat_s / 2, self._tick)

    def _die(self, reason: str, code: int | None, *, abort: bool = False) -> None:
        if self._dead:
            return
        self._dead = True
        self.closed_reason = reason
        self.close_code = code
        if self._heartbeat_handle is not None:
            self._heartbeat_handle.cancel()
        for ch in list(self._channels.values()):
            ch._die(f"connection closed: {reason}", None)
        self._channels.clear()
        _wake(self._ch0_waiter)
        if self._transport is not None:
            # close() flushes (our CloseOk); a silent or garbled peer gets abort().
            if abort:
                self._transport.abort()
            else:
                self._transport.close()
        self._buf = bytearray()
        _wake(self._closed)
