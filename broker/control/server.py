"""The admin control socket: a Unix stream socket answering JSON-line requests.

The server owns the socket file and the connections; what each command
*does* belongs to the composition root, which passes a `ControlHandler`.
Hardening follows RELIABILITY.md §6.3:

- the parent directory is created with mode 0700 when missing, and the
  socket is bound under umask 0177 and then chmod-ed 0600; with ``[control]
  socket-group`` the socket goes to that group, 0660, and the group is let
  through the directory, so that the uids of ``allowed-uids`` can connect;
- on start, an existing path is replaced only if it is a socket and
  nothing answers on it; a live one means another daemon owns it (these two
  in `broker.control.socket_file`);
- each connection's SO_PEERCRED uid is checked *before* anything is read:
  the daemon's own uid, root and the uids of ``allowed-uids`` are admitted;
- a line longer than ``max_request_bytes`` is refused and the connection
  closed; every request has a deadline (a longer one for the bulk commands
  that act on many rows), idle connections are dropped, and the number of
  open connections is bounded;
- a failed ``accept()`` for want of resources (file descriptors, memory)
  is logged and retried after a short, growing pause: it must not crash
  the server, whose restarts count against the root supervisor's intensity;
- one ``control_command`` log line per request: peer, command, outcome,
  never arguments or bodies.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any, Protocol, assert_never, final

import anyio
import anyio.abc
import structlog
from anyio.abc import SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

from broker.config import ControlConfig
from broker.control import socket_file
from broker.control.protocol import (
    BULK_TIMEOUT_S,
    ActorsRequest,
    DlqListRequest,
    DlqPurgeRequest,
    DlqReplayRequest,
    DlqShowRequest,
    DrainRequest,
    HoldListRequest,
    HoldReleaseRequest,
    OutboxListRequest,
    OutboxPurgeRequest,
    OutboxRetryRequest,
    OutboxShowRequest,
    PauseRequest,
    QueuesRequest,
    Reply,
    Request,
    RequestRefused,
    RestartRequest,
    ResumeRequest,
    StatusRequest,
    TraceRequest,
    XrefFindRequest,
    XrefGetRequest,
    command_name,
    decode_request,
    encode_reply,
    is_bulk,
)
from broker.errors import BrokerError
from broker.store import DeadLetterFilter

__all__ = ["ControlHandler", "ControlServer", "allowed_uids"]

log = structlog.get_logger(__name__)

_PEERCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
#: accept() failures that say "not now" (resources run out, or the peer
#: gave up before we took its connection), not "this socket is broken".
_ACCEPT_TRANSIENT = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED}
)
#: The pause after a transient accept() failure: doubled after each further
#: one, up to the maximum; a successful accept() starts over.
_ACCEPT_BACKOFF_S = 0.1
_ACCEPT_BACKOFF_MAX_S = 1.0


class ControlHandler(Protocol):
    """What the daemon does for each control command (the composition root's part).

    Results must be JSON-ready (dicts, lists, str, int, float, bool, None,
    datetimes). Raise `KeyError` for an unknown id (reply ``not_found``, its
    first argument is the message), `ValueError` for a request that makes
    no sense (``bad_request``), or any `BrokerError` (``failed``, with its
    message).
    """

    async def status(self) -> dict[str, Any]:
        """Daemon health; supervisor and mailbox reprs may appear as strings."""
        ...

    async def actors(self) -> dict[str, Any]:
        """The root node of the supervision tree, shaped like `ActorNode`."""
        ...

    async def dlq_list(self, flt: DeadLetterFilter, /) -> list[dict[str, Any]]:
        """Matching dead letters, newest first (see `dead_letter_view`)."""
        ...

    async def dlq_show(self, id: int, /) -> dict[str, Any]:
        """One dead letter with its body (see `dead_letter_view`)."""
        ...

    async def dlq_replay(
        self, flt: DeadLetterFilter, /, *, dry_run: bool, max_replays: int
    ) -> dict[str, Any]:
        """Replay matching parked dead letters (see `DaemonControl.dlq_replay`)."""
        ...

    async def dlq_purge(self, flt: DeadLetterFilter, /, *, dry_run: bool) -> list[int]:
        """Purge matching dead letters; return the ids (to be) purged."""
        ...

    async def outbox_list(self, limit: int, /) -> list[dict[str, Any]]:
        """Parked outbox rows, newest first (see `parked_outbox_view`)."""
        ...

    async def outbox_show(self, id: int, /) -> dict[str, Any]:
        """One parked outbox row with its body (see `parked_outbox_view`)."""
        ...

    async def outbox_retry(
        self, ids: tuple[int, ...] | None, /, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """Unpark rows (None: all); *by* names the peer (``uid 1000``)."""
        ...

    async def outbox_purge(
        self, ids: tuple[int, ...] | None, /, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """Delete parked rows (None: all); *by* names the peer (``uid 1000``)."""
        ...

    async def hold_list(
        self, workflow: str | None, /, *, limit: int
    ) -> list[dict[str, Any]]:
        """Held workflow instances, longest held first (`broker.store.HoldRow`)."""
        ...

    async def hold_release(
        self, workflow: str, correlation_id: str, /
    ) -> dict[str, Any]:
        """Hand one instance's hold on; report its new blocker (null: it is free)."""
        ...

    async def drain(self) -> dict[str, Any]:
        """Stop intake and report what is still in flight."""
        ...

    async def restart(self, actor_id: str, /) -> dict[str, Any]:
        """Restart one actor or subtree; report its new state."""
        ...

    async def trace(self, correlation_id: str, /) -> dict[str, Any]:
        """The journal and workflow state of one correlation id."""
        ...

    async def xref_get(self, kind: str, canonical_id: str, /) -> list[dict[str, Any]]:
        """Every system's xref entry for one canonical id, by system (maybe none)."""
        ...

    async def xref_find(
        self, kind: str, system: str, native_id: str, /
    ) -> dict[str, Any]:
        """The xref entry binding one native id; `KeyError` when there is none."""
        ...

    async def queues(self) -> dict[str, Any]:
        """The ``q2c.*`` queues with their counts (`broker.transport.management`)."""
        ...

    async def pause(self, system: str, reason: str, /, *, by: str) -> dict[str, Any]:
        """Pause one system; *by* names the peer (``uid 1000``). `KeyError`: unknown."""
        ...

    async def resume(self, system: str, /, *, by: str) -> dict[str, Any]:
        """End one system's pause (``resumed`` false: it was not paused)."""
        ...


@final
class ControlServer:
    """Serve the control socket until cancelled; run it as a supervised child.

    Args:
        cfg: ``[control]``: socket path, allowed uids, socket group, request
            size limit. The daemon's own uid and root are always admitted,
            the uids of ``allowed_uids`` besides them.
        handler: carries out the commands.
        max_connections: open connections beyond this are refused at once.
        request_timeout_s: deadline for the handler to answer one request.
        bulk_timeout_s: the deadline instead for the commands that act on
            many rows (`broker.control.protocol.is_bulk`): an outbox retry
            or purge of ``all`` works through every parked row, a thousand
            at a time, and must not be cut off half-way by the short one.
        idle_timeout_s: a connection that sends no complete line for this
            long is closed.
    """

    def __init__(
        self,
        cfg: ControlConfig,
        handler: ControlHandler,
        *,
        max_connections: int = 16,
        request_timeout_s: float = 30.0,
        bulk_timeout_s: float = BULK_TIMEOUT_S,
        idle_timeout_s: float = 60.0,
    ) -> None:
        self._path = cfg.socket_path
        self._group = cfg.socket_group
        self._max_request_bytes = cfg.max_request_bytes
        self._allowed = allowed_uids(cfg.allowed_uids)
        self._handler = handler
        self._max_connections = max_connections
        self._request_timeout_s = request_timeout_s
        self._bulk_timeout_s = bulk_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._connections = 0

    def __repr__(self) -> str:
        return (
            f"<ControlServer {self._path} "
            f"{self._connections}/{self._max_connections} connections>"
        )

    async def serve(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Bind, report started, accept connections until cancelled.

        The socket file is removed on exit, unless another process has
        replaced it in the meantime.

        Raises:
            ControlError: the path is held by a live daemon or is not a
                socket, the socket group is unknown or not ours to give,
                or binding failed.
        """
        sock, identity = await anyio.to_thread.run_sync(
            socket_file.bind, self._path, self._max_connections, self._group
        )
        try:
            listener = await anyio.abc.SocketListener.from_socket(sock)
        except BaseException:
            sock.close()
            await socket_file.remove_shielded(self._path, identity)
            raise
        try:
            async with listener, anyio.create_task_group() as tg:
                log.info("control_socket_bound", path=self._path)
                task_status.started()
                await self._accept_forever(listener, tg)
        finally:
            await socket_file.remove_shielded(self._path, identity)

    async def _accept_forever(
        self, listener: anyio.abc.SocketListener, tg: anyio.abc.TaskGroup
    ) -> None:
        """Accept connections; ride out accept() failures for want of resources.

        With the file descriptors used up (EMFILE), accept() fails at once
        and the connection stays queued: retrying at once would spin, and
        crashing would only restart the server into the same state. So
        pause, longer each time up to a second, and try again.
        """
        backoff_s = _ACCEPT_BACKOFF_S
        while True:
            try:
                stream = await listener.accept()
            except (OSError, anyio.BrokenResourceError) as exc:
                cause = _transient_accept_error(exc)
                if cause is None:
                    raise
                log.warning(
                    "control_accept_failed",
                    error=errno.errorcode.get(cause.errno or 0, str(cause.errno)),
                    detail=cause.strerror,
                    retry_in_s=backoff_s,
                )
                await anyio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, _ACCEPT_BACKOFF_MAX_S)
                continue
            backoff_s = _ACCEPT_BACKOFF_S
            tg.start_soon(self._connection, stream)

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            uid, pid = _peer_credentials(stream.extra(SocketAttribute.raw_socket))
            if uid not in self._allowed:
                log.warning(
                    "control_peer_refused", peer_uid=uid, peer_pid=pid, reason="uid"
                )
                await self._send(
                    stream,
                    Reply.failure(
                        f"uid {uid} may not use this control socket: the daemon "
                        "admits its own uid, root and [control] allowed-uids",
                        "forbidden",
                    ),
                )
                return
            if self._connections >= self._max_connections:
                log.warning(
                    "control_peer_refused",
                    peer_uid=uid,
                    peer_pid=pid,
                    reason="connection_limit",
                )
                await self._send(
                    stream,
                    Reply.failure(
                        f"too many control connections (max {self._max_connections})",
                        "failed",
                    ),
                )
                return
            self._connections += 1
            try:
                await self._converse(stream, uid, pid)
            finally:
                self._connections -= 1

    async def _converse(
        self, stream: anyio.abc.SocketStream, uid: int, pid: int
    ) -> None:
        """Answer requests on one connection until EOF, idleness or a fatal error."""
        lines = BufferedByteReceiveStream(stream)
        while True:
            try:
                line = await self._read_line(lines)
            except RequestRefused as exc:  # too large: the rest of the line is junk
                _log_command(uid, pid, "?", exc.code, 0.0)
                await self._send(stream, Reply.failure(str(exc), exc.code))
                return
            if line is None:
                return
            if not line.strip():
                continue
            started = time.monotonic()
            command = "?"
            try:
                req = decode_request(line)
            except RequestRefused as exc:
                reply = Reply.failure(str(exc), exc.code)
            else:
                command = command_name(req)
                reply = await self._execute(req, command, uid)
            data, outcome = _encode(reply, command)
            _log_command(uid, pid, command, outcome, time.monotonic() - started)
            if not await self._send_bytes(stream, data):
                return

    async def _read_line(self, lines: BufferedByteReceiveStream) -> bytes | None:
        """The next request line; None on EOF, a dropped peer or idleness.

        Raises:
            RequestRefused: ``too_large``, the line exceeds the limit.
        """
        limit = self._max_request_bytes
        too_large = RequestRefused(
            f"request line longer than {limit} bytes", code="too_large"
        )
        with anyio.move_on_after(self._idle_timeout_s):
            try:
                line = await lines.receive_until(b"\n", limit)
            except anyio.DelimiterNotFound as exc:
                raise too_large from exc
            except (anyio.IncompleteRead, anyio.BrokenResourceError):
                return None
            if len(line) > limit:  # one read can overshoot the limit
                raise too_large
            return line
        return None

    async def _execute(self, req: Request, command: str, uid: int) -> Reply:
        """Run one request under its deadline and map failures to error codes."""
        bulk = is_bulk(req)
        deadline_s = self._bulk_timeout_s if bulk else self._request_timeout_s
        with anyio.move_on_after(deadline_s):
            try:
                return Reply(ok=True, result=await self._dispatch(req, uid))
            except KeyError as exc:
                return Reply.failure(_first_arg(exc, "not found"), "not_found")
            except ValueError as exc:
                return Reply.failure(_first_arg(exc, "bad request"), "bad_request")
            except BrokerError as exc:
                return Reply.failure(str(exc) or type(exc).__name__, "failed")
            except Exception as exc:
                # A handler bug must not take the socket down: restarting the
                # control server would not fix the handler, and each crash
                # would count against the root supervisor's intensity.
                log.exception("control_command_crashed", command=command)
                return Reply.failure(
                    f"internal error: {type(exc).__name__}: {exc}", "failed"
                )
        late = f"{command} did not finish within {deadline_s:g}s"
        if bulk:
            # Outbox rows are done a thousand per commit, dead letters in one
            # transaction: either way, what was committed stays, and a rerun
            # acts on what is left (rows done are no longer parked).
            late += (
                "; what it committed before then stays done: list what is left "
                "and run it again for the rest"
            )
        return Reply.failure(late, "failed")

    async def _dispatch(self, req: Request, uid: int) -> Any:
        handler = self._handler
        match req:
            case StatusRequest():
                return await handler.status()
            case ActorsRequest():
                return await handler.actors()
            case DlqListRequest():
                return await handler.dlq_list(req.to_filter())
            case DlqShowRequest(id=letter_id):
                return await handler.dlq_show(letter_id)
            case DlqReplayRequest(dry_run=dry_run, max_replays=max_replays):
                return await handler.dlq_replay(
                    req.to_filter(), dry_run=dry_run, max_replays=max_replays
                )
            case DlqPurgeRequest(dry_run=dry_run):
                return await handler.dlq_purge(req.to_filter(), dry_run=dry_run)
            case OutboxListRequest(limit=limit):
                return await handler.outbox_list(limit)
            case OutboxShowRequest(id=row_id):
                return await handler.outbox_show(row_id)
            case OutboxRetryRequest(dry_run=dry_run):
                return await handler.outbox_retry(
                    req.selected(), dry_run=dry_run, by=f"uid {uid}"
                )
            case OutboxPurgeRequest(dry_run=dry_run):
                return await handler.outbox_purge(
                    req.selected(), dry_run=dry_run, by=f"uid {uid}"
                )
            case HoldListRequest(workflow=workflow, limit=limit):
                return await handler.hold_list(workflow, limit=limit)
            case HoldReleaseRequest(workflow=workflow, correlation_id=correlation_id):
                return await handler.hold_release(workflow, correlation_id)
            case DrainRequest():
                return await handler.drain()
            case RestartRequest(actor_id=actor_id):
                return await handler.restart(actor_id)
            case TraceRequest(correlation_id=correlation_id):
                return await handler.trace(correlation_id)
            case XrefGetRequest(kind=kind, canonical_id=canonical_id):
                return await handler.xref_get(kind, canonical_id)
            case XrefFindRequest(kind=kind, system=system, native_id=native_id):
                return await handler.xref_find(kind, system, native_id)
            case QueuesRequest():
                return await handler.queues()
            case PauseRequest(system=system, reason=reason):
                return await handler.pause(system, reason, by=f"uid {uid}")
            case ResumeRequest(system=system):
                return await handler.resume(system, by=f"uid {uid}")
            case _:
                assert_never(req)

    async def _send(self, stream: anyio.abc.SocketStream, reply: Reply) -> None:
        await self._send_bytes(stream, _encode(reply, "?")[0])

    async def _send_bytes(self, stream: anyio.abc.SocketStream, data: bytes) -> bool:
        """Write one reply; False if the peer is gone or does not read in time."""
        with anyio.move_on_after(self._request_timeout_s):
            try:
                await stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return False
            return True
        return False


def allowed_uids(configured: Iterable[int]) -> frozenset[int]:
    """The peer uids admitted: the daemon's own, root's, and *configured*.

    ``[control] allowed-uids`` adds to the first two, never replaces them:
    listing an operator's uid must not lock out the daemon's own user.
    """
    return frozenset({os.geteuid(), 0, *configured})


def _transient_accept_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed accept() if it is worth retrying, else None.

    AnyIO's asyncio backend raises `anyio.BrokenResourceError` from the
    OSError; a raw OSError is taken as well.
    """
    cause = exc.__cause__ if isinstance(exc, anyio.BrokenResourceError) else exc
    if isinstance(cause, OSError) and cause.errno in _ACCEPT_TRANSIENT:
        return cause
    return None


def _peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """The (uid, pid) of the process that connected, from SO_PEERCRED.

    uid_t is unsigned: a uid above 2**31 (user namespaces, some directory
    services) must not come out negative.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return uid, pid


def _first_arg(exc: Exception, default: str) -> str:
    # str(KeyError("x")) is "'x'", so use the argument itself.
    return str(exc.args[0]) if exc.args else default


def _encode(reply: Reply, command: str) -> tuple[bytes, str]:
    """The reply's line and its outcome for the log (``ok`` or the error code)."""
    try:
        return encode_reply(reply), "ok" if reply.ok else (reply.code or "failed")
    except TypeError as exc:
        log.exception("control_reply_unencodable", command=command)
        failure = Reply.failure(f"the result could not be encoded: {exc}", "failed")
        return encode_reply(failure), "failed"


def _log_command(
    uid: int, pid: int, command: str, outcome: str, elapsed_s: float
) -> None:
    log.info(
        "control_command",
        peer_uid=uid,
        peer_pid=pid,
        command=command,
        outcome=outcome,
        duration_ms=round(elapsed_s * 1000, 3),
    )
