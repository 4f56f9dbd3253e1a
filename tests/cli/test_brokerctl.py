"""``brokerctl`` as a subprocess, against an in-process control server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.config import ControlConfig
from broker.control.ctl import EXIT_UNREACHABLE, EXIT_USAGE, main, render
from broker.control.protocol import StatusRequest
from broker.control.server import ControlServer
from broker.errors import BrokerError, TransportUnavailable
from broker.store import DeadLetterFilter, HoldRefused

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]

STATUS = {
    "daemon": "q2c-broker",
    "uptime_s": 12.5,
    "supervisors": ["<Supervisor root rest_for_one 0/2 restarts in 60s>"],
    "store": {"outbox_pending": 3, "dead_letters": 2},
}
TREE = {
    "id": "root",
    "kind": "supervisor",
    "strategy": "rest_for_one",
    "state": "running",
    "restarts": 0,
    "children": [
        {
            "id": "erp",
            "kind": "supervisor",
            "strategy": "one_for_one",
            "state": "running",
            "restarts": 1,
            "children": [
                {
                    "id": "erp.order_sync",
                    "kind": "actor",
                    "state": "running",
                    "mailbox": {"fill": 12, "size": 64, "high_water": 20},
                    "restarts": 1,
                }
            ],
        },
        {"id": "control", "kind": "actor", "state": "running", "restarts": 0},
    ],
}
LETTERS = [
    {
        "id": 12,
        "reason": "schema_invalid",
        "queue": "q2c.erp",
        "type": "order.placed",
        "attempts": 1,
        "last_seen": "2024-05-01T12:00:00.250000+00:00",
    },
    {
        "id": 7,
        "reason": "malformed",
        "queue": "q2c.crm",
        "type": None,
        "attempts": 20,
        "last_seen": "2024-04-30T23:59:59+02:00",
    },
]

HOLDS = [
    {
        "workflow": "deal",
        "correlation_id": "deal-7",
        "blocker": "crm-1",
        "since": "2024-05-01T12:00:00+00:00",
        "updated_at": "2024-05-01T12:00:00+00:00",
        "held": 3,
        "blocker_status": "parked",
    },
    {
        "workflow": "ordered",
        "correlation_id": "acct-a",
        "blocker": "demo-a1",
        "since": "2024-05-01T14:30:00+02:00",
        "updated_at": "2024-05-01T14:30:00+02:00",
        "held": 1,
        "blocker_status": None,
    },
]

HOLD_TABLE = (
    "WORKFLOW  CORRELATION ID  BLOCKER  BLOCKER STATUS  HELD  SINCE\n"
    "deal      deal-7          crm-1    parked          3     2024-05-01 12:00:00Z\n"
    "ordered   acct-a          demo-a1  retrying        1     2024-05-01 12:30:00Z\n"
    "2 held instances, 4 messages waiting\n"
)


XREF = [
    {
        "kind": "order",
        "canonical_id": "order-006A",
        "system": "erp_cloud",
        "native_id": "4711",
        "content_hash": "9f2c0e1d7a6b5c4d3e2f1a0b",
        "updated_at": "2024-05-01T14:00:00+02:00",
    },
    {
        "kind": "order",
        "canonical_id": "order-006A",
        "system": "erp_legacy",
        "native_id": "0000081234",
        "content_hash": "",
        "updated_at": "2024-05-02T08:30:00+00:00",
    },
]

QUEUES = {
    "transport": "amqp",
    "vhost": "q2c",
    "queues": [
        {
            "name": "q2c.dead",
            "type": "quorum",
            "ready": 2,
            "unacked": 0,
            "consumers": 0,
        },
        {
            "name": "q2c.wf.deal.0",
            "type": "quorum",
            "ready": 10,
            "unacked": 32,
            "consumers": 1,
        },
        {
            "name": "q2c.retry.5s",
            "type": "classic",
            "ready": None,
            "unacked": None,
            "consumers": None,
        },
    ],
}


PARKED = [
    {
        "id": 42,
        "message_id": "m-42",
        "exchange": "",
        "routing_key": "q2c.sys.erp_cloud",
        "correlation_id": "deal-7",
        "type": "erp.order.create",
        "attempts": 1,
        "reason": "unroutable (returned by the broker)",
        "created_at": "2024-05-01T14:00:00+02:00",
        "size_bytes": 312,
    },
    {
        "id": 7,
        "message_id": "m-7",
        "exchange": "q2c.events",
        "routing_key": "deal.completed",
        "correlation_id": None,
        "type": "deal.completed",
        "attempts": 2,
        "reason": "unpublishable: its routing key is over 255 bytes",
        "created_at": "2024-05-01T12:00:00+00:00",
        "size_bytes": 2048,
    },
]


PAUSE = {
    "system": "erp_cloud",
    "reason": "S/4 upgrade",
    "paused_by": "uid 1000",
    "since": "2024-05-01T14:00:00+02:00",
}


class FakeHandler:
    """Canned answers shaped like the composition root's; records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.queues_error: BrokerError | None = None

    async def status(self) -> dict[str, Any]:
        """Canned health."""
        return STATUS

    async def actors(self) -> dict[str, Any]:
        """A small tree with one mailbox."""
        return TREE

    async def dlq_list(self, flt: DeadLetterFilter, /) -> list[dict[str, Any]]:
        """Two letters."""
        self.calls.append(("dlq_list", flt))
        return LETTERS

    async def dlq_show(self, id: int, /) -> dict[str, Any]:
        """Only letter 12 exists."""
        if id != 12:
            raise KeyError(f"no dead letter with id {id}")
        return {**LETTERS[0], "body": '{"order": "o-1"}'}

    async def dlq_replay(
        self, flt: DeadLetterFilter, /, *, dry_run: bool, max_replays: int
    ) -> dict[str, Any]:
        """The ids asked for; for a filter, as many as the limit lets through.

        Ids from 900 are skipped: 900-949 by the loop guard, 950 and up for
        want of a queue.
        """
        self.calls.append(("dlq_replay", (flt, dry_run, max_replays)))
        ids = list(flt.ids) or list(range(1, flt.limit + 1))
        skipped = [
            {"id": i, "reason": "loop_guard" if i < 950 else "no_queue"}
            for i in ids
            if i >= 900
        ]
        return {
            "replayed": [i for i in ids if i < 900],
            "skipped": skipped,
            "matched": len(ids),
        }

    async def dlq_purge(self, flt: DeadLetterFilter, /, *, dry_run: bool) -> list[int]:
        """Nothing matched."""
        self.calls.append(("dlq_purge", (flt, dry_run)))
        return []

    async def outbox_list(self, limit: int, /) -> list[dict[str, Any]]:
        """The parked rows, up to *limit*."""
        self.calls.append(("outbox_list", limit))
        return PARKED[:limit]

    async def outbox_show(self, id: int, /) -> dict[str, Any]:
        """Only row 42 is parked."""
        if id != 42:
            raise KeyError(f"no parked outbox row {id}")
        return {**PARKED[0], "headers": {"x-q2c-system": "erp_cloud"}, "body": "{}"}

    async def outbox_retry(
        self, ids: tuple[int, ...] | None, /, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """Rows 7 and 42 are parked; any other id named is skipped."""
        self.calls.append(("outbox_retry", (ids, dry_run, by)))
        return _acted("retried", ids)

    async def outbox_purge(
        self, ids: tuple[int, ...] | None, /, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """Rows 7 and 42 are parked; any other id named is skipped."""
        self.calls.append(("outbox_purge", (ids, dry_run, by)))
        return _acted("purged", ids)

    async def hold_list(
        self, workflow: str | None, /, *, limit: int
    ) -> list[dict[str, Any]]:
        """Two holds, whatever the filter."""
        self.calls.append(("hold_list", (workflow, limit)))
        return HOLDS

    async def hold_release(
        self, workflow: str, correlation_id: str, /
    ) -> dict[str, Any]:
        """m2 is the new blocker; ``empty`` held nothing; the rest is refused."""
        self.calls.append(("hold_release", (workflow, correlation_id)))
        instance = f"instance {correlation_id!r} of workflow {workflow!r}"
        match correlation_id:
            case "free":
                raise KeyError(f"{instance} is not held")
            case "parked":
                raise HoldRefused(
                    f"{instance} waits on dead letter 12 (crm-1), which is parked: "
                    "replay or purge that dead letter instead",
                    reason="blocker_parked",
                )
            case "empty":
                blocker = None
            case _:
                blocker = "m2"
        return {
            "workflow": workflow,
            "correlation_id": correlation_id,
            "blocker": blocker,
        }

    async def drain(self) -> dict[str, Any]:
        """Nothing in flight."""
        return {"draining": True, "in_flight": 0}

    async def restart(self, actor_id: str, /) -> dict[str, Any]:
        """The actor, running again."""
        return {"id": actor_id, "state": "running", "restarts": 2}

    async def trace(self, correlation_id: str, /) -> dict[str, Any]:
        """A one-entry journal."""
        return {
            "correlation_id": correlation_id,
            "journal": [{"stage": "received", "type": "order.placed"}],
        }

    async def xref_get(self, kind: str, canonical_id: str, /) -> list[dict[str, Any]]:
        """Two ERPs know order-006A; nothing else is known."""
        self.calls.append(("xref_get", (kind, canonical_id)))
        return XREF if (kind, canonical_id) == ("order", "order-006A") else []

    async def xref_find(
        self, kind: str, system: str, native_id: str, /
    ) -> dict[str, Any]:
        """Only the cloud ERP's order 4711 is known."""
        self.calls.append(("xref_find", (kind, system, native_id)))
        if (kind, system, native_id) != ("order", "erp_cloud", "4711"):
            raise KeyError(f"no {kind} is known by {system} id {native_id!r}")
        return XREF[0]

    async def queues(self) -> dict[str, Any]:
        """Three queues, or the error the test set."""
        self.calls.append(("queues", None))
        if self.queues_error is not None:
            raise self.queues_error
        return QUEUES

    async def pause(self, system: str, reason: str, /, *, by: str) -> dict[str, Any]:
        """erp_cloud and crm are configured; anything else is unknown."""
        self.calls.append(("pause", (system, reason)))
        if system not in ("erp_cloud", "crm"):
            raise KeyError(f"unknown system {system!r} (configured: crm, erp_cloud)")
        return {"paused": True, **PAUSE, "system": system, "reason": reason}

    async def resume(self, system: str, /, *, by: str) -> dict[str, Any]:
        """erp_cloud was paused; crm was not."""
        self.calls.append(("resume", system))
        if system == "erp_cloud":
            return {"resumed": True, **PAUSE, "resumed_by": by}
        return {"system": system, "resumed": False}


def _acted(done: str, ids: tuple[int, ...] | None) -> dict[str, Any]:
    parked = [7, 42]  # the ids of PARKED, ascending
    named = parked if ids is None else list(ids)
    skipped = [{"id": i, "reason": "not_parked"} for i in named if i not in parked]
    return {done: [i for i in parked if i in named], "skipped": skipped}


@asynccontextmanager
async def daemon(socket_path: str) -> AsyncIterator[FakeHandler]:
    handler = FakeHandler()
    server = ControlServer(ControlConfig(socket_path=socket_path), handler)
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve)
            yield handler
            tg.cancel_scope.cancel()


async def brokerctl(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER__")}
    return await anyio.run_process(
        [sys.executable, "-m", "broker.control.ctl", *args],
        check=False,
        cwd=ROOT,
        env=env,
    )


def out(done: subprocess.CompletedProcess[bytes]) -> str:
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def test_status_prints_aligned_pairs(socket_path: str) -> None:
    """Status is key/value pairs aligned on the key, nested sections indented."""
    async with daemon(socket_path):
        text = out(await brokerctl("--socket", socket_path, "status"))
    assert text == (
        "daemon       q2c-broker\n"
        "uptime_s     12.5\n"
        "supervisors:\n"
        "  <Supervisor root rest_for_one 0/2 restarts in 60s>\n"
        "store:\n"
        "  outbox_pending  3\n"
        "  dead_letters    2\n"
    )


async def test_actors_prints_an_indented_tree_with_mailbox_fill(
    socket_path: str,
) -> None:
    """Each level indents by two; actors show mailbox fill as size/max."""
    async with daemon(socket_path):
        text = out(await brokerctl("--socket", socket_path, "actors"))
    assert text == (
        "ACTOR               KIND                       STATE    MAILBOX  RESTARTS\n"
        "root                supervisor (rest_for_one)  running  -        0\n"
        "  erp               supervisor (one_for_one)   running  -        1\n"
        "    erp.order_sync  actor                      running  12/64    1\n"
        "  control           actor                      running  -        0\n"
    )


async def test_dlq_list_prints_a_table_and_sends_the_filters(
    socket_path: str,
) -> None:
    """The listing is an aligned table in UTC; the flags become the store filter."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl(
                "--socket", socket_path, "dlq", "list", "--queue", "q2c.erp",
                "--status", "any", "--limit", "2",
            )
        )  # fmt: skip
    assert text == (
        "ID  REASON          QUEUE    TYPE          ATTEMPTS  LAST SEEN\n"
        "12  schema_invalid  q2c.erp  order.placed  1         2024-05-01 12:00:00Z\n"
        "7   malformed       q2c.crm  -             20        2024-04-30 21:59:59Z\n"
        "2 dead letters (limit reached: raise --limit to see more)\n"
    )
    assert handler.calls == [
        ("dlq_list", DeadLetterFilter(queue="q2c.erp", status=None, limit=2))
    ]


async def test_json_prints_the_raw_result(socket_path: str) -> None:
    """--json prints the daemon's result as JSON, untouched."""
    async with daemon(socket_path):
        actors = out(await brokerctl("--socket", socket_path, "--json", "actors"))
        letter = out(
            await brokerctl("--json", "--socket", socket_path, "dlq", "show", "12")
        )
    assert json.loads(actors) == TREE
    assert json.loads(letter)["body"] == '{"order": "o-1"}'


async def test_replay_dry_run_names_what_would_be_replayed(socket_path: str) -> None:
    """Ids, filters, --dry-run and --max-replays reach the handler; it says dry run."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl(
                "--socket", socket_path, "dlq", "replay", "3", "4",
                "--reason", "malformed", "--dry-run", "--max-replays", "5",
            )
        )  # fmt: skip
    assert text == "would replay 2 dead letters: 3, 4 (dry run)\n"
    flt = DeadLetterFilter(ids=(3, 4), reason="malformed")
    assert handler.calls == [("dlq_replay", (flt, True, 5))]


async def test_letters_not_replayed_are_named_with_why(socket_path: str) -> None:
    async with daemon(socket_path):
        text = out(
            await brokerctl(
                "--socket", socket_path, "dlq", "replay", "7", "901", "950"
            )
        )  # fmt: skip
    assert text == (
        "replayed 1 dead letter: 7\n"
        "skipped 1 (replayed --max-replays times already): 901\n"
        "skipped 1 (no queue takes it: a webhook's payload, or a queue no longer"
        " declared): 950\n"
    )


async def test_every_named_letter_is_replayed_and_a_reached_limit_is_said(
    socket_path: str,
) -> None:
    """150 ids: all 150 asked for (not the first --limit 100), and the cap said."""
    ids = [str(n) for n in range(1, 151)]
    async with daemon(socket_path) as handler:
        text = out(await brokerctl("--socket", socket_path, "dlq", "replay", *ids))
        capped = out(
            await brokerctl(
                "--socket", socket_path, "dlq", "replay", "--reason", "malformed",
                "--limit", "2",
            )
        )  # fmt: skip
    ((_, (flt, _, _)), _) = handler.calls
    assert (len(flt.ids), flt.limit) == (150, 150)
    assert text.startswith("replayed 150 dead letters: 1, 2, 3")
    assert text.endswith("149, 150\n")  # all named, none left: no limit said
    assert capped == (
        "replayed 2 dead letters: 1, 2"
        " (limit reached: run again, or raise --limit, to replay the rest)\n"
    )


async def test_an_error_reply_exits_1_with_the_daemons_message(
    socket_path: str,
) -> None:
    """A not_found reply prints the daemon's message on stderr and exits 1."""
    async with daemon(socket_path):
        done = await brokerctl("--socket", socket_path, "dlq", "show", "99")
    assert done.returncode == 1
    assert done.stderr.decode() == "brokerctl: no dead letter with id 99\n"


async def test_hold_list_prints_a_table_and_sends_the_workflow(
    socket_path: str,
) -> None:
    """Held instances in UTC, a blocker that is no dead letter shown as retrying."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl(
                "--socket", socket_path, "hold", "list", "--workflow", "deal",
                "--limit", "5",
            )
        )  # fmt: skip
    assert text == HOLD_TABLE
    assert handler.calls == [("hold_list", ("deal", 5))]


async def test_hold_commands_take_json_before_or_after_the_action(
    socket_path: str,
) -> None:
    """--json after ``hold list`` or ``hold release`` prints the raw result too."""
    async with daemon(socket_path) as handler:
        listed = out(await brokerctl("--socket", socket_path, "hold", "list", "--json"))
        before = out(await brokerctl("--json", "--socket", socket_path, "hold", "list"))
        released = out(
            await brokerctl(
                "--socket", socket_path, "hold", "release", "ordered", "acct-a",
                "--json",
            )
        )  # fmt: skip
    assert json.loads(listed) == json.loads(before) == HOLDS
    assert json.loads(released) == {
        "workflow": "ordered",
        "correlation_id": "acct-a",
        "blocker": "m2",
    }
    assert handler.calls[0] == ("hold_list", (None, 1000))
    assert handler.calls[-1] == ("hold_release", ("ordered", "acct-a"))


async def test_hold_release_says_what_was_sent_back(socket_path: str) -> None:
    """The new blocker is named; with nothing held, the instance is free."""
    async with daemon(socket_path):
        sent = out(
            await brokerctl("--socket", socket_path, "hold", "release", "ordered", "a")
        )
        free = out(
            await brokerctl(
                "--socket", socket_path, "hold", "release", "ordered", "empty"
            )
        )
    assert sent == (
        "released the hold of ordered a: m2 was sent back to its queue "
        "and holds the rest now\n"
    )
    assert free == "released the hold of ordered empty: nothing was held, it is free\n"


@pytest.mark.parametrize(
    ("correlation_id", "message"),
    [
        ("free", "instance 'free' of workflow 'ordered' is not held"),
        (
            "parked",
            "instance 'parked' of workflow 'ordered' waits on dead letter 12 "
            "(crm-1), which is parked: replay or purge that dead letter instead",
        ),
    ],
)
async def test_a_refused_hold_release_exits_1_with_the_reason(
    socket_path: str, correlation_id: str, message: str
) -> None:
    """Not held, or held by a parked dead letter: the daemon's reason, exit 1."""
    async with daemon(socket_path):
        done = await brokerctl(
            "--socket", socket_path, "hold", "release", "ordered", correlation_id
        )
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.decode() == f"brokerctl: {message}\n"


async def test_xref_get_prints_each_systems_id(socket_path: str) -> None:
    """One row per system, times in UTC, an empty content hash as ``-``."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl(
                "--socket", socket_path, "xref", "get", "order", "order-006A"
            )
        )
        raw = out(
            await brokerctl(
                "--socket", socket_path, "xref", "get", "order", "order-006A", "--json"
            )
        )
    assert text == (
        "SYSTEM      NATIVE ID   CONTENT HASH              UPDATED\n"
        "erp_cloud   4711        9f2c0e1d7a6b5c4d3e2f1a0b  2024-05-01 12:00:00Z\n"
        "erp_legacy  0000081234  -                         2024-05-02 08:30:00Z\n"
    )
    assert json.loads(raw) == XREF
    assert handler.calls == [("xref_get", ("order", "order-006A"))] * 2


async def test_xref_get_says_when_no_system_knows_the_id(socket_path: str) -> None:
    """An id without entries is not an error: exit 0, and a sentence saying so."""
    async with daemon(socket_path):
        text = out(
            await brokerctl("--socket", socket_path, "xref", "get", "account", "acct-9")
        )
        raw = out(
            await brokerctl(
                "--json", "--socket", socket_path, "xref", "get", "account", "acct-9"
            )
        )
    assert text == "no system has an id for account acct-9\n"
    assert json.loads(raw) == []


async def test_xref_find_names_the_canonical_id(socket_path: str) -> None:
    """The native id's canonical id, and the command that shows every system's."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl(
                "--socket", socket_path, "xref", "find", "order", "erp_cloud", "4711"
            )
        )
        raw = out(
            await brokerctl(
                "--socket", socket_path, "xref", "find", "order", "erp_cloud", "4711",
                "--json",
            )
        )  # fmt: skip
    assert text == (
        "erp_cloud order 4711 is order order-006A (updated 2024-05-01 12:00:00Z)\n"
        "every system's id: brokerctl xref get order order-006A\n"
    )
    assert json.loads(raw) == XREF[0]
    assert handler.calls[0] == ("xref_find", ("order", "erp_cloud", "4711"))


