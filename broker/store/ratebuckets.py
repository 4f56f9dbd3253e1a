"""Per-system rate limits shared by every daemon on one store (DESIGN §9).

One token bucket per external system, in table ``rate_bucket`` (migration
0006). A daemon takes tokens a few at a time (`broker.shared_limits`):
``take_tokens`` refills the bucket by the time passed since it was last
touched, at most to ``burst``, grants up to the tokens asked for, and says
how long until one is there when none was. On PostgreSQL the function
``q2c_take_tokens`` does that under the row's lock, on the database's
clock, so daemons taking at once never share a token; SQLite runs
`refill` in its write transaction.

Internal: the stores use it.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["refill", "PG_TAKE", "SQLITE_READ", "SQLITE_WRITE"]


def refill(
    tokens: float | None,
    elapsed_s: float,
    *,
    want: int,
    rate_per_s: float,
    burst: float,
) -> tuple[int, float, float]:
    """Grant up to *want* tokens from a bucket last left with *tokens*.

    *tokens* is None for a bucket never touched: it starts full.

    Returns:
        ``(granted, tokens_left, wait_s)``: ``wait_s`` is 0 when something
        was granted, else the seconds until one token is there.
    """
    if tokens is None:
        available = burst
    else:
        available = min(burst, tokens + max(0.0, elapsed_s) * rate_per_s)
    granted = max(0, min(want, math.floor(available)))
    wait_s = 0.0 if granted else (1.0 - available) / rate_per_s
    return granted, available - granted, wait_s


PG_TAKE: Final = "SELECT granted, wait_s FROM q2c_take_tokens($1, $2, $3, $4)"

SQLITE_READ: Final = "SELECT tokens, at FROM rate_bucket WHERE system = :system"

SQLITE_WRITE: Final = """
INSERT INTO rate_bucket (system, tokens, at) VALUES (:system, :tokens, :at)
ON CONFLICT (system) DO UPDATE SET tokens = excluded.tokens, at = excluded.at
"""
