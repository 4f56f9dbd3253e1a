-- Per-system rate limits (PostgreSQL's 0006): one token bucket per system, its
-- time in seconds since the epoch. broker/store/ratebuckets.py refills it.
CREATE TABLE rate_bucket (
    system  TEXT PRIMARY KEY,
    tokens  REAL NOT NULL,
    at      REAL NOT NULL
);
