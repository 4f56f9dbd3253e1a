"""The control socket's door: who may connect, who is served, and accept() failures.

Switching uids needs root: run as root, the peers are forked children that
become ``nobody`` (65534); otherwise those tests are skipped, and the rule
is pinned on its own here and, in test_control_protocol.py, with a peer
uid reported by a stand-in.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import socket
import stat
import struct
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any, cast

import anyio
import pytest
from structlog.testing import capture_logs

from broker.config import ControlConfig
from broker.control import server as server_module
from broker.control import socket_file
from broker.control.client import ControlClient, DaemonUnreachable
from broker.control.protocol import StatusRequest
from broker.control.server import _peer_credentials, allowed_uids
from broker.errors import ControlError
from tests.unit.test_control_protocol import FakeHandler, serving

pytestmark = pytest.mark.anyio

NOBODY = 65534
NOGROUP = 65534
#: A uid that no test lists in allowed-uids, and a gid that is not nogroup.
UNLISTED = 65533
OTHER_GROUP = 65533

as_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="switching uids needs root; the rule is tested alone"
)


@pytest.fixture
def run_dir() -> Iterator[str]:
    """A short temporary directory others may pass through (AF_UNIX: 108 bytes)."""
    path = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    os.chmod(path, 0o711)  # mkdtemp's 0700 would keep nobody out before our code
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- who is served --------------------------------------------------------------


def test_the_daemons_own_uid_and_root_are_served_besides_those_listed() -> None:
    """allowed-uids adds to the daemon's own uid and root; it never replaces them."""
    assert allowed_uids(()) == {os.geteuid(), 0}
    assert allowed_uids((1000, 1001)) == {os.geteuid(), 0, 1000, 1001}


async def test_listing_another_uid_does_not_lock_out_the_daemons_own(
    run_dir: str,
) -> None:
    """With allowed-uids naming someone else, the daemon's own user is still served."""
    cfg = ControlConfig(
        socket_path=f"{run_dir}/c.sock", allowed_uids=(os.geteuid() + 4242,)
    )
    async with serving(cfg, FakeHandler()):
        assert await ControlClient(cfg.socket_path).request(StatusRequest()) == {
            "uptime_s": 1.5
        }


class _Credentials:
    """A socket whose SO_PEERCRED says pid 4242, uid and gid 2**32 - 2."""

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_PEERCRED)
        return struct.pack("iII", 4242, 2**32 - 2, 2**32 - 2)


def test_a_uid_above_2_31_is_read_unsigned() -> None:
    """uid_t is unsigned: a large uid is not read as a negative number."""
    peer = cast(socket.socket, _Credentials())  # only getsockopt is called
    assert _peer_credentials(peer) == (2**32 - 2, 4242)


# -- who may connect ------------------------------------------------------------


def _peer(path: str, uid: int, gid: int, report: int) -> None:
    """In a forked child: become *uid* (group *gid* only), send status to *path*.

    Writes the reply line, or the connect errno's name, to *report*. Only
    system calls happen here, so the threads the parent had do not matter.
    """
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        try:
            sock.connect(path)
        except OSError as exc:
            os.write(report, errno.errorcode[exc.errno or 0].encode())
            return
        # A refused peer may find the socket closed before it writes (as
        # `ControlClient` does); the reply is there to read all the same.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b'{"cmd": "status"}\n')
        os.write(report, sock.makefile("rb").readline().strip())


