-- Q2C Broker store, embedded SQLite (3.35 or later: RETURNING, UPSERT, JSON1).
-- The same tables as on PostgreSQL, without partitions: retention deletes in
-- bounded chunks. Times are UTC seconds since the epoch (REAL); days are
-- ISO dates (TEXT), so both compare correctly as stored.

CREATE TABLE inbox (
    consumer    TEXT NOT NULL,
    key         TEXT NOT NULL,
    day         TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    claimed_at  REAL NOT NULL,
    PRIMARY KEY (consumer, key, day)
);

CREATE INDEX inbox_day ON inbox (day);

CREATE TABLE saga (
    workflow        TEXT    NOT NULL,
    correlation_id  TEXT    NOT NULL,
    version         INTEGER NOT NULL CHECK (version > 0),
    state           BLOB    NOT NULL,
    updated_at      REAL    NOT NULL,
    PRIMARY KEY (workflow, correlation_id)
);

CREATE TABLE outbox (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id       TEXT    NOT NULL,
    exchange         TEXT    NOT NULL,
    routing_key      TEXT    NOT NULL,
    body             BLOB    NOT NULL,
    correlation_id   TEXT,
    type             TEXT,
    headers          TEXT    NOT NULL DEFAULT '{}',
    created_at       REAL    NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  REAL    NOT NULL,
    lease_until      REAL,
    sent_at          REAL,
    parked_reason    TEXT
);

CREATE INDEX outbox_pending ON outbox (id)
    WHERE sent_at IS NULL AND parked_reason IS NULL;

CREATE INDEX outbox_sent ON outbox (sent_at) WHERE sent_at IS NOT NULL;

CREATE TABLE dead_letter (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id      TEXT    NOT NULL UNIQUE,
    queue           TEXT    NOT NULL,
    routing_key     TEXT    NOT NULL,
    reason          TEXT    NOT NULL,
    detail          TEXT    NOT NULL,
    body            BLOB    NOT NULL,
    headers         TEXT    NOT NULL DEFAULT '{}',
    attempts        INTEGER NOT NULL DEFAULT 1,
    correlation_id  TEXT,
    type            TEXT,
    status          TEXT    NOT NULL DEFAULT 'parked'
                            CHECK (status IN ('parked', 'replayed', 'purged')),
    replays         INTEGER NOT NULL DEFAULT 0,
    first_seen      REAL    NOT NULL,
    last_seen       REAL    NOT NULL
);

CREATE INDEX dead_letter_status ON dead_letter (status, id);

CREATE TABLE journal (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    at              REAL    NOT NULL,
    message_id      TEXT    NOT NULL,
    correlation_id  TEXT,
    stage           TEXT    NOT NULL,
    type            TEXT,
    detail          TEXT    NOT NULL DEFAULT ''
);

CREATE INDEX journal_correlation ON journal (correlation_id, at, id);

CREATE INDEX journal_at ON journal (at);
