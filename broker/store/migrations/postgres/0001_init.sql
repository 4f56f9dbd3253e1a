-- Q2C Broker store, PostgreSQL 15. Applied once by broker.store.migrate, inside a
-- transaction, under an advisory lock; recorded in schema_migrations.

-- Inbox: one row per (consumer, idempotency key). Partitioned by the business
-- fact's own date, so every redelivery of a message lands in the same partition
-- and retention is DROP TABLE of whole days, never a large DELETE. The DEFAULT
-- partition catches days that have no partition (yet, or any more): an insert
-- never fails for want of a partition.
CREATE TABLE inbox (
    consumer    text        NOT NULL,
    key         text        NOT NULL,
    day         date        NOT NULL,
    message_id  text        NOT NULL,
    claimed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, key, day)
) PARTITION BY RANGE (day);

CREATE TABLE inbox_default PARTITION OF inbox DEFAULT;

-- Saga (workflow instance) state with an optimistic version: 1 on create,
-- +1 on every update, and every update checks the version it read.
CREATE TABLE saga (
    workflow        text        NOT NULL,
    correlation_id  text        NOT NULL,
    version         bigint      NOT NULL CHECK (version > 0),
    state           bytea       NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow, correlation_id)
);

-- Transactional outbox. A row is "pending" while sent_at and parked_reason are
-- both NULL; the relay leases pending rows (lease_until) with SKIP LOCKED.
-- attempts counts leases handed out, the writer's own first lease included.
CREATE TABLE outbox (
    id               bigserial   PRIMARY KEY,
    message_id       text        NOT NULL,
    exchange         text        NOT NULL,
    routing_key      text        NOT NULL,
    body             bytea       NOT NULL,
    correlation_id   text,
    type             text,
    headers          jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    lease_until      timestamptz,
    sent_at          timestamptz,
    parked_reason    text
);

CREATE INDEX outbox_pending ON outbox (id)
    WHERE sent_at IS NULL AND parked_reason IS NULL;

-- Dead letters: the original bytes and why, one row per message id.
CREATE TABLE dead_letter (
    id              bigserial   PRIMARY KEY,
    message_id      text        NOT NULL UNIQUE,
    queue           text        NOT NULL,
    routing_key     text        NOT NULL,
    reason          text        NOT NULL,
    detail          text        NOT NULL,
    body            bytea       NOT NULL,
    headers         jsonb       NOT NULL DEFAULT '{}',
    attempts        integer     NOT NULL DEFAULT 1,
    correlation_id  text,
    type            text,
    status          text        NOT NULL DEFAULT 'parked'
                                CHECK (status IN ('parked', 'replayed', 'purged')),
    replays         integer     NOT NULL DEFAULT 0,
    first_seen      timestamptz NOT NULL DEFAULT now(),
    last_seen       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX dead_letter_status ON dead_letter (status, id);

-- Journal: append-only audit of every message and stage, partitioned by day
-- (UTC) with a DEFAULT partition, like the inbox.
CREATE TABLE journal (
    id              bigserial   NOT NULL,
    at              timestamptz NOT NULL DEFAULT now(),
    message_id      text        NOT NULL,
    correlation_id  text,
    stage           text        NOT NULL,
    type            text,
    detail          text        NOT NULL DEFAULT ''
) PARTITION BY RANGE (at);

CREATE TABLE journal_default PARTITION OF journal DEFAULT;

CREATE INDEX journal_correlation ON journal (correlation_id, at, id);

-- Daily partitions for inbox (by day) and journal (by UTC day), named
-- <table>_pYYYYMMDD. Rows already in the DEFAULT partition for a new day are
-- moved into it first, so ATTACH never fails; ATTACH (unlike CREATE TABLE ...
-- PARTITION OF) takes only SHARE UPDATE EXCLUSIVE on the parent, so inserts
-- keep flowing. Serialized between daemons by an advisory lock.
CREATE FUNCTION q2c_ensure_partitions(p_table text, p_first date, p_last date)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    i       integer;
    d       date;
    part    text;
    col     text;
    lo      text;
    hi      text;
    created integer := 0;
BEGIN
    IF p_table NOT IN ('inbox', 'journal') THEN
        RAISE EXCEPTION 'q2c_ensure_partitions: unknown table %', p_table;
    END IF;
    PERFORM pg_advisory_xact_lock(7170001);
    col := CASE p_table WHEN 'inbox' THEN 'day' ELSE 'at' END;
    FOR i IN 0 .. (p_last - p_first) LOOP
        d := p_first + i;
        part := p_table || '_p' || to_char(d, 'YYYYMMDD');
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        IF p_table = 'journal' THEN
            lo := to_char(d, 'YYYY-MM-DD') || ' 00:00:00+00';
            hi := to_char(d + 1, 'YYYY-MM-DD') || ' 00:00:00+00';
        ELSE
            lo := to_char(d, 'YYYY-MM-DD');
            hi := to_char(d + 1, 'YYYY-MM-DD');
        END IF;
        EXECUTE format(
            'CREATE TABLE %I (LIKE %I INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
            part, p_table);
        EXECUTE format(
            'WITH moved AS (DELETE FROM %I WHERE %I >= %L AND %I < %L RETURNING *) '
            'INSERT INTO %I SELECT * FROM moved',
            p_table || '_default', col, lo, col, hi, part);
        EXECUTE format(
            'ALTER TABLE %I ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
            p_table, part, lo, hi);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Drop the daily partitions of p_table whose whole day lies before p_before.
CREATE FUNCTION q2c_drop_partitions(p_table text, p_before date)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    part    text;
    dropped integer := 0;
BEGIN
    IF p_table NOT IN ('inbox', 'journal') THEN
        RAISE EXCEPTION 'q2c_drop_partitions: unknown table %', p_table;
    END IF;
    PERFORM pg_advisory_xact_lock(7170001);
    FOR part IN
        SELECT c.relname
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = p_table::regclass
          AND c.relname ~ ('^' || p_table || '_p[0-9]{8}$')
          AND to_date(right(c.relname, 8), 'YYYYMMDD') < p_before
        ORDER BY c.relname
    LOOP
        EXECUTE format('DROP TABLE %I', part);
        dropped := dropped + 1;
    END LOOP;
    RETURN dropped;
END
$$;