async def _as_peer(path: str, uid: int, gid: int) -> str:
    """What a process of *uid*, in group *gid* only, gets sending status to *path*.

    A forked child, not a subprocess: the interpreter may sit where *uid*
    cannot run it (under /root), and uvloop's subprocesses cannot switch
    users. The server answers on this process's loop, so the parent waits
    for the child in a worker thread.
    """
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # 3.12 warns of fork() with threads; the child only makes system calls.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            os.close(read_end)
            _peer(path, uid, gid, write_end)
        except Exception as exc:  # noqa: BLE001  (reported to the parent's assert)
            os.write(write_end, f"child failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)

    def wait() -> bytes:
        with os.fdopen(read_end, "rb") as report:
            text = report.read()
        os.waitpid(pid, 0)
        return text

    return (await anyio.to_thread.run_sync(wait)).decode()


@as_root
async def test_a_listed_uid_in_the_socket_group_connects_and_is_served(
    run_dir: str,
) -> None:
    """socket-group lets the group connect; allowed-uids still says who is served."""
    cfg = ControlConfig(
        socket_path=f"{run_dir}/run/c.sock",
        allowed_uids=(NOBODY,),
        socket_group="nogroup",
    )
    async with serving(cfg, FakeHandler()):
        sock, parent = os.stat(cfg.socket_path), os.stat(f"{run_dir}/run")
        served = await _as_peer(cfg.socket_path, NOBODY, NOGROUP)
        unlisted = await _as_peer(cfg.socket_path, UNLISTED, NOGROUP)
        outsider = await _as_peer(cfg.socket_path, NOBODY, OTHER_GROUP)
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, NOGROUP)
    assert (stat.S_IMODE(parent.st_mode), parent.st_gid) == (0o750, NOGROUP)
    assert json.loads(served) == {"ok": True, "result": {"uptime_s": 1.5}}
    assert json.loads(unlisted)["code"] == "forbidden"
    assert outsider == "EACCES"  # listed, but not in the group: cannot connect


@as_root
async def test_without_a_socket_group_a_listed_uid_cannot_connect(
    run_dir: str,
) -> None:
    """The socket stays 0600 in a 0700 directory: allowed-uids alone lets no one in."""
    cfg = ControlConfig(socket_path=f"{run_dir}/run/c.sock", allowed_uids=(NOBODY,))
    async with serving(cfg, FakeHandler()):
        assert await _as_peer(cfg.socket_path, NOBODY, NOGROUP) == "EACCES"


async def test_permission_denied_names_what_the_socket_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """EACCES on connect says how another uid gets in: allowed-uids and socket-group."""

    async def refused(path: str) -> Any:
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(anyio, "connect_unix", refused)
    with pytest.raises(DaemonUnreachable) as caught:
        await ControlClient("/run/q2c/c.sock").request(StatusRequest())
    assert "[control] allowed-uids" in str(caught.value)
    assert "[control] socket-group" in str(caught.value)


async def test_an_unknown_socket_group_is_refused_by_name(run_dir: str) -> None:
    """A socket-group naming no group fails at start, naming the key and the group."""
    cfg = ControlConfig(
        socket_path=f"{run_dir}/c.sock", socket_group="no-such-group-q2c"
    )
    server = server_module.ControlServer(cfg, FakeHandler())
    with anyio.fail_after(10), pytest.raises(ControlError, match="no group named"):
        await server.serve()


async def test_a_shared_directory_that_keeps_the_group_out_is_not_changed(
    run_dir: str,
) -> None:
    """A directory others use (group rw, no x) is refused, its mode left alone."""
    shared = f"{run_dir}/shared"
    os.mkdir(shared)
    os.chmod(shared, 0o760)
    cfg = ControlConfig(socket_path=f"{shared}/c.sock", socket_group=os.getgid())
    server = server_module.ControlServer(cfg, FakeHandler())
    with (
        anyio.fail_after(10),
        pytest.raises(ControlError, match="not the daemon's private directory"),
    ):
        await server.serve()
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o760


async def test_a_private_directory_is_opened_to_the_socket_group(run_dir: str) -> None:
    """The daemon's own 0700 directory becomes 0750 of the group, the socket 0660."""
    cfg = ControlConfig(
        socket_path=f"{run_dir}/run/c.sock", socket_group=str(os.getgid())
    )
    async with serving(cfg, FakeHandler()):
        sock, parent = os.stat(cfg.socket_path), os.stat(f"{run_dir}/run")
        assert await ControlClient(cfg.socket_path).request(StatusRequest())
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, os.getgid())
    assert (stat.S_IMODE(parent.st_mode), parent.st_gid) == (0o750, os.getgid())


