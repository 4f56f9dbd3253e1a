"""SQL texts of the PostgreSQL store (`broker.store.postgres`).

Module constants, so asyncpg's per-connection statement cache prepares each
once. Rows are passed as arrays and expanded server-side by ``unnest``. Row
columns come in the order `broker.store.rows` decodes them.

Internal: not for use outside broker/store.
"""

from __future__ import annotations

from typing import Final

from broker.store import REPLAY_DROPS, REPLAY_HEADER

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
    "COMMIT_HELD_FIELDS",
    "COMMIT_HOLD_FIELDS",
    "COMMIT_XREF_FIELDS",
    "HELD_MESSAGES",
    "SWEEP_HOLDS",
    "PROMOTE_PURGED",
    "LIST_HOLDS",
    "HOLD_BLOCKER",
    "PROMOTE_HOLD",
    "RELEASE_JOURNAL",
    "XREF_PUT",
    "XREF_GET",
    "XREF_FIND",
    "XREF_MANY",
    "CLAIM_OUTBOX",
    "DELETE_SENT",
    "RESCHEDULE",
    "PARK",
    "LIST_PARKED",
    "SHOW_PARKED",
    "PARKED_PAGE",
    "PARKED_AMONG",
    "RETRY_PARKED",
    "PURGE_PARKED",
    "LIST_DEAD_LETTERS",
    "REPLAYABLE",
    "REPLAY",
    "PURGEABLE",
    "PURGE",
    "LOAD_SAGA",
    "IDLE_SAGAS",
    "DELETE_SAGAS",
    "JOURNAL",
    "SET_LOCK_TIMEOUT",
    "ENSURE_PARTITIONS",
    "DROP_PARTITIONS",
    "PRUNE_INBOX_DEFAULT",
    "PRUNE_JOURNAL_DEFAULT",
    "PRUNE_OUTBOX",
    "PRUNE_DEAD_LETTERS",
    "COUNTS",
    "PING",
]

#: Above this many rows, `counts()` reports the planner's estimate instead.
EXACT_COUNT_CAP: Final = 100_000

# --- the batch in two round trips (prepare_batch, commit_batch) ---------------------

# Claimed keys (kind 0), stored instances (kind 1) and holds (kind 2) in one
# statement; an instance's columns come first, in the order `rows.saga_record`
# decodes, and a hold's blocker is the last column. Each key is one probe of
# the inbox primary key on its own day, and each instance one probe of the
# saga primary key, whatever the tables' sizes and statistics. The LIMIT 1
# (each probe finds at most one row: primary keys) is what guarantees it: a
# plain LATERAL subquery is pulled up into an ordinary join, and on a fresh
# day's partition with stale statistics the planner hash-joined the batch's
# keys against every key of the consumer for the day (9,330 rows read for 6
# keys, 1.6 ms a call at 1,000 msg/s, growing with the day). "key = ANY($2)"
# had the same fault: 1.25 s a call at 200k keys. The hold probe per
# instance finds nothing in the common case, in a table that is mostly empty.
PREPARE_BATCH = """
SELECT k.key, NULL::bigint, NULL::bytea, NULL::timestamptz, 0 AS kind, NULL::text
FROM unnest($2::text[], $5::date[]) AS u(key, day)
CROSS JOIN LATERAL (
    SELECT i.key FROM inbox AS i
    WHERE i.consumer = $1 AND i.key = u.key AND i.day = u.day
    LIMIT 1
) AS k
UNION ALL
SELECT s.correlation_id, s.version, s.state, s.updated_at, 1, NULL
FROM unnest($4::text[]) AS c(id)
CROSS JOIN LATERAL (
    SELECT correlation_id, version, state, updated_at FROM saga
    WHERE workflow = $3 AND correlation_id = c.id
    LIMIT 1
) AS s
UNION ALL
SELECT h.correlation_id, NULL, NULL, NULL, 2, h.message_id
FROM unnest($4::text[]) AS c(id)
CROSS JOIN LATERAL (
    SELECT correlation_id, message_id FROM hold
    WHERE workflow = $3 AND correlation_id = c.id
    LIMIT 1
) AS h
"""

