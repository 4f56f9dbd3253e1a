-- Delayed outbox rows, messages held behind a parked one, the xref registry, and
-- q2c_commit_batch_v2, which writes all of them with the rest of a batch.

-- Outbox: a pending row is due when its next attempt time and its lease (if any)
-- have both passed. greatest() skips NULLs, so the due time is one expression,
-- and the relay's poller reads this index from its start up to now(): rows due
-- later (delayed emits, rescheduled publishes) cost the poll nothing. It
-- replaces outbox_pending, so a commit maintains as many indexes as before.
DROP INDEX outbox_pending;
CREATE INDEX outbox_due ON outbox ((greatest(next_attempt_at, lease_until)), id)
    WHERE sent_at IS NULL AND parked_reason IS NULL;

-- Dead letters: 'held' waits behind a parked message of its workflow instance
-- (workflow, correlation_id), in held_seq order; 'released' was sent on again.
ALTER TABLE dead_letter DROP CONSTRAINT dead_letter_status_check;
ALTER TABLE dead_letter ADD CONSTRAINT dead_letter_status_check
    CHECK (status IN ('parked', 'held', 'released', 'replayed', 'purged'));
ALTER TABLE dead_letter ADD COLUMN workflow text, ADD COLUMN held_seq bigint;

CREATE SEQUENCE dead_letter_held_seq;

CREATE INDEX dead_letter_held ON dead_letter (workflow, correlation_id, held_seq)
    WHERE status = 'held';

-- One row per held workflow instance: the message that holds it (retrying, or a
-- dead letter). Written by q2c_commit_batch_v2 at an expected blocker.
CREATE TABLE hold (
    workflow        text        NOT NULL,
    correlation_id  text        NOT NULL,
    message_id      text        NOT NULL,
    since           timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow, correlation_id)
);

CREATE INDEX hold_message ON hold (message_id);

-- Cross references: one native id per (kind, canonical id, system), and one
-- canonical id per (kind, system, native id).
CREATE TABLE xref (
    kind          text        NOT NULL,
    canonical_id  text        NOT NULL,
    system        text        NOT NULL,
    native_id     text        NOT NULL,
    content_hash  text        NOT NULL DEFAULT '',
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, canonical_id, system),
    CONSTRAINT xref_native UNIQUE (kind, system, native_id)
);

-- Upsert xref entries (unique per primary key; the caller dedups). A native id
-- bound to another canonical id raises QC003 with the details as JSON.
CREATE FUNCTION q2c_xref_put(
    p_kinds       text[],
    p_canonical   text[],
    p_systems     text[],
    p_natives     text[],
    p_hashes      text[]
)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    SELECT x.kind, x.system, x.native_id, x.canonical_id AS bound_to,
           u.canonical AS wanted
    INTO r
    FROM unnest(p_kinds, p_canonical, p_systems, p_natives)
        AS u(kind, canonical, system, native)
    JOIN xref AS x
      ON x.kind = u.kind AND x.system = u.system AND x.native_id = u.native
    WHERE x.canonical_id <> u.canonical
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'q2c: xref % % id % is bound to %, not %',
            r.kind, r.system, r.native_id, r.bound_to, r.wanted
            USING ERRCODE = 'QC003',
                  DETAIL = json_build_object(
                      'kind', r.kind, 'system', r.system, 'native_id', r.native_id,
                      'bound_to', r.bound_to, 'wanted', r.wanted)::text;
    END IF;
    INSERT INTO xref AS x (kind, canonical_id, system, native_id, content_hash)
    SELECT u.kind, u.canonical, u.system, u.native, u.hash
    FROM unnest(p_kinds, p_canonical, p_systems, p_natives, p_hashes)
        AS u(kind, canonical, system, native, hash)
    ORDER BY u.kind, u.canonical, u.system
    ON CONFLICT (kind, canonical_id, system) DO UPDATE SET
        native_id = EXCLUDED.native_id,
        content_hash = EXCLUDED.content_hash,
        updated_at = now()
    WHERE (x.native_id, x.content_hash)
        IS DISTINCT FROM (EXCLUDED.native_id, EXCLUDED.content_hash);
END
$$;