async def test_xref_find_of_an_unknown_native_id_exits_1(socket_path: str) -> None:
    """A native id nobody bound is the daemon's not_found: its message, exit 1."""
    async with daemon(socket_path):
        done = await brokerctl(
            "--socket", socket_path, "xref", "find", "order", "erp_legacy", "99"
        )
    assert done.returncode == 1
    assert done.stdout == b""
    assert (
        done.stderr.decode() == "brokerctl: no order is known by erp_legacy id '99'\n"
    )


async def test_an_invalid_xref_kind_is_refused_by_the_daemon(socket_path: str) -> None:
    """Kinds are lower-case words; anything else is a bad request, exit 1."""
    async with daemon(socket_path) as handler:
        done = await brokerctl(
            "--socket", socket_path, "xref", "get", "Order!", "order-006A"
        )
    assert done.returncode == 1
    assert done.stderr.decode().startswith("brokerctl: bad request: ")
    assert handler.calls == []


async def test_queues_prints_counts_and_totals(socket_path: str) -> None:
    """One row per queue; counts not reported yet show as ``-``; --json is raw."""
    async with daemon(socket_path):
        text = out(await brokerctl("--socket", socket_path, "queues"))
        raw = out(await brokerctl("--socket", socket_path, "queues", "--json"))
    assert text == (
        "QUEUE          TYPE     READY  UNACKED  CONSUMERS\n"
        "q2c.dead       quorum   2      0        0\n"
        "q2c.wf.deal.0  quorum   10     32       1\n"
        "q2c.retry.5s   classic  -      -        -\n"
        "3 queues on vhost q2c: 12 ready, 32 unacked\n"
    )
    assert json.loads(raw) == QUEUES


