"""The admin control socket: a Unix stream socket answering JSON-line requests.

The server owns the socket file and the connections; what each command
*does* belongs to the composition root, which passes a `ControlHandler`.
Hardening follows RELIABILITY.md §6.3:

- the parent directory is created with mode 0700 when missing, and the
  socket is bound under umask 0177 and then chmod-ed 0600;
- on start, an existing path is replaced only if it is a socket and
  nothing answers on it; a live one means another daemon owns it (these
  two in `broker.control.socket_file`);
- each connection's SO_PEERCRED uid is checked *before* anything is read;
- a line longer than ``max_request_bytes`` is refused and the connection
  closed; every request has a deadline, idle connections are dropped, and
  the number of open connections is bounded;
- one ``control_command`` log line per request: peer, command, outcome,
  never arguments or bodies.
"""

from __future__ import annotations

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
)
from broker.errors import BrokerError
from broker.store import DeadLetterFilter

__all__ = ["ControlHandler", "ControlServer"]

log = structlog.get_logger(__name__)

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


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
        cfg: ``[control]``: socket path, allowed uids, request size limit.
            An empty ``allowed_uids`` admits the daemon's own uid and root;
            a non-empty one admits exactly the uids listed.
        handler: carries out the commands.
        max_connections: open connections beyond this are refused at once.
        request_timeout_s: deadline for the handler to answer one request.
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
        idle_timeout_s: float = 60.0,
    ) -> None:
        self._path = cfg.socket_path
        self._max_request_bytes = cfg.max_request_bytes
        self._allowed = _allowed_uids(cfg.allowed_uids)
        self._handler = handler
        self._max_connections = max_connections
        self._request_timeout_s = request_timeout_s
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
                socket, or binding failed.
        """
        sock, identity = await anyio.to_thread.run_sync(
            socket_file.bind, self._path, self._max_connections
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
                while True:
                    stream = await listener.accept()
                    tg.start_soon(self._connection, stream)
        finally:
            await socket_file.remove_shielded(self._path, identity)

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
                        f"uid {uid} may not use this control socket", "forbidden"
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
        with anyio.move_on_after(self._request_timeout_s):
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
        return Reply.failure(
            f"{command} did not finish within {self._request_timeout_s:g}s", "failed"
        )

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


def _allowed_uids(configured: Iterable[int]) -> frozenset[int]:
    uids = frozenset(configured)
    return uids or frozenset({os.geteuid(), 0})


def _peer_credentials(sock: socket.socket) -> tuple[int, int]:
    """The (uid, pid) of the process that connected, from SO_PEERCRED."""
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
