"""A publisher waiting for room in the confirm window, cancelled as room appears.

A fake connection (no socket): the race is between a task's cancellation and
the confirm that wakes it in the same turn of the loop, which no real broker
can be made to time.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from broker.transport import OutgoingMessage, PublishOutcome
from broker.transport.channel import WireChannel

pytestmark = pytest.mark.anyio


class _Connection:
    """What a channel asks of its connection while it publishes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._blocked = False
        self._paused = False
        self.frame_max = 131_072
        self.frames = 0

    def _writelines(self, parts: Any) -> None:
        self.frames += 1

    def _write(self, data: bytes) -> None:
        self.frames += 1


def _channel(window: int) -> WireChannel:
    conn = _Connection(asyncio.get_running_loop())
    channel = WireChannel(cast(Any, conn), 1)
    channel._confirming = True
    channel._window = window
    channel._slice_min = 1
    return channel


MESSAGES = [
    OutgoingMessage(exchange="x", routing_key="k", body=b"b", message_id=str(n))
    for n in range(4)
]


async def test_a_publisher_cancelled_as_a_confirm_frees_the_window_is_cancelled() -> (
    None
):
    """It ends cancelled, not with the ValueError of a waiter already woken."""
    channel = _channel(window=2)
    task = asyncio.create_task(channel.publish_batch(MESSAGES, 30))
    await asyncio.sleep(0)  # two written, the task waits for room
    assert (channel._inflight, len(channel._writable_waiters)) == (2, 1)

    task.cancel()
    channel._on_confirm(1, False, PublishOutcome.ACK)  # wakes the same waiter
    with pytest.raises(asyncio.CancelledError):
        await task
    assert channel._writable_waiters == []


async def test_a_return_is_for_the_copy_still_awaited_not_one_given_up() -> None:
    """A copy given up at its deadline, republished: the return is the new one's.

    The broker returns an unroutable message at once but confirms a routed
    one only when its queue has it, so a return may overtake the first
    copy's confirm. Marking that copy let the new copy's ack settle as ACK,
    and its row was deleted though the message went nowhere.
    """
    channel = _channel(window=16)
    (message,) = MESSAGES[:1]
    first = await channel.publish_batch([message], 0.01)  # no confirm in time
    assert first == [PublishOutcome.INDETERMINATE]

    second = asyncio.create_task(channel.publish_batch([message], 30))
    await asyncio.sleep(0)  # written as delivery tag 2
    channel._on_return(message.message_id)  # the second copy: no route now
    channel._on_confirm(2, False, PublishOutcome.ACK)
    assert await second == [PublishOutcome.RETURNED]
