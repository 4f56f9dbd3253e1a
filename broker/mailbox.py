"""Bounded per-actor inboxes.

A `Mailbox` is a thin layer over one AnyIO memory object stream with a fixed
buffer. It adds what the runtime needs around the stream: back-pressure on
`Mailbox.put` (a producer waits for room rather than growing a buffer), a
non-blocking `Mailbox.put_nowait` that fails with `MailboxFull`, fill
statistics for the control socket, and a two-step close that makes draining
explicit: `Mailbox.close` stops intake while queued items stay readable, and
`Mailbox.discard` ends the mailbox for good and hands back whatever was left.
"""

from __future__ import annotations

from typing import Generic, TypeVar, final

import anyio

from broker.errors import ActorStopped, MailboxFull

__all__ = ["Mailbox"]

M = TypeVar("M")


@final
class Mailbox(Generic[M]):
    """A bounded FIFO inbox for one actor incarnation.

    ``repr(mailbox)`` doubles as a status line: ``<Mailbox erp.order_sync 12/64>``.

    Args:
        name: the owning actor's dotted id; used in the repr and in errors.
        size: how many items may wait; at least 1.

    Raises:
        ValueError: if ``size`` is below 1 (a zero-size stream is a rendezvous,
            not a mailbox).
    """

    __slots__ = (
        "_closed",
        "_discarded",
        "_high_water",
        "_name",
        "_receive",
        "_send",
        "_size",
    )

    def __init__(self, name: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"mailbox of {name!r} needs a size of at least 1: {size}")
        self._name = name
        self._size = size
        self._high_water = 0
        self._closed = False
        self._discarded = False
        self._send, self._receive = anyio.create_memory_object_stream[M](
            max_buffer_size=size
        )

    @property
    def name(self) -> str:
        """The owning actor's id."""
        return self._name

    @property
    def size(self) -> int:
        """How many items may wait in the mailbox."""
        return self._size

    @property
    def fill(self) -> int:
        """How many items are waiting now."""
        return self._send.statistics().current_buffer_used

    @property
    def high_water(self) -> int:
        """The highest fill seen since the mailbox was created."""
        return self._high_water

    @property
    def closed(self) -> bool:
        """Whether intake has stopped (`close` or `discard` was called)."""
        return self._closed

    async def put(self, item: M) -> None:
        """Queue ``item``, waiting for room while the mailbox is full.

        This wait is the runtime's back-pressure: a producer that outpaces the
        actor is slowed to the actor's pace instead of growing a buffer.

        Raises:
            ActorStopped: intake was closed before or while waiting for room.
        """
        try:
            await self._send.send(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise ActorStopped(
                f"actor {self._name!r} is not accepting messages"
            ) from exc
        self._note_fill()

    def put_nowait(self, item: M) -> None:
        """Queue ``item`` now or fail.

        Raises:
            MailboxFull: the mailbox holds ``size`` items already.
            ActorStopped: intake is closed.
        """
        try:
            self._send.send_nowait(item)
        except anyio.WouldBlock as exc:
            raise MailboxFull(
                f"mailbox of {self._name!r} is full ({self._size})"
            ) from exc
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise ActorStopped(
                f"actor {self._name!r} is not accepting messages"
            ) from exc
        self._note_fill()

    async def get(self) -> M:
        """Take the oldest item, waiting for one if the mailbox is empty.

        Raises:
            anyio.EndOfStream: intake is closed and every queued item was taken;
                the clean end of the mailbox.
            anyio.ClosedResourceError: the mailbox was discarded.
        """
        return await self._receive.receive()

    def __aiter__(self) -> Mailbox[M]:
        return self

    async def __anext__(self) -> M:
        # A plain __anext__ rather than an async generator: a generator left
        # suspended by cancellation would be finalised later, off the task.
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Stop intake; items already queued can still be taken with `get`.

        Producers blocked in `put` fail with `ActorStopped`: their items were
        never queued. Idempotent.
        """
        self._closed = True
        self._send.close()

    def discard(self) -> list[M]:
        """Close both ends and return the items nobody took, oldest first.

        Idempotent; a second call returns an empty list.
        """
        self.close()
        if self._discarded:
            return []
        self._discarded = True
        left: list[M] = []
        while True:
            try:
                left.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        self._receive.close()
        return left

    def _note_fill(self) -> None:
        self._high_water = max(self._high_water, self.fill)

    def __repr__(self) -> str:
        return f"<Mailbox {self._name} {self.fill}/{self._size}>"
