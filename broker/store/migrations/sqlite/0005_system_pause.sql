-- Systems an operator paused (brokerctl pause): the same schema as PostgreSQL's
-- 0005, with times in seconds since the epoch.
CREATE TABLE system_pause (
    system      TEXT PRIMARY KEY,
    reason      TEXT NOT NULL DEFAULT '',
    paused_by   TEXT NOT NULL DEFAULT '',
    since       REAL NOT NULL,
    updated_at  REAL NOT NULL
);
