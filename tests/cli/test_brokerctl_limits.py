"""``brokerctl`` within the daemon's limits: request size, deadlines, error text.

Long id lists go as several requests that each fit ``[control]
max-request-bytes``; bulk commands wait as long as the daemon lets them
run; and the daemon's error text is escaped like every other value shown.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from broker.config import ControlConfig
from broker.control import ctl
from broker.control.client import DaemonUnreachable
from broker.control.ctl import EXIT_FAILED, EXIT_UNREACHABLE, main
from broker.control.protocol import (
    BULK_TIMEOUT_S,
    DlqPurgeRequest,
    OutboxPurgeRequest,
    OutboxRetryRequest,
    Request,
    RequestRefused,
    encode_request,
)
from broker.errors import ConfigError
from broker.store import DeadLetterFilter
from tests.cli.test_brokerctl import brokerctl, daemon, out

pytestmark = pytest.mark.anyio

#: The daemon's default line limit, ``[control] max-request-bytes``.
LIMIT = ControlConfig().max_request_bytes
BIG = 1_000_000
#: 10,000 ids, some 80 KB as one line: rows 7 and 42 of the fake, and others.
OUTBOX_IDS = [7, 42, *range(BIG + 1, BIG + 9_999)]
#: 10,000 ids: the fake replays 1-899 and skips 900-1000 (and the others).
LETTER_IDS = [*range(1, 1_001), *range(BIG + 1, BIG + 9_001)]


# -- long id lists --------------------------------------------------------------


def test_a_long_id_list_is_split_into_requests_that_fit() -> None:
    """Each part fits the limit, the ids are shared out in order, the rest is kept."""
    ids = tuple(LETTER_IDS)
    assert len(encode_request(OutboxRetryRequest(ids=ids))) > LIMIT
    parts = ctl.split_request(OutboxRetryRequest(ids=ids, dry_run=True), LIMIT)
    assert len(parts) > 1
    assert all(len(encode_request(p)) <= LIMIT for p in parts)
    assert [i for p in parts for i in getattr(p, "ids", ())] == list(ids)
    assert {type(p) for p in parts} == {OutboxRetryRequest}
    assert all(getattr(p, "dry_run", False) for p in parts)


def test_a_dlq_part_names_at_most_what_the_daemon_takes() -> None:
    """More than 10,000 letters: parts of at most 10,000 ids, each within the limit."""
    ids = tuple(range(1, 25_001))
    whole = DlqPurgeRequest(ids=ids, limit=len(ids), reason="malformed")
    parts = ctl.split_request(whole, 1 << 20)
    assert [len(p.ids) for p in parts if isinstance(p, DlqPurgeRequest)] == [
        10_000,
        10_000,
        5_000,
    ]
    assert all(
        isinstance(p, DlqPurgeRequest) and p.limit == 10_000 and p.reason == "malformed"
        for p in parts
    )


def test_a_request_that_cannot_fit_is_a_usage_error() -> None:
    """Even one id over the limit: a clear error naming max-request-bytes."""
    with pytest.raises(ConfigError, match=r"max-request-bytes \(40\)"):
        ctl.split_request(OutboxPurgeRequest(ids=(1, 2)), 40)


async def test_outbox_retry_of_ten_thousand_ids_reaches_the_daemon(
    socket_path: str,
) -> None:
    """10,000 ids (some 70 KB) go as several requests; the results are shown as one."""
    async with daemon(socket_path) as handler:
        done = await brokerctl(
            "--socket", socket_path, "outbox", "retry", *map(str, OUTBOX_IDS)
        )
    text = out(done)
    assert text.startswith("retried 2 parked outbox rows: 7, 42\n")
    assert "skipped 9998 (not parked" in text
    calls = [args for name, args in handler.calls if name == "outbox_retry"]
    assert len(calls) > 1
    assert [i for ids, _, _ in calls for i in ids] == OUTBOX_IDS


async def test_dlq_replay_of_ten_thousand_ids_adds_up_the_parts(
    socket_path: str,
) -> None:
    """The parts' replayed, skipped and matched add up; no limit is said reached."""
    async with daemon(socket_path) as handler:
        done = await brokerctl(
            "--socket", socket_path, "dlq", "replay", *map(str, LETTER_IDS)
        )
    text = out(done)
    assert text.startswith("replayed 899 dead letters: 1, 2, 3")
    assert "skipped 50 (replayed --max-replays times already): 900, 901" in text
    assert "skipped 9051 (no queue takes it" in text
    assert "limit reached" not in text
    filters: list[DeadLetterFilter] = [
        flt for name, (flt, _, _) in handler.calls if name == "dlq_replay"
    ]
    assert len(filters) > 1
    assert [i for flt in filters for i in flt.ids] == LETTER_IDS
    assert all(flt.limit >= len(flt.ids) for flt in filters)


