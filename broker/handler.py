"""The daemon's answers to control-socket requests.

Internal: not for use outside broker/. `broker.control.server` owns the
socket and the protocol; this module owns what the answers say, reading
the running daemon's parts.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, final

import anyio
import msgspec
import structlog

from broker.control.protocol import dead_letter_view, parked_outbox_view
from broker.errors import ControlError, StoreUnavailable
from broker.gcwatch import gc_status
from broker.store import DeadLetterFilter, HoldRefused, SystemPause

if TYPE_CHECKING:
    from broker.app import Daemon

__all__ = ["TRACE_LIMIT", "DaemonControl"]

#: The newest facts of a correlation id that ``brokerctl trace`` shows.
TRACE_LIMIT = 1000

_log = structlog.get_logger(__name__)


#: How long `status` waits for the store's counts (the client waits 5 s).
_STORE_STATUS_S = 2.0


@final
class DaemonControl:
    """Implements the control handler protocol over a running `Daemon`."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    async def status(self) -> dict[str, Any]:
        """Identity, uptime, transport and store state, counters."""
        d = self._d
        rt = d.runtime
        return {
            "daemon": d.cfg.daemon.name,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - d.started_at, 3),
            "draining": d.shutdown.is_set(),
            "transport": rt.transport.status(),
            "store": await self._store_counts(),
            "outbox_feed": repr(rt.feed),
            "systems": {name: status() for name, status in rt.system_status.items()},
            "counters": rt.metrics.snapshot(),
            "gc": gc_status(),
        }

    async def _store_counts(self) -> dict[str, Any]:
        """The store's counts, or why not: status must answer through a stall.

        A database that is locked, silent or down would otherwise hold
        ``brokerctl status`` past the client's deadline, when it is needed most.
        """
        with anyio.move_on_after(_STORE_STATUS_S):
            try:
                counts: dict[str, Any] = await self._d.runtime.store.counts()
            except StoreUnavailable as exc:
                return {"unavailable": str(exc)}
            return counts
        return {"unavailable": f"no answer within {_STORE_STATUS_S:g} s"}

    async def actors(self) -> dict[str, Any]:
        """The supervision tree with mailbox fill and restart counts."""
        return self._d.system.tree()

    async def dlq_list(self, flt: DeadLetterFilter) -> list[dict[str, Any]]:
        """Dead letters matching the filter, without bodies or headers."""
        rows = await self._d.runtime.store.list_dead_letters(flt)
        return [dead_letter_view(r) for r in rows]

    async def dlq_show(self, dead_letter_id: int) -> dict[str, Any]:
        """One dead letter, with headers and body (text if UTF-8, else base64).

        Raises:
            KeyError: no dead letter with that id.
        """
        rows = await self._d.runtime.store.list_dead_letters(
            DeadLetterFilter(ids=(dead_letter_id,), status=None, limit=1)
        )
        if not rows:
            raise KeyError(f"no dead letter {dead_letter_id}")
        return dead_letter_view(rows[0], body=True)

    async def dlq_replay(
        self, flt: DeadLetterFilter, *, dry_run: bool, max_replays: int
    ) -> dict[str, Any]:
        """Send matching dead letters back to their queues through the outbox.

        Only parked letters of a queue the topology declares go back; each
        other match is named under ``skipped`` with why, and stays as it is:
        ``not_parked``, ``loop_guard`` (replayed *max_replays* times
        already), ``no_queue`` (a webhook's payload, which no queue takes,
        or a queue no longer declared: sent back, it could only be parked
        unroutable).

        Returns:
            ``{"replayed": [ids], "skipped": [{"id", "reason"}], "matched": n}``
            (*matched*: how many letters the filter's limit let through).
        """
        store = self._d.runtime.store
        topology = self._d.topology
        queues = {q.name for q in topology.queues} if topology else set()
        matched = await store.list_dead_letters(flt)
        skipped: list[dict[str, Any]] = []
        wanted: list[int] = []
        for row in matched:
            if row.status != "parked":
                skipped.append({"id": row.id, "reason": "not_parked"})
            elif row.replays >= max_replays:
                skipped.append({"id": row.id, "reason": "loop_guard"})
            elif row.queue not in queues:
                skipped.append({"id": row.id, "reason": "no_queue"})
            else:
                wanted.append(row.id)
        replayed = (
            await store.replay_dead_letters(
                DeadLetterFilter(ids=tuple(wanted), limit=len(wanted)),
                max_replays=max_replays,
                dry_run=dry_run,
            )
            if wanted
            else []
        )
        return {"replayed": replayed, "skipped": skipped, "matched": len(matched)}

    async def dlq_purge(self, flt: DeadLetterFilter, *, dry_run: bool) -> list[int]:
        """Drop matching dead letters' bodies and mark them purged."""
        return await self._d.runtime.store.purge_dead_letters(flt, dry_run=dry_run)

    async def outbox_list(self, limit: int) -> list[dict[str, Any]]:
        """Parked outbox rows, newest first, without bodies or headers."""
        rows = await self._d.runtime.store.list_parked_outbox(limit=limit)
        return [parked_outbox_view(r) for r in rows]

    async def outbox_show(self, row_id: int) -> dict[str, Any]:
        """One parked outbox row, with headers and body (text if UTF-8, else base64).

        Raises:
            KeyError: no parked outbox row with that id (sent, retried,
                purged, or never there).
        """
        row = await self._d.runtime.store.parked_outbox(row_id)
        if row is None:
            raise KeyError(f"no parked outbox row {row_id}")
        return parked_outbox_view(row)

    async def outbox_retry(
        self, ids: tuple[int, ...] | None, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """Unpark rows (*ids*, or all with None): the relay publishes them again.

        The relay's poller claims them within ``[core] relay-poll-s``, as it
        does replayed dead letters. Each id named that is not parked any
        more is named under ``skipped`` and left alone.

        Returns:
            ``{"retried": [ids], "skipped": [{"id", "reason": "not_parked"}]}``
        """
        if not dry_run:
            # Before the work, which commits chunk by chunk: a run cut short
            # still says who started it and on what.
            _log.info(
                "outbox_retry_started",
                ids=None if ids is None else len(ids),
                all=ids is None,
                by=by,
            )
        retried = await self._d.runtime.store.retry_parked_outbox(ids, dry_run=dry_run)
        skipped = _skipped(ids, retried)
        if not dry_run:
            # Counts and the peer: the ids may be many, and bodies never belong.
            _log.info(
                "outbox_rows_retried",
                count=len(retried),
                skipped=len(skipped),
                all=ids is None,
                by=by,
            )
        return {"retried": retried, "skipped": skipped}

    async def outbox_purge(
        self, ids: tuple[int, ...] | None, *, dry_run: bool, by: str
    ) -> dict[str, Any]:
        """Delete parked rows (*ids*, or all with None); skip those not parked.

        Returns:
            ``{"purged": [ids], "skipped": [{"id", "reason": "not_parked"}]}``
        """
        if not dry_run:
            _log.info(
                "outbox_purge_started",
                ids=None if ids is None else len(ids),
                all=ids is None,
                by=by,
            )
        purged = await self._d.runtime.store.purge_parked_outbox(ids, dry_run=dry_run)
        skipped = _skipped(ids, purged)
        if not dry_run:
            _log.info(
                "outbox_rows_purged",
                count=len(purged),
                skipped=len(skipped),
                all=ids is None,
                by=by,
            )
        return {"purged": purged, "skipped": skipped}

    async def hold_list(
        self, workflow: str | None, *, limit: int
    ) -> list[dict[str, Any]]:
        """Held workflow instances with their blockers, longest held first."""
        rows = await self._d.runtime.store.list_holds(workflow, limit=limit)
        return [msgspec.to_builtins(r) for r in rows]

    async def hold_release(self, workflow: str, correlation_id: str) -> dict[str, Any]:
        """Hand one instance's hold on, as purging its blocker would.

        ``blocker`` in the answer is the held message sent back to its queue,
        which holds the rest now; null when nothing was held.

        Raises:
            KeyError: the instance is not held.
            HoldRefused: its blocker is a parked dead letter.
        """
        try:
            blocker = await self._d.runtime.store.release_hold(workflow, correlation_id)
        except HoldRefused as exc:
            if exc.reason == "not_held":
                raise KeyError(str(exc)) from exc
            raise
        return {
            "workflow": workflow,
            "correlation_id": correlation_id,
            "blocker": blocker,
        }

    async def drain(self) -> dict[str, Any]:
        """Stop intake, finish in-flight work, exit 0 (as SIGTERM does)."""
        self._d.request_shutdown("brokerctl drain")
        return {"draining": True, "shutdown_s": self._d.cfg.daemon.shutdown_s}

    async def restart(self, actor_id: str) -> dict[str, Any]:
        """Restart one actor or subtree on operator request.

        Raises:
            KeyError: no such actor.
            ValueError: the actor is the control socket or a subtree holding
                it: the restart would stop the very connection carrying it,
                and with it the restart, leaving no socket.
        """
        if _CONTROL_ID in _subtree_ids(self._d.system.tree(), actor_id):
            raise ValueError(
                f"{actor_id!r} holds the control socket, which cannot restart "
                "itself; restart the daemon instead"
            )
        await self._d.system.restart(actor_id)
        return {"restarted": actor_id}

    async def trace(self, correlation_id: str) -> dict[str, Any]:
        """The journal of one correlation id, its workflow states and holds.

        A workflow instance that is held shows ``held_by``: the id of the
        parked message its later messages wait behind. The journal is the
        newest `TRACE_LIMIT` facts; ``truncated`` says whether older ones
        exist.
        """
        rt = self._d.runtime
        journal = await rt.store.journal(correlation_id, limit=TRACE_LIMIT + 1)
        truncated = len(journal) > TRACE_LIMIT
        journal = journal[-TRACE_LIMIT:]
        sagas: dict[str, Any] = {}
        for name in rt.workflows:
            read = await rt.store.prepare_batch(name, [], name, [correlation_id])
            rec = read.sagas.get(correlation_id)
            held_by = read.holds.get(correlation_id)
            if rec is not None:
                sagas[name] = {
                    "version": rec.version,
                    "state": msgspec.json.decode(rec.state),
                }
            if held_by is not None:
                sagas.setdefault(name, {})["held_by"] = held_by
        return {
            "correlation_id": correlation_id,
            "sagas": sagas,
            "journal": [msgspec.to_builtins(j) for j in journal],
            #: Older facts exist than the journal shown (the newest TRACE_LIMIT).
            "truncated": truncated,
        }

    async def xref_get(self, kind: str, canonical_id: str) -> list[dict[str, Any]]:
        """Every system's entry for one canonical id, by system; empty if none."""
        found = await self._d.runtime.store.xref_get(kind, canonical_id)
        return [msgspec.to_builtins(found[system]) for system in sorted(found)]

    async def xref_find(self, kind: str, system: str, native_id: str) -> dict[str, Any]:
        """The entry binding *system*'s *native_id* of *kind* to its canonical id.

        Raises:
            KeyError: no canonical id of that kind has that native id.
        """
        entry = await self._d.runtime.store.xref_find(kind, system, native_id)
        if entry is None:
            raise KeyError(f"no {kind} is known by {system} id {native_id!r}")
        view: dict[str, Any] = msgspec.to_builtins(entry)
        return view

    async def pause(self, system: str, reason: str, *, by: str) -> dict[str, Any]:
        """Store *system*'s pause for every daemon, and apply it here at once.

        Raises:
            KeyError: *system* is not in ``[topology] systems``.
        """
        self._known(system)
        rt = self._d.runtime
        pause = await rt.store.pause_system(system, reason=reason, paused_by=by)
        _log.warning("system_pause_requested", system=system, reason=reason, by=by)
        if (apply := rt.system_pause.get(system)) is not None:
            apply(pause)
        return {"paused": True, **_pause_result(pause)}

    async def resume(self, system: str, *, by: str) -> dict[str, Any]:
        """End *system*'s pause for every daemon, here at once.

        ``resumed`` is false when the system was not paused.

        Raises:
            KeyError: *system* is not in ``[topology] systems``.
        """
        self._known(system)
        rt = self._d.runtime
        ended = await rt.store.resume_system(system)
        _log.info(
            "system_resume_requested",
            system=system,
            by=by,
            was_paused=ended is not None,
        )
        if (apply := rt.system_pause.get(system)) is not None:
            apply(None)
        if ended is None:
            return {"system": system, "resumed": False}
        return {"resumed": True, **_pause_result(ended), "resumed_by": by}

    def _known(self, system: str) -> None:
        systems = self._d.cfg.topology.systems
        if system not in systems:
            known = ", ".join(sorted(systems)) or "none"
            raise KeyError(f"unknown system {system!r} (configured: {known})")

    async def queues(self) -> dict[str, Any]:
        """The ``q2c.*`` queues of the daemon's vhost with their counts.

        On RabbitMQ they come from the management API, logging in as the
        ``[amqp] url``'s user; on the in-process transport, from its queues.
        Neither URL nor credentials appear in the answer.

        Raises:
            ConfigError: the management API refused the login.
            TransportUnavailable: the management API cannot be reached.
            ControlError: the in-process transport does not count its queues.
        """
        cfg = self._d.cfg
        if cfg.daemon.transport == "amqp":
            from broker.transport.management import ManagementApi, list_queues

            api = ManagementApi(
                cfg.amqp.url,
                cfg.amqp.management_url,
                timeout_s=cfg.amqp.connect_timeout_s,
                tls=self._d.tls,
            )
            listed = await list_queues(api)
            return {
                "transport": "amqp",
                "vhost": api.vhost,
                "queues": [msgspec.to_builtins(q) for q in listed],
            }
        counts = self._d.runtime.transport.status().get("queues")
        if not isinstance(counts, dict):
            raise ControlError(
                "queue counts are not available on the in-process transport"
            )
        return {
            "transport": "memory",
            "vhost": None,
            "queues": [
                {"name": name, "type": "in-process", **counts[name]}
                for name in sorted(counts)
                if name.startswith("q2c.")
            ],
        }


def _skipped(ids: tuple[int, ...] | None, acted: list[int]) -> list[dict[str, Any]]:
    """The ids named but not acted on: no longer parked (or never there)."""
    hit = set(acted)
    return [
        {"id": i, "reason": "not_parked"}
        for i in dict.fromkeys(ids or ())
        if i not in hit
    ]


def _pause_result(pause: SystemPause) -> dict[str, Any]:
    return {
        "system": pause.system,
        "reason": pause.reason,
        "paused_by": pause.paused_by,
        "since": pause.since.isoformat(),
    }


#: The control socket's actor (`broker.app.Daemon.root_spec`).
_CONTROL_ID = "control"


def _subtree_ids(node: Mapping[str, Any], actor_id: str) -> set[str]:
    """The ids in *actor_id*'s subtree of the status tree *node* (none if absent)."""
    if node.get("id") == actor_id:
        found: set[str] = set()
        stack = [node]
        while stack:
            current = stack.pop()
            found.add(current["id"])
            stack.extend(current.get("children", ()))
        return found
    for child in node.get("children", ()):
        ids = _subtree_ids(child, actor_id)
        if ids:
            return ids
    return set()