async def test_queues_reports_an_unreachable_management_api(socket_path: str) -> None:
    """The daemon's failure (no management API) is printed and exits 1."""
    async with daemon(socket_path) as handler:
        handler.queues_error = TransportUnavailable(
            "the RabbitMQ management API at http://127.0.0.1:15672 is unreachable"
        )
        done = await brokerctl("--socket", socket_path, "queues")
    assert done.returncode == 1
    assert done.stderr.decode() == (
        "brokerctl: the RabbitMQ management API at http://127.0.0.1:15672 "
        "is unreachable\n"
    )


async def test_pause_says_since_when_by_whom_and_why(socket_path: str) -> None:
    """Pause sends the system and reason; text names how to resume, --json is raw."""
    async with daemon(socket_path) as handler:
        text = out(
            await brokerctl(
                "--socket", socket_path, "pause", "erp_cloud", "--reason", "S/4 upgrade"
            )
        )
        raw = out(await brokerctl("--socket", socket_path, "pause", "crm", "--json"))
    assert text == (
        "paused erp_cloud since 2024-05-01 12:00:00Z by uid 1000 (S/4 upgrade)\n"
        "its commands wait in q2c.sys.erp_cloud; resume: brokerctl resume erp_cloud\n"
    )
    assert json.loads(raw) == {"paused": True, **PAUSE, "system": "crm", "reason": ""}
    assert handler.calls == [
        ("pause", ("erp_cloud", "S/4 upgrade")),
        ("pause", ("crm", "")),
    ]


