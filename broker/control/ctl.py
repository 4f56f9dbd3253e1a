"""``brokerctl``: the operator's command line for a running daemon.

Each invocation sends one request over the control socket and prints the
result, as aligned tables for people or as JSON with ``--json``. A DLQ or
outbox command naming more ids than one request line may carry (``[control]
max-request-bytes``) goes as several requests, one after the other, and
their results are shown as one.

Exit codes: 0 the daemon did it, 1 the daemon refused or failed (or the
connection broke), 2 usage or configuration error, 3 no daemon reachable.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from broker.config import DEFAULT_CONFIG, config_file, load_config
from broker.control.client import ControlClient, DaemonUnreachable
from broker.control.ctl_views import (
    block,
    cell,
    outbox_acted,
    parked_rows,
    paused,
    queue_table,
    resumed,
    table,
    when,
    xref_entries,
    xref_owner,
)
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
    Request,
    RestartRequest,
    ResumeRequest,
    StatusRequest,
    TraceRequest,
    XrefFindRequest,
    XrefGetRequest,
    encode_request,
    is_bulk,
)
from broker.errors import ConfigError, ControlError

__all__ = [
    "EXIT_OK",
    "EXIT_FAILED",
    "EXIT_USAGE",
    "EXIT_UNREACHABLE",
    "main",
    "render",
    "split_request",
    "merge_results",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

_FILTERS = ("reason", "queue", "type", "correlation_id")
#: How long to wait for a reply, unless --timeout says.
_TIMEOUT_S = 60.0
#: For a bulk command, beyond the daemon's own deadline for it: its reply
#: (done, or "did not finish") still has to arrive.
_BULK_GRACE_S = 30.0
_KINDS = "e.g. order, account, opportunity, quote, subscription, invoice, product"


def main(argv: list[str] | None = None) -> int:
    """Run ``brokerctl`` on *argv* (default ``sys.argv[1:]``); return the exit code."""
    parser, guarded = _parser()
    try:
        args = parser.parse_args(argv)
        req = _request(args, guarded)
    except SystemExit as exc:  # argparse's usage errors and --help
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        config = load_config(config_file(args.config))
        socket_path = args.socket or config.control.socket_path
        pieces = split_request(req, config.control.max_request_bytes)
    except ConfigError as exc:
        _error(exc)
        return EXIT_USAGE

    timeout_s = args.timeout
    if timeout_s is None:
        timeout_s = BULK_TIMEOUT_S + _BULK_GRACE_S if is_bulk(req) else _TIMEOUT_S
    client = ControlClient(socket_path, timeout_s=timeout_s)
    results: list[Any] = []
    try:
        anyio.run(_send_each, client, pieces, results)
    except DaemonUnreachable as exc:
        _error(exc)
        return EXIT_UNREACHABLE
    except ControlError as exc:
        if results:  # the parts before this one were carried out: say so
            _show(args, req, merge_results(results))
            _error(
                f"{exc} (part {len(results) + 1} of {len(pieces)} of the ids; "
                "the parts before it were done, as shown; those after it were "
                "not sent)"
            )
        else:
            _error(exc)
        return EXIT_FAILED
    _show(args, req, merge_results(results))
    return EXIT_OK


def _error(message: object) -> None:
    """Print an error; the daemon's text may quote ids an outside system chose."""
    print(f"brokerctl: {cell(str(message))}", file=sys.stderr)


def _show(args: argparse.Namespace, req: Request, result: Any) -> None:
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(result), indent=2).decode())
    else:
        print(render(req, result))


async def _send_each(
    client: ControlClient, pieces: Sequence[Request], results: list[Any]
) -> None:
    """Send *pieces* in order, appending each result; stop at the first error."""
    for piece in pieces:
        # Appended one by one: the results so far must survive an error.
        results.append(await client.request(piece))  # noqa: PERF401