-- Hand the hold of one instance on: its first held message becomes the blocker
-- and goes back to its queue through the outbox (due at once, not leased); with
-- nothing held, the hold is cleared. Returns the new blocker, or NULL.
CREATE FUNCTION q2c_promote_hold(p_workflow text, p_correlation_id text)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    SELECT id, message_id, queue, body, headers, correlation_id, type INTO r
    FROM dead_letter
    WHERE workflow = p_workflow AND correlation_id = p_correlation_id
      AND status = 'held'
    ORDER BY held_seq
    LIMIT 1
    FOR UPDATE;
    IF NOT FOUND THEN
        DELETE FROM hold
        WHERE workflow = p_workflow AND correlation_id = p_correlation_id;
        RETURN NULL;
    END IF;
    UPDATE dead_letter SET status = 'released', last_seen = now() WHERE id = r.id;
    INSERT INTO hold AS h (workflow, correlation_id, message_id)
    VALUES (p_workflow, p_correlation_id, r.message_id)
    ON CONFLICT (workflow, correlation_id) DO UPDATE
        SET message_id = EXCLUDED.message_id, updated_at = now();
    INSERT INTO outbox (message_id, exchange, routing_key, body, correlation_id, type,
                        headers)
    VALUES (r.message_id, '', r.queue, r.body, r.correlation_id, r.type,
            r.headers || '{"x-q2c-released": 1}'::jsonb);
    RETURN r.message_id;
END
$$;

-- Holds nothing can release any more: a purged blocker, or held messages whose
-- instance lost its hold. Each is handed on by q2c_promote_hold. Returns how
-- many instances moved.
CREATE FUNCTION q2c_sweep_holds(p_limit integer)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    r record;
    moved integer := 0;
BEGIN
    FOR r IN
        SELECT h.workflow, h.correlation_id
        FROM hold AS h JOIN dead_letter AS d ON d.message_id = h.message_id
        WHERE d.status = 'purged'
        ORDER BY h.workflow, h.correlation_id
        LIMIT p_limit
    LOOP
        PERFORM q2c_promote_hold(r.workflow, r.correlation_id);
        moved := moved + 1;
    END LOOP;
    FOR r IN
        SELECT DISTINCT d.workflow, d.correlation_id
        FROM dead_letter AS d
        WHERE d.status = 'held'
          AND NOT EXISTS (
              SELECT 1 FROM hold AS h
              WHERE h.workflow = d.workflow AND h.correlation_id = d.correlation_id)
        ORDER BY d.workflow, d.correlation_id
        LIMIT p_limit
    LOOP
        PERFORM q2c_promote_hold(r.workflow, r.correlation_id);
        moved := moved + 1;
    END LOOP;
    RETURN moved;
END
$$;

-- q2c_commit_batch (0002) plus: a delay per outbox row (a delayed row is due
-- after it and not leased to the writer), hold writes checked against the
-- blocker that was read (QC002 otherwise), held messages released (checked:
-- they must still be held), held messages recorded in arrival order, and xref
-- entries. Returns the ids of all outbox rows written, in input order.
CREATE FUNCTION q2c_commit_batch_v2(
    p_consumer        text,
    p_keys            text[],
    p_days            date[],
    p_message_ids     text[],
    p_workflow        text,
    p_saga_ids        text[],
    p_saga_expected   bigint[],
    p_saga_states     bytea[],
    p_ob_message_ids  text[],
    p_ob_exchanges    text[],
    p_ob_routing_keys text[],
    p_ob_bodies       bytea[],
    p_ob_correlations text[],
    p_ob_types        text[],
    p_ob_headers      text[],
    p_ob_delays       double precision[],
    p_lease_s         double precision,
    p_dl_message_ids  text[],
    p_dl_queues       text[],
    p_dl_routing_keys text[],
    p_dl_reasons      text[],
    p_dl_details      text[],
    p_dl_bodies       bytea[],
    p_dl_headers      text[],
    p_dl_attempts     integer[],
    p_dl_correlations text[],
    p_dl_types        text[],
    p_j_message_ids   text[],
    p_j_correlations  text[],
    p_j_stages        text[],
    p_j_types         text[],
    p_j_details       text[],
    p_h_message_ids   text[],
    p_h_queues        text[],
    p_h_routing_keys  text[],
    p_h_details       text[],
    p_h_bodies        bytea[],
    p_h_headers       text[],
    p_h_attempts      integer[],
    p_h_correlations  text[],
    p_h_types         text[],
    p_hold_ids        text[],
    p_hold_blockers   text[],
    p_hold_expected   text[],
    p_released        text[],
    p_x_kinds         text[],
    p_x_canonical     text[],
    p_x_systems       text[],
    p_x_natives       text[],
    p_x_hashes        text[]
)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    n_created bigint := 0;
    n_updated bigint := 0;
    n_deleted bigint := 0;
    n bigint;
    i integer;
