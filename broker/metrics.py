"""Counters the daemon keeps about itself, for ``brokerctl status`` and Prometheus.

One `Metrics` per daemon, with its own registry, so several daemons in one
test process do not share counts. Counters are bumped once per batch, never
once per message, to stay off the hot path.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    ProcessCollector,
)

__all__ = ["Metrics"]


class Metrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter(
            "q2c_messages_received",
            "Deliveries taken from queues",
            ["queue"],
            registry=r,
        )
        self.redelivered = Counter(
            "q2c_messages_redelivered",
            "Deliveries the broker marked as delivered before (after a lost "
            "connection, a crash or a requeue)",
            ["queue"],
            registry=r,
        )
        self.applied = Counter(
            "q2c_messages_applied",
            "Messages applied to workflow state",
            ["workflow"],
            registry=r,
        )
        self.duplicates = Counter(
            "q2c_messages_duplicate",
            "Deliveries skipped as duplicates",
            ["workflow"],
            registry=r,
        )
        self.dead_lettered = Counter(
            "q2c_messages_dead_lettered",
            "Messages dead-lettered",
            ["reason"],
            registry=r,
        )
        self.retried = Counter(
            "q2c_messages_retried",
            "Messages sent to a retry tier",
            ["workflow"],
            registry=r,
        )
        self.held = Counter(
            "q2c_messages_held",
            "Messages held behind a failed message of the same instance",
            ["workflow"],
            registry=r,
        )
        self.released = Counter(
            "q2c_messages_released",
            "Held messages applied once their blocker was",
            ["workflow"],
            registry=r,
        )
        self.published = Counter(
            "q2c_outbox_published", "Outbox rows confirmed by the broker", registry=r
        )
        self.publish_failed = Counter(
            "q2c_outbox_publish_failed",
            "Outbox rows not confirmed",
            ["outcome"],
            registry=r,
        )
        self.webhook_requests = Counter(
            "q2c_webhook_requests",
            "Webhook requests answered, by system and outcome (accepted, echo, "
            "signature_invalid, schema_invalid, too_large, throttled, refused, "
            "unconfirmed, unroutable, ...)",
            ["system", "outcome"],
            registry=r,
        )
        self.commit_retries = Counter(
            "q2c_batch_commit_retries", "Batch transactions retried", registry=r
        )
        self.gateway_calls = Counter(
            "q2c_gateway_calls",
            "Calls to external systems, by system and outcome (ok, rejected, "
            "invalid, unavailable, timeout, error, deferred: the connector's own "
            "wait, such as a key another daemon holds)",
            ["system", "outcome"],
            registry=r,
        )
        self.vendor_requests = Counter(
            "q2c_vendor_requests",
            "HTTP requests made of external systems, by system and answer "
            "(2xx, 3xx, 4xx, 429, 5xx; failed: no answer): what a vendor's "
            "request limits count",
            ["system", "status"],
            registry=r,
        )
        self.gateway_commands = Counter(
            "q2c_gateway_commands",
            "Commands a system actor finished with, by system and outcome "
            "(completed, duplicate, retry_scheduled, dead_lettered, returned)",
            ["system", "outcome"],
            registry=r,
        )
        self.gateway_in_flight = Gauge(
            "q2c_gateway_in_flight",
            "Calls to an external system in flight",
            ["system"],
            registry=r,
        )
        self.gateway_breaker_state = Gauge(
            "q2c_gateway_breaker_state",
            "A system's circuit breaker: 0 closed, 1 half-open, 2 open",
            ["system"],
            registry=r,
        )
        self.gateway_breaker_opened = Counter(
            "q2c_gateway_breaker_opened",
            "Times a system's circuit breaker opened",
            ["system"],
            registry=r,
        )
        self.batch_size = Histogram(
            "q2c_batch_size",
            "Deliveries per committed batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2500),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "q2c_batch_commit_seconds",
            "Time to process and commit one batch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=r,
        )
        self.gc_pause_seconds = Histogram(
            "q2c_gc_pause_seconds",
            "Cycle collector passes, each a stall of the event loop",
            ["generation"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        # The usual process_* (CPU, RSS, open fds) and python_gc_* series.
        ProcessCollector(registry=r)
        GCCollector(registry=r)

    def snapshot(self) -> dict[str, Any]:
        """The daemon's own totals, summed over labels, for status replies."""
        out: dict[str, Any] = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name.startswith("q2c_") and sample.name.endswith("_total"):
                    name = sample.name.removeprefix("q2c_").removesuffix("_total")
                    out[name] = out.get(name, 0) + int(sample.value)
        return out