def split_request(req: Request, max_bytes: int) -> list[Request]:
    """*req* as requests whose lines fit in *max_bytes*, its ids shared out in order.

    Only a DLQ replay or purge, or an outbox retry or purge, naming ids is
    split (at most `_MAX_LIMIT` ids each, as the daemon takes); each part
    keeps every other field, so the parts together select what *req* does.

    Raises:
        ConfigError: even a part naming one id is longer than *max_bytes*
            (``[control] max-request-bytes``).
    """
    if not isinstance(req, _ById) or not req.ids:
        _check_fits(req, max_bytes)
        return [req]
    ids = req.ids
    pieces: list[Request] = []
    start = 0
    while start < len(ids):
        # Each further id costs its digits and a comma.
        room = max_bytes - len(encode_request(_with_ids(req, ids[start : start + 1])))
        end = start + 1
        while end < len(ids) and end - start < _MAX_LIMIT:
            cost = len(str(ids[end])) + 1
            if cost > room:
                break
            room -= cost
            end += 1
        piece = _with_ids(req, ids[start:end])
        _check_fits(piece, max_bytes)
        pieces.append(piece)
        start = end
    return pieces


#: The requests that name ids to act on, which `split_request` shares out.
_ById = DlqReplayRequest | DlqPurgeRequest | OutboxRetryRequest | OutboxPurgeRequest


def _with_ids(req: _ById, ids: tuple[int, ...]) -> _ById:
    if isinstance(req, DlqReplayRequest | DlqPurgeRequest):
        # *req*'s limit covers every id it names; a part's is capped at what
        # the daemon takes, and still covers its ids (at most that many).
        return msgspec.structs.replace(req, ids=ids, limit=min(_MAX_LIMIT, req.limit))
    return msgspec.structs.replace(req, ids=ids)


def _check_fits(req: Request, max_bytes: int) -> None:
    # The daemon must find the newline within max-request-bytes.
    size = len(encode_request(req))
    if size > max_bytes:
        raise ConfigError(
            f"the request takes {size} bytes, more than the daemon's "
            f"[control] max-request-bytes ({max_bytes})"
        )