BEGIN
    IF cardinality(p_keys) > 0 THEN
        -- Sorted, so that two daemons' overlapping batches lock in one order.
        INSERT INTO inbox (consumer, key, day, message_id)
        SELECT p_consumer, u.key, u.day, u.message_id
        FROM unnest(p_keys, p_days, p_message_ids) AS u(key, day, message_id)
        ORDER BY u.key
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n <> cardinality(p_keys) THEN
            RAISE EXCEPTION 'q2c: % of % idempotency keys of % were claimed concurrently',
                cardinality(p_keys) - n, cardinality(p_keys), p_consumer
                USING ERRCODE = 'QC001';
        END IF;
    END IF;

    IF cardinality(p_saga_ids) > 0 THEN
        INSERT INTO saga (workflow, correlation_id, version, state)
        SELECT p_workflow, w.cid, 1, w.state
        FROM unnest(p_saga_ids, p_saga_expected, p_saga_states) AS w(cid, expected, state)
        WHERE w.expected = 0
        ORDER BY w.cid
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n_created = ROW_COUNT;

        UPDATE saga
        SET version = saga.version + 1, state = w.state, updated_at = now()
        FROM unnest(p_saga_ids, p_saga_expected, p_saga_states) AS w(cid, expected, state)
        WHERE w.expected > 0
          AND saga.workflow = p_workflow
          AND saga.correlation_id = w.cid
          AND saga.version = w.expected;
        GET DIAGNOSTICS n_updated = ROW_COUNT;

        IF n_created + n_updated <> cardinality(p_saga_ids) THEN
            RAISE EXCEPTION 'q2c: % of % % instances changed since they were read',
                cardinality(p_saga_ids) - n_created - n_updated,
                cardinality(p_saga_ids), p_workflow
                USING ERRCODE = 'QC002';
        END IF;
    END IF;

    IF cardinality(p_hold_ids) > 0 THEN
        INSERT INTO hold (workflow, correlation_id, message_id)
        SELECT p_workflow, h.cid, h.blocker
        FROM unnest(p_hold_ids, p_hold_blockers, p_hold_expected)
            AS h(cid, blocker, expected)
        WHERE h.expected IS NULL AND h.blocker IS NOT NULL
        ORDER BY h.cid
        ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n_created = ROW_COUNT;

        UPDATE hold SET message_id = h.blocker, updated_at = now()
        FROM unnest(p_hold_ids, p_hold_blockers, p_hold_expected)
            AS h(cid, blocker, expected)
        WHERE h.expected IS NOT NULL AND h.blocker IS NOT NULL
          AND hold.workflow = p_workflow
          AND hold.correlation_id = h.cid
          AND hold.message_id = h.expected;
        GET DIAGNOSTICS n_updated = ROW_COUNT;

        DELETE FROM hold
        USING unnest(p_hold_ids, p_hold_blockers, p_hold_expected)
            AS h(cid, blocker, expected)
        WHERE h.expected IS NOT NULL AND h.blocker IS NULL
          AND hold.workflow = p_workflow
          AND hold.correlation_id = h.cid
          AND hold.message_id = h.expected;
        GET DIAGNOSTICS n_deleted = ROW_COUNT;

        IF n_created + n_updated + n_deleted <> cardinality(p_hold_ids) THEN
            RAISE EXCEPTION 'q2c: % of % % holds changed since they were read',
                cardinality(p_hold_ids) - n_created - n_updated - n_deleted,
                cardinality(p_hold_ids), p_workflow
                USING ERRCODE = 'QC002';
        END IF;
    END IF;

    IF cardinality(p_released) > 0 THEN
        UPDATE dead_letter SET status = 'released', last_seen = now()
        WHERE message_id = ANY(p_released) AND status = 'held';
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n <> cardinality(p_released) THEN
            RAISE EXCEPTION 'q2c: % of % held messages of % were released concurrently',
                cardinality(p_released) - n, cardinality(p_released), p_workflow
                USING ERRCODE = 'QC002';
        END IF;
    END IF;

    IF cardinality(p_dl_message_ids) > 0 THEN
        INSERT INTO dead_letter AS d (message_id, queue, routing_key, reason, detail,
                                      body, headers, attempts, correlation_id, type)
        SELECT u.message_id, u.queue, u.routing_key, u.reason, u.detail, u.body,
               u.headers::jsonb, u.attempts, u.correlation_id, u.type
        FROM unnest(p_dl_message_ids, p_dl_queues, p_dl_routing_keys, p_dl_reasons,
                    p_dl_details, p_dl_bodies, p_dl_headers, p_dl_attempts,
                    p_dl_correlations, p_dl_types)
            AS u(message_id, queue, routing_key, reason, detail, body, headers,
                 attempts, correlation_id, type)
        ORDER BY u.message_id
        ON CONFLICT (message_id) DO UPDATE SET
            queue = EXCLUDED.queue,
            routing_key = EXCLUDED.routing_key,
            reason = EXCLUDED.reason,
            detail = EXCLUDED.detail,
            body = EXCLUDED.body,
            headers = EXCLUDED.headers,
            attempts = d.attempts + EXCLUDED.attempts,
            correlation_id = coalesce(EXCLUDED.correlation_id, d.correlation_id),
            type = coalesce(EXCLUDED.type, d.type),
            status = 'parked',
            last_seen = now();
    END IF;

    -- Held messages one by one, in arrival order, each taking the next place
    -- (a message already held keeps its own). Rare, so a loop is cheap enough.
    FOR i IN 1 .. coalesce(cardinality(p_h_message_ids), 0) LOOP
        INSERT INTO dead_letter AS d (message_id, queue, routing_key, reason, detail,
                                      body, headers, attempts, correlation_id, type,
                                      status, workflow, held_seq)
        VALUES (p_h_message_ids[i], p_h_queues[i], p_h_routing_keys[i], 'held',
                p_h_details[i], p_h_bodies[i], p_h_headers[i]::jsonb,
                p_h_attempts[i], p_h_correlations[i], p_h_types[i], 'held',
                p_workflow, nextval('dead_letter_held_seq'))
        ON CONFLICT (message_id) DO UPDATE SET
            queue = EXCLUDED.queue,
            routing_key = EXCLUDED.routing_key,
            reason = 'held',
            detail = EXCLUDED.detail,
            body = EXCLUDED.body,
            headers = EXCLUDED.headers,
            attempts = greatest(d.attempts, EXCLUDED.attempts),
            correlation_id = EXCLUDED.correlation_id,
            type = coalesce(EXCLUDED.type, d.type),
            workflow = EXCLUDED.workflow,
            held_seq = CASE WHEN d.status = 'held' THEN d.held_seq
                            ELSE EXCLUDED.held_seq END,
            status = 'held',
            last_seen = now();
    END LOOP;

    IF cardinality(p_j_message_ids) > 0 THEN
        INSERT INTO journal (message_id, correlation_id, stage, type, detail)
        SELECT u.message_id, u.correlation_id, u.stage, u.type, u.detail
        FROM unnest(p_j_message_ids, p_j_correlations, p_j_stages, p_j_types,
                    p_j_details)
            WITH ORDINALITY AS u(message_id, correlation_id, stage, type, detail, n)
        ORDER BY u.n;
    END IF;

    IF cardinality(p_x_kinds) > 0 THEN
        PERFORM q2c_xref_put(p_x_kinds, p_x_canonical, p_x_systems, p_x_natives,
                             p_x_hashes);
    END IF;

    RETURN QUERY
    INSERT INTO outbox (message_id, exchange, routing_key, body, correlation_id, type,
                        headers, attempts, next_attempt_at, lease_until)
    SELECT u.message_id, u.exchange, u.routing_key, u.body, u.correlation_id, u.type,
           u.headers::jsonb,
           CASE WHEN u.delay > 0 THEN 0 ELSE 1 END,
           CASE WHEN u.delay > 0 THEN now() + make_interval(secs => u.delay)
                ELSE now() END,
           CASE WHEN u.delay > 0 THEN NULL
                ELSE now() + make_interval(secs => p_lease_s) END
    FROM unnest(p_ob_message_ids, p_ob_exchanges, p_ob_routing_keys, p_ob_bodies,
                p_ob_correlations, p_ob_types, p_ob_headers, p_ob_delays)
        WITH ORDINALITY AS u(message_id, exchange, routing_key, body, correlation_id,
                             type, headers, delay, n)
    ORDER BY u.n
    RETURNING id;
END
$$;
