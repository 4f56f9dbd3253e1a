"""GcPauses times the cycle collector's passes; status reports frozen objects."""

from __future__ import annotations

import gc

from broker.gcwatch import GcPauses, gc_status
from broker.metrics import Metrics


def _passes(metrics: Metrics, generation: str) -> float:
    value = metrics.registry.get_sample_value(
        "q2c_gc_pause_seconds_count", {"generation": generation}
    )
    return value or 0.0


def test_each_pass_is_timed_while_installed_and_only_then() -> None:
    metrics = Metrics()
    pauses = GcPauses(metrics.gc_pause_seconds)
    with pauses.installed():
        gc.collect()
        gc.collect(0)
    assert _passes(metrics, "2") >= 1
    assert _passes(metrics, "0") >= 1
    assert pauses not in gc.callbacks
    seen = _passes(metrics, "2")
    gc.collect()
    assert _passes(metrics, "2") == seen


def test_the_registry_carries_process_and_collector_series() -> None:
    metrics = Metrics()
    assert metrics.registry.get_sample_value("process_resident_memory_bytes")
    assert (
        metrics.registry.get_sample_value(
            "python_gc_collections_total", {"generation": "2"}
        )
        is not None
    )
    # The status counters stay the daemon's own.
    assert not any(k.startswith(("process", "python")) for k in metrics.snapshot())


def test_status_counts_passes_per_generation() -> None:
    before = gc_status()
    gc.collect()
    after = gc_status()
    assert len(after["collections"]) == 3
    assert after["collections"][2] > before["collections"][2]
    assert after["frozen_objects"] == gc.get_freeze_count()
