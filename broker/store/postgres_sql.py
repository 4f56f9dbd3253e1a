"""SQL texts of the PostgreSQL store (`broker.store.postgres`).

Module constants, so asyncpg's per-connection statement cache prepares each
once. Rows are passed as arrays and expanded server-side by ``unnest``. Row
columns come in the order `broker.store.rows` decodes them.

Internal: not for use outside broker/store.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "EXACT_COUNT_CAP",
    "MAINTENANCE_LOCK_TIMEOUT",
    "PREPARE_BATCH",
    "COMMIT_BATCH",
    "COMMIT_KEY_FIELDS",
    "COMMIT_SAGA_FIELDS",
    "COMMIT_OUTBOX_FIELDS",
    "COMMIT_DEAD_LETTER_FIELDS",
    "COMMIT_JOURNAL_FIELDS",
    "CLAIM_OUTBOX",
    "MARK_SENT",
    "RESCHEDULE",
    "PARK",
    "LIST_DEAD_LETTERS",
    "REPLAYABLE",
    "REPLAY",
    "PURGEABLE",
    "PURGE",
    "LOAD_SAGA",
    "JOURNAL",
    "SET_LOCK_TIMEOUT",
    "ENSURE_PARTITIONS",
    "DROP_PARTITIONS",
    "PRUNE_INBOX_DEFAULT",
    "PRUNE_JOURNAL_DEFAULT",
    "PRUNE_OUTBOX",
    "COUNTS",
]

#: Above this many rows, `counts()` reports the planner's estimate instead.
EXACT_COUNT_CAP: Final = 100_000

# --- the batch in two round trips (prepare_batch, commit_batch) ---------------------

# Claimed keys (is_key) and stored instances in one statement; an instance's
# columns come first, in the order `rows.saga_record` decodes. Each key is one
# probe of the inbox primary key on its own day: a LATERAL lookup per array
# element keeps that plan whatever the tables' sizes. (With "key = ANY($2)" a
# generic plan cached while the inbox was small scanned a whole day's
# partition per call once it was large: 1.25 s a call at 200k keys.)
PREPARE_BATCH = """
SELECT k.key, NULL::bigint, NULL::bytea, NULL::timestamptz, true AS is_key
FROM unnest($2::text[], $5::date[]) AS u(key, day)
CROSS JOIN LATERAL (
    SELECT i.key FROM inbox AS i
    WHERE i.consumer = $1 AND i.key = u.key AND i.day = u.day
) AS k
UNION ALL
SELECT s.correlation_id, s.version, s.state, s.updated_at, false
FROM unnest($4::text[]) AS c(id)
CROSS JOIN LATERAL (
    SELECT correlation_id, version, state, updated_at FROM saga
    WHERE workflow = $3 AND correlation_id = c.id
) AS s
"""

# One call of the function in migrations/postgres/0002_commit_batch.sql. Its
# parameters: the consumer, one array per field of the keys, the workflow, the
# instances' arrays, the outbox rows' arrays, the lease in seconds, then the
# arrays of the dead letters and of the journal entries.
COMMIT_BATCH = """
SELECT q2c_commit_batch(
    $1, $2::text[], $3::date[], $4::text[],
    $5, $6::text[], $7::bigint[], $8::bytea[],
    $9::text[], $10::text[], $11::text[], $12::bytea[], $13::text[], $14::text[],
    $15::text[], $16,
    $17::text[], $18::text[], $19::text[], $20::text[], $21::text[], $22::bytea[],
    $23::text[], $24::int[], $25::text[], $26::text[],
    $27::text[], $28::text[], $29::text[], $30::text[], $31::text[])
"""

#: Fields of each group of rows, in the order ``q2c_commit_batch`` takes them.
COMMIT_KEY_FIELDS: Final = ("key", "day", "message_id")
COMMIT_SAGA_FIELDS: Final = ("correlation_id", "expected_version", "state")
COMMIT_OUTBOX_FIELDS: Final = (
    "message_id",
    "exchange",
    "routing_key",
    "body",
    "correlation_id",
    "type",
    "headers",
)
COMMIT_DEAD_LETTER_FIELDS: Final = (
    "message_id",
    "queue",
    "routing_key",
    "reason",
    "detail",
    "body",
    "headers",
    "attempts",
    "correlation_id",
    "type",
)
COMMIT_JOURNAL_FIELDS: Final = (
    "message_id",
    "correlation_id",
    "stage",
    "type",
    "detail",
)

# --- the relay, operators and maintenance -------------------------------------------

_OUTBOX_COLUMNS = (
    "o.id, o.message_id, o.exchange, o.routing_key, o.body, o.correlation_id, o.type, "
    "o.headers::text, o.attempts"
)

CLAIM_OUTBOX = f"""
UPDATE outbox AS o
SET lease_until = now() + make_interval(secs => $2), attempts = o.attempts + 1
FROM (
    SELECT id FROM outbox
    WHERE sent_at IS NULL AND parked_reason IS NULL
      AND next_attempt_at <= now()
      AND (lease_until IS NULL OR lease_until <= now())
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) AS c
WHERE o.id = c.id
RETURNING {_OUTBOX_COLUMNS}
"""

MARK_SENT = """
UPDATE outbox SET sent_at = now(), lease_until = NULL
WHERE id = ANY($1::bigint[]) AND sent_at IS NULL
"""

RESCHEDULE = """
UPDATE outbox
SET next_attempt_at = now() + make_interval(secs => $2), lease_until = NULL
WHERE id = ANY($1::bigint[]) AND sent_at IS NULL
"""

PARK = """
UPDATE outbox SET parked_reason = $2, lease_until = NULL
WHERE id = ANY($1::bigint[]) AND sent_at IS NULL
"""

# $1..$5 select rows; every dead-letter statement below shares these parameters.
_DL_MATCH = """
    (cardinality($1::bigint[]) = 0 OR id = ANY($1::bigint[]))
    AND ($2::text IS NULL OR reason = $2)
    AND ($3::text IS NULL OR queue = $3)
    AND ($4::text IS NULL OR type = $4)
    AND ($5::text IS NULL OR correlation_id = $5)
