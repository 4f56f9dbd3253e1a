-- One round trip per batch: the engine reads what it needs (claimed keys,
-- instance states) without locks, applies the batch in memory, then calls
-- q2c_commit_batch once. As a single statement it is atomic: either every key
-- is claimed, every instance written at its expected version and every row
-- inserted, or nothing is. A key claimed or an instance changed in between
-- (another daemon took over the shard) raises SQLSTATE QC001 / QC002 and the
-- engine reads and applies the batch again.
CREATE FUNCTION q2c_commit_batch(
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
    p_j_details       text[]
)
RETURNS SETOF bigint
LANGUAGE plpgsql AS $$
DECLARE
    n_created bigint := 0;
    n_updated bigint := 0;
    n bigint;
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

    IF cardinality(p_j_message_ids) > 0 THEN
        INSERT INTO journal (message_id, correlation_id, stage, type, detail)
        SELECT u.message_id, u.correlation_id, u.stage, u.type, u.detail
        FROM unnest(p_j_message_ids, p_j_correlations, p_j_stages, p_j_types,
                    p_j_details)
            WITH ORDINALITY AS u(message_id, correlation_id, stage, type, detail, n)
        ORDER BY u.n;
    END IF;

    RETURN QUERY
    INSERT INTO outbox (message_id, exchange, routing_key, body, correlation_id, type,
                        headers, attempts, lease_until)
    SELECT u.message_id, u.exchange, u.routing_key, u.body, u.correlation_id, u.type,
           u.headers::jsonb, 1, now() + make_interval(secs => p_lease_s)
    FROM unnest(p_ob_message_ids, p_ob_exchanges, p_ob_routing_keys, p_ob_bodies,
                p_ob_correlations, p_ob_types, p_ob_headers)
        WITH ORDINALITY AS u(message_id, exchange, routing_key, body, correlation_id,
                             type, headers, n)
    ORDER BY u.n
    RETURNING id;
END
$$;