# One call of the function in migrations/postgres/0003_holds_delays_xref.sql.
# Its parameters: the consumer, one array per field of the keys, the workflow,
# the instances' arrays, the outbox rows' arrays (their delays last), the lease
# in seconds, then the arrays of the dead letters, of the journal entries, of
# the held messages, of the holds, the released message ids, and the arrays of
# the xref entries.
COMMIT_BATCH = """
SELECT q2c_commit_batch_v2(
    $1, $2::text[], $3::date[], $4::text[],
    $5, $6::text[], $7::bigint[], $8::bytea[],
    $9::text[], $10::text[], $11::text[], $12::bytea[], $13::text[], $14::text[],
    $15::text[], $16::float8[], $17,
    $18::text[], $19::text[], $20::text[], $21::text[], $22::text[], $23::bytea[],
    $24::text[], $25::int[], $26::text[], $27::text[],
    $28::text[], $29::text[], $30::text[], $31::text[], $32::text[],
    $33::text[], $34::text[], $35::text[], $36::text[], $37::bytea[], $38::text[],
    $39::int[], $40::text[], $41::text[],
    $42::text[], $43::text[], $44::text[],
    $45::text[],
    $46::text[], $47::text[], $48::text[], $49::text[], $50::text[])
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
    "delay_s",
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
COMMIT_HELD_FIELDS: Final = (
    "message_id",
    "queue",
    "routing_key",
    "detail",
    "body",
    "headers",
    "attempts",
    "correlation_id",
    "type",
)
COMMIT_HOLD_FIELDS: Final = ("correlation_id", "message_id", "expected")
COMMIT_XREF_FIELDS: Final = (
    "kind",
    "canonical_id",
    "system",
    "native_id",
    "content_hash",
)

_DEAD_LETTER_COLUMNS = """
    id, message_id, queue, routing_key, reason, detail, body, headers::text,
    attempts, correlation_id, type, status, replays, first_seen, last_seen, workflow
"""

# --- holds ---------------------------------------------------------------------------

# The held messages of some instances: a LATERAL probe of dead_letter_held per
# instance, at most $3 each, by instance and then in arrival order. The last
# column (held_seq) is there for the ORDER BY; the row decoder ignores it.
HELD_MESSAGES = f"""
SELECT d.* FROM unnest($2::text[]) AS c(id)
CROSS JOIN LATERAL (
    SELECT {_DEAD_LETTER_COLUMNS}, held_seq FROM dead_letter
    WHERE workflow = $1 AND correlation_id = c.id AND status = 'held'
    ORDER BY held_seq
    LIMIT $3
) AS d
ORDER BY c.id, d.held_seq
"""

SWEEP_HOLDS = "SELECT q2c_sweep_holds($1)"

# After purging: the holds whose blocker was purged are handed on, each read
# again under its row lock (migration 0008): one moved on meanwhile is left.
PROMOTE_PURGED = """
SELECT q2c_promote_hold_seen(workflow, correlation_id, message_id)
FROM hold WHERE message_id = ANY($1::text[])
ORDER BY workflow, correlation_id
"""

# The holds (of one workflow, $1, or all), longest held first: each with its
# held count (dead_letter_held probes) and its blocker's dead-letter status.
LIST_HOLDS = """
SELECT h.workflow, h.correlation_id, h.message_id, h.since, h.updated_at,
       (SELECT count(*) FROM dead_letter AS d
        WHERE d.workflow = h.workflow AND d.correlation_id = h.correlation_id
          AND d.status = 'held'),
       b.status
