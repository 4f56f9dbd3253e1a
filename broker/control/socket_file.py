"""The control socket's file: created private, replaced only when stale.

Blocking, except `remove_shielded`: `broker.control.server.ControlServer`
runs `bind` in a worker thread. The parent directory is created with mode
0700 when missing; the socket is bound under umask 0177 and chmod-ed 0600;
an existing path is replaced only if it is a socket nobody answers on; and
on exit only the file this process bound is removed.

Internal: not for use outside broker/control.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

import anyio
import structlog

from broker.errors import ControlError

__all__ = ["bind", "remove_shielded"]

log = structlog.get_logger(__name__)

_PROBE_TIMEOUT_S = 1.0


def bind(path: str, backlog: int) -> tuple[socket.socket, tuple[int, int]]:
    """Create the directory, clear a stale socket, bind 0600 and listen.

    Returns the listening socket and the file's (st_dev, st_ino), so that
    only this socket file is removed on exit.
    """
    parent = os.path.dirname(os.path.abspath(path))
    try:
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
        _clear_stale(path)
    except OSError as exc:
        raise ControlError(f"cannot prepare control socket {path}: {exc}") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask is process-wide, but this window is one syscall long and
        # a file created under it can only come out tighter, not looser.
        previous = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(previous)
        os.chmod(path, 0o600)
        sock.listen(backlog)
        sock.setblocking(False)
        info = os.stat(path)
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot listen on {path}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    return sock, (info.st_dev, info.st_ino)


def _clear_stale(path: str) -> None:
    """Remove *path* if it is a socket nobody answers on; refuse anything else.

    Raises:
        ControlError: the path is not a socket, or a daemon answers on it.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass  # stale: left behind by a daemon that died
    except FileNotFoundError:
        return
    except TimeoutError as exc:  # a full backlog: alive, just busy
        raise ControlError(f"another daemon is listening on {path}") from exc
    else:
        raise ControlError(f"another daemon is listening on {path}")
    finally:
        probe.close()
    log.warning("control_stale_socket_removed", path=path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove(path: str, identity: tuple[int, int]) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if (info.st_dev, info.st_ino) == identity:
        os.unlink(path)
        log.info("control_socket_removed", path=path)


async def remove_shielded(path: str, identity: tuple[int, int]) -> None:
    """Remove the socket file *bind* created, if it is still there; never cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(_remove, path, identity)
