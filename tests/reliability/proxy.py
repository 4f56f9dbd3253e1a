"""A TCP proxy for network faults: RELIABILITY.md §5.2's ``blackhole`` and ``reset``.

It forwards 127.0.0.1:<port> to a target. `blackhole` stops moving bytes
both ways and stalls new connections, holding every socket open, as a
network partition does: nothing is refused or reset, nothing answers.
`heal` lets the held bytes through, as TCP's retransmissions would.
`reset_all` aborts every connection at once, as a load balancer or a
firewall dropping its state does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["BlackholeProxy", "blackhole_proxy"]


class BlackholeProxy:
    """Forwards to *host*:*port* until told to go silent."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._open = asyncio.Event()
        self._open.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
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
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
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
async def blackhole_proxy(host: str, port: int) -> AsyncIterator[BlackholeProxy]:
    """A running proxy to *host*:*port*; every connection closed afterwards."""
    proxy = BlackholeProxy(host, port)
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