"""

LIST_DEAD_LETTERS = f"""
SELECT id, message_id, queue, routing_key, reason, detail, body, headers::text,
       attempts, correlation_id, type, status, replays, first_seen, last_seen
FROM dead_letter
WHERE {_DL_MATCH} AND ($6::text IS NULL OR status = $6)
ORDER BY id DESC
LIMIT $7
"""

REPLAYABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND status = 'parked' AND replays < $6
ORDER BY id DESC
LIMIT $7
"""

# The replayed copy goes to the default exchange ("") with the original queue
# as routing key, i.e. straight back to that queue, under the same message id.
REPLAY = f"""
WITH picked AS (
    {REPLAYABLE}
    FOR UPDATE
), replayed AS (
    UPDATE dead_letter AS d SET status = 'replayed', replays = d.replays + 1
    FROM picked WHERE d.id = picked.id
    RETURNING d.id, d.message_id, d.queue, d.body, d.headers, d.replays,
              d.correlation_id, d.type
), queued AS (
    INSERT INTO outbox (message_id, exchange, routing_key, body, correlation_id, type,
                        headers)
    SELECT message_id, '', queue, body, correlation_id, type,
           headers || jsonb_build_object('x-q2c-replay', replays)
    FROM replayed
    ORDER BY id
)
SELECT id FROM replayed ORDER BY id DESC
"""

PURGEABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND ($6::text IS NULL OR status = $6) AND status <> 'purged'
ORDER BY id DESC
LIMIT $7
"""

PURGE = f"""
UPDATE dead_letter SET status = 'purged', body = ''::bytea
WHERE id IN ({PURGEABLE} FOR UPDATE)
RETURNING id
"""

LOAD_SAGA = """
SELECT correlation_id, version, state, updated_at
FROM saga WHERE workflow = $1 AND correlation_id = $2
"""

JOURNAL = """
SELECT id, at, message_id, correlation_id, stage, type, detail
FROM journal WHERE correlation_id = $1
ORDER BY at, id
LIMIT $2
"""

_TODAY = "(now() AT TIME ZONE 'UTC')::date"

# Dropping a partition locks its parent exclusively, and attaching one locks
# the DEFAULT partition exclusively; while such a lock request waits, every
# insert queues behind it. So maintenance waits briefly, then gives up (as
# StoreUnavailable) and is retried at the next prune.
MAINTENANCE_LOCK_TIMEOUT: Final = "500ms"
SET_LOCK_TIMEOUT = f"SET LOCAL lock_timeout = '{MAINTENANCE_LOCK_TIMEOUT}'"

ENSURE_PARTITIONS = f"""
SELECT q2c_ensure_partitions('inbox', d - $1::int, d + $2::int)
     + q2c_ensure_partitions('journal', d, d + $2::int)
FROM (SELECT {_TODAY} AS d) AS today
"""

DROP_PARTITIONS = f"""
SELECT q2c_drop_partitions('inbox', {_TODAY} - $1::int),
       q2c_drop_partitions('journal', {_TODAY} - $2::int)
"""

# Rows for days without a partition sit in the DEFAULT partitions; old ones go
# in chunks, by ctid, so no statement holds many row locks or runs long.
PRUNE_INBOX_DEFAULT = f"""
DELETE FROM inbox_default WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM inbox_default WHERE day < {_TODAY} - $1::int LIMIT $2))
"""

PRUNE_JOURNAL_DEFAULT = f"""
DELETE FROM journal_default WHERE ctid = ANY(ARRAY(
    SELECT ctid FROM journal_default
    WHERE at < ({_TODAY} - $1::int)::timestamp AT TIME ZONE 'UTC' LIMIT $2))
"""

PRUNE_OUTBOX = """
DELETE FROM outbox WHERE id = ANY(ARRAY(
    SELECT id FROM outbox WHERE sent_at < now() - make_interval(days => $1) LIMIT $2))
"""

COUNTS = f"""
SELECT
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NULL),
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NOT NULL),
    (SELECT count(*) FROM dead_letter WHERE status = 'parked'),
    (SELECT count(*) FROM (SELECT 1 FROM saga LIMIT {EXACT_COUNT_CAP}) AS s),
    (SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'saga'::regclass),
    (SELECT count(*) FROM (SELECT 1 FROM inbox LIMIT {EXACT_COUNT_CAP}) AS i),
    (SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
     FROM pg_inherits AS h JOIN pg_class AS c ON c.oid = h.inhrelid
     WHERE h.inhparent = 'inbox'::regclass)
"""
