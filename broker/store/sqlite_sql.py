"""SQL texts of the embedded SQLite store (`broker.store.sqlite`).

Row columns come in the order `broker.store.rows` decodes them; times are
seconds since the epoch, days ISO dates.

Internal: not for use outside broker/store.
"""

from __future__ import annotations

__all__ = [
    "CLAIM",
    "CLAIMED_KEYS",
    "LOAD_SAGAS",
    "IDLE_SAGAS",
    "DELETE_SAGAS",
    "LOAD_HOLDS",
    "CREATE_SAGA",
    "UPDATE_SAGA",
    "ADD_OUTBOX",
    "OUTBOX_SEQ",
    "ADD_DEAD_LETTER",
    "ADD_JOURNAL",
    "HELD_SEQ",
    "ADD_HELD",
    "CREATE_HOLD",
    "MOVE_HOLD",
    "DELETE_HOLD",
    "RELEASE",
    "HELD_MESSAGES",
    "FIRST_HELD",
    "MARK_RELEASED",
    "PUT_HOLD",
    "CLEAR_HOLD",
    "PURGED_BLOCKERS",
    "ORPHANED_HELD",
    "HOLDS_OF",
    "LIST_HOLDS",
    "HOLD_BLOCKER",
    "RELEASE_JOURNAL",
    "XREF_BOUND",
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
    "JOURNAL",
    "PRUNE_INBOX",
    "PRUNE_JOURNAL",
    "PRUNE_OUTBOX",
    "PRUNE_DEAD_LETTERS",
    "COUNTS",
    "PING",
]

# json_each() expands one JSON array parameter into rows: one statement per
# batch, like unnest() on PostgreSQL. "WHERE true" resolves the parser's
# ambiguity between a join's ON and the upsert's ON CONFLICT.
CLAIM = """
INSERT INTO inbox (consumer, key, day, message_id, claimed_at)
SELECT :consumer, json_extract(j.value, '$[0]'), json_extract(j.value, '$[1]'),
       json_extract(j.value, '$[2]'), :now
FROM json_each(:keys) AS j
WHERE true
ON CONFLICT DO NOTHING
"""

CLAIMED_KEYS = """
SELECT key FROM inbox
WHERE consumer = :consumer AND key IN (SELECT value FROM json_each(:keys))
"""

_SAGA_COLUMNS = "correlation_id, version, state, updated_at"

LOAD_SAGAS = f"""
SELECT {_SAGA_COLUMNS} FROM saga
WHERE workflow = :workflow AND correlation_id IN (SELECT value FROM json_each(:ids))
"""

LOAD_HOLDS = """
SELECT correlation_id, message_id FROM hold
WHERE workflow = :workflow AND correlation_id IN (SELECT value FROM json_each(:ids))
"""

CREATE_SAGA = """
INSERT INTO saga (workflow, correlation_id, version, state, updated_at)
VALUES (?, ?, 1, ?, ?)
"""

UPDATE_SAGA = """
UPDATE saga SET version = version + 1, state = ?, updated_at = ?
WHERE workflow = ? AND correlation_id = ?
"""

ADD_OUTBOX = """
INSERT INTO outbox (message_id, exchange, routing_key, body, correlation_id, type,
                    headers, created_at, attempts, next_attempt_at, lease_until)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

OUTBOX_SEQ = "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'"

ADD_DEAD_LETTER = """
INSERT INTO dead_letter (message_id, queue, routing_key, reason, detail, body, headers,
                         attempts, correlation_id, type, first_seen, last_seen)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (message_id) DO UPDATE SET
    queue = excluded.queue,
    routing_key = excluded.routing_key,
    reason = excluded.reason,
    detail = excluded.detail,
    body = excluded.body,
    headers = excluded.headers,
    attempts = dead_letter.attempts + excluded.attempts,
    correlation_id = coalesce(excluded.correlation_id, dead_letter.correlation_id),
    type = coalesce(excluded.type, dead_letter.type),
    status = 'parked',
    last_seen = excluded.last_seen
"""

ADD_JOURNAL = """
INSERT INTO journal (at, message_id, correlation_id, stage, type, detail)
VALUES (?, ?, ?, ?, ?, ?)
"""

# --- holds -------------------------------------------------------------------------

_DEAD_LETTER_COLUMNS = """
    id, message_id, queue, routing_key, reason, detail, body, headers,
    attempts, correlation_id, type, status, replays, first_seen, last_seen, workflow
