"""``brokerctl outbox``: parked outbox rows, over the control socket.

The daemon side is the canned `FakeHandler` of tests/cli/test_brokerctl.py,
behind a real `ControlServer`; ``brokerctl`` runs as a subprocess.
"""

from __future__ import annotations

import json
import os

import pytest

from broker.control.protocol import (
    OutboxListRequest,
    OutboxPurgeRequest,
    OutboxRetryRequest,
    OutboxShowRequest,
    Request,
    RequestRefused,
    decode_request,
    encode_request,
)
from tests.cli.test_brokerctl import PARKED, brokerctl, daemon, out

pytestmark = pytest.mark.anyio

#: What the server passes as *by* for this process's requests.
BY = f"uid {os.geteuid()}"


@pytest.mark.parametrize(
    "req",
    [
        OutboxListRequest(),
        OutboxListRequest(limit=5),
        OutboxShowRequest(id=42),
        OutboxRetryRequest(ids=(1, 2)),
        OutboxRetryRequest(all=True, dry_run=True),
        OutboxPurgeRequest(ids=(3,), dry_run=True),
        OutboxPurgeRequest(all=True),
    ],
    ids=repr,
)
def test_outbox_requests_round_trip(req: Request) -> None:
    """Each outbox request encodes to one line and decodes to itself."""
    line = encode_request(req)
    assert line.count(b"\n") == 1
    assert decode_request(line) == req


@pytest.mark.parametrize(
    "line",
    [
        b'{"cmd": "outbox_retry"}',
        b'{"cmd": "outbox_purge", "ids": [1], "all": true}',
        b'{"cmd": "outbox_purge", "ids": [0]}',
        b'{"cmd": "outbox_list", "limit": 100000}',
        b'{"cmd": "outbox_show"}',
        b'{"cmd": "outbox_retry", "all": true, "status": "parked"}',
    ],
)
def test_an_unguarded_or_malformed_outbox_request_is_refused(line: bytes) -> None:
    """Retry and purge take ids or all, not neither nor both; limits hold."""
    with pytest.raises(RequestRefused) as caught:
        decode_request(line)
    assert caught.value.code == "bad_request"


async def test_outbox_list_prints_a_table_and_sends_the_limit(socket_path: str) -> None:
    """Newest first as the daemon sent them, in UTC; the default exchange named."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl("--socket", socket_path, "outbox", "list", "--limit", "2")
        )
    assert text == (
        "ID  MESSAGE ID  EXCHANGE    ROUTING KEY        TYPE              "
        "CORRELATION ID  BYTES  CREATED               REASON\n"
        "42  m-42        (default)   q2c.sys.erp_cloud  erp.order.create  "
        "deal-7          312    2024-05-01 12:00:00Z  "
        "unroutable (returned by the broker)\n"
        "7   m-7         q2c.events  deal.completed     deal.completed    "
        "-               2048   2024-05-01 12:00:00Z  "
        "unpublishable: its routing key is over 255 bytes\n"
        "2 parked outbox rows (limit reached: raise --limit to see more)\n"
    )
    assert handler.calls == [("outbox_list", 2)]


async def test_outbox_list_json_and_the_default_limit(socket_path: str) -> None:
    """--json prints the rows untouched; without --limit, 100 are asked for."""
    async with daemon(socket_path) as handler:
        text = out(await brokerctl("--socket", socket_path, "outbox", "list", "--json"))
    assert json.loads(text) == PARKED
    assert handler.calls == [("outbox_list", 100)]


async def test_outbox_show_prints_the_row_with_its_body(socket_path: str) -> None:
    """One row as aligned pairs, headers nested, the body as text."""
    async with daemon(socket_path):
        text = out(await brokerctl("--socket", socket_path, "outbox", "show", "42"))
        missing = await brokerctl("--socket", socket_path, "outbox", "show", "9")
    assert "routing_key     q2c.sys.erp_cloud\n" in text
    assert "headers:\n  x-q2c-system  erp_cloud\n" in text
    assert text.endswith("body            {}\n")
    assert missing.returncode == 1
    assert missing.stderr.decode() == "brokerctl: no parked outbox row 9\n"


async def test_retry_names_what_it_unparked_and_what_it_skipped(
    socket_path: str,
) -> None:
    """Named ids reach the handler with the peer's uid; skipped ones are listed."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl("--socket", socket_path, "outbox", "retry", "42", "9")
        )
    assert text == (
        "retried 1 parked outbox row: 42\n"
        "the relay publishes them within [core] relay-poll-s\n"
        "skipped 1 (not parked: sent, retried or purged already, or no such row): 9\n"
    )
    assert handler.calls == [("outbox_retry", ((42, 9), False, BY))]


async def test_retry_all_dry_run_says_what_would_go(socket_path: str) -> None:
    """--all sends no ids (every parked row); --dry-run says so and does nothing."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl(
                "--socket", socket_path, "outbox", "retry", "--all", "--dry-run"
            )
        )
    assert text == "would retry 2 parked outbox rows: 7, 42 (dry run)\n"
    assert handler.calls == [("outbox_retry", (None, True, BY))]


async def test_purge_prints_the_ids_purged_or_json(socket_path: str) -> None:
    """A purge lists the ids it deleted; --json gives the daemon's result."""
    async with daemon(socket_path) as handler:
        text = out(await brokerctl("--socket", socket_path, "outbox", "purge", "--all"))
        raw = out(
            await brokerctl("--socket", socket_path, "outbox", "purge", "7", "--json")
        )  # fmt: skip
        dry = out(
            await brokerctl(
                "--socket", socket_path, "outbox", "purge", "5", "--dry-run"
            )
        )
    assert text == "purged 2 parked outbox rows: 7, 42\n"
    assert json.loads(raw) == {"purged": [7], "skipped": []}
    assert dry == (
        "would purge 0 parked outbox rows (dry run)\n"
        "skipped 1 (not parked: sent, retried or purged already, or no such row): 5\n"
    )
    assert handler.calls == [
        ("outbox_purge", (None, False, BY)),
        ("outbox_purge", ((7,), False, BY)),
        ("outbox_purge", ((5,), True, BY)),
    ]


@pytest.mark.parametrize(
    "args",
    [
        ("outbox", "retry"),
        ("outbox", "purge", "--dry-run"),
        ("outbox", "purge", "3", "--all"),
        ("outbox", "retry", "0"),
    ],
)
async def test_retry_and_purge_need_ids_or_all(
    socket_path: str, args: tuple[str, ...]
) -> None:
    """Neither, both, or a bad id is a usage error: exit 2, nothing sent."""
    async with daemon(socket_path) as handler:
        done = await brokerctl("--socket", socket_path, *args)
    assert done.returncode == 2
    assert handler.calls == []