async def test_pausing_an_unknown_system_exits_1(socket_path: str) -> None:
    """A system not configured is the daemon's not_found: its message, exit 1."""
    async with daemon(socket_path):
        done = await brokerctl("--socket", socket_path, "pause", "erp")
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.decode() == (
        "brokerctl: unknown system 'erp' (configured: crm, erp_cloud)\n"
    )


async def test_resume_says_what_ended_or_that_nothing_was_paused(
    socket_path: str,
) -> None:
    """Resuming a paused system names the pause; one not paused exits 0 saying so."""
    async with daemon(socket_path):
        text = out(await brokerctl("--socket", socket_path, "resume", "erp_cloud"))
        idle = out(await brokerctl("--socket", socket_path, "resume", "crm"))
        raw = out(await brokerctl("--socket", socket_path, "resume", "crm", "--json"))
    assert text == (
        "resumed erp_cloud, paused since 2024-05-01 12:00:00Z by uid 1000 "
        "(S/4 upgrade)\n"
    )
    assert idle == "crm was not paused: nothing to resume\n"
    assert json.loads(raw) == {"system": "crm", "resumed": False}


def test_status_shows_a_paused_system_with_its_reason_and_since() -> None:
    """A system's status carries its pause: reason, who and since; null when running."""
    status = {
        "systems": {
            "crm": {"paused": None, "consuming": True},
            "erp_cloud": {
                "paused": {k: PAUSE[k] for k in ("reason", "paused_by", "since")},
                "consuming": False,
            },
        }
    }
    assert render(StatusRequest(), status) == (
        "systems:\n"
        "  crm:\n"
        "    paused     -\n"
        "    consuming  yes\n"
        "  erp_cloud:\n"
        "    paused:\n"
        "      reason     S/4 upgrade\n"
        "      paused_by  uid 1000\n"
        "      since      2024-05-01T14:00:00+02:00\n"
        "    consuming  no"
    )


