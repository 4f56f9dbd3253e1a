"""A small client for the control socket, used by ``brokerctl`` and tests.

One connection per request: admin commands are rare, and a fresh
connection means a fresh SO_PEERCRED check and no state to get wrong.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, final

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from broker.control.protocol import (
    Request,
    RequestRefused,
    decode_reply,
    encode_request,
)
from broker.errors import ControlError

__all__ = ["DaemonUnreachable", "ControlClient"]


class DaemonUnreachable(ControlError):
    """Nothing answers on the control socket, or we may not connect to it."""


@final
class ControlClient:
    """Send requests to a running daemon's control socket.

    Args:
        socket_path: the daemon's ``[control] socket-path``.
        timeout_s: how long to wait for a reply.
        max_reply_bytes: a longer reply line is refused.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        timeout_s: float = 60.0,
        max_reply_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self._path = os.fspath(socket_path)
        self._timeout_s = timeout_s
        self._max_reply_bytes = max_reply_bytes

    def __repr__(self) -> str:
        return f"<ControlClient {self._path}>"

    async def request(self, req: Request) -> Any:
        """Send *req* and return the reply's ``result``.

        Raises:
            DaemonUnreachable: no daemon listens on the socket, or the
                socket's permissions keep us out.
            RequestRefused: the daemon answered with an error; ``code``
                says which kind.
            ControlError: the connection broke or no reply came in time.
        """
        with anyio.move_on_after(self._timeout_s):
            stream = await self._connect()
            async with stream:
                return await self._exchange(stream, req)
        raise ControlError(
            f"no reply from the daemon on {self._path} within {self._timeout_s:g}s"
        )

    async def _exchange(self, stream: anyio.abc.SocketStream, req: Request) -> Any:
        with contextlib.suppress(anyio.BrokenResourceError):
            # A daemon that refuses us (uid, connection limit) replies and
            # closes without reading; its reply is still there to read.
            await stream.send(encode_request(req))
        try:
            line = await BufferedByteReceiveStream(stream).receive_until(
                b"\n", self._max_reply_bytes
            )
        except anyio.IncompleteRead as exc:
            raise ControlError(
                f"the daemon on {self._path} closed the connection without replying"
            ) from exc
        except anyio.DelimiterNotFound as exc:
            raise ControlError(
                f"reply longer than {self._max_reply_bytes} bytes"
            ) from exc
        except anyio.BrokenResourceError as exc:
            raise ControlError(
                f"lost the connection to the daemon on {self._path}: "
                f"{exc.__cause__ or exc}"
            ) from exc
        reply = decode_reply(line)
        if not reply.ok:
            raise RequestRefused(
                reply.error or "the daemon refused the request",
                code=reply.code or "failed",
            )
        return reply.result

    async def _connect(self) -> anyio.abc.SocketStream:
        path = self._path
        try:
            return await anyio.connect_unix(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(
                f"no daemon is listening on {path}: is brokerd running? "
                "(start it with `brokerd run`)"
            ) from exc
        except PermissionError as exc:
            raise DaemonUnreachable(
                f"permission denied on {path}: run as the daemon's user or root; "
                "another uid must be listed in the daemon's [control] "
                "allowed-uids and be a member of its [control] socket-group "
                "(without one, the socket is open to the daemon's user only)"
            ) from exc
        except OSError as exc:
            raise DaemonUnreachable(
                f"cannot connect to {path}: {exc.strerror or exc}"
            ) from exc