async def test_a_private_directory_holding_more_than_the_socket_is_not_shared(
    run_dir: str,
) -> None:
    """The daemon's 0700 data directory (``var/``, the store beside) stays 0700."""
    data = f"{run_dir}/var"
    os.mkdir(data, 0o700)
    os.close(os.open(f"{data}/q2c.sqlite", os.O_CREAT | os.O_WRONLY, 0o600))
    before = os.stat(data)
    cfg = ControlConfig(socket_path=f"{data}/c.sock", socket_group=str(os.getgid()))
    server = server_module.ControlServer(cfg, FakeHandler())
    with (
        anyio.fail_after(10),
        pytest.raises(ControlError, match="holds more than the socket") as caught,
    ):
        await server.serve()
    assert "give the socket a directory of its own" in str(caught.value)
    after = os.stat(data)
    assert (stat.S_IMODE(after.st_mode), after.st_gid) == (0o700, before.st_gid)
    assert os.listdir(data) == ["q2c.sqlite"]


@pytest.mark.parametrize("stale", [False, True], ids=["empty", "stale-socket"])
def test_a_private_directory_holding_only_the_socket_is_shared(
    run_dir: str, stale: bool
) -> None:
    """An existing 0700 directory, empty or with a stale socket of ours, goes 0750."""
    own = f"{run_dir}/run"
    os.mkdir(own, 0o700)
    path = f"{own}/c.sock"
    if stale:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
            dead.bind(path)  # closed without unlinking: nobody answers on it
    sock, _ = socket_file.bind(path, 1, str(os.getgid()))
    sock.close()
    parent = os.stat(own)
    assert (stat.S_IMODE(parent.st_mode), parent.st_gid) == (0o750, os.getgid())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660


# -- accept() failures ----------------------------------------------------------


class _Exhausted(socket.socket):
    """A listening socket whose accept() fails like a process out of descriptors.

    As with a real EMFILE, the failure comes only with a connection waiting,
    and the connection stays queued for the next accept().
    """

    failures: list[int]

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures and select.select([self], [], [], 0)[0]:
            code = self.failures.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


@pytest.fixture
def exhausted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The errnos the server's next accept() calls fail with, in order."""
    failures: list[int] = []
    bind = socket_file.bind

    def bind_exhausted(
        path: str, backlog: int, group: str | int = ""
    ) -> tuple[socket.socket, tuple[int, int]]:
        sock, identity = bind(path, backlog, group)
        listener = _Exhausted(sock.family, sock.type, sock.proto, sock.detach())
        listener.setblocking(False)
        listener.failures = failures
        return listener, identity

    monkeypatch.setattr(socket_file, "bind", bind_exhausted)
    monkeypatch.setattr(server_module, "_ACCEPT_BACKOFF_S", 0.01)
    monkeypatch.setattr(server_module, "_ACCEPT_BACKOFF_MAX_S", 0.02)
    return failures


async def test_a_failed_accept_is_logged_and_retried_with_a_growing_pause(
    run_dir: str, exhausted: list[int]
) -> None:
    """EMFILE, ENFILE, ENOBUFS, ENOMEM, ECONNABORTED: logged, paused, retried."""
    exhausted += [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM]
    exhausted += [errno.ECONNABORTED]
    cfg = ControlConfig(socket_path=f"{run_dir}/c.sock")
    with capture_logs() as logs:
        async with serving(cfg, FakeHandler()):
            client = ControlClient(cfg.socket_path)
            assert await client.request(StatusRequest()) == {"uptime_s": 1.5}
            assert await client.request(StatusRequest()) == {"uptime_s": 1.5}
    failed = [e for e in logs if e["event"] == "control_accept_failed"]
    assert [e["error"] for e in failed] == [
        "EMFILE",
        "ENFILE",
        "ENOBUFS",
        "ENOMEM",
        "ECONNABORTED",
    ]
    assert [e["retry_in_s"] for e in failed] == [0.01, 0.02, 0.02, 0.02, 0.02]
    assert exhausted == []