def test_pause_and_resume_need_a_system() -> None:
    """Without SYSTEM, pause and resume are usage errors before any daemon is asked."""
    assert main(["--socket", "/nonexistent/brokerd.sock", "pause"]) == EXIT_USAGE
    assert main(["--socket", "/nonexistent/brokerd.sock", "resume"]) == EXIT_USAGE


async def test_no_daemon_exits_3_and_says_how_to_start_one(socket_path: str) -> None:
    """Without a daemon, brokerctl exits 3 and tells the operator to run brokerd."""
    done = await brokerctl("--socket", socket_path, "status")
    assert done.returncode == EXIT_UNREACHABLE
    assert done.stdout == b""
    assert done.stderr.decode() == (
        f"brokerctl: no daemon is listening on {socket_path}: is brokerd running? "
        "(start it with `brokerd run`)\n"
    )


async def test_the_socket_path_comes_from_the_config_file(socket_path: str) -> None:
    """--config FILE supplies [control] socket-path when --socket is not given."""
    config = anyio.Path(socket_path).with_name("broker.toml")
    await config.write_text(f'[control]\nsocket-path = "{socket_path}"\n')
    async with daemon(socket_path):
        text = out(await brokerctl("--config", str(config), "restart", "erp.sync"))
    assert text == "id        erp.sync\nstate     running\nrestarts  2\n"


