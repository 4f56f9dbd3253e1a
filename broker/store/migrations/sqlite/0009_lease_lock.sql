-- Named locks held by lease (PostgreSQL's 0009), times in seconds since the
-- epoch. One daemon uses an SQLite store, but the same code takes them.
CREATE TABLE lease_lock (
    key    TEXT PRIMARY KEY,
    owner  TEXT NOT NULL,
    until  REAL NOT NULL
);
