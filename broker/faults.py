"""Fault injection for the crash tests: die with SIGKILL at a named point.

Enabled only by ``[testing] crash-at``; a production config leaves it empty
and the hook costs one comparison. The points are the boundaries whose
crash-safety the product promises (RELIABILITY.md §7):

* ``mid_txn``: the batch is applied in memory, its one atomic write not yet sent;
* ``after_commit_before_ack``: committed, deliveries not acknowledged;
* ``after_confirm_before_mark``: the broker confirmed outbox rows, not yet deleted.
"""

from __future__ import annotations

import os
import signal

import structlog

from broker.config import TestingConfig

__all__ = ["CrashHook", "CRASH_POINTS"]

CRASH_POINTS = frozenset(
    {"mid_txn", "after_commit_before_ack", "after_confirm_before_mark"}
)
_log = structlog.get_logger(__name__)


class CrashHook:
    """Kill this process once *crash_after* messages have passed the chosen point."""

    def __init__(self, cfg: TestingConfig) -> None:
        if cfg.crash_at and cfg.crash_at not in CRASH_POINTS:
            raise ValueError(
                f"[testing] crash-at = {cfg.crash_at!r}: expected one of "
                f"{sorted(CRASH_POINTS)}"
            )
        self._point = cfg.crash_at
        self._after = cfg.crash_after
        self._seen = 0

    def passed(self, point: str, messages: int) -> None:
        """Record *messages* passing *point*; SIGKILL this process when due."""
        if point != self._point:
            return
        self._seen += messages
        if self._seen >= self._after:
            _log.warning("crash_injected", point=point, messages=self._seen)
            os.kill(os.getpid(), signal.SIGKILL)