def test_an_unfiltered_purge_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Purging without ids, a filter or --all exits 2 before contacting any daemon."""
    assert main(["--socket", "/nonexistent/brokerd.sock", "dlq", "purge"]) == 2
    assert "refusing to purge every dead letter" in capsys.readouterr().err
    assert main(["dlq", "list", "--limit", "0"]) == EXIT_USAGE


async def test_without_config_or_socket_it_reads_config_broker_toml_as_brokerd(
    socket_path: str, tmp_path: Path
) -> None:
    """Run where the daemon runs: ./config/broker.toml names the socket for both."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "broker.toml").write_text(
        f'[control]\nsocket-path = "{socket_path}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER__")}
    async with daemon(socket_path):
        done = await anyio.run_process(
            [sys.executable, "-m", "broker.control.ctl", "status"],
            check=False,
            cwd=tmp_path,
            env=env,
        )
    assert out(done).startswith("daemon       q2c-broker\n")


async def test_json_goes_before_or_after_the_command(socket_path: str) -> None:
    async with daemon(socket_path):
        after = out(await brokerctl("--socket", socket_path, "status", "--json"))
        listed = out(await brokerctl("--socket", socket_path, "dlq", "list", "--json"))
    assert json.loads(after)["daemon"] == "q2c-broker"
    assert isinstance(json.loads(listed), list)


@pytest.mark.parametrize("seconds", ["nan", "inf", "-1", "0"])
async def test_a_timeout_that_is_no_positive_number_is_a_usage_error(
    seconds: str,
) -> None:
    done = await brokerctl("--timeout", seconds, "status")
    assert done.returncode == 2
    assert b"must be a positive number" in done.stderr
    assert b"Traceback" not in done.stderr
