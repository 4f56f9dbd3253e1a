"""The ledger workflow: counts effects for benchmarks and crash tests."""

from __future__ import annotations

from actors.ledger.workflow import LedgerState, LedgerWorkflow

__all__ = ["LedgerState", "LedgerWorkflow"]
