"""The cycle collector, seen from the event loop.

A full pass of CPython's cycle collector runs on the loop's thread and
stalls every actor for as long as it takes: with a large heap of
long-lived objects, tens of milliseconds. Two things keep those passes
short in the daemon:

- nothing on the hot path lives in reference cycles, so messages and
  batches are freed by reference counting (`broker.commit` breaks the one
  cycle a batch has once it is written);
- `freeze_startup_heap` moves what exists once the tree is up (modules,
  configuration, actors, connections) out of the collector's sight.

`GcPauses` times every pass into ``q2c_gc_pause_seconds``, so a regression
shows up on the dashboard rather than as unexplained tail latency.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, final

from prometheus_client import Histogram

__all__ = ["GcPauses", "freeze_startup_heap", "gc_status"]


@final
class GcPauses:
    """A `gc.callbacks` entry observing each pass's duration, by generation."""

    __slots__ = ("_by_generation", "_started")

    def __init__(self, histogram: Histogram) -> None:
        # Resolved once: young passes run many times a second.
        self._by_generation = [histogram.labels(str(g)) for g in range(3)]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """Start the clock, or observe the pass that just ended."""
        if phase == "start":
            self._started = time.perf_counter()
        else:
            elapsed = time.perf_counter() - self._started
            self._by_generation[info["generation"]].observe(elapsed)

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Time every pass while the block runs."""
        gc.callbacks.append(self)
        try:
            yield
        finally:
            gc.callbacks.remove(self)


def freeze_startup_heap() -> int:
    """Collect once, then exempt every surviving object from later passes.

    Call it once the daemon is up. A frozen object that later becomes
    cyclic garbage is never reclaimed, which bounds the cost at the size of
    the startup heap, once. Returns how many objects were frozen.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def gc_status() -> dict[str, Any]:
    """Frozen objects and passes run per generation, for ``brokerctl status``."""
    return {
        "frozen_objects": gc.get_freeze_count(),
        "collections": [s["collections"] for s in gc.get_stats()],
    }