def merge_results(results: Sequence[Any]) -> Any:
    """The results of the parts of one split request, as the whole's would be.

    Lists are joined; in a dict result, list fields are joined and counts
    (``matched``) added up. A single result is returned as it is.
    """
    if len(results) == 1:
        return results[0]
    if all(isinstance(r, list) for r in results):
        return [item for r in results for item in r]
    if not all(isinstance(r, dict) for r in results):
        return list(results)  # not a shape this daemon sends: shown as it came
    merged: dict[str, Any] = {}
    for result in results:
        for key, value in result.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif isinstance(value, int) and not isinstance(value, bool):
                merged[key] = merged.get(key, 0) + value
            else:
                merged.setdefault(key, value)
    return merged


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The argument parser, and the sub-parsers whose guard `_request` applies.

    Those of ``dlq replay``/``purge`` (by action) and of ``outbox retry``/``purge``.
    """
    parser = argparse.ArgumentParser(
        prog="brokerctl",
        description="Inspect and steer a running brokerd over its control socket.",
        epilog="exit codes: 0 ok, 1 error reply, 2 usage, 3 daemon not reachable",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="control socket (default: [control] socket-path of --config)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        type=Path,
        help="daemon config file to take the socket path from "
        f"(default: {DEFAULT_CONFIG} if it exists, as brokerd)",
    )
    parser.add_argument("--json", action="store_true", help="print raw JSON results")
    parser.add_argument(
        "--timeout",
        metavar="S",
        type=_positive(float),
        default=None,
        help=f"seconds to wait for a reply (default: {_TIMEOUT_S:g}; "
        f"{BULK_TIMEOUT_S + _BULK_GRACE_S:g} for dlq replay|purge and outbox "
        "retry|purge, which the daemon lets run for "
        f"{BULK_TIMEOUT_S:g})",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands.add_parser("status", help="daemon health")
    commands.add_parser("actors", help="supervision tree, mailbox fill, restarts")
    dlq = commands.add_parser("dlq", help="dead letters: list, show, replay, purge")
    actions = dlq.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser(
        "list", help="list dead letters (parked and held), newest first"
    )
    _add_filters(listing, status="open")
    show = actions.add_parser("show", help="one dead letter, body included")
    show.add_argument("id", type=_positive(int))

    replay = actions.add_parser("replay", help="send dead letters back to their queue")
    replay.add_argument("ids", nargs="*", type=_positive(int), metavar="ID")
    _add_filters(replay)
    replay.add_argument(
        "--max-replays",
        metavar="N",
        type=_positive(int),
        default=3,
        help="skip letters already replayed N times (default: 3)",
    )
    purge = actions.add_parser("purge", help="drop dead letters' bodies for good")
    purge.add_argument("ids", nargs="*", type=_positive(int), metavar="ID")
    _add_filters(purge)
    for destructive in (replay, purge):
        destructive.add_argument(
            "--dry-run", action="store_true", help="say what would happen; do nothing"
        )
        destructive.add_argument(
            "--all", action="store_true", help="allow acting without ids or a filter"
        )
    guarded = {"replay": replay, "purge": purge, **_outbox_parser(commands)}

    hold = commands.add_parser("hold", help="held workflow instances: list, release")
    hold_actions = hold.add_subparsers(dest="action", metavar="ACTION", required=True)
    held = hold_actions.add_parser(
        "list", help="held instances, their blockers and what waits, oldest first"
    )
    held.add_argument("--workflow", metavar="W", help="only this workflow's holds")
    held.add_argument("--limit", metavar="N", type=_positive(int), default=1000)
    release = hold_actions.add_parser(
        "release",
        help="send an instance's first held message back to its queue as its "
        "new blocker (for a blocker that is lost, e.g. from a purged retry queue)",
        description="Hand an instance's hold on, as purging its blocker would. "
        "Refused when its blocker is a parked dead letter: replay or purge that "
        "(brokerctl dlq) instead. If the lost blocker turns up after all, it counts "
        "as a later message of its instance.",
    )
    release.add_argument("workflow", metavar="WORKFLOW")
    release.add_argument("correlation_id", metavar="CORRELATION_ID")
    xref = commands.add_parser("xref", help="one object's id in every system")
    lookups = xref.add_subparsers(dest="action", metavar="ACTION", required=True)
    get = lookups.add_parser(
        "get",
        help="every system's native id for a canonical id",
        description="e.g. brokerctl xref get order order-0061t00000AbCdE",
    )
    get.add_argument("kind", metavar="KIND", help=_KINDS)
    get.add_argument("canonical_id", metavar="CANONICAL_ID")
    find = lookups.add_parser(
        "find",
        help="the canonical id behind one system's native id",
        description="e.g. brokerctl xref find order erp_cloud 4711",
    )
    find.add_argument("kind", metavar="KIND", help=_KINDS)
    find.add_argument("system", metavar="SYSTEM", help="e.g. crm, erp_cloud, billing")
    find.add_argument("native_id", metavar="NATIVE_ID")
    commands.add_parser("queues", help="q2c.* queues: ready, unacked, consumers, type")
    pause = commands.add_parser(
        "pause",
        help="stop calls to one system on every daemon; its commands wait in its queue",
        description="Stop calls to SYSTEM (e.g. for a maintenance window) on every "
        "daemon sharing the store, within their pause-poll-s. Calls in flight "
        "finish; new commands wait in q2c.sys.SYSTEM until `brokerctl resume`. "
        "Pausing a paused system replaces the reason.",
    )
    pause.add_argument("system", metavar="SYSTEM", help="e.g. crm, erp_cloud")
    pause.add_argument("--reason", metavar="TEXT", default="", help="why, for others")
    resume = commands.add_parser(
        "resume",
        help="let a paused system's actors take commands again",
        description="End SYSTEM's pause. A system that is not paused is no error: "
        "brokerctl says so and exits 0.",
    )
    resume.add_argument("system", metavar="SYSTEM")

    commands.add_parser(
        "drain", help="stop intake, finish in-flight work, then exit 0 (as SIGTERM)"
    )
    commands.add_parser("restart", help="restart an actor or subtree").add_argument(
        "actor_id", metavar="ACTOR_ID"
    )
    commands.add_parser("trace", help="timeline of one correlation id").add_argument(
        "correlation_id", metavar="CORRELATION_ID"
    )
    _json_after_the_command(parser)
    return parser, guarded


def _outbox_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> dict[str, argparse.ArgumentParser]:
    """``brokerctl outbox …``; returns its retry/purge sub-parsers (for their guard)."""
    outbox = commands.add_parser(
        "outbox",
        help="parked outbox rows (unroutable, unpublishable): list, show, retry, purge",
    )
    actions = outbox.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="list parked outbox rows, newest first")
    listing.add_argument("--limit", metavar="N", type=_positive(int), default=100)
    show = actions.add_parser("show", help="one parked outbox row, body included")
    show.add_argument("id", type=_positive(int))
    retry = actions.add_parser(
        "retry",
        help="publish parked rows again (after fixing the queue or binding)",
        description="Unpark rows: the relay publishes them within [core] "
        "relay-poll-s, under their own message ids. Rows no longer parked are "
        "skipped. Returned unroutable again, a row is parked again.",
    )
    purge = actions.add_parser("purge", help="delete parked rows for good")
    for acting in (retry, purge):
        acting.add_argument("ids", nargs="*", type=_positive(int), metavar="ID")
        acting.add_argument("--all", action="store_true", help="every parked row")
        acting.add_argument(
            "--dry-run", action="store_true", help="say what would happen; do nothing"
        )
    return {"outbox retry": retry, "outbox purge": purge}


def _json_after_the_command(parser: argparse.ArgumentParser) -> None:
    """Take ``--json`` after any command too (``brokerctl status --json``)."""
    subcommands = [
        action
        for action in parser._actions  # argparse keeps its subparsers there
        if isinstance(action, argparse._SubParsersAction)
    ]
    for action in subcommands:
        for command in {id(p): p for p in action.choices.values()}.values():
            _json_after_the_command(command)
    if not subcommands and "--json" not in parser._option_string_actions:
        parser.add_argument(
            "--json",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print raw JSON results",
        )


def _add_filters(parser: argparse.ArgumentParser, *, status: str = "parked") -> None:
    parser.add_argument(
        "--reason", help="e.g. malformed, schema_invalid, rejected, held"
    )
    parser.add_argument("--queue")
    parser.add_argument("--type", help="canonical event type, e.g. order.placed")
    parser.add_argument("--correlation-id")
    parser.add_argument(
        "--status",
        choices=("parked", "held", "released", "replayed", "purged", "open", "any"),
        default=status,
        help=f"open = parked or held (default: {status})",
    )
    parser.add_argument("--limit", metavar="N", type=_positive(int), default=100)


#: The most letters one request may name or act on (`protocol.DlqFilter`).
_MAX_LIMIT = 10_000


def _request(
    args: argparse.Namespace, guarded: dict[str, argparse.ArgumentParser]
) -> Request:
    """Turn parsed arguments into a request (exits 2 on an unguarded replay/purge)."""
    match args.command:
        case "status":
            return StatusRequest()
        case "actors":
            return ActorsRequest()
        case "drain":
            return DrainRequest()
        case "restart":
            return RestartRequest(actor_id=args.actor_id)
        case "trace":
            return TraceRequest(correlation_id=args.correlation_id)
        case "dlq" if args.action == "show":
            return DlqShowRequest(id=args.id)
        case "hold" if args.action == "list":
            return HoldListRequest(workflow=args.workflow, limit=args.limit)
        case "hold":
            return HoldReleaseRequest(
                workflow=args.workflow, correlation_id=args.correlation_id
            )
        case "xref" if args.action == "get":
            return XrefGetRequest(kind=args.kind, canonical_id=args.canonical_id)
        case "xref":
            return XrefFindRequest(
                kind=args.kind, system=args.system, native_id=args.native_id
            )
        case "queues":
            return QueuesRequest()
        case "pause":
            return PauseRequest(system=args.system, reason=args.reason)
        case "resume":
            return ResumeRequest(system=args.system)
        case "outbox":
            return _outbox_request(args, guarded)
    selection: dict[str, Any] = {name: getattr(args, name) for name in _FILTERS}
    selection["status"] = None if args.status == "any" else args.status
    selection["limit"] = args.limit
    if args.action == "list":
        return DlqListRequest(**selection)
    if not (args.ids or args.all or any(selection[name] for name in _FILTERS)):
        guarded[args.action].error(
            f"refusing to {args.action} every dead letter: give ids or a filter "
            "(--reason, --queue, --type, --correlation-id), or --all"
        )
    if args.ids:
        # Every letter named, not the first --limit of them (`split_request`
        # caps each request sent at what the daemon takes).
        selection["limit"] = max(args.limit, len(args.ids))
    selection.update(ids=tuple(args.ids), dry_run=args.dry_run, all=args.all)
    if args.action == "replay":
        return DlqReplayRequest(max_replays=args.max_replays, **selection)
    return DlqPurgeRequest(**selection)


def _outbox_request(
    args: argparse.Namespace, guarded: dict[str, argparse.ArgumentParser]
) -> Request:
    """``outbox`` arguments as a request (exit 2: retry/purge take ids xor --all)."""
    match args.action:
        case "list":
            return OutboxListRequest(limit=args.limit)
        case "show":
            return OutboxShowRequest(id=args.id)
    if bool(args.ids) == args.all:
        guarded[f"outbox {args.action}"].error(
            f"name the parked rows to {args.action} (ID ...), or say --all; not both"
        )
    if len(args.ids) > _MAX_LIMIT:
        guarded[f"outbox {args.action}"].error(
            f"at most {_MAX_LIMIT} ids at a time; use --all for every parked row"
        )
    selection = {"ids": tuple(args.ids), "all": args.all, "dry_run": args.dry_run}
    if args.action == "retry":
        return OutboxRetryRequest(**selection)
    return OutboxPurgeRequest(**selection)


def _positive(kind: type[int] | type[float]) -> Any:
    def convert(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its errors
    return convert


# -- human output ---------------------------------------------------------------


def render(req: Request, result: Any) -> str:
    """The human-readable form of *result*, the answer to *req*."""
    match req:
        case ActorsRequest() if isinstance(result, dict):
            return _actor_tree(result)
        case DlqListRequest(limit=limit) if isinstance(result, list):
            return _letters(result, limit)
        case DlqReplayRequest(dry_run=dry_run) if isinstance(result, dict):
            return _replayed(req, result, dry_run)
        case DlqPurgeRequest(dry_run=dry_run) if isinstance(result, list):
            return _ids("purge", "purged", result, dry_run, _capped(req, result))
        case OutboxListRequest(limit=limit) if isinstance(result, list):
            return parked_rows(result, limit)
        case OutboxRetryRequest(dry_run=dry_run) if isinstance(result, dict):
            return outbox_acted("retry", "retried", result, dry_run)
        case OutboxPurgeRequest(dry_run=dry_run) if isinstance(result, dict):
            return outbox_acted("purge", "purged", result, dry_run)
        case HoldListRequest(limit=limit) if isinstance(result, list):
            return _holds(result, limit)
        case HoldReleaseRequest() if isinstance(result, dict):
            return _released(result)
        case XrefGetRequest(kind=kind, canonical_id=canonical_id) if isinstance(
            result, list
        ):
            return xref_entries(kind, canonical_id, result)
        case XrefFindRequest() if isinstance(result, dict):
            return xref_owner(result)
        case QueuesRequest() if isinstance(result, dict):
            return queue_table(result)
        case PauseRequest() if isinstance(result, dict):
            return paused(result)
        case ResumeRequest() if isinstance(result, dict):
            return resumed(result)
        case _:
            return "\n".join(block(result, 0))


def _actor_tree(root: dict[str, Any]) -> str:
    rows: list[list[str]] = []

    def walk(node: dict[str, Any], depth: int) -> None:
        kind = cell(node.get("kind", "?"))
        if node.get("strategy"):
            kind = f"{kind} ({cell(node['strategy'])})"
        mailbox = node.get("mailbox") or {}
        size, cap = mailbox.get("fill"), mailbox.get("size")
        rows.append(
            [
                "  " * depth + cell(node.get("id", "?")),
                kind,
                cell(node.get("state")),
                f"{size}/{cap}" if size is not None and cap is not None else "-",
                cell(node.get("restarts")),
            ]
        )
        for child in node.get("children") or ():
            if isinstance(child, dict):
                walk(child, depth + 1)

    walk(root, 0)
    return table(["ACTOR", "KIND", "STATE", "MAILBOX", "RESTARTS"], rows)


def _letters(letters: list[Any], limit: int) -> str:
    """The dead-letter table.

    A STATUS column appears when any letter listed is not simply parked, so
    that held messages (waiting behind a parked one of their instance) stand
    out from the letters an operator has to act on.
    """
    if not letters:
        return "no dead letters match"
    shown = [letter for letter in letters if isinstance(letter, dict)]
    status = any(letter.get("status", "parked") != "parked" for letter in shown)
    rows = [
        [
            cell(letter.get("id")),
            *([cell(letter.get("status"))] if status else []),
            cell(letter.get("reason")),
            cell(letter.get("queue")),
            cell(letter.get("type")),
            cell(letter.get("attempts")),
            when(letter.get("last_seen")),
        ]
        for letter in shown
    ]
    headers = ["ID", *(["STATUS"] if status else [])]
    headers += ["REASON", "QUEUE", "TYPE", "ATTEMPTS", "LAST SEEN"]
    grid = table(headers, rows)
    more = " (limit reached: raise --limit to see more)" if len(rows) >= limit else ""
    held = sum(1 for letter in shown if letter.get("status") == "held")
    tail = f", {held} held" if held else ""
    return f"{grid}\n{len(rows)} dead letter{'s' if len(rows) != 1 else ''}{tail}{more}"


def _holds(holds: list[Any], limit: int) -> str:
    """The table of held instances; a blocker that is no dead letter is retrying."""
    shown = [h for h in holds if isinstance(h, dict)]
    if not shown:
        return "no instances are held"
    rows = [
        [
            cell(h.get("workflow")),
            cell(h.get("correlation_id")),
            cell(h.get("blocker")),
            cell(h.get("blocker_status") or "retrying"),
            cell(h.get("held")),
            when(h.get("since")),
        ]
        for h in shown
    ]
    headers = ["WORKFLOW", "CORRELATION ID", "BLOCKER", "BLOCKER STATUS", "HELD"]
    grid = table([*headers, "SINCE"], rows)
    waiting = sum(h["held"] for h in shown if isinstance(h.get("held"), int))
    more = " (limit reached: raise --limit to see more)" if len(rows) >= limit else ""
    return (
        f"{grid}\n{len(rows)} held instance{'s' if len(rows) != 1 else ''}, "
        f"{waiting} message{'s' if waiting != 1 else ''} waiting{more}"
    )


def _released(result: dict[str, Any]) -> str:
    instance = f"{cell(result.get('workflow'))} {cell(result.get('correlation_id'))}"
    blocker = result.get("blocker")
    if blocker is None:
        return f"released the hold of {instance}: nothing was held, it is free"
    return (
        f"released the hold of {instance}: {cell(blocker)} was sent back to its "
        "queue and holds the rest now"
    )


def _capped(req: DlqReplayRequest | DlqPurgeRequest, result: list[Any]) -> bool:
    """Whether the limit, not the selection, ended the list: more may match."""
    return _limit_reached(req, len(result))


def _limit_reached(req: DlqReplayRequest | DlqPurgeRequest, matched: int) -> bool:
    if req.ids and len(req.ids) <= req.limit:
        return False  # every letter named was looked at
    return matched >= req.limit


#: Why a matching letter was not replayed, for people.
_SKIPPED = {
    "not_parked": "not parked",
    "loop_guard": "replayed --max-replays times already",
    "no_queue": "no queue takes it: a webhook's payload, or a queue no longer declared",
}


def _replayed(req: DlqReplayRequest, result: dict[str, Any], dry_run: bool) -> str:
    capped = _limit_reached(req, int(result.get("matched", 0)))
    lines = [_ids("replay", "replayed", result["replayed"], dry_run, capped)]
    by_reason: dict[str, list[Any]] = {}
    for skip in result.get("skipped", ()):
        by_reason.setdefault(str(skip["reason"]), []).append(skip["id"])
    for reason, ids in by_reason.items():
        listed = ", ".join(cell(i) for i in ids)
        why = _SKIPPED.get(reason, reason)
        lines.append(f"skipped {len(ids)} ({why}): {listed}")
    return "\n".join(lines)


def _ids(verb: str, done: str, ids: list[Any], dry_run: bool, capped: bool) -> str:
    count = f"{len(ids)} dead letter{'s' if len(ids) != 1 else ''}"
    listed = ", ".join(cell(i) for i in ids)
    more = (
        f" (limit reached: run again, or raise --limit, to {verb} the rest)"
        if capped
        else ""
    )
    named = f"{count}: {listed}" if ids else count
    if dry_run:
        return f"would {verb} {named} (dry run){more}"
    return f"{done} {named}{more}"


if __name__ == "__main__":
    sys.exit(main())
