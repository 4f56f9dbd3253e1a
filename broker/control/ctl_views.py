"""How ``brokerctl`` shows results to people: tables, blocks, lookups, queues.

Also the parked outbox rows and what a retry or purge of them did.

Every value printed goes through `cell`, which escapes control characters:
ids, reasons and native ids come from outside systems, and printed raw an
escape sequence in one could rewrite the operator's terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

__all__ = [
    "block",
    "table",
    "cell",
    "when",
    "xref_entries",
    "xref_owner",
    "queue_table",
    "parked_rows",
    "outbox_acted",
    "paused",
    "resumed",
]


def xref_entries(kind: str, canonical_id: str, entries: list[Any]) -> str:
    """The systems that know canonical object *canonical_id*, one row each."""
    shown = [e for e in entries if isinstance(e, dict)]
    if not shown:
        return f"no system has an id for {cell(kind)} {cell(canonical_id)}"
    rows = [
        [
            cell(e.get("system")),
            cell(e.get("native_id")),
            cell(e.get("content_hash") or None),
            when(e.get("updated_at")),
        ]
        for e in shown
    ]
    return table(["SYSTEM", "NATIVE ID", "CONTENT HASH", "UPDATED"], rows)


def xref_owner(entry: dict[str, Any]) -> str:
    """Which canonical object a native id belongs to, and how to see the rest."""
    kind, canonical_id = cell(entry.get("kind")), cell(entry.get("canonical_id"))
    return (
        f"{cell(entry.get('system'))} {kind} {cell(entry.get('native_id'))} is "
        f"{kind} {canonical_id} (updated {when(entry.get('updated_at'))})\n"
        f"every system's id: brokerctl xref get {kind} {canonical_id}"
    )


def queue_table(result: dict[str, Any]) -> str:
    """The daemon's queues with their counts, and the totals."""
    queues = [q for q in result.get("queues") or () if isinstance(q, dict)]
    where = "the in-process transport"
    if result.get("vhost") is not None:
        where = f"vhost {cell(result['vhost'])}"
    if not queues:
        return f"no q2c.* queues on {where}"
    rows = [
        [
            cell(q.get("name")),
            cell(q.get("type")),
            cell(q.get("ready")),
            cell(q.get("unacked")),
            cell(q.get("consumers")),
        ]
        for q in queues
    ]
    ready = sum(q["ready"] for q in queues if isinstance(q.get("ready"), int))
    unacked = sum(q["unacked"] for q in queues if isinstance(q.get("unacked"), int))
    headers = ["QUEUE", "TYPE", "READY", "UNACKED", "CONSUMERS"]
    return (
        f"{table(headers, rows)}\n{len(rows)} queue{'s' if len(rows) != 1 else ''} "
        f"on {where}: {ready} ready, {unacked} unacked"
    )


def parked_rows(rows: list[Any], limit: int) -> str:
    """The table of parked outbox rows, newest first, and how many there are."""
    shown = [r for r in rows if isinstance(r, dict)]
    if not shown:
        return "no parked outbox rows"
    lines = [
        [
            cell(r.get("id")),
            cell(r.get("message_id")),
            "(default)" if r.get("exchange") == "" else cell(r.get("exchange")),
            cell(r.get("routing_key")),
            cell(r.get("type")),
            cell(r.get("correlation_id")),
            cell(r.get("size_bytes")),
            when(r.get("created_at")),
            cell(r.get("reason")),
        ]
        for r in shown
    ]
    headers = ["ID", "MESSAGE ID", "EXCHANGE", "ROUTING KEY", "TYPE"]
    headers += ["CORRELATION ID", "BYTES", "CREATED", "REASON"]
    more = " (limit reached: raise --limit to see more)" if len(lines) >= limit else ""
    plural = "s" if len(lines) != 1 else ""
    return f"{table(headers, lines)}\n{len(lines)} parked outbox row{plural}{more}"


def outbox_acted(verb: str, done: str, result: dict[str, Any], dry_run: bool) -> str:
    """What an outbox retry or purge did (or, dry, would do), and what it skipped.

    *verb* is ``retry`` or ``purge``, *done* its past tense and the result's
    key of the ids acted on.
    """
    ids = [i for i in result.get(done) or () if isinstance(i, int)]
    count = f"{len(ids)} parked outbox row{'s' if len(ids) != 1 else ''}"
    named = f"{count}: {', '.join(cell(i) for i in ids)}" if ids else count
    lines = [f"would {verb} {named} (dry run)" if dry_run else f"{done} {named}"]
    if ids and verb == "retry" and not dry_run:
        lines.append("the relay publishes them within [core] relay-poll-s")
    skipped = [s.get("id") for s in result.get("skipped") or () if isinstance(s, dict)]
    if skipped:
        lines.append(
            f"skipped {len(skipped)} (not parked: sent, retried or purged already, "
            f"or no such row): {', '.join(cell(i) for i in skipped)}"
        )
    return "\n".join(lines)


def paused(result: dict[str, Any]) -> str:
    """What a pause did: the system, since when, by whom and why."""
    system = cell(result.get("system"))
    return (
        f"paused {system} since {when(result.get('since'))} by "
        f"{cell(result.get('paused_by'))}{_reason(result)}\n"
        f"its commands wait in q2c.sys.{system}; resume: brokerctl resume {system}"
    )


def resumed(result: dict[str, Any]) -> str:
    """What a resume did, or that the system was not paused."""
    system = cell(result.get("system"))
    if not result.get("resumed"):
        return f"{system} was not paused: nothing to resume"
    return (
        f"resumed {system}, paused since {when(result.get('since'))} by "
        f"{cell(result.get('paused_by'))}{_reason(result)}"
    )


def _reason(result: dict[str, Any]) -> str:
    reason = result.get("reason")
    return f" ({cell(reason)})" if reason else ""


def block(value: Any, indent: int) -> list[str]:
    """Lines for any JSON value: aligned key/value pairs, nested blocks, tables."""
    pad = " " * indent
    if isinstance(value, dict):
        width = max((len(str(k)) for k in value), default=0)
        lines: list[str] = []
        for key, item in value.items():
            label = cell(key)
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{label}:")
                lines.extend(block(item, indent + 2))
            else:
                lines.append(f"{pad}{label.ljust(width)}  {cell(item)}".rstrip())
        return lines
    if isinstance(value, list):
        if value and all(isinstance(item, dict) for item in value):
            headers = list(dict.fromkeys(k for item in value for k in item))
            rows = [[cell(item.get(h)) for h in headers] for item in value]
            grid = table([h.upper().replace("_", " ") for h in headers], rows)
            return [pad + line for line in grid.splitlines()]
        return [f"{pad}{cell(item)}" for item in value] or [f"{pad}(none)"]
    return [pad + cell(value)]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """*headers* over *rows*, each column as wide as its widest cell."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    )


def cell(value: Any) -> str:
    """One value as display text; control characters are escaped.

    Dead-letter details come from outside systems: printed raw, an escape
    sequence in one could rewrite the operator's terminal.
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict | list):
        value = msgspec.json.encode(value).decode()
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def when(value: Any) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM:SSZ`` in UTC; anything else as is."""
    if not isinstance(value, str):
        return cell(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return cell(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S") + ("Z" if moment.tzinfo else "")
