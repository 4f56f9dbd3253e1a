"""A TCP proxy for network faults: RELIABILITY.md §5.2's blackhole, reset, latency.

It forwards 127.0.0.1:<port> to a target.

- `blackhole` stops moving bytes both ways and stalls new connections,
  holding every socket open, as a network partition does: nothing is
  refused or reset, nothing answers. `heal` lets the held bytes through, as
  TCP's retransmissions would.
- `reset_all` aborts every connection at once, as a load balancer or a
  firewall dropping its state does.
- `latency` delays every chunk by a random time within bounds, in order and
  pipelined, as a long link does: a chunk read at t leaves at t + delay,
  never before the one ahead of it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from urllib.parse import urlsplit, urlunsplit

__all__ = ["FaultProxy", "fault_proxy", "proxied"]

#: Chunks read but not yet written, per direction of one connection.
_QUEUED = 256


class FaultProxy:
    """Forwards to *host*:*port*, with the faults the test turns on."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._open = asyncio.Event()
        self._open.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._delay: tuple[float, float] = (0.0, 0.0)
        self._rng = random.Random(7)
        self.port = 0

    def blackhole(self) -> None:
        """Stop forwarding; hold every connection open and silent."""
        self._open.clear()

    def heal(self) -> None:
        """Forward again, held bytes first."""
        self._open.set()

    def reset_all(self) -> int:
        """Abort every connection now (TCP RST both ways); return how many sockets."""
        writers = [w for w in self._writers if not w.is_closing()]
        for writer in writers:
            writer.transport.abort()
        self._writers.clear()
        return len(writers)

    def latency(self, low_s: float, high_s: float) -> None:
        """Delay every chunk from now on by a uniform time in [low_s, high_s]."""
        self._delay = (low_s, high_s)

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        await self._open.wait()  # a partition stalls the handshake too
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUED)
            for coro in (self._read(src, queue), self._write(queue, dst)):
                task = asyncio.create_task(coro)
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _read(
        self, src: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        loop = asyncio.get_running_loop()
        due = 0.0
        # A broken connection ends the stream, as an empty read does.
        with suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                low, high = self._delay
                delay = self._rng.uniform(low, high) if high else 0.0
                due = max(due, loop.time() + delay)
                await queue.put((due, data))
        await queue.put((due, b""))

    async def _write(
        self, queue: asyncio.Queue[tuple[float, bytes]], dst: asyncio.StreamWriter
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    return
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)  # the link's latency
                await self._open.wait()
                if dst.is_closing():
                    return  # the other side went away meanwhile
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            return  # one side went away: the other is closed below
        finally:
            dst.close()


@asynccontextmanager
async def fault_proxy(host: str, port: int) -> AsyncIterator[FaultProxy]:
    """A running proxy to *host*:*port*; every connection closed afterwards."""
    proxy = FaultProxy(host, port)
    server = await asyncio.start_server(proxy._handle, "127.0.0.1", 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        proxy.heal()
        server.close()
        for writer in proxy._writers:
            writer.close()
        for task in list(proxy._tasks):
            task.cancel()
        await asyncio.gather(*proxy._tasks, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def proxied(url: str) -> AsyncIterator[tuple[FaultProxy, str]]:
    """A proxy to *url*'s host and port, and *url* rewritten to go through it."""
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise ValueError(f"{url!r} names no host and port")
    user = parts.netloc.rpartition("@")[0]
    async with fault_proxy(parts.hostname, parts.port) as proxy:
        netloc = f"{user}@127.0.0.1:{proxy.port}" if user else f"127.0.0.1:{proxy.port}"
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
