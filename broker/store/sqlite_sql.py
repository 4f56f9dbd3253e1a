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
    "CREATE_SAGA",
    "UPDATE_SAGA",
    "ADD_OUTBOX",
    "OUTBOX_SEQ",
    "ADD_DEAD_LETTER",
    "ADD_JOURNAL",
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
    "PRUNE_INBOX",
    "PRUNE_JOURNAL",
    "PRUNE_OUTBOX",
    "COUNTS",
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

_OUTBOX_COLUMNS = (
    "id, message_id, exchange, routing_key, body, correlation_id, type, headers, "
    "attempts"
)

CLAIM_OUTBOX = f"""
UPDATE outbox SET lease_until = :lease_until, attempts = attempts + 1
WHERE id IN (
    SELECT id FROM outbox
    WHERE sent_at IS NULL AND parked_reason IS NULL
      AND next_attempt_at <= :now
      AND (lease_until IS NULL OR lease_until <= :now)
    ORDER BY id
    LIMIT :limit
)
RETURNING {_OUTBOX_COLUMNS}
"""

_IDS = "id IN (SELECT value FROM json_each(:ids))"

MARK_SENT = f"""
UPDATE outbox SET sent_at = :now, lease_until = NULL
WHERE {_IDS} AND sent_at IS NULL
"""

RESCHEDULE = f"""
UPDATE outbox SET next_attempt_at = :at, lease_until = NULL
WHERE {_IDS} AND sent_at IS NULL
"""

PARK = f"""
UPDATE outbox SET parked_reason = :reason, lease_until = NULL
WHERE {_IDS} AND sent_at IS NULL
"""

_DL_MATCH = """
    (:n_ids = 0 OR id IN (SELECT value FROM json_each(:ids)))
    AND (:reason IS NULL OR reason = :reason)
    AND (:queue IS NULL OR queue = :queue)
    AND (:type IS NULL OR type = :type)
    AND (:correlation_id IS NULL OR correlation_id = :correlation_id)
"""

LIST_DEAD_LETTERS = f"""
SELECT id, message_id, queue, routing_key, reason, detail, body, headers,
       attempts, correlation_id, type, status, replays, first_seen, last_seen
FROM dead_letter
WHERE {_DL_MATCH} AND (:status IS NULL OR status = :status)
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
WHERE {_DL_MATCH} AND (:status IS NULL OR status = :status) AND status <> 'purged'
ORDER BY id DESC
LIMIT :limit
"""

PURGE = f"UPDATE dead_letter SET status = 'purged', body = x'' WHERE {_IDS}"

LOAD_SAGA = f"""
SELECT {_SAGA_COLUMNS} FROM saga WHERE workflow = ? AND correlation_id = ?
"""

JOURNAL = """
SELECT id, at, message_id, correlation_id, stage, type, detail
FROM journal WHERE correlation_id = ?
ORDER BY at, id
LIMIT ?
"""

PRUNE_INBOX = """
DELETE FROM inbox WHERE rowid IN (SELECT rowid FROM inbox WHERE day < ? LIMIT ?)
"""

PRUNE_JOURNAL = """
DELETE FROM journal WHERE id IN (SELECT id FROM journal WHERE at < ? LIMIT ?)
"""

PRUNE_OUTBOX = """
DELETE FROM outbox WHERE id IN (SELECT id FROM outbox WHERE sent_at < ? LIMIT ?)
"""

COUNTS = """
SELECT
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NULL),
    (SELECT count(*) FROM outbox WHERE sent_at IS NULL AND parked_reason IS NOT NULL),
    (SELECT count(*) FROM dead_letter WHERE status = 'parked'),
    (SELECT count(*) FROM saga),
    (SELECT count(*) FROM inbox)
"""
