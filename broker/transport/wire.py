"""A minimal AMQP 0-9-1 client on `asyncio.Protocol`, built for the hot path.

Why not aio-pika: on a 2-core host its per-message futures, callbacks and
wrapper objects cost hundreds of µs a message, of which pamqp's frame work
is a small part. Here a delivery is one slotted `Delivery` appended to a
deque, and a published batch shares *one* future however many messages it
holds. ``bench/wire_micro.py`` measures the difference: about 10 µs of
client CPU per consumed-and-republished message against about 210.

The client, module by module:

* `broker.transport.wire` (this one): `WireConnection`, the connection:
  handshake, heartbeats, Connection.Blocked, parsing frames and handing
  them to channel 0 or to their channel;
* `broker.transport.channel`: `WireChannel`, synchronous methods, consuming
  and acknowledging;
* `broker.transport.confirm`: publishing with publisher confirms;
* `broker.transport.frames`: byte layouts, field tables, `ClosedByBroker`
  and the ``amqp://`` URL.

Invariants worth knowing before changing anything:

* Futures here are wake-ups only: they always get ``None`` as their result
  and the woken code re-reads the state (see `broker.transport.confirm`).
* A channel id is freed once the broker confirmed its close (or the close
  timed out, or the connection died); ids are handed out round-robin so
  late frames for an old channel are unlikely to meet a new one.
* Publisher-confirm sequence numbers are tracked as *runs*; see
  `broker.transport.confirm`.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import ssl
import struct
from typing import Any, Final, cast

import structlog
from pamqp import commands
from pamqp import frame as pframe
from pamqp.base import Frame
from pamqp.exceptions import UnmarshalingException

from broker.config import AuthMechanism
from broker.errors import TransportUnavailable
from broker.transport import PublishOutcome
from broker.transport.channel import CLOSE_TIMEOUT_S, WireChannel
from broker.transport.confirm import wake
from broker.transport.frames import (
    BASIC_ACK,
    BASIC_DELIVER,
    BASIC_NACK,
    FRAME_HEADER,
    HEARTBEAT_FRAME,
    PROTOCOL_HEADER,
    TAG_BITS,
    U32,
    AmqpParams,
    ClosedByBroker,
    method_frame,
    parse_url,
)

__all__ = ["WireConnection"]

_log = structlog.get_logger(__name__)

_CLIENT_FRAME_MAX: Final = 131_072

_ACK: Final = PublishOutcome.ACK
_NACK: Final = PublishOutcome.NACK


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
        cls,
        url: str,
        *,
        name: str,
        heartbeat_s: int,
        connect_timeout_s: float,
        tls: ssl.SSLContext | None = None,
        mechanism: AuthMechanism = "plain",
    ) -> WireConnection:
        """Connect, authenticate and open the URL's vhost.

        An ``amqps://`` URL connects with *tls* (see `broker.transport.tls`),
        or with the system's defaults when it is ``None``. *mechanism*
        ``"plain"`` logs in with the URL's user and password; ``"external"``
        (SASL EXTERNAL) lets the broker take the user from the client
        certificate in *tls*, and ignores the URL's credentials.

        Raises:
            TransportUnavailable: refused, timed out, or the broker closed the
                connection during the handshake (e.g. 403 ACCESS_REFUSED);
                the cause is chained.
            ValueError: *url* is not an AMQP URL.
        """
        params = parse_url(url)
        loop = asyncio.get_running_loop()
        who = (
            "by client certificate"
            if mechanism == "external"
            else f"as {params.user!r}"
        )
        where = f"{params.host}:{params.port} vhost {params.vhost!r} {who}"
        try:
            async with asyncio.timeout(connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: cls(name=name, heartbeat_s=heartbeat_s),
                    params.host,
                    params.port,
                    ssl=(tls or ssl.create_default_context()) if params.tls else None,
                )
                try:
                    await conn._handshake(params, mechanism)
                except BaseException:
                    conn._die("handshake failed", None, abort=True)
                    raise
        except ClosedByBroker:
            raise  # the broker's own words name the vhost or the user
        except TransportUnavailable as exc:
            # Dropped mid-handshake: a TLS alert, or plain AMQP on a TLS port.
            raise TransportUnavailable(
                f"AMQP handshake with {where} failed: {exc}"
            ) from exc
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

    async def _handshake(self, params: AmqpParams, mechanism: AuthMechanism) -> None:
        self._write(PROTOCOL_HEADER)
        start = await self._expect(commands.Connection.Start)
        assert isinstance(start, commands.Connection.Start)
        self.server_properties = dict(start.server_properties or {})
        offered = str(start.mechanisms).split()
        if mechanism == "external" and "EXTERNAL" not in offered:
            # RabbitMQ offers it only with rabbitmq_auth_mechanism_ssl
            # enabled, EXTERNAL in auth_mechanisms, and a client certificate
            # on this very connection.
            raise TransportUnavailable(
                f"broker offers no EXTERNAL login (only {' '.join(offered)}): "
                "enable rabbitmq_auth_mechanism_ssl, list EXTERNAL in "
                "auth_mechanisms, and present a client certificate"
            )
        if mechanism == "plain" and "PLAIN" not in offered:
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
                mechanism=mechanism.upper(),
                response=(
                    ""
                    if mechanism == "external"
                    else f"\0{params.user}\0{params.password}"
                ),
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

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
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
        self._write(method_frame(0, method))

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
            ftype, cid, size = FRAME_HEADER.unpack_from(buf, pos)
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
                method = U32.unpack_from(buf, pos + 7)[0]
                if method == BASIC_DELIVER and ch is not None:
                    ch._on_deliver(buf, pos + 11)
                elif method in (BASIC_ACK, BASIC_NACK) and ch is not None:
                    tag, bits = TAG_BITS.unpack_from(buf, pos + 11)
                    ch._on_confirm(
                        tag, bool(bits & 1), _ACK if method == BASIC_ACK else _NACK
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
            wake(self._ch0_waiter)

    def _wake_writers(self) -> None:
        for ch in list(self._channels.values()):
            ch._wake_writers()

    def _tick(self) -> None:
        if self._dead:
            return
        if not self._wrote and self._transport is not None:
            self._transport.write(HEARTBEAT_FRAME)
        self._wrote = False
        # A blocked connection still hears the broker's heartbeats (RabbitMQ
        # stops only watching ours): silence is silence, blocked or not, or a
        # link cut during an alarm would never be found dead.
        self._missed = 0 if self._heard else self._missed + 1
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
        wake(self._ch0_waiter)
        if self._transport is not None:
            # close() flushes (our CloseOk); a silent or garbled peer gets abort().
            if abort:
                self._transport.abort()
            else:
                self._transport.close()
        self._buf = bytearray()
        wake(self._closed)