"""

HELD_SEQ = (
    "SELECT coalesce(max(held_seq), 0) FROM dead_letter WHERE held_seq IS NOT NULL"
)

# A message already held keeps its place; any other takes the one given.
ADD_HELD = """
INSERT INTO dead_letter (message_id, queue, routing_key, reason, detail, body, headers,
                         attempts, correlation_id, type, status, workflow, held_seq,
                         first_seen, last_seen)
VALUES (?, ?, ?, 'held', ?, ?, ?, ?, ?, ?, 'held', ?, ?, ?, ?)
ON CONFLICT (message_id) DO UPDATE SET
    queue = excluded.queue,
    routing_key = excluded.routing_key,
    reason = 'held',
    detail = excluded.detail,
    body = excluded.body,
    headers = excluded.headers,
    attempts = max(dead_letter.attempts, excluded.attempts),
    correlation_id = excluded.correlation_id,
    type = coalesce(excluded.type, dead_letter.type),
    workflow = excluded.workflow,
    held_seq = CASE WHEN dead_letter.status = 'held' THEN dead_letter.held_seq
                    ELSE excluded.held_seq END,
    status = 'held',
    last_seen = excluded.last_seen
"""

CREATE_HOLD = """
INSERT INTO hold (workflow, correlation_id, message_id, since, updated_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT DO NOTHING
"""

MOVE_HOLD = """
UPDATE hold SET message_id = ?, updated_at = ?
WHERE workflow = ? AND correlation_id = ? AND message_id = ?
"""

DELETE_HOLD = """
DELETE FROM hold WHERE workflow = ? AND correlation_id = ? AND message_id = ?
"""

RELEASE = """
UPDATE dead_letter SET status = 'released', last_seen = :now
WHERE message_id IN (SELECT value FROM json_each(:ids)) AND status = 'held'
"""

HELD_MESSAGES = f"""
SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letter
WHERE workflow = ? AND correlation_id = ? AND status = 'held'
ORDER BY held_seq
LIMIT ?
"""

FIRST_HELD = """
SELECT id, message_id, queue, body, headers, correlation_id, type FROM dead_letter
WHERE workflow = ? AND correlation_id = ? AND status = 'held'
ORDER BY held_seq
LIMIT 1
"""

MARK_RELEASED = "UPDATE dead_letter SET status = 'released', last_seen = ? WHERE id = ?"

PUT_HOLD = """
INSERT INTO hold (workflow, correlation_id, message_id, since, updated_at)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (workflow, correlation_id) DO UPDATE SET
    message_id = excluded.message_id, updated_at = excluded.updated_at
"""

CLEAR_HOLD = "DELETE FROM hold WHERE workflow = ? AND correlation_id = ?"

PURGED_BLOCKERS = """
SELECT h.workflow, h.correlation_id
FROM hold AS h JOIN dead_letter AS d ON d.message_id = h.message_id
WHERE d.status = 'purged'
ORDER BY h.workflow, h.correlation_id
LIMIT ?
"""

ORPHANED_HELD = """
SELECT DISTINCT d.workflow, d.correlation_id
FROM dead_letter AS d
WHERE d.status = 'held'
  AND NOT EXISTS (
      SELECT 1 FROM hold AS h
      WHERE h.workflow = d.workflow AND h.correlation_id = d.correlation_id)
ORDER BY d.workflow, d.correlation_id
LIMIT ?
"""

HOLDS_OF = """
SELECT workflow, correlation_id FROM hold
WHERE message_id IN (SELECT value FROM json_each(:ids))
ORDER BY workflow, correlation_id
"""

LIST_HOLDS = """
SELECT h.workflow, h.correlation_id, h.message_id, h.since, h.updated_at,
       (SELECT count(*) FROM dead_letter AS d
        WHERE d.workflow = h.workflow AND d.correlation_id = h.correlation_id
          AND d.status = 'held'),
       b.status
FROM hold AS h
LEFT JOIN dead_letter AS b ON b.message_id = h.message_id
WHERE :workflow IS NULL OR h.workflow = :workflow
ORDER BY h.since, h.workflow, h.correlation_id
LIMIT :limit
"""

HOLD_BLOCKER = """
SELECT h.message_id, b.status, b.id
FROM hold AS h
LEFT JOIN dead_letter AS b ON b.message_id = h.message_id
WHERE h.workflow = ? AND h.correlation_id = ?
"""

RELEASE_JOURNAL = """
INSERT INTO journal (at, message_id, correlation_id, stage, type, detail)
VALUES (:now, :message_id, :correlation_id, 'released',
        (SELECT type FROM dead_letter WHERE message_id = :message_id), :detail)
"""

# --- xref ----------------------------------------------------------------------------

_XREF_COLUMNS = "kind, canonical_id, system, native_id, content_hash, updated_at"

XREF_BOUND = """
SELECT canonical_id FROM xref WHERE kind = ? AND system = ? AND native_id = ?
"""

XREF_PUT = """
INSERT INTO xref (kind, canonical_id, system, native_id, content_hash, updated_at)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (kind, canonical_id, system) DO UPDATE SET
    native_id = excluded.native_id,
    content_hash = excluded.content_hash,
    updated_at = excluded.updated_at
WHERE xref.native_id <> excluded.native_id
   OR xref.content_hash <> excluded.content_hash
"""

XREF_GET = f"""
SELECT {_XREF_COLUMNS} FROM xref WHERE kind = ? AND canonical_id = ? ORDER BY system
"""

XREF_FIND = f"""
SELECT {_XREF_COLUMNS} FROM xref WHERE kind = ? AND system = ? AND native_id = ?
"""

XREF_MANY = f"""
SELECT {_XREF_COLUMNS} FROM xref
WHERE kind = :kind AND canonical_id IN (SELECT value FROM json_each(:ids))
ORDER BY canonical_id, system
"""

# --- the relay, operators and maintenance -------------------------------------------

_OUTBOX_COLUMNS = (
    "id, message_id, exchange, routing_key, body, correlation_id, type, headers, "
    "attempts"
)

# A row's due time, written exactly as the outbox_due index (0003) has it, so
# the poll reads that index up to now and never visits rows due later.
_DUE = "max(next_attempt_at, coalesce(lease_until, 0))"

CLAIM_OUTBOX = f"""
UPDATE outbox SET lease_until = :lease_until, attempts = attempts + 1
WHERE id IN (
    SELECT id FROM outbox
    WHERE sent_at IS NULL AND parked_reason IS NULL AND {_DUE} <= :now
    ORDER BY {_DUE}, id
    LIMIT :limit
)
RETURNING {_OUTBOX_COLUMNS}
"""

_IDS = "id IN (SELECT value FROM json_each(:ids))"

# Confirmed rows go at once, as in Postgres (`postgres_sql.DELETE_SENT`).
DELETE_SENT = f"""
DELETE FROM outbox WHERE {_IDS}
"""

RESCHEDULE = f"""
UPDATE outbox SET next_attempt_at = :at, lease_until = NULL
WHERE {_IDS} AND sent_at IS NULL
"""

PARK = f"""
UPDATE outbox SET parked_reason = :reason, lease_until = NULL
WHERE {_IDS} AND sent_at IS NULL
"""

# Parked rows, for an operator, as in Postgres (`postgres_sql.LIST_PARKED`).
# There is no outbox_parked index here: the outbox holds only unsent rows, and
# the pages walk the primary key from :after, so together they read it once.
_PARKED = "parked_reason IS NOT NULL AND sent_at IS NULL"

_PARKED_COLUMNS = """
    id, message_id, exchange, routing_key, correlation_id, type, headers,
    attempts, parked_reason, created_at, length(body)
"""

LIST_PARKED = f"""
SELECT {_PARKED_COLUMNS} FROM outbox WHERE {_PARKED} ORDER BY id DESC LIMIT ?
"""

SHOW_PARKED = f"""
SELECT {_PARKED_COLUMNS}, body FROM outbox WHERE id = ? AND {_PARKED}
"""

PARKED_PAGE = f"""
SELECT id FROM outbox WHERE {_PARKED} AND id > ? ORDER BY id LIMIT ?
"""

PARKED_AMONG = f"""
SELECT id FROM outbox WHERE {_IDS} AND {_PARKED}
"""

RETRY_PARKED = f"""
UPDATE outbox
SET parked_reason = NULL, next_attempt_at = :now, lease_until = NULL, attempts = 0
WHERE {_IDS} AND {_PARKED}
RETURNING id
"""

PURGE_PARKED = f"""
DELETE FROM outbox WHERE {_IDS} AND {_PARKED}
RETURNING id
"""

_DL_MATCH = """
    (:n_ids = 0 OR id IN (SELECT value FROM json_each(:ids)))
    AND (:reason IS NULL OR reason = :reason)
    AND (:queue IS NULL OR queue = :queue)
    AND (:type IS NULL OR type = :type)
    AND (:correlation_id IS NULL OR correlation_id = :correlation_id)
"""

# One status, 'open' (parked or held), or NULL (any).
_DL_STATUS = """
    (:status IS NULL OR status = :status
     OR (:status = 'open' AND status IN ('parked', 'held')))
"""

LIST_DEAD_LETTERS = f"""
SELECT {_DEAD_LETTER_COLUMNS}
FROM dead_letter
WHERE {_DL_MATCH} AND {_DL_STATUS}
ORDER BY id DESC
LIMIT :limit
"""

REPLAYABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND status = 'parked' AND replays < :max_replays
ORDER BY id DESC
LIMIT :limit
"""

REPLAY = f"""
UPDATE dead_letter SET status = 'replayed', replays = replays + 1
WHERE {_IDS}
RETURNING id, message_id, queue, body, headers, replays, correlation_id, type
"""

PURGEABLE = f"""
SELECT id FROM dead_letter
WHERE {_DL_MATCH} AND {_DL_STATUS} AND status <> 'purged'
ORDER BY id DESC
LIMIT :limit
"""

PURGE = f"""
UPDATE dead_letter SET status = 'purged', body = x'' WHERE {_IDS}
RETURNING message_id
"""

LOAD_SAGA = f"""
SELECT {_SAGA_COLUMNS} FROM saga WHERE workflow = ? AND correlation_id = ?
"""

# The newest *limit* facts (a long-lived instance has more), oldest first.
JOURNAL = """
SELECT * FROM (
    SELECT id, at, message_id, correlation_id, stage, type, detail
    FROM journal WHERE correlation_id = ?
    ORDER BY at DESC, id DESC
    LIMIT ?
) AS newest
ORDER BY at, id
"""

PRUNE_INBOX = """
DELETE FROM inbox WHERE rowid IN (SELECT rowid FROM inbox WHERE day < ? LIMIT ?)
"""

PRUNE_JOURNAL = """
DELETE FROM journal WHERE id IN (SELECT id FROM journal WHERE at < ? LIMIT ?)
"""

# Rows marked sent by releases that kept them.
PRUNE_OUTBOX = """
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sent_at < ? LIMIT ?)
"""

# Dead letters nothing waits on any more, by last_seen; parked and held ones
# stay for an operator, and so does a released one that still blocks its
# instance. Without statistics the planner picked dead_letter_status, which
# visits every settled row of the retention each time: the index of 0008 is
# named (the status term is written as the index has it), as in COUNTS.
PRUNE_DEAD_LETTERS = """
DELETE FROM dead_letter WHERE id IN (
    SELECT d.id FROM dead_letter AS d INDEXED BY dead_letter_settled
    WHERE d.status IN ('released', 'replayed', 'purged') AND d.last_seen < ?
      AND NOT EXISTS (SELECT 1 FROM hold AS h WHERE h.message_id = d.message_id)
    LIMIT ?)
"""

# A workflow's instances without a change since :before, after (:after_at,
# :after_id) in (updated_at, correlation_id) order, by saga_idle (0010).
# :after_at went through a datetime (microseconds), so it may differ from the
# stored REAL by half a microsecond: within one of it, times count as equal
# (no two commits come that close) and the id decides.
IDLE_SAGAS = f"""
SELECT {_SAGA_COLUMNS} FROM saga INDEXED BY saga_idle
WHERE workflow = :workflow AND updated_at < :before
  AND updated_at >= :after_at - 1e-6
  AND (updated_at > :after_at + 1e-6 OR correlation_id > :after_id)
ORDER BY updated_at, correlation_id
LIMIT :limit
"""

# Instances (:instances, a JSON array of [id, version]) that nothing touched
# since they were read, and that nothing waits to reach: no hold, no timer
# due later. The timers are the pending outbox rows due after :now, read by
# outbox_due's range (few: an outage's backlog is due already).
DELETE_SAGAS = """
DELETE FROM saga
WHERE workflow = :workflow
  AND (correlation_id, version) IN (
      SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]')
      FROM json_each(:instances))
  AND NOT EXISTS (
      SELECT 1 FROM hold AS h
      WHERE h.workflow = saga.workflow AND h.correlation_id = saga.correlation_id)
  AND correlation_id NOT IN (
      SELECT o.correlation_id FROM outbox AS o INDEXED BY outbox_due
      WHERE max(o.next_attempt_at, coalesce(o.lease_until, 0)) > :now
        AND o.sent_at IS NULL AND o.parked_reason IS NULL
        AND o.correlation_id IS NOT NULL)
"""

COUNTS = """
SELECT
    (SELECT count(*) FROM outbox INDEXED BY outbox_due
     WHERE sent_at IS NULL AND parked_reason IS NULL),
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NOT NULL),
    (SELECT count(*) FROM dead_letter WHERE status = 'parked'),
    (SELECT count(*) FROM dead_letter WHERE status = 'held'),
    (SELECT count(*) FROM hold),
    (SELECT count(*) FROM saga),
    (SELECT count(*) FROM inbox)
"""

PING = "SELECT 1"