FROM hold AS h
LEFT JOIN dead_letter AS b ON b.message_id = h.message_id
WHERE $1::text IS NULL OR h.workflow = $1
ORDER BY h.since, h.workflow, h.correlation_id
LIMIT $2
"""

# An operator's release: the hold's row is locked until the release commits,
# so a writer that moves the hold meanwhile conflicts (QC002) and reads again.
HOLD_BLOCKER = """
SELECT h.message_id, b.status, b.id
FROM hold AS h
LEFT JOIN dead_letter AS b ON b.message_id = h.message_id
WHERE h.workflow = $1 AND h.correlation_id = $2
FOR UPDATE OF h
"""

PROMOTE_HOLD = "SELECT q2c_promote_hold($1, $2)"

RELEASE_JOURNAL = """
INSERT INTO journal (message_id, correlation_id, stage, type, detail)
VALUES ($1, $2, 'released', (SELECT type FROM dead_letter WHERE message_id = $1), $3)
"""

# --- xref ----------------------------------------------------------------------------

XREF_PUT = """
SELECT q2c_xref_put($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
"""

_XREF_COLUMNS = "kind, canonical_id, system, native_id, content_hash, updated_at"

XREF_GET = f"""
SELECT {_XREF_COLUMNS} FROM xref WHERE kind = $1 AND canonical_id = $2 ORDER BY system
"""

XREF_FIND = f"""
SELECT {_XREF_COLUMNS} FROM xref WHERE kind = $1 AND system = $2 AND native_id = $3
"""

XREF_MANY = f"""
SELECT {_XREF_COLUMNS} FROM xref
WHERE kind = $1 AND canonical_id = ANY($2::text[])
ORDER BY canonical_id, system
"""

# --- the relay, operators and maintenance -------------------------------------------

_OUTBOX_COLUMNS = (
    "o.id, o.message_id, o.exchange, o.routing_key, o.body, o.correlation_id, o.type, "
    "o.headers::text, o.attempts"
)

# The due rows, longest due first, read from the outbox_due index (0003) up to
# now(): pending rows due later are never visited. The ids are collected into
# an array so that the update probes the primary key for each; joined to the
# subquery, the planner (expecting LIMIT rows) chose to scan the whole table.
CLAIM_OUTBOX = f"""
UPDATE outbox AS o
SET lease_until = now() + make_interval(secs => $2), attempts = o.attempts + 1
WHERE o.id = ANY(ARRAY(
    SELECT id FROM outbox
    WHERE sent_at IS NULL AND parked_reason IS NULL
      AND greatest(next_attempt_at, lease_until) <= now()
    ORDER BY greatest(next_attempt_at, lease_until), id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
))
RETURNING {_OUTBOX_COLUMNS}
"""

# A confirmed row has done its work and goes at once: the table holds only
# what is still to publish (or parked), and a publish costs no second row
# version. Nothing reads a sent row; the receiver's inbox keeps its id.
DELETE_SENT = """
DELETE FROM outbox WHERE id = ANY($1::bigint[])
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

# Parked rows, for an operator: each statement reads outbox_parked (0008) or
# probes the primary key, and touches at most the ids or LIMIT it is given.
_PARKED = "parked_reason IS NOT NULL AND sent_at IS NULL"

_PARKED_COLUMNS = """
    id, message_id, exchange, routing_key, correlation_id, type, headers::text,
    attempts, parked_reason, created_at, octet_length(body)
"""

LIST_PARKED = f"""
SELECT {_PARKED_COLUMNS} FROM outbox WHERE {_PARKED} ORDER BY id DESC LIMIT $1
"""

SHOW_PARKED = f"""
SELECT {_PARKED_COLUMNS}, body FROM outbox WHERE id = $1 AND {_PARKED}
"""

PARKED_PAGE = f"""
SELECT id FROM outbox WHERE {_PARKED} AND id > $1 ORDER BY id LIMIT $2
"""

PARKED_AMONG = f"""
SELECT id FROM outbox WHERE id = ANY($1::bigint[]) AND {_PARKED}
"""

# Unparked, a row is due now, unleased, and starts its attempts afresh: the
# poller claims it as it claims a replay. The condition is checked again on
# the row updated, so a row sent or retried meanwhile is left alone.
RETRY_PARKED = f"""
UPDATE outbox
SET parked_reason = NULL, next_attempt_at = now(), lease_until = NULL, attempts = 0
WHERE id = ANY($1::bigint[]) AND {_PARKED}
RETURNING id
"""

PURGE_PARKED = f"""
DELETE FROM outbox WHERE id = ANY($1::bigint[]) AND {_PARKED}
RETURNING id
"""

# $1..$5 select rows; every dead-letter statement below shares these parameters.
_DL_MATCH = """
    (cardinality($1::bigint[]) = 0 OR id = ANY($1::bigint[]))
    AND ($2::text IS NULL OR reason = $2)
    AND ($3::text IS NULL OR queue = $3)
    AND ($4::text IS NULL OR type = $4)
    AND ($5::text IS NULL OR correlation_id = $5)
"""

# $6: one status, 'open' (parked or held), or NULL (any).
_DL_STATUS = """
    ($6::text IS NULL OR status = $6 OR ($6 = 'open' AND status IN ('parked', 'held')))
"""

LIST_DEAD_LETTERS = f"""
SELECT {_DEAD_LETTER_COLUMNS}
FROM dead_letter
WHERE {_DL_MATCH} AND {_DL_STATUS}
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
           (headers - '{REPLAY_DROPS[0]}' - '{REPLAY_DROPS[1]}')
               || jsonb_build_object('{REPLAY_HEADER}', replays)
    FROM replayed
    ORDER BY id
)
SELECT id FROM replayed ORDER BY id DESC
"""

PURGEABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND {_DL_STATUS} AND status <> 'purged'
ORDER BY id DESC
LIMIT $7
"""

PURGE = f"""
UPDATE dead_letter SET status = 'purged', body = ''::bytea
WHERE id IN ({PURGEABLE} FOR UPDATE)
RETURNING id, message_id
"""

LOAD_SAGA = """
SELECT correlation_id, version, state, updated_at
FROM saga WHERE workflow = $1 AND correlation_id = $2
"""

# The newest *limit* facts (a long-lived instance has more), oldest first.
JOURNAL = """
SELECT * FROM (
    SELECT id, at, message_id, correlation_id, stage, type, detail
    FROM journal WHERE correlation_id = $1
    ORDER BY at DESC, id DESC
    LIMIT $2
) AS newest
ORDER BY at, id
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

# Rows marked sent by releases that kept them (now confirmed rows are deleted
# at once, `DELETE_SENT`), read from outbox_sent (0008).
PRUNE_OUTBOX = """
DELETE FROM outbox WHERE id = ANY(ARRAY(
    SELECT id FROM outbox WHERE sent_at < now() - make_interval(days => $1) LIMIT $2))
"""

# Dead letters nothing waits on any more, by last_seen (dead_letter_settled,
# 0008); parked and held ones stay for an operator, and so does a released
# one that still blocks its instance. The conditions are checked again on the
# row deleted: a new failure of the same message may have parked it since.
PRUNE_DEAD_LETTERS = """
DELETE FROM dead_letter
WHERE id = ANY(ARRAY(
    SELECT d.id FROM dead_letter AS d
    WHERE d.status IN ('released', 'replayed', 'purged')
      AND d.last_seen < now() - make_interval(days => $1)
      AND NOT EXISTS (SELECT 1 FROM hold AS h WHERE h.message_id = d.message_id)
    LIMIT $2))
  AND status IN ('released', 'replayed', 'purged')
  AND last_seen < now() - make_interval(days => $1)
"""

# A workflow's instances without a change for $2 days, after ($3, $4) in
# (updated_at, correlation_id) order, by saga_idle (0010): one page.
IDLE_SAGAS = """
SELECT correlation_id, version, state, updated_at FROM saga
WHERE workflow = $1
  AND updated_at < now() - make_interval(days => $2)
  AND (updated_at, correlation_id) > ($3::timestamptz, $4::text)
ORDER BY updated_at, correlation_id
LIMIT $5
"""

# Instances ($2 ids at $3 versions) that nothing touched since they were
# read, and that nothing waits to reach: no hold, no timer due later. The
# timers are the pending outbox rows due after now, read by outbox_due's
# range (few: an outage's backlog is due already), not the whole outbox.
DELETE_SAGAS = """
WITH timers AS MATERIALIZED (
    SELECT o.correlation_id FROM outbox AS o
    WHERE greatest(o.next_attempt_at, o.lease_until) > now()
      AND o.sent_at IS NULL AND o.parked_reason IS NULL
)
DELETE FROM saga AS s
USING unnest($2::text[], $3::bigint[]) AS d(cid, version)
WHERE s.workflow = $1 AND s.correlation_id = d.cid AND s.version = d.version
  AND NOT EXISTS (
      SELECT 1 FROM hold AS h WHERE h.workflow = $1 AND h.correlation_id = d.cid)
  AND NOT EXISTS (SELECT 1 FROM timers AS t WHERE t.correlation_id = d.cid)
"""

# The parked count reads outbox_parked (0008).
COUNTS = f"""
SELECT
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NULL),
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NOT NULL),
    (SELECT count(*) FROM dead_letter WHERE status = 'parked'),
    (SELECT count(*) FROM dead_letter WHERE status = 'held'),
    (SELECT count(*) FROM hold),
    (SELECT count(*) FROM (SELECT 1 FROM saga LIMIT {EXACT_COUNT_CAP}) AS s),
    (SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'saga'::regclass),
    (SELECT count(*) FROM (SELECT 1 FROM inbox LIMIT {EXACT_COUNT_CAP}) AS i),
    (SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::bigint
     FROM pg_inherits AS h JOIN pg_class AS c ON c.oid = h.inhrelid
     WHERE h.inhparent = 'inbox'::regclass)
"""

PING = "SELECT 1"
