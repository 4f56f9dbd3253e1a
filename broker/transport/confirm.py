"""Publishing with publisher confirms: the publishing half of `WireChannel`.

`ConfirmPublisher.publish_batch` writes a batch in slices as the confirm
window, the broker (Connection.Blocked) and the socket (``pause_writing``)
allow, and waits on *one* future for the whole batch, however many messages
it holds. Basic.Ack / Basic.Nack from the broker settle it; a Basic.Return
marks a message RETURNED before its confirm arrives.

Invariants worth knowing before changing anything:

* Futures in the wire client are wake-ups only: they always get ``None`` as
  their result and the woken code re-reads the state. No future ever
  carries an exception, so none can be "never retrieved". `wake` fires
  them; it lives here, in the lowest module that waits.
* Publisher-confirm sequence numbers are tracked as *runs*: one run per
  contiguous slice of a batch written in a single `writelines` call.
  Confirms settle runs from the front; a run outlives a timed-out batch so
  a late ``multiple`` confirm still lands somewhere harmless.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from broker.transport import OutgoingMessage, PublishOutcome
from broker.transport.frames import (
    FRAME_END,
    FRAME_HEADER,
    HEADER_FRAME,
    U64,
    encode_table,
    shortstr,
)

if TYPE_CHECKING:
    from broker.transport.wire import WireConnection

__all__ = ["ConfirmPublisher", "wake"]

#: A slice of a published batch stops growing past this many bytes, so the
#: socket's write buffer stays bounded however large the messages are.
_SLICE_BYTES: Final = 1 << 20

_RETURNED: Final = PublishOutcome.RETURNED
_INDETERMINATE: Final = PublishOutcome.INDETERMINATE


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


def wake(fut: asyncio.Future[None] | None) -> None:
    """Fire the wake-up future *fut*, unless it is gone or already done."""
    if fut is not None and not fut.done():
        fut.set_result(None)


class ConfirmPublisher:
    """The publishing half of `WireChannel`: batches, confirm runs, the window.

    Internal: a mixin with no life of its own. `WireChannel` supplies the
    attributes declared below and calls `_init_publishing` from its
    ``__init__``; the connection calls `_on_confirm` and `_wake_writers`.
    """

    # Supplied by WireChannel.
    id: int
    _conn: WireConnection
    _loop: asyncio.AbstractEventLoop
    _dead: bool
    _closing: bool

    def _init_publishing(self) -> None:
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
                    # Our deadline or our caller's cancel: don't pile up. A
                    # wake in the same turn (a confirm, the channel's death)
                    # may have taken the waiter off the list already.
                    if waiter.cancelled():
                        with contextlib.suppress(ValueError):
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
        ts = U64.pack(int(time.time()))
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
                    + shortstr(m.exchange)
                    + shortstr(m.routing_key)
                    + b"\x01"  # mandatory
                )
                method = cache[key] = (
                    FRAME_HEADER.pack(1, cid, len(payload)) + payload + FRAME_END
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
                    enc = sscache[ct] = shortstr(ct)
                props.append(enc)
            if m.headers:
                flags |= 0x2000
                props.append(encode_table(m.headers))
            props.append(b"\x02")  # persistent
            if m.correlation_id is not None:
                flags |= 0x0400
                props.append(shortstr(m.correlation_id))
            props.append(shortstr(m.message_id))
            props.append(ts)
            if m.type is not None:
                flags |= 0x0020
                props.append(shortstr(m.type))
            prop_bytes = b"".join(props)
            body = m.body
            blen = len(body)
            append(
                HEADER_FRAME.pack(2, cid, 14 + len(prop_bytes), 60, 0, blen, flags)
                + prop_bytes
                + FRAME_END
            )
            if blen <= max_body:
                if blen:
                    append(FRAME_HEADER.pack(3, cid, blen))
                    append(body)
                    append(FRAME_END)
            else:
                view = memoryview(body)
                for off in range(0, blen, max_body):
                    chunk = view[off : off + max_body]
                    append(FRAME_HEADER.pack(3, cid, len(chunk)))
                    append(bytes(chunk))
                    append(FRAME_END)
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
                wake(batch.waiter)

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
            wake(waiter)

    def _on_return(self, message_id: str | None) -> None:
        # Returns are rare (a routing bug): a linear scan is fine. A batch
        # given up at its deadline is skipped: the return is for a copy still
        # awaited (republished meanwhile under the same id). The broker
        # returns at once but confirms a routed copy only once its queue has
        # it, so a return can overtake the given-up copy's confirm; marking
        # that copy instead would let the new one's ack settle as ACK.
        for run in self._runs:
            batch = run.batch
            if batch not in self._batches:
                continue
            outcomes = batch.outcomes
            for i in range(run.start, run.start + run.count):
                if (
                    outcomes[i] is None
                    and i not in batch.returned
                    and batch.messages[i].message_id == message_id
                ):
                    batch.returned.add(i)
                    return
