"""The control socket's file: created private, replaced only when stale.

Blocking, except `remove_shielded`: `broker.control.server.ControlServer`
runs `bind` in a worker thread. The parent directory is created with mode
0700 when missing; the socket is bound under umask 0177 and chmod-ed 0600;
an existing path is replaced only if it is a socket nobody answers on; and
on exit only the file this process bound is removed.

With a socket group (``[control] socket-group``), the socket is given to
that group with mode 0660, and its directory (if only the daemon may enter
it, and it is the socket's own) with mode 0750: a uid in the group can then
connect at all, and the server still admits it only if it is listed in
``[control] allowed-uids``.
Unix permissions decide who may *connect*; the peer uid check decides who
is *served*.

Internal: not for use outside broker/control.
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat

import anyio
import structlog

from broker.errors import ControlError

__all__ = ["bind", "remove_shielded"]

log = structlog.get_logger(__name__)

_PROBE_TIMEOUT_S = 1.0


def bind(
    path: str, backlog: int, group: str | int = ""
) -> tuple[socket.socket, tuple[int, int]]:
    """Create the directory, clear a stale socket, bind 0600 and listen.

    With *group* (a group name or gid; ``""`` for none) the socket becomes
    0660 and of that group, and the group is let through the directory
    (`_share_directory`).

    Returns the listening socket and the file's (st_dev, st_ino), so that
    only this socket file is removed on exit.

    Raises:
        ControlError: the path cannot be prepared or bound, the group is
            unknown, or the directory or the socket cannot be given to it.
    """
    parent = os.path.dirname(os.path.abspath(path))
    gid = _gid(group)
    try:
        created = False
        if not os.path.isdir(parent):
            with contextlib.suppress(FileExistsError):  # lost a race: not ours
                os.makedirs(parent, mode=0o700)
                created = True
        if gid is not None:
            _share_directory(parent, path, gid, group, created=created)
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
        if gid is not None:
            # Group first, then the group's bits: never 0660 to the wrong group.
            _give_to_group(path, gid, group, follow_symlinks=False)
        os.chmod(path, 0o600 if gid is None else 0o660)
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


def _gid(group: str | int) -> int | None:
    """The gid *group* names (a name, or a number), None for ``""``.

    Raises:
        ControlError: no such group.
    """
    if group == "":
        return None
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ControlError(
            f"[control] socket-group: no group named {group!r}"
        ) from None


def _share_directory(
    parent: str, path: str, gid: int, group: str | int, *, created: bool
) -> None:
    """Let the members of *gid* through the socket's directory, *parent*.

    A directory that lets them through already (search permission for the
    group or for everyone: ``/run``, say) is left as it is. One that only
    the daemon may enter is given to the group, 0750, if it is the socket's
    own: `bind` just *created* it, or it holds nothing but the socket *path*
    (a stale one, from an earlier run). Anything else is refused rather than
    changed: its group or its mode may matter to someone else, and a private
    directory holding more than the socket (the default ``var/``, with the
    store and the journal; the service's home, with its config) would become
    listable, and its files readable, by the group.

    Raises:
        ControlError: the directory keeps the group out and is shared or
            holds more than the socket, or the daemon may not give it to the
            group (it is not a member).
    """
    info = os.stat(parent)
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o001 or (info.st_gid == gid and mode & 0o010):
        return
    if info.st_uid != os.geteuid() or mode & 0o077:
        why = "is not the daemon's private directory"
        hint = f", or chgrp {group} {parent} and chmod g+x it"
    elif not created and not _holds_only(parent, path):
        why, hint = "holds more than the socket", ""
    else:
        _give_to_group(parent, gid, group)
        os.chmod(parent, 0o750)
        return
    raise ControlError(
        f"[control] socket-group: {parent} keeps group {group!r} out and {why}: "
        f"give the socket a directory of its own (created 0750 for the group){hint}"
    )


def _holds_only(parent: str, path: str) -> bool:
    """Whether directory *parent* is empty but for a socket at *path*."""
    name = os.path.basename(path)
    for entry in os.listdir(parent):
        if entry != name or not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    return True


def _give_to_group(
    path: str, gid: int, group: str | int, *, follow_symlinks: bool = True
) -> None:
    """Give *path* to group *gid* (chgrp).

    Raises:
        ControlError: the daemon may not (its user is not in the group).
    """
    try:
        os.chown(path, -1, gid, follow_symlinks=follow_symlinks)
    except PermissionError as exc:
        raise ControlError(
            f"[control] socket-group: cannot give {path} to group {group!r}: "
            "the daemon's user must be a member of it"
        ) from exc


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