# -- deadlines and error text ---------------------------------------------------


class _Client:
    """Stands in for `ControlClient`: records its timeout, answers from *replies*.

    Each request takes the next reply: a result, or an exception to raise;
    with none left, it is refused.
    """

    timeouts: ClassVar[list[float]] = []
    replies: ClassVar[list[Any]] = []

    def __init__(self, socket_path: str, *, timeout_s: float) -> None:
        self.timeouts.append(timeout_s)

    async def request(self, req: Request) -> Any:
        reply = self.replies.pop(0) if self.replies else None
        if reply is None:
            raise RequestRefused("refused", code="failed")
        if isinstance(reply, Exception):
            raise reply
        return reply


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> type[_Client]:
    """The client ``brokerctl`` uses, replaced by `_Client` for the test."""
    monkeypatch.setattr(ctl, "ControlClient", _Client)
    _Client.timeouts = []
    _Client.replies = []
    return _Client


@pytest.mark.parametrize(
    ("args", "timeout_s"),
    [
        (["status"], 60.0),
        (["outbox", "purge", "--all"], BULK_TIMEOUT_S + 30),
        (["outbox", "retry", "7"], BULK_TIMEOUT_S + 30),
        (["dlq", "purge", "--all"], BULK_TIMEOUT_S + 30),
        (["dlq", "replay", "--reason", "rejected"], BULK_TIMEOUT_S + 30),
        (["--timeout", "5", "outbox", "purge", "--all"], 5.0),
    ],
)
def test_bulk_commands_wait_as_long_as_the_daemon_lets_them_run(
    client: type[_Client], socket_path: str, args: list[str], timeout_s: float
) -> None:
    """A retry or purge waits past the daemon's bulk deadline; --timeout still rules."""
    assert main(["--socket", socket_path, *args]) == EXIT_FAILED
    assert client.timeouts == [timeout_s]


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (
            RequestRefused("no actor 'x\x1b[2J\x1b]0;pwned\x07'", code="not_found"),
            EXIT_FAILED,
        ),
        (DaemonUnreachable("no daemon on /run/q\x1b[31m.sock"), EXIT_UNREACHABLE),
    ],
)
def test_the_daemons_error_text_is_escaped(
    client: type[_Client],
    socket_path: str,
    capsys: pytest.CaptureFixture[str],
    error: Exception,
    code: int,
) -> None:
    """Escape sequences in an error (ids chosen by producers) print as text."""
    client.replies = [error]
    assert main(["--socket", socket_path, "restart", "x"]) == code
    err = capsys.readouterr().err
    assert "\x1b" not in err
    assert "\x07" not in err
    assert err.startswith("brokerctl: ")
    assert "\\x1b" in err


def test_a_part_that_fails_is_named_after_what_the_parts_before_it_did(
    client: type[_Client], socket_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first part's rows are shown as done; the error says which part failed."""
    client.replies = [
        {"purged": [7, 42], "skipped": []},
        RequestRefused("store unavailable", code="failed"),
    ]
    ids = map(str, OUTBOX_IDS)
    assert main(["--socket", socket_path, "outbox", "purge", *ids]) == EXIT_FAILED
    printed = capsys.readouterr()
    assert printed.out == "purged 2 parked outbox rows: 7, 42\n"
    assert printed.err == (
        "brokerctl: store unavailable (part 2 of 2 of the ids; the parts before "
        "it were done, as shown; those after it were not sent)\n"
    )
