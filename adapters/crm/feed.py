"""The sandbox org's change feed on the wire: replay long-poll and signing relay.

Internal to `adapters.crm.sandbox`. `ChangeFeed.replay` answers
``GET /cometd/replay`` from the org's change log; `ChangeFeed.relay` is the
background task that POSTs the change events, in commit order, to the push
URL, signed with ``X-Q2C-Signature``. It reads the change log after the last
event it delivered, so a burst waits in the (bounded, retained) log instead
of being dropped. A refused or failed delivery is retried with exponential
back-off, then dropped and counted.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import anyio
import msgspec

from adapters import signing as signature
from adapters.crm.org import ChangeRecord, Org
from adapters.crm.schema import ALL_CHANGES, SPECS, OrgError, entity_channel

__all__ = ["ChangeFeed", "PushTarget"]

_ENCODER = msgspec.json.Encoder(decimal_format="number")
_MAX_BACKOFF_S = 30.0
#: Events per push at most (a CometD batch).
_PUSH_BATCH = 100
_MAX_WAIT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class PushTarget:
    """Where and how the relay delivers, read before each attempt."""

    url: str
    secrets: tuple[str, ...]
    max_attempts: int
    backoff_s: float
    timeout_s: float = 10.0


class ChangeFeed:
    """Reads of the org's change log, and pushes of what is appended to it.

    Args:
        org: whose log; set ``org.on_change`` to `changed`.
        counts: the sandbox's counters (``replay_waits``, ``push_*``).
        clock: seconds since the epoch, for signature timestamps.
        target: the push target now, or None to push nothing.
    """

    def __init__(
        self,
        org: Org,
        *,
        counts: Counter[str],
        clock: Callable[[], float],
        target: Callable[[], PushTarget | None],
    ) -> None:
        self._org = org
        self._counts = counts
        self._clock = clock
        self._target = target
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        #: The last replay id pushed; the relay reads the log after it, so
        #: nothing is dropped while the log retains it (as CDC retains 72 h).
        self._pushed: int | None = None

    def changed(self, record: ChangeRecord) -> None:
        """Wake waiting replays, and the relay when pushing."""
        wake, self._wake = self._wake, asyncio.Event()
        wake.set()
        if self._target() is None:
            self._pushed = record.replay_id  # changes before a push URL: not sent
            return
        self._ready.set()

    def _unpushed(self, limit: int) -> list[ChangeRecord]:
        """The oldest records after the last pushed one, at most *limit*."""
        newer: list[ChangeRecord] = []
        pushed = self._pushed if self._pushed is not None else -1
        for record in reversed(self._org.log):
            if record.replay_id <= pushed:
                break
            newer.append(record)
        newer.reverse()
        return newer[:limit]

    async def replay(self, query: Mapping[str, str]) -> list[dict[str, Any]]:
        """The CometD messages a ``/cometd/replay`` request asks for.

        Raises:
            OrgError: an unknown channel, non-numeric parameters, or a replay
                id older than the log retains (``INVALID_REPLAY_ID``).
        """
        channel = query.get("channel", ALL_CHANGES)
        entity: str | None = None
        if channel != ALL_CHANGES:
            entity = next((n for n in SPECS if entity_channel(n) == channel), None)
            if entity is None:
                raise OrgError(400, "INVALID_CHANNEL", f"Unknown channel: {channel}")
        try:
            replay_id = int(query.get("replayId", "-1"))
            limit = min(1000, max(1, int(query.get("limit", "100"))))
            wait_s = min(_MAX_WAIT_S, max(0.0, float(query.get("wait_s", "0"))))
        except ValueError:
            raise OrgError(
                400, "INVALID_REPLAY_ID", "replayId, limit and wait_s are numbers"
            ) from None
        if replay_id == -1:
            after = self._org.last_replay_id
        elif replay_id == -2:
            after = -1
        elif replay_id < self._org.evicted_through:
            raise OrgError(
                400,
                "INVALID_REPLAY_ID",
                f"The replayId {replay_id} you provided was invalid. Please provide a "
                "valid ID, -2 to replay all events, or -1 to replay only new events.",
            )
        else:
            after = replay_id
        events = self._after(after, entity, limit)
        if not events and wait_s > 0:
            wake = self._wake
            self._counts["replay_waits"] += 1
            with anyio.move_on_after(wait_s):
                await wake.wait()
            events = self._after(after, entity, limit)
        return [e.cometd(channel) for e in events]

    def _after(self, after: int, entity: str | None, limit: int) -> list[ChangeRecord]:
        out: list[ChangeRecord] = []
        for record in self._org.log:
            if record.replay_id > after and (entity is None or record.entity == entity):
                out.append(record)
                if len(out) >= limit:
                    break
        return out

    async def relay(self) -> None:
        """Deliver queued events in order until cancelled.

        Events that queued up while a delivery was in flight go together in
        the next one, as a JSON array of CometD messages (at most
        `_PUSH_BATCH`), the way a CometD client receives them.
        """
        async with aiohttp.ClientSession() as session:
            while True:
                batch = self._unpushed(_PUSH_BATCH)
                if not batch:
                    self._ready.clear()
                    await self._ready.wait()
                    continue
                await self._push(session, batch)
                self._pushed = batch[-1].replay_id

    async def _push(
        self, session: aiohttp.ClientSession, records: list[ChangeRecord]
    ) -> None:
        body = _ENCODER.encode(
            records[0].cometd() if len(records) == 1 else [r.cometd() for r in records]
        )
        attempt = 0
        while True:
            target = self._target()
            if target is None:
                return
            attempt += 1
            if await self._post(session, target, body):
                self._counts["push_sent"] += len(records)
                return
            self._counts["push_failed_attempts"] += 1
            if attempt >= target.max_attempts:
                self._counts["push_dropped"] += len(records)
                return
            delay = min(target.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S)
            await anyio.sleep(delay)

    async def _post(
        self, session: aiohttp.ClientSession, target: PushTarget, body: bytes
    ) -> bool:
        headers = {
            "Content-Type": "application/json",
            signature.HEADER: signature.sign(
                target.secrets, body, timestamp=int(self._clock())
            ),
        }
        try:
            async with session.post(
                target.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=target.timeout_s),
            ) as response:
                await response.read()
                return 200 <= response.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False
