"""Benchmarks of the engine against a naive pipeline and a bare pass-through.

``python -m bench.ledger`` is the one command; ``bench/README.md`` says how
to read its output. Nothing here is imported by the daemon.
"""

from __future__ import annotations

__all__: list[str] = []
