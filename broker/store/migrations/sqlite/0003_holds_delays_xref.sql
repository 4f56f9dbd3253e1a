-- Delayed outbox rows, messages held behind a parked one, and the xref registry:
-- the same schema as PostgreSQL's 0003.

-- A pending row is due when its next attempt time and its lease (if any) have
-- both passed: one expression, indexed, so rows due later cost the relay's poll
-- nothing. It replaces outbox_pending.
DROP INDEX outbox_pending;
CREATE INDEX outbox_due ON outbox (max(next_attempt_at, coalesce(lease_until, 0)), id)
    WHERE sent_at IS NULL AND parked_reason IS NULL;

-- A CHECK constraint cannot be altered in SQLite: the dead-letter table is
-- rebuilt with the statuses 'held' and 'released', the instance a held message
-- waits in (workflow, correlation_id) and its place (held_seq).
CREATE TABLE dead_letter_v3 (
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
                            CHECK (status IN ('parked', 'held', 'released', 'replayed',
                                              'purged')),
    replays         INTEGER NOT NULL DEFAULT 0,
    first_seen      REAL    NOT NULL,
    last_seen       REAL    NOT NULL,
    workflow        TEXT,
    held_seq        INTEGER
);

INSERT INTO dead_letter_v3 (id, message_id, queue, routing_key, reason, detail, body,
                            headers, attempts, correlation_id, type, status, replays,
                            first_seen, last_seen)
SELECT id, message_id, queue, routing_key, reason, detail, body, headers, attempts,
       correlation_id, type, status, replays, first_seen, last_seen
FROM dead_letter;

DROP TABLE dead_letter;
ALTER TABLE dead_letter_v3 RENAME TO dead_letter;

CREATE INDEX dead_letter_status ON dead_letter (status, id);
CREATE INDEX dead_letter_held ON dead_letter (workflow, correlation_id, held_seq)
    WHERE status = 'held';
CREATE INDEX dead_letter_held_seq ON dead_letter (held_seq) WHERE held_seq IS NOT NULL;

CREATE TABLE hold (
    workflow        TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    message_id      TEXT NOT NULL,
    since           REAL NOT NULL,
    updated_at      REAL NOT NULL,
    PRIMARY KEY (workflow, correlation_id)
);

CREATE INDEX hold_message ON hold (message_id);

CREATE TABLE xref (
    kind          TEXT NOT NULL,
    canonical_id  TEXT NOT NULL,
    system        TEXT NOT NULL,
    native_id     TEXT NOT NULL,
    content_hash  TEXT NOT NULL DEFAULT '',
    updated_at    REAL NOT NULL,
    PRIMARY KEY (kind, canonical_id, system),
    CONSTRAINT xref_native UNIQUE (kind, system, native_id)
);
