"""The control socket: wire protocol, the server's hardening, and the client."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import msgspec
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from structlog.testing import capture_logs

from broker.config import ControlConfig
from broker.control import server as server_module
from broker.control.client import ControlClient, DaemonUnreachable
from broker.control.protocol import (
    ActorsRequest,
    DlqListRequest,
    DlqPurgeRequest,
    DlqReplayRequest,
    DlqShowRequest,
    DrainRequest,
    HoldListRequest,
    HoldReleaseRequest,
    OutboxPurgeRequest,
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
    dead_letter_view,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)
from broker.control.server import ControlServer
from broker.errors import ControlError, SupervisorGaveUp
from broker.store import DeadLetterFilter, DeadLetterRow, HoldRefused

pytestmark = pytest.mark.anyio

SAMPLES: list[Request] = [
    StatusRequest(),
    ActorsRequest(),
    DlqListRequest(reason="malformed", status=None, limit=5),
    DlqShowRequest(id=7),
    DlqReplayRequest(ids=(1, 2), dry_run=True, max_replays=2),
    DlqReplayRequest(all=True),
    DlqPurgeRequest(queue="q2c.erp", type="order.placed"),
    HoldListRequest(),
    HoldListRequest(workflow="deal", limit=5),
    HoldReleaseRequest(workflow="deal", correlation_id="deal-42"),
    DrainRequest(),
    RestartRequest(actor_id="erp.order_sync"),
    TraceRequest(correlation_id="deal-42"),
    XrefGetRequest(kind="order", canonical_id="order-42"),
    XrefFindRequest(kind="account", system="erp_cloud", native_id="1000123"),
    QueuesRequest(),
    PauseRequest(system="erp_cloud", reason="S/4 upgrade, ticket CHG-1234"),
    PauseRequest(system="crm"),
    ResumeRequest(system="erp_cloud"),
]


# -- protocol -------------------------------------------------------------------


@pytest.mark.parametrize("req", SAMPLES, ids=repr)
def test_every_request_round_trips_as_one_line(req: Request) -> None:
    """Encoding then decoding gives the same request, on exactly one line."""
    line = encode_request(req)
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode_request(line) == req


def test_an_unknown_command_is_refused_as_such() -> None:
    """An unknown ``cmd`` gets ``unknown_command``, listing the known ones."""
    with pytest.raises(RequestRefused, match="unknown command 'reboot'") as caught:
        decode_request(b'{"cmd": "reboot"}')
    assert caught.value.code == "unknown_command"
    assert "dlq_list" in str(caught.value)


def test_an_unknown_field_is_a_bad_request() -> None:
    """A mistyped field fails loudly instead of being ignored."""
    with pytest.raises(RequestRefused, match="unknown field `reasn`") as caught:
        decode_request(b'{"cmd": "dlq_list", "reasn": "malformed"}')
    assert caught.value.code == "bad_request"


@pytest.mark.parametrize(
    "line",
    [
        b"{not json",
        b"[1, 2]",
        b'{"cmd": 3}',
        b"{}",
        b'{"cmd": "dlq_show", "id": 0}',
        b'{"cmd": "dlq_list", "limit": 100000}',
        b'{"cmd": "restart", "actor_id": ""}',
        b'{"cmd": "hold_list", "limit": 0}',
        b'{"cmd": "hold_release", "workflow": "deal"}',
        b'{"cmd": "hold_release", "workflow": "", "correlation_id": "deal-42"}',
        b'{"cmd": "xref_get", "kind": "order"}',
        b'{"cmd": "xref_get", "kind": "Order", "canonical_id": "order-42"}',
        b'{"cmd": "xref_get", "kind": "order", "canonical_id": ""}',
        b'{"cmd": "xref_find", "kind": "order", "system": "erp_cloud"}',
        b'{"cmd": "xref_find", "kind": "", "system": "crm", "native_id": "1"}',
        b'{"cmd": "xref_find", "kind": "order", "system": "", "native_id": "1"}',
        b'{"cmd": "queues", "vhost": "/"}',
        b'{"cmd": "pause"}',
        b'{"cmd": "pause", "system": ""}',
        b'{"cmd": "pause", "system": "ERP Cloud"}',
        b'{"cmd": "pause", "system": "erp", "reason": 3}',
        b'{"cmd": "pause", "system": "erp", "reasn": "typo"}',
        b'{"cmd": "resume"}',
        b'{"cmd": "resume", "system": "erp", "reason": "x"}',
    ],
)
def test_malformed_or_invalid_requests_are_bad_requests(line: bytes) -> None:
    """Invalid JSON, wrong shapes and out-of-range values are ``bad_request``."""
    with pytest.raises(RequestRefused) as caught:
        decode_request(line)
    assert caught.value.code == "bad_request"


@pytest.mark.parametrize("cmd", ["dlq_replay", "dlq_purge"])
def test_unfiltered_replay_or_purge_is_refused(cmd: str) -> None:
    """Acting on every dead letter needs ids, a filter, or an explicit all=true."""
    with pytest.raises(RequestRefused, match="refusing to") as caught:
        decode_request(f'{{"cmd": "{cmd}", "dry_run": true}}'.encode())
    assert caught.value.code == "bad_request"
    everything = decode_request(f'{{"cmd": "{cmd}", "all": true}}'.encode())
    assert isinstance(everything, DlqReplayRequest | DlqPurgeRequest)
    assert everything.all
    by_id = decode_request(f'{{"cmd": "{cmd}", "ids": [3]}}'.encode())
    assert isinstance(by_id, DlqReplayRequest | DlqPurgeRequest)
    assert by_id.ids == (3,)
    with pytest.raises(ValueError, match="refusing to replay"):
        DlqReplayRequest(status="replayed")


def test_a_selection_becomes_the_store_filter() -> None:
    """Request fields map one to one onto DeadLetterFilter; null status means any."""
    req = decode_request(
        b'{"cmd": "dlq_replay", "ids": [4], "queue": "q", "status": null, "limit": 9}'
    )
    assert isinstance(req, DlqReplayRequest)
    assert req.to_filter() == DeadLetterFilter(
        ids=(4,), queue="q", status=None, limit=9
    )
    assert DlqListRequest().to_filter() == DeadLetterFilter()


def test_replies_have_the_documented_shape() -> None:
    """Success carries ok and result only; failure carries ok, error and code."""
    ok = encode_reply(Reply(ok=True, result={"n": 1}))
    assert ok == b'{"ok":true,"result":{"n":1}}\n'
    failed = encode_reply(Reply.failure("no such actor", "not_found"))
    assert failed == b'{"ok":false,"error":"no such actor","code":"not_found"}\n'
    newer = decode_reply(b'{"ok": true, "result": 1, "warnings": []}')
    assert newer == Reply(ok=True, result=1)


def test_dead_letter_view_keeps_bodies_out_of_listings() -> None:
    """Listings omit body and headers; show gives text, or base64 for binary."""
    at = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    row = DeadLetterRow(
        id=1,
        message_id="m-1",
        queue="q2c.erp",
        routing_key="order.placed",
        reason="malformed",
        detail="bad json",
        body=b"\xff\x00",
        headers={"x": 1},
        attempts=2,
        correlation_id=None,
        type=None,
        status="parked",
        replays=0,
        first_seen=at,
        last_seen=at,
    )
    listed = dead_letter_view(row)
    assert "body" not in listed
    assert "headers" not in listed
    assert listed["last_seen"] == "2024-05-01T12:00:00Z"
    shown = dead_letter_view(row, body=True)
    assert shown["body_b64"] == "/wA="
    assert shown["headers"] == {"x": 1}
    text = msgspec.structs.replace(row, body=b'{"a": 1}')
    assert dead_letter_view(text, body=True)["body"] == '{"a": 1}'


# -- server ---------------------------------------------------------------------


class FakeHandler:
    """Records calls and answers canned results; ``restart`` ids trigger failures."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def status(self) -> dict[str, Any]:
        """Canned health."""
        self.calls.append(("status", None))
        return {"uptime_s": 1.5}

    async def actors(self) -> dict[str, Any]:
        """A one-node tree."""
        self.calls.append(("actors", None))
        return {"id": "root", "kind": "supervisor", "children": []}

    async def dlq_list(self, flt: DeadLetterFilter, /) -> list[dict[str, Any]]:
        """One canned letter."""
        self.calls.append(("dlq_list", flt))
        return [{"id": 1, "reason": "malformed"}]

    async def dlq_show(self, id: int, /) -> dict[str, Any]:
        """The letter, or KeyError for id 404."""
        self.calls.append(("dlq_show", id))
        if id == 404:
            raise KeyError(f"no dead letter with id {id}")
        return {"id": id, "body": "{}"}

    async def dlq_replay(
        self, flt: DeadLetterFilter, /, *, dry_run: bool, max_replays: int
    ) -> dict[str, Any]:
        """The ids asked for."""
        self.calls.append(("dlq_replay", (flt, dry_run, max_replays)))
        return {"replayed": list(flt.ids), "skipped": [], "matched": len(flt.ids)}

    async def dlq_purge(self, flt: DeadLetterFilter, /, *, dry_run: bool) -> list[int]:
        """A canned id."""
        self.calls.append(("dlq_purge", (flt, dry_run)))
        return [9]

    async def outbox_list(self, limit: int, /) -> list[dict[str, Any]]:
        """One canned parked row."""
        self.calls.append(("outbox_list", limit))
        return [{"id": 3, "reason": "unroutable (returned by the broker)"}]

    async def outbox_show(self, id: int, /) -> dict[str, Any]:
        """The row, body included."""
        self.calls.append(("outbox_show", id))
        return {"id": id, "body": "{}"}

    async def outbox_retry(
        self, ids: tuple[int, ...] | None, /, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """The ids asked for."""
        self.calls.append(("outbox_retry", (ids, dry_run, by)))
        return {"retried": list(ids or ()), "skipped": []}

    async def outbox_purge(
        self, ids: tuple[int, ...] | None, /, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """The ids asked for."""
        self.calls.append(("outbox_purge", (ids, dry_run, by)))
        return {"purged": list(ids or ()), "skipped": []}

    async def hold_list(
        self, workflow: str | None, /, *, limit: int
    ) -> list[dict[str, Any]]:
        """One canned hold."""
        self.calls.append(("hold_list", (workflow, limit)))
        return [{"workflow": "deal", "correlation_id": "deal-1", "held": 2}]

    async def hold_release(
        self, workflow: str, correlation_id: str, /
    ) -> dict[str, Any]:
        """The new blocker, or the store's refusals chosen by the correlation id."""
        self.calls.append(("hold_release", (workflow, correlation_id)))
        match correlation_id:
            case "free":
                raise KeyError(f"instance 'free' of workflow {workflow!r} is not held")
            case "parked":
                raise HoldRefused("its blocker is parked", reason="blocker_parked")
        return {"workflow": workflow, "correlation_id": correlation_id, "blocker": "m2"}

    async def drain(self) -> dict[str, Any]:
        """Nothing in flight."""
        self.calls.append(("drain", None))
        return {"in_flight": 0}

    async def restart(self, actor_id: str, /) -> dict[str, Any]:
        """Running, or a failure chosen by the actor id."""
        self.calls.append(("restart", actor_id))
        match actor_id:
            case "missing":
                raise KeyError("no actor 'missing'")
            case "root":
                raise ValueError("the root cannot be restarted")
            case "erp":
                raise SupervisorGaveUp("erp", "erp.sync", RuntimeError("boom"))
            case "buggy":
                raise RuntimeError("handler bug")
            case "hang":
                await anyio.Event().wait()
            case "odd":
                return {"value": object()}
        return {"id": actor_id, "state": "running"}

    async def trace(self, correlation_id: str, /) -> dict[str, Any]:
        """An empty journal."""
        self.calls.append(("trace", correlation_id))
        return {"correlation_id": correlation_id, "journal": []}

    async def xref_get(self, kind: str, canonical_id: str, /) -> list[dict[str, Any]]:
        """One system's entry."""
        self.calls.append(("xref_get", (kind, canonical_id)))
        return [{"system": "crm", "native_id": "006A"}]

    async def xref_find(
        self, kind: str, system: str, native_id: str, /
    ) -> dict[str, Any]:
        """The entry, or KeyError for native id ``unknown``."""
        self.calls.append(("xref_find", (kind, system, native_id)))
        if native_id == "unknown":
            raise KeyError(f"no {kind} is known by {system} id {native_id!r}")
        return {"canonical_id": "order-1", "native_id": native_id}

    async def queues(self) -> dict[str, Any]:
        """No queues."""
        self.calls.append(("queues", None))
        return {"transport": "memory", "vhost": None, "queues": []}

    async def pause(self, system: str, reason: str, /, *, by: str) -> dict[str, Any]:
        """Paused, or KeyError for system ``nope``."""
        self.calls.append(("pause", (system, reason, by)))
        if system == "nope":
            raise KeyError(f"unknown system {system!r} (configured: crm, erp)")
        return {"paused": True, "system": system, "reason": reason}

    async def resume(self, system: str, /, *, by: str) -> dict[str, Any]:
        """Not paused."""
        self.calls.append(("resume", (system, by)))
        return {"system": system, "resumed": False}


@pytest.fixture
def run_dir() -> Iterator[str]:
    """A short temporary directory (AF_UNIX paths are limited to 108 bytes)."""
    path = tempfile.mkdtemp(prefix="ctl", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cfg(run_dir: str) -> ControlConfig:
    return ControlConfig(socket_path=f"{run_dir}/run/brokerd.sock")


@asynccontextmanager
async def serving(
    cfg: ControlConfig, handler: FakeHandler, **options: Any
) -> AsyncIterator[ControlServer]:
    server = ControlServer(cfg, handler, **options)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            yield server
            tg.cancel_scope.cancel()


async def exchange(path: str, payload: bytes) -> list[Reply]:
    """Send raw bytes on one connection, half-close, and read every reply line."""
    replies: list[Reply] = []
    async with await anyio.connect_unix(path) as stream:
        if payload:
            await stream.send(payload)
            await stream.send_eof()
        lines = BufferedByteReceiveStream(stream)
        while True:
            try:
                replies.append(decode_reply(await lines.receive_until(b"\n", 1 << 20)))
            except (anyio.IncompleteRead, anyio.BrokenResourceError):
                return replies


EXPECTED_CALLS: list[tuple[Request, tuple[str, Any], Any]] = [
    (StatusRequest(), ("status", None), {"uptime_s": 1.5}),
    (
        ActorsRequest(),
        ("actors", None),
        {"id": "root", "kind": "supervisor", "children": []},
    ),
    (
        DlqListRequest(type="order.placed"),
        ("dlq_list", DeadLetterFilter(type="order.placed")),
        [{"id": 1, "reason": "malformed"}],
    ),
    (DlqShowRequest(id=3), ("dlq_show", 3), {"id": 3, "body": "{}"}),
    (
        DlqReplayRequest(ids=(5, 6), dry_run=True, max_replays=1),
        ("dlq_replay", (DeadLetterFilter(ids=(5, 6)), True, 1)),
        {"replayed": [5, 6], "skipped": [], "matched": 2},
    ),
    (
        DlqPurgeRequest(reason="oversize"),
        ("dlq_purge", (DeadLetterFilter(reason="oversize"), False)),
        [9],
    ),
    (
        HoldListRequest(workflow="deal"),
        ("hold_list", ("deal", 1000)),
        [{"workflow": "deal", "correlation_id": "deal-1", "held": 2}],
    ),
    (
        HoldReleaseRequest(workflow="deal", correlation_id="deal-1"),
        ("hold_release", ("deal", "deal-1")),
        {"workflow": "deal", "correlation_id": "deal-1", "blocker": "m2"},
    ),
    (DrainRequest(), ("drain", None), {"in_flight": 0}),
    (
        RestartRequest(actor_id="erp.sync"),
        ("restart", "erp.sync"),
        {"id": "erp.sync", "state": "running"},
    ),
    (
        TraceRequest(correlation_id="deal-1"),
        ("trace", "deal-1"),
        {"correlation_id": "deal-1", "journal": []},
    ),
    (
        XrefGetRequest(kind="opportunity", canonical_id="opp-006A"),
        ("xref_get", ("opportunity", "opp-006A")),
        [{"system": "crm", "native_id": "006A"}],
    ),
    (
        XrefFindRequest(kind="order", system="erp_cloud", native_id="4711"),
        ("xref_find", ("order", "erp_cloud", "4711")),
        {"canonical_id": "order-1", "native_id": "4711"},
    ),
    (
        QueuesRequest(),
        ("queues", None),
        {"transport": "memory", "vhost": None, "queues": []},
    ),
    (
        PauseRequest(system="erp", reason="upgrade"),
        ("pause", ("erp", "upgrade", f"uid {os.geteuid()}")),
        {"paused": True, "system": "erp", "reason": "upgrade"},
    ),
    (
        ResumeRequest(system="erp"),
        ("resume", ("erp", f"uid {os.geteuid()}")),
        {"system": "erp", "resumed": False},
    ),
]


@pytest.mark.parametrize(("req", "call", "result"), EXPECTED_CALLS, ids=repr)
async def test_each_command_reaches_its_handler_method(
    cfg: ControlConfig, req: Request, call: tuple[str, Any], result: Any
) -> None:
    """Every command calls the matching handler method and returns its result."""
    handler = FakeHandler()
    async with serving(cfg, handler):
        assert await ControlClient(cfg.socket_path).request(req) == result
    assert handler.calls == [call]


@pytest.mark.parametrize(
    ("actor_id", "code", "message"),
    [
        ("missing", "not_found", "^no actor 'missing'$"),
        ("root", "bad_request", "^the root cannot be restarted$"),
        ("erp", "failed", "supervisor 'erp' gave up"),
        ("buggy", "failed", "internal error: RuntimeError: handler bug"),
        ("odd", "failed", "could not be encoded"),
    ],
)
async def test_handler_errors_become_error_codes(
    cfg: ControlConfig, actor_id: str, code: str, message: str
) -> None:
    """KeyError, ValueError, BrokerError and bugs map to codes; the server survives."""
    async with serving(cfg, FakeHandler()):
        client = ControlClient(cfg.socket_path)
        with pytest.raises(RequestRefused, match=message) as caught:
            await client.request(RestartRequest(actor_id=actor_id))
        assert caught.value.code == code
        assert await client.request(StatusRequest()) == {"uptime_s": 1.5}


@pytest.mark.parametrize(
    ("correlation_id", "code", "message"),
    [
        ("free", "not_found", "^instance 'free' of workflow 'deal' is not held$"),
        ("parked", "bad_request", "^its blocker is parked$"),
    ],
)
async def test_a_refused_hold_release_is_an_error_reply(
    cfg: ControlConfig, correlation_id: str, code: str, message: str
) -> None:
    """An instance not held is ``not_found``; a parked blocker is ``bad_request``."""
    async with serving(cfg, FakeHandler()):
        with pytest.raises(RequestRefused, match=message) as caught:
            await ControlClient(cfg.socket_path).request(
                HoldReleaseRequest(workflow="deal", correlation_id=correlation_id)
            )
    assert caught.value.code == code


async def test_an_unknown_native_id_is_not_found(cfg: ControlConfig) -> None:
    """An xref_find for a native id nobody bound replies ``not_found``."""
    async with serving(cfg, FakeHandler()):
        with pytest.raises(RequestRefused) as caught:
            await ControlClient(cfg.socket_path).request(
                XrefFindRequest(kind="order", system="erp_cloud", native_id="unknown")
            )
    assert caught.value.code == "not_found"
    assert str(caught.value) == "no order is known by erp_cloud id 'unknown'"


async def test_pausing_an_unknown_system_is_not_found(cfg: ControlConfig) -> None:
    """The handler's refusal of an unconfigured system replies ``not_found``."""
    async with serving(cfg, FakeHandler()):
        with pytest.raises(RequestRefused) as caught:
            await ControlClient(cfg.socket_path).request(PauseRequest(system="nope"))
    assert caught.value.code == "not_found"
    assert str(caught.value) == "unknown system 'nope' (configured: crm, erp)"


async def test_a_request_past_its_deadline_fails(cfg: ControlConfig) -> None:
    """A handler that does not answer in time yields ``failed``, not a hang."""
    async with serving(cfg, FakeHandler(), request_timeout_s=0.05):
        with pytest.raises(RequestRefused, match=r"did not finish within 0\.05s"):
            await ControlClient(cfg.socket_path).request(
                RestartRequest(actor_id="hang")
            )


class SlowPurge(FakeHandler):
    """An outbox purge that runs until ``finish`` is set, like one of many chunks."""

    def __init__(self) -> None:
        super().__init__()
        self.started = anyio.Event()
        self.finish = anyio.Event()

    async def outbox_purge(
        self, ids: tuple[int, ...] | None, /, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """Purges rows 1 to 3000 once released."""
        self.started.set()
        await self.finish.wait()
        return {"purged": list(range(1, 3001)), "skipped": []}


async def test_a_bulk_command_outlives_the_request_deadline(cfg: ControlConfig) -> None:
    """``outbox purge --all`` runs past request_timeout_s; other requests do not.

    The purge starts first; a hanging restart sent after it gets past its
    deadline, so the purge has been running longer than that deadline too.
    """
    handler = SlowPurge()
    async with serving(cfg, handler, request_timeout_s=0.05):
        client = ControlClient(cfg.socket_path)
        async with anyio.create_task_group() as tg:
            purged: list[Any] = []

            async def purge() -> None:
                purged.append(await client.request(OutboxPurgeRequest(all=True)))

            tg.start_soon(purge)
            await handler.started.wait()
            with pytest.raises(RequestRefused, match=r"did not finish within 0\.05s"):
                await client.request(RestartRequest(actor_id="hang"))
            handler.finish.set()
    assert purged == [{"purged": list(range(1, 3001)), "skipped": []}]


async def test_a_bulk_command_past_its_deadline_says_what_stays_done(
    cfg: ControlConfig,
) -> None:
    """Cut off by bulk_timeout_s, the reply says what stays done and how to go on."""
    async with serving(cfg, SlowPurge(), bulk_timeout_s=0.05):
        with pytest.raises(RequestRefused) as caught:
            await ControlClient(cfg.socket_path).request(OutboxPurgeRequest(all=True))
    assert str(caught.value) == (
        "outbox_purge did not finish within 0.05s; what it committed before then "
        "stays done: list what is left and run it again for the rest"
    )


async def test_one_connection_carries_many_lines_like_socat(cfg: ControlConfig) -> None:
    """Each line on one connection gets a reply, in order; blank lines are skipped."""
    payload = b'{"cmd": "status"}\n\n{"cmd": "reboot"}\n{"cmd": "drain", "x": 1}\n'
    async with serving(cfg, FakeHandler()):
        replies = await exchange(cfg.socket_path, payload)
    assert [(r.ok, r.code) for r in replies] == [
        (True, None),
        (False, "unknown_command"),
        (False, "bad_request"),
    ]


async def test_an_oversize_line_is_refused_and_the_connection_closed(
    run_dir: str,
) -> None:
    """A line over max_request_bytes gets ``too_large``; later lines are not read."""
    cfg = ControlConfig(socket_path=f"{run_dir}/c.sock", max_request_bytes=1024)
    handler = FakeHandler()
    payload = b'{"cmd": "status", "pad": "' + b"x" * 4096 + b'"}\n{"cmd": "drain"}\n'
    async with serving(cfg, handler):
        replies = await exchange(cfg.socket_path, payload)
    assert replies == [
        Reply.failure("request line longer than 1024 bytes", "too_large")
    ]
    assert handler.calls == []


async def test_the_socket_is_private(run_dir: str, cfg: ControlConfig) -> None:
    """A missing parent directory is made 0700, and the socket is 0600."""
    async with serving(cfg, FakeHandler()):
        sock_mode = os.stat(cfg.socket_path).st_mode
        dir_mode = os.stat(f"{run_dir}/run").st_mode
    assert stat.S_ISSOCK(sock_mode)
    assert stat.S_IMODE(sock_mode) == 0o600
    assert stat.S_IMODE(dir_mode) == 0o700


async def test_the_socket_file_is_removed_on_exit(cfg: ControlConfig) -> None:
    """Cancelling the server removes the socket it created."""
    async with serving(cfg, FakeHandler()):
        assert await anyio.Path(cfg.socket_path).exists()
    assert not await anyio.Path(cfg.socket_path).exists()


def _leave_stale_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(path)  # bound, never listening: what a killed daemon leaves


async def test_a_stale_socket_is_replaced(cfg: ControlConfig) -> None:
    """A socket file nobody answers on is removed and the server binds anew."""
    _leave_stale_socket(cfg.socket_path)
    with capture_logs() as logs:
        async with serving(cfg, FakeHandler()):
            assert await ControlClient(cfg.socket_path).request(StatusRequest())
    assert any(e["event"] == "control_stale_socket_removed" for e in logs)


async def test_a_live_socket_is_not_taken_over(cfg: ControlConfig) -> None:
    """A second server on the same path fails, and the first keeps serving."""
    async with serving(cfg, FakeHandler()):
        second = ControlServer(cfg, FakeHandler())
        with pytest.raises(ControlError, match="another daemon is listening on"):
            await second.serve()
        assert await ControlClient(cfg.socket_path).request(StatusRequest())


async def test_a_path_that_is_not_a_socket_is_left_alone(run_dir: str) -> None:
    """An ordinary file at the socket path is an error, not something to delete."""
    path = anyio.Path(run_dir, "brokerd.sock")
    await path.write_text("keep me")
    server = ControlServer(ControlConfig(socket_path=str(path)), FakeHandler())
    with pytest.raises(ControlError, match="is not a socket"):
        await server.serve()
    assert await path.read_text() == "keep me"


@pytest.fixture
def stranger(monkeypatch: pytest.MonkeyPatch) -> int:
    """Every peer's SO_PEERCRED says this uid: neither ours, root's nor listed.

    Connecting as another uid needs root (see test_control_socket.py).
    """
    uid = os.geteuid() + 4242
    credentials = server_module._peer_credentials
    monkeypatch.setattr(
        server_module,
        "_peer_credentials",
        lambda sock: (uid, credentials(sock)[1]),
    )
    return uid


async def test_a_peer_whose_uid_is_not_allowed_is_refused(
    run_dir: str, stranger: int
) -> None:
    """A uid neither the daemon's, root's nor listed is refused, the request unread."""
    cfg = ControlConfig(socket_path=f"{run_dir}/c.sock", allowed_uids=(stranger + 1,))
    handler = FakeHandler()
    with capture_logs() as logs:
        async with serving(cfg, handler):
            with pytest.raises(RequestRefused, match="may not use") as caught:
                await ControlClient(cfg.socket_path).request(DrainRequest())
    assert caught.value.code == "forbidden"
    assert "[control] allowed-uids" in str(caught.value)
    assert handler.calls == []
    refused = [e for e in logs if e["event"] == "control_peer_refused"]
    assert refused[0]["peer_uid"] == stranger
    assert refused[0]["peer_pid"] == os.getpid()


async def test_the_uid_is_checked_before_anything_is_read(
    run_dir: str, stranger: int
) -> None:
    """A refused peer gets its reply without having sent a byte."""
    cfg = ControlConfig(socket_path=f"{run_dir}/c.sock")
    async with serving(cfg, FakeHandler()):
        replies = await exchange(cfg.socket_path, b"")
    assert [(r.ok, r.code) for r in replies] == [(False, "forbidden")]


async def test_an_idle_connection_is_closed(cfg: ControlConfig) -> None:
    """A connection that sends no complete line within idle_timeout_s is closed."""
    async with (
        serving(cfg, FakeHandler(), idle_timeout_s=0.05),
        await anyio.connect_unix(cfg.socket_path) as idle,
    ):
        await idle.send(b'{"cmd": "sta')
        with pytest.raises(anyio.EndOfStream):
            await idle.receive()


async def test_connections_beyond_the_limit_are_refused(cfg: ControlConfig) -> None:
    """With max_connections=1, a second connection is refused while one is open."""
    async with serving(cfg, FakeHandler(), max_connections=1) as server:
        async with await anyio.connect_unix(cfg.socket_path) as first:
            await first.send(encode_request(StatusRequest()))
            reply = await BufferedByteReceiveStream(first).receive_until(b"\n", 4096)
            assert decode_reply(reply).ok
            assert repr(server).endswith("1/1 connections>")
            with pytest.raises(RequestRefused, match="too many control connections"):
                await ControlClient(cfg.socket_path).request(StatusRequest())
        assert await ControlClient(cfg.socket_path).request(StatusRequest())


async def test_each_request_is_logged_without_its_arguments(
    cfg: ControlConfig,
) -> None:
    """One control_command line per request: peer, command, outcome; no arguments."""
    async with serving(cfg, FakeHandler()):
        client = ControlClient(cfg.socket_path)
        with capture_logs() as logs:
            await client.request(TraceRequest(correlation_id="secret-deal"))
            with pytest.raises(RequestRefused):
                await client.request(DlqShowRequest(id=404))
    lines = [e for e in logs if e["event"] == "control_command"]
    assert [(e["command"], e["outcome"]) for e in lines] == [
        ("trace", "ok"),
        ("dlq_show", "not_found"),
    ]
    assert lines[0]["peer_uid"] == os.geteuid()
    assert "secret-deal" not in repr(lines)


@pytest.mark.parametrize("stale", [False, True], ids=["missing", "stale"])
async def test_the_client_says_plainly_when_no_daemon_runs(
    cfg: ControlConfig, stale: bool
) -> None:
    """A missing or dead socket raises DaemonUnreachable naming the path and the fix."""
    if stale:
        _leave_stale_socket(cfg.socket_path)
    with pytest.raises(DaemonUnreachable) as caught:
        await ControlClient(cfg.socket_path).request(StatusRequest())
    assert str(caught.value) == (
        f"no daemon is listening on {cfg.socket_path}: is brokerd running? "
        "(start it with `brokerd run`)"
    )
